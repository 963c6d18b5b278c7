"""p2psc._proto.udp, sans-IO, against the survivors of `make mutation`: every limit at exactly
its value and one past it (payload, sessions in total and per peer, the pre-handshake queue,
the RESP and refused-INIT caches, pending key lookups), the rekey thresholds at exactly
rekey_after_messages and rekey_after_time, retransmission schedules and timeouts to the
microsecond, what a refused or failed handshake reports, what close and expiry clean up,
roaming on control datagrams, the timer interface.

Explicit clock; endpoints exchange datagrams in memory; a few module constants are made
small with monkeypatch so their bounds can be reached cheaply."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from conftest import rsa_key

from p2psc._proto import rsakeys, udp, udp_wire
from p2psc._proto.events import (
    Closed,
    DatagramReceived,
    Event,
    HandshakeComplete,
    HandshakeFailed,
    PeerKeyNeeded,
)
from p2psc._proto.handshake import InitiatorHandshake, Randomness, ResponderHandshake, parse_init
from p2psc._proto.replay import InitReplayCache
from p2psc._proto.settings import Settings
from p2psc._proto.suites import SUITES_BY_NAME
from p2psc._proto.udp import (
    FLAG_REKEY,
    T_CLOSE,
    T_DATA,
    T_FINISHED,
    T_INIT,
    T_KEEPALIVE,
    T_RESP,
    State,
    UdpEndpoint,
    max_payload_limit,
)
from p2psc.p2pexcept import (
    ChannelNotReady,
    ConfigError,
    ConnectionLost,
    HandshakeTimeout,
    MessageTooLarge,
    ProtocolError,
)

WALL = 1_700_000_000.0
T = 100.0
A = ("10.0.0.1", 40000)
A2 = ("10.0.0.2", 40001)
A3 = ("10.0.0.3", 40002)
B = ("10.0.0.9", 10098)
B2 = ("10.0.0.8", 10098)
M = ("10.0.0.66", 40066)
AES = SUITES_BY_NAME["aes-256-gcm"]
PEERS = ("a.test", "b.test", "c.test", "m.test")
_PUBS: dict[str, Any] = {}


def pub(peer: str) -> Any:
    """One public key object per peer (endpoints keep the object they were given)."""
    if peer not in _PUBS:
        _PUBS[peer] = rsa_key(peer).public_key()
    return _PUBS[peer]


def table() -> dict[str, Any]:
    return {p: pub(p) for p in PEERS}


def endpoint(my_id: str, *, now: float = T, accept_from: str | None = None,
             lookup: Any = "table", key: Any = None, wall_offset: float = WALL,
             **settings: Any) -> UdpEndpoint:
    return UdpEndpoint(my_id, key or rsa_key(my_id), Settings(**settings),
                       key_lookup=table().get if lookup == "table" else lookup,
                       accept_from=accept_from, now=now, wall_offset=wall_offset)


def client(my_id: str = "a.test", **kw: Any) -> UdpEndpoint:
    return endpoint(my_id, accept_from="b.test", **kw)


def server(**kw: Any) -> UdpEndpoint:
    return endpoint("b.test", **kw)


def deliver(src: UdpEndpoint, dst: UdpEndpoint, now: float, src_addr: Any,
            to: Any = None) -> list[Event]:
    """Everything ``src`` wants sent, received by ``dst`` from ``src_addr``; returns the events
    (authenticated data included)."""
    events: list[Event] = []
    for d, addr in src.datagrams_to_send():
        if to is not None:
            assert addr == to
        events += dst.receive(d, src_addr, now)
    return events


def handshake(a: UdpEndpoint, b: UdpEndpoint, now: float = T, a_addr: Any = A,
              b_addr: Any = B, peer: str = "b.test") -> tuple[list[Event], list[Event]]:
    """``a`` connects to ``b``; INIT, RESP, FINISHED and KEEPALIVE all arrive at ``now``."""
    a.connect(peer, pub(peer), b_addr, now)
    ev_b = deliver(a, b, now, a_addr, b_addr)
    ev_a = deliver(b, a, now, b_addr, a_addr)
    ev_b += deliver(a, b, now, a_addr, b_addr)
    ev_a += deliver(b, a, now, b_addr, a_addr)
    return ev_a, ev_b


def types(out: list[tuple[bytes, Any]]) -> list[int]:
    return [d[0] for d, _ in out]


def failed(events: list[Event], peer: str, exc_type: type, message: str, rekey: bool) -> None:
    [ev] = events
    assert type(ev) is HandshakeFailed and ev.peer_id == peer and ev.rekey is rekey
    assert type(ev.error) is exc_type and str(ev.error) == message


# -- construction ----------------------------------------------------------------------------


def test_max_payload_limit() -> None:
    assert max_payload_limit() == 65507 - 13 - 32 == 65462
    assert max_payload_limit(16) == 65478


@pytest.mark.parametrize("value,ok", [(0, False), (1, True), (65462, True), (65463, False)])
def test_udp_max_payload_must_fit_one_datagram(value: int, ok: bool) -> None:
    if ok:
        assert server(udp_max_payload=value).max_payload == value
        return
    with pytest.raises(ConfigError) as info:
        server(udp_max_payload=value)
    assert str(info.value) == ("udp_max_payload must be between 1 and 65462 bytes (one UDP "
                               f"datagram), not {value}")


def test_a_stream_only_suite_is_refused_with_the_exact_error() -> None:
    with pytest.raises(ConfigError) as info:
        server(cipher_suite="rc4-hmac-sha256", enable_rc4=True)
    assert str(info.value) == ("cipher_suite rc4-hmac-sha256 needs its records in order: it "
                               "is for TCP only, not UDP")


def test_endpoint_defaults() -> None:
    ep = UdpEndpoint("b.test", rsa_key("b.test"), Settings())
    assert ep.wall_offset == 0.0 and ep.timer_dirty is False and ep.get_timer() is None
    assert ep.max_payload == 1200 and ep.sessions == {} and ep.datagrams_to_send() == []
    # no key_lookup: every initiator is unknown, and its key is asked for
    c = UdpEndpoint("a.test", rsa_key("a.test"), Settings(), accept_from="b.test")
    c.connect("b.test", pub("b.test"), B, 5.0)
    [(init, to)] = c.datagrams_to_send()
    assert to == B and parse_init(init[1:]).timestamp_ms == 5000   # now + wall_offset 0
    [ev] = ep.receive(init, A, 5.0)
    assert type(ev) is PeerKeyNeeded and ev.peer_id == "a.test" and len(ev.token) == 32


def test_a_given_replay_cache_is_the_one_used() -> None:
    cache = InitReplayCache(100, 120.0)
    a = client()
    b = UdpEndpoint("b.test", rsa_key("b.test"), Settings(), key_lookup=table().get,
                    replay_cache=cache, now=T, wall_offset=WALL)
    a.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = a.datagrams_to_send()
    b.receive(init, A, T)
    assert len(cache) == 1 and types(b.datagrams_to_send()) == [T_RESP]
    other = UdpEndpoint("b.test", rsa_key("b.test"), Settings(), key_lookup=table().get,
                        replay_cache=cache, now=T, wall_offset=WALL)
    assert other.receive(init, A, T) == [] and other.datagrams_to_send() == []  # a replay


# -- the timer interface ---------------------------------------------------------------------


def test_get_timer_and_timer_dirty() -> None:
    b = server(udp_handshake_retry=5.0, udp_handshake_timeout=2.0)
    assert b.get_timer() is None and b.timer_dirty is False
    b.connect("c.test", pub("c.test"), ("10.0.0.3", 1), T)
    assert b.timer_dirty is True                 # the first timer
    assert b.get_timer() == T + 5.0
    assert b.timer_dirty is False                # get_timer() clears it
    b.connect("m.test", pub("m.test"), M, T)     # due at the same time: nothing earlier
    assert b.timer_dirty is False and b.get_timer() == T + 5.0
    a = client()
    a.connect("b.test", pub("b.test"), B, T)
    assert a.get_timer() == T + 1.0              # (a single timer)
    b.datagrams_to_send()
    deliver(a, b, T, A)                          # a half-open session: due at T + 2
    assert b.timer_dirty is True
    assert b.get_timer() == T + 2.0 and b.timer_dirty is False
    assert b.handle_timer(T + 1.0) == []
    assert b.timer_dirty is True                 # handle_timer() always sets it


# -- session indexes -------------------------------------------------------------------------


class ScriptedIndexes(Randomness):
    """Session indexes from a script; every other random byte from the system."""

    def __init__(self, indexes: list[int]):
        self.indexes = list(indexes)

    def random(self, n: int) -> bytes:
        if n == 4:
            return self.indexes.pop(0).to_bytes(4, "big")
        return os.urandom(n)


def test_session_indexes_are_never_zero_and_never_taken() -> None:
    b = UdpEndpoint("b.test", rsa_key("b.test"), Settings(), now=T, wall_offset=WALL,
                    randomness=ScriptedIndexes([0, 7, 7, 0x01020304]))
    b.connect("c.test", pub("c.test"), ("10.0.0.3", 1), T)
    b.connect("m.test", pub("m.test"), M, T)
    assert sorted(b.sessions) == [7, 0x01020304]
    inits = [d for d, _ in b.datagrams_to_send()]
    assert [parse_init(d[1:]).ext[:4] for d in inits] == [b"\x00\x00\x00\x07",
                                                           b"\x01\x02\x03\x04"]


# -- limits ----------------------------------------------------------------------------------


def test_udp_max_sessions_exactly() -> None:
    b = server(udp_max_sessions=1)
    b.connect("c.test", pub("c.test"), ("10.0.0.3", 1), T)
    with pytest.raises(ChannelNotReady) as info:
        b.connect("m.test", pub("m.test"), M, T)
    assert str(info.value) == "1 UDP sessions open (udp_max_sessions)"
    b.datagrams_to_send()
    a = client()
    a.connect("b.test", pub("b.test"), B, T)
    assert deliver(a, b, T, A) == [] and b.datagrams_to_send() == []   # INIT dropped: full
    b2 = server(udp_max_sessions=2)
    b2.connect("c.test", pub("c.test"), ("10.0.0.3", 1), T)
    b2.datagrams_to_send()
    a2 = client()
    a2.connect("b.test", pub("b.test"), B, T)
    deliver(a2, b2, T, A)
    assert types(b2.datagrams_to_send()) == [T_RESP]                       # one place left


def test_payload_limit_exactly_for_send_and_send_to_addr() -> None:
    a, b = client(udp_max_payload=100), server(udp_max_payload=100)
    handshake(a, b)
    a.send("b.test", bytes(100), T)
    b.send_to_addr(A, bytes(100), T)
    for call in (lambda: a.send("b.test", bytes(101), T),
                 lambda: b.send_to_addr(A, bytes(101), T)):
        with pytest.raises(MessageTooLarge) as info:
            call()
        assert str(info.value) == ("payload of 101 bytes is over the 100-byte datagram limit "
                                   "(udp_max_payload)")


def test_no_session_errors() -> None:
    b = server()
    with pytest.raises(ChannelNotReady) as info:
        b.send("c.test", b"x", T)
    assert str(info.value) == "no session with c.test"
    with pytest.raises(ChannelNotReady) as info:
        b.send_to_addr(("10.9.9.9", 1), b"x", T)
    assert str(info.value) == "no authenticated session with ('10.9.9.9', 1)"


def test_pre_handshake_queue_bytes_exactly_and_reset_after_each_handshake() -> None:
    a, b = client(pending_max_bytes=10), server()
    a.connect("b.test", pub("b.test"), B, T)
    assert a.send("b.test", b"x" * 6, T) is None
    assert a.send("b.test", b"y" * 4, T) is None          # 10 bytes: exactly the limit
    with pytest.raises(ChannelNotReady) as info:
        a.send("b.test", b"z", T)
    assert str(info.value) == ("the handshake has not completed and the pre-handshake queue "
                               "is full")
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    got = deliver(a, b, T, A)
    assert [e.data for e in got if isinstance(e, DatagramReceived)] == [b"x" * 6, b"y" * 4]
    deliver(b, a, T, B)
    b.close_peer("a.test")                                # a's session ends ...
    assert [type(e) for e in deliver(b, a, T, B)] == [Closed]
    assert a.send("b.test", b"w" * 10, T) is None          # ... and the count starts again
    assert types(a.datagrams_to_send()) == [T_INIT]


def test_a_single_message_of_exactly_pending_max_bytes_is_queued() -> None:
    a = client(pending_max_bytes=10)
    a.connect("b.test", pub("b.test"), B, T)
    assert a.send("b.test", bytes(10), T) is None


# -- the per-peer session cap ----------------------------------------------------------------


def _inits_from(n: int) -> list[bytes]:
    """``n`` INITs from "a.test" (each from a new endpoint: new nonce and index)."""
    out = []
    for _ in range(n):
        c = client()
        c.connect("b.test", pub("b.test"), B, T)
        [(d, _)] = c.datagrams_to_send()
        out.append(d)
    return out


def test_room_for_a_new_session_never_costs_the_latest_established_one() -> None:
    a, b = client(), server(udp_max_sessions_per_peer=2)
    handshake(a, b)
    latest = b.session_for_peer("a.test")
    half, new = _inits_from(2)
    b.receive(half, A2, T)                      # a half-open session: 2 with a.test
    assert types(b.datagrams_to_send()) == [T_RESP] and len(b.sessions) == 2
    b.receive(new, A3, T)                       # room made by dropping the half-open one
    assert types(b.datagrams_to_send()) == [T_RESP] and len(b.sessions) == 2
    assert b.session_for_peer("a.test") is latest and latest.index in b.sessions
    d = a.send("b.test", b"still here", T)
    assert d is not None and b.receive(d[0], A, T)[0].data == b"still here"


def test_a_handshake_replacing_a_session_is_not_dropped_for_room() -> None:
    a, b = client(rekey_after_messages=2), server(udp_max_sessions_per_peer=2)
    handshake(a, b)
    a.send("b.test", b"1", T)
    a.send("b.test", b"2", T)                   # starts a rekey: INIT
    deliver(a, b, T, A)                         # b: a session replacing the latest one
    assert types(b.datagrams_to_send()) == [T_RESP] and len(b.sessions) == 2
    [new] = _inits_from(1)
    assert b.receive(new, A2, T) == []
    assert b.datagrams_to_send() == [] and len(b.sessions) == 2   # no room: refused


def test_making_room_drops_as_many_as_needed() -> None:
    """b started a handshake with a.test itself (not counted against the cap when made), and
    holds two half-open sessions from a.test's INITs: a third INIT needs two dropped."""
    b = server(udp_max_sessions_per_peer=2)
    c1, c2, c3 = client(), client(), client()
    for c, addr in ((c1, A), (c2, A2)):
        c.connect("b.test", pub("b.test"), B, T)
        deliver(c, b, T, addr)
    resps = b.datagrams_to_send()
    b.connect("a.test", pub("a.test"), A, T)
    b.datagrams_to_send()
    assert len(b.sessions) == 3
    c3.connect("b.test", pub("b.test"), B, T)
    deliver(c3, b, T, A3)
    assert types(b.datagrams_to_send()) == [T_RESP]
    assert len(b.sessions) == 2                 # b's own handshake and c3's
    # c2's handshake was dropped: its FINISHED opens nothing
    for d, addr in resps:
        if addr == A2:
            c2.receive(d, B, T)
    assert deliver(c2, b, T, A2) == [] and b.datagrams_to_send() == []


