"""The RSA operations of the protocol (RSA-PSS-SHA256 signatures, RSA-OAEP-SHA256 key
transport) and the peer id rule, with no file access: the sans-IO core and :mod:`p2psc.keys`
(which loads and saves keys) both use them, so the padding choices live in one place."""

from __future__ import annotations

import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from ..p2pexcept import ConfigError, SignCheckError

__all__ = ["MIN_RSA_BITS", "MAX_RSA_BITS", "WINDOWS_DEVICE_NAMES", "validate_peer_id",
           "fingerprint", "same_public_key", "sign", "verify", "encrypt", "decrypt"]

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_SHA256 = hashes.SHA256()

# Peer ids name files (<peer_id>.pubkey.pem), so they are restricted to a safe alphabet.
_PEER_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,127}")
#: Windows device names: a file named so (with any extension, in any case) is the device.
WINDOWS_DEVICE_NAMES = frozenset(
    ["con", "prn", "aux", "nul"]
    + [f"{dev}{n}" for dev in ("com", "lpt") for n in range(10)])


def validate_peer_id(peer_id: object) -> str:
    """Return ``peer_id`` if it is a valid peer id, else raise :class:`ConfigError`.

    A peer id is 1 to 128 characters of ``A-Z a-z 0-9 . _ @ -``, not starting with
    ``.``, ``-`` or ``@`` (ids name files, so no path separators are possible), whose part
    before the first ``.`` is not a Windows device name (``CON``, ``PRN``, ``AUX``, ``NUL``,
    ``COM0``-``COM9``, ``LPT0``-``LPT9``, in any case: ``con.example`` is refused too).

    Ids are case-sensitive, but two ids that differ only in case name one file on macOS and
    Windows; :mod:`p2psc.config` refuses to hold both (see :func:`p2psc.config.case_twin`).
    """
    if not isinstance(peer_id, str) or not _PEER_ID_RE.fullmatch(peer_id):
        raise ConfigError(f"invalid peer id {peer_id!r}: use 1-128 of A-Z a-z 0-9 . _ @ -")
    if peer_id.split(".", 1)[0].lower() in WINDOWS_DEVICE_NAMES:
        raise ConfigError(f"invalid peer id {peer_id!r}: {peer_id.split('.', 1)[0]} is a "
                          "Windows device name, which cannot name a file")
    return peer_id


def fingerprint(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> str:
    """A short fingerprint to compare out loud: the first 128 bits of SHA-256 over the DER
    public key, in 8 groups of 4 hex digits, e.g. ``SHA256:1f0c 9a2e ...``."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).hexdigest()[:32]
    return "SHA256:" + " ".join(digest[i:i + 4] for i in range(0, 32, 4))


def same_public_key(a: rsa.RSAPublicKey, b: rsa.RSAPublicKey) -> bool:
    """True when two public keys are the same key."""
    return a.public_numbers() == b.public_numbers()


def sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """RSA-PSS-SHA256 signature."""
    return key.sign(data, _PSS, _SHA256)


def verify(key: rsa.RSAPublicKey, signature: bytes, data: bytes, what: str = "signature") -> None:
    """Verify an RSA-PSS-SHA256 signature; raise :class:`SignCheckError` if it does not verify.

    A signature is exactly as long as the modulus (RFC 8017, 8.1.2: "If the length of the
    signature S is not k octets, output 'invalid signature'"). OpenSSL also accepts one with
    its leading zero bytes stripped, so the length is checked here first: every signature in
    p2psc (handshake, directory records and updates) is checked by this function.
    """
    if len(signature) != (key.key_size + 7) // 8:
        raise SignCheckError(f"{what} does not verify (not as long as the key's modulus)")
    try:
        key.verify(signature, data, _PSS, _SHA256)
    except InvalidSignature:
        raise SignCheckError(f"{what} does not verify") from None


def encrypt(key: rsa.RSAPublicKey, data: bytes) -> bytes:
    """RSA-OAEP-SHA256 encryption."""
    return key.encrypt(data, _OAEP)


def decrypt(key: rsa.RSAPrivateKey, ciphertext: bytes) -> bytes | None:
    """RSA-OAEP-SHA256 decryption; ``None`` on any failure (the caller reports one generic error)."""
    try:
        return key.decrypt(ciphertext, _OAEP)
    except ValueError:
        return None
