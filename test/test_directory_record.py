"""The directory record and update request formats: canonical encodings, signatures, parsing."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psc import keys
from p2psc.directory.record import (
    CLOCK_SKEW,
    MAX_RECORD_BODY,
    MAX_RECORD_TTL,
    RECORD_PREFIX,
    RECORD_PREFIX_V1,
    DirectorySignatureError,
    canonical_record_bytes,
    loads_strict,
    sign_record,
    verify_record,
)
from p2psc.directory.update import (
    UPDATE_PREFIX,
    canonical_update_bytes,
    make_update_request,
    parse_update_request,
)
from p2psc.p2pexcept import DirectoryError, HandshakeError, SignCheckError


@pytest.fixture(scope="module")
def k() -> dict[str, Any]:
    return {name: keys.generate_private_key(2048) for name in ("center", "alice", "mallory")}


NOW = 1_700_000_000  # the time the records below are verified at
NONCE = "0123456789abcdef" * 2


def fields(k: dict[str, Any], **over: Any) -> dict[str, Any]:
    f = {"peer_id": "alice", "pubkey": keys.public_key_pem(k["alice"]).decode(),
         "host": "127.0.0.1", "port": 7001, "updated_at": NOW - 100,
         "expires_at": NOW + 3600, "nonce": NONCE}
    f.update(over)
    return f


def verify(k: dict[str, Any], rec: Any, peer_id: str = "alice", *, nonce: str | None = NONCE,
           now: float = NOW) -> Any:
    return verify_record(k["center"].public_key(), rec, peer_id, nonce=nonce, now=now)


def test_canonical_record_encoding_is_fixed() -> None:
    f = {"updated_at": 5, "port": 80, "peer_id": "a", "host": "h", "pubkey": "P\né", "sig": "x",
         "expires_at": 7, "nonce": None}
    assert canonical_record_bytes(f) == (
        b'p2psc directory record v2\n{"expires_at":7,"host":"h","nonce":null,"peer_id":"a",'
        b'"port":80,"pubkey":"P\\n\\u00e9","updated_at":5}')
    assert canonical_record_bytes(f).startswith(RECORD_PREFIX)
    assert RECORD_PREFIX != RECORD_PREFIX_V1 and len(RECORD_PREFIX) == 26
    with pytest.raises(DirectoryError):  # the five fields of v1 are not a v2 record
        canonical_record_bytes({kk: v for kk, v in f.items() if kk not in ("expires_at", "nonce")})
    with pytest.raises(DirectoryError):
        canonical_record_bytes({**f, "extra": 1})
    with pytest.raises(DirectoryError):
        canonical_record_bytes({"peer_id": "a"})


def test_canonical_update_encoding_is_fixed() -> None:
    f = {"peer_id": "a", "host": "h", "port": 1, "timestamp": 2, "nonce": "00" * 16}
    assert canonical_update_bytes(f) == UPDATE_PREFIX + (
        b'{"host":"h","nonce":"' + b"0" * 32 + b'","peer_id":"a","port":1,"timestamp":2}')
    # the two encodings are domain-separated
    assert not canonical_update_bytes(f).startswith(RECORD_PREFIX)


def test_sign_and_verify_roundtrip(k: dict[str, Any]) -> None:
    rec = sign_record(k["center"], fields(k))
    assert set(rec) == {"peer_id", "pubkey", "host", "port", "updated_at", "expires_at",
                        "nonce", "sig"}
    keys.verify(k["center"].public_key(), base64.b64decode(rec["sig"]),
                canonical_record_bytes(rec))
    for form in (rec, json.dumps(rec), json.dumps(rec).encode()):
        pr = verify(k, form)
        assert pr.to_dict() == rec
        assert (pr.expires_at, pr.nonce) == (NOW + 3600, NONCE)
        assert keys.same_public_key(pr.public_key, k["alice"].public_key())


@pytest.mark.parametrize("change", [
    {"port": 7002}, {"host": "127.0.0.2"}, {"updated_at": 1_700_000_001},
    {"pubkey": "mallory"}, {"expires_at": NOW + 7200}, {"nonce": "ff" * 16}, {"nonce": None},
])
def test_altered_records_fail_the_signature(k: dict[str, Any], change: dict[str, Any]) -> None:
    rec = sign_record(k["center"], fields(k))
    if change.get("pubkey") == "mallory":
        change = {"pubkey": keys.public_key_pem(k["mallory"]).decode()}
    with pytest.raises(DirectorySignatureError) as ei:
        verify(k, {**rec, **change}, nonce=None)
    assert isinstance(ei.value, DirectoryError)
    # a directory failure, not a handshake one
    assert not isinstance(ei.value, (SignCheckError, HandshakeError))


def test_signature_by_another_key_fails(k: dict[str, Any]) -> None:
    rec = sign_record(k["mallory"], fields(k))
    with pytest.raises(DirectorySignatureError):
        verify(k, rec)


@pytest.mark.parametrize("mutate", [
    lambda r: {**r, "extra": 1},
    lambda r: {kk: v for kk, v in r.items() if kk != "sig"},
    lambda r: {kk: v for kk, v in r.items() if kk != "host"},
    lambda r: {**r, "port": True},
    lambda r: {**r, "port": 7001.0},
    lambda r: {**r, "port": "7001"},
    lambda r: {**r, "port": 0},
    lambda r: {**r, "port": 65536},
    lambda r: {**r, "updated_at": -1},
    lambda r: {**r, "updated_at": 2**70},
    lambda r: {**r, "host": ""},
    lambda r: {**r, "host": "a" * 254},
    lambda r: {**r, "host": "evil host"},
    lambda r: {**r, "host": "<script>"},
    lambda r: {**r, "host": None},
    lambda r: {**r, "peer_id": "bob"},
    lambda r: {**r, "peer_id": "../alice"},
    lambda r: {**r, "pubkey": "not a key"},
    lambda r: {**r, "pubkey": "x" * 9000},
    lambda r: {**r, "sig": "!!notbase64!!"},
    lambda r: {**r, "sig": "A" * 5000},
    lambda r: {**r, "sig": 5},
    lambda r: {kk: v for kk, v in r.items() if kk != "expires_at"},
    lambda r: {kk: v for kk, v in r.items() if kk != "nonce"},
    lambda r: {**r, "expires_at": None},
    lambda r: {**r, "expires_at": "1"},
    lambda r: {**r, "expires_at": 1.5},
    lambda r: {**r, "expires_at": True},
    lambda r: {**r, "nonce": "AB" * 16},
    lambda r: {**r, "nonce": "ab" * 15},
    lambda r: {**r, "nonce": 5},
    lambda r: {**r, "nonce": ""},
])
def test_malformed_records_refused(k: dict[str, Any], mutate: Any) -> None:
    rec = sign_record(k["center"], fields(k))
    with pytest.raises(DirectoryError):
        verify(k, mutate(rec))


def test_sign_record_validates(k: dict[str, Any]) -> None:
    for bad in ({"port": 0}, {"host": "a b"}, {"peer_id": "-x"}, {"pubkey": "nope"}):
        with pytest.raises(DirectoryError):
            sign_record(k["center"], fields(k, **bad))
    with pytest.raises(DirectoryError):
        sign_record(k["center"], {**fields(k), "extra": 1})
    with pytest.raises(DirectoryError):  # a v1 field set cannot be signed any more
        sign_record(k["center"], {kk: v for kk, v in fields(k).items()
                                  if kk not in ("expires_at", "nonce")})


def test_small_rsa_keys_refused_as_record_keys(k: dict[str, Any]) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(DirectoryError, match="bits"):
        sign_record(k["center"], fields(k, pubkey=keys.public_key_pem(small).decode()))


def test_loads_strict() -> None:
    assert loads_strict(b'{"a":1}') == {"a": 1}
    for bad in (b'{"a":1,"a":2}', b"[1]", b"1", b"{", b'{"a":NaN}', b'{"a":Infinity}',
                b"\xff", b"[" * 100_000):
        with pytest.raises(DirectoryError):
            loads_strict(bad, limit=200_000)
    with pytest.raises(DirectoryError, match="larger"):
        loads_strict(b" " * (MAX_RECORD_BODY + 1))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_verify_record_only_raises_directory_errors(k: dict[str, Any], data: bytes) -> None:
    try:
        verify(k, data)
    except DirectoryError:
        pass


# -- freshness: expiry and the lookup nonce (issue 11 item 2) --------------------------------

def test_expired_record_refused(k: dict[str, Any]) -> None:
    """A center-signed record past its expires_at (+ the allowed clock skew) is refused."""
    rec = sign_record(k["center"], fields(k, expires_at=NOW + 3600))
    assert verify(k, rec, now=NOW + 3600).expires_at == NOW + 3600
    assert verify(k, rec, now=NOW + 3600 + CLOCK_SKEW).port == 7001  # within the skew
    for late in (NOW + 3600 + CLOCK_SKEW + 1, NOW + 10**6):
        with pytest.raises(DirectoryError, match="expired") as ei:
            verify(k, rec, now=late)
        assert not isinstance(ei.value, DirectorySignatureError)  # authentic, but stale
    # the default clock is the real one: a record that expired long ago is refused
    with pytest.raises(DirectoryError, match="expired"):
        verify_record(k["center"].public_key(), rec, "alice", nonce=NONCE)


def test_record_valid_for_too_long_refused(k: dict[str, Any]) -> None:
    rec = sign_record(k["center"], fields(k, expires_at=NOW + MAX_RECORD_TTL + CLOCK_SKEW))
    assert verify(k, rec).port == 7001
    rec = sign_record(k["center"], fields(k, expires_at=NOW + MAX_RECORD_TTL + CLOCK_SKEW + 1))
    with pytest.raises(DirectoryError, match="more than"):
        verify(k, rec)


def test_answer_with_another_nonce_refused(k: dict[str, Any]) -> None:
    """A replayed answer: authentic and unexpired, but signed for another request's nonce."""
    old_answer = sign_record(k["center"], fields(k, nonce="aa" * 16))
    with pytest.raises(DirectoryError, match="another request") as ei:
        verify(k, old_answer, nonce="bb" * 16)
    assert not isinstance(ei.value, DirectorySignatureError)
    # an answer to a lookup without a nonce is no answer to a lookup with one
    with pytest.raises(DirectoryError, match="another request"):
        verify(k, sign_record(k["center"], fields(k, nonce=None)), nonce="bb" * 16)
    # nonce=None checks none (a stored record re-verified)
    assert verify(k, old_answer, nonce=None).nonce == "aa" * 16
    with pytest.raises(TypeError):  # the caller must say which nonce it sent
        verify_record(k["center"].public_key(), old_answer, "alice")  # type: ignore[call-arg]


