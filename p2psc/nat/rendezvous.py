"""``Rendezvous``: the sans-IO state of the relay service (docs/NAT.md, "The relay service").

It holds the peers attached to the relay (one authenticated control link each), the UDP
mappings their PROBEs revealed, the pending and spliced circuits, and the per-peer and
global limits. It does no I/O and reads no clock: every input takes ``now`` (the adapter's
loop time), randomness comes from ``random`` (``os.urandom`` by default), and what is to be
done comes back as a list of actions for the adapter (:mod:`p2psc.nat.relay_server`):

- :class:`SendFrame`: write this control frame to this link;
- :class:`SendLossy`: the same, unless the link's write buffer holds more than
  ``dgram_backlog_bytes`` (a relayed datagram, a PONG, a rate-limit ERROR: a peer that does
  not read its link loses them; then report it with :meth:`Rendezvous.dropped`);
- :class:`CloseLink`: close this link (a control link or a circuit side);
- :class:`Log`: one log line (never a key, a token or a payload).

A link is any hashable object the adapter gives (its protocol object). Peer ids are always
those the p2psc handshake authenticated, never anything a frame says.

Like :mod:`p2psc._proto` (whose rules test/test_layering.py checks here too), receiving never
raises: a malformed frame closes the link it came on and affects nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Any

from .._proto.ratelimit import TokenBucket, rate_key
from .._proto.udp_wire import MAX_UDP_PAYLOAD
from ..p2pexcept import ConfigError, ProtocolError, UsageError
from . import wire
from .wire import Addr

__all__ = [
    "RelayLimits", "Rendezvous", "ByteBucket", "Link",
    "SendFrame", "SendLossy", "CloseLink", "Log", "Action",
    "JoinRefused", "JoinWaiting", "Splice", "JoinResult",
]

#: What the adapter gives as a link: its protocol object (hashable by identity).
Link = Hashable

MiB = 1024 * 1024
#: The largest control frame a peer may send: a DGRAM of the largest payload and its header
#: (type, two endpoint ids, a peer id of 255 bytes). Longer ones close the link.
_DGRAM_HEADER_MAX = 1 + 2 * wire.EP_LEN + 1 + 255


@dataclass(frozen=True)
class RelayLimits:
    """The relay's limits; every one is per relay process. Sizes in bytes, times in seconds
    (the table in docs/NAT.md, "The relay service")."""

    #: peers attached at once; an attach beyond it is refused (the link is closed)
    max_peers: int = 10_000
    #: circuits (pending or spliced) a peer may be either end of
    circuits_per_peer: int = 8
    #: circuits (pending or spliced) between the same two peers, either way: below
    #: ``circuits_per_peer``, so that one peer cannot take all of another's
    circuits_per_pair: int = 4
    #: circuits (pending or spliced) in total
    max_circuits: int = 1024
    #: CONNECT and OPEN requests per second per peer, and their burst
    requests_per_sec: float = 5.0
    request_burst: int = 20
    #: bytes a peer may have relayed per second (datagrams and circuits together), and burst
    relay_bytes_per_sec: int = 8 * MiB
    relay_burst_bytes: int = 1 * MiB
    #: a circuit whose second side has not sent its preamble after this long is dropped
    circuit_join_timeout: float = 10.0
    #: a spliced circuit with no byte in either direction for this long is closed
    circuit_idle_timeout: float = 120.0
    #: an accepted TCP connection must send its first byte, and a circuit its whole
    #: preamble, within this long
    preamble_timeout: float = 10.0
    #: accepted connections not yet classified (first byte) or still sending their preamble;
    #: past it the oldest is closed
    max_pending_accepts: int = 1024
    #: the largest relayed datagram payload: the largest sealed datagram of p2psc's UDP
    max_dgram_payload: int = MAX_UDP_PAYLOAD
    #: a relayed datagram (or PONG) is dropped while its link's write buffer holds more
    dgram_backlog_bytes: int = 1 * MiB
    #: a control link whose write buffer holds more than this is closed (it does not read)
    control_backlog_bytes: int = 4 * MiB
    #: PROBEs per second per source IP address (IPv6: per /64), and burst
    probe_rate_per_ip: float = 10.0
    probe_burst_per_ip: int = 20
    #: PROBEs answered per second in total, and burst
    probe_rate_total: float = 2000.0
    probe_burst_total: int = 4000
    #: source addresses whose PROBE bucket is kept (least recently used ones go)
    max_probe_sources: int = 4096
    #: UDP endpoints of one peer whose mappings are kept (least recently used ones go)
    max_endpoints_per_peer: int = 16
    #: drops and refusals of one kind are logged at most once per this long (per peer)
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"RelayLimits.{f.name} must be a positive number, not "
                                  f"{value!r}")
        if self.relay_burst_bytes < self.max_dgram_payload:
            raise ConfigError("RelayLimits.relay_burst_bytes must be at least max_dgram_payload "
                             "(or no datagram of the largest size could ever be relayed)")
        if self.max_dgram_payload > MAX_UDP_PAYLOAD:
            raise ConfigError(f"RelayLimits.max_dgram_payload is at most {MAX_UDP_PAYLOAD}")

    @property
    def max_frame(self) -> int:
        """The largest control frame accepted from a peer."""
        return _DGRAM_HEADER_MAX + self.max_dgram_payload


# -- actions --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SendFrame:
    """Write ``data`` (one control frame) to the control link ``link``."""

    link: Link
    data: bytes


@dataclass(frozen=True)
class SendLossy:
    """Write ``data`` to ``link`` unless its write buffer holds more than
    ``dgram_backlog_bytes``; if dropped, call :meth:`Rendezvous.dropped` with ``source``."""

    link: Link
    data: bytes
    source: str


@dataclass(frozen=True)
class CloseLink:
    """Close ``link`` (a control link or a circuit side); ``abort``: at once, without the
    authenticated CLOSE record (a failure), else gracefully."""

    link: Link
    reason: str
    abort: bool = False


@dataclass(frozen=True)
class Log:
    """One line for the relay's log (``level`` as in :mod:`logging`)."""

    level: int
    text: str


