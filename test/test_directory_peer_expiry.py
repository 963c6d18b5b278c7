"""Keys learned from the directory expire with their record (issue 11 item 2): the optional
``expires_at`` of the known peers file, and PeerStore.public_key refusing an expired one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import rsa_key
from p2psc import keys
from p2psc.config import (
    DIRECTORY_CLOCK_SKEW,
    PeerAddress,
    PeerStore,
    peer_files,
    read_known_peers,
    write_peer_files,
)
from p2psc.directory.record import CLOCK_SKEW
from p2psc.p2pexcept import ConfigError


def test_skew_is_the_records_skew() -> None:
    assert DIRECTORY_CLOCK_SKEW == CLOCK_SKEW == 300


def test_expires_at_is_optional_and_round_trips(tmp_path: Path) -> None:
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({
        "hand": {"peer_id": "hand", "host": "h", "port": 1},  # hand-written: no times
        "old": {"peer_id": "old", "host": "h", "port": 2, "updated_at": 5},
        "dir": {"peer_id": "dir", "host": "h", "port": 3, "updated_at": 5, "expires_at": 9},
    }))
    table = read_known_peers(peers)
    assert (table["hand"].updated_at, table["hand"].expires_at) == (None, None)
    assert (table["old"].updated_at, table["old"].expires_at) == (5, None)
    assert (table["dir"].updated_at, table["dir"].expires_at) == (5, 9)
    assert table["hand"].to_json() == {"peer_id": "hand", "host": "h", "port": 1}
    assert table["dir"].to_json()["expires_at"] == 9
    new = PeerAddress("new", "h", 4, 6, 10)
    write_peer_files(peer_files(tmp_path / "keys", peers, table, new, None))
    again = read_known_peers(peers)
    assert again["new"].expires_at == 10 and again["hand"].expires_at is None
    for bad in ("9", 9.5, True, [9]):
        peers.write_text(json.dumps({"x": {"peer_id": "x", "host": "h", "port": 1,
                                           "expires_at": bad}}))
        with pytest.raises(ConfigError, match="expires_at"):
            read_known_peers(peers)


def test_peer_address_expiry_rule() -> None:
    hand = PeerAddress("a", "h", 1)
    assert not hand.from_directory and not hand.expired(10**12)
    legacy = PeerAddress("a", "h", 1, updated_at=5)  # from a v1 record: never expired by itself
    assert legacy.from_directory and legacy.expired(0)
    rec = PeerAddress("a", "h", 1, updated_at=5, expires_at=1000)
    assert not rec.expired(1000 + DIRECTORY_CLOCK_SKEW)
    assert rec.expired(1000 + DIRECTORY_CLOCK_SKEW + 1)
    assert PeerAddress("a", "h", 1, 5, 0).expired(0 + DIRECTORY_CLOCK_SKEW + 1)  # retired
    # the times do not take part in equality (an address is host and port)
    assert rec == hand


def test_peer_store_hides_expired_directory_keys(tmp_path: Path) -> None:
    key = rsa_key("alice").public_key()
    now = [1000.0]
    store = PeerStore(tmp_path / "peers.json", tmp_path, {
        "dir": PeerAddress("dir", "h", 1, 5, 2000),
        "hand": PeerAddress("hand", "h", 2),
    }, {"dir": key, "hand": key, "keyonly": key})
    store.clock = lambda: now[0]
    assert all(store.public_key(p) is key for p in ("dir", "hand", "keyonly"))
    now[0] = 2000 + DIRECTORY_CLOCK_SKEW + 1
    assert store.public_key("dir") is None and store.pinned_key("dir") is key
    assert store.public_key("hand") is key and store.public_key("keyonly") is key
    assert store.public_key("nobody") is None and store.pinned_key("nobody") is None
    # a fresh record makes it usable again
    store.add(PeerAddress("dir", "h", 1, 6, int(now[0]) + 3600), key, persist=False)
    assert store.public_key("dir") is key
    assert keys.same_public_key(store.pinned_key("dir"), key)  # type: ignore[arg-type]
