"""An in-process NAT emulator for the NAT-traversal tests: no sockets, no asyncio, no root.

A discrete-event :class:`Network` of virtual hosts, RFC 4787 :class:`Nat` boxes and one core
:class:`Router`, on a simulated clock (a priority queue of deliveries, a latency per hop,
optional seeded loss), in the manner of Tailscale's ``tstest/natlab``. The real sans-IO
objects of p2psc run on its virtual sockets:

- :class:`UdpEndpointHost` drives a :class:`p2psc._proto.udp.UdpEndpoint`;
- :class:`PuncherDriver` a :class:`p2psc.nat.punch.Puncher` on the same socket (the
  first-byte demux of ``wire.is_nat_datagram``), with the TTL it asks for;
- :class:`RelayHost` a :class:`p2psc.nat.rendezvous.Rendezvous` (its two PROBE ports, and the
  control links of :class:`NatPeer`, a peer's minimal side: HELLO, PROBE, CONNECT, PUNCH, DGRAM);
- :class:`ProbeServer` / :class:`ProbeClient`: a bare PROBE server, and the client side.

Topology: every host hangs off one gateway, a NAT (its LAN side) or the core router; a NAT's
WAN side hangs off the core router or another NAT's LAN (a home NAT behind a CGNAT). A packet
from a host behind NAT A to a host behind NAT B takes four hops (host -> NAT A -> core -> NAT B
-> host), each ``latency`` long. Routers (the NATs when forwarding, the core) decrement the TTL
and drop the packet at 0, so a TTL-2 packet from a host behind one NAT leaves the NAT with
TTL 1 and dies at the core. Addresses: private sides 192.168.0.0/16, NAT WAN addresses
198.51.100.0/24, public servers 203.0.113.0/24. Control links (TCP) are reliable ordered
pipes with the path's latency: TCP through the NATs is not modelled.

Everything is deterministic: the NATs' random ports, the loss and the adapters' randomness come
from seeded ``random.Random`` instances, and equal-time events run in scheduling order.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from p2psc._proto.events import DatagramReceived, Event, HandshakeComplete
from p2psc._proto.handshake import Randomness
from p2psc._proto.settings import Settings
from p2psc._proto.udp import UdpEndpoint
from p2psc.nat import wire
from p2psc.nat.punch import Puncher
from p2psc.nat.rendezvous import CloseLink, Log, RelayLimits, Rendezvous, SendFrame, SendLossy

__all__ = [
    "EI", "AD", "APD", "PRESERVE", "RANDOM", "DEFAULT_TTL", "UNREPLIED_TIMEOUT", "WALL",
    "Addr", "Packet", "Drop", "Network", "Router", "Nat", "Mapping", "Host", "Socket", "Alarm",
    "SeededRandomness", "UdpEndpointHost", "Received", "PuncherDriver", "ProbeServer",
    "ProbeClient", "RelayHost", "ControlLink", "NatPeer", "public_address",
]

Addr = tuple[str, int]

#: RFC 4787 behaviours, for both ``mapping`` and ``filtering``
EI = "endpoint-independent"
AD = "address-dependent"
APD = "address-and-port-dependent"
#: port assignment
PRESERVE = "preserve"
RANDOM = "random"

DEFAULT_TTL = 64
UNREPLIED_TIMEOUT = 30.0     # Linux nf_conntrack_udp_timeout: an unreplied UDP flow
WALL = 1_700_000_000.0       # wall clock minus simulated clock (INIT timestamps)

_PRIVATE = ipaddress.ip_network("192.168.0.0/16")
_NAT_WAN = ipaddress.ip_network("198.51.100.0/24")
_PUBLIC = ipaddress.ip_network("203.0.113.0/24")
_SHORT = {EI: "EI", AD: "AD", APD: "APD"}


def _in(ip: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return ipaddress.ip_address(ip) in net


def addr(a: Any) -> Addr:
    """A plain ``(host, port)`` tuple (wire.Addr compares equal, but prints longer)."""
    return (str(a[0]), int(a[1]))


def _key(a: Any) -> Any:
    """A socket address as a plain tuple; a ``wire.RelayAddress`` as it is."""
    return a if isinstance(a, wire.RelayAddress) else addr(a)


def fmt(a: Any) -> str:
    if a is None:
        return "-"
    if isinstance(a, wire.RelayAddress):
        return f"relay:{a.peer_id}/{a.endpoint.hex()}"
    return f"{a[0]}:{a[1]}"


# -- the network --------------------------------------------------------------------------------

@dataclass
class Packet:
    src: Addr
    dst: Addr
    ttl: int
    payload: bytes
    id: int = 0

    def __repr__(self) -> str:
        kind = f"0x{self.payload[0]:02x}" if self.payload else "empty"
        return f"<pkt#{self.id} {fmt(self.src)}->{fmt(self.dst)} ttl={self.ttl} {kind} " \
               f"{len(self.payload)}B>"


@dataclass
class Drop:
    """A packet a node did not pass on, and why."""

    time: float
    node: str
    reason: str
    packet: Packet


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    fn: Callable[..., None] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False, default=())
    cancelled: bool = field(compare=False, default=False)

    def cancel(self) -> None:
        self.cancelled = True


class Network:
    """The simulated clock, the event queue and the nodes.

    ``latency``: seconds per hop (a node's uplink may override it); ``loss``: probability that
    a hop loses a packet (seeded by ``seed``); ``max_steps``: events one :meth:`run_until` may
    run before it raises (every loop is bounded)."""

    def __init__(self, *, latency: float = 0.010, loss: float = 0.0, seed: int = 0,
                 start: float = 100.0, max_steps: int = 200_000) -> None:
        self.now = start
        self.latency = latency
        self.loss = loss
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_steps = max_steps
        self._queue: list[_Event] = []
        self._seq = itertools.count()
        self._pkt_ids = itertools.count(1)
        self.core = Router(self, "core")
        self.nodes: dict[str, Any] = {"core": self.core}
        self.drops: list[Drop] = []
        self.trace: deque[tuple[float, str, str, Packet]] = deque(maxlen=100_000)
        self.steps = 0

    # -- building -----------------------------------------------------------------------------

    def add_nat(self, name: str, wan_ip: str, lan: str, *, behind: Nat | None = None,
                **params: Any) -> Nat:
        """A NAT box with WAN address ``wan_ip`` and LAN ``lan`` (a subnet of 192.168.0.0/16);
        ``params`` are :class:`Nat`'s. Its WAN side is on the core router (``wan_ip`` in
        198.51.100.0/24) or, ``behind`` another NAT (a home NAT behind a carrier-grade NAT),
        in that NAT's LAN."""
        if behind is None and not _in(wan_ip, _NAT_WAN):
            raise ValueError(f"NAT WAN addresses are in {_NAT_WAN}, not {wan_ip}")
        if behind is not None and ipaddress.ip_address(wan_ip) not in behind.lan:
            raise ValueError(f"{wan_ip} is not in {behind.name}'s LAN {behind.lan}")
        lan_net = ipaddress.ip_network(lan)
        if not lan_net.subnet_of(_PRIVATE):  # type: ignore[arg-type]
            raise ValueError(f"LANs are in {_PRIVATE}, not {lan}")
        nat = Nat(self, name, wan_ip, lan_net, seed=self.rng.randrange(1 << 30), **params)
        self._register(name, nat)
        if behind is None:
            self.core.routes[wan_ip] = nat
        else:
            nat.gateway = behind
            behind.hosts[wan_ip] = nat
        return nat

    def add_host(self, name: str, ip: str, *, behind: Nat | None = None,
                 latency: float | None = None, loss: float | None = None) -> Host:
        """A host: behind ``behind`` (its address in that NAT's LAN), or a public server on the
        core router (203.0.113.0/24). ``latency``/``loss``: of its uplink (default: the
        network's)."""
        if behind is None:
            if not _in(ip, _PUBLIC):
                raise ValueError(f"public servers are in {_PUBLIC}, not {ip}")
            host = Host(self, name, ip, self.core, latency, loss)
            self.core.routes[ip] = host
        else:
            if ipaddress.ip_address(ip) not in behind.lan:
                raise ValueError(f"{ip} is not in {behind.name}'s LAN {behind.lan}")
            host = Host(self, name, ip, behind, latency, loss)
            behind.hosts[ip] = host
        self._register(name, host)
        return host

    def _register(self, name: str, node: Any) -> None:
        if name in self.nodes:
            raise ValueError(f"two nodes named {name}")
        self.nodes[name] = node

    # -- the clock ----------------------------------------------------------------------------

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> _Event:
        ev = _Event(max(when, self.now), next(self._seq), fn, args)
        heapq.heappush(self._queue, ev)
        return ev

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> _Event:
        return self.call_at(self.now + delay, fn, *args)

    def run_until(self, until: float | Callable[[], bool], limit: float | None = None) -> bool:
        """Run events: up to simulated time ``until`` (then the clock stands at ``until``), or
        until ``until()`` is true, for at most ``limit`` simulated seconds (default 60; the
        clock then stands where the predicate came true, or at the limit). Returns whether the
        predicate came true (True for a time). Raises RuntimeError past ``max_steps`` events."""
        pred: Callable[[], bool] | None
        if callable(until):
            pred = until
            deadline = self.now + (60.0 if limit is None else limit)
            if pred():
                return True
        else:
            pred = None
            deadline = float(until)
        steps = 0
        queue = self._queue
        while queue and queue[0].time <= deadline:
            ev = heapq.heappop(queue)
            if ev.cancelled:
                continue
            steps += 1
            if steps > self.max_steps:
                raise RuntimeError(f"more than {self.max_steps} events before t={deadline}")
            self.now = ev.time
            ev.fn(*ev.args)
            if pred is not None and pred():
                self.steps += steps
                return True
        self.steps += steps
        self.now = max(self.now, deadline)
        return pred() if pred is not None else True

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- moving packets -----------------------------------------------------------------------

    def new_packet(self, src: Addr, dst: Addr, ttl: int, payload: bytes) -> Packet:
        return Packet(addr(src), addr(dst), ttl, bytes(payload), next(self._pkt_ids))

    def hop(self, frm: Any, to: Any, pkt: Packet, latency: float | None = None,
            loss: float | None = None) -> None:
        """``pkt`` leaves ``frm`` for ``to`` over one link."""
        loss = self.loss if loss is None else loss
        if loss and self.rng.random() < loss:
            self.drop(frm.name, "lost on the link", pkt)
            return
        self.trace.append((self.now, frm.name, f"-> {to.name}", pkt))
        self.call_later(self.latency if latency is None else latency, to.deliver, pkt, frm)

    def drop(self, node: str, reason: str, pkt: Packet) -> None:
        self.drops.append(Drop(self.now, node, reason, pkt))
        self.trace.append((self.now, node, f"drop: {reason}", pkt))

    def drops_at(self, node: str, reason: str | None = None) -> list[Drop]:
        return [d for d in self.drops
                if d.node == node and (reason is None or d.reason.startswith(reason))]


