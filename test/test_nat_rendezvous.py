"""p2psc.nat.rendezvous: the relay's sans-IO state on an explicit clock, with recorded
randomness. Links are plain strings here (any hashable object is a link)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from p2psc.nat import wire
from p2psc.nat.rendezvous import (
    ByteBucket,
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
from p2psc.nat.wire import Addr

A, B, C = "alice.test", "bob.test", "carol.test"
EP_A, EP_A2, EP_B = b"epA-0001", b"epA-0002", b"epB-0001"
OBS = {A: Addr("198.51.100.1", 40001), B: Addr("203.0.113.7", 50001),
       C: Addr("192.0.2.9", 60001)}


class Rand:
    """Recorded randomness: call i returns i (4 bytes, big-endian) repeated to n bytes."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        value = (len(self.calls) + 1).to_bytes(4, "big") * (n // 4) + bytes(n % 4)
        self.calls.append(value)
        return value


def make(**limits: Any) -> tuple[Rendezvous, Rand]:
    rand = Rand()
    rv = Rendezvous(RelayLimits(**limits), random=rand)
    rv.udp_ports = (7001, 7002)
    return rv, rand


def frames(actions: list[Any], link: str) -> list[Any]:
    """The frames the actions send to ``link``, decoded (lossy or not)."""
    return [wire.decode_relay_frame(a.data) for a in actions
            if isinstance(a, (SendFrame, SendLossy)) and a.link == link]


def attach(rv: Rendezvous, peer: str, now: float = 0.0, link: str | None = None) -> bytes:
    """Attach ``peer`` on link ``"L:" + peer``; returns its probe token."""
    link = link or f"L:{peer}"
    out = rv.attach(peer, link, OBS[peer], now)
    (welcome,) = frames(out, link)
    assert isinstance(welcome, wire.Welcome)
    return welcome.probe_token


def probe(rv: Rendezvous, token: bytes, ep: bytes, addr: tuple[str, int], index: int = 1,
          now: float = 0.0, txid: bytes = b"txid-001") -> bytes | None:
    return rv.probe(wire.encode_probe(token, ep, txid), addr, index, now)


def send(rv: Rendezvous, peer: str, frame: Any, now: float = 0.0) -> list[Any]:
    return rv.receive(f"L:{peer}", wire.encode(frame), now)


def hello(rv: Rendezvous, peer: str, flags: int = wire.FLAG_TCP | wire.FLAG_UDP,
          ep: bytes = EP_B, local: tuple[Addr, ...] = ()) -> None:
    assert send(rv, peer, wire.Hello(flags, ep, local)) == []


def error_of(actions: list[Any], link: str) -> tuple[int, int]:
    (err,) = frames(actions, link)
    assert isinstance(err, wire.Error)
    return err.request, err.code


def ready_pair(rv: Rendezvous) -> None:
    """A attached with a mapping for EP_A; B attached, serving both, mapped on EP_B."""
    ta = attach(rv, A)
    tb = attach(rv, B)
    hello(rv, B, ep=EP_B, local=(Addr("10.0.0.7", 5000),))
    assert probe(rv, ta, EP_A, ("198.51.100.1", 40002)) is not None
    assert probe(rv, tb, EP_B, ("203.0.113.7", 50002), 1) is not None
    assert probe(rv, tb, EP_B, ("203.0.113.7", 50003), 2) is not None


# -- limits and buckets -------------------------------------------------------------------------

