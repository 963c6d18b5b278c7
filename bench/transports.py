"""Transport adapters: raw framed TCP, asyncio TLS 1.3 (mutual auth), p2psc TCP, and UDP.

Each stream transport has a server side (``start_server(spec, echo) -> ServerSide``) and a
client side (``ClientFactory.connect() -> ClientConn``), so the tests in :mod:`bench.workers`
drive all of them through one API.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .apps import CHECK_EVERY, ClientConn, SinkLogic
from .common import HOST
from .framing import FramedProtocol, LightFramedProtocol, frame
from .material import (
    CLIENT_PEER_ID,
    SERVER_PEER_ID,
    TLS_SERVER_NAME,
    p2psc_config,
    tls_client_context,
    tls_server_context,
)

STREAM_TRANSPORTS = ("raw", "tls", "p2psc", "p2psc-aes", "p2psc-chacha")
DATAGRAM_TRANSPORTS = ("udp", "p2psc-udp")
#: cipher_suite of each p2psc variant (None = the library's default).
P2PSC_SUITES = {"p2psc": None, "p2psc-aes": "aes-256-gcm", "p2psc-chacha": "chacha20-poly1305",
                "p2psc-udp": None}
#: Tests with many short-lived or idle connections use the light (unbuffered) framing.
LIGHT_TESTS = ("handshake", "memory")
#: Every sender yields to the event loop after this many bytes (or CHECK_EVERY messages).
YIELD_BYTES = 256 * 1024


class ServerSide:
    """A listening server; ``port`` is the ephemeral port it got."""

    port: int = 0

    async def close(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# raw and TLS: the framed protocol from bench.framing
# --------------------------------------------------------------------------------------------
class _FramedServer(SinkLogic, FramedProtocol):
    """Server protocol for raw / TLS: framed messages into :class:`SinkLogic`."""


class _LightFramedServer(SinkLogic, LightFramedProtocol):
    """Same, without a preallocated receive buffer (handshake and memory tests)."""


class _AsyncioServer(ServerSide):
    def __init__(self, server: asyncio.AbstractServer) -> None:
        self.server = server
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        self.server.close()
        try:
            await asyncio.wait_for(self.server.wait_closed(), 5.0)
        except asyncio.TimeoutError:
            pass


async def _start_framed_server(ssl_ctx: ssl.SSLContext | None, echo: bool, light: bool) -> ServerSide:
    cls = _LightFramedServer if light else _FramedServer
    cls.echo = echo
    loop = asyncio.get_running_loop()
    server = await loop.create_server(cls, HOST, 0, ssl=ssl_ctx, backlog=1024)
    return _AsyncioServer(server)


class FramedClientConn(ClientConn):
    """Client side of raw / TLS."""

    def __init__(self, protocol: FramedProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        protocol.on_message = self.deliver  # type: ignore[method-assign]

    def send(self, payload: bytes) -> None:
        self.protocol.send(payload)

    async def drain(self) -> None:
        await self.protocol.drain()

    async def blast(self, payload: bytes, max_count: int, deadline: float) -> int:
        proto = self.protocol
        assert proto.transport is not None
        write = proto.transport.write
        data = frame(payload)
        clock = time.perf_counter
        per_yield = _messages_per_yield(len(payload))
        sent = 0
        while sent < max_count:
            n = min(per_yield, max_count - sent)
            for _ in range(n):
                write(data)
                if proto.paused:
                    await proto.drain()
            sent += n
            await asyncio.sleep(0)
            if clock() >= deadline:
                break
        return sent

    async def close(self, timeout: float = 5.0) -> None:
        transport = self.protocol.transport
        if transport is not None:
            transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.protocol.closed), timeout)
        except asyncio.TimeoutError:
            if transport is not None:
                transport.abort()


def _messages_per_yield(size: int) -> int:
    """Senders yield to the loop every CHECK_EVERY messages or YIELD_BYTES bytes."""
    return max(1, min(CHECK_EVERY, YIELD_BYTES // max(1, size)))


class ClientFactory:
    """Opens client connections to one server."""

    async def connect(self) -> ClientConn:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class FramedClientFactory(ClientFactory):
    def __init__(self, port: int, ssl_ctx: ssl.SSLContext | None, light: bool) -> None:
        self.port = port
        self.ssl_ctx = ssl_ctx
        self.protocol_cls = LightFramedProtocol if light else FramedProtocol

    async def connect(self) -> ClientConn:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self.ssl_ctx is not None:
            kwargs = {"ssl": self.ssl_ctx, "server_hostname": TLS_SERVER_NAME}
        _, protocol = await loop.create_connection(self.protocol_cls, HOST, self.port, **kwargs)
        return FramedClientConn(protocol)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# p2psc (imported lazily so raw/TLS work while the library is not importable)
# --------------------------------------------------------------------------------------------
def p2psc_available() -> tuple[bool, str]:
    """Whether ``p2psc.p2phandler`` and ``p2psc.p2p`` import; the error text if not."""
    try:
        import p2psc.p2p
        import p2psc.p2phandler  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip p2psc"
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _p2psc_classes() -> tuple[type, type]:
    """Build the p2psc server / client protocol classes (subclasses of TcpP2P)."""
    from p2psc.p2p import TcpP2P

    class P2PBenchServer(SinkLogic, TcpP2P):  # type: ignore[misc, valid-type]
        """p2psc server: every received message goes to :class:`SinkLogic`."""

        on_recv = SinkLogic.on_message

    class P2PBenchClient(TcpP2P):  # type: ignore[misc, valid-type]
        """p2psc client: messages go to the :class:`ClientConn` set as ``bench_conn``."""

        bench_conn: ClientConn | None = None

        def on_recv(self, data: bytes) -> None:
            conn = self.bench_conn
            if conn is not None:
                conn.deliver(data)

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                closed = self.__dict__.get("bench_closed")
                if closed is not None and not closed.done():
                    closed.set_result(None)

    return P2PBenchServer, P2PBenchClient


class _P2PServer(ServerSide):
    def __init__(self, handler: Any) -> None:
        self.handler = handler
        self.port = handler.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await asyncio.wait_for(self.handler.close(), 10.0)


async def _start_p2psc_server(material: dict[str, str], workdir: Path, suite: str | None,
                              echo: bool) -> ServerSide:
    from p2psc.p2phandler import P2PHandler

    server_cls, _ = _p2psc_classes()
    server_cls.echo = echo  # type: ignore[attr-defined]
    config = p2psc_config(material, workdir / "server", SERVER_PEER_ID, CLIENT_PEER_ID, peer_port=1,
                          cipher_suite=suite)
    handler = P2PHandler(config=config)
    await handler.run_as_server(ProtocolClass=server_cls)
    return _P2PServer(handler)


class P2PClientConn(ClientConn):
    """Client side of p2psc."""

    def __init__(self, transport: Any, protocol: Any) -> None:
        super().__init__()
        self.transport = transport
        self.protocol = protocol
        protocol.bench_conn = self
        protocol.bench_closed = asyncio.get_running_loop().create_future()

    def send(self, payload: bytes) -> None:
        self.protocol.send(payload)

    async def drain(self) -> None:
        await self.protocol.drain()

    async def blast(self, payload: bytes, max_count: int, deadline: float) -> int:
        send = self.protocol.send
        drain = self.protocol.drain
        clock = time.perf_counter
        per_yield = _messages_per_yield(len(payload))
        sent = 0
        while sent < max_count:
            n = min(per_yield, max_count - sent)
            for _ in range(n):
                send(payload)
                await drain()
            sent += n
            await asyncio.sleep(0)
            if clock() >= deadline:
                break
        return sent

    async def close(self, timeout: float = 5.0) -> None:
        self.protocol.close()  # sends the authenticated CLOSE record, then closes the socket
        try:
            await asyncio.wait_for(asyncio.shield(self.protocol.bench_closed), timeout)
        except asyncio.TimeoutError:
            self.transport.abort()


class P2PClientFactory(ClientFactory):
    def __init__(self, port: int, material: dict[str, str], workdir: Path, suite: str | None,
                 handshake_timeout: float = 30.0) -> None:
        from p2psc.p2phandler import P2PHandler

        self.handshake_timeout = handshake_timeout
        _, self.client_cls = _p2psc_classes()
        config = p2psc_config(material, workdir / "client", CLIENT_PEER_ID, SERVER_PEER_ID, peer_port=port,
                              cipher_suite=suite)
        self.handler = P2PHandler(config=config)

    async def connect(self) -> ClientConn:
        transport, protocol = await self.handler.connect_peer(SERVER_PEER_ID, ProtocolClass=self.client_cls)
        await asyncio.wait_for(protocol.wait_handshaked(), self.handshake_timeout)
        return P2PClientConn(transport, protocol)

    async def close(self) -> None:
        await asyncio.wait_for(self.handler.close(), 10.0)


# --------------------------------------------------------------------------------------------
# entry points used by the workers
# --------------------------------------------------------------------------------------------
async def start_stream_server(spec: dict[str, Any], echo: bool) -> ServerSide:
    """Start the server side of ``spec['transport']``."""
    kind = spec["transport"]
    light = spec["test"] in LIGHT_TESTS
    if kind == "raw":
        return await _start_framed_server(None, echo, light)
    if kind == "tls":
        return await _start_framed_server(tls_server_context(spec["tls"]), echo, light)
    if kind in P2PSC_SUITES:
        return await _start_p2psc_server(spec["p2psc"], Path(spec["workdir"]), P2PSC_SUITES[kind], echo)
    raise ValueError(f"unknown stream transport {kind!r}")


def client_factory(spec: dict[str, Any], port: int) -> ClientFactory:
    """The client side of ``spec['transport']`` for a server on ``port``."""
    kind = spec["transport"]
    light = spec["test"] in LIGHT_TESTS
    if kind == "raw":
        return FramedClientFactory(port, None, light)
    if kind == "tls":
        return FramedClientFactory(port, tls_client_context(spec["tls"]), light)
    if kind in P2PSC_SUITES:
        return P2PClientFactory(port, spec["p2psc"], Path(spec["workdir"]), P2PSC_SUITES[kind],
                                spec.get("handshake_timeout", 30.0))
    raise ValueError(f"unknown stream transport {kind!r}")


Opener = Callable[[], Awaitable[ClientConn]]
