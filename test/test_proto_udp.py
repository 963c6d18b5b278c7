"""The UDP protocol, sans-IO: two UdpEndpoints exchanging bytes in memory, with a fake clock."""

from __future__ import annotations

import random
from typing import Any, Callable

import pytest

from conftest import rsa_key
from p2psc._proto import rsakeys as keys
from p2psc.config import Settings
from p2psc.p2pexcept import (ChannelNotReady, ConfigError, ConnectionLost, HandshakeTimeout,
                             MessageTooLarge)
from p2psc._proto.replay import ReplayWindow
from p2psc._proto.events import Closed, HandshakeComplete, HandshakeFailed, PeerKeyNeeded
from p2psc._proto.ratelimit import InitRateLimiter, TokenBucket
from p2psc._proto.udp_wire import (HDR, HEADER_LEN, T_CLOSE, T_DATA, T_FINISHED, T_INIT,
                                    T_KEEPALIVE, T_RESP, max_payload_limit)
from udp_util import Endpoint as UdpEndpoint

A_ADDR = ("10.0.0.1", 40000)
B_ADDR = ("10.0.0.2", 10098)
WALL = 1_700_000_000.0


class Net:
    """Client endpoint ``a`` (connects to "b.test") and server endpoint ``b``, a fake clock,
    and counters of RSA private-key operations."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **settings: Any):
        self.now = 100.0
        s = Settings(**settings)
        ka, kb = rsa_key("a.test"), rsa_key("b.test")
        pubs = {"a.test": ka.public_key(), "b.test": kb.public_key()}
        self.a = UdpEndpoint("a.test", ka, s, key_lookup=pubs.get, accept_from="b.test",
                             now=self.now, wall_offset=WALL)
        self.b = UdpEndpoint("b.test", kb, s, key_lookup=pubs.get, now=self.now, wall_offset=WALL)
        self.pubs = pubs
        self.rsa_private_ops = 0
        self.rsa_verify_ops = 0
        for name in ("decrypt", "sign"):
            orig = getattr(keys, name)
            monkeypatch.setattr(keys, name, self._counting(orig, "rsa_private_ops"))
        monkeypatch.setattr(keys, "verify", self._counting(keys.verify, "rsa_verify_ops"))

    def _counting(self, fn: Callable[..., Any], counter: str) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            setattr(self, counter, getattr(self, counter) + 1)
            return fn(*a, **kw)
        return wrapper

    def connect(self) -> None:
        self.a.connect("b.test", self.pubs["b.test"], B_ADDR, self.now)

    def a_out(self) -> list[bytes]:
        out = self.a.datagrams_to_send()
        assert all(addr == B_ADDR for _, addr in out)
        return [d for d, _ in out]

    def b_out(self) -> list[tuple[bytes, Any]]:
        return self.b.datagrams_to_send()

    def to_b(self, dgrams: list[bytes], addr: Any = A_ADDR) -> list[bytes]:
        return [p for d in dgrams if (p := self.b.receive(d, addr, self.now)) is not None]

    def to_a(self, dgrams: list[tuple[bytes, Any]]) -> list[bytes]:
        return [p for d, _ in dgrams if (p := self.a.receive(d, B_ADDR, self.now)) is not None]

    def pump(self, rounds: int = 4) -> tuple[list[bytes], list[bytes]]:
        """Deliver everything both ways until quiet; returns the payloads each side got."""
        got_a: list[bytes] = []
        got_b: list[bytes] = []
        for _ in range(rounds):
            got_b += self.to_b(self.a_out())
            got_a += self.to_a(self.b_out())
        return got_a, got_b

    def tick(self, dt: float) -> None:
        self.now += dt
        for ep in (self.a, self.b):
            ep.handle_timer(self.now)

    def established(self) -> None:
        self.connect()
        self.pump()
        assert [type(e) for e in self.a.take_events()] == [HandshakeComplete]
        assert [type(e) for e in self.b.take_events()] == [HandshakeComplete]


def send_a(net: Net, data: bytes) -> bytes:
    r = net.a.send("b.test", data, net.now)
    assert r is not None and r[1] == B_ADDR
    return r[0]


# -- handshake and data ---------------------------------------------------------------------


def test_handshake_and_data_both_ways(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    init = net.a_out()
    assert len(init) == 1 and init[0][0] == T_INIT
    assert net.to_b(init) == []
    (resp, addr), = net.b_out()
    assert resp[0] == T_RESP and addr == A_ADDR
    assert net.to_a([(resp, addr)]) == []
    ev = net.a.take_events()
    assert ev == [HandshakeComplete("b.test", B_ADDR, False)]
    fin = net.a_out()
    assert [d[0] for d in fin] == [T_FINISHED]
    assert net.to_b(fin) == []
    assert net.b.take_events() == [HandshakeComplete("a.test", A_ADDR, False)]
    (ack, _), = net.b_out()
    assert ack[0] == T_KEEPALIVE
    net.to_a([(ack, A_ADDR)])
    assert net.b.session_for_addr(A_ADDR) is not None
    d = send_a(net, b"hello")
    assert d[0] == T_DATA and len(d) == HEADER_LEN + 5 + 16
    assert net.to_b([d]) == [b"hello"]
    r = net.b.send_to_addr(A_ADDR, b"recv:hello", net.now)
    assert net.to_a([r]) == [b"recv:hello"]
    # one RSA signature for INIT, one decryption and one signature for RESP
    assert net.rsa_private_ops == 3
    assert net.b.peer_at(A_ADDR) == "a.test"


def test_queue_before_handshake_is_flushed_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, pending_max_messages=3)
    net.connect()
    for i in range(3):
        assert net.a.send("b.test", b"m%d" % i, net.now) is None
    with pytest.raises(ChannelNotReady):
        net.a.send("b.test", b"too many", net.now)
    _, got_b = net.pump()
    assert got_b == [b"m0", b"m1", b"m2"]


def test_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.established()
    with pytest.raises(MessageTooLarge):
        net.a.send("b.test", bytes(1201), net.now)
    send_a(net, bytes(1200))
    with pytest.raises(ChannelNotReady):
        net.b.send("nobody.test", b"x", net.now)
    with pytest.raises(ChannelNotReady):
        net.b.send_to_addr(("10.9.9.9", 1), b"x", net.now)
    with pytest.raises(ConfigError):
        UdpEndpoint("a.test", rsa_key("a.test"), Settings(udp_max_payload=max_payload_limit() + 1))


# -- attacks: nothing unauthenticated is delivered, garbage costs no RSA ------------------------


def test_replay_bitflip_truncation_unknown_index(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.established()
    d = send_a(net, b"secret payload")
    assert net.to_b([d]) == [b"secret payload"]
    assert net.to_b([d]) == []                      # replay
    d2 = send_a(net, b"second")
    for i in range(len(d2)):                         # every single flipped bit position group
        bad = bytearray(d2)
        bad[i] ^= 1 << (i % 8)
        assert net.to_b([bytes(bad)]) == []
    for n in range(len(d2)):                         # every truncation
        assert net.to_b([d2[:n]]) == []
    bad = bytearray(d2)
    bad[1:5] = b"\x00\x00\x00\x01"                   # unknown receiver index
    assert net.to_b([bytes(bad)]) == []
    assert net.to_b([d2]) == [b"second"]             # the genuine one still opens
    assert net.b.take_events() == []


def test_garbage_costs_no_rsa(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.established()
    ops, verifies = net.rsa_private_ops, net.rsa_verify_ops
    rng = random.Random(7)
    for i in range(3000):
        n = rng.choice([0, 1, 2, 5, 13, 28, 29, 100, 700, 1500, 9000, 70000])
        data = bytearray(rng.randbytes(n))
        if n:
            data[0] = i % 8  # every type byte, including INIT/RESP
        assert net.b.receive(bytes(data), ("10.6.6.6", 1000 + i % 50), net.now) is None
        assert net.a.receive(bytes(data), ("10.6.6.6", 1000 + i % 50), net.now) is None
    assert (net.rsa_private_ops, net.rsa_verify_ops) == (ops, verifies)
    assert net.b.take_events() == [] and net.a.take_events() == []
    assert net.b.datagrams_to_send() == [] and net.a.datagrams_to_send() == []


def test_replayed_handshake_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    init = net.a_out()
    net.to_b(init)
    resp = net.b_out()
    net.to_a(resp)
    fin = net.a_out()
    net.to_b(fin)
    ack = net.b_out()
    net.to_a(ack)
    net.a.take_events(), net.b.take_events()
    ops = net.rsa_private_ops
    # the INIT again: answered from the RESP cache (no RSA), the RESP again: ignored
    net.to_b(init)
    assert net.b_out() == resp
    assert net.to_a(resp) == [] and net.a_out() == []
    assert net.to_b(fin) == [] and net.b_out() == []   # FINISHED replay: dropped
    assert net.rsa_private_ops == ops
    assert net.a.take_events() == [] and net.b.take_events() == []
    # after the RESP cache entry expired, the same INIT is a replay (refused by the cache)
    net.now += 20
    net.to_b(init)
    assert net.b_out() == []
    assert len(net.b.sessions) == 1


# -- loss -----------------------------------------------------------------------------------


def test_init_retransmitted_with_backoff_then_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    first = net.a_out()
    sent_at = [net.now]
    start = net.now
    events: list[Any] = []
    while net.now - start < 16:
        net.tick(0.25)
        out = net.a_out()
        if out:
            assert out == first   # the same INIT: no new RSA signature
            sent_at.append(net.now)
        events += net.a.take_events()
    assert [t - start for t in sent_at] == [0, 1, 3, 7]
    assert len(events) == 1 and isinstance(events[0], HandshakeFailed)
    assert isinstance(events[0].error, HandshakeTimeout) and not events[0].rekey
    assert net.a.sessions == {}


def test_first_two_inits_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    net.a_out()
    net.tick(1.0)
    assert len(net.a_out()) == 1   # lost too
    net.tick(2.0)
    net.pump()
    assert [type(e) for e in net.a.take_events()] == [HandshakeComplete]
    assert [type(e) for e in net.b.take_events()] == [HandshakeComplete]


def test_lost_resp_answered_from_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    net.to_b(net.a_out())
    net.b_out()  # RESP lost
    ops = net.rsa_private_ops
    net.tick(1.0)
    net.pump()
    assert net.rsa_private_ops == ops   # no second RSA operation on the responder
    assert [type(e) for e in net.b.take_events()] == [HandshakeComplete]


def test_lost_finished_recovered_by_data(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    net.to_b(net.a_out())
    net.to_a(net.b_out())
    net.a_out()  # FINISHED lost
    assert net.to_b([send_a(net, b"first")]) == [b"first"]
    assert net.b.take_events() == [HandshakeComplete("a.test", A_ADDR, False)]


def test_lost_finished_retransmitted_until_acknowledged(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.connect()
    net.to_b(net.a_out())
    net.to_a(net.b_out())
    net.a_out()  # FINISHED lost
    net.tick(1.0)
    fin = net.a_out()
    assert [d[0] for d in fin] == [T_FINISHED]
    net.to_b(fin)
    assert [type(e) for e in net.b.take_events()] == [HandshakeComplete]
    net.to_a(net.b_out())  # KEEPALIVE: the initiator stops retransmitting
    for _ in range(20):
        net.tick(1.0)
        assert net.a_out() == []
    # the responder can now talk first
    r = net.b.send("a.test", b"server first", net.now)
    assert r is not None and net.to_a([r]) == [b"server first"]


# -- rekey, idle, close, roaming ------------------------------------------------------------


def test_rekey_after_messages_with_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, rekey_after_messages=10, udp_rekey_grace=5.0)
    net.established()
    old_a = net.a.session_for_peer("b.test")
    in_flight = [send_a(net, b"m%d" % i) for i in range(12)]  # the 11th starts a rekey
    assert net.a.session_for_peer("b.test") is old_a
    assert net.to_b(in_flight) == [b"m%d" % i for i in range(12)]
    net.pump()
    new_a = net.a.session_for_peer("b.test")
    assert new_a is not old_a and old_a is not None and old_a.retired
    assert net.a.take_events() == [HandshakeComplete("b.test", B_ADDR, True)]
    assert net.b.take_events() == [HandshakeComplete("a.test", A_ADDR, True)]
    # datagrams sealed by the old session still open during the grace period
    late = net.b._seal(net.b.sessions[old_a.remote_index], T_DATA, b"late")
    assert net.to_a([(late, A_ADDR)]) == [b"late"]
    net.tick(6.0)
    assert old_a.index not in net.a.sessions and old_a.remote_index not in net.b.sessions
    assert net.to_b([send_a(net, b"after")]) == [b"after"]
    assert len(net.a.sessions) == len(net.b.sessions) == 1


def test_rekey_after_time(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, rekey_after_time=30.0)
    net.established()
    old = net.a.session_for_peer("b.test")
    net.tick(31.0)   # (a keepalive is due at 25 s: sent now, before the rekey's INIT)
    assert net.to_b([send_a(net, b"x")]) == [b"x"]
    assert [d[0] for d in net.a_out()] == [T_KEEPALIVE, T_INIT]


def test_simultaneous_rekeys_are_not_new_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ends start a rekey before either INIT arrives (the responder's later deadline
    passed too, e.g. under load): each side hears of rekeys only, never of a new peer."""
    net = Net(monkeypatch, rekey_after_time=30.0, udp_keepalive_interval=0)  # (INITs counted)
    net.established()
    net.tick(34.0)  # past the initiator's deadline (30 s) and the responder's (33 s)
    in_flight = [send_a(net, b"from a")]
    r = net.b.send("a.test", b"from b", net.now)
    assert r is not None
    init_a, init_b = net.a_out(), net.b_out()
    assert [d[0] for d in init_a] == [T_INIT] and [d[0] for d, _ in init_b] == [T_INIT]
    # the two INITs cross on the wire
    net.to_b(init_a)
    net.to_a(init_b)
    net.pump()
    assert net.to_b(in_flight) == [b"from a"]
    assert net.to_a([r]) == [b"from b"]
    events = net.a.take_events() + net.b.take_events()
    assert events and all(isinstance(e, HandshakeComplete) and e.rekey for e in events)
    assert net.to_b([send_a(net, b"after")]) == [b"after"]


