"""The async/await Channel API (issue 5): round trips, backpressure, cancel-safe recv,
graceful and abrupt close, serve() callback errors."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from conftest import point_at, run, server_port

from p2psc import Channel, ChannelClosed, ConnectionLost, HandshakeTimeout, UnknownPeerError
from p2psc.p2phandler import P2PHandler


async def start(pair: Any, on_channel: Any, **kw: Any) -> tuple[P2PHandler, P2PHandler]:
    """A server handler serving ``on_channel`` on an ephemeral port, and a client handler."""
    server_dir, client_dir = pair
    server = P2PHandler(workdir=server_dir.workdir)
    await server.serve(on_channel, host="127.0.0.1", port=0, **kw)
    point_at(client_dir, server_dir, server_port(server))
    return server, P2PHandler(workdir=client_dir.workdir)


async def echo(ch: Channel) -> None:
    async for msg in ch:
        await ch.send(b"recv:" + msg)


def test_round_trip_iteration_and_context_manager(pair: Any, loop_kind: str) -> None:
    async def main() -> None:
        server, client = await start(pair, echo)
        async with await client.open_channel("server.test", timeout=10) as ch:
            assert ch.peer_id == "server.test" and not ch.closed
            await ch.send(b"hello")
            assert await asyncio.wait_for(ch.recv(), 5) == b"recv:hello"
            for i in range(100):
                await ch.send(b"%d" % i)
            got = [await asyncio.wait_for(ch.recv(), 5) for _ in range(100)]
            assert got == [b"recv:%d" % i for i in range(100)]
        assert ch.closed
        with pytest.raises(ChannelClosed):
            await ch.recv()
        with pytest.raises(ChannelClosed):
            await ch.send(b"late")
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_backpressure_slow_reader_bounds_sender(pair: Any, loop_kind: str) -> None:
    """A reader that sleeps: reading from the socket pauses, the sender's send() waits, and
    neither the receive queue nor the sender's transport buffer grows without bound."""
    msg_size, count, queue_size = 64 * 1024, 600, 4  # 37.5 MiB in all
    payloads = [os.urandom(16) + bytes(msg_size - 16) for _ in range(count)]

    async def main() -> None:
        server_channel: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        release = asyncio.Event()

        async def slow(ch: Channel) -> None:
            server_channel.set_result(ch)
            await release.wait()  # does not read at all until released
            got = []
            async for msg in ch:
                got.append(msg)
            assert got == payloads

        server, client = await start(pair, slow, queue_size=queue_size)
        ch = await client.open_channel("server.test", timeout=10)
        sent = 0
        max_buffer = 0

        async def sender() -> None:
            nonlocal sent, max_buffer
            raw = ch.protocol.transport.raw  # type: ignore[union-attr]
            for p in payloads:
                await ch.send(p)
                sent += 1
                max_buffer = max(max_buffer, raw.get_write_buffer_size())
        task = asyncio.ensure_future(sender())
        sch = await asyncio.wait_for(server_channel, 10)
        # let the sender run until it is blocked by flow control
        last = -1
        while sent != last:
            last = sent
            await asyncio.sleep(0.3)
        assert not task.done(), "the sender was never slowed down"
        assert sent < count
        high = ch.protocol.transport.raw.get_write_buffer_limits()[1]  # type: ignore[union-attr]
        assert max_buffer <= high + 2 * msg_size
        # the receiver stopped reading: only about queue_size messages (plus what one socket
        # read held) wait in its queue; the rest is in kernel buffers, not in memory we hold
        assert sch.protocol.queued <= queue_size + 8
        assert sch.protocol._reading_paused
        release.set()
        await asyncio.wait_for(task, 30)
        await ch.close()
        await client.close()
        await server.close()

    run(main(), loop=loop_kind, timeout=60)