class Router:
    """The core: routes by destination IP to a NAT's WAN side or a public host; decrements the
    TTL (drops at 0); drops what has no route (private addresses included)."""

    def __init__(self, net: Network, name: str) -> None:
        self.net = net
        self.name = name
        self.routes: dict[str, Any] = {}

    def deliver(self, pkt: Packet, frm: Any) -> None:
        pkt.ttl -= 1
        if pkt.ttl <= 0:
            self.net.drop(self.name, "TTL expired", pkt)
            return
        to = self.routes.get(pkt.dst[0])
        if to is None:
            self.net.drop(self.name, "no route", pkt)
            return
        self.net.hop(self, to, pkt, to.latency, to.loss)  # (the link is `to`'s uplink)


# -- NAT ------------------------------------------------------------------------------------

@dataclass
class Mapping:
    """One NAT mapping: ``internal`` is seen outside as ``(wan, ext_port)``. ``remotes`` holds
    the remote endpoints sent to through it (its filter state) and when."""

    key: tuple[Any, ...]
    internal: Addr
    ext_port: int
    created: float
    refreshed: float
    remotes: dict[Addr, float] = field(default_factory=dict)


class Nat:
    """A NAT box per RFC 4787.

    ``mapping``: EI (one public port per internal endpoint, a "cone"), AD, or APD (a new one per
    destination address / address and port, "symmetric"). ``filtering``: EI (anyone may send
    to a mapping), AD (only addresses it sent to), APD (only address:ports it sent to).
    ``ports``: PRESERVE (keep the private port when free) or RANDOM. ``mapping_timeout``:
    seconds a mapping lives without outbound traffic (REQ-6: outbound refreshes it);
    ``inbound_refresh``: inbound traffic refreshes it too. ``block_udp``: drops every UDP
    packet going out. ``linux_conflict``: Linux conntrack's behaviour: an inbound packet that
    matches no mapping records an "unreplied inbound flow" (remote -> our port) for
    ``unreplied_timeout`` seconds (refreshed by each further packet of that flow, as conntrack
    does), which also eats those packets; a later outbound flow whose public port pair would
    clash with it gets a different public port (for that flow only, as masquerade picks a
    port per flow). No hairpinning: a LAN host sending to the NAT's own WAN address is dropped.
    """

    def __init__(self, net: Network, name: str, wan_ip: str, lan: ipaddress.IPv4Network
                 | ipaddress.IPv6Network, *, mapping: str = EI, filtering: str = APD,
                 ports: str = PRESERVE, mapping_timeout: float = 120.0,
                 inbound_refresh: bool = False, block_udp: bool = False,
                 linux_conflict: bool = False, unreplied_timeout: float = UNREPLIED_TIMEOUT,
                 latency: float | None = None, loss: float | None = None, seed: int = 0) -> None:
        for what, v in (("mapping", mapping), ("filtering", filtering)):
            if v not in (EI, AD, APD):
                raise ValueError(f"bad {what} behaviour {v!r}")
        if ports not in (PRESERVE, RANDOM):
            raise ValueError(f"bad port assignment {ports!r}")
        self.net = net
        self.name = name
        self.wan_ip = wan_ip
        self.lan = lan
        self.mapping = mapping
        self.filtering = filtering
        self.ports = ports
        self.mapping_timeout = mapping_timeout
        self.inbound_refresh = inbound_refresh
        self.block_udp = block_udp
        self.linux_conflict = linux_conflict
        self.unreplied_timeout = unreplied_timeout
        self.latency = latency
        self.loss = loss
        self.rng = random.Random(seed)
        self.gateway: Any = net.core
        self.hosts: dict[str, Any] = {}      # LAN address -> Host (or an inner Nat)
        self.mappings: dict[tuple[Any, ...], Mapping] = {}
        self.by_port: dict[int, Mapping] = {}
        self.unreplied: dict[tuple[Addr, int], float] = {}   # (remote, our port) -> expiry
        self.retired_ports: set[int] = set()                 # never handed out again (rebind)
        self.expired: list[Mapping] = []

    @property
    def ip(self) -> str:
        return self.wan_ip

    def describe(self) -> str:
        m = {EI: "EIM", AD: "ADM", APD: "APDM"}[self.mapping]
        f = {EI: "EIF", AD: "ADF", APD: "APDF"}[self.filtering]
        extra = [self.ports]
        if self.linux_conflict:
            extra.append("linux")
        if self.block_udp:
            extra.append("UDP blocked")
        return f"{m}/{f} {'+'.join(extra)}"

    # -- state --------------------------------------------------------------------------------

    def _alive(self, m: Mapping, now: float) -> bool:
        return now - m.refreshed < self.mapping_timeout

    def expire(self) -> None:
        """Forget the mappings and unreplied flows whose time is up."""
        now = self.net.now
        for key, m in list(self.mappings.items()):
            if not self._alive(m, now):
                del self.mappings[key]
                if self.by_port.get(m.ext_port) is m:
                    del self.by_port[m.ext_port]
                self.expired.append(m)
        for k, t in list(self.unreplied.items()):
            if t <= now:
                del self.unreplied[k]

    def rebind(self) -> None:
        """Forget every mapping; their ports are never reused, so the next packet of each
        internal endpoint gets a new public port (a NAT reboot, or a CGNAT rebinding)."""
        for m in self.mappings.values():
            self.retired_ports.add(m.ext_port)
        self.mappings.clear()
        self.by_port.clear()

    def public_port(self, internal: Any, remote: Any = None) -> int | None:
        """The public port of ``internal``'s live mapping toward ``remote`` (None: its
        endpoint-independent mapping), or None if it has none."""
        self.expire()
        internal = addr(internal)
        if remote is None:
            if self.mapping != EI:
                raise ValueError("name the remote: this NAT maps per destination")
            m = self.mappings.get((EI, internal))
        else:
            remote = addr(remote)
            m = self.mappings.get(("flow", internal, remote)) or self.mappings.get(
                self._key(internal, remote))
        return None if m is None else m.ext_port

    def _key(self, internal: Addr, remote: Addr) -> tuple[Any, ...]:
        if self.mapping == EI:
            return (EI, internal)
        if self.mapping == AD:
            return (AD, internal, remote[0])
        return (APD, internal, remote)

    def _clash(self, remote: Addr, port: int) -> bool:
        return self.linux_conflict and (remote, port) in self.unreplied

    def _port_free(self, port: int) -> bool:
        return port not in self.by_port and port not in self.retired_ports

    def _alloc(self, internal_port: int, remote: Addr) -> int:
        if (self.ports == PRESERVE and self._port_free(internal_port)
                and not self._clash(remote, internal_port)):
            return internal_port
        for _ in range(10_000):
            p = self.rng.randrange(1024, 65536)
            if self._port_free(p) and not self._clash(remote, p):
                return p
        raise RuntimeError(f"{self.name}: no free port")

    def _new_mapping(self, key: tuple[Any, ...], internal: Addr, remote: Addr) -> Mapping:
        now = self.net.now
        m = Mapping(key, internal, self._alloc(internal[1], remote), now, now)
        self.mappings[key] = m
        self.by_port[m.ext_port] = m
        return m

    def _permits(self, m: Mapping, remote: Addr) -> bool:
        if self.filtering == EI:
            return True
        if self.filtering == AD:
            return any(r[0] == remote[0] for r in m.remotes)
        return remote in m.remotes

    # -- packets ------------------------------------------------------------------------------

    def deliver(self, pkt: Packet, frm: Any) -> None:
        self.expire()
        if self.hosts.get(getattr(frm, "ip", "")) is frm:
            self._outbound(pkt, frm)
        else:
            self._inbound(pkt)

    def _outbound(self, pkt: Packet, frm: Any) -> None:
        net = self.net
        dst_host = self.hosts.get(pkt.dst[0])
        if dst_host is not None:  # the same LAN: switched, no translation
            net.hop(self, dst_host, pkt, dst_host.latency, dst_host.loss)
            return
        if pkt.dst[0] == self.wan_ip:
            net.drop(self.name, "hairpin (not modelled)", pkt)
            return
        if self.block_udp:
            net.drop(self.name, "UDP blocked", pkt)
            return
        # forwarding decrements the TTL before the NAT's postrouting: a packet that dies here
        # never creates a mapping (Linux confirms a conntrack entry only when it leaves)
        pkt.ttl -= 1
        if pkt.ttl <= 0:
            net.drop(self.name, "TTL expired", pkt)
            return
        internal, remote, now = pkt.src, pkt.dst, net.now
        m = self.mappings.get(("flow", internal, remote)) or self.mappings.get(
            self._key(internal, remote))
        if m is None:
            m = self._new_mapping(self._key(internal, remote), internal, remote)
        elif remote not in m.remotes and self._clash(remote, m.ext_port):
            # Linux: this new flow's reply tuple (remote -> wan:port) is taken by the unreplied
            # inbound flow, so masquerade gives this flow another port
            m = self._new_mapping(("flow", internal, remote), internal, remote)
        m.refreshed = now
        m.remotes[remote] = now
        pkt.src = (self.wan_ip, m.ext_port)
        net.hop(self, self.gateway, pkt, self.latency, self.loss)

    def _inbound(self, pkt: Packet) -> None:
        net, now = self.net, self.net.now
        if pkt.dst[0] != self.wan_ip:
            net.drop(self.name, "not our address", pkt)
            return
        remote, port = pkt.src, pkt.dst[1]
        key = (remote, port)
        if self.linux_conflict and key in self.unreplied:
            self.unreplied[key] = now + self.unreplied_timeout
            net.drop(self.name, "unreplied flow to the NAT itself", pkt)
            return
        m = self.by_port.get(port)
        if m is None or not self._permits(m, remote):
            if self.linux_conflict and pkt.ttl >= 1:
                self.unreplied[key] = now + self.unreplied_timeout
            net.drop(self.name, "no mapping" if m is None else "filtered", pkt)
            return
        if self.inbound_refresh:
            m.refreshed = now
        pkt.ttl -= 1
        if pkt.ttl <= 0:
            net.drop(self.name, "TTL expired", pkt)
            return
        pkt.dst = m.internal
        host = self.hosts.get(m.internal[0])
        if host is None:
            net.drop(self.name, "no such LAN host", pkt)
            return
        net.hop(self, host, pkt, host.latency, host.loss)


