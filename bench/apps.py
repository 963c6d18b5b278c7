"""Per-connection benchmark logic shared by every transport, and the client-side connection API.

The receiving end is :class:`SinkLogic` (mixed into each transport's server protocol): it counts
messages, or echoes every message back. A 4-byte message is a sync marker: the receiver answers
with an :data:`ACK` (messages and bytes received and its CPU seconds since the previous marker)
and resets its counters, so the sender can time "first send -> last message received".
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

MARKER = b"SYNC"
#: messages, payload bytes, receiver CPU seconds since the previous marker.
ACK = struct.Struct("!QQd")


class SinkLogic:
    """Receiver logic; subclasses provide ``send(bytes)``. Class attributes are the defaults."""

    echo: bool = False
    count: int = 0
    nbytes: int = 0
    cpu0: float = 0.0

    send: Any  # provided by the transport class the logic is mixed into

    def on_message(self, data: bytes) -> None:
        """Handle one received message."""
        if self.echo:
            self.send(data)
            return
        n = len(data)
        if n == 4:
            cpu = time.process_time()
            self.send(ACK.pack(self.count, self.nbytes, cpu - self.cpu0))
            self.count = 0
            self.nbytes = 0
            self.cpu0 = cpu
            return
        self.count += 1
        self.nbytes += n


class ClientConn:
    """A connected client, whatever the transport. Subclasses implement the transport calls."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[bytes] | None = None

    def deliver(self, data: bytes) -> None:
        """Called by the transport for each received message."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(data)

    def send(self, payload: bytes) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        raise NotImplementedError

    async def blast(self, payload: bytes, max_count: int, deadline: float) -> int:
        """Send ``payload`` repeatedly until ``max_count`` messages or ``deadline``; return count."""
        raise NotImplementedError

    async def close(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    async def request(self, payload: bytes, timeout: float = 10.0) -> bytes:
        """Send one message and wait for the next message received."""
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self.send(payload)
        return await asyncio.wait_for(waiter, timeout)

    async def sync(self, timeout: float = 60.0) -> tuple[int, int, float]:
        """Send a sync marker; return the receiver's (messages, bytes, CPU seconds) since the last."""
        reply = await self.request(MARKER, timeout)
        count, nbytes, cpu = ACK.unpack(reply)
        return count, nbytes, cpu


#: How many messages a sender writes between two clock checks.
CHECK_EVERY = 16
