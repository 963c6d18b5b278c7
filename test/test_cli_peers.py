"""Peer management in the ``p2psc`` command (issue 14), run as subprocesses: add-peer checks
with the reader's rules, remove-peer, a bad entry of peers.json that does not lock the user
out, init --directory-url / --center-key / --import-key, and ``directory lookup`` /
``update-address`` with a peer folder (against a real directory server)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import env_without_password, free_port

from p2psc import keys


def p2psc(*args: str, input: bytes | None = None, timeout: float = 30,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "p2psc", *args], check=False, input=input,
                          capture_output=True, timeout=timeout,
                          env={**env_without_password(), **(env or {})})


def one_line(proc: subprocess.CompletedProcess[bytes], code: int) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("p2psc"), err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two RSA keys (2048 bits, for speed): their PEM private and public files."""
    root = tmp_path_factory.mktemp("keys")
    out: dict[str, Path] = {}
    for name in ("k1", "k2"):
        key = keys.generate_private_key(2048)
        keys.write_private_key(root / f"{name}.pem", key)
        (root / f"{name}.pub").write_bytes(keys.public_key_pem(key))
        out[name] = root / f"{name}.pem"
        out[name + "pub"] = root / f"{name}.pub"
    return out


@pytest.fixture
def folder(tmp_path: Path, keyfiles: dict[str, Path]) -> Path:
    """A peer folder (its key imported: no key generation) that knows w.example."""
    a = tmp_path / "a"
    r = p2psc("init", str(a), "--peer-id", "a.example", "--import-key", str(keyfiles["k1"]))
    assert r.returncode == 0, r.stderr
    r = p2psc("add-peer", "w.example", "--workdir", str(a), "--pubkey", str(keyfiles["k2pub"]),
              "--host", "127.0.0.1", "--port", "7001")
    assert r.returncode == 0, r.stderr
    return a


# -- add-peer checks, remove-peer, bad entries ---------------------------------------------

@pytest.mark.parametrize(("option", "value", "what"), [
    ("--host", "", "--host must be"), ("--host", "bad host!", "--host has characters"),
    ("--port", "0", "--port must be a whole number from 1")])
def test_add_peer_refuses_what_the_reader_would_refuse(folder: Path, keyfiles: dict[str, Path],
                                                        option: str, value: str,
                                                        what: str) -> None:
    before = (folder / "data" / "peers.json").read_bytes()
    args = {"--host": "127.0.0.1", "--port": "7002", option: value}
    r = p2psc("add-peer", "x.example", "--workdir", str(folder), "--pubkey",
              str(keyfiles["k2pub"]), "--host", args["--host"], "--port", args["--port"])
    assert what in one_line(r, 2)
    assert (folder / "data" / "peers.json").read_bytes() == before
    assert not (folder / "data" / "pubkeys" / "x.example.pubkey.pem").exists()
    assert p2psc("peers", "--workdir", str(folder)).returncode == 0


def test_add_peer_refuses_a_bad_id_with_exit_2(folder: Path, keyfiles: dict[str, Path]) -> None:
    r = p2psc("add-peer", "bad id!", "--workdir", str(folder), "--pubkey",
              str(keyfiles["k2pub"]), "--host", "h", "--port", "1")
    one_line(r, 2)


def test_remove_peer(folder: Path) -> None:
    key_file = folder / "data" / "pubkeys" / "w.example.pubkey.pem"
    assert key_file.exists()
    r = p2psc("remove-peer", "w.example", "--workdir", str(folder))
    assert r.returncode == 0 and b"removed w.example" in r.stdout, r.stderr
    assert json.loads((folder / "data" / "peers.json").read_text()) == {}
    assert not key_file.exists()
    assert p2psc("peers", "--workdir", str(folder)).stdout == b""
    err = one_line(p2psc("remove-peer", "w.example", "--workdir", str(folder)), 1)
    assert "unknown peer 'w.example'" in err and "peers.json" in err


