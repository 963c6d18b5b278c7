"""Review findings on the PostgreSQL directory (issue 13), each a real process on a real
PostgreSQL server: what a worker's command line shows to other local users, workers left
running when the supervisor is SIGKILLed, and the like."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import rsa_key, run
from test_directory_pg_faults import (
    PEERS,
    REPO,
    TIMEOUT,
    _center_workdir,
    _register,
    servers,
)

from p2psc import keys
from p2psc.directory.pgstore import PostgresBackend
from p2psc.directory.record import verify_record
from p2psc.directory.server import make_app, start_server
from p2psc.directory.store import PeerEntry

SECRET = "s3cret-Pw-7f1e"


def _with_password(url: str) -> str:
    # the test server trusts 127.0.0.1, so any password works; it must never be shown
    return url.replace("postgresql://p2psc@", f"postgresql://p2psc:{SECRET}@", 1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_command_lines_do_not_show_the_database_password(pg_url: str,
                                                                tmp_path: Path) -> None:
    """/proc/PID/cmdline is readable by every local user (``ps aux``): the options sent to
    a worker, which hold the --db URL with its password, must not be on its command line."""
    url = _with_password(pg_url)
    assert SECRET in url

    async def main() -> None:
        await _register(pg_url)
        async with servers(_center_workdir(tmp_path), url, 2) as srv:
            pids = srv.worker_pids()
            assert sorted(pids) == [1, 2]
            for pid in pids.values():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert b"p2psc.directory.workers" in cmdline
                assert SECRET.encode() not in cmdline, cmdline
            code, err = await srv.stop()
        assert code == 0, err.decode()[-2000:]
        assert SECRET.encode() not in err
        assert all(SECRET not in line for line in srv.lines)
    run(main(), timeout=60)


def test_workers_exit_when_the_supervisor_is_sigkilled(pg_url: str, tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers: they must notice and exit,
    not keep serving the port (with the old options) forever as orphans."""
    async def main() -> None:
        await _register(pg_url)
        async with servers(_center_workdir(tmp_path), pg_url, 2) as srv:
            pids = srv.worker_pids()
            assert sorted(pids) == [1, 2]
            try:
                assert srv.proc is not None
                srv.proc.kill()
                await asyncio.wait_for(srv.proc.wait(), 10)
                deadline = time.monotonic() + 15
                while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                left = [p for p in pids.values() if _alive(p)]
                assert not left, f"workers {left} outlived their SIGKILLed supervisor"
            finally:
                for pid in pids.values():  # the workers this test started, if still there
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    run(main(), timeout=60)


