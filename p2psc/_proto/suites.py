"""Cipher suites and per-direction record ciphers.

A record cipher is made from a 32-byte traffic secret (see :mod:`p2psc.keyschedule`) and seals
or opens one record given its 64-bit sequence number and its header (the associated data).

- ``aes-256-gcm`` and ``chacha20-poly1305``: key and 12-byte IV expanded from the secret with
  HKDF-SHA256; the nonce is the IV XOR the sequence number (as TLS 1.3 does); 16-byte tag.
- ``rc4-hmac-sha256``: only for users who must match the original library, weak (RC4 has
  keystream biases), refused unless both sides set ``enable_rc4``. A fresh RC4 key per record
  (HMAC-SHA256 of the sequence number under the direction's RC4 key), encrypt-then-MAC with
  HMAC-SHA256 over sequence number, header and ciphertext; 32-byte tag.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ..p2pexcept import CRCError

__all__ = ["Suite", "RecordCipher", "SUITES", "SUITES_BY_NAME", "SUITES_BY_CODE",
           "hkdf_expand"]

_SHA256 = hashes.SHA256()
#: What the ciphers take: any bytes-like object.
Buffer = Union[bytes, bytearray, memoryview]


def hkdf_expand(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-SHA256 with info ``b"p2psc v1 " + label``."""
    return HKDFExpand(algorithm=_SHA256, length=length, info=b"p2psc v1 " + label).derive(secret)


class RecordCipher(Protocol):
    """Seals and opens records of one direction."""

    tag_len: int

    def seal(self, seq: int, plaintext: Buffer, aad: Buffer) -> bytes: ...

    def open(self, seq: int, ciphertext: Buffer, aad: Buffer) -> bytes: ...


class AeadCipher:
    """AES-GCM or ChaCha20-Poly1305 with a TLS 1.3 style nonce (IV XOR sequence number)."""

    __slots__ = ("aead", "iv", "tag_len")

    def __init__(self, factory: Callable[[bytes], AESGCM | ChaCha20Poly1305], secret: bytes):
        self.aead = factory(hkdf_expand(secret, b"key", 32))
        self.iv = int.from_bytes(hkdf_expand(secret, b"iv", 12), "big")
        self.tag_len = 16

    def seal(self, seq: int, plaintext: Buffer, aad: Buffer) -> bytes:
        return self.aead.encrypt((self.iv ^ seq).to_bytes(12, "big"), plaintext, aad)

    def open(self, seq: int, ciphertext: Buffer, aad: Buffer) -> bytes:
        try:
            return self.aead.decrypt((self.iv ^ seq).to_bytes(12, "big"), ciphertext, aad)
        except InvalidTag:
            raise CRCError("record failed authentication") from None


class Rc4HmacCipher:
    """RC4 with a fresh key per record, then HMAC-SHA256 (encrypt-then-MAC). Weak; opt-in."""

    __slots__ = ("_rc4_key", "_mac_key", "tag_len")

    def __init__(self, secret: bytes):
        self._rc4_key = hkdf_expand(secret, b"rc4 key", 32)
        self._mac_key = hkdf_expand(secret, b"rc4 mac", 32)
        self.tag_len = 32

    def _keystream_cipher(self, seq: int) -> Cipher:  # type: ignore[type-arg]
        from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4

        h = hmac.HMAC(self._rc4_key, _SHA256)
        h.update(seq.to_bytes(8, "big"))
        return Cipher(ARC4(h.finalize()), mode=None)

    def _mac(self, seq: int, aad: Buffer, ct: Buffer) -> hmac.HMAC:
        h = hmac.HMAC(self._mac_key, _SHA256)
        h.update(seq.to_bytes(8, "big"))
        h.update(aad)
        h.update(ct)
        return h

    def seal(self, seq: int, plaintext: Buffer, aad: Buffer) -> bytes:
        ct = self._keystream_cipher(seq).encryptor().update(plaintext)
        return ct + self._mac(seq, aad, ct).finalize()

    def open(self, seq: int, ciphertext: Buffer, aad: Buffer) -> bytes:
        if len(ciphertext) < 32:
            raise CRCError("record failed authentication")
        mv = memoryview(ciphertext)
        ct, tag = mv[:-32], mv[-32:]
        try:
            self._mac(seq, aad, ct).verify(bytes(tag))  # constant-time comparison
        except InvalidSignature:
            raise CRCError("record failed authentication") from None
        return self._keystream_cipher(seq).decryptor().update(ct)


@dataclass(frozen=True)
class Suite:
    """A cipher suite: its wire code, name, and how to make a record cipher from a secret."""

    code: int
    name: str
    weak: bool
    tag_len: int
    make_cipher: Callable[[bytes], RecordCipher]


SUITES = (
    Suite(1, "aes-256-gcm", False, 16, functools.partial(AeadCipher, AESGCM)),
    Suite(2, "chacha20-poly1305", False, 16, functools.partial(AeadCipher, ChaCha20Poly1305)),
    Suite(0x80, "rc4-hmac-sha256", True, 32, Rc4HmacCipher),
)
SUITES_BY_NAME = {s.name: s for s in SUITES}
SUITES_BY_CODE = {s.code: s for s in SUITES}
