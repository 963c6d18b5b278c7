"""``TcpP2P``: the asyncio protocol applications subclass for TCP peers.

A thin adapter over the sans-IO :class:`p2psc._proto.tcp.Connection`: it feeds received
bytes in (with the loop's time), turns events into hooks, writes what the connection
produces, and keeps one loop timer on the connection's next deadline (handshake timeout,
keepalive, idle timeout, rekey). Records sent in one event-loop iteration are coalesced into
one socket write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ._aio import AdapterBase
from ._host import ProtocolHost
from ._proto.events import Closed, Event, HandshakeComplete, MessageReceived, PeerKeyNeeded
from ._proto.tcp import Connection, Role, State
from .p2pexcept import (
    ChannelNotReady,
    ConnectionLost,
    HandshakeError,
    InvalidDataType,
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


class TcpP2P(AdapterBase, asyncio.BufferedProtocol):
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
        "_flush_handle", "_paused", "_drain_waiters", "_peername", "_got_data", "_lost",
        "_closed_waiters", "_reading", "path",
    )

    def __init__(self, handler: ProtocolHost, myid: str, peer_id: str | None = None):
        AdapterBase.__init__(self)
        self.handler = handler
        self.myid = myid
        self.peer_id = peer_id
        self.transport: SecureTransport | None = None
        self._raw: asyncio.Transport | None = None
        self._conn: Connection | None = None
        self._prepared: Connection | None = None  # an initiator's connection made in advance
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None  # a list once needed
        self._peername: Any = None
        self._got_data = False
        self._lost = False
        self._closed_waiters: list[asyncio.Future[Exception | None]] | None = None
        self._reading = False  # in the hooks of a read: sends are written when it is handled
        #: how this connection's bytes travel: "direct", or "relayed" through the relay
        #: (docs/NAT.md)
        self.path = "direct"

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
        if conn is None or self._closed:
            raise ChannelNotReady("the connection is closed")
        conn.send(data)
        if not self._handshaked:
            return  # queued by the connection until the handshake completes
        if conn.timer_dirty:  # (a key update moved the rekey deadline)
            self._rearm_timer()
        if self._reading:  # answering a read: written once the read is handled
            if conn.pending_output >= FLUSH_THRESHOLD:
                self._write_now()
            return
        if self._flush_handle is None:
            # the first record of this event-loop iteration goes out at once (latency);
            # the ones that follow in the same iteration are coalesced into one write
            self._write_now()
            self._flush_handle = self._loop.call_soon(self._flush)  # type: ignore[union-attr]
        elif conn.pending_output >= FLUSH_THRESHOLD:
            self._write_now()

    async def wait_handshaked(self) -> None:
        """Return when the handshake is done; raise its error if it failed or the connection
        closed first."""
        await self._wait_handshaked("the connection closed before the handshake completed")

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
        self._end(None)
        self._raw.close()

    def abort(self) -> None:
        """Close at once, without CLOSE (the peer sees a lost connection)."""
        self._end(ConnectionLost("aborted locally"))
        if self._raw is not None:
            self._raw.abort()

    def fail(self, exc: P2PError) -> None:
        """End the connection for ``exc`` (logged; nothing more is sent)."""
        if self._closed:
            return
        log.warning("%s: %s: %s", self._describe(), type(exc).__name__, exc)
        # the error outlives the connection (wait_handshaked, on_closed): drop the frames of
        # its traceback and context, which would keep the connection's keys alive
        exc.__traceback__ = None
        if exc.__suppress_context__:
            exc.__context__ = None
        self._end(exc)
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
        self.fail(error)

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
            self.fail(exc)
            return
        self._conn, self._prepared = conn, None
        handler.tcp_register(self)
        if role is Role.INITIATOR:
            if conn.state is State.IDLE:
                conn.initiate(self._loop.time())
            self._flush()
        self._rearm_timer()

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
        events = conn.buffer_updated(nbytes, self._loop.time())  # type: ignore[union-attr]
        if events:
            self._reading = True
            try:
                self._dispatch(events)
            finally:
                self._reading = False
        if conn.pending_output and not self._closed:
            self._write_now()  # what the hooks sent in answer to this read: one write, now
        if conn.needs_key_derivation:
            conn.derive_keys()  # RESP is on its way: decrypt the key material meanwhile

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
        conn = self._conn
        if conn is None or self._closed:
            return False
        for ev in conn.receive_eof(self._loop.time()):  # type: ignore[union-attr]
            if type(ev) is Closed and ev.error is not None:
                # a connection that closes before sending anything (a port probe) is routine
                log.log(logging.WARNING if self._got_data else logging.DEBUG, "%s: %s",
                        self._describe(), ev.error)
                self._end(ev.error)
                if self._raw is not None:
                    self._raw.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            if exc is not None:
                err: P2PError = ConnectionLost(f"connection lost: {exc}")
            elif self._handshaked:
                err = ConnectionLost("the connection ended without the peer's CLOSE record")
            else:
                err = HandshakeError("the connection closed before the handshake completed")
            self._end(err)
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

    def _dispatch(self, events: list[Event]) -> None:
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
            elif type(ev) is Closed:
                self._on_closed_event(ev.error)
            elif type(ev) is PeerKeyNeeded:
                self._start_task(self._resolve_peer_key(ev.peer_id))

    def _on_closed_event(self, error: P2PError | None) -> None:
        if error is not None:  # a protocol failure or a timeout
            self.fail(error)
            return
        self._end(None)  # the peer's authenticated CLOSE
        if self._raw is not None:
            self._raw.close()

    async def _resolve_peer_key(self, peer_id: str) -> None:
        try:
            key = await self.handler.lookup_unknown_peer(peer_id, self._peername)
        except P2PError as exc:
            log.info("%s: lookup of %s failed: %s", self._describe(), peer_id, exc)
            key = None
        conn = self._conn
        if conn is None or self._closed or conn.state is not State.AWAIT_PEER_KEY:
            return
        self._dispatch(conn.provide_peer_key(key, self._loop.time()))  # type: ignore[union-attr]
        if self._closed:
            return
        self._flush()
        if conn.needs_key_derivation:
            conn.derive_keys()

    def _on_handshake_complete(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self._handshaked = True
        self.handler.tcp_handshaked(self)
        self._wake_waiters(None)
        conn = self._conn
        assert conn is not None
        log.debug("%s: handshake complete (%s)", self._describe(), conn.suite_name)
        self._cancel_timer()  # the handshake's deadline: now keepalive / idle / rekey
        self._rearm_timer()
        self._call_hook(self.on_handshaked)
        self._flush()

    def _core_timer(self) -> float | None:
        conn = self._conn
        return conn.get_timer() if conn is not None else None

    def _on_core_timer(self, now: float) -> None:
        conn = self._conn
        if conn is None:
            return
        self._dispatch(conn.handle_timer(now))
        if not self._closed:
            self._flush()

    def _flush(self) -> None:
        """Write what is queued (also the end-of-iteration callback that coalesces sends)."""
        self._flush_handle = None
        self._write_now()

    def _write_now(self) -> None:
        conn, raw = self._conn, self._raw
        if conn is None or raw is None:
            return
        size = conn.pending_output
        out = conn.data_to_send()
        if not out:
            return
        if not raw.is_closing():
            if len(out) == 1:
                raw.write(out[0])
            elif size <= JOIN_LIMIT:
                raw.write(b"".join(out))
            else:  # large records: no copy into one buffer (uvloop writes them with writev)
                raw.writelines(out)

    def _end(self, error: P2PError | None) -> None:
        if not self._set_closed(error, "the connection closed before the handshake completed"):
            return
        if self._conn is not None and self._conn.state is not State.CLOSED:
            self._conn.abort()

    def _describe(self) -> str:
        who = self.peer_id or "unknown peer"
        return f"{who} at {self._peername}" if self._peername else who
