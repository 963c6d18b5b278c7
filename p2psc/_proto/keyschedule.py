"""The key schedule: traffic secrets from the handshake, the FINISHED MAC, and key updates.

::

    ikm        = key_material (32 B, RSA-OAEP transported) || X25519(eph_i, eph_r) (32 B)
    okm        = HKDF-SHA256(salt = nonce_i || nonce_r, ikm,
                             info = "p2psc v1 traffic" || suite code (1 B) || transcript hash,
                             L = 96)
    i2r secret = okm[0:32]     initiator -> responder
    r2i secret = okm[32:64]    responder -> initiator
    finished   = okm[64:96]
    next secret (KEY_UPDATE) = HKDF-Expand-SHA256(secret, "p2psc v1 key update", 32)
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .suites import hkdf_expand

__all__ = ["TrafficSecrets", "derive_traffic_secrets", "next_secret", "finished_mac"]


@dataclass(frozen=True)
class TrafficSecrets:
    """The secrets one handshake yields."""

    i2r: bytes
    r2i: bytes
    finished_key: bytes


def derive_traffic_secrets(key_material: bytes, dh_shared: bytes, nonce_i: bytes, nonce_r: bytes,
                           suite_code: int, transcript_hash: bytes) -> TrafficSecrets:
    """Derive both directions' traffic secrets and the FINISHED key."""
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=nonce_i + nonce_r,
               info=b"p2psc v1 traffic" + bytes([suite_code]) + transcript_hash,
               ).derive(key_material + dh_shared)
    return TrafficSecrets(okm[0:32], okm[32:64], okm[64:96])


def next_secret(secret: bytes) -> bytes:
    """The traffic secret after a KEY_UPDATE (a one-way ratchet)."""
    return hkdf_expand(secret, b"key update", 32)


def finished_mac(finished_key: bytes, transcript_hash: bytes) -> bytes:
    """HMAC-SHA256(finished_key, "p2psc v1 finished" || transcript hash)."""
    h = hmac.HMAC(finished_key, hashes.SHA256())
    h.update(b"p2psc v1 finished" + transcript_hash)
    return h.finalize()
