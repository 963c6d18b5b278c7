"""The directory record: its fields, its canonical encoding, and the center's signature over it.

A record (format v2) is the JSON object
``{"peer_id", "pubkey", "host", "port", "updated_at", "expires_at", "nonce", "sig"}``.
``sig`` is base64 (standard alphabet, padded) of the center's RSA-PSS-SHA256 signature over
:func:`canonical_record_bytes` of the other seven fields::

    b"p2psc directory record v2\\n" + json.dumps(fields, sort_keys=True,
                                                 separators=(",", ":"), ensure_ascii=True)

``expires_at`` (unix seconds) ends the record's validity; ``nonce`` is the 32 hex digits the
client sent with its lookup (or ``null`` for a lookup without one), so an answer cannot be
replayed to a client that asked with another nonce. v1 records (prefix ``... v1``, no
``expires_at``, no ``nonce``) never expired; they are refused.

Parsing is strict: exactly these eight keys, exact types, bounded sizes, no duplicate keys,
and the ``peer_id`` must be the one that was asked for. See docs/DIRECTORY.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from .. import keys, validators
from ..config import DIRECTORY_CLOCK_SKEW
from ..p2pexcept import ConfigError, DirectoryError, DirectorySignatureError, SignCheckError
from ..validators import MAX_HOST_LEN

__all__ = [
    "CENTER_PEER_ID",
    "CLOCK_SKEW",
    "DEFAULT_RECORD_TTL",
    "MAX_HOST_LEN",
    "MAX_PUBKEY_LEN",
    "MAX_RECORD_BODY",
    "MAX_RECORD_TTL",
    "MIN_RECORD_TTL",
    "NONCE_BYTES",
    "RECORD_FIELDS",
    "RECORD_PREFIX",
    "RECORD_PREFIX_V1",
    "DirectorySignatureError",
    "PeerRecord",
    "canonical_json",
    "canonical_record_bytes",
    "check_host",
    "check_nonce",
    "check_peer_id",
    "check_port",
    "check_pubkey_pem",
    "loads_strict",
    "sign_record",
    "verify_record",
]

#: Domain-separation prefix of the signed record encoding (format v2: with expires_at and nonce).
RECORD_PREFIX = b"p2psc directory record v2\n"
#: The prefix of format v1 (records without expiry), never signed nor accepted any more.
RECORD_PREFIX_V1 = b"p2psc directory record v1\n"
#: The signed fields, i.e. every record field except ``sig``.
RECORD_FIELDS = ("expires_at", "host", "nonce", "peer_id", "port", "pubkey", "updated_at")
_V1_FIELDS = frozenset({"host", "peer_id", "port", "pubkey", "updated_at", "sig"})
#: Validity of a signed record by default (``p2psc directory serve --record-ttl``), seconds.
DEFAULT_RECORD_TTL = 24 * 3600
#: Bounds of the server's record validity. A client refuses a record valid for longer than
#: MAX_RECORD_TTL (+ the clock skew) from now, whatever the server was configured with.
MIN_RECORD_TTL = 60
MAX_RECORD_TTL = 7 * 24 * 3600
#: Clock difference tolerated between a client and the center: a record is still accepted
#: CLOCK_SKEW seconds after its expires_at (the same rule applies to a cached key).
CLOCK_SKEW = DIRECTORY_CLOCK_SKEW
#: Lookup nonce length in bytes (sent as 32 lowercase hex digits).
NONCE_BYTES = 16
_NONCE_RE = re.compile(f"[0-9a-f]{{{2 * NONCE_BYTES}}}")
#: Largest record body (HTTP response body or JSON text) accepted, in bytes.
MAX_RECORD_BODY = 16 * 1024
#: Longest PEM public key accepted (an 8192-bit SubjectPublicKeyInfo PEM is about 1.5 KB).
MAX_PUBKEY_LEN = 8 * 1024
#: Longest base64 signature accepted (an 8192-bit RSA signature is 1368 base64 characters).
MAX_SIG_B64_LEN = 2048
#: The reserved peer id of the directory's signing key.
CENTER_PEER_ID = "p2psc_center"
#: Timestamps must fit in a signed 64-bit integer (SQLite INTEGER).
MAX_TIMESTAMP = 2**63 - 1



def check_peer_id(value: object, what: str = "peer_id") -> str:
    """Return a valid peer id or raise :class:`DirectoryError` (:func:`p2psc.validators.check_peer_id`)."""
    return validators.check_peer_id(value, what, error=DirectoryError)


def check_host(value: object, what: str = "host") -> str:
    """Return a host (DNS name or IP literal, 1-253 safe ASCII characters) or raise
    :class:`DirectoryError` (:func:`p2psc.validators.check_host`)."""
    return validators.check_host(value, what, error=DirectoryError)


def check_port(value: object, what: str = "port") -> int:
    """Return a TCP/UDP port 1..65535 (an ``int``, not a bool or a string) or raise
    :class:`DirectoryError` (:func:`p2psc.validators.check_port`)."""
    return validators.check_port(value, what, error=DirectoryError)


def check_timestamp(value: object, what: str = "updated_at") -> int:
    """Return a non-negative integer of unix seconds or raise."""
    if type(value) is not int or not 0 <= value <= MAX_TIMESTAMP:
        raise DirectoryError(f"{what}: must be a non-negative integer (unix seconds)")
    return value


def check_nonce(value: object, what: str = "nonce") -> str:
    """Return a nonce of 32 lowercase hex digits (16 bytes) or raise :class:`DirectoryError`."""
    if not isinstance(value, str) or not _NONCE_RE.fullmatch(value):
        raise DirectoryError(f"{what}: must be {2 * NONCE_BYTES} lowercase hex digits")
    return value


def check_pubkey_pem(value: object, what: str = "pubkey") -> rsa.RSAPublicKey:
    """Parse a PEM RSA public key given as a string; raise :class:`DirectoryError` if it is not one."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_PUBKEY_LEN:
        raise DirectoryError(f"{what}: must be a PEM string of at most {MAX_PUBKEY_LEN} characters")
    try:
        data = value.encode("ascii")
    except UnicodeEncodeError:
        raise DirectoryError(f"{what}: not ASCII") from None
    try:
        return keys.parse_public_key(data, what)
    except ConfigError as exc:
        raise DirectoryError(str(exc)) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise DirectoryError(f"duplicate key {k!r} in JSON")
        obj[k] = v
    return obj