def test_a_retired_session_is_dropped_for_room() -> None:
    b = server(udp_max_sessions_per_peer=2)
    a1, a2 = client(), client()
    handshake(a1, b, a_addr=A)
    _, ev = handshake(a2, b, a_addr=A2)         # a.test reconnected: the first is retired
    assert ev == [HandshakeComplete("a.test", A2, False)]
    [new] = _inits_from(1)
    b.receive(new, A3, T)
    assert types(b.datagrams_to_send()) == [T_RESP]


# -- addresses -------------------------------------------------------------------------------


def test_an_address_held_by_another_peer_is_not_taken_at_establishment() -> None:
    b = server()
    m, a = client("m.test"), client("a.test")
    handshake(m, b, a_addr=M)
    _, ev = handshake(a, b, a_addr=M)           # a.test's handshake from m.test's address
    assert ev == [HandshakeComplete("a.test", M, False)]
    assert b.peer_at(M) == "m.test"
    assert b.session_for_peer("a.test") is not None


def test_a_reconnect_from_another_address_frees_the_old_one_and_keeps_it_for_the_grace() -> None:
    b = server(udp_rekey_grace=10.0)
    a1, a2 = client(), client()
    handshake(a1, b, a_addr=A)
    late = a1.send("b.test", b"late", T)
    assert late is not None
    handshake(a2, b, T + 1, a_addr=A2)
    assert b.peer_at(A) is None and b.session_for_addr(A) is None
    assert b.peer_at(A2) == "a.test"
    assert b.handle_timer(T + 10.5) == []       # the old session decrypts until T + 11
    assert [e.data for e in b.receive(late[0], A, T + 10.5)] == [b"late"]
    b.handle_timer(T + 11.0)
    assert len(b.sessions) == 1


