"""The PostgreSQL test server (test/pgserver.py) and its fixtures, against a real server."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import run
from pgserver import PgServer, cleanup_stale, new_root, postgres_binaries, postgres_unavailable

asyncpg = pytest.importorskip("asyncpg")


async def fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close(timeout=5)


async def write_row(url: str, value: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kv (v text)")
        await conn.execute("INSERT INTO kv VALUES ($1)", value)
    finally:
        await conn.close(timeout=5)


def test_availability_is_one_line() -> None:
    reason = postgres_unavailable()
    assert reason is None or "\n" not in reason
    if reason is None:
        assert postgres_binaries() is not None


def test_round_trip(pg_url: str) -> None:
    assert pg_url.startswith("postgresql://p2psc@127.0.0.1:")
    assert run(fetchval(pg_url, "SELECT 'héllo ' || 41 + 1"), timeout=20) == "héllo 42"
    # a fresh, empty database
    assert run(fetchval(pg_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"),
               timeout=20) == 0


def test_databases_are_separate(pg_server: PgServer, pg_url: str) -> None:
    other = pg_server.create_database("t_other_" + pg_url.rsplit("_", 1)[-1])
    try:
        run(write_row(pg_url, "x"), timeout=20)
        assert run(fetchval(other, "SELECT to_regclass('kv') IS NULL"), timeout=20) is True
    finally:
        pg_server.drop_database(other.rsplit("/", 1)[-1])


def test_url_and_listen_address(pg_server: PgServer) -> None:
    assert pg_server.url("x") == f"postgresql://p2psc@127.0.0.1:{pg_server.port}/x"
    assert run(fetchval(pg_server.url(), "SHOW listen_addresses"), timeout=20) == "127.0.0.1"
    with pytest.raises(ValueError):
        pg_server.create_database('x"; DROP DATABASE postgres; --')


def test_committed_data_survives_restart(own_pg_server: PgServer) -> None:
    url = own_pg_server.create_database("keep")
    run(write_row(url, "before restart"), timeout=20)
    port = own_pg_server.port
    own_pg_server.restart()
    assert own_pg_server.port == port and own_pg_server.running
    assert run(fetchval(url, "SELECT v FROM kv"), timeout=20) == "before restart"


def test_stopped_server_refuses_fast(own_pg_server: PgServer) -> None:
    url = own_pg_server.url()
    own_pg_server.stop()
    assert not own_pg_server.running
    own_pg_server.stop()  # a second stop is a no-op
    t0 = time.monotonic()
    with pytest.raises(OSError):  # ConnectionRefusedError is one
        run(fetchval(url, "SELECT 1"), timeout=20)
    assert time.monotonic() - t0 < 5


def test_kill_then_start_recovers(own_pg_server: PgServer) -> None:
    url = own_pg_server.url()
    run(write_row(url, "before crash"), timeout=20)

    async def killed_under_a_connection() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            own_pg_server.kill()  # the backend serving conn goes too
            assert not own_pg_server.running
            with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
                await asyncio.wait_for(conn.fetchval("SELECT 1"), 10)
        finally:
            conn.terminate()

    run(killed_under_a_connection(), timeout=30)
    own_pg_server.start()
    assert own_pg_server.running
    assert run(fetchval(url, "SELECT v FROM kv"), timeout=20) == "before crash"


def test_context_manager_and_stale_cleanup() -> None:
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    # a base of its own, so cleanup_stale sees only this test's server (and, when we are
    # root, in the temp dir, not under pytest's root-only tmp_path)
    base = Path(tempfile.mkdtemp(prefix="p2psc-pgbase-"))
    base.chmod(0o755)
    try:
        root = new_root(base)
        (root / "owner.pid").write_text("999999999\n")  # an owner that is not alive
        with PgServer(root) as server:
            assert server.running
            assert cleanup_stale(base) == 1  # a postmaster whose owner died: killed, removed
            assert not server.running
            assert not root.exists()
        assert cleanup_stale(base) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
