"""The directory's SQLite store: CRUD, validation, atomic updates and replay protection."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from p2psc import keys
from p2psc.directory.store import (
    DirectoryStore,
    ReplayError,
    UnknownEntryError,
    open_store,
)
from p2psc.p2pexcept import DirectoryError


@pytest.fixture(scope="module")
def pems() -> dict[str, str]:
    return {n: keys.public_key_pem(keys.generate_private_key(2048)).decode() for n in ("a", "b")}


def test_put_get_list_remove(tmp_path: Path, pems: dict[str, str]) -> None:
    db = tmp_path / "d.sqlite3"
    with open_store(db) as s:
        assert s.get("alice") is None and s.list() == []
        s.put("bob", pems["b"], "localhost", 2, updated_at=10)
        e = s.put("alice", pems["a"], "127.0.0.1", 1, updated_at=11)
        assert (e.peer_id, e.host, e.port, e.updated_at) == ("alice", "127.0.0.1", 1, 11)
        assert [x.peer_id for x in s.list()] == ["alice", "bob"]
        assert [x.peer_id for x in s.list(limit=1)] == ["alice"]
        # replace: new key and address
        s.put("alice", pems["b"], "::1", 3, updated_at=12)
        assert s.get("alice").pubkey == pems["b"]  # type: ignore[union-attr]
        assert s.count() == 2
    # persisted in one file
    with open_store(db) as s:
        assert s.get("alice").port == 3  # type: ignore[union-attr]
        assert s.remove("alice") is True and s.remove("alice") is False
        assert s.count() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.sqlite3"]


@pytest.mark.parametrize("bad", [
    {"peer_id": "a/b"}, {"peer_id": ""}, {"pubkey_pem": "junk"}, {"host": "a b"},
    {"host": ""}, {"port": 0}, {"port": 65536}, {"port": True},
])
def test_put_validates(pems: dict[str, str], bad: dict[str, Any]) -> None:
    args = {"peer_id": "alice", "pubkey_pem": pems["a"], "host": "h", "port": 1, **bad}
    with DirectoryStore(":memory:") as s:
        with pytest.raises(DirectoryError):
            s.put(**args)
        assert s.count() == 0


def test_update_address_and_replay(pems: dict[str, str]) -> None:
    with DirectoryStore(":memory:") as s:
        s.put("alice", pems["a"], "h", 1, updated_at=5)
        e = s.update_address("alice", "h2", 2, updated_at=100, nonce="n1", nonce_expires_at=10**10)
        assert (e.host, e.port, e.updated_at, e.pubkey) == ("h2", 2, 100, pems["a"])
        with pytest.raises(ReplayError):
            s.update_address("alice", "h3", 3, nonce="n1", nonce_expires_at=10**10)
        assert s.get("alice").port == 2  # type: ignore[union-attr]  # nothing written
        # the same nonce from another peer is a different nonce
        s.put("bob", pems["b"], "h", 1)
        s.update_address("bob", "h", 9, nonce="n1", nonce_expires_at=10**10)
        assert s.nonce_count() == 2


def test_update_unknown_peer_leaves_nothing_behind(pems: dict[str, str]) -> None:
    with DirectoryStore(":memory:") as s:
        with pytest.raises(UnknownEntryError):
            s.update_address("ghost", "h", 1, nonce="n", nonce_expires_at=10**10)
        assert s.nonce_count() == 0  # the nonce insert was rolled back
        with pytest.raises(DirectoryError):
            s.update_address("ghost", "bad host", 1)


def test_expired_nonces_are_purged(pems: dict[str, str]) -> None:
    with DirectoryStore(":memory:") as s:
        s.put("alice", pems["a"], "h", 1)
        s.update_address("alice", "h", 2, nonce="old", nonce_expires_at=1)
        s.update_address("alice", "h", 3, nonce="new", nonce_expires_at=10**10)
        assert s.nonce_count() == 1  # "old" purged by the second update
        assert s.purge_nonces(now=10**10 + 1) == 1 and s.nonce_count() == 0
        s.update_address("alice", "h", 2, nonce="x", nonce_expires_at=10**10)
        s.remove("alice")
        assert s.nonce_count() == 0


def test_transactions_roll_back_on_error(pems: dict[str, str]) -> None:
    with DirectoryStore(":memory:") as s:
        s.put("alice", pems["a"], "h", 1)
        with pytest.raises(RuntimeError), s._tx() as db:
            db.execute("DELETE FROM peers")
            raise RuntimeError("crash half-way")
        assert s.count() == 1
        with pytest.raises(DirectoryError), s._tx() as db:
            db.execute("INSERT INTO peers (peer_id, pubkey, host, port, updated_at) "
                       "VALUES ('x', 'k', 'h', 99999, 0)")  # CHECK fails
        assert s.count() == 1


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "junk.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DirectoryError):
        DirectoryStore(bad)
    with pytest.raises(DirectoryError, match="does not exist"):
        open_store(tmp_path / "nope" / "d.sqlite3")


def test_updates_apply_in_signed_order(pems: dict[str, str]) -> None:
    """Issue 11 item 6: an older update delivered after a newer one is refused."""
    with DirectoryStore(":memory:") as s:
        s.put("alice", pems["a"], "h", 1)
        assert s.last_update_ts("alice") == 0 and s.last_update_ts("ghost") is None
        s.update_address("alice", "new", 2, timestamp=1000, nonce="n2", nonce_expires_at=10**10)
        with pytest.raises(ReplayError, match="not newer"):
            s.update_address("alice", "old", 3, timestamp=999, nonce="n1",
                             nonce_expires_at=10**10)
        with pytest.raises(ReplayError):  # the same second is not newer either
            s.update_address("alice", "old", 3, timestamp=1000, nonce="n3",
                             nonce_expires_at=10**10)
        e = s.get("alice")
        assert e is not None and (e.host, e.port) == ("new", 2)
        assert s.last_update_ts("alice") == 1000
        assert s.nonce_count() == 1  # the refused requests' nonces were rolled back
        # an admin change keeps the last update's time: a delayed update is still refused
        s.put("alice", pems["b"], "admin", 4)
        assert s.last_update_ts("alice") == 1000
        with pytest.raises(ReplayError):
            s.update_address("alice", "old", 3, timestamp=999)
        s.update_address("alice", "newer", 5, timestamp=1001)
        assert s.get("alice").port == 5  # type: ignore[union-attr]


_V1_SCHEMA = """
CREATE TABLE peers (
    peer_id    TEXT PRIMARY KEY,
    pubkey     TEXT NOT NULL,
    host       TEXT NOT NULL,
    port       INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    updated_at INTEGER NOT NULL
);
CREATE TABLE seen_nonces (
    peer_id    TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (peer_id, nonce)
);
CREATE INDEX seen_nonces_expiry ON seen_nonces (expires_at);
PRAGMA user_version = 1;
"""


def test_v1_database_is_migrated(tmp_path: Path, pems: dict[str, str]) -> None:
    db = tmp_path / "d.sqlite3"
    con = sqlite3.connect(db)
    con.executescript(_V1_SCHEMA)
    con.execute("INSERT INTO peers VALUES ('alice', ?, 'h', 1, 5)", (pems["a"],))
    con.execute("INSERT INTO seen_nonces VALUES ('alice', 'n', 99)")
    con.commit()
    con.close()
    with DirectoryStore(db) as s:
        e = s.get("alice")
        assert e is not None and (e.host, e.port, e.updated_at) == ("h", 1, 5)
        assert s.last_update_ts("alice") == 0 and s.nonce_count() == 1
        s.update_address("alice", "h", 2, timestamp=10)
        with pytest.raises(ReplayError):
            s.update_address("alice", "h", 3, timestamp=9)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    con.close()
    with DirectoryStore(db) as s:  # opening a v2 database again changes nothing
        assert s.last_update_ts("alice") == 10 and s.get("alice").port == 2  # type: ignore[union-attr]


def test_newer_schema_refused(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite3"
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version = 99")
    con.close()
    with pytest.raises(DirectoryError, match="newer"):
        DirectoryStore(db)


def test_thread_safe(pems: dict[str, str]) -> None:
    with DirectoryStore(":memory:") as s:
        s.put("alice", pems["a"], "h", 1)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(30):
                    s.update_address("alice", "h", 1 + (i * 30 + j) % 60000,
                                     nonce=f"{i}-{j}", nonce_expires_at=10**10)
                    assert s.get("alice") is not None
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors and s.nonce_count() == 240
