"""The async/await channel API: :class:`Channel`, over a :class:`~p2psc.p2p.TcpP2P` with a
bounded receive queue, :class:`DatagramChannel` over UDP, and the entry points
:func:`open_channel`, :func:`serve` and :func:`open_datagram_channel`, which the
:class:`~p2psc.p2phandler.P2PHandler` methods of the same names call.

::

    async with P2PHandler(workdir='test2') as handler:     # closed on exit
        async with handler.open_channel('test1.com') as ch:  # (or: ch = await ...open_channel)
            await ch.send(b'hello')            # waits (drain) while the peer is slow
            reply = await ch.recv()            # one message
            async for msg in ch: ...           # until the peer closes

        async for ch in handler.reconnecting('test1.com'):  # a long-lived link, with backoff
            async for msg in ch: ...

Flow control runs end to end: ``send`` waits while the transport's write buffer is above its
high-water mark (``pause_writing``/``resume_writing``), and the receiving side stops reading
from the socket (``pause_reading``) while ``channel_queue_size`` messages wait for the
application, so a slow reader slows the sender down instead of growing memory.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import functools
import logging
import secrets
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
)
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from ._host import ProtocolHost
from .p2p import TcpP2P
from .p2pexcept import (
    ChannelClosed,
    ChannelNotReady,
    HandshakeTimeout,
    P2PError,
    UnknownPeerError,
    UsageError,
)
from .udp_p2p import UdpP2P

log = logging.getLogger("p2psc.channel")

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "Channel",
    "ChannelClosed",
    "ChannelHost",
    "ChannelProtocol",
    "DatagramChannel",
    "DatagramChannelProtocol",
    "open_channel",
    "open_datagram_channel",
    "reconnecting",
    "serve",
]

#: Messages buffered per channel before reading from the socket pauses (when the config has
#: no ``channel_queue_size``).
DEFAULT_QUEUE_SIZE = 64
#: How long :meth:`Channel.close` waits for the CLOSE record to be flushed before aborting.
CLOSE_TIMEOUT = 5.0

OnChannel = Callable[["Channel"], Awaitable[Any]]

TP = TypeVar("TP", bound=TcpP2P)
UP = TypeVar("UP", bound=UdpP2P)

# Tasks running ``on_channel`` callbacks: a strong reference so they are not collected.
_TASKS: set[asyncio.Task[None]] = set()


class _MessageQueue:
    """Received messages waiting for ``recv``, and the waiting ``recv`` calls.

    A message is taken from the queue only by the ``recv`` that returns it, so cancelling a
    ``recv`` (a timeout) never loses one.
    """

    __slots__ = ("ended", "error", "items", "waiters")

    def __init__(self) -> None:
        self.items: collections.deque[bytes] = collections.deque()
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.ended = False  # no more messages will come
        self.error: Exception | None = None

    def put(self, data: bytes) -> None:
        self.items.append(data)
        self.wake_one()

    def end(self, error: Exception | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.error = error
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    def wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def wait(self) -> None:
        """Wait until a message may be there or the queue ended (cancel-safe)."""
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self.waiters:
                self.waiters.remove(fut)
            elif fut.done() and not fut.cancelled() and self.items:
                self.wake_one()  # we were woken for a message we will not take: pass it on
            raise


class ChannelProtocol(TcpP2P):
    """A :class:`TcpP2P` that queues received messages for :class:`Channel` (at most
    ``queue_size`` before it pauses reading from the socket) instead of using ``on_recv``."""

    def __init__(self, handler: ProtocolHost, myid: str, peer_id: str | None = None, *,
                 queue_size: int | None = None, on_channel: OnChannel | None = None):
        super().__init__(handler, myid, peer_id)
        if queue_size is None:
            queue_size = getattr(handler.settings, "channel_queue_size", DEFAULT_QUEUE_SIZE)
        self.queue_size = max(1, int(queue_size))
        self._q = _MessageQueue()
        self._reading_paused = False
        self._on_channel = on_channel
        self.channel: Channel | None = None

    # -- hooks --------------------------------------------------------------------------------

    def on_handshaked(self) -> None:
        if self._on_channel is not None:
            ch = self.channel = Channel(self)
            task = asyncio.ensure_future(_run_on_channel(self._on_channel, ch))
            _TASKS.add(task)
            task.add_done_callback(_TASKS.discard)

    def on_recv(self, data: bytes) -> None:
        if self.is_closed:
            return
        self._q.put(data)
        if len(self._q.items) >= self.queue_size and not self._reading_paused:
            self._set_reading(False)

    def on_closed(self, exc: Exception | None) -> None:
        self._q.end(exc)

    # -- used by Channel ------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Messages received and not yet taken by ``recv``."""
        return len(self._q.items)

    @property
    def ended(self) -> bool:
        """True once the channel is closed (by either side) or lost."""
        return self.is_closed or self._q.ended

    @property
    def queue_ended(self) -> bool:
        """True once the connection has ended (``on_closed`` was called): no more messages
        will be queued."""
        return self._q.ended

    async def get(self) -> bytes:
        """The next message; cancel-safe (a message is taken only when it is returned)."""
        q = self._q
        while True:
            if q.items:
                data = q.items.popleft()
                if self._reading_paused and len(q.items) <= self.queue_size // 2:
                    self._set_reading(True)
                return data
            self.raise_if_done()
            await q.wait()

    def raise_if_done(self) -> None:
        """Raise why the channel ended (:class:`ChannelClosed` after a clean close), if it
        has."""
        if self._q.ended or self.is_closed:
            err = self._q.error if self._q.ended else self.close_error
            if err is not None:
                raise err
            raise ChannelClosed("the channel is closed")

    def _set_reading(self, on: bool) -> None:
        tr = self.transport
        raw = tr.raw if tr is not None else None
        self._reading_paused = not on
        if raw is None or raw.is_closing():
            return
        try:
            if on:
                raw.resume_reading()
            else:
                raw.pause_reading()
        except (RuntimeError, AttributeError):  # a transport that is closing
            pass


