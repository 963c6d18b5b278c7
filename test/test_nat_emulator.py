"""The NAT-traversal matrix on the in-process emulator (test/natemu.py): the real Puncher and
UdpEndpoint, RFC 4787 NATs, a simulated clock; no sockets, no root, deterministic.

Each scenario asserts its outcome and records a row of the matrix; ``matrix_table()`` runs
every scenario (each runs once per process) and formats the table, and the last test prints
it (``pytest -s``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import rsa_key
from natemu import (
    AD,
    APD,
    EI,
    PRESERVE,
    RANDOM,
    UNREPLIED_TIMEOUT,
    Addr,
    Nat,
    NatPeer,
    Network,
    ProbeClient,
    ProbeServer,
    PuncherDriver,
    RelayHost,
    UdpEndpointHost,
    fmt,
)

from p2psc._proto.settings import Settings
from p2psc.nat import wire

SERVER_IP = "203.0.113.10"
A_WAN, B_WAN = "198.51.100.1", "198.51.100.2"
A_IP, B_IP = "192.168.1.10", "192.168.2.20"
SAME_LAN_B = "192.168.1.20"
A_PORT, B_PORT = 5000, 6000
EP_A, EP_B = b"ep-a-udp", b"ep-b-udp"

CONE = dict(mapping=EI, filtering=APD, ports=PRESERVE)                 # Linux masquerade
FULL_CONE = dict(mapping=EI, filtering=EI, ports=PRESERVE)
RESTRICTED_CONE = dict(mapping=EI, filtering=AD, ports=PRESERVE)
SYMMETRIC = dict(mapping=APD, filtering=APD, ports=RANDOM)             # masquerade random


@functools.cache
def keys() -> dict[str, Any]:
    """The two peers' RSA keys, made once (conftest caches them for the whole session)."""
    return {"a.test": rsa_key("a.test"), "b.test": rsa_key("b.test")}


def pub(peer_id: str) -> Any:
    return keys()[peer_id].public_key()


@dataclass
class Row:
    scenario: str
    nat_a: str
    nat_b: str
    punched: bool                 # a direct path was found
    path: str                     # the path A's data took to B
    delivered: bool               # A's payload arrived at B, byte-exact, as A's
    first_message: float | None   # simulated seconds from A's PUNCH to that payload at B


MATRIX: dict[str, Row] = {}


@dataclass
class World:
    """The relay (the real Rendezvous: PROBE ports and control links) on the core; peer A
    behind NAT A, peer B behind NAT B (or public when its NAT is None). A is the UDP client
    of B, and asks the rendezvous to CONNECT it to B."""

    net: Network
    nat_a: Nat | None
    nat_b: Nat | None
    a: UdpEndpointHost
    b: UdpEndpointHost
    relay: RelayHost
    peers: dict[str, NatPeer]
    t_punch: float = 0.0

    def nat_name(self, which: str) -> str:
        nat = self.nat_a if which == "a" else self.nat_b
        if nat is None:
            return "public"
        if isinstance(nat.gateway, Nat):
            return f"{nat.describe()} behind CGNAT {nat.gateway.describe()}"
        return nat.describe()

    @property
    def probes(self) -> dict[str, ProbeClient]:
        return {k: p.probe for k, p in self.peers.items() if p.probe is not None}

    @property
    def punchers(self) -> dict[str, PuncherDriver]:
        return {k: p.punch for k, p in self.peers.items() if p.punch is not None}

    @property
    def pa(self) -> PuncherDriver:
        return self.punchers["a"]

    @property
    def pb(self) -> PuncherDriver:
        return self.punchers["b"]

    # -- steps --------------------------------------------------------------------------------

    def probe(self) -> None:
        """Both attach to the relay (WELCOME, HELLO) and PROBE its two ports from their UDP
        socket: the rendezvous learns their mappings."""
        assert self.net.run_until(lambda: all(p.ready for p in self.peers.values()), 5.0)

    def punch(self, *, skew: float = 0.0, a_kw: dict[str, Any] | None = None,
              b_kw: dict[str, Any] | None = None, **kw: Any) -> None:
        """A sends CONNECT; the rendezvous sends PUNCH to both at once; B's arrives ``skew``
        seconds after A's (negative: before), its control link's downstream being that much
        slower. Each runs its Puncher (``kw``, then ``a_kw``/``b_kw``: its parameters) from the
        socket it probed from. Runs until A has a path (the first PONG decides it: A may start
        its handshake at once, while both attempts go on answering pings) or both attempts
        are finished."""
        pa, pb = self.peers["a"], self.peers["b"]
        pa.punch_kw = {**kw, **(a_kw or {})}
        pb.punch_kw = {**kw, **(b_kw or {})}
        natural = pb.link.latency - pa.link.latency
        pb.link.down_extra = max(0.0, skew - natural)
        pa.link.down_extra = max(0.0, natural - skew)
        pa.connect("b.test")
        assert self.net.run_until(
            lambda: ("a" in self.punchers and self.pa.path is not None) or self.finished(), 10.0)
        assert pa.errors == [] and pb.errors == []
        self.t_punch = self.pa.started
        if "b" in self.punchers:
            assert abs((self.pb.started - self.pa.started) - skew) < 1e-9

    def finished(self) -> bool:
        return len(self.punchers) == 2 and all(p.finished for p in self.punchers.values())

    def finish_punch(self) -> None:
        """Run until both attempts have spent their budget."""
        assert self.net.run_until(self.finished, 10.0)

    def handshake_and_send(self, payload: bytes, limit: float = 20.0,
                           resend: float | None = None, via: Any = None) -> bool:
        """A handshakes with B over A's punched path (or ``via``: a relay address) and sends
        ``payload`` (queued until the handshake completes; again every ``resend`` seconds if
        given: UDP does not retransmit application data); True once it arrived at B."""
        to = self.pa.path if via is None else via
        assert to is not None
        before = len(self.b.received)
        self.a.connect("b.test", pub("b.test"), to)
        deadline = self.net.now + limit
        ok = False
        for _ in range(1000):
            self.a.send("b.test", payload)
            step = deadline - self.net.now if resend is None else min(resend,
                                                                       deadline - self.net.now)
            ok = self.net.run_until(lambda: len(self.b.received) > before, step)
            if ok or self.net.now >= deadline:
                break
        if via is None:
            self.finish_punch()
        else:
            self.net.run_for(1.0)   # what is in flight lands
        return ok

    def relay_fallback(self, payload: bytes) -> bool:
        """The punch failed: A handshakes with B through the relay (B's endpoint as the PUNCH
        named it) and sends ``payload``; True once it arrived at B."""
        assert self.finished() and self.pa.path is None
        return self.handshake_and_send(payload, via=self.peers["a"].relay_address())