def test_cancelled_recv_loses_no_message(pair: Any, loop_kind: str) -> None:
    async def main() -> None:
        server_ch: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def keep(ch: Channel) -> None:
            server_ch.set_result(ch)
            await done.wait()

        server, client = await start(pair, keep)
        ch = await client.open_channel("server.test", timeout=10)
        sch = await asyncio.wait_for(server_ch, 5)
        received: list[bytes] = []
        timeouts = 0
        sender_done = False

        async def send_slowly() -> None:
            nonlocal sender_done
            for i in range(200):
                await sch.send(b"m%d" % i)
                if i % 7 == 0:
                    await asyncio.sleep(0.002)
            sender_done = True

        t = asyncio.ensure_future(send_slowly())
        while len(received) < 200:
            try:  # a very short timeout: many recv() calls are cancelled, some just as woken
                received.append(await asyncio.wait_for(ch.recv(), 0.0005))
            except asyncio.TimeoutError:
                timeouts += 1
        await asyncio.wait_for(t, 5)
        assert received == [b"m%d" % i for i in range(200)]
        assert timeouts > 0
        # several concurrent receivers, all cancelled but one: still nothing lost
        waiters = [asyncio.ensure_future(ch.recv()) for _ in range(5)]
        await asyncio.sleep(0.01)
        for w in waiters[:4]:
            w.cancel()
        await sch.send(b"last")
        assert await asyncio.wait_for(waiters[4], 5) == b"last"
        done.set()
        await ch.close()
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_graceful_close_ends_iteration_after_pending_messages(pair: Any, loop_kind: str) -> None:
    async def main() -> None:
        async def talk_and_close(ch: Channel) -> None:
            for i in range(10):
                await ch.send(b"x%d" % i)
            await ch.close()

        server, client = await start(pair, talk_and_close)
        ch = await client.open_channel("server.test", timeout=10)
        got = []
        async for msg in ch:  # ends cleanly on the CLOSE record
            got.append(msg)
        assert got == [b"x%d" % i for i in range(10)]
        assert ch.closed
        assert await ch.protocol.wait_closed() is None
        with pytest.raises(ChannelClosed):
            await ch.recv()
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_abrupt_loss_raises_connection_lost(pair: Any, loop_kind: str) -> None:
    async def main() -> None:
        async def send_then_abort(ch: Channel) -> None:
            await ch.send(b"before")
            await asyncio.sleep(0.05)
            ch.abort()  # no CLOSE record: the peer must see a loss, not a clean end

        server, client = await start(pair, send_then_abort)
        ch = await client.open_channel("server.test", timeout=10)
        assert await asyncio.wait_for(ch.recv(), 5) == b"before"
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(ch.recv(), 5)
        with pytest.raises(ConnectionLost):  # iteration raises too, it does not end quietly
            async for _ in ch:
                pass
        with pytest.raises(ConnectionLost):
            await ch.send(b"after")
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_callback_error_is_logged_not_fatal(pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        calls = 0

        async def flaky(ch: Channel) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom")
            await echo(ch)

        server, client = await start(pair, flaky)
        ch1 = await client.open_channel("server.test", timeout=10)
        async for _ in ch1:  # closed gracefully after the callback failed
            pass
        ch2 = await client.open_channel("server.test", timeout=10)
        await ch2.send(b"ok")
        assert await asyncio.wait_for(ch2.recv(), 5) == b"recv:ok"
        await ch2.close()
        await client.close()
        await server.close()

    run(main())
    assert any("error in the channel callback" in r.getMessage() and r.name == "p2psc.channel"
               for r in caplog.records)


def test_open_channel_errors(pair: Any, tmp_path: Any) -> None:
    async def main() -> None:
        _, client_dir = pair
        client = P2PHandler(workdir=client_dir.workdir)
        with pytest.raises(UnknownPeerError):
            await client.open_channel("nobody.test", timeout=5)
        # a listener that accepts but never answers the handshake
        held: list[asyncio.StreamWriter] = []  # (Python 3.13 closes an unreferenced writer)
        silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        point_at(client_dir, pair[0], silent.sockets[0].getsockname()[1])
        client = P2PHandler(workdir=client_dir.workdir)
        with pytest.raises(HandshakeTimeout):
            await client.open_channel("server.test", timeout=0.3)
        silent.close()
        await client.close()

    run(main())


def test_datagram_channel_round_trip_and_close(pair: Any, loop_kind: str) -> None:
    from p2psc import DatagramChannel, MessageTooLarge
    from p2psc.udp_p2p import UdpP2P

    class UdpEcho(UdpP2P):
        def on_recv(self, data: bytes, addr: Any) -> None:
            self.send(b"recv:" + data, addr)

    async def main() -> None:
        server_dir, client_dir = pair
        server = P2PHandler(workdir=server_dir.workdir)
        transport, _ = await server.run_as_udp_server(UdpEcho, host="127.0.0.1", port=0)
        point_at(client_dir, server_dir, transport.get_extra_info("sockname")[1])
        client = P2PHandler(workdir=client_dir.workdir)
        async with await client.open_datagram_channel("server.test", timeout=10) as ch:
            assert isinstance(ch, DatagramChannel) and ch.peer_id == "server.test"
            for i in range(20):
                await ch.send(b"d%d" % i)
            got = set()
            while len(got) < 20:  # loopback does not lose these; order is not promised
                got.add(await asyncio.wait_for(ch.recv(), 5))
            assert got == {b"recv:d%d" % i for i in range(20)}
            with pytest.raises(MessageTooLarge):
                await ch.send(bytes(ch.max_payload + 1))
        assert ch.closed
        with pytest.raises(ChannelClosed):
            await ch.recv()
        # the server stops: its CLOSE ends the client's iteration cleanly
        ch2 = await client.open_datagram_channel("server.test", timeout=10)
        await ch2.send(b"x")
        assert await asyncio.wait_for(ch2.recv(), 5) == b"recv:x"
        await server.close()

        async def drain() -> list[bytes]:
            return [m async for m in ch2]
        assert await asyncio.wait_for(drain(), 5) == []
        await client.close()

    run(main(), loop=loop_kind)


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connect_failures_are_p2p_errors_and_still_os_errors(pair: Any) -> None:
    """A closed port or a name that does not resolve: a ConnectError (a P2PError, and an
    OSError so that ``except OSError`` keeps working) naming the peer, where, and why."""
    import errno

    from p2psc import ConnectError, P2PError, PeerError

    async def main() -> None:
        server_dir, client_dir = pair
        port = _closed_port()
        point_at(client_dir, server_dir, port)
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            with pytest.raises(ConnectError) as ei:
                await client.open_channel("server.test", timeout=5)
            e = ei.value
            assert isinstance(e, P2PError) and isinstance(e, PeerError)
            assert isinstance(e, OSError) and e.errno == errno.ECONNREFUSED
            assert (e.host, e.port) == ("127.0.0.1", port)
            assert str(e) == f"cannot connect to server.test at 127.0.0.1:{port}: " \
                             "Connection refused"
            with pytest.raises(OSError):  # what callers that knew the old behaviour catch
                await client.connect_peer("server.test")
        finally:
            await client.close()
        client_dir.know(server_dir, port=9, host="nosuchhost.invalid")
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            with pytest.raises(ConnectError,
                               match=r"^cannot connect to server\.test at nosuchhost\.invalid:9: "
                                     r"cannot resolve nosuchhost\.invalid: ") as ei:
                await client.open_channel("server.test", timeout=10)
            assert "Unknown error" not in str(ei.value)
            with pytest.raises(ConnectError, match="cannot resolve nosuchhost.invalid"):
                await client.open_datagram_channel("server.test", timeout=10)
        finally:
            await client.close()

    run(main())


def test_a_refused_handshake_says_what_is_likely(pair: Any) -> None:
    """The server has another key on file for the client (the client's key changed): it
    closes without a word after INIT; the initiator says what that probably means."""
    from p2psc import HandshakeError

    async def main() -> None:
        server_dir, client_dir = pair
        server_dir.know(client_dir, key=server_dir.key)
        server, client = await start(pair, echo)
        try:
            with pytest.raises(HandshakeError, match=r"^the peer refused the handshake: it "
                               r"probably does not know this peer's key \(add it there with "
                               r"p2psc add-peer, or register it in the directory\), or this "
                               r"peer's key changed$"):
                await client.open_channel("server.test", timeout=5)
        finally:
            await client.close()
            await server.close()

    run(main())
