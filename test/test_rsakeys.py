"""RSA-PSS signatures (p2psc._proto.rsakeys.verify, used by the handshake and the directory):
a signature must be exactly as long as the modulus; OpenSSL alone also accepts one whose
leading zero byte was stripped."""

from __future__ import annotations

import time

import base64
import random

import pytest
from conftest import rsa_key

from p2psc import keys
from p2psc._proto import rsakeys
from p2psc.directory.record import sign_record, verify_record
from p2psc.p2pexcept import DirectorySignatureError, SignCheckError

KEY = rsa_key("alice")
MODULUS_LEN = (KEY.key_size + 7) // 8


def _signature_with_a_leading_zero() -> tuple[bytes, bytes]:
    """A message and its signature whose first byte is 0 (about 1 in 130 to 1 in 256
    signatures of a 2048-bit key; PSS is randomized, so the loop is bounded, not seeded)."""
    rng = random.Random(9)
    for _ in range(20_000):
        msg = rng.randbytes(24)
        sig = rsakeys.sign(KEY, msg)
        if sig[0] == 0:
            return msg, sig
    raise AssertionError("no signature with a leading zero byte in 20,000")


def test_a_signature_without_its_leading_zero_byte_is_refused() -> None:
    msg, sig = _signature_with_a_leading_zero()
    assert len(sig) == MODULUS_LEN
    rsakeys.verify(KEY.public_key(), sig, msg)  # the full-length signature verifies
    keys.verify(KEY.public_key(), sig, msg)     # (the same function, re-exported)
    with pytest.raises(SignCheckError, match="modulus"):
        rsakeys.verify(KEY.public_key(), sig[1:], msg)
    with pytest.raises(SignCheckError):
        rsakeys.verify(KEY.public_key(), b"\x00" + sig, msg)
    with pytest.raises(SignCheckError):
        rsakeys.verify(KEY.public_key(), b"", msg)


def test_a_directory_record_signature_without_its_leading_zero_byte_is_refused() -> None:
    center = rsa_key("center")
    now = int(time.time())
    fields = {"peer_id": "bob.test", "host": "127.0.0.1", "port": 4000,
              "pubkey": keys.public_key_pem(rsa_key("bob")).decode("ascii"), "updated_at": 0,
              "expires_at": now + 3600, "nonce": "cd" * 16}
    for t in range(1, 20_000):
        record = sign_record(center, {**fields, "updated_at": t})
        sig = base64.b64decode(record["sig"])
        if sig[0] == 0:
            break
    else:
        raise AssertionError("no record signature with a leading zero byte")
    assert verify_record(center.public_key(), record, "bob.test", nonce="cd" * 16,
                         now=now).updated_at == t
    stripped = {**record, "sig": base64.b64encode(sig[1:]).decode("ascii")}
    with pytest.raises(DirectorySignatureError):
        verify_record(center.public_key(), stripped, "bob.test", nonce="cd" * 16, now=now)