def make_world(nat_a: dict[str, Any] | None, nat_b: dict[str, Any] | None, *, seed: int = 1,
               settings: Settings | None = None, latency: float = 0.010, loss: float = 0.0,
               cgnat_a: dict[str, Any] | None = None, same_nat: bool = False) -> World:
    """``cgnat_a``: A's NAT (``nat_a``, a home NAT) sits behind a carrier-grade NAT with these
    parameters, whose WAN address is then A_WAN. ``same_nat``: B is on A's LAN (SAME_LAN_B),
    behind A's NAT (``nat_b`` unused)."""
    net = Network(seed=seed, latency=latency, loss=loss)
    relay = RelayHost(net.add_host("relay", SERVER_IP), seed=seed)
    s = settings or Settings()
    lookup = {k: pub(k) for k in keys()}.get
    if cgnat_a is not None:
        assert nat_a is not None
        cg = net.add_nat("cgnat-a", A_WAN, "192.168.100.0/24", **cgnat_a)
        na: Nat | None = net.add_nat("nat-a", "192.168.100.2", "192.168.1.0/24", behind=cg,
                                     **nat_a)
    else:
        na = net.add_nat("nat-a", A_WAN, "192.168.1.0/24", **nat_a) if nat_a is not None else None
    if same_nat:
        nb = na
    else:
        nb = net.add_nat("nat-b", B_WAN, "192.168.2.0/24", **nat_b) if nat_b is not None else None
    ha = net.add_host("a", A_IP, behind=na)
    hb = net.add_host("b", SAME_LAN_B if same_nat else B_IP, behind=nb)
    a = UdpEndpointHost(ha, A_PORT, "a.test", keys()["a.test"], s, key_lookup=lookup,
                        accept_from="b.test", seed=31)
    b = UdpEndpointHost(hb, B_PORT, "b.test", keys()["b.test"], s, key_lookup=lookup, seed=32)
    peers = {"a": NatPeer(a, relay, EP_A, seed=41), "b": NatPeer(b, relay, EP_B, seed=42)}
    return World(net, na, nb, a, b, relay, peers)


def row(w: World, scenario: str, punched: bool, path: str, delivered: bool,
        first: float | None) -> Row:
    r = Row(scenario, w.nat_name("a"), w.nat_name("b"), punched, path, delivered, first)
    MATRIX[scenario] = r
    print(format_row(r))
    return r


def punched_path(w: World) -> str:
    return f"direct {fmt(w.pa.path)} <-> {fmt(w.pb.path)}"


def first_message(w: World) -> float:
    return round(w.b.received[0].time - w.t_punch, 3)


# -- the scenarios (each runs once; the tests assert on what they return) ------------------------

@dataclass
class Outcome:
    world: World
    row: Row
    extra: dict[str, Any] = field(default_factory=dict)


SCENARIOS: dict[str, Callable[[], Outcome]] = {}


def scenario(name: str) -> Callable[[Callable[[], Outcome]], Callable[[], Outcome]]:
    def deco(fn: Callable[[], Outcome]) -> Callable[[], Outcome]:
        cached = functools.cache(fn)
        SCENARIOS[name] = cached
        return cached
    return deco


PAYLOAD = bytes(range(256)) * 3 + b"\x00end"


def conclude(w: World, name: str, *, resend: float | None = None, **extra: Any) -> Outcome:
    """After the punch: if A found a path, the handshake and PAYLOAD go over it; if not, both
    attempts run out and they go through the relay."""
    if w.pa.path is not None:
        ok = w.handshake_and_send(PAYLOAD, resend=resend)
        return Outcome(w, row(w, name, True, punched_path(w), ok,
                              first_message(w) if ok else None), extra)
    w.finish_punch()
    ok = w.relay_fallback(PAYLOAD)
    return Outcome(w, row(w, name, False, "relayed", ok, first_message(w) if ok else None),
                   extra)


def simple(name: str, nat_a: dict[str, Any] | None, nat_b: dict[str, Any] | None,
           **world: Any) -> Outcome:
    w = make_world(nat_a, nat_b, **world)
    w.probe()
    w.punch()
    return conclude(w, name)


@scenario("1")
def s1_cone_cone() -> Outcome:
    return simple("1 cone <-> cone", CONE, CONE)


@scenario("1b")
def s1b_cone_cone_lossy() -> Outcome:
    # four hops each way: about 34 % of the datagrams are lost end to end; the payload is
    # sent again every 0.5 s until it arrives (UDP data is not retransmitted)
    w = make_world(CONE, CONE, loss=0.10, seed=5)
    w.probe()
    w.punch()
    return conclude(w, "1b cone <-> cone, 10 % loss per hop", resend=0.5)


def _linux(skew: float, low_ttl: int | None) -> Outcome:
    linux = dict(CONE, linux_conflict=True)
    w = make_world(linux, linux)
    w.probe()
    w.punch(skew=skew, low_ttl=low_ttl)
    return conclude(w, f"2 cone+linux <-> cone+linux, low_ttl={low_ttl}, "
                       f"B {int(skew * 1000)} ms late")


@scenario("2a")
def s2a_linux_low_ttl() -> Outcome:
    return _linux(0.05, 2)


@scenario("2b")
def s2b_linux_no_low_ttl_unlucky() -> Outcome:
    return _linux(0.05, None)


@scenario("2c")
def s2c_linux_no_low_ttl_simultaneous() -> Outcome:
    return _linux(0.0, None)