def test_limits_defaults_and_checks() -> None:
    lim = RelayLimits()
    assert (lim.circuits_per_peer, lim.max_circuits, lim.requests_per_sec, lim.request_burst) == (
        8, 1024, 5.0, 20)
    assert (lim.relay_bytes_per_sec, lim.relay_burst_bytes) == (8 << 20, 1 << 20)
    assert (lim.circuit_join_timeout, lim.circuit_idle_timeout) == (10.0, 120.0)
    assert lim.max_dgram_payload == 65507 and lim.dgram_backlog_bytes == 1 << 20
    assert lim.max_endpoints_per_peer == 16
    for bad in ({"circuits_per_peer": 0}, {"requests_per_sec": -1}, {"max_peers": True},
                {"relay_burst_bytes": 1000}, {"max_dgram_payload": 70000,
                                              "relay_burst_bytes": 1 << 20}):
        with pytest.raises(ValueError):
            RelayLimits(**bad)


def test_byte_bucket_take_is_all_or_nothing_and_charge_goes_into_debt() -> None:
    b = ByteBucket(100, 1000, now=0.0)
    assert b.take(1000, 0.0) and not b.take(1, 0.0)
    assert b.take(50, 0.5) and not b.take(1, 0.5)          # 0.5 s refilled 50
    assert b.charge(200, 1.0) == pytest.approx(1.5)        # 50 refilled, 150 in debt: 1.5 s
    assert b.charge(0, 2.5) == 0.0
    assert b.charge(0, 100.0) == 0.0 and b.tokens == 1000  # never more than the burst


# -- attach, replace, detach --------------------------------------------------------------------

def test_attach_welcomes_with_a_fresh_token_the_ports_and_the_observed_address() -> None:
    rv, rand = make()
    out = rv.attach(A, "L:a", OBS[A], 0.0)
    (welcome,) = frames(out, "L:a")
    assert welcome == wire.Welcome(rand.calls[0], 7001, 7002, OBS[A], 65507)
    assert len(welcome.probe_token) == wire.TOKEN_LEN
    assert rv.peer_of("L:a") == A and rv.link_of(A) == "L:a" and rv.attached == 1
    # a second peer gets another token
    assert attach(rv, B) == rand.calls[1] != welcome.probe_token


def test_a_second_link_of_a_peer_replaces_the_first() -> None:
    rv, rand = make()
    old_token = attach(rv, A, link="old")
    assert probe(rv, old_token, EP_A, ("198.51.100.1", 1)) is not None
    out = rv.attach(A, "new", OBS[A], 1.0)
    assert CloseLink("old", "replaced by a newer link of the same peer") in out
    (welcome,) = frames(out, "new")
    assert welcome.probe_token != old_token
    assert rv.link_of(A) == "new" and rv.peer_of("old") is None and rv.attached == 1
    # the old token and mappings are gone; the old link's frames and end change nothing
    assert probe(rv, old_token, EP_A, ("198.51.100.1", 1)) is None
    assert rv.mappings(A) == {}
    assert rv.receive("old", wire.encode(wire.Ping(1)), 1.0) == []
    assert rv.detach("old", 1.0) == []
    assert rv.link_of(A) == "new"
    assert frames(rv.receive("new", wire.encode(wire.Ping(2)), 1.0), "new") == [wire.Pong(2)]
    assert [a for a in rv.detach("new", 2.0) if isinstance(a, Log)]
    assert rv.attached == 0 and rv.link_of(A) is None


def test_attach_beyond_max_peers_is_refused() -> None:
    rv, _ = make(max_peers=1)
    attach(rv, A)
    out = rv.attach(B, "L:b", OBS[B], 0.0)
    assert CloseLink("L:b", "the relay is full") in out
    assert frames(out, "L:b") == [] and rv.link_of(B) is None
    rv.attach(A, "L:a2", OBS[A], 0.0)  # a replacement is not a new peer
    assert rv.link_of(A) == "L:a2"


def test_ping_pong_and_hello() -> None:
    rv, _ = make()
    attach(rv, A)
    out = send(rv, A, wire.Ping(0xDEADBEEF01020304))
    assert out == [SendLossy("L:" + A, wire.encode(wire.Pong(0xDEADBEEF01020304)), A)]
    hello(rv, A, wire.FLAG_UDP | 0x80, EP_A, tuple(Addr(f"10.0.0.{i}", i) for i in range(8)))


