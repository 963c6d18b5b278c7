"""``TcpP2P``: the asyncio protocol applications subclass for TCP peers.

A thin adapter over the sans-IO :class:`p2psc.connection.Connection`: it feeds received
bytes in, dispatches events to the hooks, and writes what the connection produces. Records
sent in one event-loop iteration are coalesced into one socket write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._host import ProtocolHost
from .connection import (
    Connection,
    ConnectionClosed,
    HandshakeComplete,
    MessageReceived,
    PeerKeyNeeded,
    Role,
    State,
)
from .p2pexcept import (
    ChannelNotReady,
    ConnectionLost,
    HandshakeError,
    HandshakeTimeout,
    InvalidDataType,
    MessageTooLarge,
    P2PError,
    StatusError,
)

log = logging.getLogger("p2psc.p2p")

__all__ = ["TcpP2P", "SecureTransport"]


class SecureTransport:
    """What ``TcpP2P.transport`` is: the asyncio transport, except that ``close()`` first
    sends the authenticated CLOSE record (so the peer can tell a clean close from a
    truncation) and ``write()`` sends an encrypted message like ``send()``."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, protocol: TcpP2P, transport: asyncio.Transport):
        self._protocol = protocol
        self._transport = transport

    def close(self) -> None:
        """Send CLOSE (after anything queued) and close the connection."""
        self._protocol.close()

    def abort(self) -> None:
        """Close at once, without CLOSE (the peer sees a lost connection)."""
        self._protocol.abort()

    def write(self, data: bytes) -> None:
        """Send ``data`` as one encrypted message (same as ``protocol.send``)."""
        self._protocol.send(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    @property
    def raw(self) -> asyncio.Transport:
        """The underlying asyncio transport (writing to it directly breaks the channel)."""
        return self._transport

    def writelines(self, list_of_data: Any) -> None:
        """Send each item as one encrypted message."""
        for data in list_of_data:
            self._protocol.send(data)

    def can_write_eof(self) -> bool:
        """False: a half-close would end the stream without the authenticated CLOSE."""
        return False

    def write_eof(self) -> None:
        raise StatusError("p2psc channels do not half-close; use close()")

    def __getattr__(self, name: str) -> Any:
        # only what cannot put bytes on the wire: anything else would bypass the encryption
        if name in _PASSTHROUGH:
            return getattr(self._transport, name)
        raise AttributeError(f"{type(self).__name__} has no {name!r} (the raw asyncio transport "
                             "is .raw; writing to it directly sends unencrypted bytes)")


_PASSTHROUGH = frozenset({
    "pause_reading", "resume_reading", "is_reading", "get_write_buffer_size",
    "get_write_buffer_limits", "set_write_buffer_limits", "get_protocol",
})


#: Unsent records past this size are written at once rather than at the end of the event-loop
#: iteration, so that the transport's flow control (``drain``) sees them.
FLUSH_THRESHOLD = 64 * 1024
#: Up to this size the records of one flush are joined into one buffer; above, writelines.
JOIN_LIMIT = 256 * 1024


class TcpP2P(asyncio.BufferedProtocol):
    """An authenticated, encrypted TCP channel to one peer.

    Built by :class:`~p2psc.p2phandler.P2PHandler` as ``ProtocolClass(handler, myid, peer_id)``
    (``peer_id`` is None on the accepting side until the handshake names the peer).
    Override :meth:`on_handshaked`, :meth:`on_recv` and :meth:`on_closed`.

    ``send()`` before the handshake completes queues the message (at most
    ``pending_max_messages`` messages and ``pending_max_bytes`` bytes; past that it raises
    :class:`ChannelNotReady`); the queue is flushed, in order, when the handshake completes.
    """

    # slots keep an idle connection small; subclasses may still add attributes of their own
    __slots__ = (
        "__weakref__", "handler", "myid", "peer_id", "transport", "_raw", "_conn", "_prepared",
        "_loop", "_pending", "_pending_bytes", "_flush_handle", "_timer", "_handshaked",
        "_error", "_closed", "_waiters", "_paused", "_drain_waiters", "_lookup_task",
        "_peername", "_got_data", "_lost", "_closed_waiters", "_last_recv", "_last_send",
        "_tick", "_liveness", "_reading",
    )

    def __init__(self, handler: ProtocolHost, myid: str, peer_id: str | None = None):
        self.handler = handler
        self.myid = myid
        self.peer_id = peer_id
        self.transport: SecureTransport | None = None
        self._raw: asyncio.Transport | None = None
        self._conn: Connection | None = None
        self._prepared: Connection | None = None  # an initiator's connection made in advance
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[bytes] | None = None  # a list once needed
        self._pending_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._handshaked = False
        self._error: P2PError | None = None
        self._closed = False
        self._waiters: list[asyncio.Future[None]] | None = None  # a list once needed
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None  # a list once needed
        self._lookup_task: asyncio.Task[None] | None = None
        self._peername: Any = None
        self._got_data = False
        self._lost = False
        self._closed_waiters: list[asyncio.Future[Exception | None]] | None = None
        self._last_recv = 0.0
        self._last_send = 0.0
        self._tick: asyncio.TimerHandle | None = None
        self._liveness = False  # keepalive / idle timeout active
        self._reading = False  # in the hooks of a read: sends are written when it is handled

    # -- hooks for applications ---------------------------------------------------------------

    def on_handshaked(self) -> None:
        """Called once the peer is authenticated and data can flow (both sides)."""

    def on_recv(self, data: bytes) -> None:
        """Called with each message the peer sent, decrypted and authenticated."""

    def on_closed(self, exc: Exception | None) -> None:
        """Called once when the connection ends: ``exc`` is None for a clean close."""

    # -- API ------------------------------------------------------------------------------------

    @property
    def handshaked(self) -> bool:
        """True once the handshake completed (and until the connection closes)."""
        return self._handshaked and not self._closed

    @property
    def suite(self) -> str | None:
        """The cipher suite in use, once handshaked."""
        return self._conn.suite_name if self._conn else None

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one message; it arrives as exactly one ``on_recv`` on the other side."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidDataType(f"send() takes bytes-like data, not {type(data).__name__}")
        conn = self._conn
        if self._handshaked and conn is not None and not self._closed:
            conn.send(data)
            if self._reading:  # answering a read: written once the read is handled
                if conn._out_size >= FLUSH_THRESHOLD:
                    self._write_now()
                return
            if self._flush_handle is None:
                # the first record of this event-loop iteration goes out at once (latency);
                # the ones that follow in the same iteration are coalesced into one write
                self._write_now()
                self._flush_handle = self._loop.call_soon(self._flush)  # type: ignore[union-attr]
            elif conn._out_size >= FLUSH_THRESHOLD:
                self._write_now()
            return
        if self._closed or self._error is not None:
            raise ChannelNotReady("the connection is closed")
        settings = self.handler.settings
        if len(data) > settings.max_message_size:
            raise MessageTooLarge(f"message of {len(data)} bytes is over the "
                                  f"{settings.max_message_size}-byte limit")
        if (len(self._pending or ()) >= settings.pending_max_messages
                or self._pending_bytes + len(data) > settings.pending_max_bytes):
            raise ChannelNotReady("the handshake has not completed and the pre-handshake queue "
                                  "is full")
        if self._pending is None:
            self._pending = []
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)

    async def wait_handshaked(self) -> None:
        """Return when the handshake is done; raise its error if it failed or the connection
        closed first."""
        if self._handshaked:
            return
        if self._error is not None:
            raise self._error
        if self._closed:
            raise HandshakeError("the connection closed before the handshake completed")
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        await fut

    async def wait_closed(self) -> Exception | None:
        """Wait until the connection has ended; returns what ``on_closed`` got (None for a
        clean close)."""
        if self._lost:
            return self._error
        fut = asyncio.get_running_loop().create_future()
        if self._closed_waiters is None:
            self._closed_waiters = []
        self._closed_waiters.append(fut)
        return await fut  # type: ignore[no-any-return]

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._closed:
            raise self._error or ChannelNotReady("the connection is closed")
        if not self._paused:
            return
        fut = asyncio.get_running_loop().create_future()
        if self._drain_waiters is None:
            self._drain_waiters = []
        self._drain_waiters.append(fut)
        await fut

    def close(self) -> None:
        """Close gracefully: flush, send the authenticated CLOSE record, close the socket."""
        if self._raw is None or self._closed:
            return
        conn = self._conn
        if conn is not None and self._handshaked:
            conn.close()
            self._flush()
        self._set_closed(None)
        self._raw.close()

    def abort(self) -> None:
        """Close at once, without CLOSE (the peer sees a lost connection)."""
        if not self._closed:
            self._set_closed(ConnectionLost("aborted locally"))
        if self._raw is not None:
            self._raw.abort()

    @property
    def is_closed(self) -> bool:
        """True once the connection is closed or closing (by either side, or failed)."""
        return self._closed

    @property
    def close_error(self) -> P2PError | None:
        """Why the connection ended: None while open and after a clean close."""
        return self._error

    def flush_now(self) -> None:
        """Write what ``send`` queued now, rather than at the end of this loop iteration, so
        that ``drain`` sees the transport's real buffer."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush()

    # -- used by the handler ----------------------------------------------------------------

    def use_connection(self, conn: Connection) -> None:
        """Use ``conn``, an initiator's connection made in advance (INIT signed while the TCP
        connect is under way), when the transport is made."""
        self._prepared = conn

    def drop_pending(self, error: P2PError) -> None:
        """Give up on this connection, whose handshake is pending, with ``error`` (the
        handler's ``max_pending_handshakes`` bound)."""
        self._fail(error)

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        self._raw = transport
        self.transport = SecureTransport(self, transport)
        self._peername = transport.get_extra_info("peername")
        handler = self.handler
        role = Role.INITIATOR if self.peer_id is not None else Role.RESPONDER
        try:
            conn = self._prepared or handler.new_connection(role, self.peer_id)
        except P2PError as exc:
            self._fail(exc)
            return
        self._conn, self._prepared = conn, None
        handler.tcp_register(self)
        self._timer = self._loop.call_later(handler.settings.handshake_timeout,
                                            self._on_handshake_timeout)
        if role is Role.INITIATOR:
            if conn.state is State.IDLE:
                conn.initiate()
            self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self._conn
        if conn is None or self._closed:
            return memoryview(bytearray(4096))  # read and dropped
        return conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        if conn is None or self._closed:
            return
        self._got_data = True
        if self._liveness:
            self._last_recv = self._loop.time()  # type: ignore[union-attr]
        try:
            events = conn.buffer_updated(nbytes)
        except P2PError as exc:
            before = getattr(exc, "events", None)
            if before:  # authentic messages that came before the bad record
                self._dispatch(before)
            self._fail(exc)
            return
        if events:
            self._reading = True
            try:
                self._dispatch(events)
            finally:
                self._reading = False
        if conn._out:  # what the hooks sent in answer to this read: one write, now
            self._write_now()
        if conn._derive is not None:
            self._derive_keys(conn)

    def _derive_keys(self, conn: Connection) -> None:
        """RESP is on its way: decrypt the key material meanwhile."""
        try:
            conn.derive_keys()
        except P2PError as exc:
            self._fail(exc)

    def data_received(self, data: bytes) -> None:
        """Feed bytes as if read from the socket (the transport itself uses the buffer API)."""
        with memoryview(data) as mv:
            pos = 0
            while pos < len(mv) and self._conn is not None and not self._closed:
                buf = self.get_buffer(len(mv) - pos)
                k = min(len(buf), len(mv) - pos)
                buf[:k] = mv[pos:pos + k]
                buf.release()
                pos += k
                self.buffer_updated(k)

    def eof_received(self) -> bool:
        if self._conn is not None:
            self._dispatch(self._conn.receive_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._lookup_task is not None:
            self._lookup_task.cancel()
        if not self._closed:
            if exc is not None:
                err: P2PError = ConnectionLost(f"connection lost: {exc}")
            elif self._handshaked:
                err = ConnectionLost("the connection ended without the peer's CLOSE record")
            else:
                err = HandshakeError("the connection closed before the handshake completed")
            self._set_closed(err)
        self._conn = None
        for fut in self._drain_waiters or ():
            if not fut.done():
                fut.set_exception(self._error or ChannelNotReady("the connection is closed"))
        self._drain_waiters = None
        self.handler.tcp_unregister(self)
        self._lost = True
        self._call_hook(self.on_closed, self._error)
        for waiter in self._closed_waiters or ():
            if not waiter.done():
                waiter.set_result(self._error)
        self._closed_waiters = None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for fut in self._drain_waiters or ():
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters = None

    # -- internals --------------------------------------------------------------------------

    def _dispatch(self, events: list[Any]) -> None:
        on_recv = self.on_recv
        for ev in events:
            if self._closed:
                return
            if type(ev) is MessageReceived:
                try:
                    on_recv(ev.data)
                except Exception:
                    log.exception("%s: exception in on_recv", self._describe())
            elif type(ev) is HandshakeComplete:
                self._on_handshake_complete(ev.peer_id)
            elif type(ev) is ConnectionClosed:
                self._set_closed(ev.error)
                if ev.error is not None:
                    # a connection that closes before sending anything (a port probe) is routine
                    level = logging.WARNING if self._got_data else logging.DEBUG
                    log.log(level, "%s: %s", self._describe(), ev.error)
                if self._raw is not None:
                    self._raw.close()
            elif type(ev) is PeerKeyNeeded:
                self._lookup_task = asyncio.ensure_future(self._resolve_peer_key(ev.peer_id))

    async def _resolve_peer_key(self, peer_id: str) -> None:
        try:
            key = await self.handler.lookup_unknown_peer(peer_id)
        except P2PError as exc:
            log.info("%s: lookup of %s failed: %s", self._describe(), peer_id, exc)
            key = None
        conn = self._conn
        if conn is None or self._closed or conn.state is not State.AWAIT_PEER_KEY:
            return
        try:
            events = conn.provide_peer_key(key)
        except P2PError as exc:
            before = getattr(exc, "events", None)
            if before:
                self._dispatch(before)
            self._fail(exc)
            return
        self._dispatch(events)
        self._flush()
        if conn._derive is not None:
            self._derive_keys(conn)

    def _on_handshake_complete(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self._handshaked = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self._conn
        assert conn is not None
        for data in self._pending or ():
            conn.send(data)
        self._pending = None
        self._pending_bytes = 0
        self.handler.tcp_handshaked(self)
        for fut in self._waiters or ():
            if not fut.done():
                fut.set_result(None)
        self._waiters = None
        log.debug("%s: handshake complete (%s)", self._describe(), conn.suite_name)
        self._start_liveness_timer()
        self._call_hook(self.on_handshaked)
        self._flush()

    def _start_liveness_timer(self) -> None:
        settings = self.handler.settings
        periods = [p for p in (settings.keepalive_interval, settings.idle_timeout / 4) if p > 0]
        if not periods:
            return
        loop = self._loop
        assert loop is not None
        self._last_recv = self._last_send = loop.time()
        self._liveness = True
        self._tick = loop.call_later(min(periods), self._on_tick, min(periods))

    def _on_tick(self, period: float) -> None:
        """Keepalive and idle timeout: ping when we have been quiet, give up on a silent peer."""
        self._tick = None
        conn, loop = self._conn, self._loop
        if conn is None or loop is None or self._closed:
            return
        settings = self.handler.settings
        now = loop.time()
        if settings.idle_timeout > 0 and now - self._last_recv > settings.idle_timeout:
            self._fail(ConnectionLost(f"nothing received from the peer for "
                                      f"{settings.idle_timeout:g} s (idle timeout)"))
            return
        if settings.keepalive_interval > 0 and now - self._last_send >= settings.keepalive_interval:
            conn.send_ping()
            self._flush()
        self._tick = loop.call_later(period, self._on_tick, period)

    def _flush(self) -> None:
        """Write what is queued (also the end-of-iteration callback that coalesces sends)."""
        self._flush_handle = None
        self._write_now()

    def _write_now(self) -> None:
        conn, raw = self._conn, self._raw
        if conn is None or raw is None:
            return
        size = conn._out_size
        out = conn.data_to_send()
        if not out:
            return
        if self._liveness:
            self._last_send = self._loop.time()  # type: ignore[union-attr]
        if not raw.is_closing():
            if len(out) == 1:
                raw.write(out[0])
            elif size <= JOIN_LIMIT:
                raw.write(b"".join(out))
            else:  # large records: no copy into one buffer (uvloop writes them with writev)
                raw.writelines(out)

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if not self._handshaked and not self._closed:
            self._fail(HandshakeTimeout(
                f"handshake not completed within {self.handler.settings.handshake_timeout} s"))

    def _fail(self, exc: P2PError) -> None:
        """A protocol failure: log it, close the connection without sending anything more."""
        if self._closed:
            return
        log.warning("%s: %s: %s", self._describe(), type(exc).__name__, exc)
        # the error outlives the connection (wait_handshaked, on_closed): drop the frames of
        # its traceback and context, which would keep the connection's keys alive
        exc.__traceback__ = None
        if exc.__suppress_context__:
            exc.__context__ = None
        self._set_closed(exc)
        if self._raw is not None:
            self._raw.abort()

    def _set_closed(self, error: P2PError | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        if self._conn is not None and self._conn.state is not State.CLOSED:
            self._conn.state = State.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._pending = None
        for fut in self._waiters or ():  # only waiting while the handshake is not complete
            if not fut.done():
                fut.set_exception(error or HandshakeError("the connection closed before the "
                                                          "handshake completed"))
        self._waiters = None

    def _call_hook(self, hook: Any, *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("%s: exception in %s", self._describe(), getattr(hook, "__name__", hook))

    def _describe(self) -> str:
        who = self.peer_id or "unknown peer"
        return f"{who} at {self._peername}" if self._peername else who