Action = SendFrame | SendLossy | CloseLink | Log


@dataclass(frozen=True)
class JoinRefused:
    """The preamble's token is unknown, already used or expired: close that connection."""

    reason: str


@dataclass(frozen=True)
class JoinWaiting:
    """The first side of circuit ``circuit`` joined: hold it until the other does."""

    circuit: int


@dataclass(frozen=True)
class Splice:
    """Both sides joined: splice them. ``requester`` is the side that sent OPEN."""

    circuit: int
    requester: Link
    target: Link
    requester_id: str
    target_id: str


JoinResult = JoinRefused | JoinWaiting | Splice


# -- buckets --------------------------------------------------------------------------------------

class ByteBucket:
    """``rate`` bytes per second, at most ``burst`` saved up. :meth:`take` is all or nothing
    (datagrams); :meth:`charge` may go into debt and says how long to wait (a stream)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, n: int, now: float) -> bool:
        """Take ``n`` bytes if they are there."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def charge(self, n: int, now: float) -> float:
        """Take ``n`` bytes, into debt if need be; the seconds until the bucket is back to
        zero (0.0: no debt)."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _Meter:
    """One peer's buckets and its rate-limited log lines (kept across its links)."""

    __slots__ = ("bytes", "logged", "requests", "suppressed")

    def __init__(self, limits: RelayLimits, now: float):
        self.requests = TokenBucket(limits.requests_per_sec, limits.request_burst, now)
        self.bytes = ByteBucket(limits.relay_bytes_per_sec, limits.relay_burst_bytes, now)
        self.logged: dict[str, float] = {}       # kind -> when last logged
        self.suppressed: Counter[str] = Counter()  # kind -> events not logged since


