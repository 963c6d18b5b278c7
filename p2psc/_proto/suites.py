"""Cipher suites and per-direction record ciphers.

A record cipher is made from a 32-byte traffic secret (see :mod:`p2psc._proto.keyschedule`) and seals
or opens (``unseal``) one record given its 64-bit sequence number and its header (the associated data).

- ``aes-256-gcm`` and ``chacha20-poly1305``: key and 12-byte IV expanded from the secret with
  HKDF-SHA256; the nonce is the IV XOR the sequence number (as TLS 1.3 does); 16-byte tag.
- ``rc4-hmac-sha256`` (code 0x81): only for users who must match the original library, weak
  (RC4 has keystream biases), refused unless both sides set ``enable_rc4``. One continuous RC4
  keystream per direction and key: keyed once from the direction's secret, its first
  :data:`RC4_DROP` bytes thrown away, then every record takes the next bytes of it; a key
  update makes a new cipher (a new key, a new discard). Encrypt-then-MAC with HMAC-SHA256
  over sequence number, header and ciphertext; 32-byte tag. Because the keystream position
  depends on every earlier record, records must be sealed and opened strictly in sequence
  order with none missing: the suite is :attr:`Suite.stream_only` (TCP only); a record
  opened out of order fails authentication like a forged one.

  The first construction (code 0x80) restarted RC4 for every record with a key derived from
  the sequence number and no discard, so RC4's early-keystream biases (the second byte is
  0 twice as often as it should be) applied to every record; that code is refused.
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
           "RC4_DROP", "hkdf_expand"]

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

    def unseal(self, seq: int, ciphertext: Buffer, aad: Buffer) -> bytes: ...


class AeadCipher:
    """AES-GCM or ChaCha20-Poly1305 with a TLS 1.3 style nonce (IV XOR sequence number)."""

    __slots__ = ("aead", "iv", "tag_len")

    def __init__(self, factory: Callable[[bytes], AESGCM | ChaCha20Poly1305], secret: bytes):
        self.aead = factory(hkdf_expand(secret, b"key", 32))
        self.iv = int.from_bytes(hkdf_expand(secret, b"iv", 12), "big")
        self.tag_len = 16

    def seal(self, seq: int, plaintext: Buffer, aad: Buffer) -> bytes:
        return self.aead.encrypt((self.iv ^ seq).to_bytes(12, "big"), plaintext, aad)

    def unseal(self, seq: int, ciphertext: Buffer, aad: Buffer) -> bytes:
        try:
            return self.aead.decrypt((self.iv ^ seq).to_bytes(12, "big"), ciphertext, aad)
        except InvalidTag:
            raise CRCError("record failed authentication") from None


#: Keystream bytes thrown away after keying RC4 (RC4-drop[3072]: past the biased start).
RC4_DROP = 3072


class _Rc4Stream:
    """One RC4 keystream: keyed, :data:`RC4_DROP` bytes discarded, then used in order."""

    __slots__ = ("ctx", "next_seq", "used")

    def __init__(self, key: bytes, skip: int = 0):
        from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4

        self.ctx = Cipher(ARC4(key), mode=None).encryptor()  # RC4: encrypt == decrypt
        self.ctx.update(bytes(RC4_DROP + skip))
        self.next_seq = 0  # the record that takes the next keystream bytes
        self.used = skip   # keystream bytes given to records so far (for __copy__)


class Rc4HmacCipher:
    """RC4 (one continuous keystream per direction key, first 3,072 bytes dropped), then
    HMAC-SHA256 (encrypt-then-MAC). Weak; opt-in; records strictly in sequence order.

    Sealing and opening each have their own keystream (made on first use), so one object can
    open what it sealed, as an AEAD cipher can. ``seal`` raises :class:`ValueError` for a
    sequence number other than the next one; ``open`` raises :class:`CRCError` for one (a
    lost, reordered or replayed record cannot be decrypted), and a record that fails does not
    move the keystream.
    """

    __slots__ = ("_rc4_key", "_mac_key", "_secret", "_sealing", "_opening", "tag_len")

    def __init__(self, secret: bytes, *, sealing_at: tuple[int, int] | None = None,
                 opening_at: tuple[int, int] | None = None):
        self._rc4_key = hkdf_expand(secret, b"rc4 stream key", 32)
        self._mac_key = hkdf_expand(secret, b"rc4 mac", 32)
        self._secret = secret
        self._sealing = self._resumed(sealing_at)
        self._opening = self._resumed(opening_at)
        self.tag_len = 32

    def _resumed(self, at: tuple[int, int] | None) -> _Rc4Stream | None:
        """A keystream at (bytes used, next sequence number), for a copy."""
        if at is None:
            return None
        st = _Rc4Stream(self._rc4_key, at[0])
        st.next_seq = at[1]
        return st

    @staticmethod
    def _position(st: _Rc4Stream | None) -> tuple[int, int] | None:
        return None if st is None else (st.used, st.next_seq)

    def __copy__(self) -> Rc4HmacCipher:
        """An independent cipher at the same keystream positions (OpenSSL's RC4 state cannot
        be copied, so the copy is keyed again and skips what this one used)."""
        return Rc4HmacCipher(self._secret, sealing_at=self._position(self._sealing),
                             opening_at=self._position(self._opening))

    def _mac(self, seq: int, aad: Buffer, ct: Buffer) -> hmac.HMAC:
        h = hmac.HMAC(self._mac_key, _SHA256)
        h.update(seq.to_bytes(8, "big"))
        h.update(aad)
        h.update(ct)
        return h

    def seal(self, seq: int, plaintext: Buffer, aad: Buffer) -> bytes:
        st = self._sealing
        if st is None:
            st = self._sealing = _Rc4Stream(self._rc4_key)
        if seq != st.next_seq:
            raise ValueError(f"rc4-hmac-sha256 seals records in order: record {seq} sealed "
                             f"when {st.next_seq} is next")
        ct = st.ctx.update(plaintext)
        st.next_seq += 1
        st.used += len(ct)
        return ct + self._mac(seq, aad, ct).finalize()

    def unseal(self, seq: int, ciphertext: Buffer, aad: Buffer) -> bytes:
        if len(ciphertext) < 32:
            raise CRCError("record failed authentication")
        st = self._opening
        if st is None:
            st = self._opening = _Rc4Stream(self._rc4_key)
        if seq != st.next_seq:  # a gap or a reordering: the keystream position is unknown
            raise CRCError("record failed authentication")
        mv = memoryview(ciphertext)
        ct, tag = mv[:-32], mv[-32:]
        try:
            self._mac(seq, aad, ct).verify(bytes(tag))  # constant-time comparison
        except InvalidSignature:
            raise CRCError("record failed authentication") from None
        pt = st.ctx.update(ct)
        st.next_seq += 1
        st.used += len(pt)
        return pt


@dataclass(frozen=True)
class Suite:
    """A cipher suite: its wire code, name, and how to make a record cipher from a secret."""

    code: int
    name: str
    weak: bool
    tag_len: int
    make_cipher: Callable[[bytes], RecordCipher]
    #: The cipher needs every record, in sequence order (a continuous keystream): usable on
    #: TCP, which delivers records in order, not over UDP, where datagrams are lost and
    #: reordered. A UDP endpoint must refuse such a suite (to propose and to accept).
    stream_only: bool = False


SUITES = (
    Suite(1, "aes-256-gcm", False, 16, functools.partial(AeadCipher, AESGCM)),
    Suite(2, "chacha20-poly1305", False, 16, functools.partial(AeadCipher, ChaCha20Poly1305)),
    Suite(0x81, "rc4-hmac-sha256", True, 32, Rc4HmacCipher, stream_only=True),
)
SUITES_BY_NAME = {s.name: s for s in SUITES}
SUITES_BY_CODE = {s.code: s for s in SUITES}