@scenario("2d")
def s2d_linux_low_ttl_too_late() -> Outcome:
    return _linux(0.3, 2)


@scenario("3")
def s3_full_cone_symmetric() -> Outcome:
    return simple("3 full cone <-> symmetric", FULL_CONE, SYMMETRIC)


@scenario("4")
def s4_cone_symmetric() -> Outcome:
    return simple("4 cone <-> symmetric", CONE, SYMMETRIC)


@scenario("4b")
def s4b_restricted_cone_symmetric() -> Outcome:
    return simple("4b restricted cone <-> symmetric", RESTRICTED_CONE, SYMMETRIC)


@scenario("5")
def s5_symmetric_symmetric() -> Outcome:
    return simple("5 symmetric <-> symmetric", SYMMETRIC, SYMMETRIC)


@scenario("6")
def s6_udp_blocked() -> Outcome:
    w = make_world(dict(CONE, block_udp=True), CONE)
    w.probe()   # A's PROBEs are never answered: A knows it has no UDP path
    pa, pb = w.peers["a"], w.peers["b"]
    # with no mapping of A's there is nothing to punch: the rendezvous answers A's CONNECT
    # with a relay-only PUNCH (B's endpoint id, B's candidates) and tells B nothing; B's
    # CONNECT toward A likewise gets a PUNCH without candidates
    pa.connect("b.test")
    pb.connect("a.test")
    w.net.run_for(1.0)
    errors = ([(e.code, e.text) for e in pa.errors], [(e.code, e.text) for e in pb.errors])
    assert pa.punch_frame is not None and pb.punch_frame is not None
    w.t_punch = w.net.now
    ok = w.handshake_and_send(PAYLOAD, via=wire.RelayAddress(
        "b.test", pa.punch_frame.peer_endpoint))
    return Outcome(w, row(w, "6 UDP blocked on A", False, "relayed", ok,
                          first_message(w) if ok else None),
                   dict(errors=errors, frames=(pa.punch_frame, pb.punch_frame)))


HAS_UDP_KEEPALIVE = hasattr(Settings(), "udp_keepalive_interval")


def _keepalive(interval: float) -> Outcome:
    # both NATs forget a mapping after 30 s without outbound traffic; after the handshake and
    # A's payload, 120 s of silence from the applications, then B writes to A
    nat = dict(CONE, mapping_timeout=30.0)
    w = make_world(nat, nat, settings=Settings(udp_keepalive_interval=interval))
    w.probe()
    w.punch()
    assert w.handshake_and_send(PAYLOAD)
    w.net.run_for(120.0)
    t0 = w.net.now
    w.b.send("a.test", b"after 120 s of silence")
    got = w.net.run_until(lambda: len(w.a.received) > 0, 2.0)
    name = f"7 mapping timeout 30 s, udp_keepalive_interval={interval:g}, B writes after 120 s"
    path = ("direct, kept open by keepalives" if got else "direct, A's mapping expired")
    return Outcome(w, row(w, name, True, path, got,
                          round(w.a.received[0].time - t0, 3) if got else None), dict(t0=t0))


if HAS_UDP_KEEPALIVE:
    @scenario("7a")
    def s7a_keepalive() -> Outcome:
        return _keepalive(25.0)

    @scenario("7b")
    def s7b_no_keepalive() -> Outcome:
        return _keepalive(0.0)


@scenario("8")
def s8_rebind() -> Outcome:
    return _rebind("8 rebinding (B restricted cone)", RESTRICTED_CONE)


@scenario("8b")
def s8b_rebind_apdf() -> Outcome:
    return _rebind("8b rebinding (B cone APDF)", CONE)


def _rebind(name: str, nat_b: dict[str, Any]) -> Outcome:
    w = make_world(CONE, nat_b)
    w.probe()
    w.punch()
    assert w.handshake_and_send(b"before")
    assert w.nat_a is not None
    old = (A_WAN, w.nat_a.public_port(w.a.addr))
    w.net.run_for(5.0)
    w.nat_a.rebind()
    t0 = w.net.now
    w.a.send("b.test", b"after rebinding")
    got = w.net.run_until(lambda: len(w.b.received) > 1, 2.0)
    new = (A_WAN, w.nat_a.public_port(w.a.addr))
    reply_ok = False
    if got:
        w.b.send("a.test", b"reply to the new port")
        reply_ok = w.net.run_until(lambda: len(w.a.received) > 0, 2.0)
    else:  # B answers where it last saw A: the old port, which NAT A no longer maps
        w.b.send("a.test", b"reply to the old port")
        w.net.run_for(2.0)
    extra = dict(old=old, new=new, got=got, reply_ok=reply_ok)
    r = row(w, name, True,
            f"roamed {fmt(old)} -> {fmt(new)}" if got else f"direct, stuck at {fmt(old)}",
            got and reply_ok, round(w.b.received[1].time - t0, 3) if got else None)
    return Outcome(w, r, extra)


def _cgnat(ttl_a: int, ttl_b: int) -> Outcome:
    # B's PUNCH arrives 50 ms before A's; A's home NAT is behind a Linux CGNAT
    linux = dict(CONE, linux_conflict=True)
    w = make_world(CONE, linux, cgnat_a=linux)
    w.probe()
    w.punch(skew=-0.05, a_kw=dict(low_ttl=ttl_a), b_kw=dict(low_ttl=ttl_b))
    return conclude(w, f"9 cone behind CGNAT+linux <-> cone+linux, low_ttl A={ttl_a} "
                       f"B={ttl_b}, A 50 ms late")


@scenario("9a")
def s9a_cgnat_low_ttl_2() -> Outcome:
    return _cgnat(2, 2)


@scenario("9b")
def s9b_cgnat_low_ttl_3() -> Outcome:
    return _cgnat(3, 3)


@scenario("9c")
def s9c_cgnat_low_ttl_per_side() -> Outcome:
    return _cgnat(3, 2)


