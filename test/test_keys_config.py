"""Keys (p2psc.keys) and config loading (p2psc.config): every mistake is a ConfigError naming
the file, at start-up."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import make_peer, rsa_key
from p2psc import keys
from p2psc.config import Settings, load_peer_config, read_config_file, substitute
from p2psc.p2pexcept import ConfigError, SignCheckError
from p2psc.p2phandler import P2PHandler
from p2psc._proto.replay import InitReplayCache


def test_sign_verify_encrypt_decrypt_roundtrip() -> None:
    k = rsa_key("a")
    sig = keys.sign(k, b"message")
    keys.verify(k.public_key(), sig, b"message")
    with pytest.raises(SignCheckError):
        keys.verify(k.public_key(), sig, b"messagE")
    ct = keys.encrypt(k.public_key(), b"secret")
    assert keys.decrypt(k, ct) == b"secret"
    assert keys.decrypt(k, ct[:-1] + bytes([ct[-1] ^ 1])) is None
    assert keys.decrypt(rsa_key("b"), ct) is None


def test_private_key_file_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    keys.write_private_key(path, rsa_key("a"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(ConfigError, match="already exists"):
        keys.write_private_key(path, rsa_key("b"))
    assert keys.same_public_key(keys.load_private_key(path).public_key(), rsa_key("a").public_key())


def test_encrypted_private_key_needs_the_right_password(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    keys.write_private_key(path, rsa_key("a"), b"s3cret")
    assert keys.load_private_key(path, b"s3cret").key_size == 2048
    with pytest.raises(ConfigError, match="encrypted"):
        keys.load_private_key(path)
    with pytest.raises(ConfigError, match="wrong password"):
        keys.load_private_key(path, b"nope")


def test_group_readable_private_key_warns(tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "k.pem"
    keys.write_private_key(path, rsa_key("a"))
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="p2psc.keys"):
        keys.load_private_key(path)
    assert "chmod 600" in caplog.text


def test_small_and_non_rsa_keys_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    small = rsa.generate_private_key(65537, 1024)
    (tmp_path / "small.pem").write_bytes(keys.public_key_pem(small))
    with pytest.raises(ConfigError, match="1024 bits"):
        keys.load_public_key(tmp_path / "small.pem")
    ecpub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="not an RSA public key"):
        keys.parse_public_key(ecpub)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        keys.parse_public_key(b"garbage")


def test_fingerprint_is_short_and_stable() -> None:
    fp = keys.fingerprint(rsa_key("a"))
    assert fp == keys.fingerprint(rsa_key("a").public_key())
    assert fp.startswith("SHA256:") and len(fp.split()) == 8
    assert fp != keys.fingerprint(rsa_key("b"))


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 129, "sp ace", "é"])
def test_invalid_peer_ids(bad: str) -> None:
    with pytest.raises(ConfigError):
        keys.validate_peer_id(bad)


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text("old")
    keys.atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_substitution_of_variables() -> None:
    ns = {"workdir": "/w", "home": "/h", "ProgramPath": "/p"}
    assert substitute({"a": "$[workdir]$/x", "b": ["$[home]$"], "c": 3}, ns, "f") == \
        {"a": "/w/x", "b": ["/h"], "c": 3}
    with pytest.raises(ConfigError, match=r"unknown variable \$\[nope\]\$"):
        substitute("$[nope]$", ns, "f")


def test_read_config_file_substitutes_workdir(tmp_path: Path) -> None:
    peer = make_peer(tmp_path, "a.test")
    conf = read_config_file(peer.workdir)
    assert conf["my_prikey_file"] == str(peer.workdir / "data" / "private_key.pem")
    cfg = load_peer_config(conf)
    assert (cfg.peer_id, cfg.host, cfg.port) == ("a.test", "127.0.0.1", 0)


def _expect(tmp_path: Path, mutate: Any, match: str) -> None:
    peer = make_peer(tmp_path, "a.test")
    mutate(peer)
    with pytest.raises(ConfigError, match=match):
        P2PHandler(workdir=peer.workdir)


def test_config_mistakes_are_clear_errors(tmp_path: Path) -> None:
    cases = [
        (lambda p: (p.workdir / "conf" / "config.json").unlink(), r"config\.json: config file not found"),
        (lambda p: (p.workdir / "conf" / "config.json").write_text("{oops"), "not valid JSON"),
        (lambda p: (p.workdir / "data" / "private_key.pem").unlink(), r"private_key\.pem: private key file not found"),
        (lambda p: (p.workdir / "data" / "private_key.pem").write_text("junk"), "not a PEM private key"),
        (lambda p: (p.workdir / "data" / "peers.json").write_text("[1]"), r"peers\.json: must be a JSON object"),
        (lambda p: (p.workdir / "data" / "peers.json").write_text(json.dumps(
            {"b.test": {"peer_id": "b.test", "host": "h", "port": 1}})), "b.test has no public key file"),
        (lambda p: (p.workdir / "data" / "config.json").write_text('{"peer_id": "a.test", "host": "h", "port": 70000}'),
         "port must be"),
        (lambda p: p.update_conf(max_message_size="big"), "max_message_size must be a number"),
        (lambda p: p.update_conf(cipher_suite="rot13"), "unknown cipher_suite"),
        (lambda p: p.update_conf(cipher_suite="rc4-hmac-sha256"), "needs enable_rc4"),
        (lambda p: p.update_conf(find_peer_info_url="ftp://x"), "find_peer_info_url"),
        (lambda p: p.update_conf(xconfig=None), "missing or empty 'xconfig'"),
    ]
    for n, (mutate, match) in enumerate(cases):
        _expect(tmp_path / str(n), mutate, match)


def test_password_from_config_or_environment(tmp_path: Path, monkeypatch: Any) -> None:
    peer = make_peer(tmp_path, "a.test")
    path = peer.workdir / "data" / "private_key.pem"
    path.unlink()
    keys.write_private_key(path, peer.key, b"pw")
    monkeypatch.delenv("P2PSC_PRIKEY_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="P2PSC_PRIKEY_PASSWORD"):
        P2PHandler(workdir=peer.workdir)
    monkeypatch.setenv("P2PSC_PRIKEY_PASSWORD", "pw")
    assert P2PHandler(workdir=peer.workdir).get_myid() == "a.test"
    monkeypatch.delenv("P2PSC_PRIKEY_PASSWORD")
    peer.update_conf(my_prikey_password="pw")
    assert P2PHandler(workdir=peer.workdir).get_myid() == "a.test"


def test_handler_from_appublic_singleton(tmp_path: Path, monkeypatch: Any) -> None:
    """The README's setup: the application calls appPublic's getConfig(cwd), then
    P2PHandler() with no argument reads ./conf/config.json itself (test_config_eval.py)."""
    import appPublic.jsonConfig as jc
    peer = make_peer(tmp_path, "a.test")
    monkeypatch.chdir(peer.workdir)
    # a fresh singleton for this test (appPublic keeps one per process)
    monkeypatch.setattr(jc, "JsonConfig", jc.SingletonDecorator(jc.JsonObject))
    jc.getConfig(str(peer.workdir))
    handler = P2PHandler()
    assert handler.get_myid() == "a.test"
    assert handler.config.peers.peer_pubkey_path == peer.workdir / "data" / "pubkeys"


def test_settings_defaults_are_sane() -> None:
    s = Settings()
    assert s.cipher_suite in ("aes-256-gcm", "chacha20-poly1305")
    assert s.max_message_size == 16 * 1024 * 1024 and s.handshake_timeout == 10.0
    assert s.timestamp_window == 120.0 and s.rekey_after_time == 600.0


def test_init_replay_cache_floor_never_passes_a_cached_timestamp() -> None:
    """Review finding: with insertion-order eviction one INIT dated ahead (allowed up to
    +window) became the floor when evicted and blocked every INIT for up to the window."""
    c = InitReplayCache(max_entries=3, window=120)
    now = 1000.0
    assert c.check_and_add(b"fast clock", now + 110, now)
    for k in (b"a", b"b", b"c"):
        assert c.check_and_add(k, now, now)
    assert c.check_and_add(b"fresh", now + 1, now)  # the floor is `now`, not now + 110
    assert not c.check_and_add(b"a", now, now)


def test_init_replay_cache_expiry_and_bounded_size() -> None:
    c = InitReplayCache(max_entries=3, window=10)
    assert c.check_and_add(b"a", 100, 100)
    assert not c.check_and_add(b"a", 100, 105)
    assert c.check_and_add(b"b", 101, 105)
    assert c.check_and_add(b"c", 102, 105)
    assert c.check_and_add(b"d", 103, 105)  # evicts "a": its timestamp becomes the floor
    assert len(c) == 3
    assert not c.check_and_add(b"a", 100, 106)   # evicted, but still refused
    assert not c.check_and_add(b"e", 99, 106)    # at or below the floor
    assert c.check_and_add(b"x", 200, 200)        # old entries expired
    assert len(c) == 1
