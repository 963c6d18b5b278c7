"""The README's command-line quick start, run with an installed ``p2psc`` command.

    python test/wheel_quickstart.py /path/to/venv/bin/p2psc [WORKDIR]

Runs, in WORKDIR (default: a new temporary folder; it should be outside the source tree), what
"Command line and async/await channels" shows: ``init`` two peers, exchange their public keys
with ``pubkey`` and ``add-peer``, ``fingerprint``, then ``listen`` in alice while bob ``send``s
a file, and ``ping``. The ports are free ones instead of the README's 10098 and 10099, and
``listen`` gets ``--once`` so that it ends with the transfer. Prints one line per step; exit
code 0 when the received file equals the sent one and ping answered, else 1 with one line on
stderr saying which step failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_TIMEOUT = 30.0


class StepFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: only the installed p2psc may be found."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(p2psc: str, args: list[str], cwd: Path, stdout: object = None) -> bytes:
    print("$ p2psc " + " ".join(args), flush=True)
    proc = subprocess.run([p2psc, *args], cwd=cwd, env=clean_env(), timeout=STEP_TIMEOUT,
                          stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise StepFailed(f"p2psc {' '.join(args)}: exit {proc.returncode}: {err[-1] if err else ''}")
    return proc.stdout if isinstance(proc.stdout, bytes) else b""


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StepFailed(f"p2psc listen exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StepFailed(f"p2psc listen did not listen on 127.0.0.1:{port}")


def quickstart(p2psc: str, top: Path) -> None:
    pa, pb = free_port(), free_port()
    run(p2psc, ["init", "alice", "--peer-id", "alice.example", "--port", str(pa)], top)
    run(p2psc, ["init", "bob", "--peer-id", "bob.example", "--port", str(pb)], top)
    (top / "alice.pubkey.pem").write_bytes(run(p2psc, ["pubkey", "--workdir", "alice"], top))
    (top / "bob.pubkey.pem").write_bytes(run(p2psc, ["pubkey", "--workdir", "bob"], top))
    run(p2psc, ["add-peer", "bob.example", "--pubkey", "bob.pubkey.pem", "--host", "127.0.0.1",
                "--port", str(pb), "--workdir", "alice"], top)
    run(p2psc, ["add-peer", "alice.example", "--pubkey", "alice.pubkey.pem", "--host",
                "127.0.0.1", "--port", str(pa), "--workdir", "bob"], top)
    fp_folder = run(p2psc, ["fingerprint", "--workdir", "bob"], top)
    fp_file = run(p2psc, ["fingerprint", "--pubkey", "bob.pubkey.pem"], top)
    if not fp_file.strip() or fp_file.strip() not in fp_folder:  # "bob.example  SHA256:..."
        raise StepFailed(f"fingerprints differ: {fp_folder!r} vs {fp_file!r}")

    photo = top / "bob" / "photo.jpg"
    photo.write_bytes(os.urandom(200_000))
    print("$ (cd alice && p2psc listen --once > received.bin) &", flush=True)
    with open(top / "alice" / "received.bin", "wb") as out:
        listener = subprocess.Popen([p2psc, "listen", "--once"], cwd=top / "alice",
                                    env=clean_env(), stdout=out, stderr=subprocess.PIPE)
        try:
            wait_listening(pa, listener)
            run(p2psc, ["send", "alice.example", "photo.jpg"], top / "bob")
            try:
                _, err = listener.communicate(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired as exc:
                raise StepFailed("p2psc listen --once did not exit after the transfer") from exc
            if listener.returncode != 0:
                raise StepFailed(f"p2psc listen --once: exit {listener.returncode}: "
                                 f"{err.decode(errors='replace').strip()}")
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
    if (top / "alice" / "received.bin").read_bytes() != photo.read_bytes():
        raise StepFailed("received.bin differs from photo.jpg")

    listener = subprocess.Popen([p2psc, "listen"], cwd=top / "alice", env=clean_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(pa, listener)
        out = run(p2psc, ["ping", "alice.example", "-c", "3", "-i", "0.1"], top / "bob")
        print(out.decode(errors="replace").rstrip(), flush=True)
    finally:
        listener.terminate()
        listener.communicate(timeout=10)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} P2PSC_COMMAND [WORKDIR]", file=sys.stderr)
        return 2
    p2psc = argv[1]
    with tempfile.TemporaryDirectory(prefix="p2psc-quickstart-") as tmp:
        top = Path(argv[2]) if len(argv) == 3 else Path(tmp)
        top.mkdir(parents=True, exist_ok=True)
        try:
            quickstart(p2psc, top)
        except (StepFailed, subprocess.TimeoutExpired, OSError) as exc:
            print(f"quick start failed: {exc}", file=sys.stderr)
            return 1
    print("quick start ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
