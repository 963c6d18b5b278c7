"""TcpP2P and P2PHandler over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from conftest import TcpProxy, point_at, run, server_port
from p2psc.p2p import TcpP2P
from p2psc.p2pexcept import (ChannelNotReady, InvalidDataType, MessageTooLarge, StatusError,
                             UnknownPeerError)
from p2psc.p2phandler import P2PHandler


class Echo(TcpP2P):
    def on_recv(self, data: bytes) -> None:
        self.send(b"recv:" + data)


class Collector(TcpP2P):
    """Collects what arrives; ``expected`` messages complete ``done``."""

    expected = 1

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.received: list[bytes] = []
        self.handshaked_calls = 0
        self.closed_with: list[Any] = []
        self.done = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def on_handshaked(self) -> None:
        self.handshaked_calls += 1

    def on_recv(self, data: bytes) -> None:
        self.received.append(data)
        if len(self.received) == self.expected and not self.done.done():
            self.done.set_result(None)

    def on_closed(self, exc: Exception | None) -> None:
        self.closed_with.append(exc)
        if not self.closed.done():
            self.closed.set_result(exc)


async def connect_to_echo(server_dir: Any, client_dir: Any, ProtocolClass: Any
                          ) -> tuple[P2PHandler, P2PHandler, Any]:
    """An Echo server for ``server_dir`` and a client handler connected to it with
    ``ProtocolClass``: returns (server handler, client handler, client protocol)."""
    server = P2PHandler(workdir=server_dir.workdir)
    await server.run_as_server(ProtocolClass=Echo)
    point_at(client_dir, server_dir, server_port(server))
    client = P2PHandler(workdir=client_dir.workdir)
    _, proto = await client.connect_peer("server.test", ProtocolClass=ProtocolClass)
    return server, client, proto


def _sizes(rng: random.Random, count: int) -> list[int]:
    """Mostly small messages, some large, a few of 1 MiB, and the edge sizes."""
    sizes = [0, 1, 1 << 20]
    while len(sizes) < count:
        r = rng.random()
        if r < 0.6:
            sizes.append(rng.randint(0, 256))
        elif r < 0.9:
            sizes.append(rng.randint(257, 64 * 1024))
        elif r < 0.98:
            sizes.append(rng.randint(64 * 1024, 512 * 1024))
        else:
            sizes.append(rng.randint(512 * 1024, 1 << 20))
    return sizes


def test_echo_1000_random_sizes_byte_exact(pair: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair
    rng = random.Random(1234)
    payloads = [rng.randbytes(n) for n in _sizes(rng, 1000)]

    async def main() -> None:
        class C(Collector):
            expected = len(payloads)

        server, client, proto = await connect_to_echo(server_dir, client_dir, C)
        await proto.wait_handshaked()
        for p in payloads:
            proto.send(p)
            await proto.drain()
        await asyncio.wait_for(proto.done, 60)
        assert proto.received == [b"recv:" + p for p in payloads]
        assert proto.handshaked_calls == 1
        assert sum(map(len, payloads)) > 20_000_000
        await client.close()
        await server.close()

    run(main(), loop=loop_kind, timeout=120)


def test_both_sides_handshaked_and_get_peer_conn(pair: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        seen: list[str] = []

        class S(TcpP2P):
            def on_handshaked(self) -> None:
                seen.append(self.peer_id)

        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=S)
        point_at(client_dir, server_dir, server_port(server))
        client = P2PHandler(workdir=client_dir.workdir)
        assert client.get_peer_conn("server.test") is None
        _, proto = await client.connect_peer("server.test", ProtocolClass=Collector)
        await proto.wait_handshaked()
        assert client.get_peer_conn("server.test") is proto
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == ["client.test"]
        assert server.get_peer_conn("client.test").peer_id == "client.test"
        assert proto.suite in ("aes-256-gcm", "chacha20-poly1305")
        proto.transport.close()
        assert await asyncio.wait_for(proto.closed, 5) is None
        await client.close()
        await server.close()
        assert client.get_peer_conn("server.test") is None

    run(main(), loop=loop_kind)


def test_send_before_handshake_is_queued_and_delivered_in_order(pair: Any) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        class C(Collector):
            expected = 3

        server, client, proto = await connect_to_echo(server_dir, client_dir, C)
        assert not proto.handshaked
        for m in (b"one", b"two", b"three"):
            proto.send(m)
        await asyncio.wait_for(proto.done, 10)
        assert proto.received == [b"recv:one", b"recv:two", b"recv:three"]
        await client.close()
        await server.close()

    run(main())


def test_pre_handshake_queue_is_bounded(pair: Any) -> None:
    server_dir, client_dir = pair
    client_dir.update_conf(pending_max_messages=2)

    async def main() -> None:
        server, client, proto = await connect_to_echo(server_dir, client_dir, Collector)
        proto.send(b"1")
        proto.send(b"2")
        with pytest.raises(ChannelNotReady):
            proto.send(b"3")
        await client.close()
        await server.close()

    run(main())


def test_send_type_and_size_checks(pair: Any) -> None:
    server_dir, client_dir = pair
    client_dir.update_conf(max_message_size=1000)

    async def main() -> None:
        server, client, proto = await connect_to_echo(server_dir, client_dir, Collector)
        await proto.wait_handshaked()
        with pytest.raises(InvalidDataType):
            proto.send("text is not bytes")  # type: ignore[arg-type]
        with pytest.raises(MessageTooLarge):
            proto.send(b"x" * 1001)
        proto.send(bytearray(b"y" * 1000))
        await asyncio.wait_for(proto.done, 5)
        assert proto.received == [b"recv:" + b"y" * 1000]
        await client.close()
        await server.close()

    run(main())


def test_connect_unknown_peer_raises(pair: Any) -> None:
    _, client_dir = pair

    async def main() -> None:
        client = P2PHandler(workdir=client_dir.workdir)
        with pytest.raises(UnknownPeerError):
            await client.connect_peer("nobody.test")

    run(main())


def test_key_update_mid_stream(pair: Any, loop_kind: str) -> None:
    """Both sides rekey every few messages; nothing is lost or reordered."""
    server_dir, client_dir = pair
    server_dir.update_conf(rekey_after_messages=7)
    client_dir.update_conf(rekey_after_messages=5)
    msgs = [os.urandom(i) for i in range(60)]

    async def main() -> None:
        class C(Collector):
            expected = len(msgs)

        server, client, proto = await connect_to_echo(server_dir, client_dir, C)
        for m in msgs:
            proto.send(m)
        await asyncio.wait_for(proto.done, 10)
        assert proto.received == [b"recv:" + m for m in msgs]
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_keepalive_keeps_a_quiet_connection_and_idle_timeout_detects_a_network_cut(
        pair: Any) -> None:
    """With keepalives on both sides a quiet connection outlives the idle timeout; when a
    proxy in the middle stops forwarding (a network cut), the idle timeout closes it."""
    server_dir, client_dir = pair
    server_dir.update_conf(keepalive_interval=0.05, idle_timeout=0.3)
    client_dir.update_conf(keepalive_interval=0.05)

    async def main() -> None:
        server_protos: list[Collector] = []

        class S(Collector):
            def on_handshaked(self) -> None:
                server_protos.append(self)

        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=S)
        proxy = await TcpProxy(server_port(server)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Collector)
        await proto.wait_handshaked()
        await asyncio.sleep(0.8)  # well past the server's idle timeout
        assert server_protos and server_protos[0].handshaked
        assert not server_protos[0].closed.done()
        proxy.frozen = True
        exc = await asyncio.wait_for(server_protos[0].closed, 5)
        assert type(exc).__name__ == "ConnectionLost" and "idle timeout" in str(exc)
        assert server_protos[0].received == []
        await client.close()
        await server.close()
        await proxy.close()

    run(main())


def test_wait_closed_reports_a_clean_close_on_both_sides(pair: Any) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        accepted: list[TcpP2P] = []

        class S(TcpP2P):
            def on_handshaked(self) -> None:
                accepted.append(self)
                self.send(b"bye")

        class C(TcpP2P):
            def on_recv(self, data: bytes) -> None:
                self.transport.close()

        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=S)
        point_at(client_dir, server_dir, server_port(server))
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=C)
        assert await asyncio.wait_for(proto.wait_closed(), 5) is None
        assert await asyncio.wait_for(accepted[0].wait_closed(), 5) is None
        assert await proto.wait_closed() is None  # also after the fact
        await server.close()

    run(main())


def test_transport_wrapper_never_writes_plaintext(pair: Any) -> None:
    """``self.transport`` encrypts what it writes and exposes no raw write path."""
    server_dir, client_dir = pair

    async def main() -> None:
        class C(Collector):
            expected = 3

        server, client, proto = await connect_to_echo(server_dir, client_dir, C)
        await proto.wait_handshaked()
        tr = proto.transport
        tr.write(b"one")
        tr.writelines([b"two", bytearray(b"three")])
        await asyncio.wait_for(proto.done, 5)
        assert proto.received == [b"recv:one", b"recv:two", b"recv:three"]
        assert tr.can_write_eof() is False
        with pytest.raises(StatusError):
            tr.write_eof()
        for name in ("sendfile", "set_protocol", "_sock"):
            with pytest.raises(AttributeError, match="unencrypted"):
                getattr(tr, name)
        assert tr.get_write_buffer_size() >= 0 and tr.get_extra_info("peername")[0] == "127.0.0.1"
        await client.close()
        await server.close()

    run(main())