@pytest.mark.parametrize("userinfo", [
    f"u:123/{SECRET}",     # a '/' in the password: the URL splits before the '@'
    f"u:pa?{SECRET}",      # a '?': asyncpg reads the rest as a query string
    f"u:pa#{SECRET}",      # a '#': the rest is a fragment
    f"u:{SECRET}@127.0.0.1:99999",  # a port out of range (after the real '@')
])
def test_a_bad_database_url_is_one_clean_line_without_its_password(userinfo: str,
                                                                    tmp_path: Path) -> None:
    """A --db URL whose password has unencoded special characters, or whose port is out of
    range: one line saying the URL is bad, exit 1, never the password, never a traceback."""
    url = f"postgresql://{userinfo}@127.0.0.1:1/db".replace(":99999@127.0.0.1:1", ":99999")
    proc = subprocess.run(
        [sys.executable, "-m", "p2psc", "directory", "list", "--workdir", str(tmp_path),
         "--db", url], capture_output=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    out = proc.stdout + proc.stderr
    assert SECRET.encode() not in out, out
    assert proc.returncode == 1, out
    assert b"unexpected error" not in out and b"Traceback" not in out, out
    assert b"postgresql://" in proc.stderr, out


def test_a_worker_that_cannot_load_the_center_key_exits_with_one_line(pg_url: str,
                                                                      tmp_path: Path) -> None:
    """The center key file broken while the service runs (a botched key rotation): a worker
    started again says why in one line and exits 1, the supervisor keeps retrying, the
    other worker keeps serving; no traceback."""
    async def main() -> None:
        await _register(pg_url)
        workdir = _center_workdir(tmp_path)
        async with servers(workdir, pg_url, 2) as srv:
            pids = srv.worker_pids()
            (workdir / "data" / "center_private_key.pem").write_text("not a key\n")
            mark = len(srv.lines)
            os.kill(pids[1], signal.SIGKILL)
            await srv.wait_for(r"worker 1 \(pid \d+\) died \(signal 9\)", 10, mark)
            await srv.wait_for(r"worker 1 \(pid \d+\) died \(exit 1\)", 20, mark)
            code, err = await srv.stop()
        assert code == 0, err.decode()[-2000:]
        assert b"Traceback" not in err, err.decode()[-3000:]
        assert b"not a PEM private key" in err, err.decode()[-3000:]
    run(main(), timeout=60)


def test_a_record_cached_in_the_database_under_another_center_key_is_not_served(
        pg_url: str) -> None:
    """The record cache is a table now: it outlives a restart with a new center key (a key
    rotation), and one machine started with the wrong key shares it with the others. A
    cached record is served only if it verifies with this server's key."""
    old, new = rsa_key("pg-center"), rsa_key("pg-review-rotated-center")

    async def lookup(key: Any) -> tuple[int, bytes]:
        backend = await PostgresBackend.connect(pg_url)
        runner, port = await start_server(make_app(backend, key), "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
                    session.get(f"http://127.0.0.1:{port}/api/get_peer_info",
                                params={"id": PEERS[0]}) as r:
                return r.status, await r.read()
        finally:
            await runner.cleanup()
            await backend.close()

    async def main() -> None:
        await _register(pg_url)
        status, body = await lookup(old)
        assert status == 200
        verify_record(old.public_key(), body, PEERS[0], nonce=None)  # cached now
        status, body = await lookup(new)
        assert status == 200
        verify_record(new.public_key(), body, PEERS[0], nonce=None)
    run(main(), timeout=30)


def test_migrating_a_large_directory_is_not_cut_off_by_the_per_query_timeout(
        pg_url: str) -> None:
    """``directory migrate`` copies every peer in one statement batch: the per-query
    ``--db-timeout`` (meant for one short request) must not fail a large, healthy copy
    (about 45 000 rows a second here: 40 000 peers took longer than 0.5 s)."""
    pem = keys.public_key_pem(rsa_key("pg-review-peer")).decode()
    n = 40_000
    peers = [(PeerEntry(f"peer{i}.test", pem, "192.0.2.1", 1000 + i % 60000, 1_700_000_000),
              1_700_000_000 + i) for i in range(n)]

    async def main() -> None:
        backend = await PostgresBackend.connect(pg_url, timeout=0.5)
        try:
            await backend.import_store(peers, [])
            assert await backend.count() == n
        finally:
            await backend.close()
    run(main(), timeout=120)


async def _sigterm_while_it_waits_for_the_schema_lock(blocker: Any, proc: Any,
                                                      what: str) -> tuple[bytes, bytes]:
    """Wait until ``proc`` waits for the migration's advisory lock (held by ``blocker``),
    SIGTERM it, and return its output (killing it if it does not end in 15 s)."""
    deadline = time.monotonic() + 15
    waiting = 0
    while time.monotonic() < deadline:  # until it waits for the lock
        waiting = await blocker.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        if waiting:
            break
        await asyncio.sleep(0.05)
    assert waiting, f"the {what} never reached its schema check"
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out, err


def test_a_worker_stopped_while_it_starts_exits_quietly(pg_url: str, tmp_path: Path) -> None:
    """SIGTERM reaching a worker while it is still setting up its database (the supervisor
    stopped during a start): exit 0, no traceback."""
    import asyncpg

    from p2psc.directory.pgstore import _LOCK_ID

    async def main() -> None:
        await _register(pg_url)
        workdir = _center_workdir(tmp_path)
        opts = {"db": pg_url, "key_path": str(workdir / "data" / "center_private_key.pem"),
                "host": "127.0.0.1", "port": 0, "postgres": {"timeout": 20.0}}
        blocker = await asyncpg.connect(pg_url, timeout=5)
        try:
            # the worker's schema check waits for this lock
            await blocker.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "p2psc.directory.workers",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(opts).encode() + b"\n")
            await proc.stdin.drain()
            out, err = await _sigterm_while_it_waits_for_the_schema_lock(blocker, proc, "worker")
        finally:
            await blocker.close(timeout=5)
        assert b"Traceback" not in err, err.decode()
        assert proc.returncode == 0, err.decode()
        assert out == b""
    run(main(), timeout=60)


def test_a_single_process_server_stopped_while_it_starts_exits_quietly(
        pg_url: str, tmp_path: Path) -> None:
    """``directory serve`` (one process) SIGTERMed while it sets up its database (a service
    manager stopping it during a slow start): exit 0, no traceback."""
    import asyncpg

    from p2psc.directory.pgstore import _LOCK_ID

    async def main() -> None:
        workdir = _center_workdir(tmp_path)
        blocker = await asyncpg.connect(pg_url, timeout=5)
        try:
            await blocker.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "p2psc", "directory", "serve", "--workdir",
                str(workdir), "--db", pg_url, "--port", "0", "--db-timeout", "20",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            _out, err = await _sigterm_while_it_waits_for_the_schema_lock(blocker, proc, "server")
        finally:
            await blocker.close(timeout=5)
        assert b"Traceback" not in err and b"unexpected error" not in err, err.decode()
        assert proc.returncode == 0, err.decode()
    run(main(), timeout=60)