def _no_constants(name: str) -> Any:
    raise DirectoryError(f"{name} is not allowed in JSON")


def loads_strict(body: bytes | str, limit: int = MAX_RECORD_BODY,
                 what: str = "body") -> dict[str, Any]:
    """Parse a JSON object of at most ``limit`` bytes: no duplicate keys, no NaN/Infinity.

    Raises :class:`DirectoryError` on anything else (size checked before parsing).
    """
    if len(body) > limit:
        raise DirectoryError(f"{what}: larger than {limit} bytes")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise DirectoryError(f"{what}: not UTF-8") from None
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except DirectoryError as exc:
        raise DirectoryError(f"{what}: {exc}") from None
    except (ValueError, RecursionError):
        raise DirectoryError(f"{what}: malformed JSON") from None
    if not isinstance(obj, dict):
        raise DirectoryError(f"{what}: not a JSON object")
    return obj


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """Sorted-key, compact, ASCII-only JSON: the canonical form both sides can recompute."""
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode("ascii")


def canonical_record_bytes(fields: Mapping[str, Any]) -> bytes:
    """The bytes the center signs: :data:`RECORD_PREFIX` + canonical JSON of the seven fields.

    ``fields`` may contain ``sig`` (it is left out); any other key is an error.
    """
    body = {k: v for k, v in fields.items() if k != "sig"}
    if set(body) != set(RECORD_FIELDS):
        raise DirectoryError(f"record fields must be exactly {', '.join(RECORD_FIELDS)}")
    return RECORD_PREFIX + canonical_json(body)


