"""``RelayServer``: the asyncio relay/rendezvous service (``p2psc relay serve``; docs/NAT.md).

A thin adapter over :class:`~p2psc.nat.rendezvous.Rendezvous`, which holds all the state and
makes every decision. The server is an ordinary p2psc peer (its own id, key, known peers and
directory): a peer attaches by completing a p2psc handshake with it, which proves possession
of the peer's key, so only peers whose key is on file or in the directory get anywhere.

One TCP port serves two kinds of connections, told apart by their first byte:

- ``b"P"`` (``CIRCUIT_MAGIC``): a relayed-circuit connection. Its preamble (``wire.
  CIRCUIT_PREAMBLE_LEN`` bytes) must arrive within ``preamble_timeout``; its token joins it to
  a circuit an OPEN created. When both sides have joined, each gets one byte, 0, and from then
  on the bytes are forwarded unchanged both ways, with end-to-end backpressure (reading one
  side pauses while the other's transport is above its high-water mark), a per-peer byte-rate
  bucket (reading pauses while the sender's bucket is in debt, resumed by a loop timer), an
  idle timeout, and half-close (an EOF is forwarded; both EOFs, or one side lost, end both).
- anything else (a p2psc record starts with 0): a p2psc control connection. The transport is
  handed to a :class:`~p2psc.p2p.TcpP2P` of the relay's handler; once its handshake is done the
  peer is attached, and every message is one control frame.

Two UDP sockets answer PROBEs (ports 1 and 2), so that a peer learns whether its NAT maps per
destination. Logs go to ``logging.getLogger("p2psc.relay")``: refusals, bad frames, drops and
timeouts, repeated ones at most once per ``log_interval``; never keys, tokens or payloads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from .._host import ProtocolHost
from ..p2p import TcpP2P
from ..p2pexcept import ConfigError, StatusError
from . import wire
from .rendezvous import (
    Action,
    CloseLink,
    JoinRefused,
    JoinWaiting,
    Log,
    RelayLimits,
    Rendezvous,
    SendFrame,
    SendLossy,
    Splice,
)
from .wire import Addr

log = logging.getLogger("p2psc.relay")

__all__ = ["RelayHost", "RelayServer", "RelayLimits", "CircuitInfo", "EARLY_DATA_MAX"]

#: Bytes a circuit side may send after its preamble before the other side has joined; past
#: that, reading it pauses until the splice.
EARLY_DATA_MAX = 64 * 1024


@dataclass(frozen=True)
class CircuitInfo:
    """A spliced circuit as the relay holds it (for operators and tests)."""

    circuit: int
    requester_id: str
    target_id: str
    #: bytes the relay holds unsent towards the requester's and the target's connection
    buffered: tuple[int, int]
    #: why reading from the requester's / the target's connection is paused: "peer" (the other
    #: side's transport is above its high-water mark), "rate" (the sender's byte bucket is in
    #: debt), "early" (before the splice); empty while reading
    paused: tuple[frozenset[str], frozenset[str]]


class RelayHost(ProtocolHost, Protocol):
    """What the relay needs of its handler (:class:`~p2psc.p2phandler.P2PHandler`): a
    protocol host with an id."""

    def get_myid(self) -> str:
        """The relay's own peer id."""


def _addr(sockaddr: Any) -> Addr:
    """An :class:`Addr` from a socket address (IPv6 has four fields)."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return Addr(str(sockaddr[0]), int(sockaddr[1]))
    return Addr("0.0.0.0", 0)


class _LogLimiter:
    """At most one line per kind per ``interval``, saying how many were held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, kind: str, now: float, level: int, text: str) -> None:
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        log.log(level, "%s%s", text, f" ({held} more since the last line)" if held else "")


class _ControlLink(TcpP2P):
    """A peer's control link: an ordinary p2psc connection whose messages are frames."""

    __slots__ = ("relay",)

    def __init__(self, handler: RelayHost, myid: str, relay: RelayServer):
        super().__init__(handler, myid)
        self.relay = relay

    def on_handshaked(self) -> None:
        self.relay.link_attached(self)

    def on_recv(self, data: bytes) -> None:
        self.relay.link_frame(self, data)

    def on_closed(self, exc: Exception | None) -> None:
        self.relay.link_closed(self)


# states of an accepted connection
_NEW, _PREAMBLE, _WAITING, _SPLICED, _HANDED, _CLOSED = range(6)