# -- hosts ----------------------------------------------------------------------------------

class Socket:
    """A bound UDP socket of a virtual host: ``on_datagram(data, src)`` gets what arrives."""

    def __init__(self, host: Host, port: int,
                 on_datagram: Callable[[bytes, Addr], None] | None) -> None:
        self.host = host
        self.port = port
        self.on_datagram = on_datagram
        self.received: list[tuple[float, bytes, Addr]] = []
        self.sent = 0

    @property
    def addr(self) -> Addr:
        return (self.host.ip, self.port)

    def sendto(self, data: bytes, dst: Any, ttl: int | None = None) -> None:
        net = self.host.net
        pkt = net.new_packet(self.addr, addr(dst), DEFAULT_TTL if ttl is None else ttl, data)
        self.sent += 1
        net.hop(self.host, self.host.gateway, pkt, self.host.latency, self.host.loss)

    def _deliver(self, pkt: Packet) -> None:
        if self.on_datagram is None:
            self.received.append((self.host.net.now, pkt.payload, pkt.src))
        else:
            self.on_datagram(pkt.payload, pkt.src)


class Host:
    """A virtual host with one address and a gateway (its NAT, or the core router)."""

    def __init__(self, net: Network, name: str, ip: str, gateway: Any,
                 latency: float | None, loss: float | None) -> None:
        self.net = net
        self.name = name
        self.ip = ip
        self.gateway = gateway
        self.latency = latency
        self.loss = loss
        self.sockets: dict[int, Socket] = {}
        self._ephemeral = itertools.count(40000)

    def bind(self, port: int = 0,
             on_datagram: Callable[[bytes, Addr], None] | None = None) -> Socket:
        if port == 0:
            port = next(p for p in self._ephemeral if p not in self.sockets)
        if port in self.sockets:
            raise OSError(f"{self.name}: port {port} in use")
        s = self.sockets[port] = Socket(self, port, on_datagram)
        return s

    def deliver(self, pkt: Packet, frm: Any) -> None:
        if pkt.dst[0] != self.ip:
            self.net.drop(self.name, "not our address", pkt)
            return
        sock = self.sockets.get(pkt.dst[1])
        if sock is None:
            self.net.drop(self.name, "port closed", pkt)
            return
        self.net.trace.append((self.net.now, self.name, "received", pkt))
        sock._deliver(pkt)


