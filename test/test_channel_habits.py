"""API habits from the ecosystem (issue 14): ``async with handler.open_channel(peer)`` as well
as ``await``, ``async with P2PHandler(...)``, ``handler.reconnecting(peer)`` with backoff, and
``from p2psc import P2PHandler`` typed for mypy --strict."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import env_without_password, point_at, run, server_port

from p2psc import Channel, ChannelClosed, DatagramChannel, UnknownPeerError
from p2psc.p2phandler import P2PHandler
from p2psc.udp_p2p import UdpP2P

ROOT = Path(__file__).resolve().parent.parent


class Ends:
    """A ``serve`` callback that echoes and records how each channel ended on the server."""

    def __init__(self) -> None:
        self.opened = 0
        self.ended: asyncio.Queue[str] = asyncio.Queue()

    async def __call__(self, ch: Channel) -> None:
        self.opened += 1
        try:
            async for msg in ch:
                await ch.send(msg)
        except Exception as exc:
            await self.ended.put(type(exc).__name__)
            raise
        await self.ended.put("closed")  # the client's CLOSE record: a clean end

    async def next_end(self) -> str:
        return await asyncio.wait_for(self.ended.get(), 5)


async def start(pair: Any, on_channel: Any) -> tuple[P2PHandler, P2PHandler]:
    server_dir, client_dir = pair
    server = P2PHandler(workdir=server_dir.workdir)
    await server.serve(on_channel, host="127.0.0.1", port=0)
    point_at(client_dir, server_dir, server_port(server))
    return server, P2PHandler(workdir=client_dir.workdir)


async def echo_once(ch: Channel, data: bytes = b"ping") -> None:
    await ch.send(data)
    assert await asyncio.wait_for(ch.recv(), 5) == data


# -- open_channel: await and async with ---------------------------------------------------------


def test_open_channel_async_with_and_await_both_close(pair: Any, loop_kind: str) -> None:
    async def main() -> None:
        ends = Ends()
        server, client = await start(pair, ends)
        async with client.open_channel("server.test", timeout=10) as ch:  # the websockets habit
            assert isinstance(ch, Channel) and not ch.closed
            await echo_once(ch)
        assert ch.closed
        assert await ends.next_end() == "closed"

        ch = await client.open_channel("server.test", timeout=10)  # as before
        await echo_once(ch)
        await ch.close()
        assert await ends.next_end() == "closed"

        async with await client.open_channel("server.test", timeout=10) as ch:  # as before
            await echo_once(ch)
        assert await ends.next_end() == "closed"
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_exception_inside_async_with_closes_and_propagates(pair: Any) -> None:
    async def main() -> None:
        ends = Ends()
        server, client = await start(pair, ends)
        conn = client.open_channel("server.test", timeout=10)
        with pytest.raises(KeyError, match="boom"):
            async with conn as ch:
                await echo_once(ch)
                raise KeyError("boom")
        assert ch.closed
        assert await ends.next_end() == "closed"
        # a failed connect raises from the `async with` line, with nothing to close
        with pytest.raises(UnknownPeerError):
            async with client.open_channel("nobody.test", timeout=5):
                pytest.fail("entered")  # pragma: no cover
        await client.close()
        await server.close()

    run(main())


def test_open_datagram_channel_async_with(pair: Any) -> None:
    class UdpEcho(UdpP2P):
        def on_recv(self, data: bytes, addr: Any) -> None:
            self.send(data, addr)

    async def main() -> None:
        server_dir, client_dir = pair
        async with P2PHandler(workdir=server_dir.workdir) as server:
            transport, _ = await server.run_as_udp_server(UdpEcho, host="127.0.0.1", port=0)
            point_at(client_dir, server_dir, transport.get_extra_info("sockname")[1])
            async with P2PHandler(workdir=client_dir.workdir) as client:
                async with client.open_datagram_channel("server.test", timeout=10) as ch:
                    assert isinstance(ch, DatagramChannel)
                    await ch.send(b"d")
                    assert await asyncio.wait_for(ch.recv(), 5) == b"d"
                assert ch.closed
                with pytest.raises(ChannelClosed):
                    await ch.recv()
                ch2 = await client.open_datagram_channel("server.test", timeout=10)
                await ch2.send(b"e")
                assert await asyncio.wait_for(ch2.recv(), 5) == b"e"
                await ch2.close()

    run(main())


NO_WARNING_SCRIPT = textwrap.dedent("""
    import asyncio, gc, json, sys
    from pathlib import Path
    from p2psc import P2PHandler

    async def echo(ch):
        async for msg in ch:
            await ch.send(msg)

    async def main():
        async with P2PHandler(workdir=sys.argv[1]) as server:
            await server.serve(echo, host="127.0.0.1", port=0)
            peers = Path(sys.argv[2], "data", "peers.json")
            table = json.loads(peers.read_text())
            table["server.test"]["port"] = server.server.sockets[0].getsockname()[1]
            peers.write_text(json.dumps(table))
            async with P2PHandler(workdir=sys.argv[2]) as client:
                async with client.open_channel("server.test", timeout=10) as ch:
                    await ch.send(b"a")
                    assert await asyncio.wait_for(ch.recv(), 5) == b"a"
                ch = await client.open_channel("server.test", timeout=10)
                await ch.close()
                client.open_channel("server.test")           # made, never used
                client.open_datagram_channel("server.test")  # made, never used
                gc.collect()
        print("done")

    asyncio.run(asyncio.wait_for(main(), 30))
    gc.collect()
