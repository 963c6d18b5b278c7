"""The self-service address update request: building, canonical encoding, and parsing.

A registered peer changes its own ``host`` and ``port`` by POSTing::

    {"peer_id", "host", "port", "timestamp", "nonce", "sig"}

``timestamp`` is unix seconds, ``nonce`` 16 random bytes in lowercase hex, and ``sig`` base64 of
the peer's own RSA-PSS-SHA256 signature over::

    b"p2psc directory update v1\\n" + canonical JSON of the other five fields

(sorted keys, separators ``(",", ":")``, ASCII). The server checks the signature with the
public key it has on file for ``peer_id``, the timestamp against its clock and against the
last update it accepted for the peer (it must be newer), and that the nonce was not seen
before. Its answer is the new record, signed with this request's nonce. See docs/DIRECTORY.md.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from .. import keys
from ..p2pexcept import DirectoryError, SignCheckError
from .record import (
    NONCE_BYTES,
    DirectorySignatureError,
    canonical_json,
    check_host,
    check_nonce,
    check_peer_id,
    check_port,
    check_timestamp,
    decode_sig,
)

__all__ = [
    "MAX_UPDATE_BODY",
    "NONCE_BYTES",
    "UPDATE_FIELDS",
    "UPDATE_PREFIX",
    "UpdateRequest",
    "canonical_update_bytes",
    "make_update_request",
    "parse_update_request",
]

#: Domain-separation prefix of the signed update encoding.
UPDATE_PREFIX = b"p2psc directory update v1\n"
#: The signed fields of an update request (every field except ``sig``).
UPDATE_FIELDS = ("host", "nonce", "peer_id", "port", "timestamp")
#: Largest update request body the server reads, in bytes.
MAX_UPDATE_BODY = 4 * 1024


@dataclass(frozen=True)
class UpdateRequest:
    """A well-formed update request whose signature has not been checked yet."""

    peer_id: str
    host: str
    port: int
    timestamp: int
    nonce: str
    sig: bytes

    def signed_fields(self) -> dict[str, Any]:
        """The five signed fields."""
        return {"peer_id": self.peer_id, "host": self.host, "port": self.port,
                "timestamp": self.timestamp, "nonce": self.nonce}

    def verify(self, peer_public_key: rsa.RSAPublicKey) -> None:
        """Check ``sig`` with the peer's public key; raise :class:`DirectorySignatureError`."""
        try:
            keys.verify(peer_public_key, self.sig, canonical_update_bytes(self.signed_fields()),
                        "update request signature")
        except SignCheckError as exc:
            raise DirectorySignatureError(str(exc)) from None


def canonical_update_bytes(fields: Mapping[str, Any]) -> bytes:
    """The bytes a peer signs: :data:`UPDATE_PREFIX` + canonical JSON of the five fields."""
    body = {k: v for k, v in fields.items() if k != "sig"}
    if set(body) != set(UPDATE_FIELDS):
        raise DirectoryError(f"update fields must be exactly {', '.join(UPDATE_FIELDS)}")
    return UPDATE_PREFIX + canonical_json(body)


def make_update_request(peer_id: str, private_key: rsa.RSAPrivateKey, host: str, port: int, *,
                        timestamp: int | None = None, nonce: str | None = None) -> dict[str, Any]:
    """Build the signed JSON object of an address update (fresh timestamp and nonce by default)."""
    fields = {
        "peer_id": check_peer_id(peer_id),
        "host": check_host(host),
        "port": check_port(port),
        "timestamp": check_timestamp(int(time.time()) if timestamp is None else timestamp,
                                     "timestamp"),
        "nonce": check_nonce(secrets.token_hex(NONCE_BYTES) if nonce is None else nonce),
    }
    sig = keys.sign(private_key, canonical_update_bytes(fields))
    return {**fields, "sig": base64.b64encode(sig).decode("ascii")}


def parse_update_request(obj: Mapping[str, Any]) -> UpdateRequest:
    """Strictly validate a parsed update request object (exact keys and types); raise
    :class:`DirectoryError` when it is malformed. The signature is checked separately."""
    if set(obj) != {*UPDATE_FIELDS, "sig"}:
        raise DirectoryError("update request: fields must be exactly "
                             f"{', '.join(sorted({*UPDATE_FIELDS, 'sig'}))}")
    nonce = check_nonce(obj["nonce"])
    return UpdateRequest(
        peer_id=check_peer_id(obj["peer_id"]),
        host=check_host(obj["host"]),
        port=check_port(obj["port"]),
        timestamp=check_timestamp(obj["timestamp"], "timestamp"),
        nonce=nonce,
        sig=decode_sig(obj["sig"]),
    )
