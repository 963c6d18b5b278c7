"""Peer ids are file names (``<peer_id>.pubkey.pem``) on every platform: Windows device names
are refused everywhere an id is checked (config, directory, handshake parser), and two ids
that differ only in case (one file on macOS and Windows) are never both held."""

from __future__ import annotations

import time

import json
from pathlib import Path

import pytest
from conftest import make_peer, rsa_key

from p2psc import keys
from p2psc._proto.handshake import InitiatorHandshake, ResponderHandshake
from p2psc._proto.replay import InitReplayCache
from p2psc._proto.suites import SUITES_BY_NAME
from p2psc.config import PeerAddress, PeerStore, case_twin, read_known_peers, read_public_key
from p2psc.directory import save_peer
from p2psc.directory.record import sign_record, verify_record
from p2psc.p2pexcept import ConfigError, DirectoryError, ProtocolError
from p2psc.p2phandler import P2PHandler
from p2psc.validators import check_peer_id

DEVICE_IDS = ["con", "CON", "Nul", "aux", "prn", "com1", "COM9", "lpt0", "LPT9", "com0",
              "con.example", "NUL.test", "aux.a.b", "Com3.x"]
FINE_IDS = ["console", "con_x", "con-1", "com10", "lpt", "a.con", "x.nul", "auxiliary.test",
            "test1.com", "Alice", "Bob.Example", "_con"]


@pytest.mark.parametrize("peer_id", DEVICE_IDS)
def test_windows_device_names_are_refused(peer_id: str) -> None:
    with pytest.raises(ConfigError, match="Windows device name"):
        keys.validate_peer_id(peer_id)
    with pytest.raises(DirectoryError, match="invalid peer id"):
        check_peer_id(peer_id, error=DirectoryError)


@pytest.mark.parametrize("peer_id", FINE_IDS)
def test_ids_that_only_look_like_device_names_are_fine(peer_id: str) -> None:
    assert keys.validate_peer_id(peer_id) == peer_id


def test_a_device_name_id_in_a_handshake_is_refused_on_the_wire() -> None:
    """The handshake parser uses the same rule: an INIT from ``con.example`` (signed, well
    formed otherwise) is refused as malformed before any key lookup."""
    i_key, r_key = rsa_key("i"), rsa_key("r")
    init = InitiatorHandshake("con.example", i_key, "r.test", r_key.public_key(),
                              SUITES_BY_NAME["aes-256-gcm"]).build_init(1_800_000_000.0)
    responder = ResponderHandshake("r.test", r_key, replay_cache=InitReplayCache())
    with pytest.raises(ProtocolError, match="invalid peer id"):
        responder.parse(init)


def test_a_device_name_in_the_config_is_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "a.test")
    other = make_peer(tmp_path, "b.test")
    (peer.workdir / "data" / "peers.json").write_text(json.dumps(
        {"NUL": {"peer_id": "NUL", "host": "127.0.0.1", "port": 1}}))
    (peer.pubkeys / "NUL.pubkey.pem").write_bytes(keys.public_key_pem(other.key))
    with pytest.raises(ConfigError, match="Windows device name"):
        P2PHandler(workdir=peer.workdir)


# -- ids that differ only in case ----------------------------------------------------------------

def test_case_twin() -> None:
    assert case_twin("alice", ["Alice", "bob"]) == "Alice"
    assert case_twin("alice", ["alice", "bob"]) is None
    assert case_twin("ALICE.test", ["x", "alice.TEST"]) == "alice.TEST"


def test_known_peers_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "a.test")
    other = make_peer(tmp_path, "b.test")
    table = {pid: {"peer_id": pid, "host": "127.0.0.1", "port": 1} for pid in ("Bob", "bob")}
    (peer.workdir / "data" / "peers.json").write_text(json.dumps(table))
    for pid in ("Bob", "bob"):  # (on macOS or Windows these two writes make one file)
        (peer.pubkeys / f"{pid}.pubkey.pem").write_bytes(keys.public_key_pem(other.key))
    with pytest.raises(ConfigError, match="differs only in case"):
        P2PHandler(workdir=peer.workdir)
    with pytest.raises(ConfigError, match="differs only in case"):
        read_known_peers(peer.workdir / "data" / "peers.json")