# -- adapters for the sans-IO objects -------------------------------------------------------------

class Alarm:
    """One pending call of ``fn`` at the time last :meth:`set` (None: none); as the asyncio
    adapters keep one loop timer on the core's ``get_timer()``."""

    def __init__(self, net: Network, fn: Callable[[], None]) -> None:
        self.net = net
        self.fn = fn
        self.when: float | None = None
        self._ev: _Event | None = None

    def set(self, when: float | None) -> None:
        if when == self.when and self._ev is not None and not self._ev.cancelled:
            return
        if self._ev is not None:
            self._ev.cancel()
            self._ev = None
        self.when = when
        if when is not None:
            self._ev = self.net.call_at(when, self._fire)

    def _fire(self) -> None:
        self._ev = None
        self.when = None
        self.fn()


class SeededRandomness(Randomness):
    """The handshake's random bytes (indexes, nonces, ephemeral keys) from a seeded generator;
    the RSA padding stays OpenSSL's (it changes bytes, never sizes or timing)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def random(self, n: int) -> bytes:
        return self.rng.randbytes(n)


@dataclass
class Received:
    time: float
    data: bytes
    peer_id: str
    addr: Any           # a socket address, or a wire.RelayAddress


class UdpEndpointHost:
    """A real :class:`UdpEndpoint` on a virtual socket. Datagrams whose first byte is a NAT
    datagram's (``wire.is_nat_datagram``: 0x50..0x53) go to ``nat_handlers[first byte]``
    (PuncherDriver, ProbeClient), the rest to the endpoint. ``received`` collects the
    authenticated payloads, ``events`` every other event."""

    def __init__(self, host: Host, port: int, peer_id: str, key: rsa.RSAPrivateKey,
                 settings: Settings, *, key_lookup: Callable[[str], Any] | None = None,
                 accept_from: str | None = None, seed: int = 0) -> None:
        self.net = host.net
        self.host = host
        self.peer_id = peer_id
        self.sock = host.bind(port, self._on_datagram)
        self.ep = UdpEndpoint(peer_id, key, settings, key_lookup=key_lookup,
                              accept_from=accept_from, now=self.net.now, wall_offset=WALL,
                              randomness=SeededRandomness(seed))
        self.nat_handlers: dict[int, Callable[[bytes, Addr], None]] = {}
        self.received: list[Received] = []
        self.events: list[Event] = []
        self.unhandled_nat = 0
        #: sends a datagram addressed to a ``wire.RelayAddress`` (over the relay; NatPeer)
        self.relay_send: Callable[[bytes, wire.RelayAddress], None] | None = None
        self.relayed_out = 0
        self._alarm = Alarm(self.net, self._on_timer)

    @property
    def addr(self) -> Addr:
        return self.sock.addr

    def handshakes(self) -> list[HandshakeComplete]:
        return [e for e in self.events if isinstance(e, HandshakeComplete)]

    def connect(self, peer_id: str, public_key: rsa.RSAPublicKey, to: Any) -> None:
        """Handshake with ``peer_id`` at ``to``: a socket address, or a ``wire.RelayAddress``
        (then over the relay)."""
        self.ep.connect(peer_id, public_key, _key(to), self.net.now)
        self._flush()

    def send(self, peer_id: str, data: bytes) -> None:
        """Seal ``data`` for ``peer_id`` and send it (or queue it until the handshake)."""
        r = self.ep.send(peer_id, data, self.net.now)
        if r is not None:
            self._transmit(r[0], r[1])
        self._flush()

    def send_to_addr(self, to: Any, data: bytes) -> None:
        d, a = self.ep.send_to_addr(_key(to), data, self.net.now)
        self._transmit(d, a)
        self._flush()

    def _transmit(self, data: bytes, to: Any) -> None:
        if isinstance(to, wire.RelayAddress):
            if self.relay_send is None:
                raise RuntimeError("a datagram for the relay, and no relay")
            self.relayed_out += 1
            self.relay_send(data, to)
        else:
            self.sock.sendto(data, to)

    def _on_datagram(self, data: bytes, src: Addr) -> None:
        if data and wire.is_nat_datagram(data[0]):
            handler = self.nat_handlers.get(data[0])
            if handler is None:
                self.unhandled_nat += 1
            else:
                handler(data, src)
            return
        self._receive(data, src)

    def receive_relayed(self, data: bytes, source: wire.RelayAddress) -> None:
        """A datagram the relay delivered from ``source`` (its address in the UDP core)."""
        self._receive(data, source)

    def _receive(self, data: bytes, src: Any) -> None:
        for ev in self.ep.receive(data, src, self.net.now):
            if isinstance(ev, DatagramReceived):
                self.received.append(Received(self.net.now, bytes(ev.data), ev.peer_id,
                                              _key(ev.addr)))
            else:
                self.events.append(ev)
        self._flush()

    def _on_timer(self) -> None:
        self.events += self.ep.handle_timer(self.net.now)
        self._flush()

    def _flush(self) -> None:
        for d, a in self.ep.datagrams_to_send():
            self._transmit(d, a)
        self._alarm.set(self.ep.get_timer())


class PuncherDriver:
    """A real :class:`Puncher` on an :class:`UdpEndpointHost`'s socket: PUNCH_PING/PONG
    datagrams go to it; what it sends goes out with the TTL it asks for. Started at once
    (``net.now``), as on receiving the rendezvous' PUNCH."""

    def __init__(self, udp: UdpEndpointHost, punch_id: bytes, candidates: Iterable[Any], *,
                 seed: int = 0, **puncher_kw: Any) -> None:
        self.net = udp.net
        self.udp = udp
        self.rng = random.Random(seed)
        self.started = self.net.now
        self.puncher = Puncher(punch_id, [addr(c) for c in candidates], self.net.now,
                               random=self.rng.randbytes, **puncher_kw)
        self.sent: list[tuple[float, bytes, Addr, int | None]] = []
        self._alarm = Alarm(self.net, self._on_timer)
        udp.nat_handlers[wire.U_PUNCH_PING] = self._on_datagram
        udp.nat_handlers[wire.U_PUNCH_PONG] = self._on_datagram
        self._flush()

    @property
    def path(self) -> Addr | None:
        p = self.puncher.path
        return None if p is None else addr(p)

    @property
    def finished(self) -> bool:
        return self.puncher.finished

    @property
    def time_to_path(self) -> float | None:
        f = self.puncher.found_at
        return None if f is None else f - self.started

    def _on_datagram(self, data: bytes, src: Addr) -> None:
        self.puncher.receive(data, src, self.net.now)
        self._flush()

    def _on_timer(self) -> None:
        self.puncher.handle_timer(self.net.now)
        self._flush()

    def _flush(self) -> None:
        for d, a, ttl in self.puncher.datagrams_to_send():
            self.sent.append((self.net.now, d, addr(a), ttl))
            self.udp.sock.sendto(d, a, ttl)
        self._alarm.set(self.puncher.get_timer())


