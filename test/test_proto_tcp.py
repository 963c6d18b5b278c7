"""The sans-IO core: handshake and record layer driven with bytes only (no sockets)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from conftest import rsa_key
from p2psc._proto import handshake as hs
from p2psc.config import Settings
from p2psc._proto.events import Closed, Event, HandshakeComplete, MessageReceived, PeerKeyNeeded
from p2psc._proto.tcp import HEADER_LEN, Connection, RecordType, Role, State
from p2psc.p2pexcept import (ChannelNotReady, ConnectionLost, CRCError, HandshakeError,
                             MessageTooLarge, ProtocolError, RecordTooLarge, SignCheckError,
                             UnknownPeerError)
from p2psc._proto.replay import InitReplayCache

NOW = 1_800_000_000.0


def expect(events: list[Event]) -> list[Event]:
    """The events, or the error of a final ``Closed`` raised (for ``pytest.raises``)."""
    if events and isinstance(events[-1], Closed) and events[-1].error is not None:
        raise events[-1].error
    return events


def rx(conn: Connection, data: bytes, now: float | None = None) -> list[Event]:
    return expect(conn.receive_data(data, now))


def make_pair(*, settings_i: Settings | None = None, settings_r: Settings | None = None,
              i_key: Any = None, r_key_on_file: Any = None, i_key_on_file: Any = None,
              responder_id: str = "r.test", now: float = NOW,
              cache: InitReplayCache | None = None) -> tuple[Connection, Connection]:
    known = {"i.test": (i_key_on_file or rsa_key("i")).public_key()}
    init = Connection(Role.INITIATOR, "i.test", i_key or rsa_key("i"), settings_i or Settings(),
                      peer_id=responder_id,
                      peer_public_key=(r_key_on_file or rsa_key("r")).public_key(), now=now)
    resp = Connection(Role.RESPONDER, "r.test", rsa_key("r"), settings_r or Settings(),
                      key_lookup=known.get, replay_cache=cache, now=now)
    return init, resp


def pump(src: Connection, dst: Connection, now: float | None = None) -> list[Any]:
    data = b"".join(src.data_to_send())
    return rx(dst, data, now) if data else []


def handshake(i: Connection, r: Connection) -> None:
    i.initiate()
    assert pump(i, r) == []
    assert pump(r, i) == [HandshakeComplete("r.test")]
    assert pump(i, r) == [HandshakeComplete("i.test")]
    assert i.state is State.ESTABLISHED and r.state is State.ESTABLISHED


def test_handshake_then_messages_both_ways() -> None:
    i, r = make_pair()
    handshake(i, r)
    assert i.suite_name == r.suite_name
    for m in (b"", b"x", b"hello" * 1000):
        i.send(m)
        assert pump(i, r) == [MessageReceived(m)]
        r.send(m[::-1])
        assert pump(r, i) == [MessageReceived(m[::-1])]


def test_records_split_and_coalesced_arbitrarily() -> None:
    i, r = make_pair()
    handshake(i, r)
    msgs = [bytes([n]) * n for n in range(50)]
    for m in msgs:
        i.send(m)
    stream = b"".join(i.data_to_send())
    got: list[Any] = []
    for k in range(0, len(stream), 7):  # 7-byte pieces: headers and bodies split everywhere
        got += rx(r, stream[k:k + 7])
    assert got == [MessageReceived(m) for m in msgs]


def test_initiator_may_send_right_after_resp_in_the_same_flight() -> None:
    i, r = make_pair()
    i.initiate()
    pump(i, r)
    assert pump(r, i) == [HandshakeComplete("r.test")]
    i.send(b"early")
    # FINISHED and the first data record arrive together
    assert pump(i, r) == [HandshakeComplete("i.test"), MessageReceived(b"early")]


def test_send_before_handshake_is_queued_then_sealed_in_order() -> None:
    i, r = make_pair(settings_i=Settings(pending_max_messages=2))
    i.send(b"early 1")
    i.send(b"early 2")
    with pytest.raises(ChannelNotReady, match="queue is full"):
        i.send(b"early 3")
    i.initiate()
    pump(i, r)
    assert pump(r, i) == [HandshakeComplete("r.test")]
    # FINISHED, then the queued messages, in one flight
    assert pump(i, r) == [HandshakeComplete("i.test"), MessageReceived(b"early 1"),
                          MessageReceived(b"early 2")]


def test_send_after_close_raises_channel_not_ready() -> None:
    i, r = make_pair()
    handshake(i, r)
    i.close()
    with pytest.raises(ChannelNotReady, match="closed"):
        i.send(b"too late")


def test_close_record_is_a_clean_end_and_eof_without_it_is_a_loss() -> None:
    i, r = make_pair()
    handshake(i, r)
    i.close()
    assert pump(i, r) == [Closed(None)]
    i2, r2 = make_pair()
    handshake(i2, r2)
    [ev] = r2.receive_eof()
    assert isinstance(ev, Closed) and isinstance(ev.error, ConnectionLost)


def test_key_update_ratchets_each_direction() -> None:
    i, r = make_pair(settings_i=Settings(rekey_after_messages=3))
    handshake(i, r)
    before = i._send.secret  # type: ignore[union-attr]
    for n in range(10):
        i.send(b"m%d" % n)
    stream = b"".join(i.data_to_send())
    assert stream.count(bytes([RecordType.KEY_UPDATE])) >= 1
    assert rx(r, stream) == [MessageReceived(b"m%d" % n) for n in range(10)]
    assert i._send.secret != before  # type: ignore[union-attr]
    assert r._recv.secret == i._send.secret  # type: ignore[union-attr]


def test_responder_checks_its_own_id_before_looking_up_the_initiator() -> None:
    looked_up: list[str] = []
    i = Connection(Role.INITIATOR, "i.test", rsa_key("i"), Settings(), peer_id="other.test",
                   peer_public_key=rsa_key("r").public_key())
    r = Connection(Role.RESPONDER, "r.test", rsa_key("r"), Settings(),
                   key_lookup=lambda pid: looked_up.append(pid))  # type: ignore[func-returns-value]
    i.initiate()
    with pytest.raises(HandshakeError, match="addressed to 'other.test'"):
        pump(i, r)
    assert looked_up == []
    assert r.state is State.CLOSED and r.data_to_send() == []


def test_unknown_initiator_asks_for_its_key_and_none_refuses() -> None:
    i, r = make_pair()
    r._key_lookup = lambda pid: None
    i.initiate()
    assert pump(i, r) == [PeerKeyNeeded("i.test")]
    assert r.state is State.AWAIT_PEER_KEY
    with pytest.raises(UnknownPeerError):
        expect(r.provide_peer_key(None))
    assert r.data_to_send() == []


def test_key_provided_later_completes_the_handshake() -> None:
    i, r = make_pair()
    r._key_lookup = lambda pid: None
    i.initiate()
    assert pump(i, r) == [PeerKeyNeeded("i.test")]
    assert r.provide_peer_key(rsa_key("i").public_key()) == []
    assert pump(r, i) == [HandshakeComplete("r.test")]
    assert pump(i, r) == [HandshakeComplete("i.test")]


def test_bad_signature_is_refused_before_any_decryption(monkeypatch: Any) -> None:
    decrypted: list[bytes] = []
    real = hs.keys.decrypt
    monkeypatch.setattr(hs.keys, "decrypt", lambda k, c: decrypted.append(c) or real(k, c))
    i, r = make_pair(i_key_on_file=rsa_key("not-i"))
    i.initiate()
    with pytest.raises(SignCheckError):
        pump(i, r)
    assert decrypted == []


def test_stale_and_future_timestamps_are_refused() -> None:
    for skew in (-121.0, 121.0):
        i, r = make_pair()
        i.initiate()
        with pytest.raises(HandshakeError, match="stale timestamp"):
            pump(i, r, now=NOW + skew)


def test_replayed_init_is_refused_by_the_shared_cache() -> None:
    cache = InitReplayCache()
    i, r = make_pair(cache=cache)
    i.initiate()
    init = b"".join(i.data_to_send())
    rx(r, init)
    assert r.state is State.SENT_RESP
    _, r2 = make_pair(cache=cache)
    with pytest.raises(HandshakeError, match="replayed INIT"):
        rx(r2, init)


def test_resp_signed_by_the_wrong_key_is_refused() -> None:
    i, r = make_pair(r_key_on_file=rsa_key("not-r"))
    i.initiate()
    assert pump(i, r) == []
    with pytest.raises(SignCheckError):
        pump(r, i)
    assert i.state is State.CLOSED


def test_undecryptable_key_material_is_rejected_implicitly_at_finished() -> None:
    """Key material that does not decrypt is replaced by random bytes: R still answers, and
    the handshake fails at FINISHED, so the decryption's outcome is never visible alone."""
    i, r = make_pair(r_key_on_file=rsa_key("not-r"))  # I encrypts to the wrong key
    i.initiate()
    assert pump(i, r) == []
    assert r.state is State.SENT_RESP
    i._initiator._peer_public_key = rsa_key("r").public_key()  # type: ignore[union-attr]
    assert pump(r, i) == [HandshakeComplete("r.test")]
    with pytest.raises(HandshakeError, match="FINISHED"):
        pump(i, r)


