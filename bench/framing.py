"""Plain framed messages over an asyncio stream transport (used by the raw and TLS rows).

Framing: 4-byte big-endian length + payload. The receiver is a ``BufferedProtocol`` reading
into one reusable buffer and hands out one ``bytes`` copy per message; the sender does one
``transport.write()`` per message (no coalescing) and honours ``pause_writing()``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

_LEN = struct.Struct("!I")
#: Largest message the benchmark sends (1 MiB) plus room; the receive buffer is reused.
MAX_MESSAGE = (1 << 20) + 1024
_BUFFER_SIZE = 2 * MAX_MESSAGE + 65536
_MIN_FREE = 65536


def frame(payload: bytes) -> bytes:
    """One framed message (length prefix + payload) as a single bytes object."""
    return _LEN.pack(len(payload)) + payload


class _FramedBase:
    """Length-prefixed messages: connection state, flow control and sending (no receive path)."""

    def __init__(self, on_message: Callable[[bytes], None] | None = None) -> None:
        if on_message is not None:
            self.on_message = on_message  # type: ignore[method-assign, assignment]
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._resume: asyncio.Future[None] | None = None
        self.connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, data: bytes) -> None:
        """Called once per received message (replaced per instance or by a subclass)."""

    # -- connection -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.connected.done():
            self.connected.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    # -- flow control -----------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is under its high-water mark."""
        if self.paused and not self.closed.done():
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume

    def send(self, payload: bytes) -> None:
        """Send one message (one ``write`` call)."""
        assert self.transport is not None
        self.transport.write(_LEN.pack(len(payload)) + payload)


class FramedProtocol(_FramedBase, asyncio.BufferedProtocol):
    """Receives into one reusable buffer (for throughput); ``on_message`` once per message."""

    def __init__(self, on_message: Callable[[bytes], None] | None = None) -> None:
        super().__init__(on_message)
        self._buf = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received data

    # -- receive ----------------------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < _MIN_FREE:
            self._compact()
        return self._view[self._end :]

    def _compact(self) -> None:
        pending = self._end - self._start
        if pending and self._start:
            self._buf[0:pending] = self._view[self._start : self._end]
        self._start, self._end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        buf, start, end = self._buf, self._start, self._end
        unpack = _LEN.unpack_from
        on_message = self.on_message
        while end - start >= 4:
            (length,) = unpack(buf, start)
            if length > MAX_MESSAGE:
                assert self.transport is not None
                self.transport.abort()
                return
            stop = start + 4 + length
            if stop > end:
                break
            on_message(bytes(self._view[start + 4 : stop]))
            start = stop
        if start == end:
            self._start = self._end = 0
        else:
            self._start = start

    def eof_received(self) -> bool | None:
        return None


class LightFramedProtocol(_FramedBase, asyncio.Protocol):
    """``data_received`` parser without a preallocated buffer (for many idle connections)."""

    def __init__(self, on_message: Callable[[bytes], None] | None = None) -> None:
        super().__init__(on_message)
        self._pending = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self._pending
        buf += data
        unpack = _LEN.unpack_from
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (length,) = unpack(buf, pos)
            if length > MAX_MESSAGE:
                assert self.transport is not None
                self.transport.abort()
                return
            stop = pos + 4 + length
            if stop > end:
                break
            self.on_message(bytes(buf[pos + 4 : stop]))
            pos = stop
        if pos:
            del buf[:pos]