def test_a_retired_session_that_roams_takes_no_address() -> None:
    a, b = client(rekey_after_messages=3), server()
    handshake(a, b)
    d1 = a.send("b.test", b"1", T)
    d2 = a.send("b.test", b"2", T)              # kept back
    a.send("b.test", b"3", T)                   # starts a rekey
    assert d1 is not None and d2 is not None
    b.receive(d1[0], A, T)
    for _ in range(2):
        deliver(a, b, T, A)
        deliver(b, a, T, B)
    assert [type(e) for e in b.receive(d2[0], A2, T)] == [DatagramReceived]  # old session
    assert b.session_for_addr(A2) is None and b.peer_at(A2) is None
    assert b.session_for_addr(A) is b.session_for_peer("a.test")


def test_a_finished_from_a_new_address_moves_the_session_there() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    ev = deliver(a, b, T, A2)                   # FINISHED from another address
    assert ev == [HandshakeComplete("a.test", A, False)]
    [(ack, to)] = b.datagrams_to_send()
    assert ack[0] == T_KEEPALIVE and to == A2
    assert b.peer_at(A2) == "a.test" and b.peer_at(A) is None


def test_roaming_updates_the_known_address_of_a_peer_we_connected_to() -> None:
    a, b = client(), server()
    pb = pub("b.test")
    handshake(a, b)
    d, _ = b.send("a.test", b"moved", T)  # type: ignore[misc]
    assert [e.data for e in a.receive(d, B2, T)] == [b"moved"]
    assert a.known["b.test"] == (pb, B2) and a.known["b.test"][0] is pb


