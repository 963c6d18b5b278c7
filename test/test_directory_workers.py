"""``p2psc directory serve --workers N`` and several servers ("machines") on one database,
as real processes on 127.0.0.1 (p2psc/directory/workers.py, docs/DIRECTORY.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
from conftest import run
from test_directory_pg_faults import (
    PEERS,
    REPO,
    TIMEOUT,
    _center,
    _center_workdir,
    _peer_key,
    _register,
    servers,
)

from p2psc import keys
from p2psc.directory.record import verify_record
from p2psc.directory.store import DirectoryStore
from p2psc.directory.update import make_update_request


async def _lookup(session: aiohttp.ClientSession, base: str, peer: str
                  ) -> tuple[int, str, int]:
    nonce = os.urandom(16).hex()
    async with session.get(f"{base}/api/get_peer_info", params={"id": peer, "nonce": nonce}) as r:
        assert r.status == 200, await r.text()
        rec = verify_record(_center().public_key(), await r.read(), peer, nonce=nonce)
    return r.status, rec.host, rec.port


async def _update(session: aiohttp.ClientSession, base: str, peer: str, port: int,
                  ts: int) -> int:
    req = make_update_request(peer, _peer_key(peer), "198.51.100.9", port, timestamp=ts)
    async with session.post(f"{base}/api/update_address", json=req) as r:
        await r.read()
        return r.status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped by this machine's init) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_two_servers_on_one_postgres_see_each_others_updates(pg_url: str,
                                                            tmp_path: Path) -> None:
    """Two independent `serve` commands ("two machines") on one database: an update made
    through one is what the other answers at once, and a replay of it through the other is
    refused (the nonce table is shared)."""
    async def main() -> None:
        await _register(pg_url)
        workdir = _center_workdir(tmp_path)
        async with servers(workdir, pg_url, 1) as a, servers(workdir, pg_url, 1) as b:
            base_a = f"http://127.0.0.1:{a.port}"
            base_b = f"http://127.0.0.1:{b.port}"
            assert a.port != b.port
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                import time
                ts = int(time.time())
                req = make_update_request(PEERS[0], _peer_key(PEERS[0]), "198.51.100.9", 4242,
                                          timestamp=ts)
                async with session.post(f"{base_a}/api/update_address", json=req) as r:
                    assert r.status == 200, await r.text()
                assert await _lookup(session, base_b, PEERS[0]) == (200, "198.51.100.9", 4242)
                async with session.post(f"{base_b}/api/update_address", json=req) as r:
                    assert r.status == 409
                    assert "nonce already used" in (await r.json())["error"]
                # an older signed update through B after a newer one through A: refused
                assert await _update(session, base_a, PEERS[1], 5001, ts + 1) == 200
                assert await _update(session, base_b, PEERS[1], 5000, ts) == 409
                assert await _lookup(session, base_a, PEERS[1]) == (200, "198.51.100.9", 5001)
    run(main(), timeout=60)


def test_workers_on_sqlite_share_the_file_and_the_port(tmp_path: Path) -> None:
    """--workers works with SQLite too: both processes answer on one port (fresh connections
    are spread by the kernel), and an update through either is seen by every later lookup."""
    db = tmp_path / "directory.sqlite3"
    with DirectoryStore(db) as store:
        for p in PEERS:
            store.put(p, keys.public_key_pem(_peer_key(p)).decode(), "192.0.2.1", 1000)

    async def main() -> None:
        workdir = _center_workdir(tmp_path)
        async with servers(workdir, str(db), 2) as srv:
            assert sorted(srv.worker_pids()) == [1, 2]
            base = f"http://127.0.0.1:{srv.port}"
            import time
            ts = int(time.time())
            conn = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT) as session:
                for i, peer in enumerate(PEERS):
                    assert await _update(session, base, peer, 3000 + i, ts) == 200
                results = await asyncio.gather(*[_lookup(session, base, PEERS[i % 4])
                                                 for i in range(40)])
                assert [r[2] for r in results] == [3000 + i % 4 for i in range(40)]
    run(main(), timeout=60)


def test_supervisor_sigterm_stops_every_worker(pg_url: str, tmp_path: Path) -> None:
    async def main() -> None:
        await _register(pg_url)
        srv = await servers(_center_workdir(tmp_path), pg_url, 3).__aenter__()
        pids = srv.worker_pids()
        assert sorted(pids) == [1, 2, 3] and all(_alive(p) for p in pids.values())
        code, err = await srv.stop()
        assert code == 0, err.decode()[-2000:]
        assert not any(_alive(p) for p in pids.values())
        assert b"Traceback" not in err
        with socket.socket() as s:  # the port is free again
            s.bind(("127.0.0.1", srv.port))
    run(main(), timeout=60)


def test_workers_with_unreachable_database_fail_at_once_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        url = f"postgresql://p2psc:secret-pw@127.0.0.1:{dead}/nothing"
        proc = subprocess.run(
            [sys.executable, "-m", "p2psc", "directory", "serve", "--workdir",
             str(_center_workdir(tmp_path)), "--db", url, "--port", "0", "--workers", "2",
             "--db-timeout", "1"],
            capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"p2psc directory: postgresql://p2psc@127.0.0.1:{dead}/nothing: cannot "
                    "connect to PostgreSQL: connection refused"), proc.stderr
    assert "secret-pw" not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_dead_worker_is_restarted_with_backoff_and_sigint_stops_all(pg_url: str,
                                                                    tmp_path: Path) -> None:
    async def main() -> None:
        await _register(pg_url)
        async with servers(_center_workdir(tmp_path), pg_url, 2) as srv:
            first = srv.worker_pids()[2]
            mark = len(srv.lines)
            os.kill(first, signal.SIGKILL)
            await srv.wait_for(r"worker 2 \(pid \d+\) died \(signal 9\); starting it again "
                               r"in 0\.5 s", 10, mark)
            m = await srv.wait_for(r"worker 2 \(pid (\d+)\) serving", 15, mark)
            second = int(m.group(1))
            mark = len(srv.lines)
            os.kill(second, signal.SIGKILL)
            # dying again soon after: the wait doubles
            await srv.wait_for(r"worker 2 \(pid \d+\) died \(signal 9\); starting it again "
                               r"in 1 s", 10, mark)
            await srv.wait_for(r"worker 2 \(pid \d+\) serving", 15, mark)
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                assert (await _lookup(session, f"http://127.0.0.1:{srv.port}", PEERS[0]))[0] == 200
            assert srv.proc is not None
            srv.proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(srv.proc.wait(), 20)
            assert srv.proc.returncode == 0
            assert not any(_alive(p) for p in srv.worker_pids().values())
    run(main(), timeout=90)


def test_sigterm_to_the_whole_group_stops_quietly(pg_url: str, tmp_path: Path) -> None:
    """A service manager signals every process of the group at once: the supervisor must not
    report its workers' exits as deaths, nor start them again."""
    async def main() -> None:
        await _register(pg_url)
        srv = await servers(_center_workdir(tmp_path), pg_url, 2).__aenter__()
        assert srv.proc is not None
        pids = srv.worker_pids()
        mark = len(srv.lines)
        os.killpg(srv.proc.pid, signal.SIGTERM)
        await asyncio.wait_for(srv.proc.wait(), 20)
        code, err = await srv.stop()
        assert code == 0, err.decode()[-2000:]
        assert not any("died" in line or "serving" in line for line in srv.lines[mark:]), \
            srv.lines[mark:]
        assert not any(_alive(p) for p in pids.values())
        assert b"Traceback" not in err
    run(main(), timeout=60)
