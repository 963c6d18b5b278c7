"""`make demo`: the README's demo, run for you.

Starts ``python ../test/server.py`` in test1/, waits for it to listen, runs
``python ../test/client.py test1.com`` in test2/, prints what the client printed, stops the
server. Then the same with the UDP scripts (userver.py / uclient.py) when they exist.

Before starting anything it checks that test1's address (TCP and UDP, from
test1/data/config.json) is free: if not, one line says so and the exit code is 1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0


def _secure_demo_keys() -> None:
    # git does not keep file modes: give the demo keys the 0600 ssh would insist on.
    for folder in ("test1", "test2"):
        (ROOT / folder / "data" / "private_key.pem").chmod(0o600)


def _server_address() -> tuple[str, int]:
    conf = json.loads((ROOT / "test1" / "data" / "config.json").read_text())
    return str(conf.get("host", "127.0.0.1")), int(conf["port"])


def _busy(host: str, port: int) -> str | None:
    """Which of TCP and UDP cannot bind host:port, as the servers would (SO_REUSEADDR, as
    asyncio sets it for TCP); None when both can."""
    for kind, name in ((socket.SOCK_STREAM, "TCP"), (socket.SOCK_DGRAM, "UDP")):
        with socket.socket(socket.AF_INET, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return name
    return None


def _wait_for_tcp(host: str, port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited early with code {server.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not listen on {host}:{port} within {TIMEOUT} s")


def run_pair(server_script: str, client_script: str, wait_tcp: bool) -> int:
    print(f"$ cd test1 && python ../test/{server_script}   (in the background)")
    server = subprocess.Popen([sys.executable, f"../test/{server_script}"], cwd=ROOT / "test1")
    try:
        if wait_tcp:
            _wait_for_tcp(*_server_address(), server)
        else:
            time.sleep(1.0)
        print(f"$ cd test2 && python ../test/{client_script} test1.com")
        client = subprocess.run([sys.executable, f"../test/{client_script}", "test1.com"],
                                cwd=ROOT / "test2", timeout=TIMEOUT)
        return client.returncode
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> int:
    os.chdir(ROOT)
    _secure_demo_keys()
    host, port = _server_address()
    busy = _busy(host, port)
    if busy:
        print(f"make demo: {busy} port {port} on {host} is in use (another demo, server.py or "
              f"`p2psc listen`?): stop it and try again", file=sys.stderr)
        return 1
    rc = run_pair("server.py", "client.py", wait_tcp=True)
    if rc:
        return rc
    if (ROOT / "test" / "userver.py").exists():
        rc = run_pair("userver.py", "uclient.py", wait_tcp=False)
    return rc


if __name__ == "__main__":
    sys.exit(main())
