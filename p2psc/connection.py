"""The TCP connection, sans-IO: framing, the handshake state machine and the record layer.

Bytes in (:meth:`Connection.receive_data`), events out; bytes to write are collected and
taken with :meth:`Connection.data_to_send`. No sockets, no asyncio, no clock of its own
(``clock`` and ``monotonic`` are passed in).

Every record is ``u32 length || u8 type || body`` with ``length`` = the body's size; the
length is checked against the limit before anything is buffered. After the handshake every
record is AEAD-sealed with the header as associated data and an implicit 64-bit sequence
number per direction; one that fails to open closes the connection.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass
from typing import Callable, Union

from cryptography.hazmat.primitives.asymmetric import rsa

from .config import Settings
from .handshake import (MAX_HANDSHAKE_BODY, HandshakeResult, InitiatorHandshake, InitMessage,
                        ResponderHandshake)
from .keyschedule import next_secret
from .p2pexcept import (ChannelNotReady, ConnectionLost, CRCError, HandshakeError,
                        MessageTooLarge, P2PError, ProtocolError, StatusError, UnknownPeerError)
from .replay import InitReplayCache
from .suites import SUITES_BY_NAME, RecordCipher

__all__ = ["Role", "State", "RecordType", "Connection", "HandshakeComplete", "MessageReceived",
           "PeerKeyNeeded", "ConnectionClosed", "Event", "HEADER_LEN"]

_HEADER = struct.Struct(">IB")
HEADER_LEN = _HEADER.size


class RecordType(enum.IntEnum):
    INIT = 0x01
    RESP = 0x02
    FINISHED = 0x03
    DATA = 0x10
    KEY_UPDATE = 0x11
    CLOSE = 0x12
    PING = 0x13


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    IDLE = "idle"
    SENT_INIT = "sent INIT"
    AWAIT_PEER_KEY = "awaiting the peer's public key"
    SENT_RESP = "sent RESP"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True)
class HandshakeComplete:
    """The handshake completed: the peer is authenticated."""

    peer_id: str


@dataclass(frozen=True)
class MessageReceived:
    """One authenticated, decrypted application message."""

    data: bytes


@dataclass(frozen=True)
class PeerKeyNeeded:
    """An INIT came from a peer whose public key is not known; answer with
    :meth:`Connection.provide_peer_key` (the key, or None to refuse)."""

    peer_id: str


@dataclass(frozen=True)
class ConnectionClosed:
    """The connection ended: ``error`` is None for the peer's authenticated CLOSE."""

    error: P2PError | None


Event = Union[HandshakeComplete, MessageReceived, PeerKeyNeeded, ConnectionClosed]

_DATA = RecordType.DATA
_CLOSE_BODY = b""


class _Direction:
    """One direction's record cipher, sequence number and secret (for key updates)."""

    __slots__ = ("suite", "secret", "cipher", "seq", "since")

    def __init__(self, result: HandshakeResult, secret: bytes, now: float):
        self.suite = result.suite
        self.secret = secret
        self.cipher: RecordCipher = result.suite.make_cipher(secret)
        self.seq = 0
        self.since = now

    def ratchet(self, now: float) -> None:
        self.secret = next_secret(self.secret)
        self.cipher = self.suite.make_cipher(self.secret)
        self.seq = 0
        self.since = now