""")


def test_no_never_awaited_warning(pair: Any) -> None:
    """Both forms, and an unused result, leave no RuntimeWarning ("never awaited")."""
    server_dir, client_dir = pair
    env = env_without_password()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c",
                           NO_WARNING_SCRIPT, str(server_dir.workdir), str(client_dir.workdir)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert "never awaited" not in proc.stderr and "RuntimeWarning" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr


# -- P2PHandler as an async context manager ----------------------------------------------------


def test_handler_context_manager_closes_servers(pair: Any) -> None:
    def port_is_free(port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is fine)
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError:
                return False
        return True

    async def main() -> None:
        server_dir, client_dir = pair
        ends = Ends()
        async with P2PHandler(workdir=server_dir.workdir) as server:
            await server.serve(ends, host="127.0.0.1", port=0)
            port = server_port(server)
            assert not port_is_free(port)
            point_at(client_dir, server_dir, port)
            async with P2PHandler(workdir=client_dir.workdir) as client:
                ch = await client.open_channel("server.test", timeout=10)
                await echo_once(ch)
            assert ch.closed  # the client handler closed it
            assert await ends.next_end() == "closed"
        assert server.server is None and port_is_free(port)

        # also when the block raises
        with pytest.raises(RuntimeError, match="inside"):
            async with P2PHandler(workdir=server_dir.workdir) as server:
                await server.serve(ends, host="127.0.0.1", port=0)
                port = server_port(server)
                raise RuntimeError("inside")
        assert port_is_free(port)

    run(main())


# -- reconnecting --------------------------------------------------------------------------------


class Sleeps:
    """An injected ``sleep``: records each pause and waits only a moment."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.hook: Any = None

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.hook is not None:
            await self.hook(len(self.delays))
        await asyncio.sleep(0.01)


