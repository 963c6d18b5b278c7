"""Review findings on the PostgreSQL directory (issue 13), each a real process on a real
PostgreSQL server: what a worker's command line shows to other local users, workers left
running when the supervisor is SIGKILLed, and the like."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from conftest import run
from test_directory_pg_faults import _center_workdir, _register, servers

SECRET = "s3cret-Pw-7f1e"


def _with_password(url: str) -> str:
    # the test server trusts 127.0.0.1, so any password works; it must never be shown
    return url.replace("postgresql://p2psc@", f"postgresql://p2psc:{SECRET}@", 1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_command_lines_do_not_show_the_database_password(pg_url: str,
                                                                tmp_path: Path) -> None:
    """/proc/PID/cmdline is readable by every local user (``ps aux``): the options sent to
    a worker, which hold the --db URL with its password, must not be on its command line."""
    url = _with_password(pg_url)
    assert SECRET in url

    async def main() -> None:
        await _register(pg_url)
        async with servers(_center_workdir(tmp_path), url, 2) as srv:
            pids = srv.worker_pids()
            assert sorted(pids) == [1, 2]
            for pid in pids.values():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert b"p2psc.directory.workers" in cmdline
                assert SECRET.encode() not in cmdline, cmdline
        code, err = await srv.stop()
        assert code == 0, err.decode()[-2000:]
        assert SECRET.encode() not in err
        assert all(SECRET not in line for line in srv.lines)
    run(main(), timeout=60)


def test_workers_exit_when_the_supervisor_is_sigkilled(pg_url: str, tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL cannot stop its workers: they must notice and exit,
    not keep serving the port (with the old options) forever as orphans."""
    async def main() -> None:
        await _register(pg_url)
        async with servers(_center_workdir(tmp_path), pg_url, 2) as srv:
            pids = srv.worker_pids()
            assert sorted(pids) == [1, 2]
            try:
                assert srv.proc is not None
                srv.proc.kill()
                await asyncio.wait_for(srv.proc.wait(), 10)
                deadline = time.monotonic() + 15
                while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                left = [p for p in pids.values() if _alive(p)]
                assert not left, f"workers {left} outlived their SIGKILLed supervisor"
            finally:
                for pid in pids.values():  # the workers this test started, if still there
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    run(main(), timeout=60)
