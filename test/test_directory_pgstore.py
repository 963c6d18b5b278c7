"""The directory's PostgreSQL store (issue 13) against a real PostgreSQL server through asyncpg.

* the same semantics as the SQLite store, for both backends;
* the rules that PostgreSQL must enforce across pools and processes: a nonce is accepted
  once, and updates of one peer commit in the order of their signed timestamps;
* the schema (created once, refused when newer) and connection failures;
* the shared record cache of several server processes (real aiohttp servers);
* ``p2psc directory migrate`` and ``--db URL`` as real subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from conftest import rsa_key, run
from test_directory_server import running

from p2psc import keys
from p2psc.directory.backend import DirectoryBackend, SqliteBackend, open_backend
from p2psc.directory.client import update_address as client_update_address
from p2psc.directory.pgstore import SCHEMA_VERSION, PostgresBackend, safe_url  # asyncpg on use
from p2psc.directory.record import verify_record
from p2psc.directory.server import LOOKUP_PATH, STATE_KEY, UPDATE_PATH, make_app
from p2psc.directory.store import DirectoryStore, PeerEntry
from p2psc.p2pexcept import DirectoryError, DirectoryStoreError, ReplayError, UnknownEntryError

T = TypeVar("T")
WAIT = 10.0  # upper bound on any single wait
ROOT = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000  # signed update timestamps used below
FAR = 10**10  # a nonce expiry far in the future


@pytest.fixture(scope="module")
def pems() -> dict[str, str]:
    return {n: keys.public_key_pem(rsa_key(f"pg-{n}")).decode("ascii") for n in ("a", "b")}


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def p2psc_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "p2psc", "directory", *args],
                          capture_output=True, text=True, timeout=timeout, env=cli_env(),
                          check=False)


async def sql(url: str, query: str, *args: Any) -> list[Any]:
    """Run one query on a connection of its own; its rows."""
    import asyncpg  # the PostgreSQL tests skip (pg_server) where it is missing
    conn = await asyncio.wait_for(asyncpg.connect(url), WAIT)
    try:
        if not args and not query.lstrip().upper().startswith("SELECT"):
            await asyncio.wait_for(conn.execute(query), WAIT)  # any statements, no rows
            return []
        return list(await asyncio.wait_for(conn.fetch(query, *args), WAIT))
    finally:
        await asyncio.wait_for(conn.close(), WAIT)


# -- the same semantics on both backends ----------------------------------------------------

Opener = Callable[[], contextlib.AbstractAsyncContextManager[DirectoryBackend]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the backend under test: SQLite over a temporary file, or PostgreSQL on a fresh
    database."""
    db = str(tmp_path / "d.sqlite3") if request.param == "sqlite" \
        else str(request.getfixturevalue("pg_url"))

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[DirectoryBackend]:
        b = await asyncio.wait_for(open_backend(db), WAIT)
        assert isinstance(b, SqliteBackend if request.param == "sqlite" else PostgresBackend)
        try:
            yield b
        finally:
            await asyncio.wait_for(b.close(), WAIT)
    return opened


async def move(b: DirectoryBackend, peer: str, host: str, port: int, ts: int, nonce: str,
               expires: int = FAR) -> PeerEntry:
    """An accepted-or-refused address update signed at ``ts``."""
    return await b.update_address(peer, host, port, updated_at=ts, nonce=nonce,
                                  nonce_expires_at=expires, timestamp=ts)