# -- malformed frames ---------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"\x00", b"\x05\x00", b"\x81" + bytes(40),
                                  bytes([wire.C_HELLO, 9, 3]) + EP_A + b"\x00",
                                  bytes([wire.C_OPEN]) + bytes(4) + b"\x00",
                                  wire.encode(wire.Ping(1)) + b"x"])
def test_a_malformed_frame_closes_only_its_link(data: bytes) -> None:
    rv, _ = make()
    ready_pair(rv)
    out = rv.receive("L:" + A, data, 1.0)
    closes = [a for a in out if isinstance(a, CloseLink)]
    assert len(closes) == 1 and closes[0].link == "L:" + A and closes[0].abort
    assert any(isinstance(a, Log) and a.level == logging.WARNING for a in out)
    assert rv.counters["bad_frames"] == 1 and rv.link_of(A) is None
    assert rv.receive("L:" + A, wire.encode(wire.Ping(1)), 1.0) == []
    # the other peer is served as before
    assert frames(send(rv, B, wire.Ping(7), 1.0), "L:" + B) == [wire.Pong(7)]


def test_a_frame_over_the_largest_dgram_closes_the_link() -> None:
    rv, _ = make(max_dgram_payload=1000, relay_burst_bytes=1000)
    ready_pair(rv)
    big = wire.encode(wire.Dgram(EP_A, EP_B, B, bytes(rv.limits.max_frame)))
    out = rv.receive("L:" + A, big, 0.0)
    assert [a.link for a in out if isinstance(a, CloseLink)] == ["L:" + A]
    assert frames(out, "L:" + B) == []


# -- probes -------------------------------------------------------------------------------------

def test_probe_reply_is_the_request_size_and_names_the_source() -> None:
    rv, _ = make()
    ta = attach(rv, A)
    req = wire.encode_probe(ta, EP_A, b"12345678")
    reply = rv.probe(req, ("198.51.100.1", 40002), 1, 0.0)
    assert reply is not None and len(reply) == len(req) == wire.PROBE_SIZE
    assert wire.decode_probe_reply(reply) == wire.ProbeReply(b"12345678",
                                                             Addr("198.51.100.1", 40002))
    reply6 = rv.probe(req, ("2001:db8::5", 9, 0, 0), 2, 0.0)
    assert reply6 is not None and len(reply6) == wire.PROBE_SIZE
    assert rv.mappings(A) == {EP_A: {1: Addr("198.51.100.1", 40002), 2: Addr("2001:db8::5", 9)}}
    assert rv.counters["probes_answered"] == 2


def test_a_probe_records_only_for_the_owner_of_its_token() -> None:
    rv, _ = make()
    ta = attach(rv, A)
    tb = attach(rv, B)
    # a probe from A's address and endpoint, with B's token: B's mapping, nothing for A
    assert probe(rv, tb, EP_A, ("198.51.100.1", 40002)) is not None
    assert rv.mappings(A) == {}
    assert rv.mappings(B) == {EP_A: {1: Addr("198.51.100.1", 40002)}}
    assert ta != tb


@pytest.mark.parametrize("mutate", [
    lambda p: p[:-1], lambda p: p + b"\x00", lambda p: bytes([wire.U_PROBE_REPLY]) + p[1:],
    lambda p: p[:1] + bytes(16) + p[17:], lambda p: b""])
def test_bad_or_unknown_probes_get_no_reply_and_are_counted(mutate: Any) -> None:
    rv, _ = make()
    ta = attach(rv, A)
    data = mutate(wire.encode_probe(ta, EP_A, b"txid-001"))
    assert rv.probe(data, ("198.51.100.1", 1), 1, 0.0) is None
    assert rv.counters["probes_dropped"] == 1 and rv.mappings(A) == {}
    line = rv.probe_log(0.0)
    assert line is not None and "PROBEs dropped: 1 " in line.text
    assert rv.probe_log(1.0) is None  # nothing new