def test_idle_expiry_and_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, udp_session_idle_timeout=60.0)
    net.established()
    net.tick(30.0)
    net.to_b([send_a(net, b"keep")])
    net.tick(40.0)   # b heard from a 40 s ago: alive; a heard nothing for 70 s: expired
    assert [type(e) for e in net.a.take_events()] == [Closed]
    assert net.b.take_events() == [] and len(net.b.sessions) == 1
    net.tick(30.0)
    assert [type(e) for e in net.b.take_events()] == [Closed]
    assert net.a.sessions == {} and net.b.sessions == {}
    # the client knows where its peer is: a send starts a new handshake
    assert net.a.send("b.test", b"again", net.now) is None
    _, got_b = net.pump()
    assert got_b == [b"again"]


def test_timer_heap_compaction_does_not_duplicate_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The heap is compacted (entries of removed sessions dropped) from inside handle_timer
    when a due timer reschedules itself: every live session keeps exactly one timer of each
    kind across expiries (no entry run twice, no chain doubled)."""
    from collections import Counter

    from p2psc._proto.udp import _K_IDLE
    net = Net(monkeypatch, udp_session_idle_timeout=60.0)
    b, s = net.b, Settings(udp_session_idle_timeout=60.0)
    clients = []
    for i in range(40):  # 40 peers (one key): a peer's new session supersedes its older ones
        net.pubs[f"a{i}.test"] = net.pubs["a.test"]  # (b looks keys up in this table)
        c = UdpEndpoint(f"a{i}.test", rsa_key("a.test"), s, key_lookup=net.pubs.get,
                        accept_from="b.test", now=net.now, wall_offset=WALL)
        addr = (f"10.1.0.{i}", 4000)
        c.connect("b.test", net.pubs["b.test"], B_ADDR, net.now)
        for _ in range(3):
            for d, _to in c.datagrams_to_send():
                b.receive(d, addr, net.now)
            for d, _to in b.datagrams_to_send():
                c.receive(d, B_ADDR, net.now)
        clients.append((c, addr))
    assert len(b.sessions) == 40
    live, closed = clients[:3], clients[3:]
    for c, addr in closed:
        c.close_all()
        for d, _to in c.datagrams_to_send():
            b.receive(d, addr, net.now)
    assert len(b.sessions) == 3

    def live_entries() -> Counter[tuple[int, int]]:
        return Counter((t[3].index, t[2]) for t in b._timers
                       if b.sessions.get(t[3].index) is t[3])

    for _round in range(4):
        net.now += 30.0
        for c, addr in live:
            d, _to = c.send("b.test", b"alive", net.now)  # type: ignore[misc]
            assert b.receive(d, addr, net.now) == b"alive"
        b.handle_timer(net.now)
        net.now += 30.0             # the idle timers fire, and reschedule themselves
        b.handle_timer(net.now)
        entries = live_entries()
        assert len(b.sessions) == 3
        assert max(entries.values()) == 1, entries
        assert sum(1 for _idx, kind in entries if kind == _K_IDLE) == 3
        nxt = b.get_timer()
        assert nxt is not None and nxt > net.now   # nothing due left behind


def test_close(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.established()
    net.a.close_all()
    net.to_b(net.a_out())
    assert net.b.take_events() == [Closed(None, "a.test", A_ADDR)]
    assert net.b.sessions == {}


def test_roaming(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.established()
    new_addr = ("10.0.0.99", 5555)
    d = send_a(net, b"from elsewhere")
    assert net.b.receive(d, new_addr, net.now) == b"from elsewhere"
    assert net.b.session_for_addr(A_ADDR) is None
    _, addr = net.b.send("a.test", b"reply", net.now)  # type: ignore[misc]
    assert addr == new_addr
    # a forged datagram from a third address does not move the session
    bad = bytearray(send_a(net, b"x"))
    bad[-1] ^= 1
    assert net.b.receive(bytes(bad), ("10.6.6.6", 1), net.now) is None
    assert net.b.session_for_addr(new_addr) is not None


# -- keepalives ------------------------------------------------------------------------------


def kinds(out: list[tuple[bytes, Any]]) -> list[int]:
    return [d[0] for d, _ in out]


def test_keepalive_after_exactly_the_interval_of_silence_and_never_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)  # the default interval: 25 s
    net.established()
    a, b, t0 = net.a, net.b, net.now
    sa, sb = a.session_for_peer("b.test"), b.session_for_peer("a.test")
    assert sa is not None and sb is not None and sa.remote_index == sb.index
    for ep in (a, b):
        ep.handle_timer(t0 + 15.0)          # the handshake's own timers have all run
        assert ep.datagrams_to_send() == []
        assert ep.get_timer() == t0 + 25.0  # the next deadline is the keepalive
        ep.handle_timer(t0 + 24.999)
        assert ep.datagrams_to_send() == [] and ep.get_timer() == t0 + 25.0
        ep.handle_timer(t0 + 25.0)
        assert ep.get_timer() == t0 + 50.0
    [(ka_a, to)] = a.datagrams_to_send()
    assert to == B_ADDR
    [(ka_b, to)] = b.datagrams_to_send()
    assert to == A_ADDR
    # sealed like the KEEPALIVE that answers FINISHED: the next counter (FINISHED, or that
    # answer, took 0), an empty payload
    assert HDR.unpack_from(ka_a) == (T_KEEPALIVE, sb.index, 1) and len(ka_a) == HEADER_LEN + 16
    assert HDR.unpack_from(ka_b) == (T_KEEPALIVE, sa.index, 1) and len(ka_b) == HEADER_LEN + 16
    # received: nothing for the application, no event, no answer; the peer is alive
    now = t0 + 25.0
    assert b.ep.receive(ka_a, A_ADDR, now) == [] and b.datagrams_to_send() == []
    assert a.ep.receive(ka_b, B_ADDR, now) == [] and a.datagrams_to_send() == []
    assert sa.last_recv == sb.last_recv == now
    assert a.take_events() == [] and b.take_events() == []
    # a replayed keepalive is dropped like any replayed datagram
    assert b.ep.receive(ka_a, A_ADDR, now + 1) == [] and sb.last_recv == now


def test_sending_pushes_the_keepalive_back_receiving_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    net.established()
    a, b, t0 = net.a, net.b, net.now
    a.handle_timer(t0 + 15.0)
    b.handle_timer(t0 + 15.0)
    assert a.get_timer() == b.get_timer() == t0 + 25.0 and not a.timer_dirty
    heap = len(a._timers)
    net.now = t0 + 10.0
    for i in range(100):                    # the per-datagram path: a float stored, no timer
        assert b.receive(send_a(net, b"m%d" % i), A_ADDR, net.now) == b"m%d" % i
    assert len(a._timers) == heap and not a.timer_dirty
    reply = b.send_to_addr(A_ADDR, b"reply", t0 + 20.0)
    assert a.receive(reply[0], B_ADDR, t0 + 20.0) == b"reply"
    for ep in (a, b):
        ep.handle_timer(t0 + 25.0)          # a sent 15 s ago, b 5 s ago: no keepalive
        assert ep.datagrams_to_send() == []
    assert a.get_timer() == t0 + 35.0 and b.get_timer() == t0 + 45.0
    a.handle_timer(t0 + 34.999)
    assert a.datagrams_to_send() == []
    a.handle_timer(t0 + 35.0)
    assert kinds(a.datagrams_to_send()) == [T_KEEPALIVE]
    b.handle_timer(t0 + 44.999)
    assert b.datagrams_to_send() == []      # a's data and keepalive were received, not sent
    b.handle_timer(t0 + 45.0)
    assert kinds(b.datagrams_to_send()) == [T_KEEPALIVE]


def test_finished_and_its_answer_count_as_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """FINISHED resent after the session is established (the initiator) and the KEEPALIVE
    that answers it (the responder) are datagrams to the peer: each pushes the keepalive back."""
    net = Net(monkeypatch)
    a, b, t0 = net.a, net.b, net.now
    net.connect()
    net.to_b(net.a_out())
    net.to_a(net.b_out())
    assert kinds(a.datagrams_to_send()) == [T_FINISHED]  # lost
    assert net.to_b([send_a(net, b"x")]) == [b"x"]      # b is established by the data
    for t in (1.0, 3.0, 7.0):               # a resends FINISHED; b answers each, the last
        net.now = t0 + t                    # answer arrives
        a.handle_timer(net.now)
        assert b.ep.receive(a.datagrams_to_send()[0][0], A_ADDR, net.now) == []
        answer = b.datagrams_to_send()
        assert kinds(answer) == [T_KEEPALIVE]
    net.to_a(answer)
    for ep in (a, b):
        ep.handle_timer(t0 + 31.999)
        assert ep.datagrams_to_send() == [] and ep.get_timer() == t0 + 32.0
        ep.handle_timer(t0 + 32.0)
        assert kinds(ep.datagrams_to_send()) == [T_KEEPALIVE]


def test_the_first_keepalive_is_one_interval_after_the_handshake(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not one interval after INIT or RESP went: the handshake took 4 s here."""
    # (no FINISHED resent; b keeps its half-open session for 60 s)
    net = Net(monkeypatch, udp_handshake_retry=100.0, udp_handshake_timeout=60.0)
    a, b, t0 = net.a, net.b, net.now
    net.connect()
    b.ep.receive(net.a_out()[0], A_ADDR, t0 + 1.0)      # b's session is made at t0 + 1
    (resp, _), = net.b_out()
    a.ep.receive(resp, B_ADDR, t0 + 2.0)                # a's is established at t0 + 2
    fin = net.a_out()                                   # FINISHED lost
    a.handle_timer(t0 + 26.999)
    assert a.datagrams_to_send() == []
    a.handle_timer(t0 + 27.0)
    [(ka, _)] = a.datagrams_to_send()
    # a's keepalive is the first datagram that authenticates at b: it establishes b's session
    assert b.ep.receive(ka, A_ADDR, t0 + 28.0) == [HandshakeComplete("a.test", A_ADDR, False)]
    assert b.datagrams_to_send() == []
    b.handle_timer(t0 + 52.999)
    assert b.datagrams_to_send() == []
    b.handle_timer(t0 + 53.0)
    assert kinds(b.datagrams_to_send()) == [T_KEEPALIVE]
    assert fin and b.ep.receive(fin[0], A_ADDR, t0 + 54.0) == []   # late FINISHED: answered
    assert kinds(b.datagrams_to_send()) == [T_KEEPALIVE]


