"""The directory on PostgreSQL under faults, with clients looking up and updating throughout
(issue 13): a worker process SIGKILLed, the database stopped or crashed and started again, a
database too slow to answer. Real processes (``p2psc directory serve --workers 2``), a real
PostgreSQL server started by the test (test/pgserver.py), real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import rsa_key, run
from pgserver import PgServer

from p2psc import keys
from p2psc.directory.pgstore import PostgresBackend
from p2psc.directory.record import verify_record
from p2psc.directory.server import STATE_KEY, make_app, start_server
from p2psc.directory.update import make_update_request

REPO = Path(__file__).resolve().parent.parent
PEERS = [f"peer{i}.test" for i in range(4)]
TIMEOUT = aiohttp.ClientTimeout(total=5)


def _center() -> Any:
    return rsa_key("pg-center")


def _peer_key(peer_id: str) -> Any:
    return rsa_key("pg-" + peer_id)


async def _register(url: str) -> None:
    backend = await PostgresBackend.connect(url)
    try:
        for p in PEERS:
            await backend.put(p, keys.public_key_pem(_peer_key(p)).decode(), "192.0.2.1", 1000)
    finally:
        await backend.close()


async def _rows(url: str) -> dict[str, tuple[str, int, int]]:
    """peer_id -> (host, port, last_update_ts), read straight from the database."""
    import asyncpg
    conn = await asyncpg.connect(url, timeout=5)
    try:
        rows = await conn.fetch("SELECT peer_id, host, port, last_update_ts FROM peers")
    finally:
        await conn.close()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


class Servers:
    """``p2psc directory serve --workers N`` as a child process, its stdout read as lines."""

    def __init__(self, workdir: Path, db: str, workers: int, *extra: str) -> None:
        self.argv = [sys.executable, "-m", "p2psc", "directory", "serve", "--workdir",
                     str(workdir), "--db", db, "--port", "0", "--workers", str(workers), *extra]
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.port = 0
        self._reader: asyncio.Task[None] | None = None
        self._new_line = asyncio.Event()

    async def start(self) -> Servers:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            start_new_session=True)  # its own process group, as under a service manager
        self._reader = asyncio.create_task(self._read())
        line = await self.wait_for(r"p2psc directory: http://127\.0\.0\.1:(\d+)/", 30)
        self.port = int(line.group(1))
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().rstrip("\n"))
            self._new_line.set()

    async def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match[str]:
        """The first line from index ``after`` on matching ``pattern`` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[after:]:
                m = re.search(pattern, line)
                if m:
                    return m
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.returncode is not None):
                raise AssertionError(f"no line matching {pattern!r}; got {self.lines}")
            self._new_line.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), min(left, 0.5))

    def worker_pids(self) -> dict[int, int]:
        pids: dict[int, int] = {}
        for line in self.lines:
            m = re.search(r"worker (\d+) \(pid (\d+)\) serving", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        return pids

    async def stop(self) -> tuple[int, bytes]:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reader, 5)
        assert self.proc.stderr is not None
        err = await self.proc.stderr.read()
        return self.proc.returncode or 0, err


@contextlib.asynccontextmanager
async def servers(workdir: Path, db: str, workers: int, *extra: str) -> AsyncIterator[Servers]:
    s = Servers(workdir, db, workers, *extra)
    try:
        yield await s.start()
    finally:
        if s.proc is not None:
            await s.stop()


def _center_workdir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    keys.write_private_key(tmp_path / "data" / "center_private_key.pem", _center())
    return tmp_path


@contextlib.asynccontextmanager
async def clients(load: Load, session: aiohttp.ClientSession, updates: int
                  ) -> AsyncIterator[list[asyncio.Task[None]]]:
    """One looking-up and one updating client per peer, stopped (and awaited) at the end."""
    tasks = [asyncio.create_task(load.lookups(session, p)) for p in PEERS]
    tasks += [asyncio.create_task(load.updates_of(session, p, updates)) for p in PEERS]
    try:
        yield tasks
    finally:
        load.running = False
        done, pending = await asyncio.wait(tasks, timeout=15)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]