class ProbeServer:
    """Answers PROBE on each of ``ports`` with a PROBE_REPLY naming the source address it saw
    (the peer's public mapping toward that port), from the port it came to. ``token``: the
    probe token to accept (None: any)."""

    def __init__(self, host: Host, ports: tuple[int, ...] = (3478, 3479),
                 token: bytes | None = None) -> None:
        self.host = host
        self.token = token
        self.seen: list[tuple[float, int, Addr, bytes]] = []   # (time, port, source, ep)
        self.socks = [host.bind(p, self._handler(p)) for p in ports]

    @property
    def addrs(self) -> list[Addr]:
        return [s.addr for s in self.socks]

    def _handler(self, port: int) -> Callable[[bytes, Addr], None]:
        def on(data: bytes, src: Addr) -> None:
            probe = wire.decode_probe(data)
            if probe is None or (self.token is not None and probe.token != self.token):
                return
            self.seen.append((self.host.net.now, port, src, probe.endpoint))
            self.host.sockets[port].sendto(
                wire.encode_probe_reply(probe.txid, wire.Addr(*src)), src)
        return on


class ProbeClient:
    """Sends PROBE from an :class:`UdpEndpointHost`'s socket to each server address, again
    every ``interval`` until answered, ``tries`` times at most. ``observed[server]`` is the
    mapping each server saw; once every probe was answered or the tries are spent, ``done``;
    ``no_udp`` when none was ever answered; ``varies`` when the servers saw different
    mappings (the NAT maps per destination)."""

    def __init__(self, udp: UdpEndpointHost, servers: Iterable[Any], *, token: bytes,
                 endpoint: bytes, tries: int = 3, interval: float = 0.5, seed: int = 0) -> None:
        self.net = udp.net
        self.udp = udp
        self.servers = [addr(s) for s in servers]
        self.token = token
        self.endpoint = endpoint
        self.rng = random.Random(seed)
        self.tries = tries
        self.interval = interval
        self.sent = 0
        self.observed: dict[Addr, Addr] = {}
        self.txids: dict[bytes, Addr] = {}
        self.done = False
        self.done_at: float | None = None
        self._round = 0
        udp.nat_handlers[wire.U_PROBE_REPLY] = self._on_reply
        self._alarm = Alarm(self.net, self._send_round)
        self._send_round()

    @property
    def no_udp(self) -> bool:
        return self.done and not self.observed

    @property
    def varies(self) -> bool:
        return len(set(self.observed.values())) > 1

    @property
    def mapping(self) -> Addr | None:
        """The mapping the first server saw (what the rendezvous tells the peer)."""
        return self.observed.get(self.servers[0])

    def _send_round(self) -> None:
        if self.done:
            return
        if self._round >= self.tries:
            self._finish()
            return
        self._round += 1
        for s in self.servers:
            if s not in self.observed:
                txid = self.rng.randbytes(8)
                self.txids[txid] = s
                self.udp.sock.sendto(wire.encode_probe(self.token, self.endpoint, txid), s)
                self.sent += 1
        self._alarm.set(self.net.now + self.interval)

    def _finish(self) -> None:
        self.done = True
        self.done_at = self.net.now
        self._alarm.set(None)

    def _on_reply(self, data: bytes, src: Addr) -> None:
        reply = wire.decode_probe_reply(data)
        if reply is None:
            return
        server = self.txids.get(reply.txid)
        if server is None or server != src:
            return
        self.observed[server] = addr(reply.observed)
        if len(self.observed) == len(self.servers):
            self._finish()


