"""The handshake, sans-IO: INIT and RESP messages, their checks, and the key schedule inputs.

This module knows nothing of records, sockets or datagrams: TCP (:mod:`p2psc._proto.tcp`)
and UDP (:mod:`p2psc._proto.udp`) carry the message bodies built here. Both transports run
the responder's checks through the same two steps, :meth:`ResponderHandshake.verify` (the
signature: one RSA public-key operation) and :meth:`ResponderHandshake.respond`. The wire format is
specified in docs/PROTOCOL.md.

INIT body (initiator I to responder R)::

    u8  version (1)          u8  suite code          u64 timestamp (ms since the epoch)
    16  nonce_i              32  X25519 ephemeral public key of I
    u8  len + I's id         u8  len + R's id
    u16 len + ext            (transport data, e.g. UDP's receiver index; may be empty)
    u16 len + RSA-OAEP-SHA256(R's public key, 32 bytes of key material)
    u16 len + RSA-PSS-SHA256(I's private key, "p2psc v1 INIT by initiator\\0" || all above)

RESP body (R to I)::

    u8  version              u8  suite code (the one I proposed)
    16  nonce_r              32  X25519 ephemeral public key of R
    u16 len + ext
    u16 len + RSA-PSS-SHA256(R's private key,
                             "p2psc v1 RESP by responder\\0" || SHA-256(INIT body || all above))

The transcript hash that keys are bound to is SHA-256(INIT body || RESP body).
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import constant_time
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..p2pexcept import ConfigError, HandshakeError, ProtocolError, UnknownPeerError
from . import rsakeys as keys
from .keyschedule import TrafficSecrets, derive_traffic_secrets, finished_mac
from .replay import InitReplayCache
from .settings import Settings
from .suites import SUITES_BY_CODE, Suite

__all__ = ["PROTOCOL_VERSION", "Role", "Randomness", "InitMessage", "VerifiedInit",
           "RespMessage", "HandshakeResult", "InitiatorHandshake", "ResponderHandshake",
           "parse_init", "parse_resp", "MAX_HANDSHAKE_BODY"]

PROTOCOL_VERSION = 1
INIT_LABEL = b"p2psc v1 INIT by initiator\x00"
RESP_LABEL = b"p2psc v1 RESP by responder\x00"
NONCE_LEN = 16
KEY_MATERIAL_LEN = 32
MAX_RSA_BYTES = keys.MAX_RSA_BITS // 8
MAX_EXT_LEN = 64
#: No INIT or RESP body is larger than this (8192-bit keys, longest ids, full ext).
MAX_HANDSHAKE_BODY = 2 + 8 + NONCE_LEN + 32 + 2 * 129 + 2 + MAX_EXT_LEN + 2 * (2 + MAX_RSA_BYTES)


class Role(enum.Enum):
    """Which side of a handshake (and so of a TCP connection or UDP session) we are."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class Randomness:
    """Where a handshake's randomness comes from: nonces, key material, ephemeral X25519
    keys (:meth:`random`), and the randomised RSA operations (RSA-PSS's salt, RSA-OAEP's
    seed). The default draws from ``os.urandom`` and OpenSSL; tests inject a recorded one to
    replay a complete handshake byte for byte (test/test_vectors.py)."""

    def random(self, n: int) -> bytes:
        """``n`` random bytes."""
        return os.urandom(n)

    def sign(self, key: rsa.RSAPrivateKey, data: bytes) -> bytes:
        """RSA-PSS-SHA256 signature (random salt)."""
        return keys.sign(key, data)

    def encrypt(self, key: rsa.RSAPublicKey, data: bytes) -> bytes:
        """RSA-OAEP-SHA256 encryption (random seed)."""
        return keys.encrypt(key, data)


SYSTEM_RANDOMNESS = Randomness()