def test_responder_keys_may_be_derived_before_finished_arrives() -> None:
    i, r = make_pair()
    i.initiate()
    pump(i, r)
    r.derive_keys()  # what the adapter does right after writing RESP
    assert not r.needs_key_derivation
    assert pump(r, i) == [HandshakeComplete("r.test")]
    assert pump(i, r) == [HandshakeComplete("i.test")]


def test_resp_with_another_suite_is_a_downgrade_and_refused() -> None:
    i, r = make_pair(settings_i=Settings(cipher_suite="aes-256-gcm"))
    i.initiate()
    pump(i, r)
    resp = bytearray(b"".join(r.data_to_send()))
    resp[HEADER_LEN + 1] = 2  # the suite byte of RESP: chacha20-poly1305
    with pytest.raises(HandshakeError, match="another cipher suite"):
        rx(i, bytes(resp))


def test_rc4_suite_needs_both_sides_to_enable_it() -> None:
    rc4 = Settings(cipher_suite="rc4-hmac-sha256", enable_rc4=True)
    i, r = make_pair(settings_i=rc4, settings_r=Settings())
    i.initiate()
    with pytest.raises(HandshakeError, match="cipher suite we do not accept"):
        pump(i, r)
    i, r = make_pair(settings_i=rc4, settings_r=Settings(enable_rc4=True))
    handshake(i, r)
    assert r.suite_name == "rc4-hmac-sha256"
    i.send(b"legacy")
    assert pump(i, r) == [MessageReceived(b"legacy")]


