"""``UdpP2P``: the asyncio datagram protocol applications subclass for UDP peers (the
handler's side, a UDP server and UDP clients, is :class:`p2psc.udp_service.UdpService`).

A thin adapter over the sans-IO :class:`p2psc._proto.udp.UdpEndpoint`: datagrams in (with
the loop's time), events turned into hooks, datagrams out, one loop timer on the endpoint's
next deadline. On the
stdlib event loop the socket is read with ``recvfrom_into`` a reusable buffer (the stdlib
transport allocates 256 KiB per datagram and drops most of a burst); uvloop's own path is
kept. The protocol is described in docs/UDP.md.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from ._aio import AdapterBase, wall_offset
from ._host import NatTap, ProtocolHost
from ._proto.events import (
    Closed,
    DatagramReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    PeerKeyNeeded,
)
from ._proto.udp import UdpEndpoint
from .nat.wire import RelayAddress, is_nat_datagram
from .p2pexcept import (
    ChannelNotReady,
    InvalidDataType,
    MissRemoteAddr,
    P2PError,
    StatusError,
)

log = logging.getLogger("p2psc.udp")

__all__ = ["UdpP2P"]

_READ_BATCH = 256          # datagrams read per wake-up at most (fairness with other work)
_RECV_BUF = 65536          # larger than any UDP datagram


class UdpP2P(AdapterBase, asyncio.DatagramProtocol):
    """Authenticated, encrypted datagrams with any number of peers on one socket.

    Built by the handler as ``ProtocolClass(handler, myid, peer_id=None)``: with a
    ``peer_id`` it is a client that handshakes with that peer; without, a server that answers
    any known peer. Override :meth:`on_recv`, :meth:`on_handshaked` (or
    :meth:`on_peer_handshaked`) and, if needed, :meth:`on_peer_closed`.

    One :meth:`send` is one datagram: it arrives as one ``on_recv`` or not at all, never
    twice, never altered. Who sent it is the peer whose session keys opened it, given to
    :meth:`on_datagram` (and by :attr:`current_peer` inside ``on_recv``), never a guess from the
    source address, which anyone on the path can forge. Payloads over
    ``udp_max_payload`` (default 1200 bytes) raise :class:`MessageTooLarge`. A client's sends
    before its handshake completes are queued (``pending_max_messages`` /
    ``pending_max_bytes``; past that :class:`ChannelNotReady`) and flushed when it completes.
    """

    def __init__(self, handler: ProtocolHost, myid: str, peer_id: str | None = None):
        AdapterBase.__init__(self)
        self.handler = handler
        self.myid = myid
        self.peer_id = peer_id
        self.transport: asyncio.DatagramTransport | None = None
        self._ep: UdpEndpoint | None = None
        self._sock: socket.socket | None = None            # set by attach()
        self._target: tuple[Any, Any] | None = None        # client: (address, public key)
        self._rbuf: bytearray | None = None
        self._delivering: DatagramReceived | None = None  # inside on_datagram
        # the default on_datagram only calls on_recv: then on_recv is called directly
        self._plain_datagrams = type(self).on_datagram is UdpP2P.on_datagram
        self._nat_tap: NatTap | None = None
        #: a client's path to its peer: "direct", "punched" or "relayed" (docs/NAT.md);
        #: None on a server, whose peers each have their own (:meth:`path_of`)
        self.path: str | None = None

    # -- hooks for applications ---------------------------------------------------------------

    def on_handshaked(self) -> None:
        """Called when a peer is authenticated (on a client: once, for its peer)."""

    def on_peer_handshaked(self, peer_id: str, addr: Any) -> None:
        """Called when ``peer_id`` at ``addr`` is authenticated (not again for its rekeys);
        the default calls :meth:`on_handshaked`."""
        self.on_handshaked()

    def on_datagram(self, data: bytes, peer_id: str, addr: Any) -> None:
        """Called with each datagram's payload, decrypted and authenticated, with the id of
        the peer whose session opened it and the address it came from. The default calls
        :meth:`on_recv`; override this one to know who sent what."""
        self.on_recv(data, addr)

    def on_recv(self, data: bytes, addr: Any) -> None:
        """Called with each datagram's payload, decrypted and authenticated (the sender is
        :attr:`current_peer`); a reply ``self.send(data, addr)`` from here goes to that peer."""

    def on_peer_closed(self, peer_id: str, error: Exception | None) -> None:
        """Called when a peer's session ends: ``error`` None for its authenticated CLOSE,
        else why (idle expiry)."""

    # -- API ------------------------------------------------------------------------------------

    @property
    def handshaked(self) -> bool:
        """True once a handshake completed (a client: with its peer) and until stop()."""
        return self._handshaked and not self._closed

    @property
    def endpoint(self) -> UdpEndpoint | None:
        """The sans-IO protocol state (for inspection)."""
        return self._ep

    @property
    def current_peer(self) -> str | None:
        """Inside :meth:`on_datagram` / :meth:`on_recv`: the authenticated id of the peer that
        sent the datagram being delivered; else None."""
        return self._delivering.peer_id if self._delivering is not None else None

    def peer_of(self, addr: Any) -> str | None:
        """The id of the peer whose live session is at ``addr``, or None. A datagram moves an
        address only to its own session (its newest authenticated one, onto a free address);
        a handshake run at an address takes it from a session that had merely roamed there."""
        return self._ep.peer_at(addr) if self._ep is not None else None

    def send(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        """Send one datagram: a client to its peer by default. A server names ``addr``, which
        means the session at that address, sealed for its own peer. Inside ``on_recv``, the
        address of the datagram being delivered means its sender (:attr:`current_peer`),
        wherever the sender's session is; if another peer's session holds that address, the
        source address was forged or the datagram relayed, and :class:`MissRemoteAddr` is
        raised rather than guess who is meant (nothing is sent). :meth:`reply` and
        :meth:`send_to_peer` name the peer instead."""
        ep = self._open_endpoint(data)
        now = self._loop.time()  # type: ignore[union-attr]
        delivering = self._delivering
        if addr is None or (self.peer_id is not None and self._target is not None
                            and addr == self._target[0]):
            if self.peer_id is None:
                raise MissRemoteAddr("a server must name the address: send(data, addr) or "
                                     "send_to_peer(peer_id, data)")
            r = ep.send(self.peer_id, data, now)
        elif delivering is not None and addr == delivering.addr:
            sender = delivering.peer_id
            holder = ep.peer_at(addr)
            if holder is not None and holder != sender:
                raise MissRemoteAddr(
                    f"the datagram from {sender} came from {addr}, the address of "
                    f"{holder}'s session (a forged source, or relayed): reply() answers "
                    f"{sender}, send_to_peer() names a peer; nothing was sent")
            r = ep.send(sender, data, now)  # the reply goes to the sender's session
        else:
            r = ep.send_to_addr(addr, data, now)
        self._sent(ep, r)

    def reply(self, data: bytes | bytearray | memoryview) -> None:
        """Inside ``on_recv`` / ``on_datagram``: send one datagram to the peer that sent the
        datagram being delivered (its session, wherever it is)."""
        peer = self.current_peer
        if peer is None:
            raise StatusError("reply() is for use inside on_recv / on_datagram")
        self.send_to_peer(peer, data)

    def send_to_peer(self, peer_id: str, data: bytes | bytearray | memoryview) -> None:
        """Send one datagram to ``peer_id`` (its latest authenticated session)."""
        ep = self._open_endpoint(data)
        self._sent(ep, ep.send(peer_id, data, self._loop.time()))  # type: ignore[union-attr]

    async def wait_handshaked(self) -> None:
        """Return when the handshake is done (a server: the first one); raise its error if
        it failed (e.g. :class:`HandshakeTimeout` after ``udp_handshake_timeout``)."""
        await self._wait_handshaked("the UDP endpoint closed before the handshake completed")

    def stop(self) -> None:
        """Send an authenticated CLOSE to every peer and close the socket."""
        if self._closed:
            return
        ep = self._ep
        if ep is not None and self.transport is not None and not self.transport.is_closing():
            ep.close_all()
            self._flush()
        self._end(None)
        if self.transport is not None:
            self.transport.close()

    close = stop  # what P2PHandler.close() calls on the protocols it knows

    @property
    def is_closed(self) -> bool:
        """True once stopped, failed or its socket lost."""
        return self._closed

    @property
    def close_error(self) -> P2PError | None:
        """Why the endpoint ended (its handshake failed...): None while open and after
        :meth:`stop`."""
        return self._error

    def path_of(self, addr: Any) -> str:
        """How datagrams to ``addr`` travel: "relayed" through the relay, else "direct" (for
        a client, :attr:`path` says whether its direct path was punched)."""
        return "relayed" if type(addr) is RelayAddress else (
            self.path if self.path is not None and self.path != "relayed" else "direct")

    # -- used by the handler ----------------------------------------------------------------

    def attach(self, sock: socket.socket, target: tuple[Any, Any] | None = None) -> None:
        """Before the transport is made: the socket it will have (read directly on the
        stdlib loop) and, for a client, its peer's ``(address, public key)``."""
        self._sock = sock
        self._target = target

    # -- used by NAT traversal (p2psc.nat.agent) --------------------------------------------

    def set_nat_tap(self, tap: NatTap | None) -> None:
        """Hand the NAT datagrams this socket receives (discovery, punching) to ``tap``, and
        the datagrams sealed for a :class:`~p2psc.nat.wire.RelayAddress` too, to relay."""
        self._nat_tap = tap

    def send_nat_datagram(self, data: bytes, addr: Any, ttl: int | None = None) -> None:
        """Send an unsealed NAT datagram from this socket, with IP TTL ``ttl`` if given."""
        transport, sock = self.transport, self._sock
        if transport is None or transport.is_closing() or self._closed:
            return
        if ttl is None or sock is None:
            transport.sendto(data, addr)
            return
        if sock.family == socket.AF_INET6:
            level, option = socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
        else:
            level, option = socket.IPPROTO_IP, socket.IP_TTL
        try:
            old = sock.getsockopt(level, option)
            sock.setsockopt(level, option, ttl)
            try:
                sock.sendto(data, addr)
            finally:
                sock.setsockopt(level, option, old)
        except OSError as exc:  # best effort, as UDP is
            log.debug("%s: low-TTL send to %s failed: %s", self.myid, addr, exc)

    def relayed_datagram_received(self, data: bytes, addr: RelayAddress) -> None:
        """A datagram that came through the relay from the peer endpoint ``addr``."""
        ep, loop = self._ep, self._loop
        if ep is None or loop is None or self._closed:
            return
        self._handle_datagram(ep, data, addr, loop.time())
        if ep.timer_dirty:
            self._rearm_timer()

    def start_handshake(self, addr: Any, public_key: Any) -> None:
        """A client made without a target: handshake with its peer at ``addr`` now (the path
        NAT traversal found)."""
        ep, loop = self._ep, self._loop
        if ep is None or loop is None or self._closed or self.peer_id is None:
            raise ChannelNotReady("the UDP endpoint is not open")
        ep.connect(self.peer_id, public_key, addr, loop.time())
        self._after([])

    # -- asyncio.DatagramProtocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self.transport = transport  # type: ignore[assignment]
        handler = self.handler
        now = loop.time()
        try:
            self._ep = UdpEndpoint(self.myid, handler.private_key, handler.settings,
                                   key_lookup=handler.peer_public_key,
                                   replay_cache=handler.replay_cache,
                                   accept_from=self.peer_id, now=now,
                                   wall_offset=wall_offset(loop))
        except P2PError as exc:
            self._fail(exc)
            transport.close()
            return
        handler.udp_register(self)
        if self._sock is not None and _has_private_reader_api(loop):
            loop.call_soon(self._install_reader)
        if self.peer_id is not None and self._target is not None:
            addr, key = self._target
            try:
                self._ep.connect(self.peer_id, key, addr, now)
            except P2PError as exc:
                self._fail(exc)
                return
            self._after([])

    def datagram_received(self, data: bytes, addr: Any) -> None:
        ep = self._ep
        if ep is None or self._closed:
            return
        self._handle_datagram(ep, data, addr, self._loop.time())  # type: ignore[union-attr]
        if ep.timer_dirty:
            self._rearm_timer()

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: socket error: %s", self.myid, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            log.warning("%s: UDP socket lost: %s", self.myid, exc)
        self._end(None)
        self.handler.udp_unregister(self)

    # -- receiving ------------------------------------------------------------------------------

    def _handle_datagram(self, ep: UdpEndpoint, data: bytes | memoryview, addr: Any,
                         now: float) -> None:
        """One received datagram, from either read path: events, then what is to be sent."""
        tap = self._nat_tap
        if tap is not None and data and is_nat_datagram(data[0]):
            tap.nat_datagram(bytes(data), addr)
            return
        events = ep.receive(data, addr, now)
        if events:
            self._dispatch(events)
        if ep.out:
            self._flush()

    def _install_reader(self) -> None:
        """Replace the stdlib transport's reader (256 KiB allocated per datagram) by ours."""
        transport, sock, loop = self.transport, self._sock, self._loop
        if self._closed or transport is None or sock is None or transport.is_closing():
            return
        fd = sock.fileno()
        self._rbuf = bytearray(_RECV_BUF)
        loop._remove_reader(fd)  # type: ignore[union-attr]
        loop._add_reader(fd, self._read_ready)  # type: ignore[union-attr]

    def _read_ready(self) -> None:
        ep, sock, buf, loop = self._ep, self._sock, self._rbuf, self._loop
        if ep is None or sock is None or buf is None or loop is None or self._closed:
            return
        recv = sock.recvfrom_into
        mv = memoryview(buf)
        now = loop.time()
        for _ in range(_READ_BATCH):
            try:
                n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.error_received(exc)
                break
            self._handle_datagram(ep, mv[:n], addr, now)
            if self._closed:
                return
        if ep.timer_dirty:
            self._rearm_timer()

    # -- internals ------------------------------------------------------------------------------

    def _open_endpoint(self, data: object) -> UdpEndpoint:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidDataType(f"send() takes bytes-like data, not {type(data).__name__}")
        ep = self._ep
        if ep is None or self._closed:
            raise ChannelNotReady("the UDP endpoint is not open")
        return ep

    def _sent(self, ep: UdpEndpoint, r: tuple[bytes, Any] | None) -> None:
        if r is not None:
            if type(r[1]) is not RelayAddress:
                self.transport.sendto(r[0], r[1])  # type: ignore[union-attr]
            elif self._nat_tap is not None:
                self._nat_tap.relay_datagram(r[0], r[1])
        if ep.out or ep.timer_dirty:
            self._after([])

    def _after(self, events: list[Event]) -> None:
        """After a call into the endpoint: events, datagrams, timer."""
        ep = self._ep
        if ep is None:
            return
        if events:
            self._dispatch(events)
        if ep.out:
            self._flush()
        if ep.timer_dirty:
            self._rearm_timer()

    def _flush(self) -> None:
        ep, transport = self._ep, self.transport
        if ep is None or transport is None:
            return
        out = ep.datagrams_to_send()
        if transport.is_closing():
            return
        sendto = transport.sendto
        tap = self._nat_tap
        for dgram, addr in out:
            if type(addr) is not RelayAddress:
                sendto(dgram, addr)
            elif tap is not None:
                tap.relay_datagram(dgram, addr)
            # else: NAT traversal is closed, nothing can carry it (and it is no socket address)

    def _core_timer(self) -> float | None:
        ep = self._ep
        return ep.get_timer() if ep is not None else None

    def _on_core_timer(self, now: float) -> None:
        ep, loop = self._ep, self._loop
        if ep is None or loop is None:
            return
        ep.wall_offset = wall_offset(loop)  # follow wall-clock steps for later INITs
        events = ep.handle_timer(now)
        if events:
            self._dispatch(events)
        if ep.out:
            self._flush()

    def _dispatch(self, events: list[Event]) -> None:
        plain = self._plain_datagrams
        on_recv, on_datagram = self.on_recv, self.on_datagram
        for ev in events:
            if self._closed:
                return
            if type(ev) is DatagramReceived:
                self._delivering = ev
                try:
                    if plain:
                        on_recv(ev.data, ev.addr)
                    else:
                        on_datagram(ev.data, ev.peer_id, ev.addr)
                except Exception:
                    log.exception("%s: exception in on_recv", self.myid)
                finally:
                    self._delivering = None
            elif type(ev) is HandshakeComplete:
                if ev.rekey:
                    continue
                if self.peer_id is not None and self._handshaked:
                    continue  # a client tells its application once
                first = not self._handshaked
                self._handshaked = True
                if first:
                    self._wake_waiters(None)
                self._call_hook(self.on_peer_handshaked, ev.peer_id, ev.addr)
            elif type(ev) is HandshakeFailed:
                if ev.rekey:
                    continue
                log.warning("%s: handshake with %s failed: %s", self.myid, ev.peer_id, ev.error)
                if self.peer_id is not None and not self._handshaked:
                    self._fail(ev.error)
                    if self.transport is not None:
                        self.transport.close()
            elif type(ev) is Closed:
                self._call_hook(self.on_peer_closed, ev.peer_id, ev.error)
            elif type(ev) is PeerKeyNeeded:
                self._start_task(self._lookup(ev.peer_id, ev.token, ev.addr))

    async def _lookup(self, peer_id: str, token: bytes, addr: Any) -> None:
        try:
            key = await self.handler.lookup_unknown_peer(peer_id, addr)
        except P2PError as exc:
            log.info("%s: lookup of %s failed: %s", self.myid, peer_id, exc)
            key = None
        ep, loop = self._ep, self._loop
        if ep is None or loop is None or self._closed:
            return
        self._after(ep.provide_peer_key(token, key, loop.time()))

    def _fail(self, exc: P2PError) -> None:
        self._end(exc)

    def _end(self, error: P2PError | None) -> None:
        self._set_closed(error, "the UDP endpoint closed before the handshake completed")

    def _describe(self) -> str:
        return self.myid


def _has_private_reader_api(loop: asyncio.AbstractEventLoop) -> bool:
    """The stdlib selector loop, whose ``_add_reader``/``_remove_reader`` we can use."""
    return (isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
            and hasattr(loop, "_add_reader") and hasattr(loop, "_remove_reader"))