def _break_entry(folder: Path) -> Path:
    """Make w.example's entry in peers.json invalid (empty host), as an old add-peer did."""
    peers = folder / "data" / "peers.json"
    table = json.loads(peers.read_text())
    table["w.example"]["host"] = ""
    peers.write_text(json.dumps(table))
    return peers


def test_a_bad_entry_is_named_and_does_not_lock_the_user_out(folder: Path,
                                                             keyfiles: dict[str, Path]) -> None:
    w = str(folder)
    assert p2psc("add-peer", "v.example", "--workdir", w, "--pubkey", str(keyfiles["k2pub"]),
                 "--host", "localhost", "--port", "7003").returncode == 0
    peers = _break_entry(folder)
    # peers: lists the good entries, names the bad one and the file, says how to repair it
    r = p2psc("peers", "--workdir", w)
    err = one_line(r, 1)
    assert r.stdout.decode().split("\t")[:2] == ["v.example", "localhost:7003"]
    assert "'w.example'" in err and str(peers) in err and "host must be" in err
    assert "remove-peer w.example" in err and "add-peer --replace w.example" in err
    # a command that needs the whole folder refuses with the same pointers
    err = one_line(p2psc("send", "v.example", "--workdir", w, input=b"x", timeout=60), 1)
    assert "w.example" in err and "remove-peer w.example" in err
    # adding another peer keeps the bad entry (not silently dropped)
    assert p2psc("add-peer", "u.example", "--workdir", w, "--pubkey", str(keyfiles["k2pub"]),
                 "--host", "localhost", "--port", "7004").returncode == 0
    assert json.loads(peers.read_text())["w.example"]["host"] == ""
    # add-peer --replace repairs it
    r = p2psc("add-peer", "w.example", "--replace", "--workdir", w, "--pubkey",
              str(keyfiles["k2pub"]), "--host", "127.0.0.1", "--port", "7001")
    assert r.returncode == 0, r.stderr
    r = p2psc("peers", "--workdir", w)
    assert r.returncode == 0 and r.stderr == b""
    assert [ln.split("\t")[0] for ln in r.stdout.decode().splitlines()] == [
        "u.example", "v.example", "w.example"]
    # and so does remove-peer
    _break_entry(folder)
    assert p2psc("remove-peer", "w.example", "--workdir", w).returncode == 0
    r = p2psc("peers", "--workdir", w)
    assert r.returncode == 0 and b"w.example" not in r.stdout + r.stderr
    assert sorted(json.loads(peers.read_text())) == ["u.example", "v.example"]


def test_remove_peer_of_an_entry_with_an_invalid_id(folder: Path) -> None:
    peers = folder / "data" / "peers.json"
    table = json.loads(peers.read_text())
    table["bad id!"] = {"host": "h", "port": 1}
    peers.write_text(json.dumps(table))
    err = one_line(p2psc("peers", "--workdir", str(folder)), 1)
    assert "'bad id!'" in err and str(peers) in err
    assert p2psc("remove-peer", "bad id!", "--workdir", str(folder)).returncode == 0
    assert sorted(json.loads(peers.read_text())) == ["w.example"]


# -- init: --import-key, public_key.pem, --directory-url, --center-key ----------------------