def test_reconnecting_after_server_restart(pair: Any, loop_kind: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        server_dir, _ = pair
        ends = Ends()
        server, client = await start(pair, ends)
        port = server_port(server)
        restarted: list[P2PHandler] = []

        async def restart_after_failures(n: int) -> None:
            if n == 4 and not restarted:  # the old channel ended, then 3 refused attempts
                new = P2PHandler(workdir=server_dir.workdir)
                await new.serve(ends, host="127.0.0.1", port=port)
                restarted.append(new)

        sleeps = Sleeps()
        sleeps.hook = restart_after_failures
        seen: list[Channel] = []
        async for ch in client.reconnecting("server.test", timeout=5, initial_backoff=0.05,
                                            max_backoff=0.2, jitter=False, sleep=sleeps):
            seen.append(ch)
            await echo_once(ch, b"n%d" % len(seen))
            if len(seen) == 1:
                await server.close()  # the server goes away: the channel ends
                assert await asyncio.wait_for(drain(ch), 5) == []
                continue
            break
        assert len(seen) == 2 and seen[0] is not seen[1]
        assert sleeps.delays == [0.05, 0.1, 0.2, 0.2]  # doubling, capped at max_backoff
        failures = [r.getMessage() for r in caplog.records
                    if r.name == "p2psc.channel" and r.levelno == logging.INFO]
        assert len(failures) == 4, failures
        assert "the channel ended after" in failures[0] and "ChannelClosed" in failures[0]
        assert all("connecting failed" in m and "next attempt in" in m for m in failures[1:])
        await client.close()
        for h in restarted:
            await h.close()

    with caplog.at_level(logging.INFO, logger="p2psc.channel"):
        run(main(), loop=loop_kind)


async def drain(ch: Channel) -> list[bytes]:
    return [m async for m in ch]


def test_reconnecting_short_lived_channels_back_off(pair: Any) -> None:
    """A peer that closes every channel at once: each reconnect waits longer (no busy loop);
    with reset_after=0 every channel counts as long-lived, so the pause stays the first one."""
    async def hang_up(ch: Channel) -> None:
        return None

    async def main() -> None:
        server, client = await start(pair, hang_up)
        for reset_after, expected in ((10.0, [0.05, 0.1, 0.2, 0.2]),
                                      (0.0, [0.05, 0.05, 0.05, 0.05])):
            sleeps = Sleeps()
            n = 0
            async with contextlib.aclosing(client.reconnecting(
                    "server.test", timeout=5, initial_backoff=0.05, max_backoff=0.2,
                    jitter=False, reset_after=reset_after, sleep=sleeps)) as it:
                async for ch in it:
                    n += 1
                    assert await asyncio.wait_for(drain(ch), 5) == []
                    if n == 5:
                        break
            assert sleeps.delays == expected
        await client.close()
        await server.close()

    run(main())


def test_reconnecting_backs_off_in_real_time_and_close_ends_it(
        pair: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Nobody listens: with the real asyncio.sleep, attempts in 1.2 s follow the schedule
    (0.05 + 0.1 + 0.2 + 0.2 ...), and handler.close() ends the loop mid-pause."""
    async def main() -> None:
        server_dir, client_dir = pair
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        point_at(client_dir, server_dir, port)
        client = P2PHandler(workdir=client_dir.workdir)
        yielded: list[Channel] = []

        async def loop() -> None:
            async for ch in client.reconnecting("server.test", timeout=5,
                                                initial_backoff=0.05, max_backoff=0.2):
                yielded.append(ch)  # pragma: no cover

        task = asyncio.ensure_future(loop())
        await asyncio.sleep(1.2)
        assert not task.done()
        t0 = asyncio.get_running_loop().time()
        await client.close()
        await asyncio.wait_for(task, 2)  # ends cleanly (no exception), mid-pause
        assert asyncio.get_running_loop().time() - t0 < 0.5
        assert yielded == []
        attempts = [r for r in caplog.records if "connecting failed" in r.getMessage()]
        # jittered pauses of 0.025-0.05, 0.05-0.1, 0.1-0.2, then 0.1-0.2 each
        assert 4 <= len(attempts) <= 14, len(attempts)
        assert all(r.levelno == logging.INFO and "Connection refused" in r.getMessage()
                   or "ConnectionRefused" in r.getMessage() for r in attempts)

    with caplog.at_level(logging.INFO, logger="p2psc.channel"):
        run(main())


def test_reconnecting_close_while_in_use_ends_loop(pair: Any, loop_kind: str) -> None:
    async def main() -> None:
        ends = Ends()
        server, client = await start(pair, ends)
        seen: list[Channel] = []
        sleeps = Sleeps()

        async def loop() -> None:
            async for ch in client.reconnecting("server.test", timeout=5, sleep=sleeps):
                await echo_once(ch)
                seen.append(ch)
                await drain(ch)

        task = asyncio.ensure_future(loop())
        while not seen:
            await asyncio.sleep(0.01)
        await client.close()
        await asyncio.wait_for(task, 5)
        assert len(seen) == 1 and seen[0].closed and sleeps.delays == []
        assert ends.opened == 1
        await server.close()

    run(main(), loop=loop_kind)


def test_reconnecting_break_stops_and_closes(pair: Any) -> None:
    async def main() -> None:
        ends = Ends()
        server, client = await start(pair, ends)
        async for ch in client.reconnecting("server.test", timeout=5):
            await echo_once(ch)
            break
        # the generator is collected at once: it closes the channel, connects no more
        assert await ends.next_end() == "closed"
        assert ch.closed
        # with contextlib.aclosing, deterministically
        async with contextlib.aclosing(
                client.reconnecting("server.test", timeout=5)) as it:
            async for ch in it:
                await echo_once(ch)
                break
        assert ch.closed
        assert await ends.next_end() == "closed"
        await asyncio.sleep(0.3)
        assert ends.opened == 2
        await client.close()
        await server.close()

    run(main())


def test_reconnecting_raises_what_retrying_cannot_fix(pair: Any) -> None:
    async def main() -> None:
        client = P2PHandler(workdir=pair[1].workdir)
        with pytest.raises(UnknownPeerError):
            async for _ in client.reconnecting("nobody.test"):
                pass  # pragma: no cover
        with pytest.raises(ValueError, match="initial_backoff"):
            async for _ in client.reconnecting("server.test", initial_backoff=0):
                pass  # pragma: no cover
        await client.close()

    run(main())


# -- typing ----------------------------------------------------------------------------------


def test_package_exports_are_typed_for_mypy_strict(tmp_path: Path) -> None:
    """``from p2psc import P2PHandler`` is the real class to mypy --strict (not ``object``)."""
    pytest.importorskip("mypy", reason="mypy is not installed")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent("""
        from p2psc import Channel, DatagramChannel, P2PHandler, TcpP2P

        async def main() -> None:
            async with P2PHandler(workdir=".") as handler:
                async with handler.open_channel("a.example") as ch:
                    await ch.send(b"x")
                c: Channel = await handler.open_channel("a.example")
                d: DatagramChannel = await handler.open_datagram_channel("a.example")
                async for again in handler.reconnecting("a.example", max_backoff=5):
                    reveal_type(again)
                print(c, d, TcpP2P)
    """))
    env = dict(os.environ, MYPYPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                           "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
                           str(snippet)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=240, check=False)
    out = proc.stdout + proc.stderr
    assert 'Revealed type is "p2psc.channel.Channel"' in out, out
    assert proc.returncode == 0 and "error:" not in out, out  # (reveal_type is a note)


def test_import_keys_stays_light() -> None:
    """The typed exports do not make ``import p2psc.keys`` import the networking modules."""
    code = ("import sys, p2psc.keys; print(sorted(m for m in ('asyncio', 'p2psc.p2phandler', "
            "'p2psc.channel', 'p2psc.p2p') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