def test_key_files_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "a.test")
    other = make_peer(tmp_path, "b.test")
    peer.know(other)
    (peer.pubkeys / "B.test.pubkey.pem").write_bytes(keys.public_key_pem(rsa_key("mallory")))
    with pytest.raises(ConfigError, match="differs only in case"):
        P2PHandler(workdir=peer.workdir)


def test_adding_a_peer_that_differs_only_in_case_is_refused(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "a.test")
    other = make_peer(tmp_path, "alice.test")
    peer.know(other)
    store = PeerStore.load(peer.workdir / "data" / "peers.json", peer.pubkeys)
    before = sorted(p.name for p in peer.pubkeys.iterdir())
    mallory = rsa_key("mallory").public_key()
    for pid in ("Alice.test", "ALICE.TEST"):
        with pytest.raises(ConfigError, match="differs only in case"):
            store.add(PeerAddress(pid, "127.0.0.1", 9), mallory)
        with pytest.raises(ConfigError, match="differs only in case"):
            store.files_for(PeerAddress(pid, "127.0.0.1", 9), mallory)
    assert sorted(p.name for p in peer.pubkeys.iterdir()) == before
    assert store.public_key("alice.test") is not None and store.public_key("Alice.test") is None
    # a key file with no known-peers entry (as the center's) counts too
    (peer.pubkeys / "carol.pubkey.pem").write_bytes(keys.public_key_pem(rsa_key("carol")))
    store = PeerStore.load(peer.workdir / "data" / "peers.json", peer.pubkeys)
    with pytest.raises(ConfigError, match="differs only in case"):
        store.add(PeerAddress("Carol", "127.0.0.1", 9), mallory)


def test_read_public_key_needs_the_exact_case(tmp_path: Path) -> None:
    """On macOS and Windows, opening ``alice.pubkey.pem`` would open ``Alice.pubkey.pem``;
    read_public_key lists the folder instead, so every platform behaves alike."""
    folder = tmp_path / "pubkeys"
    folder.mkdir()
    key = rsa_key("alice").public_key()
    (folder / "Alice.pubkey.pem").write_bytes(keys.public_key_pem(key))
    assert keys.same_public_key(read_public_key(folder, "Alice"), key)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="differs only in case"):
        read_public_key(folder, "alice")
    assert read_public_key(folder, "bob") is None
    assert read_public_key(tmp_path / "missing", "bob") is None


def test_the_directory_cannot_store_a_case_twin(tmp_path: Path) -> None:
    """A directory record for ``Alice.test`` (registered by someone else) when
    ``alice.test`` is on file: refused, nothing written (on macOS it would have replaced
    alice's key file)."""
    peer = make_peer(tmp_path, "a.test")
    alice = make_peer(tmp_path, "alice.test")
    peer.know(alice)
    center = rsa_key("center")
    now = int(time.time())
    record = verify_record(center.public_key(), sign_record(center, {
        "peer_id": "Alice.test", "host": "127.0.0.1", "port": 4000, "updated_at": 5,
        "expires_at": now + 3600, "nonce": "ab" * 16,
        "pubkey": keys.public_key_pem(rsa_key("mallory")).decode("ascii")}), "Alice.test",
        nonce="ab" * 16, now=now)
    files = sorted(p.name for p in peer.pubkeys.iterdir())
    peers_json = (peer.workdir / "data" / "peers.json").read_text()
    with pytest.raises(ConfigError, match="differs only in case"):
        save_peer(record, peer.pubkeys, peer.workdir / "data" / "peers.json")
    assert sorted(p.name for p in peer.pubkeys.iterdir()) == files
    assert (peer.workdir / "data" / "peers.json").read_text() == peers_json


def test_ids_with_capitals_keep_working(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "Alice.Example")
    other = make_peer(tmp_path, "Bob.Example")
    peer.know(other)
    handler = P2PHandler(workdir=peer.workdir)
    assert handler.get_myid() == "Alice.Example"
    assert handler.config.peers.public_key("Bob.Example") is not None
