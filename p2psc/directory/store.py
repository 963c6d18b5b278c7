"""The directory's SQLite store: registered peers, the seen update nonces, and the timestamp
of each peer's last accepted address update.

One database file (stdlib :mod:`sqlite3`, rollback journal, so no extra server and no sidecar
files at rest). Every write is a single ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction, rolled
back on any error, so the database is never left half-written.

The methods are blocking and thread-safe (one connection guarded by a lock); the server calls
them through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, Union

from ..p2pexcept import DirectoryError, DirectoryStoreError, ReplayError, UnknownEntryError
from .record import check_host, check_peer_id, check_port, check_pubkey_pem, check_timestamp

log = logging.getLogger("p2psc.directory.store")

__all__ = ["DirectoryStore", "PeerEntry", "ReplayError", "UnknownEntryError"]

PathLike = Union[str, "os.PathLike[str]"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    peer_id    TEXT PRIMARY KEY,
    pubkey     TEXT NOT NULL,
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    updated_at INTEGER NOT NULL,
    last_update_ts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS seen_nonces (
    peer_id    TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (peer_id, nonce)
);
CREATE INDEX IF NOT EXISTS seen_nonces_expiry ON seen_nonces (expires_at);
"""
#: v1: peers and seen_nonces. v2: ``peers.last_update_ts``, the signed timestamp of the last
#: accepted address update (v1 databases are migrated when opened).
_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class PeerEntry:
    """One registered peer as stored (unsigned)."""

    peer_id: str
    pubkey: str
    host: str
    port: int
    updated_at: int

    def fields(self) -> dict[str, object]:
        """The five record fields, ready for :func:`p2psc.directory.record.sign_record`."""
        return {"peer_id": self.peer_id, "pubkey": self.pubkey, "host": self.host,
                "port": self.port, "updated_at": self.updated_at}


#: :meth:`DirectoryStore.export`'s peers: (entry, last accepted update timestamp)
PeerRows: TypeAlias = list[tuple[PeerEntry, int]]
#: :meth:`DirectoryStore.export`'s nonces: (peer_id, nonce, expires_at)
NonceRows: TypeAlias = list[tuple[str, str, int]]


