"""The directory's PostgreSQL store: one database shared by any number of directory server
processes, on one machine or many (``p2psc directory serve --db postgresql://...``).

Driver: asyncpg. It speaks PostgreSQL's binary protocol from asyncio directly (no libpq, no
thread per query), prepares and caches each statement, and has its own connection pool; it is
the fastest asyncio driver for short queries like these (one round trip each). psycopg 3's
async mode would also do; its pool is a separate package and its extra speed needs libpq.

Every rule is enforced by the database, so it holds across processes and machines:

* a nonce is accepted once: ``seen_nonces``' primary key ``(peer_id, nonce)``; an expired
  one may be reused (``ON CONFLICT ... DO UPDATE ... WHERE expires_at < now``);
* updates of one peer apply in the order they were signed: the ``UPDATE`` only matches while
  ``last_update_ts < timestamp``, and the row lock makes a concurrent update wait and then
  re-check that condition against the committed row (READ COMMITTED);
* the nonce, the ordering check and the new address commit together or not at all;
* removing a peer removes its nonces and cached record (``ON DELETE CASCADE``);
* the schema version lives in ``p2psc_schema``; :data:`MIGRATIONS` bring a database up to
  date under an advisory lock, so several servers starting at once migrate it once.

Failures are bounded in time: connecting (``connect_timeout``), waiting for a pooled
connection and each query (``timeout``) raise :class:`DirectoryStoreError`, which the server
answers 503 at once. A connection broken by a database restart is dropped and the pool opens
new ones on demand, so the servers reconnect by themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..p2pexcept import DirectoryError, DirectoryStoreError, ReplayError, UnknownEntryError
from .record import check_host, check_peer_id, check_port, check_pubkey_pem, check_timestamp
from .store import PeerEntry

log = logging.getLogger("p2psc.directory.pgstore")

__all__ = ["DEFAULT_POOL_SIZE", "DEFAULT_TIMEOUT", "MIGRATIONS", "SCHEMA_VERSION",
           "PostgresBackend", "safe_url"]

#: Connections per server process (asyncpg pool ``max_size``).
DEFAULT_POOL_SIZE = 10
#: Seconds allowed to get a pooled connection, and again for each query.
DEFAULT_TIMEOUT = 3.0
#: Seconds allowed to open a new connection.
DEFAULT_CONNECT_TIMEOUT = 3.0
#: Rows a second assumed when bounding a migration's batch inserts (about 45 000 measured).
_BATCH_ROWS_PER_SECOND = 5000
_LOCK_ID = 0x7032707363  # pg_advisory_xact_lock key of schema migrations ("p2psc")

#: The schema, one list of statements per version; version N's statements bring N-1 to N.
MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """CREATE TABLE peers (
            peer_id        TEXT PRIMARY KEY,
            pubkey         TEXT NOT NULL,
            host           TEXT NOT NULL,
            port           INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
            updated_at     BIGINT NOT NULL,
            last_update_ts BIGINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE seen_nonces (
            peer_id    TEXT NOT NULL REFERENCES peers ON DELETE CASCADE,
            nonce      TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            PRIMARY KEY (peer_id, nonce)
        )""",
        "CREATE INDEX seen_nonces_expiry ON seen_nonces (expires_at)",
        # one nonce-less signed record per peer, shared by every server process; a row is
        # used only while it matches the peer's current fields and has time left
        """CREATE TABLE record_cache (
            peer_id TEXT PRIMARY KEY REFERENCES peers ON DELETE CASCADE,
            record  TEXT NOT NULL
        )""",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)

_PEER_COLUMNS = "peer_id, pubkey, host, port, updated_at"

T = TypeVar("T")
#: What asyncpg raises for a URL it cannot parse (its message may quote the URL).
_BAD_URL = (ValueError, TypeError, OverflowError)


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        if ":" in host:  # IPv6: brackets, as in the URL, so that the port stays apart
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://(unparsable URL)"
    if "@" in url and "@" not in parts.netloc:
        # an unencoded '/', '?' or '#' in the password ends the host part early: what urlsplit
        # calls the host, port or path would then show the password
        return "postgresql://(unparsable URL)"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise DirectoryError("PostgreSQL needs asyncpg: pip install 'p2psc[postgres]'") from None
    return asyncpg


def _reason(exc: BaseException) -> str:
    """One line saying what went wrong with the database (no query text, no password)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:200]