class Connection:
    """One TCP connection's protocol state, either role."""

    def __init__(self, role: Role, my_id: str, private_key: rsa.RSAPrivateKey, settings: Settings,
                 *, peer_id: str | None = None, peer_public_key: rsa.RSAPublicKey | None = None,
                 key_lookup: Callable[[str], rsa.RSAPublicKey | None] | None = None,
                 replay_cache: InitReplayCache | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.role = role
        self.my_id = my_id
        self.settings = settings
        self.peer_id = peer_id
        self.state = State.IDLE
        self._clock = clock
        self._monotonic = monotonic
        self._key_lookup = key_lookup or (lambda _pid: None)
        self._out: list[bytes] = []
        self._buf = bytearray()
        self._send: _Direction | None = None
        self._recv: _Direction | None = None
        self._result: HandshakeResult | None = None
        self._pending_init: InitMessage | None = None
        self._max_data_body = settings.max_message_size + 32  # + the largest tag
        self._rekey_messages = settings.rekey_after_messages
        self._rekey_time = settings.rekey_after_time
        if role is Role.INITIATOR:
            if peer_id is None or peer_public_key is None:
                raise StatusError("an initiator needs the peer's id and public key")
            self._initiator: InitiatorHandshake | None = InitiatorHandshake(
                my_id, private_key, peer_id, peer_public_key, SUITES_BY_NAME[settings.cipher_suite])
            self._responder: ResponderHandshake | None = None
        else:
            self._initiator = None
            if replay_cache is None:  # (not `or`: an empty cache is falsy)
                replay_cache = InitReplayCache(settings.replay_cache_size,
                                               settings.timestamp_window)
            self._responder = ResponderHandshake(
                my_id, private_key, replay_cache=replay_cache,
                timestamp_window=settings.timestamp_window, enable_rc4=settings.enable_rc4)

    # -- properties -------------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def suite_name(self) -> str | None:
        return self._result.suite.name if self._result else None

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """The byte chunks to write, in order (the list is handed over and cleared)."""
        out, self._out = self._out, []
        return out

    def _write_plain(self, rtype: RecordType, body: bytes) -> None:
        self._out.append(_HEADER.pack(len(body), rtype) + body)

    def _write_sealed(self, rtype: int, data: bytes | memoryview) -> None:
        d = self._send
        assert d is not None
        header = _HEADER.pack(len(data) + d.cipher.tag_len, rtype)
        ct = d.cipher.seal(d.seq, data, header)
        d.seq += 1
        self._out.append(header)
        self._out.append(ct)

    # -- handshake --------------------------------------------------------------------------

    def initiate(self) -> None:
        """Start the handshake (initiator): queue INIT."""
        if self.role is not Role.INITIATOR or self.state is not State.IDLE:
            raise StatusError("initiate() is for a new initiator connection")
        assert self._initiator is not None
        self._write_plain(RecordType.INIT, self._initiator.build_init(self._clock()))
        self.state = State.SENT_INIT

    def provide_peer_key(self, public_key: rsa.RSAPublicKey | None) -> list[Event]:
        """Resume an INIT held for :class:`PeerKeyNeeded`; None refuses (UnknownPeerError)."""
        if self.state is not State.AWAIT_PEER_KEY or self._pending_init is None:
            raise StatusError("no INIT is waiting for a peer key")
        init, self._pending_init = self._pending_init, None
        events: list[Event] = []
        try:
            self._accept_init(init, public_key)
            # records that arrived while we waited
            events.extend(self._process())
        except P2PError:
            self.state = State.CLOSED
            raise
        return events

    def _accept_init(self, init: InitMessage, public_key: rsa.RSAPublicKey | None) -> None:
        assert self._responder is not None
        if public_key is None:
            raise UnknownPeerError(f"INIT from unknown peer {init.initiator_id!r}")
        resp, result = self._responder.accept(init, public_key, self._clock())
        self.peer_id = init.initiator_id
        self._result = result
        now = self._monotonic()
        self._send = _Direction(result, result.secrets.r2i, now)
        self._recv = _Direction(result, result.secrets.i2r, now)
        self._write_plain(RecordType.RESP, resp)
        self.state = State.SENT_RESP

    def _on_init(self, body: bytes) -> list[Event]:
        assert self._responder is not None
        init = self._responder.parse(body)
        key = self._key_lookup(init.initiator_id)
        if key is None:
            self._pending_init = init
            self.state = State.AWAIT_PEER_KEY
            return [PeerKeyNeeded(init.initiator_id)]
        self._accept_init(init, key)
        return []

    def _on_resp(self, body: bytes) -> list[Event]:
        assert self._initiator is not None
        result = self._initiator.receive_resp(body)
        self._initiator = None
        self._result = result
        now = self._monotonic()
        self._send = _Direction(result, result.secrets.i2r, now)
        self._recv = _Direction(result, result.secrets.r2i, now)
        self.state = State.ESTABLISHED
        self._write_sealed(RecordType.FINISHED, result.finished_mac())
        return [HandshakeComplete(result.peer_id)]

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; returns the events they complete.

        Raises a :class:`P2PError` subclass when the peer breaks the protocol; the
        connection is then closed and must be dropped.
        """
        if self.state is State.CLOSED:
            return []
        self._buf += data
        if self.state is State.AWAIT_PEER_KEY:
            if len(self._buf) > MAX_HANDSHAKE_BODY + 64 * 1024:
                self.state = State.CLOSED
                raise ProtocolError("too much data before the handshake completed")
            return []
        try:
            return self._process()
        except P2PError:
            self.state = State.CLOSED
            raise

    def receive_eof(self) -> list[Event]:
        """The peer closed its side: a clean end only after its CLOSE record."""
        if self.state is State.CLOSED:
            return []
        was = self.state
        self.state = State.CLOSED
        if was is State.ESTABLISHED:
            return [ConnectionClosed(ConnectionLost("the connection ended without the peer's "
                                                    "CLOSE record (truncated or lost)"))]
        return [ConnectionClosed(HandshakeError(f"the peer closed the connection during the "
                                                f"handshake ({was.value})"))]

    def _process(self) -> list[Event]:
        buf = self._buf
        pos = 0
        n = len(buf)
        events: list[Event] = []
        while n - pos >= HEADER_LEN and self.state is not State.CLOSED:
            body_len, rtype = _HEADER.unpack_from(buf, pos)
            if self.state is State.ESTABLISHED:
                if body_len > self._max_data_body:
                    raise MessageTooLarge(f"record of {body_len} bytes is over the "
                                          f"{self.settings.max_message_size}-byte message limit")
            elif body_len > MAX_HANDSHAKE_BODY:
                raise ProtocolError(f"handshake record of {body_len} bytes is too large")
            end = pos + HEADER_LEN + body_len
            if end > n:
                break
            header = bytes(buf[pos:pos + HEADER_LEN])
            with memoryview(buf) as mv:
                body = mv[pos + HEADER_LEN:end]
                try:
                    ev = self._on_record(rtype, header, body)
                finally:
                    body.release()
            pos = end
            if ev is not None:
                events.append(ev)
            if self.state is State.AWAIT_PEER_KEY:
                break
        if pos:
            del buf[:pos]
        return events

    def _open(self, header: bytes, body: memoryview) -> bytes:
        d = self._recv
        assert d is not None
        pt = d.cipher.open(d.seq, body, header)
        d.seq += 1
        return pt

    def _on_record(self, rtype: int, header: bytes, body: memoryview) -> Event | None:
        state = self.state
        if state is State.ESTABLISHED:
            if rtype == _DATA:
                return MessageReceived(self._open(header, body))
            if rtype == RecordType.KEY_UPDATE:
                self._open(header, body)
                assert self._recv is not None
                self._recv.ratchet(self._monotonic())
                return None
            if rtype == RecordType.CLOSE:
                self._open(header, body)
                self.state = State.CLOSED
                return ConnectionClosed(None)
            if rtype == RecordType.PING:
                self._open(header, body)
                return None
            raise ProtocolError(f"unexpected record type {rtype:#x} after the handshake")
        if state is State.IDLE and self.role is Role.RESPONDER and rtype == RecordType.INIT:
            evs = self._on_init(bytes(body))
            return evs[0] if evs else None
        if state is State.SENT_INIT and rtype == RecordType.RESP:
            return self._on_resp(bytes(body))[0]
        if state is State.SENT_RESP and rtype == RecordType.FINISHED:
            assert self._result is not None
            try:
                mac = self._open(header, body)
            except CRCError:
                raise HandshakeError("FINISHED failed authentication") from None
            self._result.check_finished(mac)
            self.state = State.ESTABLISHED
            return HandshakeComplete(self._result.peer_id)
        raise ProtocolError(f"unexpected record type {rtype:#x} in state {state.value}")

    # -- application data -------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Seal one application message (sent as exactly one record)."""
        if self.state is not State.ESTABLISHED:
            if self.state is State.CLOSED:
                raise ChannelNotReady("the connection is closed")
            raise ChannelNotReady("the handshake has not completed")
        if len(data) > self.settings.max_message_size:
            raise MessageTooLarge(f"message of {len(data)} bytes is over the "
                                  f"{self.settings.max_message_size}-byte limit")
        d = self._send
        assert d is not None
        if d.seq >= self._rekey_messages or self._monotonic() - d.since >= self._rekey_time:
            self.update_key()
        self._write_sealed(_DATA, data)

    def update_key(self) -> None:
        """Send KEY_UPDATE and ratchet our sending key forward."""
        if self.state is not State.ESTABLISHED:
            raise StatusError("key update before the handshake completed")
        assert self._send is not None
        self._write_sealed(RecordType.KEY_UPDATE, b"")
        self._send.ratchet(self._monotonic())

    def send_ping(self) -> None:
        """An authenticated keepalive record (ignored by the receiver)."""
        if self.state is State.ESTABLISHED:
            self._write_sealed(RecordType.PING, b"")

    def close(self) -> None:
        """Queue the authenticated CLOSE record (when established) and close."""
        if self.state is State.ESTABLISHED:
            self._write_sealed(RecordType.CLOSE, _CLOSE_BODY)
        self.state = State.CLOSED
        self._send = self._recv = None
        self._result = None