def test_handshaking_is_cleared_once_established() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    assert set(a.handshaking) == {"b.test"}
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    assert a.handshaking == {}


# -- rekey thresholds ------------------------------------------------------------------------


def test_rekey_after_messages_exactly() -> None:
    a, b = client(rekey_after_messages=3), server(rekey_after_messages=3)
    handshake(a, b)                             # FINISHED was datagram 0 of a's session
    a.send("b.test", b"1", T)
    a.send("b.test", b"2", T)
    assert a.datagrams_to_send() == []
    a.send("b.test", b"3", T)                   # 3 sealed: this one starts a rekey
    assert types(a.datagrams_to_send()) == [T_INIT]
    b.send_to_addr(A, b"1", T)                  # (KEEPALIVE was b's datagram 0)
    b.send_to_addr(A, b"2", T)
    assert b.datagrams_to_send() == []
    b.send_to_addr(A, b"3", T)
    assert types(b.datagrams_to_send()) == [T_INIT]


def test_rekey_after_time_exactly_for_each_role() -> None:
    # (no keepalives: the datagrams counted here are the rekey's)
    a = client(rekey_after_time=100.0, udp_keepalive_interval=0)
    b = server(rekey_after_time=100.0, udp_keepalive_interval=0)
    handshake(a, b)
    a.handle_timer(T + 99.5)
    a.send("b.test", b"x", T + 99.5)
    assert a.datagrams_to_send() == []
    a.handle_timer(T + 100.0)                   # the initiator's deadline
    a.send("b.test", b"x", T + 100.0)
    assert types(a.datagrams_to_send()) == [T_INIT]
    b.handle_timer(T + 109.5)                   # the responder's is 10 % later
    b.send("a.test", b"x", T + 109.5)
    b.send_to_addr(A, b"x", T + 109.5)
    assert b.datagrams_to_send() == []
    b.handle_timer(T + 110.0)
    b.send_to_addr(A, b"x", T + 110.0)
    assert types(b.datagrams_to_send()) == [T_INIT]