def test_probes_are_rate_limited_per_source_ip_and_in_total() -> None:
    rv, _ = make(probe_rate_per_ip=2.0, probe_burst_per_ip=3, probe_rate_total=1.0,
                 probe_burst_total=5)
    ta = attach(rv, A)
    got = [probe(rv, ta, EP_A, ("198.51.100.1", 1000 + i)) for i in range(4)]
    assert [g is not None for g in got] == [True, True, True, False]  # ports do not matter
    assert rv.counters["probes_dropped: over the rate of its address"] == 1
    assert probe(rv, ta, EP_A, ("198.51.100.1", 1), now=0.5) is not None  # 2/s refills one
    # an IPv6 /64 is one source
    assert [probe(rv, ta, EP_A, (f"2001:db8::{i}", 1)) is not None for i in range(1, 4)] == [
        True, False, False]  # (the total bucket, 5, is spent after the first)
    assert rv.counters["probes_dropped: over the total rate"] == 2
    # unknown tokens do not spend the total bucket; rate drops are logged once per interval
    assert probe(rv, b"\x01" * 16, EP_A, ("192.0.2.1", 1), now=1.5) is None
    assert probe(rv, ta, EP_A, ("192.0.2.2", 1), now=1.5) is not None
    line = rv.probe_log(1.5)
    assert line is not None and "unknown token" in line.text and "total rate" in line.text
    assert probe(rv, b"\x01" * 16, EP_A, ("192.0.2.1", 1), now=2.0) is None
    assert rv.probe_log(2.0) is None and rv.probe_log(11.5) is not None


def test_the_per_ip_probe_table_is_bounded() -> None:
    rv, _ = make(probe_burst_per_ip=1, probe_rate_per_ip=1e-9, max_probe_sources=2)
    ta = attach(rv, A)
    ips = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    for ip in ips:
        assert probe(rv, ta, EP_A, (ip, 1)) is not None
        assert probe(rv, ta, EP_A, (ip, 1)) is None
    assert probe(rv, ta, EP_A, (ips[0], 1)) is not None  # forgotten: a fresh bucket


def test_mappings_per_peer_are_bounded_least_recently_used_first() -> None:
    rv, _ = make(max_endpoints_per_peer=16)
    ta = attach(rv, A)
    eps = [b"ep%06d" % i for i in range(20)]
    for i, ep in enumerate(eps):
        assert probe(rv, ta, ep, ("198.51.100.1", 2000 + i), now=i) is not None
    assert list(rv.mappings(A)) == eps[4:]
    assert probe(rv, ta, eps[4], ("198.51.100.1", 1), now=30.0) is not None  # used: kept
    assert probe(rv, ta, b"epNEW-01", ("198.51.100.1", 1), now=30.0) is not None
    assert eps[4] in rv.mappings(A) and eps[5] not in rv.mappings(A)


def test_probe_port_index_is_1_or_2() -> None:
    rv, _ = make()
    with pytest.raises(ValueError):
        rv.probe(b"", ("192.0.2.1", 1), 3, 0.0)


# -- CONNECT -> PUNCH ---------------------------------------------------------------------------

def test_connect_sends_punch_to_both_sides_at_once() -> None:
    rv, rand = make()
    ready_pair(rv)
    # the requester's own candidates: its mapping, then the local addresses it names
    local = (Addr("10.0.0.1", 4000), Addr("198.51.100.1", 40002))  # (a repeat of its mapping)
    out = send(rv, A, wire.Connect(77, EP_A, local, B), now=1.0)
    punch_id = rand.calls[-1]
    assert len(punch_id) == wire.PUNCH_ID_LEN
    (to_a,) = frames(out, "L:" + A)
    (to_b,) = frames(out, "L:" + B)
    assert to_a == wire.Punch(77, punch_id, EP_A, EP_B,
                              (Addr("203.0.113.7", 50002), Addr("203.0.113.7", 50003),
                               Addr("10.0.0.7", 5000)), B)
    assert to_b == wire.Punch(0, punch_id, EP_B, EP_A,
                              (Addr("198.51.100.1", 40002), Addr("10.0.0.1", 4000)), A)
    # each got exactly one frame, and with SendFrame (never dropped)
    assert [type(a) for a in out if not isinstance(a, Log)] == [SendFrame, SendFrame]


