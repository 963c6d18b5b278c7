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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa

from .buffers import POOL_MIN, BufferPool
from .config import Settings
from .handshake import (
    MAX_HANDSHAKE_BODY,
    HandshakeResult,
    InitiatorHandshake,
    InitMessage,
    ResponderHandshake,
)
from .keyschedule import next_secret
from .p2pexcept import (
    ChannelNotReady,
    ConnectionLost,
    CRCError,
    HandshakeError,
    MessageTooLarge,
    P2PError,
    ProtocolError,
    RecordTooLarge,
    StatusError,
    UnknownPeerError,
)
from .replay import InitReplayCache
from .suites import SUITES_BY_NAME, AeadCipher, RecordCipher

__all__ = ["Role", "State", "RecordType", "Connection", "HandshakeComplete", "MessageReceived",
           "PeerKeyNeeded", "ConnectionClosed", "Event", "HEADER_LEN"]

_HEADER = struct.Struct(">IB")
HEADER_LEN = _HEADER.size
#: Size of a receive scratch buffer; one can be shared by every connection of an event loop
#: (records are handled before :meth:`Connection.buffer_updated` returns).
SCRATCH_SIZE = 256 * 1024
#: Bytes kept while an unknown initiator's key is looked up.
MAX_HELD_WHILE_AWAITING_KEY = 64 * 1024


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


@dataclass(slots=True)
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


def _no_lookup(_peer_id: str) -> None:
    return None


class _Direction:
    """One direction's record cipher, sequence number and secret (for key updates)."""

    __slots__ = ("suite", "secret", "cipher", "aead", "iv", "seq", "since")

    def __init__(self, result: HandshakeResult, secret: bytes, now: float):
        self.suite = result.suite
        self.secret = secret
        self._set_cipher(result.suite.make_cipher(secret))
        self.seq = 0
        self.since = now

    def _set_cipher(self, cipher: RecordCipher) -> None:
        self.cipher = cipher
        # the AEAD suites' fast path (the record layer calls the AEAD directly)
        self.aead = cipher.aead if isinstance(cipher, AeadCipher) else None
        self.iv = cipher.iv if isinstance(cipher, AeadCipher) else 0

    def ratchet(self, now: float) -> None:
        self.secret = next_secret(self.secret)
        self._set_cipher(self.suite.make_cipher(self.secret))
        self.seq = 0
        self.since = now