def _stale(ports: str) -> Outcome:
    # B's NAT forgets a mapping after 20 s (RFC 4787 REQ-5 asks for 2 min; many NATs use less);
    # B's last PROBE was 22 s before A's CONNECT, so the PUNCH names a mapping that is gone
    w = make_world(CONE, dict(mapping=EI, filtering=APD, ports=ports, mapping_timeout=20.0))
    w.probe()
    stale = w.probes["b"].mapping
    w.net.run_for(22.0)
    w.punch()
    return conclude(w, f"10 stale mapping: B's NAT {ports} ports, 20 s timeout, PROBE 22 s old",
                    stale=stale)


@scenario("10a")
def s10a_stale_mapping_random_ports() -> Outcome:
    return _stale(RANDOM)


@scenario("10b")
def s10b_stale_mapping_preserved_port() -> Outcome:
    return _stale(PRESERVE)


@scenario("11")
def s11_same_nat() -> Outcome:
    # both behind one NAT that does not hairpin: only the local candidates can work
    w = make_world(CONE, None, same_nat=True)
    w.probe()
    w.punch()
    return conclude(w, "11 both behind one NAT (no hairpinning)")


# -- assertions ---------------------------------------------------------------------------------

def _drops(w: World, node: str, reason: str, kind: int | None = None,
           src: Any = None) -> list[Any]:
    return [d for d in w.net.drops_at(node, reason)
            if (kind is None or d.packet.payload[:1] == bytes((kind,)))
            and (src is None or d.packet.src == src)]


def test_1_cone_cone_punch_then_handshake_and_data() -> None:
    o = s1_cone_cone()
    w = o.world
    # both NATs preserve the port and map endpoint-independently: the server saw the ports the
    # peers bound, and each side's path is the other's public mapping exactly
    assert w.probes["a"].observed == {a: (A_WAN, A_PORT) for a in w.relay.probe_addrs}
    assert w.probes["b"].observed == {a: (B_WAN, B_PORT) for a in w.relay.probe_addrs}
    assert not w.probes["a"].varies and not w.probes["b"].varies
    assert w.relay.rv.mappings("a.test") == {EP_A: {1: (A_WAN, A_PORT), 2: (A_WAN, A_PORT)}}
    # the rendezvous' PUNCH: one punch id for both, each told the other's mapping (once: both
    # ports saw the same) and local address, and the other's endpoint
    fa, fb = w.peers["a"].punch_frame, w.peers["b"].punch_frame
    assert fa is not None and fb is not None
    assert fa.punch_id == fb.punch_id and (fa.request, fb.request) == (1, 0)
    assert (fa.peer_id, fa.endpoint, fa.peer_endpoint) == ("b.test", EP_A, EP_B)
    assert (fb.peer_id, fb.endpoint, fb.peer_endpoint) == ("a.test", EP_B, EP_A)
    assert fa.candidates == ((B_WAN, B_PORT), (B_IP, B_PORT))
    assert fb.candidates == ((A_WAN, A_PORT), (A_IP, A_PORT))
    assert w.pb.started == w.pa.started    # equal control-link latencies: PUNCH at once
    assert w.pa.path == (B_WAN, B_PORT) and w.pb.path == (A_WAN, A_PORT)
    assert w.pa.time_to_path is not None and w.pa.time_to_path < 1.0
    # the handshake ran over the punched path: one session each, at the punched addresses
    assert [(e.peer_id, e.addr) for e in w.a.handshakes()] == [("b.test", (B_WAN, B_PORT))]
    assert [(e.peer_id, e.addr) for e in w.b.handshakes()] == [("a.test", (A_WAN, A_PORT))]
    (got,) = w.b.received
    assert got.data == PAYLOAD and got.peer_id == "a.test" and got.addr == (A_WAN, A_PORT)
    assert o.row.punched and o.row.delivered and o.row.first_message is not None and o.row.first_message < 1.0
    # the low-TTL pings (to the public and the LAN candidate) died at the core router, one hop
    # past their own NAT: none reached the peer's NAT
    low = [(d.packet.src, d.packet.dst) for d in w.net.drops_at("core", "TTL expired")
           if d.packet.payload[0] == 0x52]
    assert sorted(low) == sorted([((A_WAN, A_PORT), (B_WAN, B_PORT)), ((A_WAN, A_PORT), (B_IP, B_PORT)),
                                  ((B_WAN, B_PORT), (A_WAN, A_PORT)), ((B_WAN, B_PORT), (A_IP, A_PORT))])
    assert all(p[3] == 2 for p in w.pa.sent[:2]) and all(p[3] is None for p in w.pa.sent[2:])
    assert not _drops(w, "nat-b", "no mapping") and not _drops(w, "nat-a", "no mapping")
    assert w.a.relayed_out == 0 and w.peers["b"].relayed_in == 0   # nothing went by the relay


def test_1b_cone_cone_lossy() -> None:
    o = s1b_cone_cone_lossy()
    w = o.world
    assert sum(d.reason == "lost on the link" for d in w.net.drops) >= 10
    assert o.row.punched and o.row.delivered and w.pa.path == (B_WAN, B_PORT)
    assert w.b.received[0].data == PAYLOAD and w.b.received[0].addr == (A_WAN, A_PORT)


def test_2a_linux_low_ttl_punches() -> None:
    o = s2a_linux_low_ttl()
    w = o.world
    assert o.row.punched and o.row.delivered
    # the ports were kept: the low-TTL ping opened each NAT before the peer's ping arrived
    assert w.pa.path == (B_WAN, B_PORT) and w.pb.path == (A_WAN, A_PORT)
    assert w.b.received[0].data == PAYLOAD and w.b.received[0].addr == (A_WAN, A_PORT)
    assert not w.nat_a.unreplied and not w.nat_b.unreplied  # type: ignore[union-attr]