async def _run_on_channel(on_channel: OnChannel, ch: Channel) -> None:
    try:
        await on_channel(ch)
    except asyncio.CancelledError:
        raise
    except ChannelClosed:
        pass
    except Exception:
        log.exception("%s: error in the channel callback", ch.peer_id)
    finally:
        try:
            await ch.close()
        except Exception:  # pragma: no cover - close() does not raise
            log.debug("closing the channel to %s failed", ch.peer_id, exc_info=True)


class _MessageIterator(abc.ABC):
    """``async for msg in channel``: messages until a clean close; other errors propagate."""

    @abc.abstractmethod
    async def recv(self) -> bytes:
        """The next message."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ChannelClosed:
            raise StopAsyncIteration from None


class Channel(_MessageIterator):
    """An authenticated, encrypted message channel to one peer, for ``async``/``await`` code.

    Made by :meth:`P2PHandler.open_channel <p2psc.p2phandler.P2PHandler.open_channel>` or
    handed to the ``serve`` callback; the handshake is done. One :meth:`send` arrives as
    exactly one :meth:`recv` on the other side.
    """

    def __init__(self, protocol: ChannelProtocol):
        self.protocol = protocol

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Channel {self.protocol.myid} <-> {self.peer_id} {state}>"

    @property
    def peer_id(self) -> str:
        """The authenticated id of the peer."""
        return self.protocol.peer_id or ""

    @property
    def suite(self) -> str | None:
        """The cipher suite in use."""
        return self.protocol.suite

    @property
    def path(self) -> str:
        """How the bytes travel: "direct", or "relayed" through the relay (docs/NAT.md)."""
        return self.protocol.path

    @property
    def closed(self) -> bool:
        """True once either side closed the channel or the connection was lost."""
        return self.protocol.ended

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's extra info (``peername``, ``sockname``, ...)."""
        tr = self.protocol.transport
        return tr.get_extra_info(name, default) if tr is not None else default

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one message; waits while the peer is slow to read (flow control).

        Raises :class:`ChannelClosed` after a clean close, :class:`~p2psc.ConnectionLost`
        after an abrupt loss, :class:`~p2psc.MessageTooLarge` over ``max_message_size``.
        A ``send`` cancelled while waiting may still deliver its message.
        """
        proto = self.protocol
        if proto.ended:
            proto.raise_if_done()
        try:
            proto.send(data)
        except ChannelClosed:
            raise
        except ChannelNotReady:
            proto.raise_if_done()
            raise
        proto.flush_now()
        try:
            await proto.drain()
        except ChannelClosed:
            raise
        except ChannelNotReady:
            proto.raise_if_done()
            raise

    async def recv(self) -> bytes:
        """The next message. Cancel-safe: a cancelled ``recv`` (a timeout) loses nothing.

        Messages that arrived before the channel ended are returned first; then raises
        :class:`ChannelClosed` after a clean close (by either side), or the error that ended
        the connection (:class:`~p2psc.ConnectionLost` when it was lost without the peer's
        CLOSE record, a :class:`~p2psc.ProtocolError` for a forged record, ...).
        """
        return await self.protocol.get()

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close gracefully: what was sent is flushed, then the authenticated CLOSE record.
        Waits (at most ``timeout`` seconds, then aborts) until the connection has ended."""
        proto = self.protocol
        if proto.transport is None:
            return
        proto.close()
        if proto.queue_ended:
            return
        try:
            await asyncio.wait_for(proto.wait_closed(), timeout)
        except asyncio.TimeoutError:
            log.info("%s: CLOSE not flushed within %g s; aborting", self.peer_id, timeout)
            proto.abort()

    def abort(self) -> None:
        """Drop the connection at once, without CLOSE (the peer sees a lost connection)."""
        if self.protocol.transport is not None:
            self.protocol.transport.abort()

    async def __aenter__(self) -> Channel:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class DatagramChannelProtocol(UdpP2P):
    """A UDP client (:class:`UdpP2P`) that queues received datagrams for
    :class:`DatagramChannel`; when ``queue_size`` datagrams wait, new ones are dropped (and
    counted in ``dropped``), as a socket buffer would."""

    def __init__(self, handler: ProtocolHost, myid: str, peer_id: str | None = None, *,
                 queue_size: int | None = None):
        super().__init__(handler, myid, peer_id)
        if queue_size is None:
            queue_size = getattr(handler.settings, "channel_queue_size", DEFAULT_QUEUE_SIZE)
        self.queue_size = max(1, int(queue_size))
        self.dropped = 0
        self._q = _MessageQueue()

    def on_recv(self, data: bytes, addr: Any) -> None:
        if len(self._q.items) >= self.queue_size:
            self.dropped += 1
            return
        self._q.put(data)

    def on_peer_closed(self, peer_id: str, error: Exception | None) -> None:
        if peer_id == self.peer_id:
            self._q.end(error)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._q.end(self.close_error)

    @property
    def ended(self) -> bool:
        return self.is_closed or self._q.ended

    async def get(self) -> bytes:
        q = self._q
        while True:
            if q.items:
                return q.items.popleft()
            self.raise_if_done()
            await q.wait()

    def raise_if_done(self) -> None:
        """Raise why the channel ended (:class:`ChannelClosed` after a clean close), if it
        has."""
        if self.ended:
            err = self._q.error if self._q.ended else self.close_error
            if err is not None:
                raise err
            raise ChannelClosed("the datagram channel is closed")