def test_v1_record_refused_even_with_a_valid_signature(k: dict[str, Any]) -> None:
    """A record in the old format (no expiry), correctly signed with the v1 prefix by the same
    center key, is refused: it cannot be confused with a v2 record."""
    v1 = {kk: v for kk, v in fields(k).items() if kk not in ("expires_at", "nonce")}
    sig = keys.sign(k["center"], RECORD_PREFIX_V1 + json.dumps(
        v1, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(DirectoryError, match="old v1 format"):
        verify(k, {**v1, "sig": base64.b64encode(sig).decode()}, nonce=None)
    # nor does its signature verify as a v2 record with any expiry and nonce added
    with pytest.raises(DirectorySignatureError):
        verify(k, {**v1, "expires_at": NOW + 60, "nonce": None,
                   "sig": base64.b64encode(sig).decode()}, nonce=None)


def test_real_clock_accepts_a_fresh_record(k: dict[str, Any]) -> None:
    now = int(time.time())
    rec = sign_record(k["center"], fields(k, expires_at=now + 60))
    assert verify_record(k["center"].public_key(), rec, "alice", nonce=NONCE).port == 7001


def test_update_request_roundtrip_and_tamper(k: dict[str, Any]) -> None:
    req = make_update_request("alice", k["alice"], "127.0.0.1", 7005, timestamp=123,
                              nonce="ab" * 16)
    assert set(req) == {"peer_id", "host", "port", "timestamp", "nonce", "sig"}
    parsed = parse_update_request(req)
    parsed.verify(k["alice"].public_key())
    with pytest.raises(DirectorySignatureError):
        parsed.verify(k["mallory"].public_key())
    for change in ({"port": 7006}, {"host": "h"}, {"timestamp": 124}, {"nonce": "cd" * 16},
                   {"peer_id": "bob"}):
        with pytest.raises(DirectorySignatureError):
            parse_update_request({**req, **change}).verify(k["alice"].public_key())
    # fresh requests differ in nonce
    a = make_update_request("alice", k["alice"], "h", 1)
    b = make_update_request("alice", k["alice"], "h", 1)
    assert a["nonce"] != b["nonce"] and len(a["nonce"]) == 32


@pytest.mark.parametrize("change", [
    {"nonce": "AB" * 16}, {"nonce": "ab" * 15}, {"nonce": 5}, {"timestamp": "1"},
    {"timestamp": 1.5}, {"port": False}, {"pubkey": "x"}, {"sig": ""},
])
def test_update_request_strict_parsing(k: dict[str, Any], change: dict[str, Any]) -> None:
    req = make_update_request("alice", k["alice"], "127.0.0.1", 7005)
    with pytest.raises(DirectoryError):
        parse_update_request({**req, **change})
    with pytest.raises(DirectoryError):
        make_update_request("alice", k["alice"], "127.0.0.1", 7005, nonce="xyz")


_values = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
           | st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["peer_id", "pubkey", "host", "port", "updated_at",
                                             "expires_at", "sig", "timestamp", "nonce", "x"]),
                           _values))
def test_structured_garbage_only_raises_directory_errors(k: dict[str, Any],
                                                         obj: dict[str, Any]) -> None:
    try:
        verify(k, obj)
    except DirectoryError:
        pass
    try:
        parse_update_request(obj)
    except DirectoryError:
        pass