def test_2b_linux_without_low_ttl_and_unlucky_timing_fails() -> None:
    # A's PUNCH arrives 50 ms before B's. A's first ping (TTL 64, at +200 ms) reaches NAT B at
    # +220 ms, before B has sent anything (its first ping leaves at +250 ms): NAT B records
    # the unreplied flow A_pub -> B_WAN:6000, so B's own flow to A_pub gets another public
    # port. B's pings then come from that port, which NAT A's filter (APDF: A sent only to
    # :6000) does not admit: NAT A records them as an unreplied flow in turn. Each side's
    # later pings refresh the unreplied entries (30 s > the 4 s budget): no path, either side.
    o = s2b_linux_no_low_ttl_unlucky()
    w = o.world
    assert not o.row.punched and w.pa.path is None and w.pb.path is None
    assert_relayed(o)
    assert w.pa.finished and w.pb.finished
    nat_a, nat_b = w.nat_a, w.nat_b
    assert nat_a is not None and nat_b is not None
    b_port = nat_b.public_port(w.b.addr, (A_WAN, A_PORT))
    assert b_port is not None and b_port != B_PORT
    assert set(nat_b.unreplied) == {((A_WAN, A_PORT), B_PORT)}
    assert set(nat_a.unreplied) == {((B_WAN, b_port), A_PORT)}
    # every ping of A was eaten by NAT B, every ping of B by NAT A: nothing reached the hosts
    assert not any(d.packet.payload[0] == 0x52 and d.node in ("a", "b") for d in w.net.drops)
    assert _drops(w, "nat-b", "unreplied", 0x52, (A_WAN, A_PORT))
    assert _drops(w, "nat-a", "unreplied", 0x52, (B_WAN, b_port))


def test_2c_linux_without_low_ttl_simultaneous_punches() -> None:
    # the same NATs, both PUNCHes at once: each NAT has the outbound flow before the peer's
    # ping arrives, so the plain simultaneous send works when the timing is lucky
    o = s2c_linux_no_low_ttl_simultaneous()
    assert o.row.punched and o.row.delivered and o.world.pa.path == (B_WAN, B_PORT)


def test_2d_linux_low_ttl_cannot_cover_a_skew_past_sync_delay() -> None:
    # B's PUNCH 300 ms late: A's first full ping (at +200 ms) reaches NAT B before B's low-TTL
    # ping opens it, and the conflict happens as in 2b. sync_delay must cover the skew.
    o = s2d_linux_low_ttl_too_late()
    assert not o.row.punched and o.world.pa.path is None and o.world.pb.path is None
    assert_relayed(o)


def test_3_full_cone_symmetric_via_peer_reflexive_candidate() -> None:
    o = s3_full_cone_symmetric()
    w = o.world
    nat_b = w.nat_b
    assert nat_b is not None
    pb1 = w.probes["b"].mapping
    assert w.probes["b"].varies  # the two server ports saw two different B ports
    assert pb1 is not None and pb1[1] != B_PORT
    b_to_a = nat_b.public_port(w.b.addr, (A_WAN, A_PORT))
    assert b_to_a is not None and b_to_a not in (pb1[1], B_PORT)
    # A learnt B's mapping toward A from B's ping (peer-reflexive) and that is the path;
    # B's path is A's one public mapping
    assert (B_WAN, b_to_a) in w.pa.puncher.candidates
    assert w.pa.path == (B_WAN, b_to_a) and w.pb.path == (A_WAN, A_PORT)
    assert o.row.punched and o.row.delivered
    (got,) = w.b.received
    assert got.data == PAYLOAD and got.addr == (A_WAN, A_PORT) and got.peer_id == "a.test"
    # A's pings to B's server-side mapping never got in
    assert _drops(w, "nat-b", "filtered", 0x52, (A_WAN, A_PORT))


def test_4_cone_symmetric_fails_to_punch() -> None:
    o = s4_cone_symmetric()
    w = o.world
    assert not o.row.punched and w.pa.path is None and w.pb.path is None
    assert_relayed(o)
    assert w.pa.finished and w.pb.finished
    nat_b = w.nat_b
    assert nat_b is not None
    b_to_a = nat_b.public_port(w.b.addr, (A_WAN, A_PORT))
    # B's pings come from its mapping toward A, which A's NAT (APDF) does not admit; A's go to
    # B's mapping toward the server, which B's NAT does not admit
    assert len(_drops(w, "nat-a", "filtered", 0x52, (B_WAN, b_to_a))) >= 15
    assert len(_drops(w, "nat-b", "filtered", 0x52, (A_WAN, A_PORT))) >= 15
    assert w.a.unhandled_nat == 0 and w.b.unhandled_nat == 0
    assert not any(e[2] == "received" and e[3].payload[0] in (0x52, 0x53) for e in w.net.trace
                   if e[1] in ("a", "b"))
    assert_relayed(o)


def assert_relayed(o: Outcome) -> None:
    """The handshake ran and PAYLOAD arrived through the relay, attributed to A by its session
    keys, at A's relay address; nothing of it went over UDP between the peers."""
    w = o.world
    assert not o.row.punched and o.row.delivered and o.row.path.startswith("relayed")
    assert [(e.peer_id, e.addr) for e in w.a.handshakes()] == [
        ("b.test", wire.RelayAddress("b.test", EP_B))]
    assert [(e.peer_id, e.addr) for e in w.b.handshakes()] == [
        ("a.test", wire.RelayAddress("a.test", EP_A))]
    (got,) = w.b.received
    assert got.data == PAYLOAD and got.peer_id == "a.test"
    assert got.addr == wire.RelayAddress("a.test", EP_A)
    # INIT, FINISHED, DATA (at least) one way; RESP (and a KEEPALIVE) back
    assert w.a.relayed_out >= 3 and w.b.relayed_out >= 1
    assert w.relay.rv.counters["dgrams_relayed"] == w.a.relayed_out + w.b.relayed_out
    assert not any(e[1] in ("a", "b") and e[2] == "received" and e[3].payload[0] <= 0x06
                   for e in w.net.trace)


def test_4b_restricted_cone_symmetric_punches() -> None:
    # address-dependent filtering on A's side admits B's new port: the peer-reflexive
    # candidate works as in scenario 3
    o = s4b_restricted_cone_symmetric()
    assert o.row.punched and o.row.delivered
    w = o.world
    assert w.nat_b is not None
    assert w.pa.path == (B_WAN, w.nat_b.public_port(w.b.addr, (A_WAN, A_PORT)))