def test_init_imports_a_key_and_writes_the_public_key(tmp_path: Path,
                                                      keyfiles: dict[str, Path]) -> None:
    a = tmp_path / "a"
    r = p2psc("init", str(a), "--peer-id", "a.example", "--import-key", str(keyfiles["k1"]))
    assert r.returncode == 0, r.stderr
    k1 = keys.load_private_key(keyfiles["k1"])
    assert keys.fingerprint(k1) in r.stdout.decode()
    assert keys.same_public_key(keys.load_private_key(a / "data" / "private_key.pem")
                                .public_key(), k1.public_key())
    assert (a / "data" / "public_key.pem").read_bytes() == keys.public_key_pem(k1)
    assert p2psc("pubkey", "--workdir", str(a)).stdout == keys.public_key_pem(k1)
    # a generated key gets its public_key.pem too
    b = tmp_path / "b"
    assert p2psc("init", str(b), "--peer-id", "b.example", "--bits", "2048").returncode == 0
    assert (b / "data" / "public_key.pem").read_bytes() == p2psc("pubkey", "--workdir",
                                                                  str(b)).stdout
    # a public_key.pem that does not match the (unencrypted) private key is refused
    (b / "data" / "public_key.pem").write_bytes(keys.public_key_pem(k1))
    assert "does not match" in one_line(p2psc("pubkey", "--workdir", str(b)), 1)


def test_init_imports_an_encrypted_key_and_pubkey_needs_no_passphrase(
        tmp_path: Path, keyfiles: dict[str, Path]) -> None:
    k1 = keys.load_private_key(keyfiles["k1"])
    enc = tmp_path / "enc.pem"
    enc.write_bytes(keys.private_key_pem(k1, b"s3cret"))
    enc.chmod(0o600)
    a = tmp_path / "a"
    err = one_line(p2psc("init", str(a), "--peer-id", "a.example", "--import-key", str(enc)), 1)
    assert "encrypted" in err and "P2PSC_PRIKEY_PASSWORD" in err
    assert not (a / "conf").exists()
    r = p2psc("init", str(a), "--peer-id", "a.example", "--import-key", str(enc),
              env={"P2PSC_PRIKEY_PASSWORD": "wrong"})
    assert "cannot decrypt" in one_line(r, 1)
    r = p2psc("init", str(a), "--peer-id", "a.example", "--import-key", str(enc),
              env={"P2PSC_PRIKEY_PASSWORD": "s3cret"})
    assert r.returncode == 0, r.stderr
    assert b"ENCRYPTED" in (a / "data" / "private_key.pem").read_bytes()  # still encrypted
    # no passphrase needed (none in the environment, no terminal)
    r = p2psc("pubkey", "--workdir", str(a))
    assert r.returncode == 0 and r.stdout == keys.public_key_pem(k1), r.stderr


@pytest.mark.parametrize("content", [b"not a key\n", b""])
def test_init_refuses_a_bad_import_key(tmp_path: Path, keyfiles: dict[str, Path],
                                       content: bytes) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    bad.chmod(0o600)  # (else a warning about its mode comes first)
    a = tmp_path / "a"
    one_line(p2psc("init", str(a), "--peer-id", "a.example", "--import-key", str(bad)), 1)
    one_line(p2psc("init", str(a), "--peer-id", "a.example", "--import-key",
                   str(tmp_path / "missing.pem")), 1)
    # a public key is not a private key; the peer id rule still applies
    one_line(p2psc("init", str(a), "--peer-id", "a.example", "--import-key",
                   str(keyfiles["k1pub"])), 1)
    assert p2psc("init", str(a), "--peer-id", "bad id!", "--import-key",
                 str(keyfiles["k1"])).returncode != 0
    assert not (a / "data" / "private_key.pem").exists()


def test_init_directory_options_usage_errors(tmp_path: Path, keyfiles: dict[str, Path]) -> None:
    a = str(tmp_path / "a")
    one_line(p2psc("init", a, "--peer-id", "a.example", "--directory-url", "ftp://x/"), 2)
    one_line(p2psc("init", a, "--peer-id", "a.example", "--center-key",
                   str(keyfiles["k2pub"])), 2)
    one_line(p2psc("init", a, "--peer-id", "a.example", "--directory-url", "http://h/",
                   "--center-key", str(tmp_path / "missing.pem")), 1)
    assert not Path(a).exists() or not (Path(a) / "conf" / "config.json").exists()


# -- a real directory: init --directory-url --center-key, lookup/update-address --workdir ---

