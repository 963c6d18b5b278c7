"""p2psc._proto.handshake at its limits: maximum-size fields (128-character ids, 64-byte ext,
8192-bit keys) and one byte over, the timestamp window at exactly its edge, the responder's
defaults and settings, the replay cache it feeds, misuse guards and the exact error of each
refusal (written against the survivors of `make mutation`).

INITs and RESPs that the classes would never build (a bad version, a low-order ephemeral key, a
chosen timestamp) are assembled here field by field, as docs/PROTOCOL.md specifies them, and
signed with the real keys."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import pytest
from conftest import rsa_key
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from p2psc._proto import handshake as hs
from p2psc._proto import rsakeys
from p2psc._proto.handshake import (
    MAX_HANDSHAKE_BODY,
    InitiatorHandshake,
    ResponderHandshake,
    parse_init,
    parse_resp,
)
from p2psc._proto.replay import InitReplayCache
from p2psc._proto.settings import Settings
from p2psc._proto.suites import SUITES_BY_NAME
from p2psc.p2pexcept import (
    HandshakeError,
    P2PError,
    ProtocolError,
    SignCheckError,
    UnknownPeerError,
)

WALL = 1_800_000_000.0          # wall-clock seconds (an integer: exact in milliseconds)
WALL_MS = int(WALL * 1000)
AES = SUITES_BY_NAME["aes-256-gcm"]
RC4 = SUITES_BY_NAME["rc4-hmac-sha256"]
I_ID, R_ID = "i.hs", "r.hs"
ID_128 = "i" + "d" * 127
ID_128_R = "r" + "d" * 127


def i_key() -> Any:
    return rsa_key("hs.i")


def r_key() -> Any:
    return rsa_key("hs.r")


def big_key() -> Any:
    """An 8192-bit key (the largest allowed), made once per test session."""
    return rsa_key("hs.big", 8192)


def exact(exc_info: pytest.ExceptionInfo[Any], exc_type: type, message: str) -> None:
    assert type(exc_info.value) is exc_type
    assert str(exc_info.value) == message


def var8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def var16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def make_init(*, version: int = 1, suite: int = 1, ts_ms: int = WALL_MS,
              nonce: bytes = b"N" * 16, eph: bytes | None = None, i_id: str = I_ID,
              r_id: str = R_ID, ext: bytes = b"", ikey: Any = None, rpub: Any = None,
              key_material: bytes = b"K" * 32) -> bytes:
    """An INIT body with every field chosen, signed by ``ikey`` (the initiator's key)."""
    if eph is None:
        eph = X25519PrivateKey.from_private_bytes(b"\x07" * 32).public_key().public_bytes_raw()
    enc = rsakeys.encrypt(rpub or r_key().public_key(), key_material)
    signed = (struct.pack(">BBQ", version, suite, ts_ms) + nonce + eph
              + var8(i_id.encode()) + var8(r_id.encode()) + var16(ext) + var16(enc))
    return signed + var16(rsakeys.sign(ikey or i_key(), hs.INIT_LABEL + signed))


def make_resp(init: bytes, *, version: int = 1, suite: int = 1, eph: bytes | None = None,
              ext: bytes = b"", rkey: Any = None) -> bytes:
    if eph is None:
        eph = X25519PrivateKey.from_private_bytes(b"\x09" * 32).public_key().public_bytes_raw()
    signed = bytes([version, suite]) + b"R" * 16 + eph + var16(ext)
    sig = rsakeys.sign(rkey or r_key(), hs.RESP_LABEL + hashlib.sha256(init + signed).digest())
    return signed + var16(sig)


def responder(**kw: Any) -> ResponderHandshake:
    kw.setdefault("replay_cache", InitReplayCache())
    return ResponderHandshake(kw.pop("my_id", R_ID), kw.pop("key", r_key()), **kw)


def respond(r: ResponderHandshake, body: bytes, now: float = WALL, *, ext: bytes = b"",
            ikey: Any = None) -> tuple[bytes, Any]:
    init = r.parse(body)
    verified = r.verify(init, (ikey or i_key()).public_key())
    return r.respond(verified, now, ext=ext)


def initiator(*, my_id: str = I_ID, peer_id: str = R_ID, ext: bytes = b"", key: Any = None,
              peer_key: Any = None, suite: Any = AES) -> InitiatorHandshake:
    return InitiatorHandshake(my_id, key or i_key(), peer_id, (peer_key or r_key()).public_key(),
                              suite, ext=ext)


# -- maximum sizes ---------------------------------------------------------------------------


def test_the_largest_init_and_resp_complete_a_handshake() -> None:
    """128-character ids, 64-byte ext both ways, 8192-bit keys on both sides: the INIT is
    exactly MAX_HANDSHAKE_BODY bytes, and everything of it arrives."""
    key = big_key()
    ext_i, ext_r = bytes(range(64)), bytes(range(64, 128))
    i = initiator(my_id=ID_128, peer_id=ID_128_R, ext=ext_i, key=key, peer_key=key)
    body = i.build_init(WALL)
    assert len(body) == MAX_HANDSHAKE_BODY
    init = parse_init(body)
    assert (init.initiator_id, init.responder_id, init.ext) == (ID_128, ID_128_R, ext_i)
    assert len(init.encrypted_key_material) == len(init.signature) == 1024
    r = responder(my_id=ID_128_R, key=key)
    resp, derive = respond(r, body, ext=ext_r, ikey=key)
    assert len(resp) == 2 + 16 + 32 + 2 + 64 + 2 + 1024
    assert parse_resp(resp).ext == ext_r
    r_result = derive()
    i_result = i.receive_resp(resp)
    assert r_result.peer_id == ID_128 and r_result.peer_ext == ext_i
    assert i_result.peer_id == ID_128_R and i_result.peer_ext == ext_r
    assert r_result.secrets == i_result.secrets
    assert r_result.transcript_hash == i_result.transcript_hash == \
        hashlib.sha256(body + resp).digest()
    r_result.check_finished(i_result.finished_mac())


def test_a_body_one_byte_over_the_largest_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_init(bytes(MAX_HANDSHAKE_BODY + 1))
    exact(info, ProtocolError, "INIT too large")
    with pytest.raises(ProtocolError) as info:
        parse_resp(bytes(MAX_HANDSHAKE_BODY + 1))
    exact(info, ProtocolError, "RESP too large")


def test_a_resp_body_of_exactly_the_largest_size_is_parsed() -> None:
    resp = make_resp(make_init())
    with pytest.raises(ProtocolError) as info:   # parsed: refused for what follows the RESP
        parse_resp(resp + bytes(MAX_HANDSHAKE_BODY - len(resp)))
    exact(info, ProtocolError, "trailing bytes after handshake message")


@pytest.mark.parametrize("which", ["initiator", "responder"])
def test_an_id_of_129_characters_is_too_long(which: str) -> None:
    long_id = "x" * 129
    body = make_init(i_id=long_id) if which == "initiator" else make_init(r_id=long_id)
    with pytest.raises(ProtocolError) as info:
        parse_init(body)
    exact(info, ProtocolError, "handshake field too long")


def test_an_ext_of_65_bytes_is_too_long() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_init(make_init(ext=bytes(65)))
    exact(info, ProtocolError, "handshake field too long")
    init = make_init()
    with pytest.raises(ProtocolError) as info:
        parse_resp(make_resp(init, ext=bytes(65)))
    exact(info, ProtocolError, "handshake field too long")


def test_a_signature_field_over_8192_bits_is_too_long() -> None:
    body = make_init()
    init = parse_init(body)
    too_long = init.signed_part + var16(bytes(1025))
    with pytest.raises(ProtocolError) as info:
        parse_init(too_long)
    exact(info, ProtocolError, "handshake field too long")


@pytest.mark.parametrize("bad_id", [b"con", b"-x", "\u00e9t\u00e9".encode(), b"\xff"])
def test_an_invalid_peer_id_is_a_protocol_error_without_context(bad_id: bytes) -> None:
    body = (struct.pack(">BBQ", 1, 1, WALL_MS) + bytes(48) + var8(bad_id) + var8(b"r")
            + var16(b"") + var16(b"") + var16(b""))
    with pytest.raises(ProtocolError) as info:
        parse_init(body)
    exact(info, ProtocolError, "invalid peer id in handshake")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_truncated_and_trailing_bytes_have_their_exact_errors() -> None:
    body = make_init()
    for n in (0, 1, 10, len(body) - 1):
        with pytest.raises(ProtocolError) as info:
            parse_init(body[:n])
        exact(info, ProtocolError, "handshake message truncated")
    with pytest.raises(ProtocolError) as info:
        parse_init(body + b"\x00")
    exact(info, ProtocolError, "trailing bytes after handshake message")


def test_fields_are_read_big_endian() -> None:
    ts = 0x0102030405060708
    assert parse_init(make_init(ts_ms=ts)).timestamp_ms == ts


# -- the responder ---------------------------------------------------------------------------


def test_responder_parse_refuses_another_version_and_another_responder() -> None:
    r = responder()
    with pytest.raises(HandshakeError) as info:
        r.parse(make_init(version=2))
    exact(info, HandshakeError, "unsupported protocol version 2")
    with pytest.raises(HandshakeError) as info:
        r.parse(make_init(r_id="someone.else"))
    exact(info, HandshakeError, "INIT is addressed to 'someone.else', not to us")


def test_responder_verify_errors() -> None:
    init = responder().parse(make_init())
    with pytest.raises(UnknownPeerError) as info:
        ResponderHandshake.verify(init, None)
    exact(info, UnknownPeerError, "INIT from unknown peer 'i.hs'")
    with pytest.raises(SignCheckError) as info:
        ResponderHandshake.verify(init, r_key().public_key())  # the wrong key, same size
    exact(info, SignCheckError, "INIT signature of i.hs does not verify")
    with pytest.raises(SignCheckError) as info:
        ResponderHandshake.verify(init, rsa_key("hs.3072", 3072).public_key())
    exact(info, SignCheckError,
          "INIT signature of i.hs does not verify (not as long as the key's modulus)")


def test_timestamp_window_default_is_120_seconds_exactly() -> None:
    for offset_ms in (120_000, -120_000):  # exactly at the edge, either way: accepted
        r = responder()
        respond(r, make_init(ts_ms=WALL_MS - offset_ms))
    for offset_ms, shown in ((120_001, "+120"), (-120_001, "-120")):  # one ms past: refused
        with pytest.raises(HandshakeError) as info:
            respond(responder(), make_init(ts_ms=WALL_MS - offset_ms))
        exact(info, HandshakeError, f"INIT from i.hs has a stale timestamp ({shown} s)")


@pytest.mark.parametrize("offset_s,shown", [(1000, "+1000"), (-1000, "-1000"), (121, "+121")])
def test_stale_timestamp_error_gives_the_offset_in_seconds(offset_s: int, shown: str) -> None:
    with pytest.raises(HandshakeError) as info:
        respond(responder(), make_init(ts_ms=WALL_MS - offset_s * 1000))
    exact(info, HandshakeError, f"INIT from i.hs has a stale timestamp ({shown} s)")


def test_responder_defaults_refuse_rc4_and_accept_it_only_when_enabled() -> None:
    with pytest.raises(HandshakeError) as info:
        respond(responder(), make_init(suite=RC4.code))
    exact(info, HandshakeError, "i.hs proposed a cipher suite we do not accept (code 129)")
    # enabled: accepted on a stream (datagrams is False by default) ...
    _, derive = respond(responder(enable_rc4=True), make_init(suite=RC4.code))
    assert derive().suite is RC4
    # ... and refused over datagrams
    with pytest.raises(HandshakeError):
        respond(responder(enable_rc4=True, datagrams=True), make_init(suite=RC4.code))
    with pytest.raises(HandshakeError) as info:
        respond(responder(), make_init(suite=0x80))
    exact(info, HandshakeError, "i.hs proposed a cipher suite we do not accept (code 128)")


def test_from_settings_uses_the_configured_timestamp_window() -> None:
    s = Settings(timestamp_window=30.0)
    r = ResponderHandshake.from_settings(R_ID, r_key(), s)
    respond(r, make_init(ts_ms=WALL_MS - 30_000, nonce=b"a" * 16))
    with pytest.raises(HandshakeError) as info:
        respond(r, make_init(ts_ms=WALL_MS - 31_000, nonce=b"b" * 16))
    exact(info, HandshakeError, "INIT from i.hs has a stale timestamp (+31 s)")


def test_from_settings_cache_remembers_inits_for_the_whole_configured_window() -> None:
    s = Settings(timestamp_window=300.0)
    r = ResponderHandshake.from_settings(R_ID, r_key(), s)
    body = make_init(ts_ms=WALL_MS)
    respond(r, body, WALL)
    with pytest.raises(HandshakeError) as info:   # 150 s later: still in the window
        respond(r, body, WALL + 150)
    exact(info, HandshakeError, "replayed INIT from i.hs")
    with pytest.raises(HandshakeError) as info:   # and at exactly its edge
        respond(r, body, WALL + 300)
    exact(info, HandshakeError, "replayed INIT from i.hs")


def test_from_settings_cache_holds_replay_cache_size_entries() -> None:
    s = Settings(replay_cache_size=1)
    r = ResponderHandshake.from_settings(R_ID, r_key(), s)
    respond(r, make_init(ts_ms=WALL_MS - 2000, nonce=b"a" * 16))
    respond(r, make_init(ts_ms=WALL_MS - 1000, nonce=b"b" * 16))  # evicts a: the floor
    with pytest.raises(HandshakeError) as info:  # a new INIT, but at the evicted timestamp
        respond(r, make_init(ts_ms=WALL_MS - 2000, nonce=b"c" * 16))
    exact(info, HandshakeError, "replayed INIT from i.hs")


def test_from_settings_shares_a_given_cache_even_when_empty() -> None:
    cache = InitReplayCache(10, 120.0)
    r1 = ResponderHandshake.from_settings(R_ID, r_key(), Settings(), cache)
    r2 = ResponderHandshake.from_settings(R_ID, r_key(), Settings(), cache)
    body = make_init()
    respond(r1, body)
    assert len(cache) == 1
    with pytest.raises(HandshakeError):
        respond(r2, body)


class RecordingCache(InitReplayCache):
    def __init__(self) -> None:
        super().__init__(100, 120.0)
        self.calls: list[tuple[bytes, float, float]] = []

    def check_and_add(self, key: bytes, timestamp: float, now: float) -> bool:
        self.calls.append((key, timestamp, now))
        return super().check_and_add(key, timestamp, now)


def test_the_replay_cache_gets_the_init_timestamp_in_seconds() -> None:
    cache = RecordingCache()
    r = responder(replay_cache=cache)
    respond(r, make_init(ts_ms=WALL_MS - 1500), WALL)
    [(key, timestamp, now)] = cache.calls
    assert (timestamp, now) == (WALL - 1.5, WALL)
    assert key.startswith(b"i.hs") and key.endswith(b"N" * 16)


def test_cached_inits_expire_on_the_wall_clock() -> None:
    cache = InitReplayCache(100, 120.0)
    r = responder(replay_cache=cache)
    respond(r, make_init(ts_ms=WALL_MS, nonce=b"a" * 16), WALL)
    respond(r, make_init(ts_ms=WALL_MS + 100_000, nonce=b"b" * 16), WALL + 100)
    assert len(cache) == 2
    respond(r, make_init(ts_ms=WALL_MS + 121_000, nonce=b"c" * 16), WALL + 121)
    assert len(cache) == 2   # the first expired


def test_a_low_order_ephemeral_key_is_refused() -> None:
    with pytest.raises(HandshakeError) as info:
        respond(responder(), make_init(eph=bytes(32)))
    exact(info, HandshakeError, "invalid ephemeral key")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_finished_that_does_not_match() -> None:
    _, derive = respond(responder(), make_init())
    result = derive()
    with pytest.raises(HandshakeError) as info:
        result.check_finished(bytes(32))
    exact(info, HandshakeError, "FINISHED does not match the transcript")


# -- the initiator ---------------------------------------------------------------------------


def test_initiator_init_carries_the_wall_clock_in_milliseconds() -> None:
    init = parse_init(initiator().build_init(WALL + 0.25))
    assert init.timestamp_ms == WALL_MS + 250


def test_resp_before_init_and_a_second_resp_are_refused() -> None:
    i = initiator()
    with pytest.raises(HandshakeError) as info:
        i.receive_resp(b"")
    exact(info, HandshakeError, "RESP before INIT, or a second RESP")
    body = i.build_init(WALL)
    resp, _ = respond(responder(), body)
    i.receive_resp(resp)
    with pytest.raises(HandshakeError) as info:
        i.receive_resp(resp)
    exact(info, HandshakeError, "RESP before INIT, or a second RESP")


def test_initiator_refuses_another_version_suite_or_signer() -> None:
    i = initiator()
    body = i.build_init(WALL)
    with pytest.raises(HandshakeError) as info:
        i.receive_resp(make_resp(body, version=7))
    exact(info, HandshakeError, "peer answered with protocol version 7")
    with pytest.raises(HandshakeError) as info:
        i.receive_resp(make_resp(body, suite=2))
    exact(info, HandshakeError, "peer answered with another cipher suite than proposed")
    with pytest.raises(SignCheckError) as info:
        i.receive_resp(make_resp(body, rkey=i_key()))
    exact(info, SignCheckError, "RESP signature of r.hs does not verify")
    with pytest.raises(HandshakeError) as info:
        i.receive_resp(make_resp(body, eph=bytes(32)))
    exact(info, HandshakeError, "invalid ephemeral key")
    # none of these used up the handshake: a good RESP still completes it
    resp, derive = respond(responder(), body)
    assert i.receive_resp(resp).secrets == derive().secrets


def test_every_refusal_is_a_p2p_error() -> None:
    """Receiving never raises anything but a P2PError (the transports rely on it)."""
    for body in (b"", bytes(200), make_init()[:-1], make_init() + b"x"):
        with pytest.raises(P2PError):
            responder().parse(body)