def test_5_symmetric_symmetric_fails_to_punch() -> None:
    o = s5_symmetric_symmetric()
    w = o.world
    assert not o.row.punched and w.pa.path is None and w.pb.path is None
    assert_relayed(o)
    assert w.probes["a"].varies and w.probes["b"].varies
    # every ping was dropped at the other side's NAT
    for d in w.net.drops:
        if d.packet.payload[:1] == b"\x52" and d.node.startswith("nat-"):
            assert d.reason in ("filtered", "no mapping")
    assert not any(e[1] in ("a", "b") and e[2] == "received" and e[3].payload[0] == 0x52
                   for e in w.net.trace)


def test_6_udp_blocked_on_a() -> None:
    o = s6_udp_blocked()
    w = o.world
    pa = w.probes["a"]
    assert pa.no_udp and pa.mapping is None and pa.sent == 6  # 3 tries x 2 relay ports
    assert w.probes["b"].mapping == (B_WAN, B_PORT)
    assert w.relay.rv.mappings("a.test") == {} and w.relay.rv.counters["probes_answered"] == 2
    assert len(_drops(w, "nat-a", "UDP blocked")) == pa.sent  # no pings tried
    assert o.extra["errors"] == ([], [])
    to_a, to_b = o.extra["frames"]
    assert to_a.peer_endpoint == EP_B and to_a.candidates[0] == (B_WAN, B_PORT)
    assert to_b.candidates == ()
    assert w.relay.rv.counters["relay_only"] == 2 and w.relay.rv.counters["punches"] == 0
    assert w.punchers == {}
    assert_relayed(o)


def test_9a_cgnat_low_ttl_2_dies_before_the_outer_nat() -> None:
    # TTL 2 leaves the home NAT with TTL 1 and dies in the CGNAT before its postrouting: the
    # CGNAT gets no mapping toward B, B's first full ping reaches the CGNAT first and is
    # recorded as an unreplied flow, and A's flow toward B then gets another CGNAT port
    o = s9a_cgnat_low_ttl_2()
    w = o.world
    assert not o.row.punched and w.pa.path is None and w.pb.path is None
    assert_relayed(o)
    low = [d for d in w.net.drops if d.packet.payload[:1] == b"\x52" and d.packet.ttl == 0]
    assert {d.node for d in low if d.packet.src[0] == "192.168.100.2"} == {"cgnat-a"}
    cg = w.net.nodes["cgnat-a"]
    assert set(cg.unreplied) == {((B_WAN, B_PORT), A_PORT)}


def test_9b_cgnat_low_ttl_3_on_both_sides_reaches_the_cgnat() -> None:
    # TTL 3 opens A's CGNAT, but B is behind one NAT only: B's TTL-3 ping leaves NAT B with
    # TTL 2, the core leaves it 1, and it arrives at the CGNAT (a packet for the NAT itself
    # needs TTL >= 1) before A sent anything toward B: the unreplied flow of 2b again
    o = s9b_cgnat_low_ttl_3()
    w = o.world
    assert not o.row.punched and w.pa.path is None
    assert_relayed(o)
    cg = w.net.nodes["cgnat-a"]
    assert ((B_WAN, B_PORT), A_PORT) in cg.unreplied
    first = next(d for d in w.net.drops_at("cgnat-a") if d.packet.src == (B_WAN, B_PORT))
    assert first.packet.payload[0] == 0x52 and first.packet.ttl == 1 and first.reason == "filtered"


def test_9c_cgnat_low_ttl_per_side_punches() -> None:
    # each side's low TTL must reach its outermost NAT and no further: 3 for A, 2 for B
    o = s9c_cgnat_low_ttl_per_side()
    w = o.world
    assert o.row.punched and o.row.delivered and w.pa.path == (B_WAN, B_PORT) and w.pb.path == (A_WAN, A_PORT)
    assert w.b.received[0].data == PAYLOAD and w.b.received[0].addr == (A_WAN, A_PORT)
    cg, nb = w.net.nodes["cgnat-a"], w.net.nodes["nat-b"]
    assert not cg.unreplied and not nb.unreplied


def test_10a_stale_mapping_with_random_ports_is_relayed() -> None:
    # B's low-TTL ping made a new mapping on another random port; A pings the dead one (no
    # mapping at NAT B), B's pings from the new port are filtered by NAT A (A never sent
    # there). A UDP server must PROBE more often than its NAT's timeout (nat_probe_interval)
    o = s10a_stale_mapping_random_ports()
    w = o.world
    stale = o.extra["stale"]
    assert w.nat_b is not None and stale in [(B_WAN, m.ext_port) for m in w.nat_b.expired]
    fresh = w.nat_b.public_port(w.b.addr)
    assert fresh is not None and (B_WAN, fresh) != stale
    assert w.peers["a"].punch_frame is not None and w.peers["a"].punch_frame.candidates[0] == stale
    assert _drops(w, "nat-b", "no mapping", 0x52, (A_WAN, A_PORT))
    assert _drops(w, "nat-a", "filtered", 0x52, (B_WAN, fresh))
    assert not o.row.punched
    assert_relayed(o)


def test_10b_stale_mapping_with_port_preservation_still_punches() -> None:
    # the new mapping gets the same (preserved) port: the stale PUNCH is right by luck
    o = s10b_stale_mapping_preserved_port()
    w = o.world
    assert o.extra["stale"] == (B_WAN, B_PORT)
    assert w.nat_b is not None and [m.ext_port for m in w.nat_b.expired] == [B_PORT]
    assert o.row.punched and o.row.delivered and w.pa.path == (B_WAN, B_PORT)


needs_keepalive = pytest.mark.skipif(not HAS_UDP_KEEPALIVE,
                                     reason="Settings has no udp_keepalive_interval yet")


@needs_keepalive
def test_7a_keepalives_hold_the_mapping_open() -> None:
    o = s7a_keepalive()
    w = o.world
    assert [(r.data, r.peer_id, r.addr) for r in w.a.received] == [
        (b"after 120 s of silence", "b.test", (B_WAN, B_PORT))]
    assert w.nat_a is not None and w.nat_a.expired == []
    assert w.nat_a.public_port(w.a.addr) == A_PORT
    # A's keepalives (sealed type 0x05) went out about every 25 s of the silence
    ka = [e for e in w.net.trace if e[1] == "a" and e[2] == "-> nat-a"
          and e[3].payload[0] == 0x05 and e[0] > o.extra["t0"] - 120.0]
    assert 4 <= len(ka) <= 6


