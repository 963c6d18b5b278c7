"""``NatAgent``: a peer's side of NAT traversal (docs/NAT.md).

It keeps one control link to the relay (an ordinary p2psc TCP connection to the relay's peer
id: authenticated both ways and encrypted) and uses it to

- learn the public mapping of a UDP socket (PROBE from that socket to the relay's two UDP
  ports, bound to this peer by the probe token the relay gave over the link);
- ask the rendezvous to make two peers punch at once (CONNECT -> PUNCH to both), then run a
  :class:`~p2psc.nat.punch.Puncher` on the socket;
- carry sealed p2psc datagrams when no UDP path exists (DGRAM frames), and open relayed TCP
  circuits (OPEN -> CIRCUIT / INCOMING, then a fresh TCP connection with the preamble).

Whatever the path, the p2psc handshake then runs end to end between the two peers: the relay
and the rendezvous only ever see ciphertext, and the peer id the application is told is the
one the handshake authenticated.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ..config import PeerAddress, Settings
from ..p2p import TcpP2P
from ..p2pexcept import P2PError, PeerUnreachable, ProtocolError, RelayError
from ..udp_p2p import UdpP2P
from . import wire
from .punch import Puncher

log = logging.getLogger("p2psc.nat")
F = TypeVar("F", wire.Punch, wire.Circuit)

__all__ = ["NatAgent", "AgentHost", "NetReport", "nat_behaviour"]

_PROBE_TRIES = 3
_PROBE_WAIT = 0.5          # seconds per probe try, growing linearly
_BACKOFF_MAX = 30.0        # between attempts to re-establish the control link while serving
_STABLE_LINK = 10.0        # a control link that closed sooner counts as a failed attempt
_MAX_PENDING = 256         # requests in flight on the control link, at most
_MAX_PUNCHES = 8           # punch attempts running at once per UDP endpoint, at most
#: punch attempts that answer the relay's PUNCH at once: one per requesting peer, and at most
#: this many in all. Each pings the addresses the PUNCH names (its requester chose some of
#: them), so a flood of PUNCH (a CONNECT burst, a malicious relay) must not multiply them.
_MAX_PUNCH_BACKS = 8
#: relayed circuits being joined at once on INCOMING (a TCP connection to the relay each);
#: an honest relay offers a peer at most its ``circuits_per_peer`` (8 by default)
_MAX_JOINS = 16


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class AgentHost(Protocol):
    """What the agent needs of the handler (:class:`~p2psc.p2phandler.P2PHandler`)."""

    @property
    def settings(self) -> Settings: ...

    def get_myid(self) -> str: ...

    async def connect_address(self, peer_id: str, host: str, port: int,
                              ProtocolClass: Callable[..., TcpP2P]
                              ) -> tuple[asyncio.Transport, TcpP2P]: ...


@dataclass
class NetReport:
    """What ``p2psc netcheck`` prints (:meth:`NatAgent.netcheck`)."""

    relay: str
    relay_rtt: float | None = None                # seconds, over the control link
    tcp_observed: str | None = None               # our TCP address as the relay saw it
    local_udp: str | None = None
    udp_mappings: list[str | None] = field(default_factory=list)  # per relay UDP port
    behaviour: str = "unknown"                    # see nat_behaviour()
    error: str | None = None


def nat_behaviour(local: Any, mappings: list[Any]) -> str:
    """Name the NAT's mapping behaviour from a socket's local address and the public
    mappings two destinations saw: "udp blocked", "no nat", "endpoint-independent" (a
    "cone"), "endpoint-dependent" ("symmetric"), or "unknown"."""
    seen = [m for m in mappings if m is not None]
    if not seen:
        return "udp blocked"
    if len(seen) < len(mappings):
        return "unknown"
    if len(set(seen)) > 1:
        return "endpoint-dependent"
    if local is not None and tuple(seen[0]) == tuple(local):
        return "no nat"
    return "endpoint-independent"


class _ControlLink(TcpP2P):
    """The p2psc connection to the relay; its messages are control frames."""

    __slots__ = ("agent", "welcome")

    def __init__(self, handler: Any, myid: str, peer_id: str | None, agent: NatAgent):
        super().__init__(handler, myid, peer_id)
        self.agent = agent
        self.welcome: asyncio.Future[wire.Welcome] = asyncio.get_running_loop().create_future()

    def on_recv(self, data: bytes) -> None:
        self.agent.control_frame(self, data)

    def on_closed(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(RelayError(f"the relay closed the control link: {exc}"))
            self.welcome.exception()  # retrieved: no "never retrieved" warning
        self.agent.control_closed(self)


class _CircuitJoin(asyncio.Protocol):
    """The start of a relayed circuit: send the preamble, wait for the relay's one-byte
    answer; then the transport goes to the real protocol. Reading pauses at the answer, until
    the real protocol has it: what arrives in between would be lost."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.joined: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)
        transport.write(wire.circuit_preamble(self.token))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.joined.done():
            return
        if data[:1] == b"\x00":
            if self.transport is not None:
                self.transport.pause_reading()
            self.joined.set_result(data[1:])
        else:
            self.joined.set_exception(RelayError("the relay refused the circuit"))

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.joined.done():
            self.joined.set_exception(RelayError("the relay closed the circuit before it was "
                                                 "joined (the peer did not come)"))


