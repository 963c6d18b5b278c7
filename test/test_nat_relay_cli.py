"""``p2psc relay serve`` and ``p2psc directory serve --relay-workdir``, run as subprocesses:
they start, print their bound addresses, serve a real peer, and stop on SIGINT / SIGTERM
with exit code 0."""

from __future__ import annotations

import asyncio
import re
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from conftest import env_without_password, make_peer, run
from nat_util import FrameClient, probe, udp_socket
from p2psc.nat import wire
from p2psc.p2phandler import P2PHandler

LINE = re.compile(r"tcp 127\.0\.0\.1:(\d+), udp 127\.0\.0\.1:(\d+) and 127\.0\.0\.1:(\d+)")


class Lines:
    """The stdout lines of ``proc``, read by a thread (so that every wait has a timeout)."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # closed at the end of the output
            for line in self.proc.stdout:
                self.queue.put(line)

    def next(self, timeout: float) -> str:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the server (exit {self.proc.poll()})") from None


def stop(proc: subprocess.Popen[Any], sig: int) -> tuple[int, str]:
    """Send ``sig``, wait for the exit (killing after 15 s); (exit code, stderr)."""
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError("the server did not stop") from None
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    return code, err


async def attach_and_probe(root: Path, relay_dir: Any, port: int, udp_port: int) -> None:
    """alice attaches to the relay at ``port`` and probes ``udp_port``."""
    alice = root / "alice.test"
    from conftest import PeerDir, rsa_key
    pd = PeerDir("alice.test", alice, rsa_key("alice.test"))
    pd.know(relay_dir, port=port)
    handler = P2PHandler(workdir=alice)
    try:
        _, link = await handler.connect_peer(relay_dir.peer_id, FrameClient)
        await asyncio.wait_for(link.wait_handshaked(), 10)
        welcome = await link.expect(wire.Welcome)
        sock = await udp_socket()
        try:
            reply = await probe(sock, welcome.probe_token, b"alice-ep", udp_port)
            assert reply.observed.port == sock.port
        finally:
            assert sock.transport is not None
            sock.transport.close()
    finally:
        await handler.close()


def test_relay_serve_starts_prints_its_ports_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    relay = make_peer(tmp_path, "relay.test")
    alice = make_peer(tmp_path, "alice.test")
    relay.know(alice)
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2psc", "relay", "serve", "--workdir", str(relay.workdir),
         "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env_without_password())
    try:
        line = Lines(proc).next(20.0)
        assert line.startswith("p2psc relay: relay.test listening on tcp 127.0.0.1:"), line
        m = LINE.search(line)
        assert m is not None, line
        port, u1, u2 = (int(g) for g in m.groups())
        assert 0 not in (port, u1, u2) and u1 != u2
        run(attach_and_probe(tmp_path, relay, port, u2), timeout=30)
        code, err = stop(proc, signal.SIGINT)
        assert code == 0, err
        assert "Traceback" not in err
        assert "alice.test: attached from 127.0.0.1:" in err  # (INFO lines of p2psc.relay)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_relay_serve_usage_and_failures(tmp_path: Path) -> None:
    def p2psc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "p2psc", *args], capture_output=True,
                              text=True, timeout=30, check=False, env=env_without_password())

    r = p2psc("relay", "serve", "--help")
    assert r.returncode == 0 and "--udp-port2" in r.stdout and "--workdir" in r.stdout
    assert p2psc("relay").returncode == 2
    assert p2psc("relay", "serve", "--port", "70000").returncode == 2
    r = p2psc("relay", "serve", "--workdir", str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    relay = make_peer(tmp_path, "relay.test")
    r = p2psc("relay", "serve", "--workdir", str(relay.workdir), "--port", "0",
              "--udp-port", "65535")
    assert r.returncode == 1 and "out of range" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_directory_serve_runs_the_relay_in_its_process(tmp_path: Path) -> None:
    w = tmp_path / "dir"
    r = subprocess.run([sys.executable, "-m", "p2psc", "directory", "init-center", "--workdir",
                        str(w), "--bits", "2048"], capture_output=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    relay = make_peer(tmp_path, "relay.test")
    alice = make_peer(tmp_path, "alice.test")
    relay.know(alice)
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2psc", "directory", "serve", "--workdir", str(w), "--port",
         "0", "--relay-workdir", str(relay.workdir), "--relay-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_without_password())
    try:
        lines = Lines(proc)
        first = lines.next(20.0)
        assert first.startswith("p2psc directory: http://127.0.0.1:"), first
        line = lines.next(5.0)
        assert line.startswith("p2psc directory: relay relay.test listening on "), line
        m = LINE.search(line)
        assert m is not None, line
        port, u1, _ = (int(g) for g in m.groups())
        run(attach_and_probe(tmp_path, relay, port, u1), timeout=30)
        code, err = stop(proc, signal.SIGTERM)
        assert code == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
