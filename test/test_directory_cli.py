"""``p2psc directory ...`` commands, through the standalone main(argv) and a served directory."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from p2psc import keys
from p2psc.directory import fetch_peer_record
from p2psc.directory.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory workdir with a center key (2048 bits, for speed) and alice's key files."""
    w = tmp_path_factory.mktemp("dirw")
    assert main(["directory", "init-center", "--workdir", str(w), "--bits", "2048"]) == 0
    alice = keys.generate_private_key(2048)
    keys.write_private_key(w / "alice.pem", alice)
    (w / "alice.pub").write_bytes(keys.public_key_pem(alice))
    return w


def cli(*args: str) -> int:
    return main(["directory", *args])


def test_init_center(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = workdir / "data" / "center_private_key.pem"
    pub = workdir / "data" / "p2psc_center.pubkey.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert keys.same_public_key(keys.load_public_key(pub), keys.load_private_key(key).public_key())
    # never overwrites an existing center key
    before = key.read_bytes()
    assert cli("init-center", "--workdir", str(workdir), "--bits", "2048") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
    assert key.read_bytes() == before


def test_add_list_remove(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = str(workdir)
    assert cli("add", "alice", "--pubkey", str(workdir / "alice.pub"), "--host", "127.0.0.1",
               "--port", "7001", "--workdir", w) == 0
    assert cli("add", "bob", "--pubkey", str(workdir / "alice.pub"), "--host", "localhost",
               "--port", "7002", "--workdir", w) == 0
    capsys.readouterr()
    assert cli("list", "--workdir", w) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["alice", "127.0.0.1:7001"],
                                                        ["bob", "localhost:7002"]]
    assert cli("remove", "bob", "--workdir", w) == 0
    assert cli("remove", "bob", "--workdir", w) == 1
    capsys.readouterr()
    assert cli("list", "--workdir", w) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert (workdir / "data" / "directory.sqlite3").exists()


def test_errors_are_one_line_and_exit_codes(workdir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    w = str(workdir)
    capsys.readouterr()
    for args in (["add", "x/y", "--pubkey", str(workdir / "alice.pub"), "--host", "h",
                  "--port", "1", "--workdir", w],
                 ["add", "x", "--pubkey", str(tmp_path / "missing.pem"), "--host", "h",
                  "--port", "1", "--workdir", w],
                 ["add", "x", "--pubkey", str(workdir / "alice.pub"), "--host", "bad host",
                  "--port", "1", "--workdir", w],
                 ["list", "--workdir", str(tmp_path / "nowhere")],
                 ["serve", "--workdir", str(tmp_path)]):  # no center key there
        assert cli(*args) == 1, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("p2psc directory: "), err
        assert "Traceback" not in err
    assert cli("add", "x", "--port", "99999") == 2
    for ttl in ("59", str(7 * 86400 + 1), "1h"):
        assert cli("serve", "--workdir", w, "--record-ttl", ttl) == 2
        assert "--record-ttl" in capsys.readouterr().err
    assert cli() == 2
    assert main(["directory", "list", "--help"]) == 0


def test_serve_lookup_and_update_commands(workdir: Path, tmp_path: Path) -> None:
    w = str(workdir)
    assert cli("add", "alice", "--pubkey", str(workdir / "alice.pub"), "--host", "127.0.0.1",
               "--port", "7001", "--workdir", w) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2psc.directory.cli", "directory", "serve", "--workdir", w,
         "--port", "0", "--record-ttl", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        line = _readline(proc, 15.0)
        assert line.startswith("p2psc directory: http://127.0.0.1:"), line
        base = line.split()[2].rstrip("/")
        center_pub = workdir / "data" / "p2psc_center.pubkey.pem"
        url = base + "/api/get_peer_info"
        rec = asyncio.run(asyncio.wait_for(fetch_peer_record(
            url, "alice", keys.load_public_key(center_pub)), 10))
        assert rec.port == 7001
        assert abs(rec.expires_at - (time.time() + 600)) < 30  # --record-ttl
        run = [sys.executable, "-m", "p2psc.directory.cli", "directory"]
        out = subprocess.run(run + ["update-address", "alice", "--url", url, "--prikey",
                                    str(workdir / "alice.pem"), "--host", "127.0.0.1",
                                    "--port", "7009"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        out = subprocess.run(run + ["lookup", "alice", "--url", url, "--center-key",
                                    str(center_pub)], capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0 and "127.0.0.1:7009" in out.stdout, out.stderr
        assert "signature verified" in out.stdout and "valid until" in out.stdout
        out = subprocess.run(run + ["lookup", "ghost", "--url", url, "--center-key",
                                    str(center_pub)], capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 1 and "does not know" in out.stderr
        proc.terminate()  # SIGTERM: a clean shutdown, exit code 0
        assert proc.wait(timeout=15) == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


def _readline(proc: subprocess.Popen[Any], timeout: float) -> str:
    """First stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    import selectors
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                return proc.stdout.readline()
            if proc.poll() is not None:
                break
    finally:
        sel.close()
    raise AssertionError(f"directory server did not start (exit {proc.poll()})")