# -- the relay service and a peer's side of it ------------------------------------------------

def public_address(node: Any) -> str:
    """The address the public side sees ``node`` (a host or a NAT) come from: its outermost
    NAT's WAN address, or its own."""
    while not isinstance(node.gateway, Router):
        node = node.gateway
    return str(node.ip)


def _uplink_latency(node: Any, net: Network) -> float:
    """Seconds from ``node`` to the core router, hop by hop."""
    total = 0.0
    while True:
        total += net.latency if node.latency is None else node.latency
        if isinstance(node.gateway, Router):
            return total
        node = node.gateway


class ControlLink:
    """A peer's control link to the relay: the authenticated p2psc TCP connection, modelled
    as a reliable, ordered message pipe (TCP through the NATs is not modelled: it keeps its
    own mapping and is not what is being tested). A frame takes the path's latency (the hops
    host -> core -> relay) each way, plus ``down_extra`` toward the peer (a slower
    downstream: the rendezvous' PUNCH then reaches this peer later than the other)."""

    def __init__(self, relay: RelayHost, peer: NatPeer, latency: float) -> None:
        self.relay = relay
        self.peer = peer
        self.latency = latency
        self.down_extra = 0.0
        self.closed = False
        self.up: list[bytes] = []
        self.down: list[bytes] = []

    def to_relay(self, data: bytes) -> None:
        if not self.closed:
            self.up.append(data)
            self.relay.net.call_later(self.latency, self.relay.frame_from_peer, self, data)

    def to_peer(self, data: bytes) -> None:
        if not self.closed:
            self.down.append(data)
            self.relay.net.call_later(self.latency + self.down_extra, self.peer.frame, data)

    def __repr__(self) -> str:
        return f"<ControlLink {self.peer.peer_id}>"


