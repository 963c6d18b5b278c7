"""The README demo (test/server.py and test/client.py) run as the README says: from copies
of the demo peer folders, on free ephemeral ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def copy_demo(tmp_path: Path, tcp_port: int, other_port: int) -> tuple[Path, Path]:
    """test1/ and test2/ copied next to a copy of test/, with test1.com on ``tcp_port``."""
    shutil.copytree(ROOT / "test1", tmp_path / "test1")
    shutil.copytree(ROOT / "test2", tmp_path / "test2")
    (tmp_path / "test").mkdir()
    for script in ("server.py", "client.py"):
        shutil.copy(ROOT / "test" / script, tmp_path / "test" / script)
    for folder, pid, port, other, oport in (("test1", "test1.com", tcp_port, "test2.com", other_port),
                                            ("test2", "test2.com", other_port, "test1.com", tcp_port)):
        data = tmp_path / folder / "data"
        (data / "config.json").write_text(json.dumps({"peer_id": pid, "host": "127.0.0.1", "port": port}))
        (data / "peers.json").write_text(json.dumps({other: {"peer_id": other, "host": "127.0.0.1",
                                                             "port": oport}}))
        (data / "private_key.pem").chmod(0o600)
    return tmp_path / "test1", tmp_path / "test2"


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"server not listening on {port}")


def test_readme_tcp_demo(tmp_path: Path) -> None:
    port = free_port()
    test1, test2 = copy_demo(tmp_path, port, free_port())
    server = subprocess.Popen([sys.executable, "../test/server.py"], cwd=test1,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(port, server)
        client = subprocess.run([sys.executable, "../test/client.py", "test1.com"], cwd=test2,
                                capture_output=True, timeout=30)
        assert client.returncode == 0, client.stderr
        assert client.stdout == b"data receive= recv:this is a test text\n"
        assert b"Traceback" not in client.stderr
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert b"Traceback" not in err.replace(b"KeyboardInterrupt", b"")


def test_client_usage_message(tmp_path: Path) -> None:
    _, test2 = copy_demo(tmp_path, free_port(), free_port())
    client = subprocess.run([sys.executable, "../test/client.py"], cwd=test2,
                            capture_output=True, timeout=30)
    assert client.returncode == 1
    assert client.stdout.startswith(b"Usage:\n") and b"peerid" in client.stdout


def test_client_exits_after_handshake_failure(tmp_path: Path) -> None:
    """test2 holds the wrong key for test1.com: the handshake fails, and client.py says so in
    one line and exits 1 instead of running forever."""
    port = free_port()
    test1, test2 = copy_demo(tmp_path, port, free_port())
    # test2's own public key filed as test1.com's: test1's signature cannot verify
    shutil.copy(test2 / "data" / "public_key.pem", test2 / "data" / "pubkeys" / "test1.com.pubkey.pem")
    server = subprocess.Popen([sys.executable, "../test/server.py"], cwd=test1,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(port, server)
        client = subprocess.run([sys.executable, "../test/client.py", "test1.com"], cwd=test2,
                                capture_output=True, timeout=30)
    finally:
        server.terminate()
        server.communicate(timeout=10)
    assert client.returncode == 1, client
    assert client.stdout == b""
    # client.py's one line; before it, p2psc's own warning (logging's last-resort handler)
    lines = client.stderr.decode().strip().splitlines()
    assert b"Traceback" not in client.stderr
    assert lines[-1].startswith("connection failed:") and "signature" in lines[-1], client.stderr
    assert len(lines) <= 2 and sum(line.startswith("connection failed:") for line in lines) == 1


def test_client_exits_when_nobody_listens(tmp_path: Path) -> None:
    _, test2 = copy_demo(tmp_path, free_port(), free_port())
    client = subprocess.run([sys.executable, "../test/client.py", "test1.com"], cwd=test2,
                            capture_output=True, timeout=30)
    assert client.returncode == 1, client
    # (test2 then asks the directory, which is not running either; aiohttp may add its
    # "Unclosed client session" note at exit: a p2psc.directory matter, not client.py's)
    lines = client.stderr.decode().strip().splitlines()
    assert b"Traceback" not in client.stderr
    assert sum(line.startswith("connection failed:") for line in lines) == 1, client.stderr


def test_run_demo_says_in_one_line_that_the_port_is_busy(tmp_path: Path) -> None:
    """`make demo` with test1's port taken: one line, exit 1, at once (no 30 s wait)."""
    port = free_port()
    copy_demo(tmp_path, port, free_port())
    shutil.copy(ROOT / "test" / "run_demo.py", tmp_path / "test" / "run_demo.py")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        start = time.monotonic()
        demo = subprocess.run([sys.executable, "test/run_demo.py"], cwd=tmp_path,
                              capture_output=True, timeout=30)
    assert time.monotonic() - start < 10
    assert demo.returncode == 1, demo
    assert demo.stdout == b""
    lines = demo.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and f"TCP port {port}" in lines[0] and "in use" in lines[0], demo.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_p2psc_alone_and_make_test_the_test_extra(tmp_path: Path) -> None:
    """`make -n` on a clone without .venv: what each target would install."""
    for name in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)

    def plan(target: str) -> str:
        # (without the variables of a `make test` that runs this test: no "make[1]:" lines)
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        return subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp_path, env=env,
                              capture_output=True, text=True, check=True, timeout=30).stdout

    demo = plan("demo")
    assert "pip install -q -e .\n" in demo and ".[" not in demo, demo
    assert "test/run_demo.py" in demo
    test = plan("test")
    assert "pip install -q -e '.[test]'" in test and "lint" not in test and "bench" not in test
    assert "pip install -q -e '.[lint]'" in plan("lint")
    assert "pip install -q -e '.[bench]'" in plan("bench")
