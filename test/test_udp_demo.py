"""The UDP demo (test/userver.py and test/uclient.py) run as the README says: from copies of
the demo peer folders, on free ephemeral ports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from conftest import free_port
from test_demo import copy_demo

ROOT = Path(__file__).resolve().parent.parent


def test_readme_udp_demo(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    test1, test2 = copy_demo(tmp_path, port, free_port(socket.SOCK_DGRAM))
    for script in ("userver.py", "uclient.py"):
        shutil.copy(ROOT / "test" / script, tmp_path / "test" / script)
    server = subprocess.Popen([sys.executable, "../test/userver.py"], cwd=test1,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # no need to wait for the server: the client retransmits its INIT until it answers
        client = subprocess.run([sys.executable, "../test/uclient.py", "test1.com"], cwd=test2,
                                capture_output=True, timeout=30)
        assert client.returncode == 0, client.stderr
        assert client.stdout == b"data receive= recv:this is a test text\n"
        assert b"Traceback" not in client.stderr
        assert server.poll() is None
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert b"Traceback" not in err.replace(b"KeyboardInterrupt", b"")


def test_uclient_handshake_failure_exits_nonzero(tmp_path: Path) -> None:
    _, test2 = copy_demo(tmp_path, free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM))
    shutil.copy(ROOT / "test" / "uclient.py", tmp_path / "test" / "uclient.py")
    conf = test2 / "conf" / "config.json"
    settings = json.loads(conf.read_text())
    settings.update(udp_handshake_retry=0.1, udp_handshake_timeout=0.5)  # nobody answers
    conf.write_text(json.dumps(settings))
    client = subprocess.run([sys.executable, "../test/uclient.py", "test1.com"], cwd=test2,
                            capture_output=True, timeout=30)
    assert client.returncode == 2
    assert b"handshake failed" in client.stderr and b"Traceback" not in client.stderr


def test_uclient_usage_message(tmp_path: Path) -> None:
    _, test2 = copy_demo(tmp_path, free_port(), free_port())
    shutil.copy(ROOT / "test" / "uclient.py", tmp_path / "test" / "uclient.py")
    client = subprocess.run([sys.executable, "../test/uclient.py"], cwd=test2,
                            capture_output=True, timeout=30)
    assert client.returncode == 1
    assert client.stdout.startswith(b"Usage:\n") and b"peerid" in client.stdout
