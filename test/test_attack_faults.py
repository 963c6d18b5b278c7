"""Faults and load (issue 7): a peer killed with SIGKILL mid-transfer, network cuts during the
handshake and mid-transfer, and 1,000 concurrent connections exchanging 100 messages each."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from attack_util import Client, Recorder, assert_still_serving, recorder, wait_until
from conftest import TcpProxy, point_at, run, server_port

from p2psc.p2p import TcpP2P
from p2psc.p2pexcept import ConnectionLost, HandshakeTimeout
from p2psc.p2phandler import P2PHandler

ROOT = Path(__file__).resolve().parent.parent

_SENDER = textwrap.dedent("""
    import asyncio, sys
    from p2psc.p2phandler import P2PHandler
    from p2psc.p2p import TcpP2P

    async def main():
        handler = P2PHandler(workdir=sys.argv[1])
        _, proto = await handler.connect_peer(sys.argv[2], ProtocolClass=TcpP2P)
        await proto.wait_handshaked()
        k = 0
        while True:  # until killed
            proto.send(b"%08d:" % k + bytes([k % 251]) * (1000 + k % 5000))
            k += 1
            if k % 16 == 0:
                await proto.drain()
                await asyncio.sleep(0)

    asyncio.run(main())
""")


def test_peer_killed_with_sigkill_mid_transfer(pair: Any, tmp_path: Any, loop_kind: str) -> None:
    """The server sees exactly the messages that arrived whole, in order and byte-exact, then
    on_closed with ConnectionLost (no CLOSE record), and goes on serving."""
    server_dir, client_dir = pair
    script = tmp_path / "sender.py"
    script.write_text(_SENDER)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        point_at(client_dir, server_dir, server_port(server))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, str(script), str(client_dir.workdir),
                                 "server.test"], env=env)
        try:
            await wait_until(lambda: sum(k == "recv" for k, _ in R.log) >= 300, 20,
                             "300 messages from the sender")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            closes = await asyncio.wait_for(_closes(R), 10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        assert len(closes) == 1 and isinstance(closes[0], ConnectionLost), closes
        recvs = [v for k, v in R.log if k == "recv"]
        for k, data in enumerate(recvs):
            assert data == b"%08d:" % k + bytes([k % 251]) * (1000 + k % 5000), k
        kinds = [k for k, _ in R.log]
        assert kinds[0] == "handshaked" and kinds[-1] == "closed"
        await assert_still_serving(server, server_dir, tmp_path)
        await server.close()

    async def _closes(R: type[Recorder]) -> list[Any]:
        await wait_until(lambda: any(k == "closed" for k, _ in R.log), 10, "on_closed")
        return [v for k, v in R.log if k == "closed"]

    run(main(), loop=loop_kind, timeout=60)


def test_network_cut_during_the_handshake_hits_the_handshake_timeout(pair: Any,
                                                                     tmp_path: Any) -> None:
    """The proxy stops forwarding before RESP reaches the client: both sides give up at their
    handshake timeout, neither calls on_handshaked."""
    server_dir, client_dir = pair
    server_dir.update_conf(handshake_timeout=0.3)
    client_dir.update_conf(handshake_timeout=0.3)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        proxy = await TcpProxy(server_port(server)).start()
        proxy.frozen = True  # nothing gets through: the INIT reaches no one
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            t0 = time.monotonic()
            _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
            with pytest.raises(HandshakeTimeout):
                await asyncio.wait_for(proto.wait_handshaked(), 5)
            assert 0.25 < time.monotonic() - t0 < 2
            closes = await wait_closes(R, 1)
            assert type(closes[0]) is HandshakeTimeout
            assert proto.handshaked_calls == 0 and "handshaked" not in [k for k, _ in R.log]
            await assert_still_serving(server, server_dir, tmp_path)
        finally:
            await client.close()
            await proxy.close()
            await server.close()

    run(main())


async def wait_closes(R: type[Recorder], n: int) -> list[Any]:
    await wait_until(lambda: sum(k == "closed" for k, _ in R.log) >= n, 5, "closes")
    return [v for k, v in R.log if k == "closed"]


def test_network_cut_mid_transfer_is_detected_by_the_idle_timeout(pair: Any, tmp_path: Any,
                                                                  loop_kind: str) -> None:
    """While the client streams messages, the network goes silent (the proxy stops
    forwarding without closing anything). The server, with idle_timeout, closes with
    ConnectionLost; what it delivered before the cut is an exact prefix of what was sent."""
    server_dir, client_dir = pair
    server_dir.update_conf(idle_timeout=0.4)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        proxy = await TcpProxy(server_port(server)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
            await asyncio.wait_for(proto.wait_handshaked(), 5)
            sent = []
            for k in range(200):
                if k == 100:
                    proxy.frozen = True
                msg = b"msg %d " % k + bytes(k * 10)
                proto.send(msg)
                sent.append(msg)
                await asyncio.sleep(0.001)
            closes = await asyncio.wait_for(wait_closes(R, 1), 5)
            assert type(closes[0]) is ConnectionLost and "idle timeout" in str(closes[0])
            recvs = [v for k, v in R.log if k == "recv"]
            assert 0 < len(recvs) <= 200 and recvs == sent[:len(recvs)]
            await assert_still_serving(server, server_dir, tmp_path)
        finally:
            await client.close()
            await proxy.close()
            await server.close()

    run(main(), loop=loop_kind)


# -- load -----------------------------------------------------------------------------------------

N_CONN, N_MSG = 1000, 100

_LOAD_CLIENT = textwrap.dedent("""
    import asyncio, json, random, resource, sys, time
    from p2psc.p2phandler import P2PHandler
    from p2psc.p2p import TcpP2P

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    N_CONN, N_MSG = int(sys.argv[3]), int(sys.argv[4])

    def payload(c, k):
        rng = random.Random(c * 100003 + k)
        return b"%d/%d:" % (c, k) + rng.randbytes(rng.choice([0, 1, 10, 100, 1000, 5000]))

    class C(TcpP2P):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.got = []
            self.done = asyncio.get_running_loop().create_future()
        def on_recv(self, data):
            self.got.append(data)
            if len(self.got) == N_MSG and not self.done.done():
                self.done.set_result(None)
        def on_closed(self, exc):
            if not self.done.done():
                self.done.set_exception(exc or RuntimeError("closed early"))

    async def one(handler, c, sem, errors):
        async with sem:  # connects and handshakes at most 200 at a time
            _, p = await handler.connect_peer(sys.argv[2], ProtocolClass=C)
            await asyncio.wait_for(p.wait_handshaked(), 60)
        for k in range(N_MSG):
            p.send(payload(c, k))
            if k % 10 == 9:
                await asyncio.sleep(0)
        return p

    async def main():
        import uvloop  # noqa: F401 (the loop is chosen by asyncio.run below)
        handler = P2PHandler(workdir=sys.argv[1])
        sem = asyncio.Semaphore(200)
        t0 = time.monotonic()
        protos = await asyncio.gather(*(one(handler, c, sem, []) for c in range(N_CONN)))
        t_up = time.monotonic() - t0
        print(json.dumps({"event": "all connected", "open": len(protos)}), flush=True)
        await asyncio.wait_for(asyncio.gather(*(p.done for p in protos)), 120)
        bad = 0
        for c, p in enumerate(protos):
            if p.got != [b"echo:" + payload(c, k) for k in range(N_MSG)]:
                bad += 1
        sys.stdin.readline()  # the test measures the server while everything is open
        for p in protos:
            p.close()
        await asyncio.sleep(0.5)
        await handler.close()
        print(json.dumps({"event": "done", "bad": bad, "t_up": t_up,
                          "t_total": time.monotonic() - t0}), flush=True)

    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