class _EndpointTap:
    """The agent's side of one UDP endpoint: its id, its probes and punch attempts."""

    def __init__(self, agent: NatAgent, proto: UdpP2P) -> None:
        self.agent = agent
        self.proto = proto
        self.endpoint = os.urandom(wire.EP_LEN)
        self.probes: dict[bytes, asyncio.Future[wire.Addr]] = {}
        self.punchers: dict[bytes, tuple[Puncher, asyncio.Event]] = {}
        self.mappings: list[Any] = [None, None]
        # a client's peer, as find_udp_path learned it (for supervise)
        self.peer_id: str | None = None
        self.peer_endpoint: bytes | None = None
        self.direct: Any = None

    # NatTap
    def nat_datagram(self, data: bytes, addr: Any) -> None:
        if data[0] == wire.U_PROBE_REPLY:
            reply = wire.decode_probe_reply(data)
            if reply is None or not self.agent.is_relay_address(addr):
                return
            fut = self.probes.pop(reply.txid, None)
            if fut is not None and not fut.done():
                fut.set_result(reply.observed)
            return
        msg = wire.decode_punch(data)
        if msg is None:
            return
        entry = self.punchers.get(msg.punch_id)
        if entry is None:
            return
        puncher, found = entry
        loop = asyncio.get_running_loop()
        puncher.receive(data, addr, loop.time())
        self.flush(puncher)
        if puncher.path is not None:
            found.set()

    def relay_datagram(self, data: bytes, addr: Any) -> None:
        self.agent.send_dgram(self.endpoint, addr, data)

    def flush(self, puncher: Puncher) -> None:
        send = self.proto.send_nat_datagram
        for dgram, addr, ttl in puncher.datagrams_to_send():
            send(dgram, addr, ttl)

    async def probe(self, port_index: int) -> wire.Addr | None:
        """This socket's public mapping as the relay's UDP port ``port_index`` (0 or 1) sees
        it, or None when no answer came (UDP does not get out)."""
        agent = self.agent
        welcome = agent.welcome
        relay_ip = await agent.relay_ip(self.proto)
        if welcome is None or relay_ip is None:
            return None
        port = (welcome.udp_port1, welcome.udp_port2)[port_index]
        loop = asyncio.get_running_loop()
        for attempt in range(_PROBE_TRIES):
            txid = os.urandom(8)
            fut: asyncio.Future[wire.Addr] = loop.create_future()
            self.probes[txid] = fut
            self.proto.send_nat_datagram(
                wire.encode_probe(welcome.probe_token, self.endpoint, txid), (relay_ip, port))
            try:
                observed = await asyncio.wait_for(fut, _PROBE_WAIT * (attempt + 1))
            except asyncio.TimeoutError:
                continue
            finally:
                self.probes.pop(txid, None)
            self.mappings[port_index] = observed
            return observed
        self.mappings[port_index] = None
        return None

    async def punch(self, punch: wire.Punch, extra: list[Any]) -> Any:
        """Run one punch attempt; the address of the path found, or None (also when
        ``_MAX_PUNCHES`` attempts already run on this socket: whatever the relay says, a peer
        pings at most that many candidate sets at once)."""
        if len(self.punchers) >= _MAX_PUNCHES or punch.punch_id in self.punchers:
            log.info("%s: punch toward %s not started: %d attempts already run on this "
                     "socket", self.agent.myid, punch.peer_id, len(self.punchers))
            return None
        s = self.agent.settings
        loop = asyncio.get_running_loop()
        candidates: list[Any] = [tuple(c) for c in punch.candidates]
        for c in extra:
            if c not in candidates:
                candidates.append(c)
        low_ttl = s.nat_punch_low_ttl or None
        # the full-TTL pings wait one interval after the low-TTL ones (none: no wait)
        puncher = Puncher(punch.punch_id, candidates, loop.time(), interval=s.nat_punch_interval,
                          sync_delay=s.nat_punch_interval if low_ttl else 0.0,
                          budget=s.nat_punch_timeout, low_ttl=low_ttl)
        found = asyncio.Event()
        self.punchers[punch.punch_id] = (puncher, found)
        self.flush(puncher)
        try:
            while not puncher.finished and puncher.path is None:
                deadline = puncher.get_timer()
                if deadline is None:
                    break
                try:
                    await asyncio.wait_for(found.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    pass
                puncher.handle_timer(loop.time())
                self.flush(puncher)
        finally:
            # go on answering the other side's pings until the budget ends
            delay = max(0.0, puncher.deadline - loop.time())
            loop.call_later(delay, self._forget_puncher, punch.punch_id, puncher)
        log.info("%s: punch toward %s %s after %d pings", self.agent.myid, punch.peer_id,
                 f"found {puncher.path}" if puncher.path is not None else "found no path",
                 puncher.pings_sent)
        return puncher.path

    def _forget_puncher(self, punch_id: bytes, puncher: Puncher) -> None:
        entry = self.punchers.get(punch_id)
        if entry is not None and entry[0] is puncher:  # (not a later attempt's, same id)
            del self.punchers[punch_id]

    def local_addrs(self) -> tuple[wire.Addr, ...]:
        """The socket's own address, as a candidate for peers on the same network."""
        local = self.agent.local_address(self.proto)
        return (local,) if local is not None else ()


class NatAgent:
    """A peer's NAT traversal: its control link to ``relay`` and what runs over it."""

    def __init__(self, host: AgentHost, relay: PeerAddress) -> None:
        self.host = host
        self.relay = relay
        self.settings = host.settings
        self.myid = host.get_myid()
        self.welcome: wire.Welcome | None = None
        self._link: _ControlLink | None = None
        self._connecting: asyncio.Task[_ControlLink] | None = None
        self._tcp_factory: Callable[[], TcpP2P] | None = None
        self._udp_server: _EndpointTap | None = None
        self._taps: dict[bytes, _EndpointTap] = {}
        self._requests: dict[int, asyncio.Future[wire.Frame]] = {}
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._next_request = 0
        self._keeper: asyncio.Task[None] | None = None
        self._link_lost: asyncio.Event | None = None
        self._link_up_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._relay_ips: dict[int, str] = {}
        self._closed = False
        self._dropped_dgrams = 0
        self._reconnecting: asyncio.Task[None] | None = None
        self._reconnect_after = 0.0
        self._punching: set[str] = set()    # peers whose PUNCH an attempt answers now
        self._joining = 0                   # circuits being joined on INCOMING
        self._ignored: dict[str, int] = {}  # frames ignored over a limit, by kind

    # -- the control link -------------------------------------------------------------------------

    async def ensure_link(self) -> _ControlLink:
        """The control link, connected (and welcomed) if it was not; :class:`RelayError` if
        the relay cannot be reached within ``nat_relay_timeout``."""
        link = self._link
        if link is not None and not link.is_closed and self.welcome is not None:
            return link
        if self._closed:
            raise RelayError("NAT traversal is closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect_link())
            # (its RelayError is retrieved even when every waiter gave up before it came)
            self._connecting.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting),
                                          self.settings.nat_relay_timeout)
        except asyncio.TimeoutError:
            raise RelayError(f"the relay {self.relay.peer_id} at {self.relay.host}:"
                             f"{self.relay.port} did not answer within "
                             f"{self.settings.nat_relay_timeout:g} s") from None

    async def _connect_link(self) -> _ControlLink:
        r = self.relay
        try:
            _, link = await self.host.connect_address(
                r.peer_id, r.host, r.port,
                lambda h, m, p: _ControlLink(h, m, p, self))  # type: ignore[arg-type,return-value]
        except OSError as exc:
            raise RelayError(f"cannot reach the relay {r.peer_id} at {r.host}:{r.port}: "
                             f"{exc.strerror or exc}") from None
        assert isinstance(link, _ControlLink)
        try:
            await link.wait_handshaked()
            welcome = await link.welcome
        except P2PError as exc:
            link.abort()
            raise RelayError(f"the relay {r.peer_id} refused this peer: {exc}") from None
        self._link, self.welcome = link, welcome
        self._link_lost = asyncio.Event()
        self._link_up_at = asyncio.get_running_loop().time()
        self._send_hello()
        log.info("%s: control link to relay %s up (seen as %s:%d)", self.myid, r.peer_id,
                 welcome.observed.host, welcome.observed.port)
        return link

    def _send_hello(self) -> None:
        flags = (wire.FLAG_TCP if self._tcp_factory is not None else 0) | (
            wire.FLAG_UDP if self._udp_server is not None else 0)
        server = self._udp_server
        self._send(wire.Hello(flags, server.endpoint if server else bytes(wire.EP_LEN),
                              server.local_addrs() if server else ()))

    def _send(self, frame: wire.Frame) -> bool:
        link = self._link
        if link is None or link.is_closed:
            return False
        link.send(wire.encode(frame))
        return True

    def control_frame(self, link: _ControlLink, data: bytes) -> None:
        """A frame from the relay (the control link's ``on_recv``)."""
        try:
            frame = wire.decode_relay_frame(data)
        except ProtocolError as exc:
            log.warning("%s: bad frame from the relay: %s; closing the control link",
                        self.myid, exc)
            link.abort()
            return
        t = type(frame)
        if t is wire.RelayedDgram:
            assert isinstance(frame, wire.RelayedDgram)
            tap = self._taps.get(frame.destination)
            if tap is not None:
                tap.proto.relayed_datagram_received(
                    frame.payload, wire.RelayAddress(frame.source_peer, frame.source))
            return
        if t is wire.Welcome:
            assert isinstance(frame, wire.Welcome)
            if not link.welcome.done():
                link.welcome.set_result(frame)
            return
        if t is wire.Pong:
            assert isinstance(frame, wire.Pong)
            pong = self._pings.pop(frame.cookie, None)
            if pong is not None and not pong.done():
                pong.set_result(None)
            return
        if t is wire.Incoming:
            assert isinstance(frame, wire.Incoming)
            if self._tcp_factory is None:
                return
            if self._joining >= _MAX_JOINS:
                self._ignore("INCOMING", f"{_MAX_JOINS} relayed circuits are being joined")
                return
            self._joining += 1
            self._start(self._accept_circuit(frame.token, frame.source_peer))
            return
        if t is wire.Punch:
            assert isinstance(frame, wire.Punch)
            if frame.request == 0:
                if frame.peer_id in self._punching:
                    self._ignore("PUNCH", f"a punch toward {frame.peer_id} is under way")
                elif len(self._punching) >= _MAX_PUNCH_BACKS:
                    self._ignore("PUNCH", f"{_MAX_PUNCH_BACKS} punches are under way")
                else:
                    self._punching.add(frame.peer_id)
                    self._start(self._punch_back(frame))
                return
        request = getattr(frame, "request", 0)
        fut = self._requests.pop(request, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)
        elif t is wire.Error:
            assert isinstance(frame, wire.Error)
            log.info("%s: the relay says: %s", self.myid, frame.text)

    def _ignore(self, kind: str, why: str) -> None:
        """A frame ``kind`` from the relay not acted on (over a limit): logged at the 1st,
        100th, 10000th time."""
        n = self._ignored[kind] = self._ignored.get(kind, 0) + 1
        if n in (1, 100, 10000):
            log.info("%s: %s from the relay ignored: %s (%d so far)", self.myid, kind, why, n)

    def control_closed(self, link: _ControlLink) -> None:
        """The control link ended (its ``on_closed``)."""
        if link is not self._link:
            return
        self._link, self.welcome = None, None
        if self._link_lost is not None:
            self._link_lost.set()
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(RelayError("the control link to the relay closed"))
                fut.exception()
        self._requests.clear()
        if not self._closed:
            log.info("%s: control link to relay %s closed", self.myid, self.relay.peer_id)

    async def _request(self, make: Callable[[int], wire.Frame], expect: type[F]) -> F:
        """Send a request frame and wait for its answer, of type ``expect``; an ERROR
        answer, or one of another kind, raises :class:`RelayError`."""
        await self.ensure_link()
        if len(self._requests) >= _MAX_PENDING:
            raise RelayError("too many requests in flight to the relay")
        self._next_request = self._next_request % 0xFFFFFFFF + 1
        request = self._next_request
        fut: asyncio.Future[wire.Frame] = asyncio.get_running_loop().create_future()
        self._requests[request] = fut
        try:
            self._send(make(request))
            answer = await asyncio.wait_for(fut, self.settings.nat_relay_timeout)
        except asyncio.TimeoutError:
            raise RelayError("the relay did not answer in time") from None
        finally:
            self._requests.pop(request, None)
        if isinstance(answer, wire.Error):
            reason = answer.text or wire.ERROR_NAMES.get(answer.code, str(answer.code))
            raise RelayError(f"the relay refused: {reason}")
        if not isinstance(answer, expect):
            log.warning("%s: the relay answered a request with %s, not %s", self.myid,
                        type(answer).__name__.upper(), expect.__name__.upper())
            raise RelayError(f"the relay answered with {type(answer).__name__.upper()}, not "
                             f"{expect.__name__.upper()}")
        return answer

    # -- serving ----------------------------------------------------------------------------------

    def serve_tcp(self, factory: Callable[[], TcpP2P]) -> None:
        """Accept relayed TCP circuits with ``factory`` protocols (``run_as_server``)."""
        self._tcp_factory = factory
        self._keep()

    def serve_udp(self, proto: UdpP2P) -> None:
        """Make ``proto`` (the UDP server) reachable: its mapping registered and kept open,
        punch requests answered, relayed datagrams delivered to it."""
        tap = self._tap(proto)
        self._udp_server = tap
        self._keep()

    def _keep(self) -> None:
        if self._link is not None and self.welcome is not None:
            self._send_hello()
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._keep_link())

    async def _keep_link(self) -> None:
        """While serving: keep the control link up (reconnecting with backoff) and the UDP
        server's mapping known to the rendezvous and open (a probe every
        ``nat_probe_interval``)."""
        loop = asyncio.get_running_loop()
        backoff = 1.0
        while not self._closed:
            try:
                await self.ensure_link()
            except RelayError as exc:
                log.warning("%s: %s; retrying in %g s", self.myid, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            server = self._udp_server
            if server is not None:
                for index in (0, 1):
                    await server.probe(index)
            lost = self._link_lost
            if lost is None:
                continue
            try:
                await asyncio.wait_for(lost.wait(), self.settings.nat_probe_interval)
            except asyncio.TimeoutError:
                pass
            if not lost.is_set():
                continue
            # a link that the relay closed soon after it came up (another process of this
            # peer id replacing it, a full or hostile relay) is a failed attempt: back off
            # rather than redial at once, again and again
            if loop.time() - self._link_up_at < _STABLE_LINK:
                log.warning("%s: the relay closed the control link within %g s; retrying in "
                            "%g s", self.myid, _STABLE_LINK, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            else:
                backoff = 1.0

    # -- UDP --------------------------------------------------------------------------------------

    def _tap(self, proto: UdpP2P) -> _EndpointTap:
        tap = _EndpointTap(self, proto)
        self._taps[tap.endpoint] = tap
        proto.set_nat_tap(tap)
        return tap

    def forget(self, proto: UdpP2P) -> None:
        """``proto`` closed: drop its tap."""
        for ep, tap in list(self._taps.items()):
            if tap.proto is proto:
                del self._taps[ep]
                if self._udp_server is tap:
                    self._udp_server = None

    async def find_udp_path(self, proto: UdpP2P, peer_id: str, direct: Any
                            ) -> tuple[str, Any]:
        """Where ``proto`` (a client made without a target) is to handshake with ``peer_id``:
        ``(path, address)``. Asks the rendezvous to make both sides punch (the peer's
        ``direct`` address, if any, is one more candidate); if no punched path opens within
        ``nat_punch_timeout``, the relay. A peer the relay does not know is tried at its
        direct address, as without NAT traversal."""
        tap = self._tap(proto)
        tap.peer_id, tap.direct = peer_id, direct
        try:
            await self.ensure_link()
        except RelayError as exc:
            if direct is None:
                raise PeerUnreachable(f"{peer_id} has no address and {exc}") from None
            log.info("%s: %s; trying %s directly", self.myid, exc, peer_id)
            return "direct", direct
        mapped = await tap.probe(0)
        try:
            punch = await self._request(
                lambda req: wire.Connect(req, tap.endpoint, tap.local_addrs(), peer_id),
                wire.Punch)
        except RelayError as exc:
            if direct is None:
                raise PeerUnreachable(f"cannot reach {peer_id}: {exc}") from None
            log.info("%s: rendezvous with %s failed (%s); trying it directly", self.myid,
                     peer_id, exc)
            return "direct", direct
        tap.peer_endpoint = punch.peer_endpoint
        if mapped is not None and punch.candidates and self.settings.nat_punch:
            extra = [direct] if direct is not None else []
            path = await tap.punch(punch, extra)
            if path is not None:
                return ("direct" if path == direct else "punched"), path
        elif mapped is None:
            log.info("%s: no UDP answer from the relay: UDP seems blocked; relaying", self.myid)
        return "relayed", wire.RelayAddress(peer_id, punch.peer_endpoint)

    def supervise(self, proto: UdpP2P) -> None:
        """Watch the path of a client that :meth:`find_udp_path` placed: a direct or punched
        path from which nothing authenticated came for ``nat_path_timeout`` is given up for
        the relay, and a relayed session tries to punch every ``nat_upgrade_interval``
        (iroh moves relayed connections to direct paths the same way). The session, its keys
        and its counters stay; only where its datagrams go changes, and the peer follows on
        the first authenticated datagram from the new path."""
        for tap in self._taps.values():
            if tap.proto is proto and tap.peer_id is not None:
                self._start(self._supervise(tap, tap.peer_id))
                return

    async def _supervise(self, tap: _EndpointTap, peer_id: str) -> None:
        s = self.settings
        proto = tap.proto
        loop = asyncio.get_running_loop()
        try:
            await proto.wait_handshaked()
        except P2PError:
            return
        periods = [p for p in (s.nat_path_timeout, s.nat_upgrade_interval) if p > 0]
        if not periods:
            return
        tick = max(0.05, min(5.0, *(p / 4 for p in periods)))
        next_upgrade = loop.time() + s.nat_upgrade_interval
        while not self._closed and not proto.is_closed and tap.endpoint in self._taps:
            await asyncio.sleep(tick)
            now = loop.time()
            if proto.path != "relayed":
                heard = proto.last_heard(peer_id)
                if (s.nat_path_timeout and heard is not None and tap.peer_endpoint is not None
                        and now - heard > s.nat_path_timeout
                        and proto.move_peer(peer_id, wire.RelayAddress(peer_id,
                                                                       tap.peer_endpoint))):
                    log.warning("%s: nothing from %s over its %s path for %.0f s: relaying",
                                self.myid, peer_id, proto.path, now - heard)
                    proto.path = "relayed"
                    next_upgrade = now + s.nat_upgrade_interval
            elif s.nat_upgrade_interval and s.nat_punch and now >= next_upgrade:
                next_upgrade = now + s.nat_upgrade_interval
                try:
                    path = await self._try_punch(tap, peer_id)
                except RelayError as exc:
                    log.debug("%s: punching toward %s again failed: %s", self.myid, peer_id, exc)
                    continue
                if path is not None and not proto.is_closed and proto.move_peer(peer_id, path):
                    proto.path = "direct" if path == tap.direct else "punched"
                    log.info("%s: %s now reached over a %s path", self.myid, peer_id,
                             proto.path)

    async def _try_punch(self, tap: _EndpointTap, peer_id: str) -> Any:
        """One more punch attempt from ``tap``'s socket toward ``peer_id``: the path, or None."""
        if await tap.probe(0) is None:
            return None
        punch = await self._request(
            lambda req: wire.Connect(req, tap.endpoint, tap.local_addrs(), peer_id), wire.Punch)
        if not punch.candidates:
            return None
        return await tap.punch(punch, [tap.direct] if tap.direct is not None else [])

    async def _punch_back(self, punch: wire.Punch) -> None:
        """The rendezvous says a peer wants to reach our UDP server: punch toward it."""
        try:
            tap = self._taps.get(punch.endpoint)
            if tap is None or tap is not self._udp_server or not self.settings.nat_punch:
                return
            await tap.punch(punch, [])
        finally:
            self._punching.discard(punch.peer_id)

    def send_dgram(self, source: bytes, addr: wire.RelayAddress, data: bytes) -> None:
        """Send a sealed datagram through the relay."""
        if not self._send(wire.Dgram(source, addr.endpoint, addr.peer_id, data)):
            self._dropped_dgrams += 1
            if self._dropped_dgrams in (1, 100, 10000):
                log.info("%s: datagram for %s dropped: no control link to the relay "
                         "(%d so far)", self.myid, addr.peer_id, self._dropped_dgrams)
            if self._link is None and not self._closed:
                # one reconnect at a time, at most one a second: not one per datagram
                now = asyncio.get_running_loop().time()
                busy = self._reconnecting is not None and not self._reconnecting.done()
                if not busy and now >= self._reconnect_after:
                    self._reconnect_after = now + 1.0
                    self._reconnecting = self._start(self._reconnect_quietly())

    async def _reconnect_quietly(self) -> None:
        try:
            await self.ensure_link()
        except RelayError as exc:
            log.info("%s: %s", self.myid, exc)

    # -- TCP --------------------------------------------------------------------------------------

    async def open_circuit(self, peer_id: str, factory: Callable[[], TcpP2P]
                           ) -> tuple[asyncio.Transport, TcpP2P]:
        """A relayed TCP connection to ``peer_id`` with a ``factory`` protocol."""
        answer = await self._request(lambda req: wire.Open(req, peer_id), wire.Circuit)
        try:
            return await self._join(answer.token, factory)
        except asyncio.TimeoutError:
            raise RelayError(f"the relayed circuit to {peer_id} was not joined in time") from None

    async def _accept_circuit(self, token: bytes, source: str) -> None:
        try:
            factory = self._tcp_factory
            if factory is None:
                return
            await self._join(token, factory)
        except (OSError, P2PError, asyncio.TimeoutError) as exc:
            log.info("%s: relayed connection from %s failed: %s", self.myid, source,
                     exc or type(exc).__name__)
        finally:
            self._joining -= 1

    async def _join(self, token: bytes, factory: Callable[[], TcpP2P]
                    ) -> tuple[asyncio.Transport, TcpP2P]:
        loop = asyncio.get_running_loop()
        r = self.relay
        transport, join = await asyncio.wait_for(
            loop.create_connection(lambda: _CircuitJoin(token), r.host, r.port),
            self.settings.nat_relay_timeout)
        try:
            rest = await asyncio.wait_for(join.joined, self.settings.nat_relay_timeout * 2)
        except BaseException:
            transport.abort()
            raise
        proto = factory()
        proto.path = "relayed"
        transport.set_protocol(proto)
        proto.connection_made(transport)
        # (reading resumes first, so that a pause the protocol makes on ``rest`` holds; the
        # transport reads nothing before this call returns)
        if not transport.is_closing():
            transport.resume_reading()
        if rest:
            proto.data_received(rest)
        return transport, proto

    # -- diagnostics ------------------------------------------------------------------------------

    async def rtt(self) -> float:
        """One round trip over the control link, in seconds."""
        await self.ensure_link()
        loop = asyncio.get_running_loop()
        cookie = int.from_bytes(os.urandom(8), "big")
        fut: asyncio.Future[None] = loop.create_future()
        self._pings[cookie] = fut
        start = loop.time()
        try:
            self._send(wire.Ping(cookie))
            await asyncio.wait_for(fut, self.settings.nat_relay_timeout)
        except asyncio.TimeoutError:
            raise RelayError("the relay did not answer a ping in time") from None
        finally:
            self._pings.pop(cookie, None)
        return loop.time() - start

    async def netcheck(self, proto: UdpP2P) -> NetReport:
        """What this peer's network does (``p2psc netcheck``), probed from ``proto``'s socket."""
        r = self.relay
        report = NetReport(relay=f"{r.peer_id} at {r.host}:{r.port}")
        try:
            report.relay_rtt = await self.rtt()
        except RelayError as exc:
            report.error = str(exc)
            return report
        if self.welcome is not None:
            report.tcp_observed = f"{self.welcome.observed.host}:{self.welcome.observed.port}"
        tap = self._tap(proto)
        await self.relay_ip(proto)
        local = self.local_address(proto)
        report.local_udp = f"{local.host}:{local.port}" if local is not None else None
        mappings = [await tap.probe(0), await tap.probe(1)]
        report.udp_mappings = [f"{m.host}:{m.port}" if m else None for m in mappings]
        report.behaviour = nat_behaviour(local, mappings)
        return report

    # -- addresses --------------------------------------------------------------------------------

    async def relay_ip(self, proto: UdpP2P) -> str | None:
        """The relay's IP address in the family of ``proto``'s socket."""
        transport = proto.transport
        if transport is None:
            return None
        family = transport.get_extra_info("socket").family
        ip = self._relay_ips.get(family)
        if ip is None:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    self.relay.host, None, family=family, type=socket.SOCK_DGRAM)
            except OSError:
                return None
            if not infos:
                return None
            ip = self._relay_ips[family] = str(infos[0][4][0])
        return ip

    def is_relay_address(self, addr: Any) -> bool:
        return isinstance(addr, tuple) and bool(addr) and addr[0] in self._relay_ips.values()

    def local_address(self, proto: UdpP2P) -> wire.Addr | None:
        """``proto``'s socket address, with the address the system routes to the relay in
        place of a wildcard (found without sending anything)."""
        transport = proto.transport
        if transport is None:
            return None
        host, port = transport.get_extra_info("sockname")[:2]
        try:
            if ipaddress.ip_address(host).is_unspecified:
                relay_ip = next(iter(self._relay_ips.values()), None)
                if relay_ip is None:
                    return None
                family = socket.AF_INET6 if ":" in relay_ip else socket.AF_INET
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.connect((relay_ip, 9))
                    host = s.getsockname()[0]
        except (OSError, ValueError):
            return None
        return wire.Addr(host, port)

    # -- lifecycle ----------------------------------------------------------------------------------

    def _start(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop: no more reconnecting; the control link closes."""
        self._closed = True
        tasks = [t for t in (self._keeper, self._connecting, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None:
            link.close()
        for tap in self._taps.values():
            tap.proto.set_nat_tap(None)
        self._taps.clear()