async def _migrate(conn: Any, where: str) -> None:
    """Create or upgrade the schema, once, under an advisory lock held for the transaction.
    A database already at this version is only read, so a read-only one (a replica) opens."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        version = None
        if await conn.fetchval("SELECT to_regclass('p2psc_schema') IS NOT NULL"):
            version = await conn.fetchval("SELECT version FROM p2psc_schema")
        if version == SCHEMA_VERSION:
            return
        if version is None:
            await conn.execute("CREATE TABLE IF NOT EXISTS p2psc_schema (only_row BOOLEAN "
                               "PRIMARY KEY DEFAULT TRUE CHECK (only_row), version INTEGER "
                               "NOT NULL)")
            version = 0
            await conn.execute("INSERT INTO p2psc_schema (version) VALUES (0)")
        if version > SCHEMA_VERSION:
            raise DirectoryStoreError(f"{where}: database schema v{version} is newer than this "
                                      f"p2psc (v{SCHEMA_VERSION}); upgrade p2psc")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS[v]:
                await conn.execute(stmt)
            await conn.execute("UPDATE p2psc_schema SET version = $1", v)
            log.info("directory: %s: database schema migrated to v%d", where, v)


def _close(conn: Any) -> None:
    """Close a pooled connection at once, unless the pool already took it back (asyncpg does
    when the server closed it)."""
    try:
        if not conn.is_closed():
            conn.terminate()
    except Exception as exc:  # noqa: BLE001 - already released or closed: nothing to close
        log.debug("directory: closing a failed connection: %s", _reason(exc))


class PostgresBackend:
    """:class:`~.backend.DirectoryBackend` on PostgreSQL (asyncpg, one pool per process).

    Open it with :meth:`connect`. Every method raises :class:`DirectoryStoreError` when the
    database cannot be reached or does not answer within ``timeout`` seconds.
    """

    def __init__(self, pool: Any, description: str, timeout: float) -> None:
        self.description = description
        self._pool = pool
        self._timeout = timeout
        self._asyncpg = _asyncpg()
        self.broken_connections = 0  # connections dropped after an error (for monitoring)

    @classmethod
    async def connect(cls, url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
                      timeout: float = DEFAULT_TIMEOUT,
                      connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> PostgresBackend:
        """Open a pool of at most ``pool_size`` connections to ``url`` and bring the schema
        up to date. The password may be in the URL, in ``$PGPASSWORD`` or in ``~/.pgpass``.
        Raises :class:`DirectoryStoreError` (with the URL minus its password) on failure."""
        asyncpg = _asyncpg()
        where = safe_url(url)
        if not 1 <= pool_size <= 1000:
            raise DirectoryError(f"pool size must be 1 to 1000, not {pool_size}")
        if not timeout > 0 or not connect_timeout > 0:
            raise DirectoryError("database timeouts must be positive")
        bad_url = (f"{where}: invalid PostgreSQL URL (percent-encode special characters "
                   "in its user name and password)")
        try:
            pool = await asyncio.wait_for(asyncpg.create_pool(
                url, min_size=0, max_size=pool_size, timeout=connect_timeout,
                command_timeout=timeout, max_inactive_connection_lifetime=60.0),
                connect_timeout + timeout)
        except _BAD_URL:  # its message may quote the URL, password included
            raise DirectoryError(bad_url) from None
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            raise DirectoryStoreError(f"{where}: cannot connect to PostgreSQL: "
                                      f"{_reason(exc)}") from None
        failure = "cannot connect to PostgreSQL"
        try:
            async with pool.acquire(timeout=connect_timeout + timeout) as conn:
                failure = "cannot set up the directory schema"
                await _migrate(conn, where)
        except DirectoryStoreError:
            await pool.close()
            raise
        except _BAD_URL:  # asyncpg parses the URL when it first connects
            await pool.close()
            raise DirectoryError(bad_url) from None
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            pool.terminate()
            raise DirectoryStoreError(f"{where}: {failure}: {_reason(exc)}") from None
        log.info("directory: PostgreSQL %s (pool of %d, timeout %.1f s, schema v%d)", where,
                 pool_size, timeout, SCHEMA_VERSION)
        return cls(pool, f"PostgreSQL {where}", timeout)

    async def _with(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn(connection)`` on a pooled connection, turning every database failure into
        :class:`DirectoryStoreError`. A connection that failed or was interrupted is closed,
        never reused; after a lost connection the idle ones are replaced too."""
        asyncpg = self._asyncpg
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
        except asyncio.TimeoutError:
            raise DirectoryStoreError(
                f"{self.description}: {what} failed: no database connection free or opened "
                f"within {self._timeout:g} s (pool of {self._pool.get_max_size()})") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await self._pool.expire_connections()
            raise DirectoryStoreError(f"{self.description}: {what} failed: cannot connect: "
                                      f"{_reason(exc)}") from None
        try:
            return await fn(conn)
        except DirectoryError:  # ReplayError, UnknownEntryError, a bad field: not the database
            raise
        except asyncio.CancelledError:
            _close(conn)  # interrupted mid-query: its state is unknown
            raise
        except Exception as exc:  # noqa: BLE001 - any driver failure is a database failure
            # a timeout, a lost server, or the driver's own confusion after one (asyncpg's
            # InternalClientError): the connection's state is unknown, so it is closed
            _close(conn)
            self.broken_connections += 1
            if not isinstance(exc, (asyncio.TimeoutError, asyncpg.PostgresError)) or \
                    isinstance(exc, (asyncpg.PostgresConnectionError,
                                     asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError)):
                await self._pool.expire_connections()  # the server went away: idle ones too
            raise DirectoryStoreError(f"{self.description}: {what} failed: "
                                      f"{_reason(exc)}") from None
        finally:
            try:
                await self._pool.release(conn)
            except Exception as exc:  # noqa: BLE001 - resetting it failed: the pool drops it
                log.debug("directory: returning a connection to the pool: %s", _reason(exc))
                _close(conn)

    # -- reads -----------------------------------------------------------------------------

    async def get(self, peer_id: str) -> PeerEntry | None:
        async def q(conn: Any) -> PeerEntry | None:
            row = await conn.fetchrow(f"SELECT {_PEER_COLUMNS} FROM peers WHERE peer_id = $1",
                                      peer_id)
            return None if row is None else PeerEntry(*row)
        return await self._with("lookup", q)

    async def lookup(self, peer_id: str) -> tuple[PeerEntry, dict[str, Any] | None] | None:
        async def q(conn: Any) -> tuple[PeerEntry, dict[str, Any] | None] | None:
            row = await conn.fetchrow(
                "SELECT p.peer_id, p.pubkey, p.host, p.port, p.updated_at, c.record "
                "FROM peers p LEFT JOIN record_cache c ON c.peer_id = p.peer_id "
                "WHERE p.peer_id = $1", peer_id)
            if row is None:
                return None
            cached = None
            if row[5] is not None:
                try:
                    cached = json.loads(row[5])
                except ValueError:
                    cached = None
            return PeerEntry(*row[:5]), cached if isinstance(cached, dict) else None
        return await self._with("lookup", q)

    async def cache_record(self, entry: PeerEntry, record: dict[str, Any]) -> None:
        text = json.dumps(record, separators=(",", ":"))

        async def q(conn: Any) -> None:
            # only while the peer is still there (a concurrent removal wins)
            await conn.execute(
                "INSERT INTO record_cache (peer_id, record) SELECT peer_id, $2 FROM peers "
                "WHERE peer_id = $1 ON CONFLICT (peer_id) DO UPDATE SET record = "
                "EXCLUDED.record", entry.peer_id, text)
        try:
            await self._with("caching a signed record", q)
        except DirectoryStoreError as exc:
            log.warning("directory: %s", exc)

    async def list(self, limit: int | None = None) -> list[PeerEntry]:
        async def q(conn: Any) -> list[PeerEntry]:
            rows = await conn.fetch(f"SELECT {_PEER_COLUMNS} FROM peers ORDER BY peer_id "
                                    "LIMIT $1", limit)
            return [PeerEntry(*r) for r in rows]
        return await self._with("listing", q)

    async def count(self) -> int:
        async def q(conn: Any) -> int:
            return int(await conn.fetchval("SELECT COUNT(*) FROM peers"))
        return await self._with("counting", q)

    async def nonce_count(self) -> int:
        async def q(conn: Any) -> int:
            return int(await conn.fetchval("SELECT COUNT(*) FROM seen_nonces"))
        return await self._with("counting nonces", q)

    # -- writes ----------------------------------------------------------------------------

    async def put(self, peer_id: str, pubkey_pem: str, host: str, port: int, *,
                  updated_at: int | None = None, last_update_ts: int | None = None) -> PeerEntry:
        """Add a peer, or replace its key and address; its last update time is kept (or set
        to ``last_update_ts`` when given, for a migration)."""
        entry = PeerEntry(
            peer_id=check_peer_id(peer_id), pubkey=pubkey_pem, host=check_host(host),
            port=check_port(port),
            updated_at=check_timestamp(int(time.time()) if updated_at is None else updated_at))
        check_pubkey_pem(pubkey_pem)

        async def q(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO peers (peer_id, pubkey, host, port, updated_at, last_update_ts) "
                "VALUES ($1, $2, $3, $4, $5, COALESCE($6, 0)) ON CONFLICT (peer_id) DO UPDATE "
                "SET pubkey = EXCLUDED.pubkey, host = EXCLUDED.host, port = EXCLUDED.port, "
                "updated_at = EXCLUDED.updated_at, last_update_ts = "
                "COALESCE($6, peers.last_update_ts)",
                entry.peer_id, entry.pubkey, entry.host, entry.port, entry.updated_at,
                last_update_ts)
        await self._with("storing a peer", q)
        log.info("directory: stored peer %s at %s:%d", entry.peer_id, entry.host, entry.port)
        return entry

    async def remove(self, peer_id: str) -> bool:
        async def q(conn: Any) -> bool:
            status: str = await conn.execute("DELETE FROM peers WHERE peer_id = $1", peer_id)
            return status != "DELETE 0"
        removed = await self._with("removing a peer", q)
        if removed:
            log.info("directory: removed peer %s", peer_id)
        return removed

    async def update_address(self, peer_id: str, host: str, port: int, *, updated_at: int,
                             nonce: str, nonce_expires_at: int, timestamp: int) -> PeerEntry:
        check_host(host)
        check_port(port)
        check_timestamp(updated_at)
        check_timestamp(timestamp, "timestamp")
        now = int(time.time())
        asyncpg = self._asyncpg

        async def q(conn: Any) -> PeerEntry:
            async with conn.transaction():
                try:
                    fresh = await conn.fetchval(
                        "INSERT INTO seen_nonces (peer_id, nonce, expires_at) "
                        "VALUES ($1, $2, $3) ON CONFLICT (peer_id, nonce) DO UPDATE SET "
                        "expires_at = EXCLUDED.expires_at WHERE seen_nonces.expires_at < $4 "
                        "RETURNING TRUE", peer_id, nonce, nonce_expires_at, now)
                except asyncpg.ForeignKeyViolationError:
                    raise UnknownEntryError(f"peer {peer_id!r} is not registered") from None
                if not fresh:
                    raise ReplayError("update nonce already used (replayed request)")
                row = await conn.fetchrow(
                    f"UPDATE peers SET host = $2, port = $3, updated_at = $4, "
                    f"last_update_ts = $5 WHERE peer_id = $1 AND last_update_ts < $5 "
                    f"RETURNING {_PEER_COLUMNS}", peer_id, host, port, updated_at, timestamp)
                if row is None:
                    last = await conn.fetchval(
                        "SELECT last_update_ts FROM peers WHERE peer_id = $1", peer_id)
                    if last is None:
                        raise UnknownEntryError(f"peer {peer_id!r} is not registered")
                    raise ReplayError(
                        f"not newer than the last accepted update (out of order): update "
                        f"timestamp {timestamp} <= {last}, a delayed or replayed request")
                return PeerEntry(*row)
        entry = await self._with("an address update", q)
        log.info("directory: peer %s moved to %s:%d", peer_id, host, port)
        return entry

    async def purge_nonces(self, now: int) -> int:
        async def q(conn: Any) -> int:
            status: str = await conn.execute("DELETE FROM seen_nonces WHERE expires_at < $1",
                                             now)
            return int(status.split()[-1])
        return await self._with("purging nonces", q)

    async def import_store(self, peers: Sequence[tuple[PeerEntry, int]],
                           nonces: Sequence[tuple[str, str, int]]) -> None:
        """Copy an exported store (:meth:`~.store.DirectoryStore.export`) into this empty
        database in one transaction; :class:`DirectoryError` if it already holds peers."""
        for entry, last in peers:
            check_peer_id(entry.peer_id)
            check_pubkey_pem(entry.pubkey)
            check_host(entry.host)
            check_port(entry.port)
            check_timestamp(entry.updated_at)
            if last:
                check_timestamp(last, "last update timestamp")

        async def q(conn: Any) -> None:
            async with conn.transaction():
                # SHARE ROW EXCLUSIVE: no other writer adds a peer while we check and copy
                await conn.execute("LOCK TABLE peers IN SHARE ROW EXCLUSIVE MODE")
                n = await conn.fetchval("SELECT COUNT(*) FROM peers")
                if n:
                    raise DirectoryError(f"{self.description} already holds {n} peer(s); "
                                         "migrate into an empty directory database")
                # the per-query timeout is for one short request: a batch gets it plus time
                # for its rows (at a fifth of the speed measured on a laptop), still bounded
                await conn.executemany(
                    "INSERT INTO peers (peer_id, pubkey, host, port, updated_at, "
                    "last_update_ts) VALUES ($1, $2, $3, $4, $5, $6)",
                    [(e.peer_id, e.pubkey, e.host, e.port, e.updated_at, last)
                     for e, last in peers], timeout=self._batch_timeout(len(peers)))
                await conn.executemany(
                    "INSERT INTO seen_nonces (peer_id, nonce, expires_at) VALUES ($1, $2, $3)",
                    list(nonces), timeout=self._batch_timeout(len(nonces)))
        await self._with("the migration", q)

    def _batch_timeout(self, rows: int) -> float:
        """Seconds allowed for a statement batch of ``rows`` rows."""
        return self._timeout + rows / _BATCH_ROWS_PER_SECOND

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), self._timeout)
        except (asyncio.TimeoutError, OSError):
            self._pool.terminate()
