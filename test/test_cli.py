"""The ``p2psc`` command (issue 5), run as subprocesses: init, pubkey, fingerprint, add-peer,
peers, listen + send (a 5 MiB file byte-exact, stdin pipes, echo), ping over TCP and UDP,
usage errors (exit 2) and failures (exit 1, one line, no traceback)."""

from __future__ import annotations

import json
import os
import queue
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import env_without_password, free_port

from p2psc import keys

SCRIPT = Path(sys.executable).with_name("p2psc")


def p2psc(*args: str, input: bytes | None = None, timeout: float = 30,
          cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m p2psc ARGS`` to completion (bounded by ``timeout``)."""
    return subprocess.run([sys.executable, "-m", "p2psc", *args], check=False, input=input,
                          capture_output=True, timeout=timeout, cwd=cwd,
                          env=env_without_password())


def one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("p2psc"), err
    assert "Traceback" not in err
    return err


class Listener:
    """``p2psc listen ...`` in the background: stdout to a file, stderr lines collected."""

    def __init__(self, *args: str, stdout_path: Path):
        self.out = open(stdout_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "p2psc", "listen", *args],
                                     stdout=self.out, stderr=subprocess.PIPE,
                                     env=env_without_password())
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.put(raw.decode(errors="replace"))

    def wait_for(self, text: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} from the listener: {self.stderr}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.stderr.append(line)
            if text in line:
                return line

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two peer folders made by ``p2psc init`` (a.test, b.test) that know each other."""
    root = tmp_path_factory.mktemp("cli")
    a, b = root / "a", root / "b"
    assert p2psc("init", str(a), "--peer-id", "a.test", "--port", str(free_port()),
                 "--bits", "2048").returncode == 0
    # init with --workdir instead of the DIR argument
    assert p2psc("init", "--workdir", str(b), "--peer-id", "b.test", "--port",
                 str(free_port()), "--bits", "2048").returncode == 0
    for me, other, other_id in ((a, b, "b.test"), (b, a, "a.test")):
        pem = p2psc("pubkey", "--workdir", str(other)).stdout
        port = json.loads((other / "data" / "config.json").read_text())["port"]
        r = p2psc("add-peer", other_id, "--pubkey", "-", "--host", "127.0.0.1", "--port",
                  str(port), "--workdir", str(me), input=pem)
        assert r.returncode == 0, r.stderr
    return a, b


@pytest.fixture
def listener(folders: tuple[Path, Path], tmp_path: Path) -> Iterator[Listener]:
    """``p2psc listen`` on a.test's own address (stdout in tmp_path/out.bin)."""
    a, _ = folders
    lst = Listener("--workdir", str(a), stdout_path=tmp_path / "out.bin")
    try:
        lst.wait_for("listening on")
        yield lst
    finally:
        lst.stop()


def test_init_creates_a_ready_folder_and_never_overwrites(folders: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    a, _ = folders
    for rel in ("conf/config.json", "data/config.json", "data/peers.json",
                "data/private_key.pem", "data/pubkeys"):
        assert (a / rel).exists(), rel
    assert stat.S_IMODE(os.stat(a / "data" / "private_key.pem").st_mode) == 0o600
    conf = json.loads((a / "conf" / "config.json").read_text())
    assert conf["my_prikey_file"] == "$[workdir]$/data/private_key.pem"
    own = json.loads((a / "data" / "config.json").read_text())
    assert own["peer_id"] == "a.test" and own["host"] == "127.0.0.1"
    key_before = (a / "data" / "private_key.pem").read_bytes()
    r = p2psc("init", str(a), "--peer-id", "a.test", "--bits", "2048")
    assert "already exists" in one_line_error(r)
    assert (a / "data" / "private_key.pem").read_bytes() == key_before
    # a bad peer id is refused before anything is written
    r = p2psc("init", str(tmp_path / "x"), "--peer-id", "../evil", "--bits", "2048")
    assert "invalid peer id" in one_line_error(r)
    assert not (tmp_path / "x").exists()


def test_pubkey_and_fingerprint(folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = folders
    key = keys.load_private_key(a / "data" / "private_key.pem")
    r = p2psc("pubkey", "--workdir", str(a))
    assert r.returncode == 0
    assert keys.same_public_key(keys.parse_public_key(r.stdout), key.public_key())
    r = p2psc("fingerprint", cwd=a)  # --workdir defaults to the current directory
    assert r.returncode == 0
    assert r.stdout.decode().split(None, 1) == ["a.test", keys.fingerprint(key) + "\n"]
    (tmp_path / "a.pem").write_bytes(keys.public_key_pem(key))
    r = p2psc("fingerprint", "--pubkey", str(tmp_path / "a.pem"))
    assert r.stdout.decode().strip() == keys.fingerprint(key)


def test_add_peer_validates_and_peers_lists(folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = folders
    r = p2psc("peers", "--workdir", str(b))
    assert r.returncode == 0
    a_key = keys.load_private_key(a / "data" / "private_key.pem")
    port = json.loads((a / "data" / "config.json").read_text())["port"]
    assert r.stdout.decode().splitlines() == [
        f"a.test\t127.0.0.1:{port}\t{keys.fingerprint(a_key)}"]
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    r = p2psc("add-peer", "c.test", "--pubkey", str(bad), "--host", "127.0.0.1", "--port",
              "1", "--workdir", str(b))
    assert "not a PEM public key" in one_line_error(r)
    # a different key for a known peer needs --replace
    other = tmp_path / "other.pem"
    other.write_bytes(keys.public_key_pem(keys.generate_private_key(2048)))
    r = p2psc("add-peer", "a.test", "--pubkey", str(other), "--host", "127.0.0.1", "--port",
              str(port), "--workdir", str(b))
    assert "--replace" in one_line_error(r)
    r = p2psc("add-peer", "c.test", "--pubkey", str(other), "--host", "localhost", "--port",
              "7000", "--workdir", str(b))
    assert r.returncode == 0 and b"added c.test" in r.stdout
    ids = [line.split("\t")[0] for line in
           p2psc("peers", "--workdir", str(b)).stdout.decode().splitlines()]
    assert ids == ["a.test", "c.test"]


def test_listen_send_5mib_byte_exact_then_ping(folders: tuple[Path, Path], tmp_path: Path,
                                               listener: Listener) -> None:
    _, b = folders
    data = os.urandom(5 * 1024 * 1024 + 12345)
    src = tmp_path / "five.bin"
    src.write_bytes(data)
    r = p2psc("send", "a.test", str(src), "--workdir", str(b), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # no progress bar when stderr is not a terminal
    # send returns once the listener acknowledged the end of the transfer (after writing it)
    assert (tmp_path / "out.bin").read_bytes() == data

    # a second transfer from a pipe (stdin) is appended
    r = p2psc("send", "a.test", "-", "--workdir", str(b), input=b"from a pipe\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == data + b"from a pipe\n"

    r = p2psc("ping", "a.test", "-c", "4", "-i", "0", "--workdir", str(b))
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "handshake" in out and out.count("bytes from a.test: seq=") == 4
    assert "4 sent, 4 received, 0% loss" in out
    assert "rtt min/avg/max/p99 = " in out
    # ping traffic is answered, not written out
    assert (tmp_path / "out.bin").read_bytes() == data + b"from a pipe\n"
    assert listener.stop() == 0  # SIGTERM ends listen cleanly


def test_echo_listener_send_recv_pipe_and_once(folders: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    a, b = folders
    lst = Listener("--workdir", str(a), "--echo", "--once", stdout_path=tmp_path / "o.bin")
    try:
        lst.wait_for("listening on")
        data = os.urandom(1024 * 1024 + 7)
        r = p2psc("send", "a.test", "--recv", "--chunk-size", "10000", "--workdir", str(b),
                  input=data, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == data
        assert lst.wait(15) == 0  # --once: exits after the first channel
    finally:
        lst.stop()


def test_udp_listen_and_ping(folders: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = folders
    lst = Listener("--workdir", str(a), "--udp", stdout_path=tmp_path / "u.bin")
    try:
        lst.wait_for("listening on")
        r = p2psc("ping", "a.test", "--udp", "-c", "3", "-i", "0", "--workdir", str(b))
        assert r.returncode == 0, r.stderr
        assert "3 sent, 3 received" in r.stdout.decode()
    finally:
        assert lst.stop() == 0


def test_send_and_ping_failures_are_one_line(folders: tuple[Path, Path], tmp_path: Path) -> None:
    _, b = folders
    r = p2psc("send", "nobody.test", "--workdir", str(b), input=b"x")
    assert "unknown peer" in one_line_error(r)
    r = p2psc("send", "a.test", str(tmp_path / "missing.bin"), "--workdir", str(b))
    assert "No such file" in one_line_error(r)
    # a.test is not listening now
    r = p2psc("ping", "a.test", "-c", "1", "--workdir", str(b))
    assert "cannot connect to a.test" in one_line_error(r)
    # with -v, the traceback is shown
    r = p2psc("ping", "a.test", "-c", "1", "--workdir", str(b), "-v")
    assert r.returncode == 1 and b"Traceback" in r.stderr


def test_missing_or_wrong_folder_exit_1_one_line(tmp_path: Path) -> None:
    r = p2psc("peers", "--workdir", str(tmp_path / "nope"))
    assert "no such folder" in one_line_error(r)
    r = p2psc("pubkey", "--workdir", str(tmp_path))
    assert "not a peer folder" in one_line_error(r)
    r = p2psc("listen", cwd=tmp_path)
    assert "not a peer folder" in one_line_error(r)


@pytest.mark.parametrize("args", [
    [],
    ["bogus"],
    ["send"],
    ["ping", "a.test", "-c", "0"],
    ["add-peer", "x", "--pubkey", "k.pem", "--host", "h", "--port", "99999"],
    ["init", "--bits", "abc", "--peer-id", "x"],
    ["listen", "--no-such-flag"],
])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    r = p2psc(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert b"usage:" in r.stderr and b"Traceback" not in r.stderr


def test_help_of_every_subcommand_and_the_console_script() -> None:
    for cmd in ("init", "pubkey", "fingerprint", "add-peer", "peers", "listen", "send",
                "ping"):
        r = p2psc(cmd, "--help")
        assert r.returncode == 0, cmd
        assert b"--workdir" in r.stdout and b"-v" in r.stdout, cmd
    r = p2psc("directory", "list", "--help")
    assert r.returncode == 0 and b"--workdir" in r.stdout and b"-v" in r.stdout
    assert SCRIPT.exists()
    r = subprocess.run([str(SCRIPT), "--version"], check=False, capture_output=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout.startswith(b"p2psc ")


def test_directory_subcommands(tmp_path: Path) -> None:
    w = str(tmp_path / "dir")
    r = p2psc("directory", "init-center", "--workdir", w, "--bits", "2048")
    assert r.returncode == 0, r.stderr
    r = p2psc("directory", "list", "--workdir", w)
    assert r.returncode == 0 and r.stdout == b""
    r = p2psc("directory", "remove", "nobody", "--workdir", w)
    assert r.returncode == 1
