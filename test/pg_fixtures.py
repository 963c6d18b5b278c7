"""PostgreSQL fixtures (test/pgserver.py starts a real server; the tests that use these skip,
with one line saying why, where PostgreSQL or asyncpg is missing):

- ``pg_server``: one server for the session, stopped at its end;
- ``pg_url``: a fresh empty database on it per test (dropped after);
- ``own_pg_server``: a server of the test's own, to restart or kill."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator

import pytest
from pgserver import PgServer, cleanup_stale, new_root, postgres_unavailable


def _server() -> Iterator[PgServer]:
    reason = postgres_unavailable()
    if reason is not None:
        pytest.skip(reason)
    root = new_root()  # under the system temp dir: the server's user must reach it when root
    server = PgServer(root)
    try:
        yield server.start()
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (after killing any a crashed
    earlier run left)."""
    if postgres_unavailable() is None:
        cleanup_stale()
    yield from _server()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The url of a fresh empty database on ``pg_server``, dropped after the test."""
    name = "t_" + secrets.token_hex(8)
    yield pg_server.create_database(name)
    try:
        pg_server.drop_database(name)
    except Exception:  # noqa: BLE001 - a leftover database in a throwaway server is harmless
        pass


@pytest.fixture
def own_pg_server() -> Iterator[PgServer]:
    """A separate, started PostgreSQL server for a test that stops, restarts or kills it."""
    yield from _server()