class _Reader:
    """Bounds-checked reads from a message body; any shortfall is a ProtocolError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("handshake message truncated")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def var8(self, limit: int) -> bytes:
        n = self.u8()
        if n > limit:
            raise ProtocolError("handshake field too long")
        return self.take(n)

    def var16(self, limit: int) -> bytes:
        n = self.u16()
        if n > limit:
            raise ProtocolError("handshake field too long")
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes after handshake message")


def _peer_id_field(raw: bytes) -> str:
    try:
        return keys.validate_peer_id(raw.decode("ascii"))
    except (UnicodeDecodeError, ConfigError):
        raise ProtocolError("invalid peer id in handshake") from None


@dataclass(frozen=True)
class InitMessage:
    """A parsed INIT (not yet verified)."""

    version: int
    suite_code: int
    timestamp_ms: int
    nonce: bytes
    ephemeral: bytes
    initiator_id: str
    responder_id: str
    ext: bytes
    encrypted_key_material: bytes
    signature: bytes
    signed_part: bytes
    body: bytes


@dataclass(frozen=True)
class VerifiedInit:
    """An INIT whose signature verified with the initiator's public key (made only by
    :meth:`ResponderHandshake.verify`; :meth:`ResponderHandshake.respond` takes nothing else)."""

    init: InitMessage


@dataclass(frozen=True)
class RespMessage:
    """A parsed RESP (not yet verified)."""

    version: int
    suite_code: int
    nonce: bytes
    ephemeral: bytes
    ext: bytes
    signature: bytes
    signed_part: bytes
    body: bytes


def parse_init(body: bytes) -> InitMessage:
    """Parse an INIT body; raises :class:`ProtocolError` if malformed. Nothing is verified."""
    if len(body) > MAX_HANDSHAKE_BODY:
        raise ProtocolError("INIT too large")
    r = _Reader(bytes(body))
    version, suite_code, ts = r.u8(), r.u8(), r.u64()
    nonce, eph = r.take(NONCE_LEN), r.take(32)
    initiator_id = _peer_id_field(r.var8(128))
    responder_id = _peer_id_field(r.var8(128))
    ext = r.var16(MAX_EXT_LEN)
    enc = r.var16(MAX_RSA_BYTES)
    signed_end = r.pos
    sig = r.var16(MAX_RSA_BYTES)
    r.end()
    return InitMessage(version, suite_code, ts, nonce, eph, initiator_id, responder_id, ext, enc,
                       sig, r.data[:signed_end], r.data)


def parse_resp(body: bytes) -> RespMessage:
    """Parse a RESP body; raises :class:`ProtocolError` if malformed. Nothing is verified."""
    if len(body) > MAX_HANDSHAKE_BODY:
        raise ProtocolError("RESP too large")
    r = _Reader(bytes(body))
    version, suite_code = r.u8(), r.u8()
    nonce, eph = r.take(NONCE_LEN), r.take(32)
    ext = r.var16(MAX_EXT_LEN)
    signed_end = r.pos
    sig = r.var16(MAX_RSA_BYTES)
    r.end()
    return RespMessage(version, suite_code, nonce, eph, ext, sig, r.data[:signed_end], r.data)


@dataclass(frozen=True)
class HandshakeResult:
    """What a completed handshake yields to the record layer."""

    peer_id: str
    suite: Suite
    secrets: TrafficSecrets
    transcript_hash: bytes
    peer_ext: bytes

    def finished_mac(self) -> bytes:
        return finished_mac(self.secrets.finished_key, self.transcript_hash)

    def check_finished(self, mac: bytes) -> None:
        """Constant-time check of the initiator's FINISHED MAC."""
        if not constant_time.bytes_eq(bytes(mac), self.finished_mac()):
            raise HandshakeError("FINISHED does not match the transcript")


