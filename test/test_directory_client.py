"""save_peer (storing looked-up peers, refusing key changes) and client URL helpers."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from p2psc import keys
from p2psc.directory import (
    CENTER_PEER_ID,
    DirectoryLookup,
    PeerRecord,
    save_peer,
    sign_record,
    update_url_for,
    verify_record,
)
from p2psc.p2pexcept import ConfigError, DirectoryError


@pytest.fixture(scope="module")
def k() -> dict[str, Any]:
    return {n: keys.generate_private_key(2048) for n in ("center", "alice", "mallory")}


EXPIRES = int(time.time()) + 3600


def record(k: dict[str, Any], peer_id: str = "alice", key: str = "alice", port: int = 7001,
           updated_at: int = 1000) -> PeerRecord:
    rec = sign_record(k["center"], {"peer_id": peer_id,
                                    "pubkey": keys.public_key_pem(k[key]).decode(),
                                    "host": "127.0.0.1", "port": port, "updated_at": updated_at,
                                    "expires_at": EXPIRES, "nonce": None})
    return verify_record(k["center"].public_key(), rec, peer_id, nonce=None)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "pubkeys", tmp_path / "peers.json"


def test_save_new_peer(k: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    keydir, peers = dirs
    peers.write_text(json.dumps({"bob": {"peer_id": "bob", "host": "h", "port": 1}}))
    assert save_peer(record(k), keydir, peers) is True
    key = keys.load_public_key(keydir / "alice.pubkey.pem")
    assert keys.same_public_key(key, k["alice"].public_key())
    data = json.loads(peers.read_text())
    assert data["alice"] == {"peer_id": "alice", "host": "127.0.0.1", "port": 7001,
                             "updated_at": 1000, "expires_at": EXPIRES}
    assert data["bob"]["port"] == 1  # other peers kept
    # no temporary files left behind
    assert [p.name for p in keydir.iterdir()] == ["alice.pubkey.pem"]
    assert sorted(p.name for p in peers.parent.iterdir()) == ["peers.json", "pubkeys"]


def test_same_key_new_address(k: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    keydir, peers = dirs
    assert save_peer(record(k), keydir, peers)
    mtime = os.stat(keydir / "alice.pubkey.pem").st_mtime_ns
    assert save_peer(record(k, port=7002, updated_at=1001), keydir, peers)
    assert json.loads(peers.read_text())["alice"]["port"] == 7002
    assert os.stat(keydir / "alice.pubkey.pem").st_mtime_ns == mtime  # key not rewritten


def test_key_change_refused_loudly(k: dict[str, Any], dirs: tuple[Path, Path],
                                   caplog: pytest.LogCaptureFixture) -> None:
    keydir, peers = dirs
    assert save_peer(record(k), keydir, peers)
    before = (keydir / "alice.pubkey.pem").read_bytes(), peers.read_bytes()
    with caplog.at_level(logging.WARNING, logger="p2psc.directory"):
        assert save_peer(record(k, key="mallory", port=6666, updated_at=2000),
                         keydir, peers) is False
    assert ((keydir / "alice.pubkey.pem").read_bytes(), peers.read_bytes()) == before
    [rec] = [r for r in caplog.records if r.name == "p2psc.directory"]
    assert rec.levelno == logging.ERROR and "KEY CHANGE" in rec.getMessage()
    assert keys.fingerprint(k["mallory"]) in rec.getMessage()
    assert "BEGIN" not in rec.getMessage()  # fingerprints, never keys


def test_key_change_allowed_by_config(k: dict[str, Any], dirs: tuple[Path, Path],
                                      caplog: pytest.LogCaptureFixture) -> None:
    keydir, peers = dirs
    assert save_peer(record(k), keydir, peers)
    with caplog.at_level(logging.WARNING, logger="p2psc.directory"):
        assert save_peer(record(k, key="mallory", updated_at=2000), keydir, peers,
                         allow_key_change=True) is True
    assert keys.same_public_key(keys.load_public_key(keydir / "alice.pubkey.pem"),
                                k["mallory"].public_key())
    assert any(r.levelno == logging.WARNING and "KEY CHANGE ACCEPTED" in r.getMessage()
               for r in caplog.records)


def test_center_key_never_replaced(k: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    keydir, peers = dirs
    keydir.mkdir()
    center_file = keydir / f"{CENTER_PEER_ID}.pubkey.pem"
    center_file.write_bytes(keys.public_key_pem(k["center"]))
    rec = record(k, peer_id=CENTER_PEER_ID, key="mallory")
    assert save_peer(rec, keydir, peers, allow_key_change=True) is False
    assert center_file.read_bytes() == keys.public_key_pem(k["center"])


def test_older_record_refused(k: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    keydir, peers = dirs
    assert save_peer(record(k, port=7002, updated_at=2000), keydir, peers)
    assert save_peer(record(k, port=7001, updated_at=1000), keydir, peers) is False
    assert json.loads(peers.read_text())["alice"]["port"] == 7002


def test_bad_known_peers_file(k: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    keydir, peers = dirs
    for content in ("{broken", "[]"):
        peers.write_text(content)
        with pytest.raises(ConfigError):
            save_peer(record(k), keydir, peers)
        assert peers.read_text() == content
    with pytest.raises(TypeError):
        save_peer({"peer_id": "alice"}, keydir, peers)  # type: ignore[arg-type]


def test_update_url_for() -> None:
    assert update_url_for("http://h:9999/api/get_peer_info") == "http://h:9999/api/update_address"
    assert (update_url_for("http://h:9999/api/get_peer_info.dspy?x=1")
            == "http://h:9999/api/update_address")
    assert update_url_for("https://h") == "https://h/api/update_address"
    for bad in ("ftp://h/api/get_peer_info", "http://h/other", "not a url"):
        with pytest.raises(DirectoryError):
            update_url_for(bad)


def test_lookup_rejects_bad_url_and_ids(k: dict[str, Any]) -> None:
    import asyncio
    with pytest.raises(DirectoryError):
        DirectoryLookup("file:///etc/passwd", k["center"].public_key())

    async def go() -> None:
        async with DirectoryLookup("http://127.0.0.1:1/api/get_peer_info",
                                   k["center"].public_key()) as dl:
            with pytest.raises(DirectoryError, match="invalid peer id"):
                await dl.lookup("../../etc")
            assert dl.requests == 0
    asyncio.run(asyncio.wait_for(go(), 10))


def test_accept_record_for_in_memory_stores(k: dict[str, Any],
                                            caplog: pytest.LogCaptureFixture) -> None:
    from p2psc.directory import accept_record
    rec = record(k)
    assert accept_record(rec, None) is True
    assert accept_record(rec, k["alice"].public_key()) is True
    with caplog.at_level(logging.WARNING, logger="p2psc.directory"):
        assert accept_record(rec, k["mallory"].public_key()) is False
        assert accept_record(rec, k["mallory"].public_key(), allow_key_change=True) is True
        center_rec = record(k, peer_id=CENTER_PEER_ID, key="mallory")
        assert accept_record(center_rec, k["center"].public_key(),
                             allow_key_change=True) is False
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING, logging.ERROR]