def test_punch_candidates_are_deduplicated_and_at_most_max_addrs() -> None:
    rv, _ = make()
    ta = attach(rv, A)
    tb = attach(rv, B)
    many = tuple(Addr(f"10.0.1.{i}", 1) for i in range(8))
    hello(rv, B, ep=EP_B, local=many)
    same = ("203.0.113.7", 50002)
    assert probe(rv, tb, EP_B, same, 1) is not None
    assert probe(rv, tb, EP_B, same, 2) is not None   # an endpoint-independent mapping
    assert probe(rv, ta, EP_A, ("198.51.100.1", 1), 2) is not None  # port 2 alone will do
    out = send(rv, A, wire.Connect(1, EP_A, many, B))
    (to_a,) = frames(out, "L:" + A)
    (to_b,) = frames(out, "L:" + B)
    assert to_a.candidates == (Addr(*same),) + many[:7]
    assert to_b.candidates == (Addr("198.51.100.1", 1),) + many[:7]


def test_connect_refusals() -> None:
    rv, _ = make()
    ta = attach(rv, A)
    attach(rv, C)
    la = "L:" + A

    def connect(req: int, ep: bytes, target: str) -> tuple[int, int]:
        out = send(rv, A, wire.Connect(req, ep, (), target))
        if target != A:
            assert frames(out, "L:" + target) == []  # the target hears nothing of a refusal
        return error_of(out, la)

    assert connect(1, EP_A, A) == (1, wire.E_BAD_REQUEST)
    assert connect(2, EP_A, B) == (2, wire.E_NO_MAPPING)        # no PROBE from EP_A yet
    assert probe(rv, ta, EP_A, ("198.51.100.1", 1)) is not None
    assert connect(3, EP_A2, B) == (3, wire.E_NO_MAPPING)       # another endpoint of A
    assert connect(4, EP_A, B) == (4, wire.E_NOT_CONNECTED)
    tb = attach(rv, B)
    assert connect(5, EP_A, B) == (5, wire.E_NO_UDP)            # no HELLO yet
    hello(rv, B, wire.FLAG_TCP, EP_B)
    assert connect(6, EP_A, B) == (6, wire.E_NO_UDP)            # TCP only
    hello(rv, B, wire.FLAG_UDP, EP_B)
    assert connect(7, EP_A, B) == (7, wire.E_NO_MAPPING)        # B's server never probed
    assert probe(rv, tb, b"other-ep", ("203.0.113.7", 1)) is not None
    assert connect(8, EP_A, B) == (8, wire.E_NO_MAPPING)        # ... not from its server ep
    assert probe(rv, tb, EP_B, ("203.0.113.7", 1)) is not None
    out = send(rv, A, wire.Connect(9, EP_A, (), B))
    assert isinstance(frames(out, la)[0], wire.Punch)
    for code in (wire.E_BAD_REQUEST, wire.E_NO_MAPPING, wire.E_NOT_CONNECTED, wire.E_NO_UDP):
        assert rv.counters[f"refused_{code}"] >= 1