@dataclass(frozen=True)
class PeerRecord:
    """A directory record whose center signature, freshness and nonce have been verified.

    ``public_key`` is the parsed ``pubkey``; ``sig`` is kept so the record can be stored or
    passed on and re-verified later (until ``expires_at``).
    """

    peer_id: str
    pubkey: str
    host: str
    port: int
    updated_at: int
    expires_at: int
    nonce: str | None
    sig: str
    public_key: rsa.RSAPublicKey = field(repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """The public key's fingerprint (see :func:`p2psc.keys.fingerprint`)."""
        return keys.fingerprint(self.public_key)

    def to_dict(self) -> dict[str, Any]:
        """The record as its JSON object (the eight wire fields)."""
        return {"peer_id": self.peer_id, "pubkey": self.pubkey, "host": self.host,
                "port": self.port, "updated_at": self.updated_at, "expires_at": self.expires_at,
                "nonce": self.nonce, "sig": self.sig}


def _validated_fields(obj: Mapping[str, Any]) -> tuple[dict[str, Any], rsa.RSAPublicKey]:
    fields = {
        "peer_id": check_peer_id(obj.get("peer_id")),
        "pubkey": obj.get("pubkey"),
        "host": check_host(obj.get("host")),
        "port": check_port(obj.get("port")),
        "updated_at": check_timestamp(obj.get("updated_at")),
        "expires_at": check_timestamp(obj.get("expires_at"), "expires_at"),
        "nonce": None if obj.get("nonce") is None else check_nonce(obj.get("nonce")),
    }
    pub = check_pubkey_pem(fields["pubkey"])
    return fields, pub


def sign_record(center_private_key: rsa.RSAPrivateKey, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the seven record fields and return the record JSON object with the center's
    ``sig``. ``nonce`` may be ``None`` (a lookup without a nonce)."""
    if set(fields) - {"sig"} != set(RECORD_FIELDS):
        raise DirectoryError(f"record fields must be exactly {', '.join(RECORD_FIELDS)}")
    clean, _ = _validated_fields(fields)
    sig = keys.sign(center_private_key, canonical_record_bytes(clean))
    return {**clean, "sig": base64.b64encode(sig).decode("ascii")}


def decode_sig(value: object, what: str = "sig") -> bytes:
    """Strictly decode a base64 signature string of bounded length, or raise."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_SIG_B64_LEN:
        raise DirectoryError(f"{what}: must be a base64 string of at most {MAX_SIG_B64_LEN} characters")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise DirectoryError(f"{what}: not valid base64") from None


def verify_record(center_public_key: rsa.RSAPublicKey, obj: Mapping[str, Any] | bytes | str,
                  expected_peer_id: str, *, nonce: str | None,
                  now: float | None = None) -> PeerRecord:
    """Check a record (a parsed JSON object, or its JSON text) and return it as a :class:`PeerRecord`.

    ``nonce`` is the nonce the client sent with its lookup: the record's signed ``nonce`` must
    be exactly that (an answer to another request, or a replayed one, is refused). ``None``
    checks no nonce: only for a record that was not fetched with one (e.g. re-verifying a
    stored record). ``now`` (unix seconds, default :func:`time.time`) must not be more than
    :data:`CLOCK_SKEW` seconds past ``expires_at``, and ``expires_at`` not more than
    :data:`MAX_RECORD_TTL` + :data:`CLOCK_SKEW` seconds ahead of it.

    Raises :class:`DirectoryError` when it is malformed, oversized, for another peer, in the
    old v1 format, expired, or for another nonce, and :class:`DirectorySignatureError` (a
    :class:`DirectoryError` only) when the center's signature does not verify. The signature is
    checked before the nonce and the time. Nothing from an unverified record is ever returned.
    """
    if isinstance(obj, (bytes, bytearray, str)):
        obj = loads_strict(obj, MAX_RECORD_BODY, "directory record")
    if not isinstance(obj, Mapping):
        raise DirectoryError("directory record: not a JSON object")
    if set(obj) == _V1_FIELDS:
        raise DirectoryError("directory record in the old v1 format (no expires_at, no nonce): "
                             "refused, v1 records never expire; upgrade the directory server")
    if set(obj) != {*RECORD_FIELDS, "sig"}:
        raise DirectoryError("directory record: fields must be exactly "
                             f"{', '.join(sorted({*RECORD_FIELDS, 'sig'}))}")
    fields, pub = _validated_fields(obj)
    if fields["peer_id"] != expected_peer_id:
        raise DirectoryError(f"directory record is for another peer than {expected_peer_id!r}")
    sig = decode_sig(obj["sig"])
    try:
        keys.verify(center_public_key, sig, canonical_record_bytes(fields),
                    "directory record signature")
    except SignCheckError as exc:
        raise DirectorySignatureError(f"{exc} for peer {expected_peer_id!r} "
                                      "(forged or altered record, or wrong center key)") from None
    if nonce is not None and fields["nonce"] != nonce:
        raise DirectoryError(f"directory record for {expected_peer_id!r} answers another "
                             "request (its signed nonce is not the one sent): a replayed answer")
    t = time.time() if now is None else now
    if t > fields["expires_at"] + CLOCK_SKEW:
        raise DirectoryError(f"directory record for {expected_peer_id!r} expired at "
                             f"{fields['expires_at']} (now {int(t)}, {CLOCK_SKEW} s of clock "
                             "skew allowed): a stale or replayed record")
    if fields["expires_at"] > t + MAX_RECORD_TTL + CLOCK_SKEW:
        raise DirectoryError(f"directory record for {expected_peer_id!r} is valid until "
                             f"{fields['expires_at']}, more than {MAX_RECORD_TTL} s from now "
                             f"({int(t)}): refused")
    return PeerRecord(public_key=pub, sig=obj["sig"], **fields)
