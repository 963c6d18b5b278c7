"""One writer of the known peers file and the public key files: save_peer (directory lookups),
PeerStore.add (``p2psc add-peer``), PeerStore.files_for (the handler) and ``p2psc init`` all
produce the same bytes through p2psc.config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import rsa_key
from cryptography.hazmat.primitives import serialization

from p2psc import keys
from p2psc.cli import main as p2psc_main
from p2psc.config import (
    PeerAddress,
    PeerStore,
    known_peers_json,
    peer_files,
    read_known_peers,
    write_peer_files,
)
from p2psc.directory import PeerRecord, save_peer, sign_record, verify_record
from p2psc.p2pexcept import ConfigError

BOB = {"bob.test": {"peer_id": "bob.test", "host": "localhost", "port": 7002}}
EXPIRES = int(time.time()) + 3600


def record(pubkey_pem: str, host: str = "127.0.0.1", port: int = 7001,
           updated_at: int = 1000) -> PeerRecord:
    center = rsa_key("center")
    rec = sign_record(center, {"peer_id": "alice.test", "pubkey": pubkey_pem, "host": host,
                               "port": port, "updated_at": updated_at, "expires_at": EXPIRES,
                               "nonce": None})
    return verify_record(center.public_key(), rec, "alice.test", nonce=None)


def folder(root: Path, name: str, table: dict[str, Any]) -> tuple[Path, Path]:
    """A key folder (bob's key in it) and a known peers file holding ``table`` written by hand."""
    keydir, peers = root / name / "pubkeys", root / name / "peers.json"
    keydir.mkdir(parents=True)
    peers.write_text(json.dumps(table))  # compact, unsorted: not the library's format
    (keydir / "bob.test.pubkey.pem").write_bytes(keys.public_key_pem(rsa_key("bob")))
    return keydir, peers


def files_of(keydir: Path, peers: Path) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in sorted(keydir.iterdir())}
    out["peers.json"] = peers.read_bytes()
    return out


@pytest.mark.parametrize("pkcs1", [False, True], ids=["spki", "pkcs1-pem-in-record"])
def test_save_peer_and_peer_store_write_identical_files(tmp_path: Path, pkcs1: bool) -> None:
    alice = rsa_key("alice").public_key()
    pem = (alice.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
           if pkcs1 else keys.public_key_pem(alice)).decode()
    rec = record(pem)

    # 1. the directory client
    d1 = folder(tmp_path, "save_peer", BOB)
    assert save_peer(rec, *d1) is True
    # 2. PeerStore.add, as `p2psc add-peer` does
    d2 = folder(tmp_path, "add", BOB)
    store = PeerStore.load(d2[1], d2[0])
    store.add(PeerAddress(rec.peer_id, rec.host, rec.port, rec.updated_at, rec.expires_at),
              rec.public_key)
    # 3. PeerStore.files_for + write_files, as the handler does after a directory lookup
    d3 = folder(tmp_path, "handler", BOB)
    store = PeerStore.load(d3[1], d3[0])
    address = PeerAddress(rec.peer_id, rec.host, rec.port, rec.updated_at, rec.expires_at)
    store.write_files(store.files_for(address, rec.public_key))

    first, second, third = files_of(*d1), files_of(*d2), files_of(*d3)
    assert first == second == third
    assert first["alice.test.pubkey.pem"] == keys.public_key_pem(alice)  # one PEM form
    table = {**BOB, "alice.test": {"peer_id": "alice.test", "host": "127.0.0.1", "port": 7001,
                                   "updated_at": 1000, "expires_at": EXPIRES}}
    assert first["peers.json"] == (json.dumps(table, indent=2, sort_keys=True) + "\n").encode()
    # and what was written reads back as it was meant
    assert PeerStore.load(d1[1], d1[0]).address("alice.test") == address


def test_save_peer_then_add_peer_then_save_peer_keep_one_format(tmp_path: Path) -> None:
    """The writers take turns on one folder; every state of the file is the canonical one."""
    keydir, peers = folder(tmp_path, "p", BOB)
    alice = rsa_key("alice").public_key()
    assert save_peer(record(keys.public_key_pem(alice).decode()), keydir, peers)
    store = PeerStore.load(peers, keydir)
    carol = PeerAddress("carol.test", "10.0.0.3", 0)
    store.add(carol, rsa_key("carol").public_key())
    assert save_peer(record(keys.public_key_pem(alice).decode(), port=7009, updated_at=1001),
                     keydir, peers)
    addresses = read_known_peers(peers)
    assert peers.read_bytes() == known_peers_json(addresses)
    assert addresses["carol.test"] == carol and addresses["alice.test"].port == 7009
    assert addresses["alice.test"].updated_at == 1001


def test_writer_refuses_what_the_reader_would_refuse(tmp_path: Path) -> None:
    keydir, peers = folder(tmp_path, "p", {})
    before = peers.read_bytes()
    for bad in (PeerAddress("carol.test", "bad host", 1), PeerAddress("carol.test", "h", 65536),
                PeerAddress("carol.test", "", 1), PeerAddress("../carol", "h", 1)):
        with pytest.raises(ConfigError):
            peer_files(keydir, peers, {}, bad, rsa_key("carol").public_key())
    assert peers.read_bytes() == before
    assert sorted(p.name for p in keydir.iterdir()) == ["bob.test.pubkey.pem"]


def test_known_peers_reader(tmp_path: Path) -> None:
    missing = tmp_path / "none.json"
    assert read_known_peers(missing, missing_ok=True) == {}
    with pytest.raises(ConfigError, match="not found"):
        read_known_peers(missing)
    for content, match in (("", "not valid JSON"), ("{broken", "not valid JSON"),
                           ("[]", "must be a JSON object"),
                           ('{"x": {"peer_id": "y", "host": "h", "port": 1}}', "has peer_id")):
        missing.write_text(content)
        with pytest.raises(ConfigError, match=match):
            read_known_peers(missing)


def test_init_writes_the_empty_known_peers_file_through_the_writer(tmp_path: Path) -> None:
    wd = tmp_path / "me"
    assert p2psc_main(["init", str(wd), "--peer-id", "me.test", "--bits", "2048"]) == 0
    assert (wd / "data" / "peers.json").read_bytes() == known_peers_json({}) == b"{}\n"
    write_peer_files([(tmp_path / "t.json", known_peers_json({}))])
    assert (tmp_path / "t.json").read_bytes() == b"{}\n"