def test_requests_are_rate_limited_per_peer() -> None:
    rv, _ = make(requests_per_sec=5.0, request_burst=20)
    ready_pair(rv)
    la = "L:" + A
    kinds = []
    for i in range(25):
        out = send(rv, A, wire.Connect(i, EP_A, (), B), now=0.0)
        kinds.append(type(frames(out, la)[0]).__name__)
    assert kinds == ["Punch"] * 20 + ["Error"] * 5
    out = send(rv, A, wire.Open(99, B), now=0.0)                 # OPEN shares the bucket
    assert error_of(out, la) == (99, wire.E_RATE_LIMITED)
    assert isinstance(out[0], SendLossy)                         # refusals at rate: lossy
    logs = [a for i in range(10) for a in send(rv, A, wire.Open(i, B), now=0.01)
            if isinstance(a, Log)]
    assert logs == []                                            # ... and logged seldom
    # B's bucket is its own
    assert isinstance(frames(send(rv, B, wire.Open(1, C), now=0.0), "L:" + B)[0], wire.Error)
    assert error_of(send(rv, B, wire.Open(1, C), now=0.0), "L:" + B)[1] == wire.E_NOT_CONNECTED
    # 5/s: one more after 0.2 s
    assert isinstance(frames(send(rv, A, wire.Connect(50, EP_A, (), B), now=0.21), la)[0],
                      wire.Punch)
    assert error_of(send(rv, A, wire.Connect(51, EP_A, (), B), now=0.21), la) == (
        51, wire.E_RATE_LIMITED)


# -- DGRAM --------------------------------------------------------------------------------------

def test_a_relayed_dgram_carries_the_links_authenticated_id() -> None:
    rv, _ = make()
    attach(rv, A)
    attach(rv, B)
    attach(rv, C)
    payload = bytes(range(256)) * 4
    out = send(rv, A, wire.Dgram(EP_A, EP_B, B, payload))
    assert out == [SendLossy("L:" + B, wire.encode(wire.RelayedDgram(EP_A, EP_B, A, payload)),
                             A)]
    # carol sends the same bytes A's agent would: the relay names carol, whatever they say
    forged = wire.encode(wire.Dgram(EP_A, EP_B, B, payload))
    (got,) = frames(rv.receive("L:" + C, forged, 0.0), "L:" + B)
    assert got == wire.RelayedDgram(EP_A, EP_B, C, payload)
    assert rv.counters["dgrams_relayed"] == 2
    assert rv.counters["dgram_bytes_relayed"] == 2 * len(payload)


def test_dgram_drops_are_counted_and_logged_once_per_interval() -> None:
    rv, _ = make(max_dgram_payload=2000, relay_burst_bytes=4000, relay_bytes_per_sec=1000,
                 log_interval=10.0)
    attach(rv, A)
    attach(rv, B)

    def dgram(target: str, n: int, now: float) -> list[Any]:
        return send(rv, A, wire.Dgram(EP_A, EP_B, target, bytes(n)), now)

    assert dgram(B, 2000, 0.0)[0].link == "L:" + B               # at the limit: relayed
    out = dgram(B, 2001, 0.0)
    assert frames(out, "L:" + B) == [] and [type(a) for a in out] == [Log]  # logged at once
    assert dgram(C, 10, 0.1) == []                               # not connected: silent now
    assert dgram(A, 10, 0.2) == []                               # to itself
    assert dgram(B, 2000, 0.3)[0].link == "L:" + B               # 4000 burst, 2000 left ...
    assert dgram(B, 1000, 0.3) == []                             # ... 300 refilled: no
    assert dgram(B, 1000, 1.0) != []                             # 1000 after 1 s
    c = rv.counters
    assert c["dgrams_dropped"] == 4 and c["dgrams_dropped: too large"] == 1
    assert c["dgrams_dropped: target not connected"] == 1
    assert c["dgrams_dropped: addressed to itself"] == 1
    assert c["dgrams_dropped: over the byte rate"] == 1
    (line,) = dgram(C, 1, 10.0)
    assert isinstance(line, Log) and "(4 since the last line)" in line.text
    # the adapter's backlog drops: counted, logged on their own schedule
    assert [type(a) for a in rv.dropped(A, 10.0)] == [Log]
    assert rv.dropped(A, 11.0) == []
    assert rv.counters["dgrams_dropped: target link backlogged"] == 2