@dataclass
class Load:
    """Clients looking up and updating for as long as ``running``; what they saw."""

    base: str
    lookups_ok: int = 0
    updates: dict[str, list[tuple[int, str, int, int]]] = field(default_factory=dict)
    # (time, status, latency ms) of every answer or error
    log: list[tuple[float, int, float]] = field(default_factory=list)
    running: bool = True
    errors_503: list[str] = field(default_factory=list)

    async def lookups(self, session: aiohttp.ClientSession, peer: str) -> None:
        center = _center().public_key()
        while self.running:
            nonce = os.urandom(16).hex()
            t0 = time.monotonic()
            try:
                async with session.get(f"{self.base}/api/get_peer_info",
                                       params={"id": peer, "nonce": nonce}) as r:
                    body = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            self.log.append((t0, status, (time.monotonic() - t0) * 1000))
            if status == 200:
                verify_record(center, body, peer, nonce=nonce)
                self.lookups_ok += 1
            elif status == 503:
                self.errors_503.append(body.decode())
            await asyncio.sleep(0.005)

    async def updates_of(self, session: aiohttp.ClientSession, peer: str, count: int) -> None:
        """Sequential updates of ``peer`` with increasing timestamps; each (ts, host, port,
        status) is recorded, so that every one answered 200 can be checked afterwards."""
        done = self.updates.setdefault(peer, [])
        ts = 0
        for i in range(count):
            if not self.running:
                return
            port = 2000 + i
            # newer than the last one, and within the server's clock skew (120 s) of now
            ts = max(ts + 1, int(time.time()))
            req = make_update_request(peer, _peer_key(peer), "198.51.100.7", port,
                                      timestamp=ts)
            t0 = time.monotonic()
            try:
                async with session.post(f"{self.base}/api/update_address", json=req) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            self.log.append((t0, status, (time.monotonic() - t0) * 1000))
            done.append((ts, "198.51.100.7", port, status))
            await asyncio.sleep(0.2)


def _check_acknowledged_updates_persisted(load: Load, rows: dict[str, tuple[str, int, int]]
                                          ) -> int:
    """Every update answered 200 is in the database: the row holds an update at least as new
    as the newest acknowledged one, and exactly the one that was sent with its timestamp."""
    acked = 0
    for peer, sent in load.updates.items():
        ok = [u for u in sent if u[3] == 200]
        acked += len(ok)
        host, port, last_ts = rows[peer]
        if ok:
            assert last_ts >= max(u[0] for u in ok), (peer, last_ts, ok[-1])
        by_ts = {u[0]: u for u in sent}
        if last_ts in by_ts:  # the row is exactly the update that carried that timestamp
            assert (host, port) == by_ts[last_ts][1:3]
    return acked


def test_sigkilled_worker_others_keep_answering_and_it_comes_back(pg_url: str,
                                                                  tmp_path: Path) -> None:
    async def main() -> None:
        await _register(pg_url)
        async with servers(_center_workdir(tmp_path), pg_url, 2) as srv:
            before = srv.worker_pids()
            assert sorted(before) == [1, 2]
            load = Load(f"http://127.0.0.1:{srv.port}")
            # a fresh connection per request: the kernel spreads them over both workers
            conn = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=conn, timeout=TIMEOUT) as session, \
                    clients(load, session, 400):
                await asyncio.sleep(1.0)
                mark = len(srv.lines)
                os.kill(before[1], signal.SIGKILL)
                await srv.wait_for(r"worker 1 \(pid \d+\) died \(signal 9\)", 10, mark)
                died_at = time.monotonic()
                ok_at_death = load.lookups_ok
                await asyncio.sleep(1.0)
                # while worker 1 is dead, worker 2 answers every new request
                window = [s for t, s, _ in load.log if died_at + 0.05 <= t <= died_at + 0.9]
                assert window and all(s == 200 for s in window), window
                assert load.lookups_ok > ok_at_death
                m = await srv.wait_for(r"worker 1 \(pid (\d+)\) serving", 15, mark)
                assert int(m.group(1)) != before[1]
                await asyncio.sleep(0.5)
            code, err = await srv.stop()
        assert code == 0, err.decode()[-2000:]
        acked = _check_acknowledged_updates_persisted(load, await _rows(pg_url))
        assert acked >= 20
        assert b"Traceback" not in err, err.decode()[-3000:]
    run(main(), timeout=90)


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_database_restart_fails_fast_then_reconnects_and_keeps_every_acknowledged_update(
        own_pg_server: PgServer, tmp_path: Path, how: str) -> None:
    """The database goes away (a clean stop, or SIGKILL of the postmaster) and comes back
    on the same port: meanwhile every request is answered 503 quickly with a clear error;
    afterwards the servers answer again without being restarted, and every update that was
    answered 200 is in the database."""
    url = own_pg_server.create_database("faults")

    async def main() -> None:
        await _register(url)
        async with servers(_center_workdir(tmp_path), url, 2, "--db-timeout", "2") as srv:
            load = Load(f"http://127.0.0.1:{srv.port}")
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
                    clients(load, session, 1000):
                await asyncio.sleep(1.0)
                assert load.lookups_ok > 0
                down_at = time.monotonic()
                if how == "stop":
                    await asyncio.to_thread(own_pg_server.stop)
                else:
                    await asyncio.to_thread(own_pg_server.kill)
                await asyncio.sleep(2.0)
                outage = [(t, s, ms) for t, s, ms in load.log if t >= down_at + 0.5]
                await asyncio.to_thread(own_pg_server.start)
                up_at = time.monotonic()
                # the servers reconnect by themselves: lookups succeed again within seconds
                deadline = up_at + 15
                while time.monotonic() < deadline:
                    recent = [s for t, s, _ in load.log if t >= time.monotonic() - 0.5]
                    if len(recent) >= 4 and all(s == 200 for s in recent):
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError("the servers did not recover within 15 s of the "
                                         f"database's return: {load.log[-12:]}")
                recovered_in = time.monotonic() - up_at
                await asyncio.sleep(0.5)
            code, err = await srv.stop()
        # during the outage: 503s, each within the database timeout (2 s) plus slack
        assert outage, "no request was made during the outage"
        assert {s for _, s, _ in outage} == {503}, {s for _, s, _ in outage}
        assert max(ms for *_, ms in outage) < 3000
        assert load.errors_503 and all("database unavailable" in e for e in load.errors_503)
        assert recovered_in < 15
        assert code == 0
        text = err.decode()
        # a clear error in the servers' log (not a traceback), without flooding it
        assert re.search(r"failed: PostgreSQL postgresql://p2psc@127\.0\.0\.1:\d+/faults: "
                         r".* failed: ", text), text[-3000:]
        assert "Traceback" not in text, text[text.find("Traceback") - 300:][:4000]
        acked = _check_acknowledged_updates_persisted(load, await _rows(url))
        assert acked >= 20
    run(main(), timeout=120)


