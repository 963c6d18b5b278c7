"""`make demo`: the README's demo, run for you.

Starts ``python ../test/server.py`` in test1/, waits for it to listen, runs
``python ../test/client.py test1.com`` in test2/, prints what the client printed, stops the
server. Then the same with the UDP scripts (userver.py / uclient.py) when they exist.
"""

from __future__ import annotations

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
            _wait_for_tcp("127.0.0.1", 10098, server)
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
    rc = run_pair("server.py", "client.py", wait_tcp=True)
    if rc:
        return rc
    if (ROOT / "test" / "userver.py").exists():
        rc = run_pair("userver.py", "uclient.py", wait_tcp=False)
    return rc


if __name__ == "__main__":
    sys.exit(main())
