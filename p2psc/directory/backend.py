"""What the directory server needs from its database: :class:`DirectoryBackend`, an async
interface with two implementations, and :func:`open_backend`, which picks one by ``--db``.

* :class:`SqliteBackend` -- the embedded default: the blocking :class:`~.store.DirectoryStore`
  run in worker threads (:func:`asyncio.to_thread`), and an in-process cache of signed
  records (one process owns the file's signatures; other processes on the same file keep
  their own cache, which is only ever a copy of what the file says);
* :class:`~.pgstore.PostgresBackend` -- PostgreSQL through asyncpg, shared by any number of
  server processes and machines (``--db postgresql://...``), whose record cache is a table.

Every database failure is a :class:`~p2psc.p2pexcept.DirectoryStoreError` (the server answers
503); the other errors keep their meaning (:class:`~p2psc.p2pexcept.ReplayError`,
:class:`~p2psc.p2pexcept.UnknownEntryError`, :class:`~p2psc.p2pexcept.DirectoryError` for a
field that does not validate).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import OrderedDict
from typing import Any, Protocol

from ..p2pexcept import DirectoryError
from .store import DirectoryStore, PeerEntry, open_store

log = logging.getLogger("p2psc.directory.backend")

__all__ = ["POSTGRES_SCHEMES", "DirectoryBackend", "SqliteBackend", "is_postgres_url",
           "open_backend"]

#: URL schemes that select the PostgreSQL store.
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
#: Signed records kept in memory by :class:`SqliteBackend` (keyed by the entry's content).
RECORD_CACHE_SIZE = 4096


def is_postgres_url(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database rather than an SQLite file."""
    return db.lower().startswith(POSTGRES_SCHEMES)


class DirectoryBackend(Protocol):
    """The directory's registered peers, seen update nonces and cached signed records.

    Implementations enforce the semantics that the server relies on, for every process that
    shares the database: an update's nonce is accepted once, and updates of one peer apply
    in the order of their signed timestamps (see :meth:`update_address`).
    """

    #: Where the data lives, for log lines (never a password).
    description: str

    async def get(self, peer_id: str) -> PeerEntry | None:
        """The peer's entry, or ``None``."""
        ...

    async def lookup(self, peer_id: str) -> tuple[PeerEntry, dict[str, Any] | None] | None:
        """The peer's entry and the signed record cached for it (``None`` if none; the caller
        checks that it matches the entry and is fresh enough), or ``None`` if unknown."""
        ...

    async def cache_record(self, entry: PeerEntry, record: dict[str, Any]) -> None:
        """Remember ``record``, a nonce-less signed record of ``entry``, for later lookups.
        Best effort: a failure is logged, not raised."""
        ...

    async def list(self, limit: int | None = None) -> list[PeerEntry]:
        """All entries (or the first ``limit``), sorted by peer id."""
        ...

    async def count(self) -> int:
        """Number of registered peers."""
        ...

    async def put(self, peer_id: str, pubkey_pem: str, host: str, port: int, *,
                  updated_at: int | None = None) -> PeerEntry:
        """Add a peer, or replace its key and address (its last update time is kept)."""
        ...

    async def remove(self, peer_id: str) -> bool:
        """Remove a peer with its nonces and cached record; ``False`` if it was not there."""
        ...

    async def update_address(self, peer_id: str, host: str, port: int, *, updated_at: int,
                             nonce: str, nonce_expires_at: int, timestamp: int) -> PeerEntry:
        """Move a registered peer, in one transaction: :class:`ReplayError` if ``nonce`` was
        seen and has not expired, or if ``timestamp`` is not newer than the last accepted
        one; :class:`UnknownEntryError` if not registered. Nothing is written on error."""
        ...

    async def purge_nonces(self, now: int) -> int:
        """Delete nonces that expired before ``now``; returns how many."""
        ...

    async def nonce_count(self) -> int:
        """Number of nonces remembered."""
        ...

    async def close(self) -> None:
        """Release the database (connections, file)."""
        ...


class SqliteBackend:
    """:class:`DirectoryBackend` over the blocking SQLite :class:`DirectoryStore`.

    Each call runs in a worker thread: SQLite's busy timeout may wait seconds on a CLI writer
    and its commits fsync. The store's lock serializes its one connection.
    """

    def __init__(self, store: DirectoryStore) -> None:
        self.store = store
        self.description = f"SQLite {store.path}"
        self._cache_lock = threading.Lock()
        self._records: OrderedDict[PeerEntry, dict[str, Any]] = OrderedDict()

    @staticmethod
    async def _run(fn: Any, *args: Any, **kw: Any) -> Any:
        return await asyncio.to_thread(functools.partial(fn, *args, **kw))

    async def get(self, peer_id: str) -> PeerEntry | None:
        entry: PeerEntry | None = await self._run(self.store.get, peer_id)
        return entry

    async def lookup(self, peer_id: str) -> tuple[PeerEntry, dict[str, Any] | None] | None:
        entry = await self.get(peer_id)
        if entry is None:
            return None
        with self._cache_lock:
            return entry, self._records.get(entry)

    async def cache_record(self, entry: PeerEntry, record: dict[str, Any]) -> None:
        with self._cache_lock:
            self._records[entry] = record
            self._records.move_to_end(entry)
            while len(self._records) > RECORD_CACHE_SIZE:
                self._records.popitem(last=False)

    async def list(self, limit: int | None = None) -> list[PeerEntry]:
        entries: list[PeerEntry] = await self._run(self.store.list, limit)
        return entries

    async def count(self) -> int:
        n: int = await self._run(self.store.count)
        return n

    async def put(self, peer_id: str, pubkey_pem: str, host: str, port: int, *,
                  updated_at: int | None = None) -> PeerEntry:
        entry: PeerEntry = await self._run(self.store.put, peer_id, pubkey_pem, host, port,
                                           updated_at=updated_at)
        return entry

    async def remove(self, peer_id: str) -> bool:
        removed: bool = await self._run(self.store.remove, peer_id)
        return removed

    async def update_address(self, peer_id: str, host: str, port: int, *, updated_at: int,
                             nonce: str, nonce_expires_at: int, timestamp: int) -> PeerEntry:
        entry: PeerEntry = await self._run(
            self.store.update_address, peer_id, host, port, updated_at=updated_at, nonce=nonce,
            nonce_expires_at=nonce_expires_at, timestamp=timestamp)
        return entry

    async def purge_nonces(self, now: int) -> int:
        n: int = await self._run(self.store.purge_nonces, now)
        return n

    async def nonce_count(self) -> int:
        n: int = await self._run(self.store.nonce_count)
        return n

    async def close(self) -> None:
        await self._run(self.store.close)


async def open_backend(db: str, **postgres_options: Any) -> DirectoryBackend:
    """Open the store that ``db`` names: a ``postgresql://`` URL (``postgres_options`` go to
    :meth:`~.pgstore.PostgresBackend.connect`), else an SQLite file (created if needed; its
    folder must exist). The schema is created or migrated to this version."""
    if is_postgres_url(db):
        from .pgstore import PostgresBackend  # asyncpg only when asked for
        return await PostgresBackend.connect(db, **postgres_options)
    if postgres_options:
        raise DirectoryError(f"{', '.join(sorted(postgres_options))}: PostgreSQL options, "
                             "but --db is an SQLite file")
    store = await asyncio.to_thread(open_store, db)
    return SqliteBackend(store)