def test_slow_database_gets_503_in_bounded_time_and_the_loop_never_stalls(
        pg_url: str) -> None:
    """Another session locks the peers table: lookups wait at most the database timeout and
    are answered 503; requests beyond the pool wait for a connection no longer than that;
    the event loop keeps running meanwhile; the pool never exceeds its size; after the lock
    goes, the same server answers again."""
    import asyncpg

    async def main() -> None:
        await _register(pg_url)
        backend = await PostgresBackend.connect(pg_url, pool_size=2, timeout=1.0)
        app = make_app(backend, _center())
        runner, port = await start_server(app, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        locker = await asyncpg.connect(pg_url, timeout=5)
        lag = [0.0]
        ticking = True

        async def ticker() -> None:
            while ticking:
                t = time.monotonic()
                await asyncio.sleep(0.01)
                lag[0] = max(lag[0], time.monotonic() - t - 0.01)

        tick = asyncio.create_task(ticker())
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                async def lookup() -> tuple[int, float, str]:
                    t0 = time.monotonic()
                    async with session.get(f"{base}/api/get_peer_info",
                                           params={"id": PEERS[0]}) as r:
                        return r.status, time.monotonic() - t0, await r.text()

                assert (await lookup())[0] == 200
                tr = locker.transaction()
                await tr.start()
                await locker.execute("LOCK TABLE peers IN ACCESS EXCLUSIVE MODE")
                lag[0] = 0.0
                many = asyncio.ensure_future(asyncio.gather(*[lookup() for _ in range(12)]))
                await asyncio.sleep(0.5)
                # the server's queries waiting on the lock: no more than its pool holds
                waiting = await locker.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'")
                answers = await asyncio.wait_for(many, 15)
                await tr.rollback()
                assert [s for s, _, _ in answers] == [503] * 12
                assert all("database unavailable" in text for *_, text in answers)
                # 2 connections held for 1 s each, the others waited 1 s for one: at most 2 s
                assert max(t for _, t, _ in answers) < 2.8, answers
                assert waiting == 2
                assert lag[0] < 0.25, f"event loop stalled {lag[0] * 1000:.0f} ms"
                after = await lookup()
                assert after[0] == 200, after
                assert app[STATE_KEY].backend is backend
        finally:
            ticking = False
            await tick
            await locker.close()
            await runner.cleanup()
            await backend.close()
    run(main(), timeout=60)