def test_keepalive_interval_zero_sends_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2psc._proto.udp import _K_KEEPALIVE
    net = Net(monkeypatch, udp_keepalive_interval=0, udp_session_idle_timeout=1000.0)
    net.established()
    a, b, t0 = net.a, net.b, net.now
    for ep in (a, b):
        ep.handle_timer(t0 + 15.0)
        assert all(kind != _K_KEEPALIVE for _, _, kind, _ in ep._timers)
    assert a.get_timer() == t0 + 600.0      # the rekey deadline (the initiator's)
    assert b.get_timer() == t0 + 660.0
    for ep in (a, b):
        ep.handle_timer(t0 + 599.0)
        assert ep.datagrams_to_send() == []


def test_keepalives_hold_live_peers_and_a_silent_peer_still_expires(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, udp_keepalive_interval=10.0, udp_session_idle_timeout=30.0)
    net.established()
    a, b = net.a, net.b
    sa, sb = a.session_for_peer("b.test"), b.session_for_peer("a.test")
    sent = {"a": 0, "b": 0}
    for _ in range(60):                     # 300 s, ten idle timeouts, the applications silent
        net.tick(5.0)
        out_a, out_b = a.datagrams_to_send(), b.datagrams_to_send()
        assert set(kinds(out_a) + kinds(out_b)) <= {T_KEEPALIVE}
        sent["a"] += len(out_a)
        sent["b"] += len(out_b)
        assert net.to_b([d for d, _ in out_a]) == [] and net.to_a(out_b) == []
    assert sent == {"a": 30, "b": 30}       # one every 10 s each: none answers another
    assert a.take_events() == [] and b.take_events() == []
    assert a.session_for_peer("b.test") is sa and b.session_for_peer("a.test") is sb
    # b goes away: a goes on sending its keepalives, which do not count as received
    last = net.now
    assert sa.last_recv == last
    for t in (10.0, 20.0, 29.999):
        a.handle_timer(last + t)
        assert a.take_events() == []
    assert kinds(a.datagrams_to_send()) == [T_KEEPALIVE, T_KEEPALIVE]
    a.handle_timer(last + 30.0)
    [ev] = a.take_events()
    assert type(ev) is Closed and ev.peer_id == "b.test" and type(ev.error) is ConnectionLost
    assert a.sessions == {}