""")


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_load_1000_connections_100_messages_each(pair: Any, tmp_path: Any) -> None:
    """1,000 concurrent TCP connections (clients in a subprocess), 100 messages each way per
    connection: the server receives every message exactly once, byte-exact and in order, the
    clients every echo; no errors; all 1,000 are open at once; after they close, the
    server's connections are all gone and its Python heap is back near its baseline."""
    server_dir, client_dir = pair
    for d in (server_dir, client_dir):  # one peer, 1,000 connections: above the default cap
        d.update_conf(max_connections_per_peer=N_CONN)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    script = tmp_path / "load_client.py"
    script.write_text(_LOAD_CLIENT)
    seen: dict[int, list[int]] = {}
    errors: list[Any] = []

    class Server(TcpP2P):
        def on_recv(self, data: bytes) -> None:
            if data == b"still there?":  # the warm-up peer
                self.send(b"recv:" + data)
                return
            head = data.split(b":", 1)[0]
            c, k = map(int, head.split(b"/"))
            seen.setdefault(c, []).append(k)
            self.send(b"echo:" + data)

        def on_closed(self, exc: Exception | None) -> None:
            if exc is not None:
                errors.append(exc)

    figures: dict[str, Any] = {}

    async def main() -> None:
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=Server)
        point_at(client_dir, server_dir, server_port(server))
        # warm-up: one connection, so the baseline includes what the first one allocates
        await assert_still_serving(server, server_dir, tmp_path)
        gc.collect()
        blocks0, rss0 = sys.getallocatedblocks(), _rss_kb()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(client_dir.workdir), "server.test", str(N_CONN),
            str(N_MSG), env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 90))
            assert line == {"event": "all connected", "open": N_CONN}
            await wait_until(lambda: sum(map(len, seen.values())) >= N_CONN * N_MSG, 90,
                             "every message")
            figures["held"] = len(server.connections.protocols)
            figures["rss_peak_mb"] = (_rss_kb() - rss0) / 1024
            proc.stdin.write(b"close\n")
            await proc.stdin.drain()
            done = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            figures.update(done)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await wait_until(lambda: not server.connections.protocols, 10, "server connections to close")
        gc.collect()
        figures["blocks_after"] = sys.getallocatedblocks() - blocks0
        figures["rss_after_mb"] = (_rss_kb() - rss0) / 1024
        await server.close()

    run(main(), loop="uvloop" if "uvloop" in sys.modules or _has_uvloop() else "asyncio",
        timeout=180)
    print(f"\nload figures: {figures}")
    assert figures["held"] >= N_CONN  # all open at once (plus none left over)
    assert figures["bad"] == 0  # every client got every echo, exactly, in order
    assert errors == []  # every connection ended with the authenticated CLOSE
    assert sorted(seen) == list(range(N_CONN))
    assert all(v == list(range(N_MSG)) for v in seen.values())  # exactly once, in order
    assert figures["blocks_after"] < 50_000, figures  # the heap back near the baseline



def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
        return True
    except ImportError:
        return False