class _Accepted(asyncio.Protocol):
    """An accepted TCP connection: first byte read, then either handed to a control link or
    kept as a circuit side (preamble, waiting for the other side, spliced)."""

    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay
        self.state = _NEW
        self.transport: asyncio.Transport | None = None
        self.peername: Addr = Addr("0.0.0.0", 0)
        self.buf = bytearray()         # the preamble so far, then early data
        self.timer: asyncio.TimerHandle | None = None
        self.circuit: _Splicer | None = None
        self.cid = 0
        self.eof = False               # EOF received from this side
        self.paused_by: set[str] = set()  # why reading is paused: "early", "peer", "rate"

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)
        self.peername = _addr(transport.get_extra_info("peername"))
        self.relay.accepted(self)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _SPLICED:
            assert self.circuit is not None
            self.circuit.forward(self, data)
        elif state == _NEW:
            if data[:1] != wire.CIRCUIT_MAGIC[:1]:
                self.state = _HANDED
                self.relay.hand_to_control(self, data)
                return
            self.state = _PREAMBLE
            self._preamble(data)
        elif state == _PREAMBLE:
            self._preamble(data)
        elif state == _WAITING:
            self.buf += data
            if len(self.buf) > EARLY_DATA_MAX:
                self.pause("early")

    def _preamble(self, data: bytes) -> None:
        self.buf += data
        n = wire.CIRCUIT_PREAMBLE_LEN
        if len(self.buf) < n:
            return
        token = wire.parse_circuit_preamble(bytes(self.buf[:n]))
        del self.buf[:n]
        self.relay.preamble(self, token)

    def eof_received(self) -> bool | None:
        if self.state == _SPLICED:
            assert self.circuit is not None
            return self.circuit.eof(self)
        if self.state == _WAITING:
            self.eof = True   # forwarded once spliced
            return True
        return False          # before its preamble: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        state, self.state = self.state, _CLOSED
        self.cancel_timer()
        if state == _SPLICED:
            assert self.circuit is not None
            self.circuit.lost(self)
        else:
            self.relay.side_lost(self, state)

    def pause_writing(self) -> None:
        if self.circuit is not None:
            self.circuit.other(self).pause("peer")

    def resume_writing(self) -> None:
        if self.circuit is not None:
            self.circuit.other(self).resume("peer")

    # -- helpers ----------------------------------------------------------------------------------

    def pause(self, why: str) -> None:
        if not self.paused_by and self.transport is not None and self.state != _CLOSED:
            self.transport.pause_reading()
        self.paused_by.add(why)

    def resume(self, why: str) -> None:
        if why not in self.paused_by:
            return
        self.paused_by.discard(why)
        if not self.paused_by and self.transport is not None and self.state != _CLOSED:
            self.transport.resume_reading()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def buffered(self) -> int:
        """Bytes in the transport's write buffer."""
        if self.transport is None or self.state == _CLOSED:
            return 0
        return self.transport.get_write_buffer_size()