def test_a_failed_rekey_is_reported_and_tried_again_on_the_next_send() -> None:
    a, b = client(rekey_after_time=50.0, udp_keepalive_interval=0), server()  # (INITs counted)
    handshake(a, b)
    a.handle_timer(T + 50.0)
    a.send("b.test", b"x", T + 50.0)
    assert types(a.datagrams_to_send()) == [T_INIT]        # never answered
    for t in (51.0, 53.0, 57.0):
        assert a.handle_timer(T + t) == []
        assert types(a.datagrams_to_send()) == [T_INIT]
    failed(a.handle_timer(T + 65.0), "b.test", HandshakeTimeout,
           "no answer from b.test at ('10.0.0.9', 10098) within 15 s", True)
    a.send("b.test", b"y", T + 66.0)
    assert types(a.datagrams_to_send()) == [T_INIT]


# -- handshake failures ----------------------------------------------------------------------


def _connect_alone(a: UdpEndpoint) -> int:
    """``a`` connects to b (who never answers); returns a's receiver index."""
    a.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = a.datagrams_to_send()
    return int.from_bytes(parse_init(init[1:]).ext[:4], "big")


def _timeout(a: UdpEndpoint) -> list[Event]:
    """Run a's timers to its handshake timeout (INIT resent at T + 1, 3 and 7)."""
    events: list[Event] = []
    for t in (1.0, 3.0, 7.0, 15.0):
        events += a.handle_timer(T + t)
        assert types(a.datagrams_to_send()) == ([T_INIT] if t < 15 else [])
    return events


def test_handshake_timeout_reports_the_peer_and_drops_its_queue() -> None:
    a, b = client(pending_max_bytes=10), server()
    _connect_alone(a)
    assert a.send("b.test", b"q" * 10, T) is None
    failed(_timeout(a), "b.test", HandshakeTimeout,
           "no answer from b.test at ('10.0.0.9', 10098) within 15 s", False)
    assert a.sessions == {} and a.handshaking == {}
    assert a.send("b.test", b"n" * 10, T + 20) is None   # a new handshake, a new queue
    assert [d[0] for d, _ in a.out] == [T_INIT]
    deliver(a, b, T + 20, A)
    deliver(b, a, T + 20, B)
    got = deliver(a, b, T + 20, A)
    assert [e.data for e in got if isinstance(e, DatagramReceived)] == [b"n" * 10]


def _resp_body_with_ext(a_init: bytes, ext: bytes) -> bytes:
    r = ResponderHandshake("b.test", rsa_key("b.test"), replay_cache=InitReplayCache(),
                           datagrams=True)
    verified = r.verify(r.parse(a_init[1:]), pub("a.test"))
    body, _ = r.respond(verified, T + WALL, ext=ext)
    return body


def test_a_resp_whose_ext_is_not_an_index_is_ignored_and_reported_at_the_timeout() -> None:
    a = client()
    a.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = a.datagrams_to_send()
    idx = int.from_bytes(parse_init(init[1:]).ext[:4], "big")
    resp = struct.pack(">BI", T_RESP, idx) + _resp_body_with_ext(init, bytes(5))
    assert a.receive(resp, B, T) == [] and a.datagrams_to_send() == []
    failed(_timeout(a), "b.test", ProtocolError,
           "RESP ext is not a receiver index (no valid RESP within 15 s)", False)


@pytest.mark.parametrize("size,error,message", [
    (5, HandshakeTimeout, "no answer from b.test at ('10.0.0.9', 10098) within 15 s"),
    (6, ProtocolError, "handshake message truncated (no valid RESP within 15 s)"),
    (udp_wire.MAX_HANDSHAKE_DGRAM, ProtocolError,
     "trailing bytes after handshake message (no valid RESP within 15 s)"),
    (udp_wire.MAX_HANDSHAKE_DGRAM + 1, HandshakeTimeout,
     "no answer from b.test at ('10.0.0.9', 10098) within 15 s"),
])
def test_resp_datagram_length_bounds(size: int, error: type, message: str) -> None:
    a = client()
    idx = _connect_alone(a)
    d = struct.pack(">BI", T_RESP, idx) + bytes(size - 5)
    assert len(d) == size
    assert a.receive(d, B, T) == []
    failed(_timeout(a), "b.test", error, message, False)