def test_bad_finished_is_refused() -> None:
    i, r = make_pair()
    i.initiate()
    pump(i, r)
    pump(r, i)
    fin = bytearray(b"".join(i.data_to_send()))
    fin[-1] ^= 1
    with pytest.raises(HandshakeError, match="FINISHED"):
        rx(r, bytes(fin))


def test_reflected_init_and_records_are_refused() -> None:
    i, r = make_pair()
    i.initiate()
    init = b"".join(i.data_to_send())
    with pytest.raises(ProtocolError):
        rx(i, init)  # an initiator never accepts an INIT
    i, r = make_pair()
    handshake(i, r)
    i.send(b"to r")
    record = b"".join(i.data_to_send())
    with pytest.raises(CRCError):
        rx(i, record)  # our own record reflected: the other direction's key


def test_replayed_and_reordered_records_are_refused() -> None:
    i, r = make_pair()
    handshake(i, r)
    i.send(b"one")
    one = b"".join(i.data_to_send())
    i.send(b"two")
    two = b"".join(i.data_to_send())
    assert rx(r, one) == [MessageReceived(b"one")]
    with pytest.raises(CRCError):
        rx(r, one)
    i2, r2 = make_pair()
    handshake(i2, r2)
    i2.send(b"a")
    a = b"".join(i2.data_to_send())
    i2.send(b"b")
    b = b"".join(i2.data_to_send())
    with pytest.raises(CRCError):
        rx(r2, b + a)
    assert two  # (the second record of the first session is never delivered)


def test_length_limits_are_checked_from_the_header_alone() -> None:
    _, r = make_pair()
    with pytest.raises(RecordTooLarge, match="too large"):
        rx(r, struct.pack(">IB", hs.MAX_HANDSHAKE_BODY + 1, RecordType.INIT))
    i, r = make_pair(settings_r=Settings(max_message_size=100))
    handshake(i, r)
    with pytest.raises(RecordTooLarge):  # the peer's record
        rx(r, struct.pack(">IB", 2**32 - 1, RecordType.DATA))
    with pytest.raises(MessageTooLarge):  # our own send
        i.send(b"x" * (16 * 1024 * 1024 + 1))


def test_data_before_the_handshake_is_a_protocol_error() -> None:
    _, r = make_pair()
    with pytest.raises(ProtocolError, match="unexpected record type"):
        rx(r, struct.pack(">IB", 3, RecordType.DATA) + b"abc")


def test_parsers_refuse_truncated_and_trailing_bytes() -> None:
    i, _ = make_pair()
    i.initiate()
    body = b"".join(i.data_to_send())[HEADER_LEN:]
    assert hs.parse_init(body).initiator_id == "i.test"
    for cut in (0, 1, 10, len(body) - 1):
        with pytest.raises(ProtocolError):
            hs.parse_init(body[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        hs.parse_init(body + b"\0")


def test_messages_before_a_forged_record_come_before_the_error() -> None:
    """Authentic records that precede a forged one in the same read are not lost: they come
    before the final ``Closed``, so delivery does not depend on how reads are split."""
    i, r = make_pair()
    handshake(i, r)
    i.send(b"one")
    i.send(b"two")
    i.send(b"three")
    stream = bytearray(b"".join(i.data_to_send()))
    stream[-1] ^= 1  # the last record is forged
    events = r.receive_data(bytes(stream))
    assert events[:2] == [MessageReceived(b"one"), MessageReceived(b"two")]
    assert len(events) == 3 and isinstance(events[2], Closed)
    assert type(events[2].error) is CRCError
    assert r.state is State.CLOSED and r.data_to_send() == []


def test_a_udp_init_is_refused_over_tcp() -> None:
    """An INIT with transport data (UDP's index) is not accepted by a TCP responder, so a
    captured UDP INIT cannot be replayed against a TCP listener of the same peer."""
    i, r = make_pair()
    i._initiator._ext = b"\x00\x00\x00\x01"  # type: ignore[union-attr]
    i.initiate()
    with pytest.raises(HandshakeError, match="transport data"):
        pump(i, r)
    assert r.data_to_send() == []