def test_keepalive_roams_on_the_newest_counter_only(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, udp_keepalive_interval=10.0)
    net.established()
    a, b, t0 = net.a, net.b, net.now
    sb = b.session_for_peer("a.test")
    a.handle_timer(t0 + 10.0)
    [(ka1, _)] = a.datagrams_to_send()
    a.handle_timer(t0 + 20.0)
    [(ka2, _)] = a.datagrams_to_send()
    new, other = ("10.0.0.99", 5555), ("10.0.0.77", 7777)
    now = t0 + 20.0
    assert b.ep.receive(ka2, new, now) == []   # the newest: the session moves there
    assert b.session_for_addr(new) is sb and b.session_for_addr(A_ADDR) is None
    assert b.peer_at(new) == "a.test"
    # an older keepalive (delayed, or relayed from elsewhere): accepted, moves nothing
    assert b.ep.receive(ka1, other, now) == [] and b.peer_at(other) is None
    assert b.ep.receive(ka2, other, now) == []  # (a replay: dropped)
    assert b.session_for_addr(new) is sb and b.datagrams_to_send() == []
    _, to = b.send("a.test", b"reply", now)  # type: ignore[misc]
    assert to == new
    b.handle_timer(now + 10.0)              # b's own keepalive goes to the new address too
    assert [(d[0], to) for d, to in b.datagrams_to_send()] == [(T_KEEPALIVE, new)]


