"""UDP datagrams: plain asyncio UDP, and p2psc UDP when the library has it.

The receiver counts datagrams and the first / last arrival times; the sender blasts for a fixed
time (bounded by a count), yielding to the loop every :data:`YIELD_EVERY` datagrams and
honouring ``pause_writing``. Loss = 1 - received / sent.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .common import HOST

YIELD_EVERY = 64


class UdpCounter(asyncio.DatagramProtocol):
    """Receiver: counts datagrams and payload bytes."""

    def __init__(self) -> None:
        self.reset()
        self.transport: asyncio.DatagramTransport | None = None

    def reset(self) -> None:
        self.count = 0
        self.nbytes = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu0 = time.process_time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        self.nbytes += len(data)

    def report(self) -> dict[str, float]:
        """Counts since the last reset, then reset."""
        out = {
            "received": self.count,
            "bytes": self.nbytes,
            "span_s": self.last - self.first,
            "recv_cpu_s": time.process_time() - self.cpu0,
        }
        self.reset()
        return out


class UdpSender(asyncio.DatagramProtocol):
    """Sender side with flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False
        self._resume: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)

    def error_received(self, exc: Exception) -> None:  # ECONNREFUSED etc.: count as loss
        pass

    async def blast(self, payload: bytes, max_count: int, duration: float) -> tuple[int, float]:
        """Send for ``duration`` s or ``max_count`` datagrams; return (sent, seconds)."""
        assert self.transport is not None
        sendto = self.transport.sendto
        clock = time.perf_counter
        t0 = clock()
        deadline = t0 + duration
        sent = 0
        while sent < max_count:
            n = min(YIELD_EVERY, max_count - sent)
            for _ in range(n):
                sendto(payload)
            sent += n
            if self.paused:
                self._resume = asyncio.get_running_loop().create_future()
                await asyncio.wait_for(self._resume, 5.0)
            else:
                await asyncio.sleep(0)
            if clock() >= deadline:
                break
        return sent, clock() - t0


class UdpServerSide:
    """Plain UDP receiver bound to an ephemeral port."""

    def __init__(self) -> None:
        self.port = 0
        self.counter = UdpCounter()
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self.counter, local_addr=(HOST, 0))
        self.port = self.transport.get_extra_info("sockname")[1]

    async def report_when_idle(self, idle: float = 0.1, limit: float = 3.0) -> dict[str, float]:
        """Wait until no datagram arrived for ``idle`` s (at most ``limit`` s), then report."""
        deadline = time.monotonic() + limit
        last_count = -1
        while time.monotonic() < deadline:
            if self.counter.count == last_count:
                break
            last_count = self.counter.count
            await asyncio.sleep(idle)
        return self.counter.report()

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def udp_plain_sender(port: int) -> UdpSender:
    """A connected plain UDP sender to ``HOST:port``."""
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(UdpSender, remote_addr=(HOST, port))
    return protocol


def p2psc_udp_available() -> tuple[bool, str]:
    """Whether p2psc has a UDP channel the bench knows how to drive."""
    try:
        from p2psc.p2p import UdpP2P  # type: ignore[attr-defined]  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return False, "p2psc UDP driver not written yet (API not final)"