def test_init_timeout_tolerates_a_timer_a_microsecond_early() -> None:
    a = client(udp_handshake_timeout=7.000001)  # deadline - 1e-6 is exactly T + 7
    _connect_alone(a)
    assert a.handle_timer(T + 1.0) == [] and a.handle_timer(T + 3.0) == []
    a.datagrams_to_send()
    failed(a.handle_timer(T + 7.0), "b.test", HandshakeTimeout,
           "no answer from b.test at ('10.0.0.9', 10098) within 7 s", False)
    assert a.datagrams_to_send() == []


def test_init_retransmission_stops_at_the_deadline_not_a_second_before() -> None:
    a = client(udp_handshake_timeout=7.5)
    _connect_alone(a)
    for t in (1.0, 3.0, 7.0):                   # 7.0 is 0.5 s before the deadline: resent
        assert a.handle_timer(T + t) == []
        assert types(a.datagrams_to_send()) == [T_INIT]
    assert a.get_timer() == T + 7.5
    failed(a.handle_timer(T + 7.5), "b.test", HandshakeTimeout,
           "no answer from b.test at ('10.0.0.9', 10098) within 7.5 s", False)


def test_finished_retransmission_schedule() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    assert types(a.datagrams_to_send()) == [T_FINISHED]   # lost, and no KEEPALIVE comes
    sent = []
    for t in (0.0, 0.999, 1.0, 2.999, 3.0, 6.999, 7.0, 14.999, 15.0, 31.0):
        a.handle_timer(T + t)
        if types(a.datagrams_to_send()) == [T_FINISHED]:
            sent.append(t)
    assert sent == [1.0, 3.0, 7.0]


# -- caches ----------------------------------------------------------------------------------


def test_the_resp_cache_answers_until_exactly_the_handshake_timeout() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = a.datagrams_to_send()
    b.receive(init, A, T)
    [resp] = b.datagrams_to_send()
    b.receive(init, A, T + 14.999)
    assert b.datagrams_to_send() == [resp]
    b.receive(init, A, T + 15.0)                # expired: now a replay, refused
    assert b.datagrams_to_send() == []


def test_resent_resps_are_charged_to_the_senders_ip() -> None:
    a = client()
    b = server(udp_init_burst_per_addr=2, udp_init_rate_per_addr=0.0)
    a.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = a.datagrams_to_send()
    counts = []
    for _ in range(3):
        b.receive(init, A, T)
        counts.append(len(b.datagrams_to_send()))
    assert counts == [1, 1, 0]


def test_the_resp_cache_keeps_the_newest_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "_RESP_CACHE_SIZE", 2)
    b = server()
    inits = []
    for peer, addr in (("a.test", A), ("c.test", A2), ("m.test", M)):
        c = client(peer)
        c.connect("b.test", pub("b.test"), B, T)
        [(init, _)] = c.datagrams_to_send()
        b.receive(init, addr, T)
        inits.append((init, addr))
    assert len(b.datagrams_to_send()) == 3
    answered = []
    for init, addr in inits:
        b.receive(init, addr, T + 1)
        answered.append(len(b.datagrams_to_send()))
    assert answered == [0, 1, 1]                # the oldest RESP was dropped from the cache


def _count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    orig = rsakeys.verify

    def counting(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return orig(*a, **kw)

    monkeypatch.setattr(rsakeys, "verify", counting)
    return calls


def test_an_init_refused_after_verification_is_not_verified_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_verifications(monkeypatch)
    b = server()
    stale = client(wall_offset=WALL - 1000.0)   # a clock 1,000 s behind: refused as stale
    stale.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = stale.datagrams_to_send()
    for _ in range(3):
        assert b.receive(init, A, T) == []
    assert calls[0] == 1 and b.datagrams_to_send() == [] and b.sessions == {}


def test_the_refused_init_cache_keeps_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "_FAILED_INIT_CACHE_SIZE", 2)
    calls = _count_verifications(monkeypatch)
    b = server()
    forged = []
    for addr in (A, A2, A3):
        evil = client(key=rsa_key("evil.test"))   # signs as a.test with the wrong key
        evil.connect("b.test", pub("b.test"), B, T)
        [(init, _)] = evil.datagrams_to_send()
        b.receive(init, addr, T)
        forged.append((init, addr))
    assert calls[0] == 3
    verified_again = []
    for init, addr in (forged[1], forged[2], forged[0]):
        before = calls[0]
        b.receive(init, addr, T + 1)
        verified_again.append(calls[0] - before)
    assert verified_again == [0, 0, 1]          # only the oldest was forgotten