def test_no_keepalive_while_handshaking(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, udp_keepalive_interval=10.0, udp_handshake_retry=50.0,
              udp_handshake_timeout=100.0)
    a, b, t0 = net.a, net.b, net.now
    net.connect()
    net.to_b(net.a_out())
    assert kinds(net.b_out()) == [T_RESP]   # lost: a sent INIT, b sent RESP, neither is done
    for t in (10.0, 20.0, 30.0, 40.0):
        for ep in (a, b):
            ep.handle_timer(t0 + t)
            assert ep.datagrams_to_send() == []
    assert a.get_timer() == t0 + 50.0       # the INIT retransmission
    assert b.get_timer() == t0 + 100.0      # the half-open session's end


def test_no_keepalive_from_a_retired_or_closed_session(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, udp_keepalive_interval=10.0, rekey_after_messages=3,
              udp_rekey_grace=60.0)
    net.established()
    a, b, t0 = net.a, net.b, net.now
    old_a, old_b = a.session_for_peer("b.test"), b.session_for_peer("a.test")
    for i in range(3):                      # the third send starts a rekey
        net.to_b([send_a(net, b"m%d" % i)])
    net.pump()
    assert a.take_events() == [HandshakeComplete("b.test", B_ADDR, True)]
    assert b.take_events() == [HandshakeComplete("a.test", A_ADDR, True)]
    new_a, new_b = a.session_for_peer("b.test"), b.session_for_peer("a.test")
    assert new_a is not old_a and new_b is not old_b
    assert old_a is not None and old_b is not None and old_a.retired and old_b.retired
    assert old_a.index in a.sessions and old_b.index in b.sessions   # in their grace period
    assert new_a is not None and new_b is not None
    for ep, new in ((a, new_a), (b, new_b)):
        ep.handle_timer(t0 + 10.0)          # one keepalive, on the new session only
        [(ka, _)] = ep.datagrams_to_send()
        assert HDR.unpack_from(ka)[:2] == (T_KEEPALIVE, new.remote_index)
    a.close_all()                           # CLOSE on both sessions; b forgets them
    closes = a.datagrams_to_send()
    assert kinds(closes) == [T_CLOSE, T_CLOSE]
    net.to_b([d for d, _ in closes])
    assert b.take_events() == [Closed(None, "a.test", A_ADDR)] and b.sessions == {}
    for t in (20.0, 30.0, 40.0):
        a.handle_timer(t0 + t)
        b.handle_timer(t0 + t)
        assert a.datagrams_to_send() == [] and b.datagrams_to_send() == []