# -- OPEN and circuits --------------------------------------------------------------------------

def open_circuit(rv: Rendezvous, req: int = 5, now: float = 0.0) -> tuple[bytes, bytes]:
    out = send(rv, A, wire.Open(req, B), now)
    (circ,) = frames(out, "L:" + A)
    (inc,) = frames(out, "L:" + B)
    assert circ.request == req and inc.source_peer == A
    return circ.token, inc.token


def test_open_sends_circuit_and_incoming_with_two_tokens() -> None:
    rv, rand = make()
    ready_pair(rv)
    out = send(rv, A, wire.Open(31, B), 2.0)
    token_a, token_b = rand.calls[-2], rand.calls[-1]
    assert len(token_a) == len(token_b) == wire.CIRCUIT_TOKEN_LEN and token_a != token_b
    assert frames(out, "L:" + A) == [wire.Circuit(31, token_a)]
    assert frames(out, "L:" + B) == [wire.Incoming(token_b, A)]
    assert rv.circuits == 1 and rv.circuits_of(A) == rv.circuits_of(B) == 1
    assert rv.get_timer() == 12.0


def test_open_refusals() -> None:
    rv, _ = make()
    attach(rv, A)
    la = "L:" + A
    assert error_of(send(rv, A, wire.Open(1, A)), la) == (1, wire.E_BAD_REQUEST)
    assert error_of(send(rv, A, wire.Open(2, B)), la) == (2, wire.E_NOT_CONNECTED)
    attach(rv, B)
    assert error_of(send(rv, A, wire.Open(3, B)), la) == (3, wire.E_NO_TCP)   # no HELLO
    hello(rv, B, wire.FLAG_UDP)
    assert error_of(send(rv, A, wire.Open(4, B)), la) == (4, wire.E_NO_TCP)
    hello(rv, B, wire.FLAG_TCP)
    assert isinstance(frames(send(rv, A, wire.Open(5, B)), la)[0], wire.Circuit)


def test_circuit_limits_per_peer_count_both_ends_and_the_total() -> None:
    rv, _ = make(circuits_per_peer=2, max_circuits=3, request_burst=100)
    for p in (A, B, C):
        attach(rv, p)
        hello(rv, p, wire.FLAG_TCP)
    open_circuit(rv, 1)
    open_circuit(rv, 2)
    la, lc = "L:" + A, "L:" + C
    assert error_of(send(rv, A, wire.Open(3, C)), la) == (3, wire.E_LIMIT)  # A has 2
    assert error_of(send(rv, C, wire.Open(4, B)), lc) == (4, wire.E_LIMIT)  # B (target) has 2
    out = send(rv, C, wire.Open(5, "dave.test"))
    assert error_of(out, lc) == (5, wire.E_NOT_CONNECTED)
    rv.attach("dave.test", "L:dave", Addr("192.0.2.10", 1), 0.0)
    rv.receive("L:dave", wire.encode(wire.Hello(wire.FLAG_TCP, EP_B)), 0.0)
    assert isinstance(frames(send(rv, C, wire.Open(6, "dave.test")), lc)[0], wire.Circuit)
    # three circuits in total: the fourth is refused whoever asks
    rv.attach("erin.test", "L:erin", Addr("192.0.2.11", 1), 0.0)
    out = rv.receive("L:erin", wire.encode(wire.Open(7, "dave.test")), 0.0)
    assert error_of(out, "L:erin") == (7, wire.E_LIMIT)
    assert rv.counters[f"refused_{wire.E_LIMIT}"] == 3