class DirectoryStore:
    """Registered peers and seen nonces in one SQLite file (``":memory:"`` for tests)."""

    def __init__(self, path: PathLike, *, busy_timeout: float = 5.0) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _tx).
            self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                       check_same_thread=False)
        except sqlite3.Error as exc:
            raise DirectoryStoreError(f"{self.path}: cannot open directory database: {exc}") from None
        try:
            self._init_schema()
        except BaseException:
            self._db.close()
            raise

    def _init_schema(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise DirectoryError(f"{self.path}: database schema v{version} is newer "
                                     "than this p2psc")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            columns = {row[1] for row in db.execute("PRAGMA table_info(peers)")}
            if "last_update_ts" not in columns:  # a v1 database: migrate it in place
                db.execute("ALTER TABLE peers ADD COLUMN last_update_ts INTEGER NOT NULL "
                           "DEFAULT 0")
                log.info("directory: %s: database schema v%d migrated to v%d", self.path,
                         version, _SCHEMA_VERSION)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock: commit on success, roll back on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise DirectoryStoreError(f"directory database busy or unavailable: {exc}") from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise DirectoryStoreError(f"directory database write failed: {exc}") from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:  # the connection is unusable; report the first error
                log.error("directory database rollback failed: %s", exc)

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise DirectoryStoreError(f"directory database read failed: {exc}") from None

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> DirectoryStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- peers ---------------------------------------------------------------------------

    def put(self, peer_id: str, pubkey_pem: str, host: str, port: int, *,
            updated_at: int | None = None) -> PeerEntry:
        """Add a peer, or replace its key and address; every field is validated first.

        A replaced entry keeps the timestamp of its last accepted address update, so an update
        signed before this call but delivered after it is still refused if not newer.
        """
        entry = PeerEntry(
            peer_id=check_peer_id(peer_id),
            pubkey=pubkey_pem,
            host=check_host(host),
            port=check_port(port),
            updated_at=check_timestamp(int(time.time()) if updated_at is None else updated_at),
        )
        check_pubkey_pem(pubkey_pem)
        with self._tx() as db:
            db.execute("INSERT INTO peers (peer_id, pubkey, host, port, updated_at) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE SET "
                       "pubkey = excluded.pubkey, host = excluded.host, port = excluded.port, "
                       "updated_at = excluded.updated_at",
                       (entry.peer_id, entry.pubkey, entry.host, entry.port, entry.updated_at))
        log.info("directory: stored peer %s at %s:%d", entry.peer_id, entry.host, entry.port)
        return entry

    def remove(self, peer_id: str) -> bool:
        """Remove a peer (and its seen nonces); ``False`` if it was not registered."""
        with self._tx() as db:
            n = db.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,)).rowcount
            db.execute("DELETE FROM seen_nonces WHERE peer_id = ?", (peer_id,))
        if n:
            log.info("directory: removed peer %s", peer_id)
        return bool(n)

    def get(self, peer_id: str) -> PeerEntry | None:
        """The peer's entry, or ``None``."""
        rows = self._read("SELECT peer_id, pubkey, host, port, updated_at FROM peers "
                          "WHERE peer_id = ?", (peer_id,))
        return PeerEntry(*rows[0]) if rows else None

    def list(self, limit: int | None = None) -> list[PeerEntry]:
        """All entries (or the first ``limit``), sorted by peer id."""
        sql = "SELECT peer_id, pubkey, host, port, updated_at FROM peers ORDER BY peer_id"
        if limit is not None:
            return [PeerEntry(*r) for r in self._read(sql + " LIMIT ?", (int(limit),))]
        return [PeerEntry(*r) for r in self._read(sql)]

    def count(self) -> int:
        """Number of registered peers."""
        return int(self._read("SELECT COUNT(*) FROM peers")[0][0])

    def last_update_ts(self, peer_id: str) -> int | None:
        """The timestamp of the peer's last accepted address update (0 if none yet), or
        ``None`` if the peer is not registered."""
        rows = self._read("SELECT last_update_ts FROM peers WHERE peer_id = ?", (peer_id,))
        return int(rows[0][0]) if rows else None

    def update_address(self, peer_id: str, host: str, port: int, *, updated_at: int | None = None,
                       nonce: str | None = None, nonce_expires_at: int | None = None,
                       timestamp: int | None = None) -> PeerEntry:
        """Change a registered peer's host and port (never its key), in one transaction.

        With ``nonce``, also records it as seen until ``nonce_expires_at`` and raises
        :class:`ReplayError` if it was already seen (expired nonces are purged first).
        With ``timestamp`` (the update request's own signed time), also raises
        :class:`ReplayError` ("not newer ...") unless it is newer than the last accepted one,
        which it then becomes: updates apply in the order they were signed, never rolled back.
        Raises :class:`UnknownEntryError` if the peer is not registered. Nothing is written
        when anything is raised.
        """
        check_host(host)
        check_port(port)
        now = int(time.time())
        ts = check_timestamp(now if updated_at is None else updated_at)
        with self._tx() as db:
            if nonce is not None:
                db.execute("DELETE FROM seen_nonces WHERE expires_at < ?", (now,))
                try:
                    db.execute("INSERT INTO seen_nonces (peer_id, nonce, expires_at) "
                               "VALUES (?, ?, ?)",
                               (peer_id, nonce, now if nonce_expires_at is None
                                else nonce_expires_at))
                except sqlite3.IntegrityError:
                    raise ReplayError("update nonce already used (replayed request)") from None
            last = db.execute("SELECT last_update_ts FROM peers WHERE peer_id = ?",
                              (peer_id,)).fetchone()
            if last is None:
                raise UnknownEntryError(f"peer {peer_id!r} is not registered")
            if timestamp is not None:
                check_timestamp(timestamp, "timestamp")
                if timestamp <= last[0]:
                    raise ReplayError(
                        f"not newer than the last accepted update (out of order): update "
                        f"timestamp {timestamp} <= {last[0]}, a delayed or replayed request")
            db.execute("UPDATE peers SET host = ?, port = ?, updated_at = ?, "
                       "last_update_ts = MAX(last_update_ts, ?) WHERE peer_id = ?",
                       (host, port, ts, last[0] if timestamp is None else timestamp, peer_id))
            row = db.execute("SELECT peer_id, pubkey, host, port, updated_at FROM peers "
                             "WHERE peer_id = ?", (peer_id,)).fetchone()
        log.info("directory: peer %s moved to %s:%d", peer_id, host, port)
        return PeerEntry(*row)

    def purge_nonces(self, now: int | None = None) -> int:
        """Delete expired nonces; returns how many were deleted."""
        with self._tx() as db:
            return db.execute("DELETE FROM seen_nonces WHERE expires_at < ?",
                              (int(time.time()) if now is None else now,)).rowcount

    def export(self, now: int | None = None) -> tuple[PeerRows, NonceRows]:
        """Everything another store needs to take this one over, read in one transaction:
        every peer with the timestamp of its last accepted update, and the nonces that have
        not expired at ``now`` as ``(peer_id, nonce, expires_at)``."""
        now = int(time.time()) if now is None else now
        with self._tx() as db:
            peers = [(PeerEntry(*r[:5]), int(r[5])) for r in db.execute(
                "SELECT peer_id, pubkey, host, port, updated_at, last_update_ts FROM peers "
                "ORDER BY peer_id")]
            nonces = [(str(r[0]), str(r[1]), int(r[2])) for r in db.execute(
                "SELECT peer_id, nonce, expires_at FROM seen_nonces WHERE expires_at >= ? "
                "ORDER BY peer_id, nonce", (now,))]
        return peers, nonces

    def nonce_count(self) -> int:
        """Number of nonces currently remembered (for tests and monitoring)."""
        return int(self._read("SELECT COUNT(*) FROM seen_nonces")[0][0])


def open_store(path: PathLike) -> DirectoryStore:
    """Open (creating if needed) the directory database at ``path``; its folder must exist."""
    p = Path(path)
    if str(path) != ":memory:" and not p.parent.is_dir():
        raise DirectoryError(f"{p.parent}: folder does not exist")
    return DirectoryStore(p if str(path) != ":memory:" else ":memory:")