class RelayHost:
    """The real :class:`p2psc.nat.rendezvous.Rendezvous` on a public host: its two PROBE
    ports are UDP sockets there, its control links are :class:`ControlLink`; it carries out
    the actions the Rendezvous returns (``logs``/``closed`` keep the Log and CloseLink ones)."""

    def __init__(self, host: Host, ports: tuple[int, int] = (3478, 3479), *,
                 limits: RelayLimits | None = None, seed: int = 0) -> None:
        self.net = host.net
        self.host = host
        self.rng = random.Random(seed)
        self.rv = Rendezvous(limits, random=self.rng.randbytes)
        self.rv.udp_ports = ports
        self.socks = [host.bind(p, self._prober(i + 1)) for i, p in enumerate(ports)]
        self.links: list[ControlLink] = []
        self.logs: list[Log] = []
        self.closed: list[CloseLink] = []
        self._alarm = Alarm(self.net, self._on_timer)

    @property
    def probe_addrs(self) -> list[Addr]:
        return [s.addr for s in self.socks]

    def attach(self, peer: NatPeer) -> ControlLink:
        """``peer`` connects its control link; the relay attaches it once the link's
        handshake is done (one round trip, modelled as one latency each way)."""
        link = ControlLink(self, peer, _uplink_latency(peer.udp.host, self.net)
                           + _uplink_latency(self.host, self.net))
        self.links.append(link)
        observed = wire.Addr(public_address(peer.udp.host), 40000 + len(self.links))
        self.net.call_later(2 * link.latency, self._attach, peer.peer_id, link, observed)
        return link

    def _attach(self, peer_id: str, link: ControlLink, observed: wire.Addr) -> None:
        self._do(self.rv.attach(peer_id, link, observed, self.net.now))

    def frame_from_peer(self, link: ControlLink, data: bytes) -> None:
        self._do(self.rv.receive(link, data, self.net.now))

    def _prober(self, index: int) -> Callable[[bytes, Addr], None]:
        def on(data: bytes, src: Addr) -> None:
            reply = self.rv.probe(data, src, index, self.net.now)
            if reply is not None:
                self.socks[index - 1].sendto(reply, src)
        return on

    def _do(self, actions: list[Any]) -> None:
        for a in actions:
            if isinstance(a, (SendFrame, SendLossy)):
                link: Any = a.link
                link.to_peer(a.data)      # (no write backlog is modelled)
            elif isinstance(a, CloseLink):
                self.closed.append(a)
                link = a.link
                link.closed = True
            elif isinstance(a, Log):
                self.logs.append(a)
        self._alarm.set(self.rv.get_timer())

    def _on_timer(self) -> None:
        self._do(self.rv.handle_timer(self.net.now))