class _Peer:
    """An attached peer: its link and what it told (HELLO) or showed (PROBE) the relay."""

    __slots__ = ("flags", "link", "local_addrs", "mappings", "observed", "peer_id", "token",
                 "udp_endpoint")

    def __init__(self, peer_id: str, link: Link, observed: Addr, token: bytes):
        self.peer_id = peer_id
        self.link = link
        self.observed = observed
        self.token = token
        self.flags = 0
        self.udp_endpoint: bytes | None = None
        self.local_addrs: tuple[Addr, ...] = ()
        #: endpoint id -> {probe port index (1 or 2) -> observed address}, least recent first
        self.mappings: OrderedDict[bytes, dict[int, Addr]] = OrderedDict()


class _Circuit:
    """A circuit: pending until both sides sent their preamble, then spliced."""

    __slots__ = ("cid", "expires", "handles", "peers", "spliced", "tokens")

    def __init__(self, cid: int, requester: str, target: str, tokens: tuple[bytes, bytes],
                 expires: float):
        self.cid = cid
        self.peers = (requester, target)
        self.tokens = tokens
        self.handles: list[Link | None] = [None, None]
        self.expires = expires
        self.spliced = False


# -- the rendezvous -------------------------------------------------------------------------------

class Rendezvous:
    """The relay's state. See the module docstring for the actions it returns.

    ``udp_ports`` (the two PROBE ports, told in WELCOME) is set by the adapter once its UDP
    sockets are bound. ``counters`` counts what happened: ``probes_answered``,
    ``probes_dropped`` (and ``probes_dropped: REASON``), ``dgrams_relayed`` (handed to the
    adapter) and ``dgram_bytes_relayed``, ``dgrams_dropped`` (and ``dgrams_dropped:
    REASON``), ``lossy_dropped`` (:class:`SendLossy` frames the adapter then dropped at a
    backlogged link), ``refused_CODE``, ``bad_frames``, ``attached``, ``attach_refused``,
    ``punches``, ``circuits_opened``, ``circuits_spliced``, ``circuits_expired``,
    ``joins_refused``, ``circuit_bytes_relayed``.
    """

    def __init__(self, limits: RelayLimits | None = None,
                 random: Callable[[int], bytes] = os.urandom):
        self.limits = limits if limits is not None else RelayLimits()
        self.random = random
        self.udp_ports: tuple[int, int] = (0, 0)
        self.counters: Counter[str] = Counter()
        self._peers: dict[str, _Peer] = {}
        self._by_link: dict[Link, _Peer] = {}
        self._probe_tokens: dict[bytes, _Peer] = {}
        self._meters: OrderedDict[str, _Meter] = OrderedDict()
        self._probe_sources: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._probe_total: TokenBucket | None = None
        self._probe_drops: Counter[str] = Counter()
        self._probe_logged = float("-inf")
        self._circuits: dict[int, _Circuit] = {}
        self._pending: OrderedDict[int, _Circuit] = OrderedDict()  # oldest (first due) first
        self._circuit_tokens: dict[bytes, tuple[_Circuit, int]] = {}
        self._circuit_count: Counter[str] = Counter()
        self._pair_count: Counter[tuple[str, str]] = Counter()
        self._next_cid = 1

    # -- introspection ----------------------------------------------------------------------------

    def peer_of(self, link: Link) -> str | None:
        """The authenticated peer id of an attached control link, or None."""
        p = self._by_link.get(link)
        return p.peer_id if p is not None else None

    def link_of(self, peer_id: str) -> Link | None:
        """The control link of an attached peer, or None."""
        p = self._peers.get(peer_id)
        return p.link if p is not None else None

    @property
    def attached(self) -> int:
        """How many peers are attached."""
        return len(self._peers)

    def mappings(self, peer_id: str) -> dict[bytes, dict[int, Addr]]:
        """The observed UDP mappings of an attached peer: endpoint id -> {port index: addr}."""
        p = self._peers.get(peer_id)
        return {ep: dict(m) for ep, m in p.mappings.items()} if p is not None else {}

    @property
    def circuits(self) -> int:
        """Circuits pending or spliced."""
        return len(self._circuits)

    def circuits_of(self, peer_id: str) -> int:
        """Circuits (pending or spliced) ``peer_id`` is either end of."""
        return self._circuit_count[peer_id]

    # -- links ------------------------------------------------------------------------------------

    def attach(self, peer_id: str, link: Link, observed_tcp_addr: Addr, now: float
               ) -> list[Action]:
        """A control link completed its handshake as ``peer_id``: WELCOME it (a fresh probe
        token). A link the peer already had is replaced (closed)."""
        if link in self._by_link:
            return []
        actions: list[Action] = []
        old = self._peers.get(peer_id)
        if old is not None:
            self._forget(old)
            actions.append(Log(logging.INFO, f"{peer_id}: a new control link replaces the old"))
            actions.append(CloseLink(old.link, "replaced by a newer link of the same peer"))
        elif len(self._peers) >= self.limits.max_peers:
            self.counters["attach_refused"] += 1
            return [Log(logging.WARNING, f"{peer_id}: refused: {self.limits.max_peers} peers "
                                         "attached (max_peers)"),
                    CloseLink(link, "the relay is full")]
        observed_tcp_addr = _unmapped(*observed_tcp_addr)
        token = self._fresh(wire.TOKEN_LEN, self._probe_tokens)
        peer = _Peer(peer_id, link, observed_tcp_addr, token)
        self._peers[peer_id] = peer
        self._by_link[link] = peer
        self._probe_tokens[token] = peer
        self._meter(peer_id, now)
        self.counters["attached"] += 1
        try:
            observed = wire.encode(wire.Welcome(token, *self.udp_ports, observed_tcp_addr,
                                                self.limits.max_dgram_payload))
        except ValueError:  # not an IP address (cannot happen over TCP/IP): say nothing
            observed = wire.encode(wire.Welcome(token, *self.udp_ports, Addr("0.0.0.0", 0),
                                                self.limits.max_dgram_payload))
        actions.append(Log(logging.INFO, f"{peer_id}: attached from "
                                         f"{observed_tcp_addr.host}:{observed_tcp_addr.port}"))
        actions.append(SendFrame(link, observed))
        return actions

    def detach(self, link: Link) -> list[Action]:
        """A control link ended (a replaced or unknown link: nothing happens). The peer's
        circuits are left alone: they are connections of their own."""
        peer = self._by_link.get(link)
        if peer is None:
            return []
        self._forget(peer)
        return [Log(logging.INFO, f"{peer.peer_id}: detached")]

    def _forget(self, peer: _Peer) -> None:
        del self._by_link[peer.link]
        self._probe_tokens.pop(peer.token, None)
        if self._peers.get(peer.peer_id) is peer:
            del self._peers[peer.peer_id]

    # -- control frames ---------------------------------------------------------------------------

    def receive(self, link: Link, data: bytes | memoryview, now: float) -> list[Action]:
        """One control frame from ``link`` (nothing happens for a link not attached)."""
        peer = self._by_link.get(link)
        if peer is None:
            return []
        try:
            if len(data) > self.limits.max_frame:
                raise ProtocolError(f"control frame of {len(data)} bytes (at most "
                                    f"{self.limits.max_frame})")
            frame = wire.decode_peer_frame(data)
        except ProtocolError as exc:
            self.counters["bad_frames"] += 1
            self._forget(peer)
            return [Log(logging.WARNING, f"{peer.peer_id}: malformed control frame ({exc}); "
                                         "closing its link"),
                    CloseLink(link, f"malformed control frame: {exc}", abort=True)]
        t = type(frame)
        if t is wire.Dgram:
            assert isinstance(frame, wire.Dgram)
            return self._dgram(peer, frame, now)
        if t is wire.Ping:
            assert isinstance(frame, wire.Ping)
            return [SendLossy(link, wire.encode(wire.Pong(frame.cookie)), peer.peer_id)]
        if t is wire.Hello:
            assert isinstance(frame, wire.Hello)
            peer.flags = frame.flags & (wire.FLAG_TCP | wire.FLAG_UDP)
            peer.udp_endpoint = frame.udp_endpoint
            peer.local_addrs = frame.local_addrs[:wire.MAX_ADDRS]
            return []
        if t is wire.Connect:
            assert isinstance(frame, wire.Connect)
            return self._connect(peer, frame, now)
        assert isinstance(frame, wire.Open)
        return self._open(peer, frame, now)

    def _refuse(self, peer: _Peer, what: str, request: int, code: int, now: float,
                detail: str = "") -> list[Action]:
        self.counters[f"refused_{code}"] += 1
        name = wire.ERROR_NAMES.get(code, str(code))
        text = f"{name}: {detail}" if detail else name
        frame = wire.encode(wire.Error(request, code, text))
        if code == wire.E_RATE_LIMITED:  # as many as the peer sends: lossy, and logged seldom
            actions: list[Action] = [SendLossy(peer.link, frame, peer.peer_id)]
            actions += self._log_limited(peer.peer_id, "rate", now, logging.INFO,
                                         "requests over the rate limit refused")
            return actions
        return [Log(logging.INFO, f"{peer.peer_id}: {what} refused ({text})"),
                SendFrame(peer.link, frame)]

    def _rate_ok(self, peer: _Peer, now: float) -> bool:
        return self._meter(peer.peer_id, now).requests.take(now)

    def _connect(self, peer: _Peer, f: wire.Connect, now: float) -> list[Action]:
        what = f"CONNECT {f.request} to {f.target}"
        if not self._rate_ok(peer, now):
            return self._refuse(peer, what, f.request, wire.E_RATE_LIMITED, now)
        if f.target == peer.peer_id:
            return self._refuse(peer, what, f.request, wire.E_BAD_REQUEST, now,
                                "a request to oneself")
        target = self._peers.get(f.target)
        if target is None:
            return self._refuse(peer, what, f.request, wire.E_NOT_CONNECTED, now)
        if not target.flags & wire.FLAG_UDP or target.udp_endpoint is None:
            return self._refuse(peer, what, f.request, wire.E_NO_UDP, now)
        # Without a mapping on either side there is nothing to punch, but the requester still
        # gets PUNCH: the target's endpoint id is what relayed datagrams are addressed to.
        mine = peer.mappings.get(f.endpoint)
        theirs = target.mappings.get(target.udp_endpoint)
        if mine:
            peer.mappings.move_to_end(f.endpoint)
        if theirs:
            target.mappings.move_to_end(target.udp_endpoint)
        punch_id = self.random(wire.PUNCH_ID_LEN)
        to_requester = wire.Punch(f.request, punch_id, f.endpoint, target.udp_endpoint,
                                  _candidates(theirs, target.local_addrs) if theirs else (),
                                  target.peer_id)
        actions: list[Action] = [SendFrame(peer.link, wire.encode(to_requester))]
        if mine and theirs:
            self.counters["punches"] += 1
            to_target = wire.Punch(0, punch_id, target.udp_endpoint, f.endpoint,
                                   _candidates(mine, f.local_addrs), peer.peer_id)
            actions += [SendFrame(target.link, wire.encode(to_target)),
                        Log(logging.DEBUG, f"{peer.peer_id}: punch to {target.peer_id} "
                            "coordinated")]
        else:
            self.counters["relay_only"] += 1
            side = "its" if not mine else "the target's"
            actions.append(Log(logging.INFO, f"{peer.peer_id}: CONNECT to {target.peer_id} "
                               f"without a UDP mapping of {side} endpoint: relay only"))
        return actions

    def _dgram(self, peer: _Peer, f: wire.Dgram, now: float) -> list[Action]:
        n = len(f.payload)
        if f.target == peer.peer_id:
            reason = "addressed to itself"
        elif n > self.limits.max_dgram_payload:
            reason = "too large"
        else:
            target = self._peers.get(f.target)
            if target is None:
                reason = "target not connected"
            elif not self._meter(peer.peer_id, now).bytes.take(n, now):
                reason = "over the byte rate"
            else:
                self.counters["dgrams_relayed"] += 1
                self.counters["dgram_bytes_relayed"] += n
                # the source id is the link's authenticated peer, whatever the frame says
                header = wire.encode_dgram_header(wire.R_DGRAM, f.source, f.destination,
                                                  peer.peer_id)
                return [SendLossy(target.link, header + f.payload, peer.peer_id)]
        self.counters["dgrams_dropped"] += 1
        self.counters[f"dgrams_dropped: {reason}"] += 1
        return self._log_limited(peer.peer_id, "dgram", now, logging.INFO,
                                 f"relayed datagrams dropped (last: {reason})")

    def _open(self, peer: _Peer, f: wire.Open, now: float) -> list[Action]:
        what = f"OPEN {f.request} to {f.target}"
        if not self._rate_ok(peer, now):
            return self._refuse(peer, what, f.request, wire.E_RATE_LIMITED, now)
        if f.target == peer.peer_id:
            return self._refuse(peer, what, f.request, wire.E_BAD_REQUEST, now,
                                "a request to oneself")
        target = self._peers.get(f.target)
        if target is None:
            return self._refuse(peer, what, f.request, wire.E_NOT_CONNECTED, now)
        if not target.flags & wire.FLAG_TCP:
            return self._refuse(peer, what, f.request, wire.E_NO_TCP, now)
        pair = _pair(peer.peer_id, target.peer_id)
        per_pair = self.limits.circuits_per_pair
        if self._pair_count[pair] >= per_pair:
            return self._refuse(peer, what, f.request, wire.E_LIMIT, now,
                                f"you have {per_pair} circuits with the target")
        per_peer = self.limits.circuits_per_peer
        if self._circuit_count[peer.peer_id] >= per_peer:
            return self._refuse(peer, what, f.request, wire.E_LIMIT, now,
                                f"you have {per_peer} circuits")
        if self._circuit_count[target.peer_id] >= per_peer:
            return self._refuse(peer, what, f.request, wire.E_LIMIT, now,
                                f"the target has {per_peer} circuits")
        if len(self._circuits) >= self.limits.max_circuits:
            return self._refuse(peer, what, f.request, wire.E_LIMIT, now,
                                "the relay's circuits are all in use")
        token_a = self._fresh(wire.CIRCUIT_TOKEN_LEN, self._circuit_tokens)
        token_b = self._fresh(wire.CIRCUIT_TOKEN_LEN, self._circuit_tokens, token_a)
        circ = _Circuit(self._next_cid, peer.peer_id, target.peer_id, (token_a, token_b),
                        now + self.limits.circuit_join_timeout)
        self._next_cid += 1
        self._circuits[circ.cid] = self._pending[circ.cid] = circ
        self._circuit_tokens[token_a] = (circ, 0)
        self._circuit_tokens[token_b] = (circ, 1)
        self._circuit_count[peer.peer_id] += 1
        self._circuit_count[target.peer_id] += 1
        self._pair_count[pair] += 1
        self.counters["circuits_opened"] += 1
        return [SendFrame(peer.link, wire.encode(wire.Circuit(f.request, token_a))),
                SendFrame(target.link, wire.encode(wire.Incoming(token_b, peer.peer_id))),
                Log(logging.INFO, f"{peer.peer_id}: circuit {circ.cid} to {target.peer_id} "
                                  "offered")]

    # -- circuits ---------------------------------------------------------------------------------

    def circuit_join(self, token: bytes, handle: Link, now: float) -> JoinResult:
        """A circuit preamble with ``token`` arrived on connection ``handle``. Each token
        works once and only until the circuit's join deadline."""
        entry = self._circuit_tokens.pop(token, None)
        if entry is None:
            self.counters["joins_refused"] += 1
            return JoinRefused("unknown or already used circuit token")
        circ, side = entry
        if now >= circ.expires:  # (due for handle_timer: it cleans up)
            self.counters["joins_refused"] += 1
            return JoinRefused("circuit token expired")
        circ.handles[side] = handle
        other = circ.handles[1 - side]
        if other is None:
            return JoinWaiting(circ.cid)
        del self._pending[circ.cid]
        circ.spliced = True
        self.counters["circuits_spliced"] += 1
        a, b = circ.handles
        assert a is not None and b is not None
        return Splice(circ.cid, a, b, circ.peers[0], circ.peers[1])

    def circuit_closed(self, circuit: int) -> list[Action]:
        """Circuit ``circuit`` ended (both sides closed, or a waiting side left): its tokens
        are void and it no longer counts against the limits."""
        circ = self._circuits.pop(circuit, None)
        if circ is None:
            return []
        self._drop_circuit(circ)
        return [Log(logging.DEBUG, f"circuit {circuit} ({circ.peers[0]} -> {circ.peers[1]}) "
                                   "ended")]

    def _drop_circuit(self, circ: _Circuit) -> None:
        self._circuits.pop(circ.cid, None)
        self._pending.pop(circ.cid, None)
        for token in circ.tokens:
            entry = self._circuit_tokens.get(token)
            if entry is not None and entry[0] is circ:
                del self._circuit_tokens[token]
        for p in circ.peers:
            self._circuit_count[p] -= 1
            if self._circuit_count[p] <= 0:
                del self._circuit_count[p]
        pair = _pair(*circ.peers)
        self._pair_count[pair] -= 1
        if self._pair_count[pair] <= 0:
            del self._pair_count[pair]

    def charge_relay_bytes(self, peer_id: str, n: int, now: float) -> float:
        """``peer_id`` had ``n`` bytes relayed over a circuit: the seconds to stop reading
        from it (0.0: go on)."""
        wait = self._meter(peer_id, now).bytes.charge(n, now)
        self.counters["circuit_bytes_relayed"] += n
        return wait

    # -- drops ------------------------------------------------------------------------------------

    def dropped(self, source: str, now: float) -> list[Action]:
        """The adapter dropped a :class:`SendLossy` from ``source``: its target link's write
        buffer was full."""
        self.counters["lossy_dropped"] += 1
        return self._log_limited(source, "backlog", now, logging.INFO,
                                 "relayed frames dropped: the target does not read fast enough")

    def _log_limited(self, peer_id: str, kind: str, now: float, level: int, text: str
                     ) -> list[Action]:
        """One log line per peer and kind per ``log_interval``, saying how many were not."""
        meter = self._meter(peer_id, now)
        last = meter.logged.get(kind)
        if last is not None and now - last < self.limits.log_interval:
            meter.suppressed[kind] += 1
            return []
        n = meter.suppressed.pop(kind, 0) + 1
        meter.logged[kind] = now
        return [Log(level, f"{peer_id}: {text}" + (f" ({n} since the last line)" if n > 1
                                                   else ""))]

    def _meter(self, peer_id: str, now: float) -> _Meter:
        m = self._meters.get(peer_id)
        if m is None:
            m = self._meters[peer_id] = _Meter(self.limits, now)
            while len(self._meters) > max(self.limits.max_peers, len(self._peers)) * 2:
                self._meters.popitem(last=False)
        else:
            self._meters.move_to_end(peer_id)
        return m

    # -- UDP probes -------------------------------------------------------------------------------

    def probe(self, data: bytes | memoryview, source_addr: Any, port_index: int, now: float
              ) -> bytes | None:
        """A datagram on PROBE port ``port_index`` (1 or 2) from ``source_addr``: the
        PROBE_REPLY to send back (the same 64 bytes), or None (dropped and counted)."""
        if port_index not in (1, 2):
            raise UsageError("port_index is 1 or 2")
        p = wire.decode_probe(data)
        if p is None:
            return self._probe_drop("malformed")
        key = rate_key(source_addr)
        bucket = self._probe_sources.get(key)
        if bucket is None:
            bucket = TokenBucket(self.limits.probe_rate_per_ip, self.limits.probe_burst_per_ip,
                                 now)
            self._probe_sources[key] = bucket
            if len(self._probe_sources) > self.limits.max_probe_sources:
                self._probe_sources.popitem(last=False)
        else:
            self._probe_sources.move_to_end(key)
        if not bucket.take(now):
            return self._probe_drop("over the rate of its address")
        peer = self._probe_tokens.get(p.token)
        if peer is None:
            return self._probe_drop("unknown token")
        total = self._probe_total
        if total is None:
            total = self._probe_total = TokenBucket(self.limits.probe_rate_total,
                                                    self.limits.probe_burst_total, now)
        if not total.take(now):
            return self._probe_drop("over the total rate")
        try:
            observed = _unmapped(str(source_addr[0]), int(source_addr[1]))
            reply = wire.encode_probe_reply(p.txid, observed)
        except (ValueError, TypeError, IndexError):
            return self._probe_drop("not an IP source address")
        m = peer.mappings.get(p.endpoint)
        if m is None:
            m = peer.mappings[p.endpoint] = {}
            while len(peer.mappings) > self.limits.max_endpoints_per_peer:
                peer.mappings.popitem(last=False)
        else:
            peer.mappings.move_to_end(p.endpoint)
        m[port_index] = observed
        self.counters["probes_answered"] += 1
        return reply

    def _probe_drop(self, reason: str) -> bytes | None:
        self.counters["probes_dropped"] += 1
        self.counters[f"probes_dropped: {reason}"] += 1
        self._probe_drops[reason] += 1
        return None

    def probe_log(self, now: float) -> Log | None:
        """A line about the PROBEs dropped since the last one, at most once per
        ``log_interval`` (the adapter asks after a dropped probe)."""
        if not self._probe_drops or now - self._probe_logged < self.limits.log_interval:
            return None
        self._probe_logged = now
        text = ", ".join(f"{n} {reason}" for reason, n in sorted(self._probe_drops.items()))
        self._probe_drops.clear()
        return Log(logging.INFO, f"PROBEs dropped: {text}")

    # -- timers -----------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due (a pending circuit's join deadline), or None."""
        for circ in self._pending.values():
            return circ.expires
        return None

    def handle_timer(self, now: float) -> list[Action]:
        """Drop the pending circuits whose join deadline passed, closing a side that waits."""
        actions: list[Action] = []
        while self._pending:
            circ = next(iter(self._pending.values()))
            if circ.expires > now:
                break
            self._drop_circuit(circ)
            self.counters["circuits_expired"] += 1
            reason = (f"the other side did not join within {self.limits.circuit_join_timeout:g} s")
            actions.append(Log(logging.INFO, f"circuit {circ.cid} ({circ.peers[0]} -> "
                                             f"{circ.peers[1]}): {reason}"))
            for h in circ.handles:
                if h is not None:
                    actions.append(CloseLink(h, reason, abort=True))
        return actions

    # -- helpers ----------------------------------------------------------------------------------

    def _fresh(self, n: int, taken: dict[bytes, Any], other: bytes = b"") -> bytes:
        """``n`` random bytes, neither a key of ``taken`` nor ``other``."""
        while True:
            value = self.random(n)
            if len(value) != n:
                raise UsageError(f"random({n}) returned {len(value)} bytes")
            if value not in taken and value != other:
                return value


def _unmapped(host: str, port: int) -> Addr:
    """An :class:`Addr`, with an IPv4-mapped IPv6 address (a dual-stack socket's view of an
    IPv4 peer) as the IPv4 address it is."""
    if ":" in host:
        try:
            mapped = ipaddress.IPv6Address(host.partition("%")[0]).ipv4_mapped
        except ValueError:
            mapped = None
        if mapped is not None:
            return Addr(str(mapped), port)
    return Addr(host, port)


def _pair(a: str, b: str) -> tuple[str, str]:
    """The key of the circuits between ``a`` and ``b``, whichever opened them."""
    return (a, b) if a <= b else (b, a)


def _candidates(mapping: dict[int, Addr], local: tuple[Addr, ...]) -> tuple[Addr, ...]:
    """A peer's candidates: what ports 1 and 2 saw, then its local addresses, without
    repeats, at most ``MAX_ADDRS``."""
    out: list[Addr] = []
    for a in (mapping.get(1), mapping.get(2), *local):
        if a is not None and a not in out:
            out.append(a)
    return tuple(out[:wire.MAX_ADDRS])