def test_put_get_list_count_remove(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            assert await b.get("alice") is None and await b.list() == [] and await b.count() == 0
            bob = await b.put("bob", pems["b"], "localhost", 2, updated_at=10)
            alice = await b.put("alice", pems["a"], "127.0.0.1", 1, updated_at=11)
            assert alice == PeerEntry("alice", pems["a"], "127.0.0.1", 1, 11)
            assert await b.get("alice") == alice and await b.get("bob") == bob
            assert await b.list() == [alice, bob]
            assert await b.list(limit=1) == [alice]
            assert await b.count() == 2
            assert await b.lookup("alice") == (alice, None)
            assert await b.lookup("ghost") is None
            # replace: new key and address
            alice2 = await b.put("alice", pems["b"], "::1", 3, updated_at=12)
            assert await b.get("alice") == alice2 == PeerEntry("alice", pems["b"], "::1", 3, 12)
            assert await b.count() == 2
            assert await b.remove("alice") is True
            assert await b.remove("alice") is False
            assert await b.get("alice") is None and await b.list() == [bob]
            assert await b.count() == 1
        async with backend() as b:  # persisted
            assert await b.list() == [bob]
    run(go())


def test_remove_takes_nonces_and_cached_record(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            await b.put("bob", pems["b"], "h", 1, updated_at=5)
            entry = await move(b, "alice", "h2", 2, T0, "n1")
            await move(b, "bob", "h2", 2, T0, "n1")
            record = {**entry.fields(), "expires_at": T0 + 100, "nonce": None, "sig": "x"}
            await b.cache_record(entry, record)
            assert await b.lookup("alice") == (entry, record)
            assert await b.nonce_count() == 2
            assert await b.remove("alice") is True
            assert await b.nonce_count() == 1  # bob's stays
            assert await b.lookup("alice") is None
            # registered again: no cached record, and its old nonce may be used again
            again = await b.put("alice", pems["a"], "h", 1, updated_at=6)
            assert await b.lookup("alice") == (again, None)
            assert (await move(b, "alice", "h3", 3, T0 + 1, "n1")).host == "h3"
            assert await b.nonce_count() == 2
    run(go())


def test_put_keeps_last_update_timestamp(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            await move(b, "alice", "h2", 2, T0 + 10, "n1")
            replaced = await b.put("alice", pems["b"], "h9", 9, updated_at=T0 + 50)
            assert await b.get("alice") == replaced
            for ts in (T0 + 10, T0 + 9):  # signed before the replacement's last update
                with pytest.raises(ReplayError, match="not newer"):
                    await move(b, "alice", "h3", 3, ts, f"n{ts}")
            assert await b.get("alice") == replaced and await b.nonce_count() == 1
            moved = await move(b, "alice", "h3", 3, T0 + 11, "n2")
            assert moved == PeerEntry("alice", pems["b"], "h3", 3, T0 + 11)
    run(go())


def test_update_of_unknown_peer_writes_nothing(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            with pytest.raises(UnknownEntryError, match="ghost"):
                await move(b, "ghost", "h", 1, T0, "n1")
            assert await b.nonce_count() == 0 and await b.count() == 0
            await b.put("ghost", pems["a"], "h", 1, updated_at=5)  # the nonce was not kept
            assert (await move(b, "ghost", "h2", 2, T0, "n1")).host == "h2"
    run(go())


def test_replayed_nonce_writes_nothing(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            first = await move(b, "alice", "h2", 2, T0, "n1")
            with pytest.raises(ReplayError, match="nonce already used"):
                await move(b, "alice", "h3", 3, T0 + 1, "n1")
            assert await b.get("alice") == first and await b.nonce_count() == 1
            # T0 + 1 was not recorded as the last update
            assert (await move(b, "alice", "h4", 4, T0 + 1, "n2")).port == 4
            # the same nonce from another peer is another nonce
            await b.put("bob", pems["b"], "h", 1, updated_at=5)
            assert (await move(b, "bob", "h5", 5, T0, "n1")).port == 5
            assert await b.nonce_count() == 3
    run(go())


def test_update_not_newer_writes_nothing(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            first = await move(b, "alice", "h2", 2, T0, "n1")
            for ts in (T0, T0 - 1, 0):
                with pytest.raises(ReplayError, match="not newer") as ei:
                    await move(b, "alice", "h3", 3, ts, "n2")
                assert f"{ts} <= {T0}" in str(ei.value)
            assert await b.get("alice") == first
            assert await b.nonce_count() == 1  # n2 was not recorded
            assert (await move(b, "alice", "h3", 3, T0 + 1, "n2")).port == 3
    run(go())


def test_expired_nonce_may_be_reused(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            await move(b, "alice", "h", 2, T0, "old", expires=1)  # expired at once
            assert (await move(b, "alice", "h", 3, T0 + 1, "old")).port == 3
            assert await b.nonce_count() == 1
            with pytest.raises(ReplayError, match="nonce already used"):  # now live till FAR
                await move(b, "alice", "h", 4, T0 + 2, "old")
    run(go())


def test_purge_nonces_counts(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            for i, exp in enumerate((FAR, FAR + 10, FAR + 20)):
                await move(b, "alice", "h", 2 + i, T0 + i, f"n{i}", expires=exp)
            assert await b.purge_nonces(FAR) == 0  # expires_at == now: still live
            assert await b.purge_nonces(FAR + 1) == 1
            assert await b.nonce_count() == 2
            assert await b.purge_nonces(FAR + 21) == 2
            assert await b.purge_nonces(FAR + 21) == 0
            assert await b.nonce_count() == 0
    run(go())


@pytest.mark.parametrize("bad", [
    {"peer_id": "a/b"}, {"peer_id": ""}, {"pubkey_pem": "junk"}, {"host": "a b"},
    {"host": ""}, {"port": 0}, {"port": 65536}, {"port": True}, {"updated_at": -1},
])
def test_put_validates(backend: Opener, pems: dict[str, str], bad: dict[str, Any]) -> None:
    async def go() -> None:
        async with backend() as b:
            args: dict[str, Any] = {"peer_id": "alice", "pubkey_pem": pems["a"], "host": "h",
                                    "port": 1, "updated_at": 5, **bad}
            with pytest.raises(DirectoryError) as ei:
                await b.put(**args)
            assert not isinstance(ei.value, DirectoryStoreError)
            assert await b.count() == 0
    run(go())


def test_update_validates(backend: Opener, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with backend() as b:
            entry = await b.put("alice", pems["a"], "h", 1, updated_at=5)
            for host, port in (("bad host", 1), ("", 1), ("h", 0), ("h", 65536), ("h", True)):
                for peer in ("alice", "ghost"):
                    with pytest.raises(DirectoryError) as ei:
                        await move(b, peer, host, port, T0, "n1")
                    assert not isinstance(ei.value, (DirectoryStoreError, ReplayError,
                                                     UnknownEntryError)), ei.value
            assert await b.get("alice") == entry and await b.nonce_count() == 0
            assert (await move(b, "alice", "h2", 2, T0, "n1")).port == 2
    run(go())


# -- across pools and processes -------------------------------------------------------------

@contextlib.asynccontextmanager
async def pools(url: str, n: int = 2, size: int = 5) -> AsyncIterator[list[PostgresBackend]]:
    """``n`` backends on one database, each with its own pool (as separate servers have)."""
    opened: list[PostgresBackend] = []
    try:
        for _ in range(n):
            opened.append(await asyncio.wait_for(PostgresBackend.connect(url, pool_size=size),
                                                 WAIT))
        yield opened
    finally:
        for b in opened:
            await asyncio.wait_for(b.close(), WAIT)


async def attempt(b: PostgresBackend, ts: int, nonce: str | None = None) -> bool:
    """Update alice to ``h<ts>.test:<port from ts>`` signed at ``ts``: True if accepted,
    False if refused as a replay (any other error fails the test)."""
    try:
        await move(b, "alice", f"h{ts}.test", 1024 + ts % 60000, ts, nonce or f"n{ts}")
    except ReplayError:
        return False
    return True


def test_concurrent_same_nonce_accepted_once(pg_url: str, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with pools(pg_url) as (b1, b2):
            await b1.put("alice", pems["a"], "h", 1, updated_at=5)
            for i in range(20):  # the same nonce through both pools at once, newer each time
                ts = T0 + 10 * i
                results = await asyncio.gather(move(b1, "alice", "a.test", 1000 + i, ts + 1,
                                                    f"same{i}"),
                                               move(b2, "alice", "b.test", 2000 + i, ts + 2,
                                                    f"same{i}"),
                                               return_exceptions=True)
                won = [r for r in results if isinstance(r, PeerEntry)]
                lost = [r for r in results if not isinstance(r, PeerEntry)]
                assert len(won) == 1 and len(lost) == 1, results
                assert isinstance(lost[0], ReplayError), lost
                assert "nonce already used" in str(lost[0])
                assert await b2.get("alice") == won[0]
            assert await b1.nonce_count() == 20
    run(go())


def test_stale_update_never_burns_a_fresh_ones_nonce(pg_url: str, pems: dict[str, str]) -> None:
    """A stale (not newer) and a fresh update with the same nonce at once: the stale one's
    nonce insert is rolled back, so the fresh one is always accepted whichever goes first."""
    async def go() -> None:
        async with pools(pg_url) as (b1, b2):
            await b1.put("alice", pems["a"], "h", 1, updated_at=5)
            for i in range(15):
                top = T0 + 100 * (i + 1)
                await move(b1, "alice", "h", 1, top, f"base{i}")
                stale, fresh = await asyncio.gather(
                    move(b1 if i % 2 else b2, "alice", "stale.test", 2, top - 50, f"same{i}"),
                    move(b2 if i % 2 else b1, "alice", "fresh.test", 3, top + 50, f"same{i}"),
                    return_exceptions=True)
                assert isinstance(stale, ReplayError), stale
                assert fresh == PeerEntry("alice", pems["a"], "fresh.test", 3, top + 50)
            assert await b2.nonce_count() == 30
    run(go())


def _log_updates(url: str) -> Awaitable[list[Any]]:
    """Log every committed change of peers.last_update_ts, in commit order: the row lock
    makes a concurrent update of the row wait for the previous one's commit."""
    return sql(url, """
        CREATE TABLE update_log (seq BIGSERIAL PRIMARY KEY, ts BIGINT NOT NULL);
        CREATE FUNCTION log_update() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO update_log (ts) VALUES (NEW.last_update_ts); RETURN NEW; END $$;
        CREATE TRIGGER peers_log AFTER UPDATE ON peers FOR EACH ROW EXECUTE FUNCTION log_update();
    """)


async def check_update_invariants(url: str, b: PostgresBackend, outcomes: dict[int, bool]) -> None:
    """After concurrent updates (timestamp -> accepted?): the newest one was accepted and is
    the row's address; accepted ones committed in increasing timestamp order; every accepted
    one left its nonce, no refused one did."""
    accepted = sorted(ts for ts, ok in outcomes.items() if ok)
    top = max(outcomes)
    assert outcomes[top] is True  # nothing newer can exist: never refused
    assert accepted[-1] == top
    row = (await sql(url, "SELECT host, port, updated_at, last_update_ts FROM peers "
                          "WHERE peer_id = 'alice'"))[0]
    assert tuple(row) == (f"h{top}.test", 1024 + top % 60000, top, top)
    log = [r["ts"] for r in await sql(url, "SELECT ts FROM update_log ORDER BY seq")]
    assert log == accepted  # strictly increasing in commit order, one per accepted update
    nonces = {r["nonce"] for r in await sql(url, "SELECT nonce FROM seen_nonces")}
    assert nonces == {f"n{ts}" for ts in accepted}
    assert await b.nonce_count() == len(accepted)


def waves(seed: int, n: int = 8, size: int = 16) -> list[list[int]]:
    """``n`` batches of ``size`` distinct update timestamps each, shuffled within a batch and
    rising from batch to batch: sent one batch at a time, many of them race and many win."""
    rnd = random.Random(seed)
    batches = [[T0 + 1 + w * size + j for j in range(size)] for w in range(n)]
    for batch in batches:
        rnd.shuffle(batch)
    return batches


async def send_waves(batches: list[list[int]], backends: list[PostgresBackend]) -> dict[int, bool]:
    """Each batch concurrently (asyncio.gather), spread over ``backends``; the outcomes."""
    outcomes: dict[int, bool] = {}
    for batch in batches:
        results = await asyncio.gather(*(attempt(backends[i % len(backends)], ts)
                                         for i, ts in enumerate(batch)))
        outcomes.update(zip(batch, results, strict=True))
    return outcomes


def test_concurrent_updates_apply_in_signed_order(pg_url: str, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with pools(pg_url) as (b1, b2):
            await b1.put("alice", pems["a"], "h", 1, updated_at=5)
            await _log_updates(pg_url)
            outcomes = await send_waves(waves(13), [b1, b2])
            assert len(outcomes) == 8 * 16
            assert 8 <= sum(outcomes.values()) < len(outcomes)  # at least each batch's newest
            await check_update_invariants(pg_url, b1, outcomes)
    run(go())


_OTHER_PROCESS = """
import asyncio, json, sys
from p2psc.directory.pgstore import PostgresBackend
from p2psc.p2pexcept import ReplayError

async def main(url, batches):
    b = await PostgresBackend.connect(url, pool_size=5)
    try:
        print("ready", flush=True)
        await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), 20)
        async def one(ts):
            try:
                await b.update_address("alice", f"h{ts}.test", 1024 + ts % 60000, updated_at=ts,
                                       nonce=f"n{ts}", nonce_expires_at=10**10, timestamp=ts)
                return True
            except ReplayError:
                return False
        results = []
        for batch in batches:
            results += await asyncio.gather(*(one(ts) for ts in batch))
        print(json.dumps(results), flush=True)
    finally:
        await b.close()

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def test_updates_from_two_processes(pg_url: str, pems: dict[str, str]) -> None:
    async def go() -> None:
        async with pools(pg_url, n=1) as (b,):
            await b.put("alice", pems["a"], "h", 1, updated_at=5)
            await _log_updates(pg_url)
            batches = waves(7, n=10, size=20)  # each batch: half here, half in the other
            mine, theirs = [w[::2] for w in batches], [w[1::2] for w in batches]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _OTHER_PROCESS, pg_url, json.dumps(theirs),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=cli_env())
            assert proc.stdin is not None and proc.stdout is not None
            try:
                ready = await asyncio.wait_for(proc.stdout.readline(), WAIT)
                assert ready == b"ready\n", ready
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
                outcomes = await send_waves(mine, [b])
                out, err = await asyncio.wait_for(proc.communicate(), WAIT)
                assert proc.returncode == 0, err.decode()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await asyncio.wait_for(proc.wait(), WAIT)
            theirs_flat = [ts for w in theirs for ts in w]
            their_outcomes = dict(zip(theirs_flat, json.loads(out), strict=True))
            outcomes.update(their_outcomes)
            assert len(outcomes) == 200 and 1 <= sum(outcomes.values()) < len(outcomes)
            await check_update_invariants(pg_url, b, outcomes)
    run(go())


# -- schema and connecting ------------------------------------------------------------------

def test_fresh_database_gets_the_schema_once(pg_url: str) -> None:
    async def go() -> None:
        b = await asyncio.wait_for(PostgresBackend.connect(pg_url), WAIT)
        await b.close()
        assert [tuple(r) for r in await sql(pg_url, "SELECT only_row, version FROM p2psc_schema")] \
            == [(True, SCHEMA_VERSION)]
        tables = {r[0] for r in await sql(
            pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert tables == {"p2psc_schema", "peers", "seen_nonces", "record_cache"}
        b = await asyncio.wait_for(PostgresBackend.connect(pg_url), WAIT)  # again: nothing to do
        await b.close()
        assert len(await sql(pg_url, "SELECT * FROM p2psc_schema")) == 1
    run(go())


def test_concurrent_first_connects_migrate_once(pg_url: str) -> None:
    async def go() -> None:
        opened = await asyncio.gather(*(asyncio.wait_for(PostgresBackend.connect(pg_url), WAIT)
                                        for _ in range(4)), return_exceptions=True)
        for b in opened:
            if isinstance(b, PostgresBackend):
                await b.close()
        assert all(isinstance(b, PostgresBackend) for b in opened), opened
        assert [r["version"] for r in await sql(pg_url, "SELECT version FROM p2psc_schema")] \
            == [SCHEMA_VERSION]
    run(go())


def test_newer_schema_is_refused(pg_url: str, pems: dict[str, str]) -> None:
    async def go() -> None:
        b = await asyncio.wait_for(PostgresBackend.connect(pg_url), WAIT)
        await b.put("alice", pems["a"], "h", 1, updated_at=5)
        await b.close()
        await sql(pg_url, "UPDATE p2psc_schema SET version = 99")
        with pytest.raises(DirectoryStoreError, match="newer") as ei:
            await asyncio.wait_for(PostgresBackend.connect(pg_url), WAIT)
        assert "v99" in str(ei.value)
        # untouched
        assert [r["version"] for r in await sql(pg_url, "SELECT version FROM p2psc_schema")] == [99]
        assert len(await sql(pg_url, "SELECT * FROM peers")) == 1
    run(go())


def _dead_port() -> tuple[socket.socket, int]:
    """A bound, not listening socket: connecting to its port is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def test_unreachable_database_fails_fast_without_password() -> None:
    sock, port = _dead_port()
    try:
        async def go() -> None:
            url = f"postgresql://p2psc:SECRETPW@127.0.0.1:{port}/x"
            start = time.monotonic()
            with pytest.raises(DirectoryStoreError) as ei:
                await asyncio.wait_for(PostgresBackend.connect(url, connect_timeout=2.0), WAIT)
            assert time.monotonic() - start < 2.0 + 1.0
            assert "SECRETPW" not in str(ei.value)
            assert f"postgresql://p2psc@127.0.0.1:{port}/x" in str(ei.value)
            assert "cannot connect" in str(ei.value)
            with pytest.raises(DirectoryStoreError) as ei2:  # through open_backend too
                await asyncio.wait_for(open_backend(url), WAIT)
            assert "SECRETPW" not in str(ei2.value)
        run(go())
    finally:
        sock.close()


def test_silent_server_times_out() -> None:
    """A port that accepts connections but never answers: refused after connect_timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        async def go() -> None:
            start = time.monotonic()
            with pytest.raises(DirectoryStoreError, match="timed out") as ei:
                await asyncio.wait_for(PostgresBackend.connect(
                    f"postgresql://p2psc:SECRETPW@127.0.0.1:{port}/x", connect_timeout=1.0), WAIT)
            assert 1.0 - 0.1 <= time.monotonic() - start < 1.0 + 1.0
            assert "SECRETPW" not in str(ei.value)
        run(go())


def test_missing_database_is_a_store_error(pg_url: str) -> None:
    url = pg_url.rsplit("/", 1)[0] + "/no_such_db_here"
    url = url.replace("postgresql://p2psc@", "postgresql://p2psc:SECRETPW@")
    assert "SECRETPW" in url

    async def go() -> None:
        with pytest.raises(DirectoryStoreError, match="no_such_db_here") as ei:
            await asyncio.wait_for(PostgresBackend.connect(url), WAIT)
        assert "SECRETPW" not in str(ei.value)
    run(go())


# -- the record cache shared by server processes --------------------------------------------

async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, \
            s.get(url, timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
        return r.status, await r.json()


def test_record_cache_shared_by_servers(pg_url: str) -> None:
    center, alice = rsa_key("center"), rsa_key("pg-alice")

    async def go() -> None:
        async with pools(pg_url) as (b1, b2):
            await b1.put("alice", keys.public_key_pem(alice).decode("ascii"), "127.0.0.1", 7001,
                         updated_at=T0)
            app1, app2 = make_app(b1, center), make_app(b2, center)
            async with running(app1) as base1, running(app2) as base2:
                s1, s2 = app1[STATE_KEY], app2[STATE_KEY]
                status, rec = await get_json(base1 + LOOKUP_PATH + "?id=alice")
                assert status == 200 and s1.signatures == 1
                assert rec["nonce"] is None and (rec["host"], rec["port"]) == ("127.0.0.1", 7001)
                verify_record(center.public_key(), rec, "alice", nonce=None)
                assert await get_json(base1 + LOOKUP_PATH + "?id=alice") == (200, rec)
                assert s1.signatures == 1
                # a second worker on the same database: the cached record, no signature
                assert await get_json(base2 + LOOKUP_PATH + "?id=alice") == (200, rec)
                assert await get_json(base2 + LOOKUP_PATH + ".dspy?id=alice") == (200, rec)
                assert s2.signatures == 0 and s2.lookups == 2
                # a lookup with a nonce is always signed for it
                status, nonced = await get_json(base2 + LOOKUP_PATH + "?id=alice&nonce=" + "ab" * 16)
                assert status == 200 and nonced["nonce"] == "ab" * 16 and s2.signatures == 1
                # the peer moves (through the second worker): the cached record is stale
                await asyncio.wait_for(client_update_address(
                    base2 + UPDATE_PATH, "alice", alice, "127.0.0.2", 7002,
                    center_public_key=center.public_key()), WAIT)
                assert s2.signatures == 2
                status, new = await get_json(base1 + LOOKUP_PATH + "?id=alice")
                assert status == 200 and s1.signatures == 2
                assert (new["host"], new["port"]) == ("127.0.0.2", 7002) and new != rec
                assert new["updated_at"] >= rec["updated_at"]
                checked = verify_record(center.public_key(), new, "alice", nonce=None)
                assert (checked.host, checked.port) == ("127.0.0.2", 7002)
                # and the new one is shared again
                assert await get_json(base2 + LOOKUP_PATH + "?id=alice") == (200, new)
                assert s2.signatures == 2
                cached = await sql(pg_url, "SELECT record FROM record_cache")
                assert [json.loads(r["record"]) for r in cached] == [new]
                async with aiohttp.ClientSession() as session, session.get(
                        base2 + "/", timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
                    page = await r.text()
                assert r.status == 200 and "1 registered peer<" in page
                assert "<td>alice</td>" in page and "127.0.0.2:7002" in page
                # removed: no cached record survives, the lookup is 404
                assert await b2.remove("alice")
                assert await sql(pg_url, "SELECT record FROM record_cache") == []
                status, body = await get_json(base1 + LOOKUP_PATH + "?id=alice")
                assert status == 404 and "alice" in body["error"]
    run(go())


# -- migrate and --db URL on the command line -----------------------------------------------

def test_migrate_sqlite_to_postgres(pg_url: str, tmp_path: Path, pems: dict[str, str]) -> None:
    src = tmp_path / "directory.sqlite3"
    now = int(time.time())
    with DirectoryStore(src) as s:
        s.put("alice", pems["a"], "127.0.0.1", 7001, updated_at=T0)
        s.put("bob", pems["b"], "localhost", 7002, updated_at=T0 + 1)
        s.put("carol", pems["a"], "::1", 7003, updated_at=T0 + 2)
        s.update_address("bob", "10.0.0.2", 7012, updated_at=now, nonce="dead-nonce",
                         nonce_expires_at=now - 100, timestamp=now - 200)
        s.update_address("alice", "10.0.0.1", 7011, updated_at=now, nonce="live-nonce",
                         nonce_expires_at=now + 3600, timestamp=now - 5)
        expected = s.list()
        last = {e.peer_id: s.last_update_ts(e.peer_id) for e in expected}
    assert last == {"alice": now - 5, "bob": now - 200, "carol": 0}

    out = p2psc_cli("migrate", "--from", str(src), "--to", pg_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("migrated 3 peer(s) and 1 unexpired update nonce(s) from ")
    assert out.stderr == ""

    async def check() -> None:
        async with pools(pg_url, n=1) as (b,):
            assert await b.list() == expected
            rows = await sql(pg_url, "SELECT peer_id, last_update_ts FROM peers")
            assert {r["peer_id"]: r["last_update_ts"] for r in rows} == last
            nonces = [tuple(r) for r in await sql(pg_url, "SELECT * FROM seen_nonces")]
            assert nonces == [("alice", "live-nonce", now + 3600)]
            with pytest.raises(ReplayError, match="nonce already used"):
                await move(b, "alice", "h", 1, now + 1, "live-nonce")
            with pytest.raises(ReplayError, match="not newer"):
                await move(b, "alice", "h", 1, now - 5, "fresh")
            assert (await move(b, "alice", "h", 1, now - 4, "fresh")).port == 1
            assert (await move(b, "bob", "h", 2, now - 199, "dead-nonce")).port == 2
    run(check())

    again = p2psc_cli("migrate", "--from", str(src), "--to", pg_url)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "already holds 3 peer(s)" in again.stderr
    missing = p2psc_cli("migrate", "--from", str(tmp_path / "missing.sqlite3"), "--to", pg_url)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "missing.sqlite3" in missing.stderr
    assert not (tmp_path / "missing.sqlite3").exists()
    to_file = p2psc_cli("migrate", "--from", str(src), "--to", str(tmp_path / "other.sqlite3"))
    assert to_file.returncode == 2 and "postgresql://" in to_file.stderr
    assert not (tmp_path / "other.sqlite3").exists()


def test_cli_with_postgres_url(pg_url: str, tmp_path: Path, pems: dict[str, str]) -> None:
    pub = tmp_path / "alice.pub"
    pub.write_text(pems["a"])
    add = p2psc_cli("add", "alice", "--pubkey", str(pub), "--host", "127.0.0.1", "--port", "7001",
                    "--db", pg_url, "--db-pool", "2", "--db-timeout", "5")
    assert add.returncode == 0, add.stderr
    assert add.stdout.startswith("added alice at 127.0.0.1:7001 ")
    listed = p2psc_cli("list", "--db", pg_url)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[:2] for line in listed.stdout.splitlines()] == \
        [["alice", "127.0.0.1:7001"]]
    assert [r["peer_id"] for r in run(sql(pg_url, "SELECT peer_id FROM peers"))] == ["alice"]
    removed = p2psc_cli("remove", "alice", "--db", pg_url)
    assert removed.returncode == 0 and removed.stdout == "removed alice\n", removed.stderr
    again = p2psc_cli("remove", "alice", "--db", pg_url)
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "not registered" in again.stderr
    assert p2psc_cli("list", "--db", pg_url).stdout == ""


def test_cli_usage_errors(tmp_path: Path) -> None:
    out = p2psc_cli("serve", "--workdir", str(tmp_path), "--db", str(tmp_path / "d.sqlite3"),
                    "--db-pool", "3")
    assert out.returncode == 2 and "--db-pool" in out.stderr, out.stderr
    assert not (tmp_path / "d.sqlite3").exists()
    out = p2psc_cli("serve", "--workdir", str(tmp_path), "--workers", "2", "--relay-workdir",
                    str(tmp_path / "x"))
    assert out.returncode == 2 and "--workers 1" in out.stderr, out.stderr


def test_cli_unreachable_database() -> None:
    sock, port = _dead_port()
    try:
        out = p2psc_cli("list", "--db", f"postgresql://p2psc:SECRETPW@127.0.0.1:{port}/x")
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("p2psc directory: ") and "SECRETPW" not in out.stderr
    finally:
        sock.close()



# -- the database goes away and comes back --------------------------------------------------

def test_server_answers_503_while_database_is_down(own_pg_server: Any, pems: dict[str, str]) -> None:
    """503 + Retry-After at once while PostgreSQL is down, the same record once it is back
    (the pool reconnects by itself); and the pool's idle connections are really expired after
    a lost connection (Pool.expire_connections is a coroutine: it was never awaited)."""
    url = own_pg_server.create_database("d")
    center = rsa_key("center")

    async def go() -> None:
        b = await asyncio.wait_for(PostgresBackend.connect(url, timeout=2.0, connect_timeout=2.0),
                                   WAIT)
        try:
            await b.put("alice", pems["a"], "127.0.0.1", 7001, updated_at=T0)
            app = make_app(b, center)
            async with running(app) as base, aiohttp.ClientSession() as s:
                async def lookup() -> tuple[int, Any, str | None]:
                    async with s.get(base + LOOKUP_PATH + "?id=alice",
                                     timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
                        return r.status, await r.json(), r.headers.get("Retry-After")

                status, rec, _ = await lookup()
                assert status == 200 and rec["port"] == 7001
                await asyncio.wait_for(asyncio.to_thread(own_pg_server.stop), 30)
                for _ in range(3):  # the pooled connection is gone, then no new one opens
                    start = time.monotonic()
                    status, body, retry = await lookup()
                    assert (status, retry) == (503, "1"), (status, body)
                    assert body == {"error": "directory database unavailable, try again shortly"}
                    assert time.monotonic() - start < 2.0 + 2.0 + 1.0
                await asyncio.wait_for(asyncio.to_thread(own_pg_server.start), 30)
                status, again, _ = await lookup()  # reconnected by itself
                assert status == 200 and again == rec
        finally:
            await asyncio.wait_for(b.close(), WAIT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(go(), timeout=90)
        gc.collect()
    never_awaited = [str(w.message) for w in caught if "never awaited" in str(w.message)]
    assert never_awaited == []


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://p2psc:SECRETPW@db.example:5433/dir", "postgresql://p2psc@db.example:5433/dir"),
    ("postgres://p2psc:SECRETPW@127.0.0.1/dir?password=SECRETPW", "postgres://p2psc@127.0.0.1/dir"),
    ("postgresql://p2psc:SECRETPW@[::1]:5433/dir", "postgresql://p2psc@[::1]:5433/dir"),
    ("postgresql://[fe80::1]/dir", "postgresql://[fe80::1]/dir"),
    ("postgresql://p2psc:SECRETPW@h:notaport/dir", "postgresql://(unparsable URL)"),
])
def test_safe_url(url: str, shown: str) -> None:
    """What messages and logs show of a URL: never its password, an IPv6 host in brackets
    (else its port cannot be told from the address)."""
    assert safe_url(url) == shown


def test_migrate_refuses_an_sqlite_file_that_is_not_a_directory_and_leaves_it_alone(
        pg_url: str, tmp_path: Path) -> None:
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (body TEXT)")
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"not a database at all")
    proc = p2psc_cli("migrate", "--from", str(other), "--to", pg_url)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"p2psc directory: {other}: not a p2psc directory database "
                                   "(no peers and seen_nonces tables)")
    with sqlite3.connect(other) as db:  # nothing was created in it
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["notes"]
    proc = p2psc_cli("migrate", "--from", str(garbage), "--to", pg_url)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"p2psc directory: {garbage}: not a readable SQLite database")
    assert garbage.read_bytes() == b"not a database at all"


def test_a_read_only_database_serves_lookups_and_answers_updates_503(pg_url: str) -> None:
    """A database at this schema version that refuses writes (a streaming replica; here a
    database with default_transaction_read_only, which refuses them the same way): the server
    opens it without writing, answers lookups, and answers updates 503 with nothing written."""
    center, alice = rsa_key("center"), rsa_key("pg-alice")
    dbname = pg_url.rsplit("/", 1)[1]

    async def go() -> None:
        writer = await PostgresBackend.connect(pg_url)
        try:
            await writer.put("alice", keys.public_key_pem(alice).decode("ascii"), "127.0.0.1",
                             7001, updated_at=T0)
        finally:
            await writer.close()
        await sql(pg_url, f"ALTER DATABASE {dbname} SET default_transaction_read_only = on")
        reader = await PostgresBackend.connect(pg_url, timeout=2.0)
        try:
            app = make_app(reader, center)
            async with running(app) as base:
                status, rec = await get_json(base + LOOKUP_PATH + "?id=alice&nonce=" + "cd" * 16)
                assert status == 200
                checked = verify_record(center.public_key(), rec, "alice", nonce="cd" * 16)
                assert (checked.host, checked.port) == ("127.0.0.1", 7001)
                # nonce-less: signed (the cache cannot be written), still answered
                status, rec = await get_json(base + LOOKUP_PATH + "?id=alice")
                assert status == 200 and rec["nonce"] is None
                with pytest.raises(DirectoryError, match="HTTP 503"):
                    await asyncio.wait_for(client_update_address(
                        base + UPDATE_PATH, "alice", alice, "127.0.0.2", 7002,
                        center_public_key=center.public_key()), WAIT)
        finally:
            await reader.close()
        rows = await sql(pg_url, "SELECT host, port FROM peers")
        assert [(r["host"], r["port"]) for r in rows] == [("127.0.0.1", 7001)]
        assert await sql(pg_url, "SELECT nonce FROM seen_nonces") == []
        assert await sql(pg_url, "SELECT record FROM record_cache") == []
    run(go())
