"""Errors a user can act on, and ``ping`` (issue 14), run as subprocesses with real listeners:
DNS failures, closed ports, an unreachable or wrong directory URL, a refused handshake,
config typos, ``ping --udp -s`` over the limit (exit 2 before connecting), Ctrl-C (exit 130),
and ``ping --udp`` whose handshake needs a retransmission past ``--timeout``."""

from __future__ import annotations

import asyncio
import http.server
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import env_without_password, free_port
from udp_util import UdpRelay


def p2psc(*args: str, input: bytes | None = None, timeout: float = 40
          ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "p2psc", *args], check=False, input=input,
                          capture_output=True, timeout=timeout, env=env_without_password())


def one_line(proc: subprocess.CompletedProcess[bytes], code: int = 1) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == code, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("p2psc"), err
    assert "Traceback" not in err
    return err.strip()


class Listener:
    """``p2psc listen ARGS`` in the background, stderr lines collected."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "p2psc", "listen", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env_without_password())
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.put(raw.decode(errors="replace"))

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from the listener: {seen}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _port_of(folder: Path) -> int:
    return int(json.loads((folder / "data" / "config.json").read_text())["port"])


def _add_peer(me: Path, other: Path, other_id: str, host: str = "127.0.0.1",
              port: int | None = None) -> None:
    pem = p2psc("pubkey", "--workdir", str(other)).stdout
    r = p2psc("add-peer", other_id, "--pubkey", "-", "--host", host, "--port",
              str(_port_of(other) if port is None else port), "--workdir", str(me),
              "--replace", input=pem)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """a.test and b.test, made by ``p2psc init``, knowing each other."""
    root = tmp_path_factory.mktemp("clierr")
    a, b = root / "a", root / "b"
    for d, pid in ((a, "a.test"), (b, "b.test")):
        r = p2psc("init", str(d), "--peer-id", pid, "--port", str(free_port()), "--bits", "2048")
        assert r.returncode == 0, r.stderr
    _add_peer(a, b, "b.test")
    _add_peer(b, a, "a.test")
    return a, b


@pytest.fixture
def listener(folders: tuple[Path, Path]) -> Iterator[Listener]:
    lst = Listener("--workdir", str(folders[0]))
    try:
        lst.wait_for("listening on")
        yield lst
    finally:
        lst.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- connecting ----------------------------------------------------------------------------

def test_a_name_that_does_not_resolve(folders: tuple[Path, Path], tmp_path: Path) -> None:
    _, b = folders
    c = tmp_path / "c"
    shutil.copytree(b, c)
    _add_peer(c, folders[0], "a.test", host="nosuchhost.invalid", port=9)
    for extra in ([], ["--udp"]):
        err = one_line(p2psc("ping", "a.test", "-c", "1", *extra, "--workdir", str(c)))
        assert err.startswith("p2psc: cannot connect to a.test at nosuchhost.invalid:9: "
                              "cannot resolve nosuchhost.invalid: "), err
        assert "Unknown error" not in err
    # listening on a name that does not resolve
    err = one_line(p2psc("listen", "--host", "nosuchhost.invalid", "--workdir", str(c)))
    assert "cannot resolve nosuchhost.invalid: " in err and "Unknown error" not in err


def test_a_closed_port_names_the_address(folders: tuple[Path, Path], tmp_path: Path) -> None:
    _, b = folders
    c = tmp_path / "c"
    shutil.copytree(b, c)
    port = _closed_port()
    _add_peer(c, folders[0], "a.test", port=port)
    err = one_line(p2psc("ping", "a.test", "-c", "1", "--workdir", str(c)))
    assert err == f"p2psc: cannot connect to a.test at 127.0.0.1:{port}: Connection refused"


def test_a_refused_handshake_says_what_is_likely(folders: tuple[Path, Path], listener: Listener,
                                                 tmp_path: Path) -> None:
    a, _ = folders
    c = tmp_path / "c"
    assert p2psc("init", str(c), "--peer-id", "c.test", "--bits", "2048").returncode == 0
    _add_peer(c, a, "a.test")  # a.test does not know c.test
    err = one_line(p2psc("ping", "a.test", "-c", "1", "--workdir", str(c)))
    assert err == ("p2psc: the peer refused the handshake: it probably does not know this "
                   "peer's key (add it there with p2psc add-peer, or register it in the "
                   "directory), or this peer's key changed")


# -- the directory --------------------------------------------------------------------------

class _NotADirectory(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"<html><body>Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a: Any) -> None:
        pass


def test_directory_lookup_errors(tmp_path: Path) -> None:
    r = p2psc("directory", "init-center", "--workdir", str(tmp_path / "dir"), "--bits", "2048")
    assert r.returncode == 0, r.stderr
    keyfile = next((tmp_path / "dir").rglob("p2psc_center.pubkey.pem"))
    port = _closed_port()
    r = p2psc("directory", "lookup", "a.test", "--url", f"http://127.0.0.1:{port}/",
              "--center-key", str(keyfile))
    err = one_line(r)
    assert err == f"p2psc directory: cannot reach the directory at http://127.0.0.1:{port}/: " \
                  "connection refused", err
    r = p2psc("directory", "lookup", "a.test", "--url", "http://nosuchhost.invalid:9/",
              "--center-key", str(keyfile))
    err = one_line(r)
    assert err.startswith("p2psc directory: cannot reach the directory at "
                          "http://nosuchhost.invalid:9/: cannot resolve nosuchhost.invalid: ")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotADirectory)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        err = one_line(p2psc("directory", "lookup", "a.test", "--url", url,
                             "--center-key", str(keyfile)))
        assert err.startswith(f"p2psc directory: {url} did not answer as a p2psc directory "
                              "(HTTP 404, not JSON)"), err
    finally:
        server.shutdown()
        server.server_close()


# -- config -----------------------------------------------------------------------------------

def test_config_typo_is_warned_and_wrong_type_reported(folders: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    c = tmp_path / "c"
    shutil.copytree(folders[1], c)
    conf_path = c / "conf" / "config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "max_mesage_size": 1000}))
    r = p2psc("fingerprint", "--workdir", str(c))
    assert r.returncode == 0, r.stderr
    assert r.stderr.decode().strip() == (f"p2psc: {conf_path}: unknown key 'max_mesage_size' "
                                         "ignored (did you mean 'max_message_size'?)")
    conf_path.write_text(json.dumps({**conf, "my_prikey_file": 5}))
    err = one_line(p2psc("fingerprint", "--workdir", str(c)))
    assert err == f"p2psc: {conf_path}: my_prikey_file must be a string, not 5"


# -- ping ---------------------------------------------------------------------------------------

def test_ping_udp_size_over_the_limit_is_a_usage_error_before_connecting(
        folders: tuple[Path, Path]) -> None:
    _, b = folders
    t0 = time.monotonic()
    r = p2psc("ping", "a.test", "--udp", "-s", "2000", "--workdir", str(b))  # nobody listens
    err = one_line(r, code=2)
    assert err == ("p2psc: -s 2000: a UDP ping message holds at most 1185 bytes "
                   "(udp_max_payload 1200, less the 15-byte ping marker)")
    assert r.stdout == b"" and time.monotonic() - t0 < 10
    assert p2psc("ping", "a.test", "--udp", "-s", "1186", "--workdir", str(b)).returncode == 2


def test_ping_ctrl_c_exits_130_with_its_statistics(folders: tuple[Path, Path],
                                                   listener: Listener) -> None:
    _, b = folders
    proc = subprocess.Popen([sys.executable, "-m", "p2psc", "ping", "a.test", "-c", "100",
                             "-i", "0.2", "--workdir", str(b)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env_without_password())
    assert proc.stdout is not None
    try:
        proc.stdout.readline()  # PING ...
        assert b"seq=1" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert b"ping statistics" in out
    assert err.decode() == "p2psc: interrupted\n"


def test_listen_still_ends_with_0_on_ctrl_c(folders: tuple[Path, Path]) -> None:
    lst = Listener("--workdir", str(folders[0]))
    try:
        lst.wait_for("listening on")
        lst.proc.send_signal(signal.SIGINT)
        assert lst.proc.wait(15) == 0
    finally:
        lst.stop()


def test_ping_udp_handshake_may_take_longer_than_the_reply_timeout(
        folders: tuple[Path, Path], tmp_path: Path) -> None:
    """The first two INITs are lost (as on a lossy link): the library's third one, 3 s in,
    completes the handshake. With --timeout 1 (per reply) ping still succeeds, since the
    handshake has the library's own udp_handshake_timeout (15 s)."""
    a, b = folders
    dropped = 0

    def policy(direction: str, data: bytes) -> list[bytes] | None:
        nonlocal dropped
        if direction == "c2s" and dropped < 2:
            dropped += 1
            return []
        return None

    loop = asyncio.new_event_loop()
    relay = UdpRelay(_port_of(a), policy=policy)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(relay.start(), loop).result(10)
    c = tmp_path / "c"
    shutil.copytree(b, c)
    _add_peer(c, a, "a.test", port=relay.port)
    lst = Listener("--workdir", str(a), "--udp")
    try:
        lst.wait_for("listening on")
        r = p2psc("ping", "a.test", "--udp", "-c", "2", "-i", "0", "--timeout", "1",
                  "--workdir", str(c))
        out = r.stdout.decode()
        assert r.returncode == 0, (out, r.stderr)
        assert "2 sent, 2 received" in out
        hs_ms = float(out.split("UDP handshake ", 1)[1].split(" ms", 1)[0])
        assert hs_ms > 2500  # the third INIT, past --timeout
        assert dropped == 2
        # a handshake limit of its own still applies
        dropped = 0
        r = p2psc("ping", "a.test", "--udp", "-c", "1", "--handshake-timeout", "0.5",
                  "--workdir", str(c))
        assert "no UDP handshake with a.test within 0.5 s" in one_line(r)
    finally:
        lst.stop()
        loop.call_soon_threadsafe(loop.stop)