def _x25519(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # low-order point: an all-zero shared secret
        raise HandshakeError("invalid ephemeral key") from None


def _encode_var8(b: bytes) -> bytes:
    return bytes([len(b)]) + b


def _encode_var16(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


class InitiatorHandshake:
    """The initiator's side: builds INIT, then checks RESP and derives the keys."""

    def __init__(self, my_id: str, private_key: rsa.RSAPrivateKey, peer_id: str,
                 peer_public_key: rsa.RSAPublicKey, suite: Suite, *, ext: bytes = b"",
                 randomness: Randomness = SYSTEM_RANDOMNESS):
        self.my_id = my_id
        self._rand = randomness
        self.peer_id = peer_id
        self._private_key = private_key
        self._peer_public_key = peer_public_key
        self.suite = suite
        self._ext = ext
        self._eph: X25519PrivateKey | None = None
        self._key_material = b""
        self._init: bytes | None = None

    def build_init(self, now: float) -> bytes:
        """The INIT body (signs with our private key: about one RSA private operation)."""
        rand = self._rand
        self._eph = X25519PrivateKey.from_private_bytes(rand.random(32))
        self._key_material = rand.random(KEY_MATERIAL_LEN)
        self._nonce = rand.random(NONCE_LEN)
        signed = b"".join([
            struct.pack(">BBQ", PROTOCOL_VERSION, self.suite.code, int(now * 1000)),
            self._nonce, self._eph.public_key().public_bytes_raw(),
            _encode_var8(self.my_id.encode()), _encode_var8(self.peer_id.encode()),
            _encode_var16(self._ext),
            _encode_var16(rand.encrypt(self._peer_public_key, self._key_material)),
        ])
        self._init = signed + _encode_var16(rand.sign(self._private_key, INIT_LABEL + signed))
        return self._init

    def receive_resp(self, body: bytes) -> HandshakeResult:
        """Check RESP (signature by the expected peer, same suite) and derive the keys."""
        if self._init is None or self._eph is None:
            raise HandshakeError("RESP before INIT, or a second RESP")
        resp = parse_resp(body)
        if resp.version != PROTOCOL_VERSION:
            raise HandshakeError(f"peer answered with protocol version {resp.version}")
        if resp.suite_code != self.suite.code:
            raise HandshakeError("peer answered with another cipher suite than proposed")
        keys.verify(self._peer_public_key, resp.signature,
                    RESP_LABEL + hashlib.sha256(self._init + resp.signed_part).digest(),
                    f"RESP signature of {self.peer_id}")
        shared = _x25519(self._eph, resp.ephemeral)
        th = hashlib.sha256(self._init + resp.body).digest()
        secrets = derive_traffic_secrets(self._key_material, shared, self._nonce, resp.nonce,
                                         self.suite.code, th)
        self._eph, self._key_material = None, b""
        return HandshakeResult(self.peer_id, self.suite, secrets, th, resp.ext)


class ResponderHandshake:
    """The responder's side: checks INIT in the order the protocol requires, builds RESP.

    1. :meth:`parse`: well-formed, our version, addressed to us (before any key lookup);
    2. :meth:`verify`: the initiator's signature (one RSA public-key operation);
    3. :meth:`respond`: fresh timestamp, acceptable suite, not a replay; then RESP.
    """

    def __init__(self, my_id: str, private_key: rsa.RSAPrivateKey, *, replay_cache: InitReplayCache,
                 timestamp_window: float = 120.0, enable_rc4: bool = False,
                 datagrams: bool = False, randomness: Randomness = SYSTEM_RANDOMNESS):
        self.my_id = my_id
        self._private_key = private_key
        self._replay_cache = replay_cache
        self._window = timestamp_window
        self._enable_rc4 = enable_rc4
        self._datagrams = datagrams  # UDP: no suite that needs its records in order
        self._rand = randomness

    @classmethod
    def from_settings(cls, my_id: str, private_key: rsa.RSAPrivateKey, settings: Settings,
                      replay_cache: InitReplayCache | None = None, *, datagrams: bool = False,
                      randomness: Randomness = SYSTEM_RANDOMNESS) -> ResponderHandshake:
        """A responder with the settings' window and suites, sharing ``replay_cache`` (a
        fresh one sized by the settings when None)."""
        if replay_cache is None:  # (not `or`: an empty cache is falsy)
            replay_cache = InitReplayCache(settings.replay_cache_size, settings.timestamp_window)
        return cls(my_id, private_key, replay_cache=replay_cache,
                   timestamp_window=settings.timestamp_window, enable_rc4=settings.enable_rc4,
                   datagrams=datagrams, randomness=randomness)

    def parse(self, body: bytes) -> InitMessage:
        """Step 1: parse, and check the INIT is for us (before any key lookup)."""
        init = parse_init(body)
        if init.version != PROTOCOL_VERSION:
            raise HandshakeError(f"unsupported protocol version {init.version}")
        if not constant_time.bytes_eq(init.responder_id.encode(), self.my_id.encode()):
            raise HandshakeError(f"INIT is addressed to {init.responder_id!r}, not to us")
        return init

    @staticmethod
    def verify(init: InitMessage, peer_public_key: rsa.RSAPublicKey | None) -> VerifiedInit:
        """Step 2: the initiator is known and its signature verifies (raises
        :class:`UnknownPeerError` / :class:`SignCheckError`)."""
        if peer_public_key is None:
            raise UnknownPeerError(f"INIT from unknown peer {init.initiator_id!r}")
        keys.verify(peer_public_key, init.signature, INIT_LABEL + init.signed_part,
                    f"INIT signature of {init.initiator_id}")
        return VerifiedInit(init)

    def check(self, verified: VerifiedInit, now: float) -> None:
        """Step 3 without side effects: the INIT is fresh (``now``: wall-clock seconds), its
        suite one we accept, and not a replay. Raises :class:`HandshakeError`;
        :meth:`respond` checks again and records the INIT. (UDP calls this before it spends
        anything on an INIT, so a replay cannot cost a session slot.)"""
        self._checked(verified.init, now)

    def _checked(self, init: InitMessage, now: float) -> tuple[Suite, bytes]:
        if abs(now * 1000 - init.timestamp_ms) > self._window * 1000:
            raise HandshakeError(f"INIT from {init.initiator_id} has a stale timestamp "
                                 f"({(now * 1000 - init.timestamp_ms) / 1000:+.0f} s)")
        suite = SUITES_BY_CODE.get(init.suite_code)
        if (suite is None or (suite.weak and not self._enable_rc4)
                or (suite.stream_only and self._datagrams)):
            raise HandshakeError(f"{init.initiator_id} proposed a cipher suite we do not accept "
                                 f"(code {init.suite_code})")
        replay_key = init.initiator_id.encode() + b"\x00" + init.nonce
        if self._replay_cache.seen(replay_key, init.timestamp_ms / 1000):
            raise HandshakeError(f"replayed INIT from {init.initiator_id}")
        return suite, replay_key

    def respond(self, verified: VerifiedInit, now: float, *, ext: bytes = b""
                ) -> tuple[bytes, Callable[[], HandshakeResult]]:
        """Step 3: the INIT is fresh (``now``: wall-clock seconds) and new, its suite one we
        accept; it is recorded in the replay cache. Returns the RESP body, and a function that
        decrypts the key material and derives the keys, so the caller can send RESP first and
        decrypt while it travels.

        A key material that does not decrypt is replaced by random bytes (implicit rejection,
        as TLS does for RSA key transport): the handshake then fails at FINISHED, exactly as
        with a wrong key, so the outcome of the decryption is never observable on its own.
        """
        init = verified.init
        suite, replay_key = self._checked(init, now)
        if not self._replay_cache.check_and_add(replay_key, init.timestamp_ms / 1000, now):
            raise HandshakeError(f"replayed INIT from {init.initiator_id}")
        rand = self._rand
        eph = X25519PrivateKey.from_private_bytes(rand.random(32))
        shared = _x25519(eph, init.ephemeral)
        nonce = rand.random(NONCE_LEN)
        signed = b"".join([bytes([PROTOCOL_VERSION, suite.code]), nonce,
                           eph.public_key().public_bytes_raw(), _encode_var16(ext)])
        sig = rand.sign(self._private_key,
                        RESP_LABEL + hashlib.sha256(init.body + signed).digest())
        resp = signed + _encode_var16(sig)
        private_key = self._private_key

        def derive_keys() -> HandshakeResult:
            key_material = keys.decrypt(private_key, init.encrypted_key_material)
            if key_material is None or len(key_material) != KEY_MATERIAL_LEN:
                key_material = rand.random(KEY_MATERIAL_LEN)  # implicit rejection
            th = hashlib.sha256(init.body + resp).digest()
            secrets = derive_traffic_secrets(key_material, shared, init.nonce, nonce,
                                             suite.code, th)
            return HandshakeResult(init.initiator_id, suite, secrets, th, init.ext)

        return resp, derive_keys
