"""p2psc._proto.tcp, sans-IO, against the survivors of `make mutation`: constructor defaults and
the buffers it is given, wall-clock offsets, records held while the peer's key is looked up,
the held-bytes limit at exactly 64 KiB, the pool boundary at exactly POOL_MIN, pipelined records,
output accounting, sub-second timers, misuse guards, and the exact error of each ending.

Explicit clock throughout; keepalive and idle timeout are off unless a test turns them on."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from conftest import rsa_key

from p2psc._proto.buffers import POOL_MIN, BufferPool, ReceiveBudget
from p2psc._proto.events import Closed, Event, HandshakeComplete, MessageReceived, PeerKeyNeeded
from p2psc._proto.handshake import (
    Randomness,
    ResponderHandshake,
    parse_init,
)
from p2psc._proto.replay import InitReplayCache
from p2psc._proto.settings import Settings as _Settings
from p2psc._proto.tcp import (
    HEADER_LEN,
    MAX_HELD_WHILE_AWAITING_KEY,
    Connection,
    RecordType,
    Role,
    State,
)
from p2psc.p2pexcept import (
    ChannelNotReady,
    ConnectionLost,
    HandshakeError,
    HandshakeTimeout,
    LimitExceeded,
    MessageTooLarge,
    ProtocolError,
    RecordTooLarge,
    StatusError,
)

T0 = 1_800_000_000.0
TAG = 16


def Settings(**kw: Any) -> _Settings:  # noqa: N802
    kw.setdefault("keepalive_interval", 0.0)
    kw.setdefault("idle_timeout", 0.0)
    return _Settings(**kw)


def i_key() -> Any:
    return rsa_key("i")


def r_key() -> Any:
    return rsa_key("r")


def initiator(s: _Settings | None = None, **kw: Any) -> Connection:
    kw.setdefault("now", T0)
    return Connection(Role.INITIATOR, "i.test", i_key(), s or Settings(), peer_id="r.test",
                      peer_public_key=r_key().public_key(), **kw)


def responder(s: _Settings | None = None, *, known: bool = True, **kw: Any) -> Connection:
    kw.setdefault("now", T0)
    table = {"i.test": i_key().public_key()} if known else {}
    return Connection(Role.RESPONDER, "r.test", r_key(), s or Settings(), key_lookup=table.get,
                      **kw)


def out(conn: Connection) -> bytes:
    return b"".join(conn.data_to_send())


def establish(i: Connection, r: Connection, now: float = T0) -> None:
    i.initiate(now)
    assert r.receive_data(out(i), now) == []
    assert i.receive_data(out(r), now) == [HandshakeComplete("r.test")]
    assert r.receive_data(out(i), now) == [HandshakeComplete("i.test")]


def closed_with(events: list[Event], exc_type: type, message: str) -> None:
    assert len(events) >= 1
    last = events[-1]
    assert type(last) is Closed and type(last.error) is exc_type
    assert str(last.error) == message


def hdr(length: int, rtype: int) -> bytes:
    return struct.pack(">IB", length, rtype)


# -- construction ----------------------------------------------------------------------------


def test_constructor_defaults() -> None:
    s = Settings()
    i = Connection(Role.INITIATOR, "i.test", i_key(), s, peer_id="r.test",
                   peer_public_key=r_key().public_key())
    assert (i.role, i.my_id, i.peer_id, i.state) == (Role.INITIATOR, "i.test", "r.test",
                                                       State.IDLE)
    assert i.suite_name is None and not i.handshake_complete and not i.needs_key_derivation
    assert i.pending_output == 0 and i.buffered_bytes == 0 and i.data_to_send() == []
    assert i.get_timer() == s.handshake_timeout   # now defaults to 0.0
    i.initiate()
    [chunk] = i.data_to_send()
    assert parse_init(chunk[HEADER_LEN:]).timestamp_ms == 0  # now 0.0 + wall_offset 0.0
    r = Connection(Role.RESPONDER, "r.test", r_key(), s)
    assert r.peer_id is None and r.get_timer() == s.handshake_timeout


@pytest.mark.parametrize("peer_id,with_key", [(None, True), ("r.test", False), (None, False)])
def test_an_initiator_needs_the_peers_id_and_key(peer_id: str | None, with_key: bool) -> None:
    with pytest.raises(StatusError) as info:
        Connection(Role.INITIATOR, "i.test", i_key(), Settings(), peer_id=peer_id,
                   peer_public_key=r_key().public_key() if with_key else None)
    assert type(info.value) is StatusError
    assert str(info.value) == "an initiator needs the peer's id and public key"


def test_the_given_scratch_buffer_is_used() -> None:
    scratch = bytearray(1000)
    r = responder(scratch=scratch)
    view = r.get_buffer()
    assert view.obj is scratch and len(view) == 1000
    view.release()


def test_the_wall_offset_sets_init_timestamps_and_the_responders_clock() -> None:
    """Monotonic clocks near 100 s, wall clocks near T0: the INIT carries now + wall_offset
    and the responder compares it with its own now + wall_offset."""
    offset = T0 - 100.0
    i = initiator(now=100.0, wall_offset=offset)
    r = responder(now=120.0, wall_offset=offset - 20.0)  # another monotonic origin
    i.initiate(150.0)
    init = out(i)
    assert parse_init(init[HEADER_LEN:]).timestamp_ms == int((T0 + 50.0) * 1000)
    assert r.peer_id is None
    assert r.receive_data(init, 170.0) == []     # its wall clock: T0 + 50 as well
    assert r.state is State.SENT_RESP and r.peer_id == "i.test"
    assert i.receive_data(out(r), 150.0) == [HandshakeComplete("r.test")]
    assert r.receive_data(out(i), 170.0) == [HandshakeComplete("i.test")]


# -- misuse guards ---------------------------------------------------------------------------


def test_initiate_twice_or_on_a_responder_is_a_status_error() -> None:
    i = initiator()
    i.initiate()
    for conn in (i, responder()):
        with pytest.raises(StatusError) as info:
            conn.initiate()
        assert type(info.value) is StatusError
        assert str(info.value) == "initiate() is for a new initiator connection"
    assert i.state is State.SENT_INIT and len(i.data_to_send()) == 1  # one INIT only


def test_provide_peer_key_when_nothing_waits_is_a_status_error() -> None:
    for conn in (responder(), initiator()):
        with pytest.raises(StatusError) as info:
            conn.provide_peer_key(i_key().public_key())
        assert str(info.value) == "no INIT is waiting for a peer key"


def test_update_key_before_the_handshake_is_a_status_error() -> None:
    with pytest.raises(StatusError) as info:
        initiator().update_key()
    assert str(info.value) == "key update before the handshake completed"


def test_message_over_the_limit_has_the_exact_error_before_and_after_the_handshake() -> None:
    s = Settings(max_message_size=10)
    i, r = initiator(s), responder(s)
    with pytest.raises(MessageTooLarge) as info:
        i.send(bytes(11))
    assert str(info.value) == "message of 11 bytes is over the 10-byte limit"
    establish(i, r)
    with pytest.raises(MessageTooLarge) as info:
        i.send(bytes(11))
    assert str(info.value) == "message of 11 bytes is over the 10-byte limit"
    i.send(bytes(10))


def test_send_after_close_has_the_exact_error() -> None:
    i = initiator()
    i.close()
    with pytest.raises(ChannelNotReady) as info:
        i.send(b"x")
    assert str(info.value) == "the connection is closed"


# -- output accounting -----------------------------------------------------------------------


def test_pending_output_counts_every_record_until_taken() -> None:
    i, r = initiator(), responder()
    i.initiate()
    assert i.pending_output == sum(map(len, i.data_to_send())) > 0
    assert i.pending_output == 0
    assert r.receive_data(b"") == [] and r.pending_output == 0
    i2, r2 = initiator(), responder()
    establish(i2, r2)
    msgs = (b"a", b"bb" * 50, b"")
    for m in msgs:
        i2.send(m)
    expected = sum(HEADER_LEN + len(m) + TAG for m in msgs)
    assert i2.pending_output == expected
    assert sum(map(len, i2.data_to_send())) == expected and i2.pending_output == 0


def test_abort_drops_what_is_queued() -> None:
    i, r = initiator(), responder()
    establish(i, r)
    i.send(b"never sent")
    assert i.pending_output > 0
    i.abort()
    assert i.state is State.CLOSED
    assert i.pending_output == 0 and i.data_to_send() == []


def test_a_failure_drops_what_is_queued() -> None:
    i, r = initiator(), responder()
    establish(i, r)
    i.send(b"never sent")
    events = i.receive_data(hdr(TAG, 0x7F) + bytes(TAG))
    closed_with(events, ProtocolError, "unexpected record type 0x7f after the handshake")
    assert i.pending_output == 0 and i.data_to_send() == []


# -- receiving -------------------------------------------------------------------------------


def test_complete_records_then_an_incomplete_one_in_one_read() -> None:
    i, r = initiator(), responder()
    establish(i, r)
    msgs = [b"short", b"x" * 300, b"y" * 2000]
    for m in msgs:
        i.send(m)
    stream = out(i)
    first_two = 2 * HEADER_LEN + 2 * TAG + 5 + 300
    cut = first_two + HEADER_LEN + 100   # the third record's header and 100 bytes of it
    assert r.receive_data(stream[:cut]) == [MessageReceived(msgs[0]), MessageReceived(msgs[1])]
    assert r.buffered_bytes == HEADER_LEN + 100
    assert r.receive_data(stream[cut:]) == [MessageReceived(msgs[2])]
    assert r.buffered_bytes == 0


def _record_of(i: Connection, need: int) -> bytes:
    """A DATA record of exactly ``need`` bytes, header included."""
    i.send(bytes(need - HEADER_LEN - TAG))
    rec = out(i)
    assert len(rec) == need
    return rec


@pytest.mark.parametrize("need,pooled", [(POOL_MIN, False), (POOL_MIN + 1, True)])
def test_records_over_pool_min_use_the_pool_and_give_the_buffer_back(need: int,
                                                                     pooled: bool) -> None:
    pool = BufferPool()
    kept = bytearray(1024 * 1024)
    pool.put(kept)
    budget = ReceiveBudget(0)
    i, r = initiator(), responder(pool=pool, budget=budget)
    establish(i, r)
    rec = _record_of(i, need)
    assert r.receive_data(rec[:1000]) == []
    assert r.buffered_bytes == 1000
    if pooled:   # read into the kept buffer, straight into place
        assert pool.retained == 0 and budget.used == len(kept)
        view = r.get_buffer()
        assert view.obj is kept
        view.release()
    else:        # a plain buffer of the record's size
        assert pool.retained == len(kept) and budget.used == need
    assert r.receive_data(rec[1000:]) == [MessageReceived(bytes(need - HEADER_LEN - TAG))]
    assert budget.used == 0 and r.buffered_bytes == 0
    assert pool.retained == len(kept)   # given back; a POOL_MIN buffer is not kept
    assert pool.take(1) is kept and pool.take(1) is None


def test_the_budget_given_is_charged_with_the_exact_error_when_full() -> None:
    budget = ReceiveBudget(70_000)
    i, r = initiator(), responder(budget=budget)
    establish(i, r)
    rec = _record_of(i, 70_001)   # over POOL_MIN: a buffer of what arrived + GROW_STEP
    events = r.receive_data(rec[:100])
    closed_with(events, LimitExceeded, "partly received records would hold more than 70000 "
                                       "bytes in this handler (max_partial_record_bytes)")
    assert budget.used == 0


def test_a_record_over_the_message_limit_has_the_exact_error() -> None:
    s = Settings(max_message_size=100)
    i, r = initiator(s), responder(s)
    establish(i, r)
    closed_with(r.receive_data(hdr(133, RecordType.DATA)), RecordTooLarge,
                "record of 133 bytes is over the 100-byte message limit")


# -- records held while the peer's key is looked up --------------------------------------------


class SameRandomness(Randomness):
    """Two responders given equal ones answer one INIT with the same RESP, byte for byte
    (the RSA-PSS signature of a given message is made once and reused)."""

    def __init__(self, seed: int, signatures: dict[bytes, bytes]):
        self._rng = random.Random(seed)
        self._signatures = signatures

    def random(self, n: int) -> bytes:
        return self._rng.randbytes(n)

    def sign(self, key: Any, data: bytes) -> bytes:
        if data not in self._signatures:
            self._signatures[data] = super().sign(key, data)
        return self._signatures[data]


def _flight_held_by_an_unknown_initiators_responder() -> tuple[Connection, bytes, bytes, bytes]:
    """(a responder awaiting i's key, INIT, the RESP it will send, FINISHED + DATA): the
    initiator got its RESP from a twin responder that knew its key."""
    sigs: dict[bytes, bytes] = {}
    i = initiator()
    twin = responder(randomness=SameRandomness(5, sigs))
    waiting = responder(known=False, randomness=SameRandomness(5, sigs))
    i.initiate()
    init = out(i)
    assert twin.receive_data(init) == []
    resp = out(twin)
    assert i.receive_data(resp) == [HandshakeComplete("r.test")]
    i.send(b"held message")
    return waiting, init, resp, out(i)


def test_records_held_while_the_key_is_looked_up_are_handled_when_it_comes() -> None:
    r, init, resp, later = _flight_held_by_an_unknown_initiators_responder()
    assert r.receive_data(init + later[:7]) == [PeerKeyNeeded("i.test")]
    assert r.receive_data(later[7:]) == []
    assert r.state is State.AWAIT_PEER_KEY and r.buffered_bytes == len(later)
    events = r.provide_peer_key(i_key().public_key(), T0 + 1)
    assert events == [HandshakeComplete("i.test"), MessageReceived(b"held message")]
    assert r.state is State.ESTABLISHED and r.buffered_bytes == 0
    assert out(r) == resp


def test_good_held_records_keep_their_events_before_a_failure() -> None:
    r, init, _, later = _flight_held_by_an_unknown_initiators_responder()
    assert r.receive_data(init + later + hdr(1, 0x7F) + b"x") == [PeerKeyNeeded("i.test")]
    events = r.provide_peer_key(i_key().public_key(), T0 + 1)
    assert events[:2] == [HandshakeComplete("i.test"), MessageReceived(b"held message")]
    closed_with(events[2:], ProtocolError, "unexpected record type 0x7f after the handshake")
    assert r.data_to_send() == []


def test_at_most_64_kib_are_held_while_the_key_is_looked_up() -> None:
    i, r = initiator(), responder(known=False)
    i.initiate()
    assert r.receive_data(out(i)) == [PeerKeyNeeded("i.test")]
    assert MAX_HELD_WHILE_AWAITING_KEY == 65536
    assert r.receive_data(bytes(60000)) == []
    assert r.receive_data(bytes(5536)) == []
    assert r.buffered_bytes == 65536
    closed_with(r.receive_data(b"\x00"), ProtocolError,
                "too much data before the handshake completed")


# -- exact errors of the handshake -----------------------------------------------------------


def test_a_resp_with_transport_data_is_refused() -> None:
    i = initiator()
    i.initiate()
    init = out(i)[HEADER_LEN:]
    udp_like = ResponderHandshake("r.test", r_key(), replay_cache=InitReplayCache())
    verified = udp_like.verify(udp_like.parse(init), i_key().public_key())
    resp, _ = udp_like.respond(verified, T0, ext=b"\x00\x00\x00\x01")
    closed_with(i.receive_data(hdr(len(resp), RecordType.RESP) + resp), HandshakeError,
                "RESP with transport data (a UDP RESP?) on a TCP connection")


def test_an_init_with_transport_data_is_refused() -> None:
    from p2psc._proto.handshake import InitiatorHandshake
    from p2psc._proto.suites import SUITES_BY_NAME
    hs = InitiatorHandshake("i.test", i_key(), "r.test", r_key().public_key(),
                            SUITES_BY_NAME["aes-256-gcm"], ext=b"\x00\x00\x00\x01")
    body = hs.build_init(T0)
    r = responder()
    closed_with(r.receive_data(hdr(len(body), RecordType.INIT) + body), HandshakeError,
                "INIT with transport data (a UDP INIT?) on a TCP connection")


def test_a_finished_that_fails_authentication() -> None:
    i, r = initiator(), responder()
    i.initiate()
    r.receive_data(out(i))
    closed_with(r.receive_data(hdr(48, RecordType.FINISHED) + bytes(48)), HandshakeError,
                "FINISHED failed authentication")


def test_an_unexpected_record_after_the_handshake() -> None:
    i, r = initiator(), responder()
    establish(i, r)
    closed_with(r.receive_data(hdr(TAG, RecordType.INIT) + bytes(TAG)), ProtocolError,
                "unexpected record type 0x1 after the handshake")


def test_eof_errors() -> None:
    i = initiator()
    i.initiate()
    closed_with(i.receive_eof(T0), HandshakeError,
                "the peer refused the handshake: it probably does not know this peer's key "
                "(add it there with p2psc add-peer, or register it in the directory), or "
                "this peer's key changed")
    i, r = initiator(), responder()
    establish(i, r)
    closed_with(r.receive_eof(T0), ConnectionLost,
                "the connection ended without the peer's CLOSE record (truncated or lost)")


# -- timers ----------------------------------------------------------------------------------


def test_handshake_timeout_error() -> None:
    i = initiator(Settings(handshake_timeout=2.5))
    closed_with(i.handle_timer(T0 + 2.5), HandshakeTimeout,
                "handshake not completed within 2.5 s")


def test_a_keepalive_interval_under_a_second() -> None:
    s = Settings(keepalive_interval=0.5)
    i, r = initiator(s), responder(s)
    establish(i, r)
    out(i)
    assert i.get_timer() == T0 + 0.5
    assert i.handle_timer(T0 + 0.5) == []
    ping = out(i)
    assert struct.unpack_from(">IB", ping) == (TAG, RecordType.PING)


def test_an_idle_timeout_under_a_second() -> None:
    s = Settings(idle_timeout=0.5)
    i, r = initiator(s), responder(s)
    establish(i, r)
    assert i.get_timer() == T0 + 0.125
    assert i.handle_timer(T0 + 0.5) == []
    closed_with(i.handle_timer(T0 + 0.625), ConnectionLost,
                "nothing received from the peer for 0.5 s (idle timeout)")


def test_idle_timeout_error_at_the_default() -> None:
    s = Settings(idle_timeout=120.0)
    i, r = initiator(s), responder(s)
    establish(i, r)
    closed_with(i.handle_timer(T0 + 150.0), ConnectionLost,
                "nothing received from the peer for 120 s (idle timeout)")
