"""The TCP connection, sans-IO: framing, the handshake state machine, the record layer and
the connection's timers.

Bytes in (:meth:`Connection.receive_data`, or :meth:`Connection.get_buffer` then
:meth:`Connection.buffer_updated`), events out; bytes to write are taken with
:meth:`Connection.data_to_send`; :meth:`Connection.get_timer` says when
:meth:`Connection.handle_timer` must run next. Time is passed in: ``now`` is monotonic
seconds, and ``now + wall_offset`` the wall-clock time that INIT timestamps use. Receiving
never raises: a protocol failure is a final :class:`~p2psc._proto.events.Closed` event, after
the events that were good. Local misuse (``send`` of a message over the limit, ``initiate``
twice) raises a :class:`~p2psc.p2pexcept.UsageError`.

Every record is ``u32 length || u8 type || body`` with ``length`` = the body's size; the
length is checked against the limit before anything is buffered. After the handshake every
record is AEAD-sealed with the header as associated data and an implicit 64-bit sequence
number per direction; one that fails to open closes the connection.

States::

    initiator: IDLE -initiate()-> SENT_INIT -RESP-> ESTABLISHED -CLOSE/close()/EOF/error-> CLOSED
    responder: IDLE -INIT-> [AWAIT_PEER_KEY -provide_peer_key()->] SENT_RESP -FINISHED-> ESTABLISHED
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import rsa

from ..p2pexcept import (
    ChannelNotReady,
    ConnectionLost,
    CRCError,
    HandshakeError,
    HandshakeTimeout,
    LimitExceeded,
    MessageTooLarge,
    P2PError,
    ProtocolError,
    RecordTooLarge,
    StatusError,
)
from .buffers import GROW_STEP, POOL_MIN, BufferPool, ReceiveBudget
from .events import Closed, Event, HandshakeComplete, MessageReceived, PeerKeyNeeded
from .handshake import (
    MAX_HANDSHAKE_BODY,
    SYSTEM_RANDOMNESS,
    HandshakeResult,
    InitiatorHandshake,
    InitMessage,
    Randomness,
    ResponderHandshake,
    Role,
)
from .keyschedule import next_secret
from .replay import InitReplayCache
from .settings import Settings
from .suites import SUITES_BY_NAME, RecordCipher

__all__ = ["Role", "State", "RecordType", "Connection", "HEADER_LEN", "SCRATCH_SIZE",
           "MAX_HELD_WHILE_AWAITING_KEY"]

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


class State(enum.Enum):
    IDLE = "idle"
    SENT_INIT = "sent INIT"
    AWAIT_PEER_KEY = "awaiting the peer's public key"
    SENT_RESP = "sent RESP"
    ESTABLISHED = "established"
    CLOSED = "closed"


_DATA = RecordType.DATA
_INF = float("inf")


def _no_lookup(_peer_id: str) -> None:
    return None


class _Direction:
    """One direction's record cipher, sequence number and secret (for key updates)."""

    __slots__ = ("suite", "secret", "cipher", "tag_len", "seq", "since")

    def __init__(self, result: HandshakeResult, secret: bytes, now: float):
        self.suite = result.suite
        self.tag_len = result.suite.tag_len
        self.secret = secret
        self._set_cipher(result.suite.make_cipher(secret))
        self.seq = 0
        self.since = now

    def _set_cipher(self, cipher: RecordCipher) -> None:
        self.cipher = cipher

    def ratchet(self, now: float) -> None:
        self.secret = next_secret(self.secret)
        self._set_cipher(self.suite.make_cipher(self.secret))
        self.seq = 0
        self.since = now