# -- rate limits and unknown peers ----------------------------------------------------------


def test_token_bucket() -> None:
    b = TokenBucket(2.0, 3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.4) is False and b.take(0.5) is True
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_init_flood_from_one_address_is_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch, udp_init_rate_per_addr=1.0, udp_init_burst_per_addr=3)
    # a flood of distinct, validly signed INITs (an attacker replaying a known peer's INITs
    # would be cheaper; these all reach the RSA stage but for the limit)
    inits = []
    for _ in range(20):
        ep = UdpEndpoint("a.test", rsa_key("a.test"), Settings(), accept_from="b.test",
                         wall_offset=WALL)
        ep.connect("b.test", net.pubs["b.test"], B_ADDR, net.now)
        inits.append(ep.datagrams_to_send()[0][0])
    ops = net.rsa_private_ops
    flooder = ("10.6.6.6", 6666)
    for d in inits:
        net.b.receive(d, flooder, net.now)
    assert len(net.b_out()) == 3
    assert net.rsa_private_ops - ops == 2 * 3
    # a legitimate peer from another address still gets through
    net.established()


def _forged_init(net: Net) -> bytes:
    """An INIT from "a.test" to "b.test" signed with the wrong key (its signature is the
    last field: changing its last bytes needs no key)."""
    evil = UdpEndpoint("a.test", rsa_key("evil.test"), Settings(), accept_from="b.test",
                       wall_offset=WALL)
    evil.connect("b.test", net.pubs["b.test"], B_ADDR, net.now)
    return evil.datagrams_to_send()[0][0]