@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A directory server (subprocess) with its center key: (lookup URL, center workdir)."""
    center = tmp_path_factory.mktemp("center")
    r = p2psc("directory", "init-center", "--workdir", str(center), "--bits", "2048")
    assert r.returncode == 0, r.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "p2psc", "directory", "serve", "--workdir",
                             str(center), "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env_without_password())
    try:
        import urllib.request
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("the directory server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/api/get_peer_info", center
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_init_joins_a_directory_and_lookup_update_take_the_folder(
        tmp_path: Path, keyfiles: dict[str, Path], directory: tuple[str, Path]) -> None:
    url, center = directory
    center_pub = center / "data" / "p2psc_center.pubkey.pem"
    a = tmp_path / "a"
    r = p2psc("init", str(a), "--peer-id", "alice.example", "--import-key", str(keyfiles["k1"]),
              "--port", "7001", "--directory-url", url, "--center-key", str(center_pub))
    assert r.returncode == 0, r.stderr
    assert keys.fingerprint(keys.load_public_key(center_pub)) in r.stdout.decode()
    conf = json.loads((a / "conf" / "config.json").read_text())
    assert conf["find_peer_info_url"] == url
    # where the handler's directory client finds the center key
    assert (a / "data" / "pubkeys" / "p2psc_center.pubkey.pem").read_bytes() == \
        center_pub.read_bytes()
    # the folder still loads as a whole (the handler's own checks, and its directory client)
    from p2psc.config import load_peer_config, read_config_file
    from p2psc.directory.client import directory_lookup_for
    cfg = load_peer_config(read_config_file(a))
    assert cfg.find_peer_info_url == url
    assert keys.same_public_key(directory_lookup_for(cfg).center_public_key,
                                keys.load_public_key(center_pub))
    # register alice, then look her up with the folder only
    r = p2psc("directory", "add", "alice.example", "--pubkey", str(keyfiles["k1pub"]),
              "--host", "127.0.0.1", "--port", "7001", "--workdir", str(center))
    assert r.returncode == 0, r.stderr
    r = p2psc("directory", "lookup", "alice.example", "--workdir", str(a))
    assert r.returncode == 0, r.stderr
    assert "127.0.0.1:7001" in r.stdout.decode() and "signature verified" in r.stdout.decode()
    # update-address with the folder: id, URL and key from it; explicit flags override
    r = p2psc("directory", "update-address", "--workdir", str(a), "--port", "7005")
    assert r.returncode == 0, r.stderr
    assert "alice.example now at 127.0.0.1:7005" in r.stdout.decode()
    r = p2psc("directory", "lookup", "alice.example", "--workdir", str(a))
    assert "127.0.0.1:7005" in r.stdout.decode(), r.stderr
    # --url overrides the folder's (a wrong one fails), --center-key overrides its key
    r = p2psc("directory", "lookup", "alice.example", "--workdir", str(a), "--center-key",
              str(keyfiles["k2pub"]))
    one_line(r, 1)
    r = p2psc("directory", "lookup", "alice.example", "--workdir", str(a), "--url",
              url.replace("get_peer_info", "nothing-here"))
    one_line(r, 1)


def test_directory_lookup_without_folder_or_url(tmp_path: Path,
                                                keyfiles: dict[str, Path]) -> None:
    err = one_line(p2psc("directory", "lookup", "x"), 2)
    assert "--url" in err and "--workdir" in err
    err = one_line(p2psc("directory", "update-address"), 2)
    assert "--workdir" in err
    # a folder without a directory URL: says how to set one
    a = tmp_path / "a"
    assert p2psc("init", str(a), "--peer-id", "a.example", "--import-key",
                 str(keyfiles["k1"])).returncode == 0
    err = one_line(p2psc("directory", "lookup", "x", "--workdir", str(a)), 1)
    assert "find_peer_info_url" in err and "--directory-url" in err
    one_line(p2psc("directory", "lookup", "x", "--workdir", str(tmp_path / "none")), 1)