def test_pending_key_lookups_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "_MAX_LOOKUPS", 2)
    b = server(lookup=None)
    events = []
    for peer, addr in (("a.test", A), ("c.test", A2), ("m.test", M)):
        c = client(peer)
        c.connect("b.test", pub("b.test"), B, T)
        events += deliver(c, b, T, addr)
    assert [e.peer_id for e in events if isinstance(e, PeerKeyNeeded)] == ["a.test", "c.test"]


def test_a_key_provided_later_answers_at_the_inits_address_and_caches_the_resp() -> None:
    b = server(lookup=None)
    a = client()
    a.connect("b.test", pub("b.test"), B, T)
    [(init, _)] = a.datagrams_to_send()
    [need] = b.receive(init, A, T)
    assert isinstance(need, PeerKeyNeeded)
    assert b.provide_peer_key(b"no such token", pub("a.test"), T) == []
    assert b.provide_peer_key(need.token, pub("a.test"), T) == []
    [(resp, to)] = b.datagrams_to_send()
    assert resp[0] == T_RESP and to == A
    assert b.receive(init, A, T + 1) == []      # a retransmission: answered from the cache
    assert b.datagrams_to_send() == [(resp, A)]


# -- control datagrams and half-open sessions --------------------------------------------------


def test_a_half_open_session_is_dropped_at_the_handshake_timeout() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    deliver(a, b, T, A)
    [s] = b.sessions.values()
    assert s.state is State.SENT_RESP
    assert b.handle_timer(T + 14.999) == [] and len(b.sessions) == 1
    assert b.handle_timer(T + 15.0) == [] and b.sessions == {}
    assert s.state is State.CLOSED


def test_datagrams_for_a_session_without_keys_are_dropped() -> None:
    a = client()
    idx = _connect_alone(a)
    for t in (T_DATA, T_KEEPALIVE, T_FINISHED, T_CLOSE):
        assert a.receive(struct.pack(">BIQ", t, idx, 0) + bytes(16), B, T) == []
    assert len(a.sessions) == 1 and a.datagrams_to_send() == []


def test_a_finished_to_an_initiator_is_ignored() -> None:
    a, b = client(), server()
    handshake(a, b)
    sb = b.session_for_peer("a.test")
    assert sb is not None and sb.result is not None
    d = b._seal(sb, T_FINISHED, sb.result.finished_mac())   # a well-sealed, reflected FINISHED
    assert a.receive(d, B, T) == [] and a.datagrams_to_send() == []


def test_a_finished_with_the_wrong_mac_drops_the_half_open_session() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    a.datagrams_to_send()                       # the genuine FINISHED: lost
    sa = a.session_for_peer("b.test")
    assert sa is not None
    assert b.receive(a._seal(sa, T_FINISHED, bytes(32)), A, T) == []
    assert b.sessions == {} and b.datagrams_to_send() == []


def test_events_keep_flowing_after_a_datagram_that_completed_the_handshake() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    a.datagrams_to_send()                       # FINISHED lost: DATA completes it
    d, _ = a.send("b.test", b"first", T)  # type: ignore[misc]
    ev = b.receive(d, A, T)
    assert ev == [HandshakeComplete("a.test", A, False), DatagramReceived(b"first", "a.test", A)]
    a.close_peer("b.test")
    assert deliver(a, b, T, A) == [Closed(None, "a.test", A)]


def _manual_init(b_index: int, flags: int) -> tuple[InitiatorHandshake, bytes]:
    hs = InitiatorHandshake("a.test", rsa_key("a.test"), "b.test", pub("b.test"), AES,
                            ext=struct.pack(">IBI", 4242, flags, b_index))
    return hs, bytes([T_INIT]) + hs.build_init(T + WALL)


@pytest.mark.parametrize("flags,rekey", [(0, False), (FLAG_REKEY, True)])
def test_an_init_replaces_a_session_only_when_flagged(flags: int, rekey: bool) -> None:
    a, b = client(), server()
    handshake(a, b)
    sa = a.session_for_peer("b.test")
    assert sa is not None
    hs, init = _manual_init(sa.remote_index, flags)
    b.receive(init, A, T)
    [(resp, _)] = b.datagrams_to_send()
    result = hs.receive_resp(resp[5:])
    (b_new,) = struct.unpack(">I", result.peer_ext)
    header = struct.pack(">BIQ", T_FINISHED, b_new, 0)
    fin = header + result.suite.make_cipher(result.secrets.i2r).seal(0, result.finished_mac(),
                                                                    header)
    assert b.receive(fin, A, T) == [HandshakeComplete("a.test", A, rekey)]


# -- close and expiry ------------------------------------------------------------------------


def test_close_sends_close_only_on_established_sessions_and_closes_them() -> None:
    a, b = client(), server()
    a.connect("b.test", pub("b.test"), B, T)
    deliver(a, b, T, A)
    b.datagrams_to_send()
    [s] = b.sessions.values()
    b.close_peer("a.test")                      # half-open: nothing to say
    assert b.datagrams_to_send() == [] and b.sessions == {} and s.state is State.CLOSED
    b.close_peer("nobody.test")                 # a peer b never connected to