class Connection:
    """One TCP connection's protocol state, either role."""

    __slots__ = (
        "role", "my_id", "settings", "peer_id", "state", "_clock", "_monotonic", "_key_lookup",
        "_out", "_out_size", "_buf", "_fill", "_need", "_held", "_pool", "_scratch",
        "_in_scratch", "_send", "_recv", "_result", "_suite_name", "_pending_init", "_derive",
        "_max_data_body", "_rekey_messages", "_rekey_time", "_initiator", "_responder",
    )

    def __init__(self, role: Role, my_id: str, private_key: rsa.RSAPrivateKey, settings: Settings,
                 *, peer_id: str | None = None, peer_public_key: rsa.RSAPublicKey | None = None,
                 key_lookup: Callable[[str], rsa.RSAPublicKey | None] | None = None,
                 replay_cache: InitReplayCache | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 scratch: bytearray | None = None, pool: BufferPool | None = None):
        self.role = role
        self.my_id = my_id
        self.settings = settings
        self.peer_id = peer_id
        self.state = State.IDLE
        self._clock = clock
        self._monotonic = monotonic
        self._key_lookup = key_lookup or _no_lookup
        self._out: list[bytes] = []
        self._out_size = 0
        # receive side: the incomplete record (or header fragment) and how much of it is filled;
        # complete records are handled straight from the (shareable) scratch buffer
        self._buf: bytes | bytearray = b""
        self._fill = 0
        self._need = 0  # the size of the incomplete record once its header is known
        self._held: bytes | bytearray = b""
        self._pool = pool
        self._scratch = scratch
        self._in_scratch = 0
        self._send: _Direction | None = None
        self._recv: _Direction | None = None
        self._result: HandshakeResult | None = None  # only until the handshake completes
        self._suite_name: str | None = None
        self._pending_init: InitMessage | None = None
        self._derive: Callable[[], HandshakeResult] | None = None
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
        return self._suite_name

    # -- output -----------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """The byte chunks to write, in order (the list is handed over and cleared)."""
        out, self._out = self._out, []
        self._out_size = 0
        return out

    @property
    def pending_output(self) -> int:
        """Bytes waiting in :meth:`data_to_send`."""
        return self._out_size

    def _write_plain(self, rtype: RecordType, body: bytes) -> None:
        record = _HEADER.pack(len(body), rtype) + body
        self._out.append(record)
        self._out_size += len(record)

    def _write_sealed(self, rtype: int, data: bytes | bytearray | memoryview) -> None:
        d = self._send
        assert d is not None
        aead = d.aead
        if aead is not None:  # the AEAD suites, called directly (the per-message hot path)
            header = _HEADER.pack(len(data) + 16, rtype)
            ct = aead.encrypt((d.iv ^ d.seq).to_bytes(12, "big"), data, header)
        else:
            header = _HEADER.pack(len(data) + d.cipher.tag_len, rtype)
            ct = d.cipher.seal(d.seq, data, header)  # type: ignore[arg-type]
        d.seq += 1
        out = self._out
        out.append(header)
        out.append(ct)
        self._out_size += len(ct) + HEADER_LEN

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
            held, self._held = bytes(self._held), b""
            if held:
                with memoryview(held) as view:
                    events.extend(self._process(view))
        except P2PError:
            self.state = State.CLOSED
            raise
        return events

    def _accept_init(self, init: InitMessage, public_key: rsa.RSAPublicKey | None) -> None:
        assert self._responder is not None
        if public_key is None:
            raise UnknownPeerError(f"INIT from unknown peer {init.initiator_id!r}")
        resp, self._derive = self._responder.respond(init, public_key, self._clock())
        self.peer_id = init.initiator_id
        self._write_plain(RecordType.RESP, resp)
        self.state = State.SENT_RESP

    def derive_keys(self) -> None:
        """Responder: decrypt the key material and derive the keys, if not done yet.

        RESP does not depend on them, so an adapter calls this right after writing RESP and
        the RSA decryption overlaps RESP's trip; otherwise it happens when FINISHED arrives.
        """
        derive, self._derive = self._derive, None
        if derive is None:
            return
        result = derive()
        self._result = result
        now = self._monotonic()
        self._send = _Direction(result, result.secrets.r2i, now)
        self._recv = _Direction(result, result.secrets.i2r, now)

    def _on_init(self, body: bytes) -> list[Event]:
        assert self._responder is not None
        init = self._responder.parse(body)
        if init.ext:  # UDP's INITs carry an index there: one is not replayable over TCP
            raise HandshakeError("INIT with transport data (a UDP INIT?) on a TCP connection")
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
        if result.peer_ext:
            raise HandshakeError("RESP with transport data (a UDP RESP?) on a TCP connection")
        now = self._monotonic()
        self._send = _Direction(result, result.secrets.i2r, now)
        self._recv = _Direction(result, result.secrets.r2i, now)
        self._write_sealed(RecordType.FINISHED, result.finished_mac())
        self._established(result)
        return [HandshakeComplete(result.peer_id)]

    def _established(self, result: HandshakeResult) -> None:
        """Keep only what the record layer needs: the handshake's state and secrets go."""
        self.state = State.ESTABLISHED
        self._suite_name = result.suite.name
        self._initiator = self._responder = None
        self._result = None
        self._key_lookup = _no_lookup

    # -- input ------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (``asyncio.BufferedProtocol`` style):
        the rest of the current incomplete record's own buffer when its header is known (so
        a large record is read straight into place), else the scratch buffer. Follow with
        :meth:`buffer_updated`."""
        if self._need:
            return memoryview(self._buf)[self._fill:self._need]
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = bytearray(SCRATCH_SIZE)
        n = self._fill
        if n:  # a few bytes of a header: move them in front of what comes next
            scratch[:n] = self._buf
        self._in_scratch = n
        return memoryview(scratch)[n:]

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written into the buffer of the last :meth:`get_buffer`; returns the
        events they complete.

        Raises a :class:`P2PError` subclass when the peer breaks the protocol; the
        connection is then closed and must be dropped. The events completed before the
        error (messages that authenticated, in order) are in the exception's ``events``:
        deliver them before reporting the error.
        """
        if self.state is State.CLOSED:
            return []
        try:
            need = self._need
            if need:  # filling one record's own buffer
                self._fill += nbytes
                if self._fill < need:
                    return []
                record = self._buf
                assert isinstance(record, bytearray)
                self._buf, self._fill, self._need = b"", 0, 0
                with memoryview(record) as whole, whole[:need] as view:
                    events = self._process(view)
                if need > POOL_MIN and self._pool is not None:
                    self._pool.put(record)
                return events
            n = self._in_scratch + nbytes
            self._in_scratch = 0
            self._buf, self._fill = b"", 0
            assert self._scratch is not None
            with memoryview(self._scratch) as scratch, scratch[:n] as view:
                return self._process(view)
        except P2PError:
            self.state = State.CLOSED
            raise

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed received bytes; returns the events they complete (see :meth:`buffer_updated`)."""
        events: list[Event] = []
        with memoryview(data) as mv:
            pos, n = 0, len(mv)
            while pos < n and self.state is not State.CLOSED:
                buf = self.get_buffer()
                k = min(len(buf), n - pos)
                buf[:k] = mv[pos:pos + k]
                buf.release()
                pos += k
                try:
                    events += self.buffer_updated(k)
                except P2PError as exc:
                    exc.events = events + getattr(exc, "events", [])  # type: ignore[attr-defined]
                    raise
        return events

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and held: an incomplete record, or what waits for a peer key."""
        return self._fill + len(self._held)

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

    def _check_length(self, body_len: int) -> None:
        if self.state is State.ESTABLISHED:
            if body_len > self._max_data_body:
                raise RecordTooLarge(f"record of {body_len} bytes is over the "
                                     f"{self.settings.max_message_size}-byte message limit")
        elif body_len > MAX_HANDSHAKE_BODY:
            raise RecordTooLarge(f"handshake record of {body_len} bytes is too large")

    def _process(self, view: memoryview) -> list[Event]:
        """Handle every complete record in ``view``; keep what is left for the next read.

        On an error, the events completed before it (authentic messages that came first) are
        attached to the exception as ``events``.
        """
        events: list[Event] = []
        try:
            self._records(view, events)
        except P2PError as exc:
            exc.events = events  # type: ignore[attr-defined]
            raise
        return events

    def _records(self, view: memoryview, events: list[Event]) -> None:
        if self.state is State.AWAIT_PEER_KEY:
            self._hold(view)
            return
        pos, n = 0, len(view)
        unpack = _HEADER.unpack_from
        max_body = self._max_data_body
        append = events.append
        while n - pos >= HEADER_LEN:
            body_len, rtype = unpack(view, pos)
            if body_len > max_body or self.state is not State.ESTABLISHED:
                self._check_length(body_len)
            end = pos + HEADER_LEN + body_len
            if end > n:
                break
            if rtype == _DATA and self.state is State.ESTABLISHED:
                # the fast path: one application message
                d = self._recv
                assert d is not None
                aead = d.aead
                if aead is not None:
                    try:
                        pt = aead.decrypt((d.iv ^ d.seq).to_bytes(12, "big"),
                                          view[pos + HEADER_LEN:end], view[pos:pos + HEADER_LEN])
                    except InvalidTag:
                        raise CRCError("record failed authentication") from None
                else:
                    pt = d.cipher.open(d.seq, view[pos + HEADER_LEN:end], view[pos:pos + HEADER_LEN])
                d.seq += 1
                append(MessageReceived(pt))
                pos = end
                continue
            ev = self._on_record(rtype, view[pos:pos + HEADER_LEN], view[pos + HEADER_LEN:end])
            pos = end
            if ev is not None:
                events.append(ev)
            state: State = self.state  # (changed by the record just handled)
            if state is State.CLOSED:
                return
            if state is State.AWAIT_PEER_KEY:
                self._hold(view[pos:])
                return
        rest = n - pos
        if rest >= HEADER_LEN:  # an incomplete record: a buffer for the whole of it
            need = HEADER_LEN + _HEADER.unpack_from(view, pos)[0]  # (length checked above)
            pooled = need > POOL_MIN and self._pool is not None
            buf = self._pool.get(need) if pooled else bytearray(need)  # type: ignore[union-attr]
            buf[:rest] = view[pos:]
            self._buf, self._fill, self._need = buf, rest, need
        elif rest:
            self._buf = bytearray(view[pos:])
            self._fill = rest

    def _hold(self, data: memoryview) -> None:
        """Keep bytes that arrive while the peer's key is being looked up (bounded)."""
        if len(self._held) + len(data) > MAX_HELD_WHILE_AWAITING_KEY:
            raise ProtocolError("too much data before the handshake completed")
        if not isinstance(self._held, bytearray):
            self._held = bytearray(self._held)
        self._held += data

    def _open(self, header: memoryview, body: memoryview) -> bytes:
        d = self._recv
        assert d is not None
        pt = d.cipher.open(d.seq, body, header)
        d.seq += 1
        return pt

    def _on_record(self, rtype: int, header: memoryview, body: memoryview) -> Event | None:
        state = self.state
        if state is State.ESTABLISHED:  # (DATA is handled by _records' fast path)
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
            self.derive_keys()
            result = self._result
            assert result is not None
            try:
                mac = self._open(header, body)
            except CRCError:
                raise HandshakeError("FINISHED failed authentication") from None
            result.check_finished(mac)
            self._established(result)
            return HandshakeComplete(result.peer_id)
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
        self._derive = None