class _Splicer:
    """A spliced circuit: forwards bytes both ways between two accepted connections."""

    def __init__(self, relay: RelayServer, splice: Splice) -> None:
        self.relay = relay
        self.cid = splice.circuit
        a, b = splice.requester, splice.target
        assert isinstance(a, _Accepted) and isinstance(b, _Accepted)
        self.sides = (a, b)
        self.peers = {a: splice.requester_id, b: splice.target_id}
        self.lost_sides: set[_Accepted] = set()
        loop = relay.loop
        self.loop = loop
        self.last = loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.rate_timers: dict[_Accepted, asyncio.TimerHandle] = {}
        self.ended = False

    def other(self, side: _Accepted) -> _Accepted:
        a, b = self.sides
        return b if side is a else a

    def start(self) -> None:
        """Both joined: the 0 byte to each, then what each sent early, then pump."""
        for side in self.sides:
            side.state = _SPLICED
            side.circuit = self
            side.cancel_timer()
            assert side.transport is not None
            side.transport.write(b"\x00")
        for side in self.sides:
            early, side.buf = bytes(side.buf), bytearray()
            if early:
                self.forward(side, early)
            side.resume("early")
            if side.eof:
                self.eof(side)
        self._arm_idle()

    def forward(self, src: _Accepted, data: bytes) -> None:
        dst = self.other(src)
        if dst.state == _CLOSED or dst.transport is None or dst.transport.is_closing():
            return  # the other side is gone: what it would have got is dropped
        dst.transport.write(data)
        now = self.loop.time()
        self.last = now
        wait = self.relay.rendezvous.charge_relay_bytes(self.peers[src], len(data), now)
        if wait > 0 and src not in self.rate_timers:
            src.pause("rate")
            self.rate_timers[src] = self.loop.call_later(wait, self._rate_refilled, src)

    def _rate_refilled(self, src: _Accepted) -> None:
        self.rate_timers.pop(src, None)
        wait = self.relay.rendezvous.charge_relay_bytes(self.peers[src], 0, self.loop.time())
        if wait > 0:  # (the clock's resolution): wait a little more
            self.rate_timers[src] = self.loop.call_later(wait, self._rate_refilled, src)
        else:
            src.resume("rate")

    def eof(self, src: _Accepted) -> bool:
        """``src`` half-closed: forward the EOF; when both did, close both."""
        src.eof = True
        dst = self.other(src)
        if dst.eof:
            self.end(abort=False)
            return True
        if dst.transport is not None and not dst.transport.is_closing():
            if dst.transport.can_write_eof():
                dst.transport.write_eof()
            else:
                self.end(abort=False)
        return True

    def lost(self, side: _Accepted) -> None:
        """One side's connection is gone: close the other (after what it has to send)."""
        self.lost_sides.add(side)
        timer = self.rate_timers.pop(side, None)
        if timer is not None:
            timer.cancel()
        if len(self.lost_sides) == 2:
            self._finish()
            return
        other = self.other(side)
        if other.transport is not None and not other.transport.is_closing():
            other.transport.close()

    def end(self, abort: bool) -> None:
        for side in self.sides:
            if side.transport is not None and not side.transport.is_closing():
                if abort:
                    side.transport.abort()
                else:
                    side.transport.close()
            elif abort and side.transport is not None:
                side.transport.abort()  # closing, but its buffer may never drain

    def _arm_idle(self) -> None:
        if self.ended:
            return
        self.idle_timer = self.loop.call_at(self.last + self.relay.limits.circuit_idle_timeout,
                                            self._idle_check)

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.ended:
            return
        now = self.loop.time()
        if now - self.last >= self.relay.limits.circuit_idle_timeout:
            self.relay.log_limited("idle", now, logging.INFO,
                                   f"circuit {self.cid} ({self.peers[self.sides[0]]} -> "
                                   f"{self.peers[self.sides[1]]}): no bytes for "
                                   f"{self.relay.limits.circuit_idle_timeout:g} s; closed")
            self.end(abort=True)
            return
        self._arm_idle()

    def _finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        for timer in self.rate_timers.values():
            timer.cancel()
        self.rate_timers.clear()
        self.relay.circuit_ended(self)


class _ProbeSocket(asyncio.DatagramProtocol):
    """One of the two PROBE sockets."""

    def __init__(self, relay: RelayServer, index: int) -> None:
        self.relay = relay
        self.index = index
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        relay = self.relay
        now = relay.loop.time()
        reply = relay.rendezvous.probe(data, addr, self.index, now)
        if reply is not None:
            if self.transport is not None:
                self.transport.sendto(reply, addr)
            return
        line = relay.rendezvous.probe_log(now)
        if line is not None:
            log.log(line.level, "%s", line.text)

    def error_received(self, exc: Exception) -> None:
        log.debug("PROBE socket %d: %s", self.index, exc)