def test_forged_init_flood_from_one_ip_many_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 3: an attacker with no key, knowing only a peer id, floods INITs signed with the
    wrong key from one IP, a new source port each time. They cost a few RSA verifications (the
    IP's bucket), no private operation and nothing from the total bucket: a legitimate peer
    from another IP gets its RESP at once."""
    net = Net(monkeypatch)
    base = _forged_init(net)
    ops, verifies = net.rsa_private_ops, net.rsa_verify_ops
    t0 = net.now
    for i in range(1000):                       # 1,000 in one second from 6.6.6.6:1..1000
        net.now = t0 + i / 1000
        d = base[:-4] + i.to_bytes(4, "big")
        assert net.b.receive(d, ("6.6.6.6", i + 1), net.now) is None
    flood_verifies = net.rsa_verify_ops - verifies
    s = Settings()
    assert flood_verifies <= s.udp_init_burst_per_addr + s.udp_init_rate_per_addr * 1.0 + 1
    assert net.rsa_private_ops == ops
    assert net.b_out() == [] and net.b.take_events() == []
    # right after the flood, a legitimate peer from another IP gets its RESP at once
    net.connect()
    net.to_b(net.a_out())
    (resp, addr), = net.b_out()
    assert resp[0] == T_RESP and addr == A_ADDR
    assert net.to_a([(resp, addr)]) == []
    assert [type(e) for e in net.a.take_events()] == [HandshakeComplete]
    # one signature for INIT, one signature and one decryption for RESP
    assert net.rsa_private_ops - ops == 3


def test_resent_forged_init_costs_one_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    d = _forged_init(net)
    ops, verifies = net.rsa_private_ops, net.rsa_verify_ops
    for i in range(1000):   # the same forged INIT, from 1,000 IPs (no IP's bucket runs dry)
        assert net.b.receive(d, (f"7.7.{i // 256}.{i % 256}", 1), net.now) is None
    assert net.rsa_verify_ops - verifies == 1
    assert net.rsa_private_ops == ops and net.b_out() == []
    # remembered until the handshake timeout, then verified (and refused) again
    net.now += Settings().udp_handshake_timeout
    assert net.b.receive(d, ("7.7.7.7", 1), net.now) is None
    assert net.rsa_verify_ops - verifies == 2 and net.b_out() == []
    net.established()


def test_init_rate_limit_is_per_ip_and_ipv6_prefix() -> None:
    lim = InitRateLimiter(1e9, 10 ** 9, 1.0, 1, now=0.0)
    assert lim.allow_addr(("6.6.6.6", 1), 0.0)
    assert not lim.allow_addr(("6.6.6.6", 2), 0.0)            # same IP, other port
    assert not lim.allow_addr(("::ffff:6.6.6.6", 3, 0, 0), 0.0)  # the same IPv4 address
    assert lim.allow_addr(("6.6.6.7", 1), 0.0)
    assert lim.allow_addr(("2001:db8::1", 1, 0, 0), 0.0)
    assert not lim.allow_addr(("2001:db8::ffff:1", 2, 0, 0), 0.0)  # same /64
    assert not lim.allow_addr(("2001:db8::2%eth0", 2, 0, 3), 0.0)
    assert lim.allow_addr(("2001:db8:0:1::1", 1, 0, 0), 0.0)       # another /64
    assert lim.allow_addr("not an address", 0.0)


def test_unknown_peer_key_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    del net.pubs["a.test"]           # b does not know a
    net.connect()
    net.to_b(net.a_out())
    ev = net.b.take_events()
    assert len(ev) == 1 and isinstance(ev[0], PeerKeyNeeded) and ev[0].peer_id == "a.test"
    assert ev[0].addr == A_ADDR  # the INIT's source: the lookup budget is charged to it
    assert net.b_out() == []
    net.b.provide_peer_key(ev[0].token, rsa_key("a.test").public_key(), net.now)
    net.pump()
    assert [type(e) for e in net.b.take_events()] == [HandshakeComplete]
    # refused lookups answer nothing
    net2 = Net(monkeypatch)
    del net2.pubs["a.test"]
    net2.connect()
    net2.to_b(net2.a_out())
    (ev2,) = net2.b.take_events()
    net2.b.provide_peer_key(ev2.token, None, net2.now)  # type: ignore[union-attr]
    assert net2.b_out() == []


def test_client_socket_accepts_init_only_from_its_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    other = UdpEndpoint("b.test", rsa_key("b.test"), Settings(), wall_offset=WALL)
    # an INIT to a.test from c.test (unknown to a, and not its peer)
    c = UdpEndpoint("c.test", rsa_key("c.test"), Settings(), wall_offset=WALL)
    c.connect("a.test", rsa_key("a.test").public_key(), A_ADDR, net.now)
    ops = net.rsa_private_ops
    net.a.receive(c.datagrams_to_send()[0][0], ("10.0.0.3", 1), net.now)
    assert net.a.datagrams_to_send() == [] and net.a.take_events() == []
    assert net.rsa_private_ops == ops
    del other


# -- the replay window ----------------------------------------------------------------------


def test_replay_window_against_a_model() -> None:
    rng = random.Random(42)
    for size in (64, 8192):
        w = ReplayWindow(size)
        seen: set[int] = set()
        top = -1
        counter = 0
        for _ in range(20000):
            r = rng.random()
            if r < 0.6:
                counter += rng.randint(1, 3)
                c = counter
            elif r < 0.9:
                c = max(0, counter - rng.randint(0, size + 20))
            elif r < 0.97:
                c = rng.choice(sorted(seen)[-50:]) if seen else 0
            else:
                counter += rng.randint(size // 2, 3 * size)
                c = counter
            expected = c not in seen and (c > top or top - c < size)
            assert w.check(c) is expected, (size, c, top)
            if expected:
                w.mark(c)
                seen.add(c)
                top = max(top, c)


def test_replay_window_edges() -> None:
    w = ReplayWindow(8192)
    assert w.check(0)
    w.mark(0)
    assert not w.check(0)
    w.mark(2**64 - 1)
    assert not w.check(2**64 - 1) and not w.check(0) and w.check(2**64 - 2)
    assert not w.check(2**64 - 1 - 8192) and w.check(2**64 - 8192)
    w.mark(5)  # outside the window: ignored, and no huge shift
    assert not w.check(5)
    with pytest.raises(ValueError):
        ReplayWindow(100)


def test_one_udp_init_costs_one_rsa_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 ("also"): the responder verifies an INIT's signature once (it did twice: once
    before the rate limit, once again inside the handshake's checks). The initiator verifies
    RESP once; so a whole handshake costs exactly one verification on each side."""
    net = Net(monkeypatch)
    net.connect()
    init = net.a_out()
    before = net.rsa_verify_ops
    assert net.to_b(init) == []
    assert net.rsa_verify_ops - before == 1  # bob: INIT
    before = net.rsa_verify_ops
    net.to_a(net.b_out())
    assert net.rsa_verify_ops - before == 1  # alice: RESP
    net.pump()
    assert [type(e) for e in net.b.take_events()] == [HandshakeComplete]


def test_simultaneous_rekeys_keep_both_directions_after_the_grace_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides rekey at once: each side's two new sessions both live on, so both
    directions still deliver after udp_rekey_grace (found by an adversarial review: the
    supersede rule for reconnects retired the sibling rekey, and both directions went dead)."""
    net = Net(monkeypatch, rekey_after_time=30.0)
    net.established()
    net.tick(34.0)
    send_a(net, b"from a")  # starts a's rekey
    assert net.b.send("a.test", b"from b", net.now) is not None  # starts b's
    init_a, init_b = net.a_out(), net.b_out()
    net.to_b(init_a)
    net.to_a(init_b)
    net.pump()
    for _ in range(2):
        net.tick(6.0)  # past the 10 s grace
        net.pump()
        assert net.to_b([send_a(net, b"a to b")]) == [b"a to b"]
        r = net.b.send("a.test", b"b to a", net.now)
        assert r is not None and net.to_a([r]) == [b"b to a"]


def test_move_peer_sends_there_and_the_peer_follows(monkeypatch: pytest.MonkeyPatch) -> None:
    """This side chose another path (NAT traversal): its session sends there from now on,
    with a keepalive at once, and the peer's session roams to where that keepalive came from."""
    net = Net(monkeypatch)
    net.established()
    a, b = net.a, net.b
    new_b = ("10.0.0.2", 20000)   # b over a punched path (b's public mapping)
    new_a = ("10.0.0.9", 31000)   # where b sees a's datagrams come from on that path
    heard = a.last_heard("b.test")
    assert heard == net.now
    assert a.move_peer("b.test", new_b, net.now + 1) is True
    [(ka, to)] = a.datagrams_to_send()
    assert ka[0] == T_KEEPALIVE and to == new_b
    assert a.peer_at(new_b) == "b.test" and a.peer_at(B_ADDR) is None
    _, to = a.send("b.test", b"next", net.now)  # type: ignore[misc]
    assert to == new_b
    assert b.ep.receive(ka, new_a, net.now) == []   # nothing for the application
    assert b.peer_at(new_a) == "a.test"             # b follows: its newest datagram came there
    _, back = b.send("a.test", b"reply", net.now)   # type: ignore[misc]
    assert back == new_a
    assert a.last_heard("b.test") == heard          # a keepalive of ours is not hearing
    # back to the first address: allowed, it is still b's
    assert a.move_peer("b.test", B_ADDR, net.now) is True
    assert [to for _, to in a.datagrams_to_send()] == [B_ADDR]


def test_move_peer_refuses_without_a_session_or_onto_another_peers_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(monkeypatch)
    a = net.a
    assert a.move_peer("b.test", ("10.0.0.3", 1), net.now) is False   # no session yet
    assert a.last_heard("b.test") is None
    net.connect()
    assert a.move_peer("b.test", ("10.0.0.3", 1), net.now) is False   # still handshaking
    a.datagrams_to_send()
    net.pump()
    # b serves c.test too: c's address cannot be given to a's session with b, on b's side
    kc = rsa_key("c.test")
    net.pubs["c.test"] = kc.public_key()
    c = UdpEndpoint("c.test", kc, Settings(), key_lookup=net.pubs.get, accept_from="b.test",
                    now=net.now, wall_offset=WALL)
    c_addr = ("10.0.0.3", 40000)
    c.connect("b.test", net.pubs["b.test"], B_ADDR, net.now)
    for _ in range(4):
        for d, _ in c.datagrams_to_send():
            net.b.receive(d, c_addr, net.now)
        for d, to in net.b.datagrams_to_send():
            if to == c_addr:
                c.receive(d, B_ADDR, net.now)
    assert net.b.peer_at(c_addr) == "c.test"
    assert net.b.move_peer("a.test", c_addr, net.now) is False
    assert net.b.datagrams_to_send() == [] and net.b.peer_at(c_addr) == "c.test"
    assert net.b.move_peer("nobody", c_addr, net.now) is False


def test_a_keepalive_interval_too_small_to_schedule_is_refused() -> None:
    from p2psc.p2pexcept import ConfigError
    with pytest.raises(ConfigError, match="udp_keepalive_interval must be 0"):
        Settings.from_mapping({"udp_keepalive_interval": 1e-9}, "conf")
    assert Settings.from_mapping({"udp_keepalive_interval": 0}, "conf").udp_keepalive_interval == 0