@needs_keepalive
def test_7b_without_keepalives_the_mapping_expires() -> None:
    o = s7b_no_keepalive()
    w = o.world
    assert w.a.received == [] and not o.row.delivered
    assert w.nat_a is not None and [m.ext_port for m in w.nat_a.expired] == [A_PORT]
    (drop,) = _drops(w, "nat-a", "no mapping", 0x04, (B_WAN, B_PORT))
    assert drop.time > o.extra["t0"]
    # nothing left A for B during the silence
    assert not [e for e in w.net.trace if e[1] == "a" and e[2] == "-> nat-a"
                and o.extra["t0"] - 119.0 < e[0] <= o.extra["t0"]]


def test_11_same_nat_punches_over_the_lan() -> None:
    o = s11_same_nat()
    w = o.world
    assert o.row.punched and o.row.delivered
    # the public candidates need hairpinning, which this NAT does not do; the LAN ones answer
    assert w.pa.path == (SAME_LAN_B, B_PORT) and w.pb.path == (A_IP, A_PORT)
    assert _drops(w, "nat-a", "hairpin", 0x52)
    (got,) = w.b.received
    assert got.data == PAYLOAD and got.addr == (A_IP, A_PORT) and got.peer_id == "a.test"
    # even the low-TTL ping gets there: a LAN is switched, not routed
    assert o.row.first_message is not None and o.row.first_message < 0.2


def test_8_rebinding_roams_the_session() -> None:
    o = s8_rebind()
    w, x = o.world, o.extra
    assert x["old"] == (A_WAN, A_PORT) and x["new"][0] == A_WAN and x["new"] != x["old"]
    assert x["got"] and x["reply_ok"]
    after = w.b.received[1]
    assert after.data == b"after rebinding" and after.peer_id == "a.test"
    assert after.addr == x["new"]
    s = w.b.ep.session_for_peer("a.test")
    assert s is not None and s.addr == x["new"]
    assert [(r.data, r.peer_id, r.addr) for r in w.a.received] == [
        (b"reply to the new port", "b.test", (B_WAN, B_PORT))]


def test_8b_rebinding_behind_a_port_restricted_peer_is_stuck() -> None:
    # NAT B admits only the A address:port its host sent to: the datagram from A's new port is
    # dropped there, B's reply to the old port is dropped by NAT A (no mapping): the session
    # needs a new punch (or the relay)
    o = s8b_rebind_apdf()
    w, x = o.world, o.extra
    assert not x["got"] and o.row.punched and not o.row.delivered
    assert [r.data for r in w.b.received] == [b"before"]
    assert _drops(w, "nat-b", "filtered", 0x04, x["new"])
    assert _drops(w, "nat-a", "no mapping", 0x04, (B_WAN, B_PORT))
    assert w.a.received == []


# -- the emulator itself ---------------------------------------------------------------------------

S1, S2 = "203.0.113.10", "203.0.113.20"


def lan_world(**nat: Any) -> tuple[Network, Nat, Any, dict[Addr, Any]]:
    """One host behind one NAT, two public servers with two ports each (raw sockets that
    collect what they get)."""
    net = Network(seed=3)
    n = net.add_nat("nat", A_WAN, "192.168.1.0/24", **nat)
    h = net.add_host("h", A_IP, behind=n).bind(A_PORT)
    servers: dict[Addr, Any] = {}
    for ip in (S1, S2):
        host = net.add_host(ip, ip)
        for port in (1000, 2000):
            servers[(ip, port)] = host.bind(port)
    return net, n, h, servers


@pytest.mark.parametrize("mapping, same", [(EI, [True, True]), (AD, [True, False]),
                                           (APD, [False, False])])
def test_emulator_mapping(mapping: str, same: list[bool]) -> None:
    net, _, h, srv = lan_world(mapping=mapping, ports=RANDOM)
    for dst in [(S1, 1000), (S1, 2000), (S2, 1000)]:
        h.sendto(b"x", dst)
    net.run_for(1.0)
    ports = [srv[d].received[0][2] for d in [(S1, 1000), (S1, 2000), (S2, 1000)]]
    assert all(p[0] == A_WAN for p in ports)
    assert [ports[1] == ports[0], ports[2] == ports[0]] == same


@pytest.mark.parametrize("filtering, admitted", [(EI, [True, True, True]),
                                                 (AD, [True, True, False]),
                                                 (APD, [True, False, False])])
def test_emulator_filtering(filtering: str, admitted: list[bool]) -> None:
    net, _, h, srv = lan_world(filtering=filtering)
    h.sendto(b"out", (S1, 1000))
    net.run_for(1.0)
    for i, src in enumerate([(S1, 1000), (S1, 2000), (S2, 1000)]):
        srv[src].sendto(bytes([i]), (A_WAN, A_PORT))
    net.run_for(1.0)
    got = [d for _, d, _ in h.received]
    assert [bytes([i]) in got for i in range(3)] == admitted


@pytest.mark.parametrize("inbound_refresh", [False, True])
def test_emulator_mapping_timeout(inbound_refresh: bool) -> None:
    net, n, h, srv = lan_world(filtering=EI, mapping_timeout=30.0, inbound_refresh=inbound_refresh)
    s = srv[(S1, 1000)]
    h.sendto(b"out", (S1, 1000))
    net.run_for(20.0)
    s.sendto(b"at 20 s", (A_WAN, A_PORT))
    net.run_for(20.0)
    s.sendto(b"at 40 s", (A_WAN, A_PORT))   # 40 s after the last outbound packet
    net.run_for(1.0)
    assert [d for _, d, _ in h.received] == ([b"at 20 s", b"at 40 s"] if inbound_refresh
                                             else [b"at 20 s"])
    if not inbound_refresh:
        assert [d.reason for d in net.drops_at("nat")] == ["no mapping"]
        assert [m.ext_port for m in n.expired] == [A_PORT]