def test_close_peer_forgets_the_peer_its_queue_and_its_handshake() -> None:
    a, b = client(pending_max_bytes=10), server()
    a.connect("b.test", pub("b.test"), B, T)
    a.datagrams_to_send()
    assert a.send("b.test", b"o" * 10, T) is None
    a.close_peer("b.test")
    assert a.sessions == {} and a.handshaking == {} and "b.test" not in a.known
    with pytest.raises(ChannelNotReady) as info:
        a.send("b.test", b"x", T)
    assert str(info.value) == "no session with b.test"
    a.connect("b.test", pub("b.test"), B, T)
    assert a.send("b.test", b"n" * 10, T) is None
    assert [d[0] for d, _ in a.out] == [T_INIT]
    deliver(a, b, T, A)
    deliver(b, a, T, B)
    got = deliver(a, b, T, A)
    assert [e.data for e in got if isinstance(e, DatagramReceived)] == [b"n" * 10]


def test_a_closed_session_leaves_no_address_and_no_room_taken() -> None:
    a, b = client(), server(udp_max_sessions_per_peer=2)
    for _ in range(3):                          # three times: the cap is never reached
        _, ev = handshake(a, b)
        assert ev == [HandshakeComplete("a.test", A, False)]
        a.close_peer("b.test")
        assert deliver(a, b, T, A) == [Closed(None, "a.test", A)]
        assert b.peer_at(A) is None and b.session_for_addr(A) is None and b.sessions == {}
        assert a.peer_at(B) is None and a.sessions == {}


def test_idle_expiry_at_exactly_the_timeout() -> None:
    a, b = client(udp_session_idle_timeout=30.0), server(udp_session_idle_timeout=30.0)
    handshake(a, b)
    assert b.get_timer() == T + 15.0            # the half-open check comes first
    assert b.handle_timer(T + 29.999) == []
    [ev] = b.handle_timer(T + 30.0)
    assert type(ev) is Closed and ev.peer_id == "a.test" and ev.addr == A
    assert type(ev.error) is ConnectionLost
    assert str(ev.error) == "nothing received from a.test for 30 s (udp_session_idle_timeout)"
    assert b.sessions == {}


def test_idle_expiry_when_the_deadline_rounds_below_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """0.7 + 0.1 rounds to 0.7999999999999999, and 0.7999999999999999 - 0.7 < 0.1: the idle
    timer rescheduled for last_recv + idle must find itself due at that very time (it used to
    compare now - last_recv >= idle, reschedule for the same time and spin in handle_timer)."""
    assert (0.7 + 0.1) - 0.7 < 0.1
    a, b = client(now=0.65, udp_session_idle_timeout=0.1), server(now=0.65)
    handshake(a, b, now=0.65)
    schedule, calls = a._schedule, [0]

    def bounded(*args: Any) -> None:   # fail, rather than hang, if it spins
        calls[0] += 1
        assert calls[0] < 100, "handle_timer reschedules the idle timer for a time already due"
        schedule(*args)

    monkeypatch.setattr(a, "_schedule", bounded)
    d, _ = b.send("a.test", b"x", 0.7)  # type: ignore[misc]
    assert a.receive(d, B, 0.7) == [DatagramReceived(b"x", "b.test", B)]
    assert a.handle_timer(0.75) == []           # rescheduled for last_recv + idle
    assert a.get_timer() == 0.7 + 0.1
    [ev] = a.handle_timer(0.7 + 0.1)
    assert type(ev) is Closed and a.sessions == {}


def test_an_expired_session_reports_its_latest_address() -> None:
    a, b = client(udp_session_idle_timeout=30.0), server()
    handshake(a, b)
    d, _ = b.send("a.test", b"moved", T + 10)  # type: ignore[misc]
    a.receive(d, B2, T + 10)                    # b now at B2
    [ev] = a.handle_timer(T + 40.0)
    assert (ev.peer_id, ev.addr) == ("b.test", B2)


def test_a_rekey_by_time_that_could_not_start_is_tried_again_once_there_is_room() -> None:
    # (no keepalives: the datagrams counted here are the handshakes')
    a = client(rekey_after_time=50.0, udp_max_sessions=2, udp_keepalive_interval=0)
    b = server()
    handshake(a, b)
    a.connect("c.test", pub("c.test"), ("10.0.0.3", 1), T + 45.0)  # never answered
    for t in (46.0, 48.0, 50.0):               # INIT to c resent; at T + 50 the rekey is due
        a.handle_timer(T + t)
    assert types(a.datagrams_to_send()) == [T_INIT] * 3
    a.send("b.test", b"x", T + 50.0)           # 2 sessions open: the rekey cannot start
    assert a.datagrams_to_send() == []
    a.handle_timer(T + 52.0)
    [ev] = a.handle_timer(T + 60.0)            # c's handshake gives up
    assert type(ev) is HandshakeFailed and ev.peer_id == "c.test"
    a.datagrams_to_send()
    assert len(a.sessions) == 1
    a.send("b.test", b"y", T + 61.0)           # room again, and the key is past its lifetime
    assert types(a.datagrams_to_send()) == [T_INIT]
