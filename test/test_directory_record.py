"""The directory record and update request formats: canonical encodings, signatures, parsing."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psc import keys
from p2psc.directory.record import (
    MAX_RECORD_BODY,
    RECORD_PREFIX,
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


def fields(k: dict[str, Any], **over: Any) -> dict[str, Any]:
    f = {"peer_id": "alice", "pubkey": keys.public_key_pem(k["alice"]).decode(),
         "host": "127.0.0.1", "port": 7001, "updated_at": 1_700_000_000}
    f.update(over)
    return f


def test_canonical_record_encoding_is_fixed() -> None:
    f = {"updated_at": 5, "port": 80, "peer_id": "a", "host": "h", "pubkey": "P\né", "sig": "x"}
    assert canonical_record_bytes(f) == (
        b'p2psc directory record v1\n{"host":"h","peer_id":"a","port":80,'
        b'"pubkey":"P\\n\\u00e9","updated_at":5}')
    assert canonical_record_bytes(f).startswith(RECORD_PREFIX)
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
    assert set(rec) == {"peer_id", "pubkey", "host", "port", "updated_at", "sig"}
    keys.verify(k["center"].public_key(), base64.b64decode(rec["sig"]),
                canonical_record_bytes(rec))
    for form in (rec, json.dumps(rec), json.dumps(rec).encode()):
        pr = verify_record(k["center"].public_key(), form, "alice")
        assert pr.to_dict() == rec
        assert keys.same_public_key(pr.public_key, k["alice"].public_key())


@pytest.mark.parametrize("change", [
    {"port": 7002}, {"host": "127.0.0.2"}, {"updated_at": 1_700_000_001},
    {"pubkey": "mallory"},
])
def test_altered_records_fail_the_signature(k: dict[str, Any], change: dict[str, Any]) -> None:
    rec = sign_record(k["center"], fields(k))
    if change.get("pubkey") == "mallory":
        change = {"pubkey": keys.public_key_pem(k["mallory"]).decode()}
    with pytest.raises(DirectorySignatureError) as ei:
        verify_record(k["center"].public_key(), {**rec, **change}, "alice")
    assert isinstance(ei.value, DirectoryError)
    # a directory failure, not a handshake one
    assert not isinstance(ei.value, (SignCheckError, HandshakeError))


def test_signature_by_another_key_fails(k: dict[str, Any]) -> None:
    rec = sign_record(k["mallory"], fields(k))
    with pytest.raises(DirectorySignatureError):
        verify_record(k["center"].public_key(), rec, "alice")


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
])
def test_malformed_records_refused(k: dict[str, Any], mutate: Any) -> None:
    rec = sign_record(k["center"], fields(k))
    with pytest.raises(DirectoryError):
        verify_record(k["center"].public_key(), mutate(rec), "alice")


def test_sign_record_validates(k: dict[str, Any]) -> None:
    for bad in ({"port": 0}, {"host": "a b"}, {"peer_id": "-x"}, {"pubkey": "nope"}):
        with pytest.raises(DirectoryError):
            sign_record(k["center"], fields(k, **bad))
    with pytest.raises(DirectoryError):
        sign_record(k["center"], {**fields(k), "extra": 1})


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
        verify_record(k["center"].public_key(), data, "alice")
    except DirectoryError:
        pass


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
                                             "sig", "timestamp", "nonce", "x"]), _values))
def test_structured_garbage_only_raises_directory_errors(k: dict[str, Any],
                                                         obj: dict[str, Any]) -> None:
    try:
        verify_record(k["center"].public_key(), obj, "alice")
    except DirectoryError:
        pass
    try:
        parse_update_request(obj)
    except DirectoryError:
        pass