def test_emulator_ttl() -> None:
    net, n, h, srv = lan_world()
    h.sendto(b"ttl1", (S1, 1000), ttl=1)     # dies in the NAT: no mapping
    net.run_for(1.0)
    assert n.mappings == {} and [d.reason for d in net.drops_at("nat")] == ["TTL expired"]
    h.sendto(b"ttl2", (S1, 1000), ttl=2)     # opens the mapping, dies at the core router
    net.run_for(1.0)
    assert n.public_port(h.addr) == A_PORT and len(net.drops_at("core", "TTL expired")) == 1
    h.sendto(b"ttl3", (S1, 1000), ttl=3)
    net.run_for(1.0)
    assert [(d, src) for _, d, src in srv[(S1, 1000)].received] == [(b"ttl3", (A_WAN, A_PORT))]


def test_emulator_rebind() -> None:
    net, n, h, srv = lan_world()
    h.sendto(b"1", (S1, 1000))
    net.run_for(1.0)
    n.rebind()
    h.sendto(b"2", (S1, 1000))
    net.run_for(1.0)
    (_, _, first), (_, _, second) = srv[(S1, 1000)].received
    assert first == (A_WAN, A_PORT) and second[0] == A_WAN and second[1] != A_PORT
    srv[(S1, 1000)].sendto(b"to the old port", first)
    net.run_for(1.0)
    assert h.received == [] and [d.reason for d in net.drops_at("nat")] == ["no mapping"]


def test_emulator_linux_conflict() -> None:
    net, n, h, srv = lan_world(linux_conflict=True)
    h.sendto(b"register", (S1, 1000))       # the mapping 5000 exists (EIM, APDF)
    net.run_for(1.0)
    srv[(S2, 1000)].sendto(b"early", (A_WAN, A_PORT))   # filtered: an unreplied flow
    net.run_for(1.0)
    assert set(n.unreplied) == {((S2, 1000), A_PORT)}
    h.sendto(b"late", (S2, 1000))           # clashes: this flow gets another port
    h.sendto(b"other", (S2, 2000))          # no clash: the mapping's port
    net.run_for(1.0)
    (_, _, late), = srv[(S2, 1000)].received
    (_, _, other), = srv[(S2, 2000)].received
    assert late[1] != A_PORT and other == (A_WAN, A_PORT)
    srv[(S2, 1000)].sendto(b"to the mapping", (A_WAN, A_PORT))   # eaten by the unreplied flow
    srv[(S2, 1000)].sendto(b"to the flow", late)
    net.run_for(1.0)
    assert [d for _, d, _ in h.received] == [b"to the flow"]
    net.run_for(UNREPLIED_TIMEOUT)
    assert n.public_port(h.addr, (S2, 1000)) == late[1] and not n.unreplied


@pytest.mark.parametrize("nat, varies, no_udp", [(dict(mapping=EI), False, False),
                                                  (dict(mapping=APD, ports=RANDOM), True, False),
                                                  (dict(block_udp=True), False, True)])
def test_emulator_probe_server(nat: dict[str, Any], varies: bool, no_udp: bool) -> None:
    net = Network()
    server = ProbeServer(net.add_host("stun", S1), token=b"t" * 16)
    n = net.add_nat("nat", A_WAN, "192.168.1.0/24", **nat)
    udp = UdpEndpointHost(net.add_host("h", A_IP, behind=n), A_PORT, "a.test", keys()["a.test"],
                          Settings())
    pc = ProbeClient(udp, server.addrs, token=b"t" * 16, endpoint=EP_A)
    assert net.run_until(lambda: pc.done, 5.0)
    assert (pc.varies, pc.no_udp) == (varies, no_udp)
    if not no_udp:
        assert set(pc.observed) == set(server.addrs)
        assert pc.observed[server.addrs[0]] == (A_WAN, n.public_port(udp.addr, server.addrs[0]))
        assert [(port, src, ep) for _, port, src, ep in server.seen] == [
            (a[1], pc.observed[a], EP_A) for a in server.addrs]


@pytest.mark.parametrize("seed", [1, 2])
def test_emulator_loss_is_seeded(seed: int) -> None:
    def run(seed: int) -> list[bytes]:
        net = Network(seed=seed, loss=0.3)
        s = net.add_host("s", S1).bind(1000)
        c = net.add_host("c", S2).bind(1000)
        for i in range(50):
            c.sendto(bytes([i]), s.addr)
        net.run_for(1.0)
        return [d for _, d, _ in s.received]
    got = run(seed)
    assert got == run(seed) and got != run(seed + 10)
    assert 0.3 < len(got) / 50 < 0.7   # two hops of 30 % loss: about 49 % arrive


def test_emulator_run_until_is_bounded() -> None:
    net = Network(max_steps=1000)
    t0 = net.now
    assert net.run_until(lambda: False, 5.0) is False and net.now == t0 + 5.0

    def spin() -> None:
        net.call_later(0.0, spin)
    spin()
    with pytest.raises(RuntimeError):
        net.run_until(net.now + 1.0)


# -- the table ----------------------------------------------------------------------------------

HEADER = ("scenario", "NAT A", "NAT B", "punched", "path of A's data", "delivered",
          "first message")


def format_row(r: Row) -> str:
    first = "-" if r.first_message is None else f"{r.first_message * 1000:.0f} ms"
    return (f"| {r.scenario} | {r.nat_a} | {r.nat_b} | {'yes' if r.punched else 'no'} | "
            f"{r.path} | {'yes' if r.delivered else 'no'} | {first} |")


def matrix_table() -> str:
    """The matrix as a Markdown table (runs the scenarios not yet run; each runs once)."""
    rows = [fn().row for fn in SCENARIOS.values()]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def test_zz_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    table = matrix_table()
    assert len(MATRIX) == len(SCENARIOS)
    with capsys.disabled():
        print("\n" + table)


if __name__ == "__main__":  # PYTHONPATH=.:test python test/test_nat_emulator.py
    print(matrix_table())
