"""The directory record test vector (test/vectors/directory-record-v2.json, format v2 of
docs/DIRECTORY.md): a record signed by a committed test center key, checked with p2psc and
independently (the canonical bytes rebuilt with json.dumps, RSA-PSS verified with
cryptography directly), so the vector pins the wire format, not just the code."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from p2psc import keys
from p2psc.directory.record import RECORD_PREFIX, canonical_record_bytes, verify_record
from p2psc.p2pexcept import DirectoryError, DirectorySignatureError

V = json.loads((Path(__file__).parent / "vectors" / "directory-record-v2.json").read_text())
NONCE = V["lookup"]["nonce"]
PEER = V["lookup"]["id"]


def center() -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(V["center_pubkey"].encode())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def independent_signed_bytes(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "sig"}
    return b"p2psc directory record v2\n" + json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def test_vector_signed_bytes() -> None:
    rec = V["record"]
    signed = V["signed_bytes"].encode("ascii")
    assert signed.startswith(RECORD_PREFIX) and RECORD_PREFIX == b"p2psc directory record v2\n"
    assert canonical_record_bytes(rec) == independent_signed_bytes(rec) == signed
    assert hashlib.sha256(signed).hexdigest() == V["signed_bytes_sha256"]
    assert set(rec) == {"peer_id", "pubkey", "host", "port", "updated_at", "expires_at",
                        "nonce", "sig"}
    assert keys.fingerprint(center()) == V["center_fingerprint"]


def test_vector_signature_verifies_independently() -> None:
    for rec in (V["record"], V["record_without_nonce"]):
        center().verify(base64.b64decode(rec["sig"], validate=True), independent_signed_bytes(rec),
                        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                        hashes.SHA256())
    altered = {**V["record"], "expires_at": V["record"]["expires_at"] + 1}
    with pytest.raises(InvalidSignature):
        center().verify(base64.b64decode(altered["sig"]), independent_signed_bytes(altered),
                        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                        hashes.SHA256())


def test_vector_verifies_within_its_window_for_its_nonce() -> None:
    for now in V["valid_at"]:
        rec = verify_record(center(), json.dumps(V["record"]), PEER, nonce=NONCE, now=now)
        assert (rec.nonce, rec.expires_at, rec.port) == (NONCE, V["record"]["expires_at"],
                                                         V["record"]["port"])
    with pytest.raises(DirectoryError, match="expired"):
        verify_record(center(), V["record"], PEER, nonce=NONCE, now=V["expired_at"])
    with pytest.raises(DirectoryError, match="another request"):
        verify_record(center(), V["record"], PEER, nonce="ff" * 16, now=V["valid_at"][0])
    # the answer to a lookup without a nonce: valid, but not as an answer to this lookup
    plain = V["record_without_nonce"]
    assert plain["nonce"] is None
    assert verify_record(center(), plain, PEER, nonce=None, now=V["valid_at"][0]).nonce is None
    with pytest.raises(DirectoryError, match="another request"):
        verify_record(center(), plain, PEER, nonce=NONCE, now=V["valid_at"][0])


@pytest.mark.parametrize("field", ["peer_id", "host", "port", "updated_at", "expires_at",
                                   "nonce", "pubkey"])
def test_vector_altered_field_fails(field: str) -> None:
    rec = dict(V["record"])
    rec[field] = {"peer_id": PEER, "host": "192.0.2.8", "port": 10100,
                  "updated_at": rec["updated_at"] + 1, "expires_at": rec["expires_at"] + 1,
                  "nonce": "ee" * 16,
                  "pubkey": keys.public_key_pem(keys.generate_private_key(2048)).decode()}[field]
    if field == "peer_id":  # another peer's id is refused before the signature
        rec["peer_id"] = "vector2.test"
        with pytest.raises(DirectoryError, match="another peer"):
            verify_record(center(), rec, PEER, nonce=None, now=V["valid_at"][0])
        return
    with pytest.raises(DirectorySignatureError):
        verify_record(center(), rec, PEER, nonce=None, now=V["valid_at"][0])