class DatagramChannel(_MessageIterator):
    """Authenticated, encrypted datagrams to one peer over UDP, for ``async``/``await`` code.

    Datagram semantics: one :meth:`send` arrives as one :meth:`recv` or not at all (never
    twice, never altered), order is not guaranteed, payloads are limited to
    ``udp_max_payload`` bytes (:class:`~p2psc.MessageTooLarge` above), and there is no flow
    control: datagrams arriving while ``channel_queue_size`` wait unread are dropped.
    """

    def __init__(self, protocol: DatagramChannelProtocol):
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"<DatagramChannel {self.protocol.myid} <-> {self.peer_id}>"

    @property
    def peer_id(self) -> str:
        return self.protocol.peer_id or ""

    @property
    def path(self) -> str:
        """How the datagrams travel: "direct", "punched" or "relayed" (docs/NAT.md)."""
        return self.protocol.path or "direct"

    @property
    def closed(self) -> bool:
        return self.protocol.ended

    @property
    def max_payload(self) -> int:
        """The largest payload :meth:`send` accepts."""
        return int(self.protocol.handler.settings.udp_max_payload)

    @property
    def dropped(self) -> int:
        """Datagrams dropped because the receive queue was full."""
        return self.protocol.dropped

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one datagram (does not wait: UDP has no flow control)."""
        proto = self.protocol
        if proto.ended:
            proto.raise_if_done()
        proto.send(data)

    async def recv(self) -> bytes:
        """The next datagram; cancel-safe. Raises :class:`ChannelClosed` once either side
        closed the channel, or the error that ended it (e.g. the session's idle expiry)."""
        return await self.protocol.get()

    async def close(self) -> None:
        """Send the authenticated CLOSE to the peer and close the socket."""
        self.protocol.stop()
        await asyncio.sleep(0)  # let the transport close

    async def __aenter__(self) -> DatagramChannel:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ChannelHost(Protocol):
    """What the channel entry points need of the handler (:class:`~p2psc.p2phandler.P2PHandler`
    implements it)."""

    async def connect_peer(self, peer_id: str, ProtocolClass: Callable[..., TP]
                           ) -> tuple[asyncio.Transport, TP]:
        """Connect to ``peer_id`` over TCP with a ``ProtocolClass`` protocol."""

    async def run_as_server(self, ProtocolClass: Callable[..., TcpP2P], *,
                            host: str | None = None, port: int | None = None
                            ) -> asyncio.Server:
        """Listen over TCP with ``ProtocolClass`` protocols."""

    async def connect_udp_peer(self, peer_id: str, ProtocolClass: Callable[..., UP]
                               ) -> tuple[asyncio.DatagramTransport, UP]:
        """Open a UDP socket to ``peer_id`` with a ``ProtocolClass`` protocol."""


async def open_channel(handler: ChannelHost, peer_id: str, *, timeout: float | None = None,
                       queue_size: int | None = None) -> Channel:
    """:meth:`P2PHandler.open_channel <p2psc.p2phandler.P2PHandler.open_channel>` for
    ``handler``."""
    factory = functools.partial(ChannelProtocol, queue_size=queue_size)
    protocol: ChannelProtocol | None = None

    async def connect() -> ChannelProtocol:
        nonlocal protocol
        _, protocol = await handler.connect_peer(peer_id, ProtocolClass=factory)
        await protocol.wait_handshaked()
        return protocol

    try:
        proto = await asyncio.wait_for(connect(), timeout)
    except asyncio.TimeoutError:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        raise HandshakeTimeout(f"no connection and handshake with {peer_id} within "
                               f"{timeout:g} s") from None
    except BaseException:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        raise
    proto.channel = Channel(proto)
    return proto.channel


async def serve(handler: ChannelHost, on_channel: OnChannel, *, host: str | None = None,
                port: int | None = None, queue_size: int | None = None
                ) -> asyncio.Server:
    """:meth:`P2PHandler.serve <p2psc.p2phandler.P2PHandler.serve>` for ``handler``."""
    factory = functools.partial(ChannelProtocol, queue_size=queue_size, on_channel=on_channel)
    return await handler.run_as_server(factory, host=host, port=port)


async def open_datagram_channel(handler: ChannelHost, peer_id: str, *,
                                timeout: float | None = None, queue_size: int | None = None
                                ) -> DatagramChannel:
    """:meth:`P2PHandler.open_datagram_channel
    <p2psc.p2phandler.P2PHandler.open_datagram_channel>` for ``handler``."""
    factory = functools.partial(DatagramChannelProtocol, queue_size=queue_size)
    _, proto = await handler.connect_udp_peer(peer_id, ProtocolClass=factory)
    try:
        await asyncio.wait_for(proto.wait_handshaked(), timeout)
    except asyncio.TimeoutError:
        proto.stop()
        raise HandshakeTimeout(f"no UDP handshake with {peer_id} within {timeout:g} s (no "
                               "answer: is it running, and does it know this peer's key?)"
                               ) from None
    except BaseException:
        proto.stop()
        raise
    return DatagramChannel(proto)


# -- `await` or `async with` -------------------------------------------------------------------


class _Closable(Protocol):
    def close(self) -> Awaitable[None]: ...


CH = TypeVar("CH", bound=_Closable)


class _Connecting(Generic[CH]):
    """What :meth:`P2PHandler.open_channel <p2psc.p2phandler.P2PHandler.open_channel>` and
    ``open_datagram_channel`` return: awaitable (``ch = await handler.open_channel(peer)``)
    and an async context manager (``async with handler.open_channel(peer) as ch:`` connects on
    entry and closes the channel gracefully on exit, also when the block raises), as
    websockets' ``connect`` is.

    Nothing starts until it is awaited or entered, so an unused one leaves no "coroutine was
    never awaited" warning; each ``await`` opens a new channel.
    """

    __slots__ = ("_channel", "_open")

    def __init__(self, open_: Callable[[], Coroutine[Any, Any, CH]]):
        self._open = open_
        self._channel: CH | None = None

    def __await__(self) -> Generator[Any, None, CH]:
        return self._open().__await__()

    async def __aenter__(self) -> CH:
        if self._channel is not None:
            raise RuntimeError("this channel is already open: enter it once")
        self._channel = await self._open()
        return self._channel

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        ch, self._channel = self._channel, None
        if ch is not None:
            await ch.close()


# -- reconnecting ------------------------------------------------------------------------------


class _Stopped(Exception):
    """The handler closed while :func:`reconnecting` waited."""


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _end_reason(ch: Channel) -> str:
    try:
        ch.protocol.raise_if_done()
    except (P2PError, OSError) as exc:  # why it ended (ChannelClosed after a clean close)
        return _reason(exc)
    return "still open when the loop body was done with it"


def _permanent(exc: BaseException) -> bool:
    """A mistake that another attempt cannot fix (no key for the peer, bad config, ...)."""
    from .p2pexcept import DirectoryError
    return (isinstance(exc, (UsageError, UnknownPeerError))
            and not isinstance(exc, DirectoryError))


T = TypeVar("T")


async def reconnecting(connect: Callable[[], Awaitable[Channel]], peer_id: str, *,
                       closing: set[asyncio.Future[None]] | None = None,
                       initial_backoff: float = 0.5, max_backoff: float = 30.0,
                       factor: float = 2.0, jitter: bool = True, reset_after: float = 10.0,
                       sleep: Callable[[float], Awaitable[Any]] | None = None
                       ) -> AsyncGenerator[Channel, None]:
    """:meth:`P2PHandler.reconnecting <p2psc.p2phandler.P2PHandler.reconnecting>`, opening
    each channel with ``connect()``; it stops when a future it adds to ``closing`` is
    resolved (the handler resolves them in ``close()``)."""
    if not initial_backoff > 0:
        raise ValueError("initial_backoff must be > 0 (a reconnect loop must not spin)")
    if max_backoff < initial_backoff:
        raise ValueError("max_backoff must be >= initial_backoff")
    if factor < 1:
        raise ValueError("factor must be >= 1")
    if sleep is None:
        sleep = asyncio.sleep
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    if closing is not None:
        closing.add(stop)
    failures = 0  # failed attempts and short-lived channels since the last long-lived one

    def next_delay() -> float:
        nonlocal failures
        delay = min(max_backoff, initial_backoff * factor ** min(failures, 64))
        failures += 1
        return delay * (0.5 + secrets.randbelow(1 << 20) / (2 << 20)) if jitter else delay

    async def until_stopped(aw: Awaitable[T]) -> T:
        task = asyncio.ensure_future(aw)
        both: set[asyncio.Future[Any]] = {task, stop}
        try:
            await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        if stop.done():
            if not task.cancelled() and task.exception() is None:
                got = task.result()
                if isinstance(got, Channel):
                    await got.close()
            elif not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning
            raise _Stopped
        return task.result()

    try:
        while not stop.done():
            try:
                ch = await until_stopped(connect())
            except _Stopped:
                return
            except (OSError, asyncio.TimeoutError, P2PError) as exc:
                if _permanent(exc):
                    raise
                delay = next_delay()
                log.info("%s: connecting failed (%s); next attempt in %.2f s", peer_id,
                         _reason(exc), delay)
            else:
                started = loop.time()
                try:
                    yield ch
                except BaseException:  # the loop was left (break, an exception, aclose)
                    await ch.close()
                    raise
                lived = loop.time() - started
                reason = _end_reason(ch)
                await ch.close()
                if stop.done():
                    return
                if lived >= reset_after:
                    failures = 0
                delay = next_delay()
                log.info("%s: the channel ended after %.1f s (%s); reconnecting in %.2f s",
                         peer_id, lived, reason, delay)
            try:
                await until_stopped(sleep(delay))
            except _Stopped:
                return
    finally:
        if closing is not None:
            closing.discard(stop)
        if not stop.done():
            stop.cancel()