class RelayServer:
    """The relay/rendezvous service of a p2psc peer.

    ``RelayServer(handler, limits=None)``: ``handler`` is the relay's own
    :class:`~p2psc.p2phandler.P2PHandler` (its id, key, known peers and directory decide who
    may attach). ``await start(host, port, udp_port1=None, udp_port2=None)`` listens (the UDP
    ports default to ``port`` and ``port + 1``, or ephemeral ones when ``port`` is 0; 0 picks
    an ephemeral one); ``tcp_port`` and ``udp_ports`` are the bound ports. ``await close()``
    stops it and closes every link and circuit. ``rendezvous`` is the state (its ``counters``
    say what happened).
    """

    def __init__(self, handler: RelayHost, limits: RelayLimits | None = None, *,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.handler = handler
        self.limits = limits if limits is not None else RelayLimits()
        self.rendezvous = Rendezvous(self.limits, random)
        self.host: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._udp: list[asyncio.DatagramTransport] = []
        self._links: set[_ControlLink] = set()
        self._accepted: dict[_Accepted, None] = {}   # no preamble yet, oldest first
        self._waiting: dict[int, _Accepted] = {}    # circuit id -> the side that joined
        self._splices: dict[int, _Splicer] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.log_limited = _LogLimiter(self.limits.log_interval)

    # -- API ----------------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise StatusError("the relay is not started")
        return self._loop

    @property
    def tcp_port(self) -> int:
        """The bound TCP port (control links and circuits)."""
        if self._server is None:
            raise StatusError("the relay is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def udp_ports(self) -> tuple[int, int]:
        """The bound PROBE ports (1 and 2)."""
        return self.rendezvous.udp_ports

    @property
    def links(self) -> frozenset[TcpP2P]:
        """The control links (handshaked or not)."""
        return frozenset(self._links)

    @property
    def waiting_circuits(self) -> int:
        """Circuits whose first side has joined and waits for the other."""
        return len(self._waiting)

    def circuits(self) -> list[CircuitInfo]:
        """The spliced circuits."""
        out = []
        for sp in self._splices.values():
            a, b = sp.sides
            out.append(CircuitInfo(sp.cid, sp.peers[a], sp.peers[b],
                                   (a.buffered(), b.buffered()),
                                   (frozenset(a.paused_by), frozenset(b.paused_by))))
        return out

    def describe(self) -> str:
        """The bound addresses, in one line."""
        host = self.host or "*"
        p1, p2 = self.udp_ports
        return f"tcp {host}:{self.tcp_port}, udp {host}:{p1} and {host}:{p2}"

    async def start(self, host: str, port: int, udp_port1: int | None = None,
                    udp_port2: int | None = None) -> None:
        """Listen on ``host``: TCP ``port``, UDP ``udp_port1`` and ``udp_port2``."""
        if self._server is not None:
            raise StatusError("the relay is already started")
        loop = self._loop = asyncio.get_running_loop()
        if udp_port1 is None:
            udp_port1 = port
        if udp_port2 is None:
            udp_port2 = udp_port1 + 1 if udp_port1 else 0
        for p in (port, udp_port1, udp_port2):
            if not 0 <= p <= 65535:
                raise ConfigError(f"port {p} is out of range (the second UDP port defaults "
                                  "to the first + 1)")
        self.host = host
        self._server = await loop.create_server(lambda: _Accepted(self), host, port)
        try:
            ports = []
            for index, p in ((1, udp_port1), (2, udp_port2)):
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_ProbeSocket, self, index), local_addr=(host, p))
                self._udp.append(transport)
                ports.append(int(transport.get_extra_info("sockname")[1]))
        except BaseException:
            await self.close()
            raise
        self.rendezvous.udp_ports = (ports[0], ports[1])
        log.info("relay %s listening on %s", self.handler.get_myid(), self.describe())

    async def close(self) -> None:
        """Stop listening; close every control link (gracefully) and circuit (at once)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for t in self._udp:
            t.close()
        self._udp = []
        for link in list(self._links):
            link.close()
        for side in list(self._accepted):
            side.abort()
        for side in list(self._waiting.values()):
            side.abort()
        for sp in list(self._splices.values()):
            sp.end(abort=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = float("inf")
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("relay: the server did not close within 5 s")
        await asyncio.sleep(0)  # (connection_lost callbacks run)

    # -- the rendezvous' actions and timer ----------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for a in actions:
            t = type(a)
            if t is SendFrame or t is SendLossy:
                assert isinstance(a, (SendFrame, SendLossy))
                self._send(a)
            elif t is Log:
                assert isinstance(a, Log)
                log.log(a.level, "%s", a.text)
            elif t is CloseLink:
                assert isinstance(a, CloseLink)
                self._close(a)
        self._rearm()

    def _send(self, a: SendFrame | SendLossy) -> None:
        link = a.link
        if not isinstance(link, _ControlLink) or link.is_closed or link.transport is None:
            return
        backlog = link.transport.get_write_buffer_size()
        if type(a) is SendLossy:
            assert isinstance(a, SendLossy)
            if backlog > self.limits.dgram_backlog_bytes:
                self._apply(self.rendezvous.dropped(a.source, self.loop.time()))
                return
        elif backlog > self.limits.control_backlog_bytes:
            log.warning("%s: its control link holds %d unsent bytes (control_backlog_bytes): "
                        "closing it", link.peer_id, backlog)
            self._apply(self.rendezvous.detach(link))
            link.abort()
            return
        link.send(a.data)

    def _close(self, a: CloseLink) -> None:
        link = a.link
        if isinstance(link, _ControlLink):
            if a.abort:
                link.abort()
            else:
                link.close()
        elif isinstance(link, _Accepted):
            link.abort()

    def _rearm(self) -> None:
        when = self.rendezvous.get_timer()
        if when is None or when >= self._timer_at or self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._apply(self.rendezvous.handle_timer(self.loop.time()))

    # -- control links (called by _ControlLink) ----------------------------------------------------

    def link_attached(self, link: TcpP2P) -> None:
        """A control link completed its handshake: attach its (authenticated) peer."""
        assert link.peer_id is not None and link.transport is not None
        observed = _addr(link.transport.get_extra_info("peername"))
        self._apply(self.rendezvous.attach(link.peer_id, link, observed, self.loop.time()))

    def link_frame(self, link: TcpP2P, data: bytes) -> None:
        """One control frame from ``link``."""
        self._apply(self.rendezvous.receive(link, data, self.loop.time()))

    def link_closed(self, link: TcpP2P) -> None:
        """A control link ended."""
        assert isinstance(link, _ControlLink)
        self._links.discard(link)
        self._apply(self.rendezvous.detach(link))

    # -- accepted connections (called by _Accepted) ------------------------------------------------

    def accepted(self, side: _Accepted) -> None:
        """A TCP connection was accepted: it has ``preamble_timeout`` to say what it is."""
        limit = self.limits.max_pending_accepts
        while len(self._accepted) >= limit:
            oldest = next(iter(self._accepted))
            del self._accepted[oldest]
            self.log_limited("accepts", self.loop.time(), logging.WARNING,
                             f"{limit} connections without a preamble (max_pending_accepts): "
                             "closing the oldest")
            oldest.abort()
        self._accepted[side] = None
        side.timer = self.loop.call_later(self.limits.preamble_timeout, self._preamble_timeout,
                                          side)

    def _preamble_timeout(self, side: _Accepted) -> None:
        side.timer = None
        if side.state not in (_NEW, _PREAMBLE):
            return
        self._accepted.pop(side, None)
        self.log_limited("preamble", self.loop.time(), logging.INFO,
                         f"connection from {side.peername.host}:{side.peername.port}: nothing "
                         f"usable within {self.limits.preamble_timeout:g} s; closed")
        side.abort()

    def hand_to_control(self, side: _Accepted, first: bytes) -> None:
        """Not a circuit: the connection is a p2psc control link; its bytes go to TcpP2P."""
        self._accepted.pop(side, None)
        side.cancel_timer()
        transport = side.transport
        assert transport is not None
        link = _ControlLink(self.handler, self.handler.get_myid(), self)
        self._links.add(link)
        transport.set_protocol(link)
        link.connection_made(transport)
        link.data_received(first)

    def preamble(self, side: _Accepted, token: bytes | None) -> None:
        """``side`` sent a whole preamble (``token`` None: not a valid one)."""
        self._accepted.pop(side, None)
        now = self.loop.time()
        where = f"{side.peername.host}:{side.peername.port}"
        if token is None:
            self.log_limited("refused", now, logging.INFO,
                             f"circuit connection from {where}: not a circuit preamble; closed")
            side.abort()
            return
        result = self.rendezvous.circuit_join(token, side, now)
        if isinstance(result, JoinRefused):
            self.log_limited("refused", now, logging.INFO,
                             f"circuit connection from {where}: {result.reason}; closed")
            side.abort()
        elif isinstance(result, JoinWaiting):
            side.cancel_timer()  # the join deadline is the rendezvous' now
            side.state = _WAITING
            side.cid = result.circuit
            self._waiting[result.circuit] = side
            if len(side.buf) > EARLY_DATA_MAX:
                side.pause("early")
        else:
            self._waiting.pop(result.circuit, None)
            sp = _Splicer(self, result)
            self._splices[result.circuit] = sp
            log.debug("circuit %d spliced (%s -> %s)", result.circuit, result.requester_id,
                      result.target_id)
            sp.start()
        self._rearm()

    def side_lost(self, side: _Accepted, state: int) -> None:
        """An accepted connection that was not spliced ended."""
        self._accepted.pop(side, None)
        if state == _WAITING and self._waiting.get(side.cid) is side:
            del self._waiting[side.cid]
            self._apply(self.rendezvous.circuit_closed(side.cid))

    def circuit_ended(self, sp: _Splicer) -> None:
        """Both sides of a spliced circuit are closed."""
        self._splices.pop(sp.cid, None)
        self._apply(self.rendezvous.circuit_closed(sp.cid))