class Connection:
    """One TCP connection's protocol state, either role.

    ``now`` is the monotonic time of construction (the handshake timeout runs from it);
    ``wall_offset`` turns monotonic into wall-clock time for INIT timestamps.
    """

    __slots__ = (
        "role", "my_id", "settings", "peer_id", "state", "_now", "_wall_offset", "_key_lookup",
        "_out", "_out_size", "_buf", "_fill", "_need", "_held", "_pool", "_budget", "_owner",
        "_scratch", "timer_dirty",
        "_in_scratch", "_send", "_recv", "_result", "_suite_name", "_pending_init", "_derive",
        "_max_data_body", "_rekey_messages", "_initiator", "_responder", "_queue",
        "_queue_bytes", "_deadline", "_tick_at", "_tick_period", "_last_recv", "_last_send",
        "_sent", "_rekey_at", "_rekey_due",
    )

    def __init__(self, role: Role, my_id: str, private_key: rsa.RSAPrivateKey, settings: Settings,
                 *, peer_id: str | None = None, peer_public_key: rsa.RSAPublicKey | None = None,
                 key_lookup: Callable[[str], rsa.RSAPublicKey | None] | None = None,
                 replay_cache: InitReplayCache | None = None, now: float = 0.0,
                 wall_offset: float = 0.0, scratch: bytearray | None = None,
                 pool: BufferPool | None = None, budget: ReceiveBudget | None = None,
                 randomness: Randomness = SYSTEM_RANDOMNESS):
        self.role = role
        self.my_id = my_id
        self.settings = settings
        self.peer_id = peer_id
        self.state = State.IDLE
        self._now = now
        self._wall_offset = wall_offset
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
        self._budget = budget  # charged with len(self._buf) while a record is incomplete ...
        self._owner: str | None = None  # ... in the name of this peer (None: not yet known)
        #: set when a deadline moved (a key update, the handshake's end): the adapter
        #: re-arms its timer from :meth:`get_timer`, which clears it
        self.timer_dirty = False
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
        self._queue: list[bytes] | None = None  # messages sent before the handshake completed
        self._queue_bytes = 0
        # timers (monotonic seconds; inf: not set)
        self._deadline = now + settings.handshake_timeout  # the handshake's
        self._tick_at = _INF    # keepalive / idle check
        self._tick_period = 0.0
        self._last_recv = now
        self._last_send = now
        self._sent = False      # a record was written since the last tick
        self._rekey_at = _INF   # rekey_after_time of the sending direction
        self._rekey_due = False
        if role is Role.INITIATOR:
            if peer_id is None or peer_public_key is None:
                raise StatusError("an initiator needs the peer's id and public key")
            self._initiator: InitiatorHandshake | None = InitiatorHandshake(
                my_id, private_key, peer_id, peer_public_key,
                SUITES_BY_NAME[settings.cipher_suite], randomness=randomness)
            self._responder: ResponderHandshake | None = None
        else:
            self._initiator = None
            self._responder = ResponderHandshake.from_settings(my_id, private_key, settings,
                                                               replay_cache, randomness=randomness)

    # -- properties -------------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def suite_name(self) -> str | None:
        return self._suite_name

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and held: an incomplete record, or what waits for a peer key."""
        return self._fill + len(self._held)

    @property
    def needs_key_derivation(self) -> bool:
        """True once RESP is queued and the key material not yet decrypted: call
        :meth:`derive_keys` after writing RESP, so the decryption overlaps RESP's trip."""
        return self._derive is not None

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
        header = _HEADER.pack(len(data) + d.tag_len, rtype)
        ct = d.cipher.seal(d.seq, data, header)
        d.seq += 1
        out = self._out
        out.append(header)
        out.append(ct)
        self._out_size += len(ct) + HEADER_LEN
        self._sent = True

    # -- timers -----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (monotonic seconds), or None."""
        self.timer_dirty = False
        if self.state is State.CLOSED:
            return None
        if self.state is not State.ESTABLISHED:
            return self._deadline
        when = min(self._tick_at, self._rekey_at)
        return None if when == _INF else when

    def handle_timer(self, now: float) -> list[Event]:
        """Run what is due at ``now``: the handshake timeout, the idle timeout and keepalive
        (a PING when nothing was sent for ``keepalive_interval``), the rekey deadline (the
        next message is sent under a new key). Returns the events (a :class:`Closed` on a
        timeout); write :meth:`data_to_send` afterwards."""
        self._now = now
        state = self.state
        if state is State.CLOSED:
            return []
        settings = self.settings
        if state is not State.ESTABLISHED:
            if now >= self._deadline:
                return self._fail(HandshakeTimeout(
                    f"handshake not completed within {settings.handshake_timeout:g} s"))
            return []
        if now >= self._rekey_at:
            self._rekey_at = _INF
            self._rekey_due = True
        if now >= self._tick_at:
            if self._sent:
                self._last_send = now
                self._sent = False
            idle = settings.idle_timeout
            if idle > 0 and now - self._last_recv > idle:
                return self._fail(ConnectionLost(f"nothing received from the peer for "
                                                 f"{idle:g} s (idle timeout)"))
            keepalive = settings.keepalive_interval
            if keepalive > 0 and now - self._last_send >= keepalive:
                self._write_sealed(RecordType.PING, b"")
                self._last_send = now
                self._sent = False
            self._tick_at = now + self._tick_period
        return []

    # -- handshake --------------------------------------------------------------------------

    def initiate(self, now: float | None = None) -> None:
        """Start the handshake (initiator): queue INIT (one RSA signature)."""
        if self.role is not Role.INITIATOR or self.state is not State.IDLE:
            raise StatusError("initiate() is for a new initiator connection")
        if now is not None:
            self._now = now
        assert self._initiator is not None
        self._write_plain(RecordType.INIT,
                          self._initiator.build_init(self._now + self._wall_offset))
        self.state = State.SENT_INIT

    def provide_peer_key(self, public_key: rsa.RSAPublicKey | None,
                         now: float | None = None) -> list[Event]:
        """Resume an INIT held for :class:`PeerKeyNeeded` (None refuses it: the connection
        closes with :class:`UnknownPeerError`); returns the events of the records that
        arrived meanwhile."""
        if self.state is not State.AWAIT_PEER_KEY or self._pending_init is None:
            raise StatusError("no INIT is waiting for a peer key")
        if now is not None:
            self._now = now
        init, self._pending_init = self._pending_init, None
        events: list[Event] = []
        try:
            self._accept_init(init, public_key)
            held, self._held = bytes(self._held), b""
            if held:
                with memoryview(held) as view:
                    self._records(view, events)
        except P2PError as exc:
            events += self._fail(exc)
        return events

    def _accept_init(self, init: InitMessage, public_key: rsa.RSAPublicKey | None) -> None:
        responder = self._responder
        assert responder is not None
        verified = responder.verify(init, public_key)
        resp, self._derive = responder.respond(verified, self._now + self._wall_offset)
        self.peer_id = init.initiator_id
        self._write_plain(RecordType.RESP, resp)
        self.state = State.SENT_RESP

    def derive_keys(self) -> None:
        """Responder: decrypt the key material and derive the keys, if not done yet
        (otherwise it happens when FINISHED arrives)."""
        derive, self._derive = self._derive, None
        if derive is None:
            return
        result = derive()
        self._result = result
        self._send = _Direction(result, result.secrets.r2i, self._now)
        self._recv = _Direction(result, result.secrets.i2r, self._now)

    def _on_init(self, body: bytes) -> Event | None:
        assert self._responder is not None
        init = self._responder.parse(body)
        if init.ext:  # UDP's INITs carry an index there: one is not replayable over TCP
            raise HandshakeError("INIT with transport data (a UDP INIT?) on a TCP connection")
        key = self._key_lookup(init.initiator_id)
        if key is None:
            self._pending_init = init
            self.state = State.AWAIT_PEER_KEY
            return PeerKeyNeeded(init.initiator_id)
        self._accept_init(init, key)
        return None

    def _on_resp(self, body: bytes) -> Event:
        assert self._initiator is not None
        result = self._initiator.receive_resp(body)
        if result.peer_ext:
            raise HandshakeError("RESP with transport data (a UDP RESP?) on a TCP connection")
        now = self._now
        self._send = _Direction(result, result.secrets.i2r, now)
        self._recv = _Direction(result, result.secrets.r2i, now)
        self._write_sealed(RecordType.FINISHED, result.finished_mac())
        return self._established(result)

    def _established(self, result: HandshakeResult) -> Event:
        """Keep only what the record layer needs: the handshake's state and secrets go. The
        messages queued before the handshake are sealed now, in order."""
        self.state = State.ESTABLISHED
        self._suite_name = result.suite.name
        self._initiator = self._responder = None
        self._result = None
        self._key_lookup = _no_lookup
        settings = self.settings
        now = self._now
        self._rekey_at = now + settings.rekey_after_time
        periods = [p for p in (settings.keepalive_interval, settings.idle_timeout / 4) if p > 0]
        if periods:
            self._tick_period = min(periods)
            self._tick_at = now + self._tick_period
            self._last_recv = self._last_send = now
            self._sent = False  # (FINISHED is part of the handshake, not a keepalive)
        queue, self._queue = self._queue, None
        self._queue_bytes = 0
        for data in queue or ():
            self.send(data)
        return HandshakeComplete(result.peer_id)

    def _fail(self, exc: P2PError) -> list[Event]:
        """A protocol failure or timeout: closed, nothing more is written."""
        self._closed()
        self._out = []
        self._out_size = 0
        # the error outlives the connection: drop the frames of its traceback and context,
        # which would keep the connection's keys alive
        exc.__traceback__ = None
        if exc.__suppress_context__:
            exc.__context__ = None
        return [Closed(exc)]

    def _closed(self) -> None:
        self.state = State.CLOSED
        self._drop_record_buffer()
        self._send = self._recv = None
        self._result = None
        self._derive = None
        self._queue = None
        self._initiator = self._responder = None
        self._held = b""

    # -- input ------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (``asyncio.BufferedProtocol`` style):
        the rest of the current incomplete record's own buffer when its header is known (so
        a large record is read straight into place), else the scratch buffer. Follow with
        :meth:`buffer_updated`."""
        if self._need:
            return memoryview(self._buf)[self._fill:min(self._need, len(self._buf))]
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = bytearray(SCRATCH_SIZE)
        n = self._fill
        if n:  # a few bytes of a header: move them in front of what comes next
            scratch[:n] = self._buf
        self._in_scratch = n
        return memoryview(scratch)[n:]

    def buffer_updated(self, nbytes: int, now: float | None = None) -> list[Event]:
        """``nbytes`` were written into the buffer of the last :meth:`get_buffer`; returns the
        events they complete. Never raises: when the peer breaks the protocol the last event
        is :class:`Closed` with the error (the events before it authenticated, in order)."""
        if self.state is State.CLOSED:
            return []
        if now is not None:
            self._now = self._last_recv = now
        events: list[Event] = []
        try:
            need = self._need
            if need:  # filling one record's own buffer
                self._fill += nbytes
                if self._fill < need:
                    if self._fill == len(self._buf):
                        self._grow()
                    return events
                record = self._buf
                assert isinstance(record, bytearray)
                self._drop_record_buffer()
                with memoryview(record) as whole, whole[:need] as view:
                    self._records(view, events)
                if len(record) > POOL_MIN and self._pool is not None:
                    self._pool.put(record)
                return events
            n = self._in_scratch + nbytes
            self._in_scratch = 0
            self._buf, self._fill = b"", 0
            assert self._scratch is not None
            with memoryview(self._scratch) as scratch, scratch[:n] as view:
                self._records(view, events)
        except P2PError as exc:
            events += self._fail(exc)
        return events

    def receive_data(self, data: bytes | bytearray | memoryview,
                     now: float | None = None) -> list[Event]:
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
                events += self.buffer_updated(k, now)
        return events

    def receive_eof(self, now: float | None = None) -> list[Event]:
        """The peer closed its side: a clean end only after its CLOSE record."""
        if self.state is State.CLOSED:
            return []
        if now is not None:
            self._now = now
        was = self.state
        if was is State.ESTABLISHED:
            return self._fail(ConnectionLost("the connection ended without the peer's CLOSE "
                                             "record (truncated or lost)"))
        if was is State.SENT_INIT and self.role is Role.INITIATOR:
            # the responder answers a refused INIT (unknown key, bad signature) by closing
            # the connection without a word: say what is likely
            return self._fail(HandshakeError(
                "the peer refused the handshake: it probably does not know this peer's key "
                "(add it there with p2psc add-peer, or register it in the directory), or "
                "this peer's key changed"))
        return self._fail(HandshakeError(f"the peer closed the connection during the "
                                         f"handshake ({was.value})"))

    def _check_length(self, body_len: int) -> None:
        if self.state is State.ESTABLISHED:
            if body_len > self._max_data_body:
                raise RecordTooLarge(f"record of {body_len} bytes is over the "
                                     f"{self.settings.max_message_size}-byte message limit")
        elif body_len > MAX_HANDSHAKE_BODY:
            raise RecordTooLarge(f"handshake record of {body_len} bytes is too large")

    def _records(self, view: memoryview, events: list[Event]) -> None:
        """Handle every complete record in ``view`` (events appended to ``events``); keep
        what is left for the next read. Raises on a protocol failure."""
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
                pt = d.cipher.unseal(d.seq, view[pos + HEADER_LEN:end], view[pos:pos + HEADER_LEN])
                d.seq += 1
                append(MessageReceived(pt))
                pos = end
                continue
            ev = self._on_record(rtype, view[pos:pos + HEADER_LEN], view[pos + HEADER_LEN:end])
            pos = end
            if ev is not None:
                append(ev)
            state: State = self.state  # (changed by the record just handled)
            if state is State.CLOSED:
                return
            if state is State.AWAIT_PEER_KEY:
                self._hold(view[pos:])
                return
        rest = n - pos
        if rest >= HEADER_LEN:  # an incomplete record: a buffer of its own
            need = HEADER_LEN + unpack(view, pos)[0]  # (length checked above)
            buf = None
            if need > POOL_MIN:
                # a kept buffer (no new memory: the whole record is read straight into it),
                # else one that grows with the bytes that arrive
                if self._pool is not None:
                    buf = self._pool.take(need)
                if buf is None:
                    buf = bytearray(min(need, rest + GROW_STEP))
            else:
                buf = bytearray(need)
            self._charge(len(buf))
            buf[:rest] = view[pos:]
            self._buf, self._fill, self._need = buf, rest, need
        elif rest:
            self._buf = bytearray(view[pos:])
            self._fill = rest

    def _charge(self, n: int) -> None:
        budget = self._budget
        if budget is None:
            return
        if not self._need:
            self._owner = self.peer_id if self.state is State.ESTABLISHED else None
        refused = budget.reserve(n, self._owner)
        if refused is not None:
            limit = budget.limit if refused == "max_partial_record_bytes" else budget.per_peer
            where = "in this handler" if refused == "max_partial_record_bytes" else \
                f"for {self._owner}"
            raise LimitExceeded(f"partly received records would hold more than {limit} bytes "
                                f"{where} ({refused})")

    def _grow(self) -> None:
        """The incomplete record's buffer is full: double it (up to the record's size)."""
        old = self._buf
        new = bytearray(min(self._need, 2 * len(old)))
        self._charge(len(new) - len(old))
        new[:len(old)] = old
        self._buf = new

    def _drop_record_buffer(self) -> None:
        if self._need and self._budget is not None:
            self._budget.release(len(self._buf), self._owner)
        self._buf, self._fill, self._need = b"", 0, 0

    def _hold(self, data: memoryview) -> None:
        """Keep bytes that arrive while the peer's key is being looked up (bounded)."""
        if len(self._held) + len(data) > MAX_HELD_WHILE_AWAITING_KEY:
            raise ProtocolError("too much data before the handshake completed")
        if not isinstance(self._held, bytearray):
            self._held = bytearray(self._held)
        self._held += data

    def _unseal(self, header: memoryview, body: memoryview) -> bytes:
        d = self._recv
        assert d is not None
        pt = d.cipher.unseal(d.seq, body, header)
        d.seq += 1
        return pt

    def _on_record(self, rtype: int, header: memoryview, body: memoryview) -> Event | None:
        state = self.state
        if state is State.ESTABLISHED:  # (DATA is handled by _records' fast path)
            if rtype == RecordType.KEY_UPDATE:
                self._unseal(header, body)
                assert self._recv is not None
                self._recv.ratchet(self._now)
                return None
            if rtype == RecordType.CLOSE:
                self._unseal(header, body)
                self._closed()
                return Closed(None)
            if rtype == RecordType.PING:
                self._unseal(header, body)
                return None
            raise ProtocolError(f"unexpected record type {rtype:#x} after the handshake")
        if state is State.IDLE and self.role is Role.RESPONDER and rtype == RecordType.INIT:
            return self._on_init(bytes(body))
        if state is State.SENT_INIT and rtype == RecordType.RESP:
            return self._on_resp(bytes(body))
        if state is State.SENT_RESP and rtype == RecordType.FINISHED:
            self.derive_keys()
            result = self._result
            assert result is not None
            try:
                mac = self._unseal(header, body)
            except CRCError:
                raise HandshakeError("FINISHED failed authentication") from None
            result.check_finished(mac)
            return self._established(result)
        raise ProtocolError(f"unexpected record type {rtype:#x} in state {state.value}")

    # -- application data -------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Seal one application message (sent as exactly one record). Before the handshake
        completes it is queued (``pending_max_messages`` / ``pending_max_bytes``) and sealed,
        in order, when it completes. Raises :class:`MessageTooLarge` over
        ``max_message_size``, :class:`ChannelNotReady` when closed or the queue is full."""
        if self.state is not State.ESTABLISHED:
            self._enqueue(data)
            return
        if len(data) > self.settings.max_message_size:
            raise MessageTooLarge(f"message of {len(data)} bytes is over the "
                                  f"{self.settings.max_message_size}-byte limit")
        d = self._send
        assert d is not None
        if self._rekey_due or d.seq >= self._rekey_messages:
            self.update_key()
        self._write_sealed(_DATA, data)

    def _enqueue(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is State.CLOSED:
            raise ChannelNotReady("the connection is closed")
        settings = self.settings
        if len(data) > settings.max_message_size:
            raise MessageTooLarge(f"message of {len(data)} bytes is over the "
                                  f"{settings.max_message_size}-byte limit")
        queue = self._queue
        if (len(queue or ()) >= settings.pending_max_messages
                or self._queue_bytes + len(data) > settings.pending_max_bytes):
            raise ChannelNotReady("the handshake has not completed and the pre-handshake queue "
                                  "is full")
        if queue is None:
            queue = self._queue = []
        queue.append(bytes(data))
        self._queue_bytes += len(data)

    def update_key(self) -> None:
        """Send KEY_UPDATE and ratchet our sending key forward."""
        if self.state is not State.ESTABLISHED:
            raise StatusError("key update before the handshake completed")
        assert self._send is not None
        self._write_sealed(RecordType.KEY_UPDATE, b"")
        self._send.ratchet(self._now)
        self._rekey_due = False
        self._rekey_at = self._now + self.settings.rekey_after_time
        self.timer_dirty = True

    def send_ping(self) -> None:
        """An authenticated keepalive record (ignored by the receiver)."""
        if self.state is State.ESTABLISHED:
            self._write_sealed(RecordType.PING, b"")

    def close(self) -> None:
        """Queue the authenticated CLOSE record (when established) and close."""
        if self.state is State.ESTABLISHED:
            self._write_sealed(RecordType.CLOSE, b"")
        self._closed()

    def abort(self) -> None:
        """Close at once: nothing more is written (what is queued is dropped)."""
        self._closed()
        self._out = []
        self._out_size = 0