class NatPeer:
    """A peer's side of NAT traversal, as little as the scenarios need (the real agent is not
    written yet): on WELCOME it sends HELLO (serves UDP, its endpoint id, its local address)
    and PROBEs both relay ports from its UDP socket; :meth:`connect` sends CONNECT; on PUNCH it
    runs a :class:`PuncherDriver` (``punch_kw``: the Puncher's parameters); datagrams its
    UdpEndpoint addresses to a ``wire.RelayAddress`` go out as DGRAM frames, and relayed
    DGRAMs come in to the UdpEndpoint from ``RelayAddress(source peer, source endpoint)``."""

    def __init__(self, udp: UdpEndpointHost, relay: RelayHost, endpoint: bytes, *,
                 punch_kw: dict[str, Any] | None = None, seed: int = 0) -> None:
        self.net = udp.net
        self.udp = udp
        self.peer_id = udp.peer_id
        self.relay = relay
        self.endpoint = endpoint
        self.punch_kw = dict(punch_kw or {})
        self.seed = seed
        self.welcome: wire.Welcome | None = None
        self.probe: ProbeClient | None = None
        self.punch_frame: wire.Punch | None = None
        self.punch: PuncherDriver | None = None
        self.errors: list[wire.Error] = []
        self.relayed_in = 0
        self._request = 0
        udp.relay_send = self._send_dgram
        self.link = relay.attach(self)

    @property
    def local_addr(self) -> wire.Addr:
        return wire.Addr(*self.udp.addr)

    @property
    def ready(self) -> bool:
        """Attached, and its PROBEs answered or given up."""
        return self.probe is not None and self.probe.done

    def relay_address(self) -> wire.RelayAddress:
        """Where the peer of our PUNCH is reached through the relay."""
        assert self.punch_frame is not None
        return wire.RelayAddress(self.punch_frame.peer_id, self.punch_frame.peer_endpoint)

    def connect(self, target: str) -> int:
        self._request += 1
        self.link.to_relay(wire.encode(wire.Connect(self._request, self.endpoint,
                                                    (self.local_addr,), target)))
        return self._request

    def frame(self, data: bytes) -> None:
        f = wire.decode_relay_frame(data)
        if isinstance(f, wire.Welcome):
            self.welcome = f
            self.link.to_relay(wire.encode(wire.Hello(wire.FLAG_UDP, self.endpoint,
                                                      (self.local_addr,))))
            server = self.relay.host.ip
            self.probe = ProbeClient(self.udp, [(server, f.udp_port1), (server, f.udp_port2)],
                                     token=f.probe_token, endpoint=self.endpoint,
                                     seed=self.seed)
        elif isinstance(f, wire.Punch):
            self.punch_frame = f
            # as NatAgent.find_udp_path: no punch without a mapping of our own or candidates
            # of theirs (a relay-only PUNCH); the frame still names their endpoint
            if not f.candidates or self.probe is None or self.probe.mapping is None:
                return
            self.punch = PuncherDriver(self.udp, f.punch_id, f.candidates, seed=self.seed + 1,
                                       **self.punch_kw)
        elif isinstance(f, wire.RelayedDgram):
            self.relayed_in += 1
            self.udp.receive_relayed(f.payload, wire.RelayAddress(f.source_peer, f.source))
        elif isinstance(f, wire.Error):
            self.errors.append(f)

    def _send_dgram(self, data: bytes, to: wire.RelayAddress) -> None:
        self.link.to_relay(wire.encode(wire.Dgram(self.endpoint, to.endpoint, to.peer_id,
                                                  data)))
