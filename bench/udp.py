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
    """Whether p2psc has the UDP API of issue 3 (``p2psc.udp_p2p.UdpP2P`` and the handler calls)."""
    try:
        from p2psc.p2phandler import P2PHandler
        from p2psc.udp_p2p import UdpP2P  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip p2psc UDP"
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    missing = [n for n in ("run_as_udp_server", "connect_udp_peer") if not hasattr(P2PHandler, n)]
    if missing:
        return False, f"P2PHandler has no {', '.join(missing)}"
    return True, ""


def _udp_port(returned: Any, handler: Any) -> int:
    """The local port of p2psc's UDP server, from what run_as_udp_server returned or the handler."""
    candidates = []
    if isinstance(returned, tuple) and returned:
        candidates.append(returned[0])
    candidates.append(returned)
    candidates += [getattr(handler, name, None) for name in ("udp_transport", "udp_server", "_udp_transport")]
    for obj in candidates:
        transport = getattr(obj, "transport", None) if not hasattr(obj, "get_extra_info") else obj
        if transport is not None and hasattr(transport, "get_extra_info"):
            sockname = transport.get_extra_info("sockname")
            if sockname:
                return int(sockname[1])
    raise RuntimeError("cannot find the port of p2psc's UDP server")


class P2PUdpServerSide(UdpServerSide):
    """p2psc UDP receiver (``run_as_udp_server``) counting what ``on_recv`` delivers."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.handler: Any = None

    async def start(self) -> None:
        from p2psc.p2phandler import P2PHandler
        from p2psc.udp_p2p import UdpP2P  # type: ignore[import-not-found, unused-ignore]

        counter = self.counter

        class BenchUdpServer(UdpP2P):  # type: ignore[misc, valid-type]
            def on_recv(self, data: bytes, addr: Any) -> None:
                counter.datagram_received(data, addr)

        self.handler = P2PHandler(config=self.config)
        returned = await self.handler.run_as_udp_server(ProtocolClass=BenchUdpServer)
        self.port = _udp_port(returned, self.handler)

    async def close(self) -> None:
        if self.handler is not None:
            await asyncio.wait_for(self.handler.close(), 10.0)


class P2PUdpSender:
    """p2psc UDP client (``connect_udp_peer``); one ``send`` is one datagram."""

    def __init__(self, config: dict[str, Any], peer_id: str) -> None:
        self.config = config
        self.peer_id = peer_id
        self.handler: Any = None
        self.protocol: Any = None
        self.transport: Any = None

    async def connect(self, timeout: float) -> None:
        from p2psc.p2phandler import P2PHandler
        from p2psc.udp_p2p import UdpP2P  # type: ignore[import-not-found, unused-ignore]

        class BenchUdpClient(UdpP2P):  # type: ignore[misc, valid-type]
            def on_recv(self, data: bytes, addr: Any) -> None:
                pass

        if self.handler is None:  # (built beforehand when its key loading is not to be timed)
            self.handler = P2PHandler(config=self.config)
        self.transport, self.protocol = await self.handler.connect_udp_peer(
            self.peer_id, ProtocolClass=BenchUdpClient)
        await asyncio.wait_for(self.protocol.wait_handshaked(), timeout)

    async def blast(self, payload: bytes, max_count: int, duration: float) -> tuple[int, float]:
        """Send for ``duration`` s or ``max_count`` datagrams, yielding every YIELD_EVERY."""
        send = self.protocol.send
        clock = time.perf_counter
        t0 = clock()
        deadline = t0 + duration
        sent = 0
        while sent < max_count:
            n = min(YIELD_EVERY, max_count - sent)
            for _ in range(n):
                send(payload)
            sent += n
            await asyncio.sleep(0)
            if clock() >= deadline:
                break
        return sent, clock() - t0

    async def close(self) -> None:
        if self.protocol is not None and hasattr(self.protocol, "stop"):
            self.protocol.stop()
        if self.handler is not None:
            await asyncio.wait_for(self.handler.close(), 10.0)