def test_circuit_tokens_join_once_and_splice_the_two_sides() -> None:
    rv, _ = make()
    ready_pair(rv)
    token_a, token_b = open_circuit(rv)
    assert rv.circuit_join(b"\x00" * 32, "x", 1.0) == JoinRefused(
        "unknown or already used circuit token")
    assert rv.circuit_join(token_b, "side-b", 1.0) == JoinWaiting(1)
    assert isinstance(rv.circuit_join(token_b, "again", 1.0), JoinRefused)  # single use
    assert rv.circuit_join(token_a, "side-a", 2.0) == Splice(1, "side-a", "side-b", A, B)
    assert rv.get_timer() is None                                           # not pending
    assert isinstance(rv.circuit_join(token_a, "again", 2.0), JoinRefused)
    assert rv.circuits_of(A) == 1                                           # still counted
    assert [type(a) for a in rv.circuit_closed(1, 3.0)] == [Log]
    assert rv.circuits_of(A) == rv.circuits_of(B) == rv.circuits == 0
    assert rv.circuit_closed(1, 3.0) == []


def test_pending_circuits_expire_and_a_waiting_side_is_closed() -> None:
    rv, _ = make(circuit_join_timeout=10.0)
    ready_pair(rv)
    token_a, token_b = open_circuit(rv, now=5.0)
    assert rv.circuit_join(token_a, "side-a", 6.0) == JoinWaiting(1)
    assert rv.get_timer() == 15.0
    assert rv.handle_timer(14.9) == []
    # a join after the deadline is refused even before the timer ran
    assert rv.circuit_join(token_b, "side-b", 15.0) == JoinRefused("circuit token expired")
    out = rv.handle_timer(15.0)
    assert [a for a in out if isinstance(a, CloseLink)] == [
        CloseLink("side-a", "the other side did not join within 10 s", abort=True)]
    assert rv.circuits == 0 and rv.circuits_of(A) == 0 and rv.get_timer() is None
    assert rv.counters["circuits_expired"] == 1
    # an expired circuit's unused token is void too
    _, tb2 = open_circuit(rv, 6, now=20.0)
    assert rv.handle_timer(30.0) and isinstance(rv.circuit_join(tb2, "late", 30.0), JoinRefused)


def test_a_waiting_side_that_leaves_voids_the_circuit() -> None:
    rv, _ = make()
    ready_pair(rv)
    token_a, token_b = open_circuit(rv)
    assert rv.circuit_join(token_a, "side-a", 1.0) == JoinWaiting(1)
    rv.circuit_closed(1, 2.0)
    assert isinstance(rv.circuit_join(token_b, "side-b", 2.0), JoinRefused)
    assert rv.circuits == 0 and rv.get_timer() is None and rv.handle_timer(100.0) == []


def test_circuits_outlive_the_control_link() -> None:
    rv, _ = make()
    ready_pair(rv)
    token_a, token_b = open_circuit(rv)
    rv.detach("L:" + A, 1.0)
    assert rv.circuit_join(token_a, "sa", 1.0) == JoinWaiting(1)
    assert isinstance(rv.circuit_join(token_b, "sb", 1.0), Splice)


def test_circuit_bytes_are_charged_to_the_sender() -> None:
    rv, _ = make(relay_bytes_per_sec=1 << 20, relay_burst_bytes=1 << 20)
    ready_pair(rv)
    assert rv.charge_relay_bytes(A, 1 << 20, 0.0) == 0.0
    assert rv.charge_relay_bytes(A, 1 << 19, 0.0) == pytest.approx(0.5)
    assert rv.charge_relay_bytes(B, 1 << 20, 0.0) == 0.0       # B's bucket is its own
    # datagrams share the bucket: A is in debt, so its datagram is dropped
    out = send(rv, A, wire.Dgram(EP_A, EP_B, B, b"x"), now=0.1)
    assert frames(out, "L:" + B) == []
    assert rv.counters["circuit_bytes_relayed"] == (1 << 20) * 2 + (1 << 19)
