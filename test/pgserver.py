"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a folder, start it on
127.0.0.1 (a free port, kept across restarts), stop, restart or SIGKILL it.

Plain module (no pytest) so ``bench/`` can use it; the fixtures live in ``pg_fixtures.py``.
As root, initdb and postgres run as the ``postgres`` system user (else ``nobody``), which then
owns the server's folder: that folder must be reachable by that user (``new_root()`` makes one
under the system temp dir that is)."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import ctypes
import functools
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("p2psc.test.pgserver")

T = TypeVar("T")

USER = "p2psc"
HOST = "127.0.0.1"
ROOT_PREFIX = "p2psc-pgtest-"
OWNER_FILE = "owner.pid"
MIN_VERSION = 13  # initdb --no-instructions, DROP DATABASE ... WITH (FORCE)
TIMEOUT = 60.0  # the bound of every subprocess and every wait here
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_LIVE: set[PgServer] = set()


class PgServerError(RuntimeError):
    """initdb, pg_ctl or a query failed (the message carries the end of the server log)."""


def postgres_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: initdb's on PATH (symlinks resolved),
    else the newest ``/usr/lib/postgresql/*/bin``; None if there is none."""
    def complete(d: Path) -> bool:
        return all(os.access(d / b, os.X_OK) for b in ("initdb", "pg_ctl", "postgres"))

    found = shutil.which("initdb")
    if found is not None and complete(Path(found).resolve().parent):
        return Path(found).resolve().parent

    def version(d: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", d.parent.name)) or (0,)

    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True):
        if complete(d):
            return d
    return None


def postgres_unavailable() -> str | None:
    """None when a server can be started here, else one line saying why not."""
    if postgres_binaries() is None:
        return "PostgreSQL server not installed (initdb not found; .ci/run installs it with apt-get)"
    version = _server_version(postgres_binaries())
    if version < MIN_VERSION:
        return f"PostgreSQL {version or '?'} is too old: the tests need {MIN_VERSION} or newer"
    if importlib.util.find_spec("asyncpg") is None:
        return "asyncpg not installed (pip install -e '.[test]')"
    if os.geteuid() == 0 and _server_user() is None:
        return "running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL"
    return None


@functools.cache
def _server_version(bindir: Path | None) -> int:
    """The major version of ``bindir/postgres`` (0 if unknown)."""
    if bindir is None:
        return 0
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=TIMEOUT).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.search(r"\b(\d+)(?:\.\d+)*", out)
    return int(found.group(1)) if found else 0


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user that runs initdb and postgres when we are root."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (or it just went): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from /proc; empty without it)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` for ``pids`` to exit; the ones still alive."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:  # reap it if it happens to be our child
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _kill_tree(pid: int) -> None:
    """SIGKILL the postmaster ``pid``, then wait for its children (which exit on postmaster
    death; the stragglers are killed too), so a new postmaster finds no old shared memory."""
    kids = _children(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    left = _wait_gone([pid, *kids], 10.0)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if _wait_gone(left, 10.0):
        raise PgServerError(f"postmaster {pid} or its children survive SIGKILL")


def _drop_shm(data: Path) -> None:
    """Remove the System V shared memory segment a killed postmaster of ``data`` left (its
    processes all gone); otherwise it stays until reboot unless that data dir starts again."""
    try:
        shmid = int((data / "postmaster.pid").read_text().split("\n")[6].split()[1])
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, ValueError, IndexError):
        return
    libc.shmctl(shmid, 0, None)  # IPC_RMID; fails harmlessly if it is gone


def new_root(base: Path | None = None) -> Path:
    """A fresh ``base/p2psc-pgtest-*`` folder (base: the system temp dir) recording this
    process as its owner, for :class:`PgServer` and :func:`cleanup_stale`."""
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=base))
    (root / OWNER_FILE).write_text(f"{os.getpid()}\n")
    return root


def cleanup_stale(base: Path | None = None) -> int:
    """Kill the postmasters of ``base/p2psc-pgtest-*`` folders whose owner process is dead
    (left by a crashed run) and remove those folders; the number of postmasters killed."""
    killed = 0
    for root in Path(base or tempfile.gettempdir()).glob(ROOT_PREFIX + "*"):
        try:
            owner = int((root / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue  # not ours, or still being made
        if _alive(owner):
            continue
        data = root / "data"
        pid = _postmaster_pid(data)
        if pid is not None and _alive(pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmdline = str(data)
            if str(data) in cmdline:  # not a recycled pid
                log.warning("killing stale postmaster %d of %s", pid, root)
                try:
                    _kill_tree(pid)
                    _drop_shm(data)
                    killed += 1
                except (PgServerError, OSError) as e:  # e.g. another user's server
                    log.warning("%s", e)
                    continue
        shutil.rmtree(root, ignore_errors=True)
    return killed


def _run_async(make: Callable[[], Awaitable[T]], timeout: float) -> T:
    """Run ``make()`` on a new event loop in a worker thread (so it works inside a running loop
    too), failing after ``timeout``."""
    async def bounded() -> T:
        return await asyncio.wait_for(make(), timeout)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, bounded()).result(timeout + 5)


class PgServer:
    """A PostgreSQL server in ``root`` (data in ``root/data``, log ``root/postgres.log``, unix
    socket in ``root``) on 127.0.0.1:``port`` (a free one when None, kept across restarts)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.data = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self.port = port if port is not None else _free_port()
        self._fixed_port = port is not None
        bindir = postgres_binaries()
        if bindir is None:
            raise PgServerError(postgres_unavailable() or "PostgreSQL not found")
        self.bindir = bindir
        self._user = _server_user() if os.geteuid() == 0 else None
        if os.geteuid() == 0 and self._user is None:
            raise PgServerError("running as root and no unprivileged user to run PostgreSQL")

    # -- processes --------------------------------------------------------------------------

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary (as the unprivileged user when we are root)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", TZ="UTC")
        kw: dict[str, Any] = {}
        if self._user is not None:
            kw = dict(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
            env.update(HOME=str(self.root), USER=self._user.pw_name, LOGNAME=self._user.pw_name)
        argv = [str(self.bindir / args[0]), *args[1:]]
        try:
            done = subprocess.run(argv, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=TIMEOUT, **kw)
        except subprocess.TimeoutExpired as e:
            raise PgServerError(f"{args[0]} timed out after {TIMEOUT:.0f}s{self._log_tail()}") from e
        if check and done.returncode != 0:
            raise PgServerError(f"{' '.join(args[:2])} failed ({done.returncode}): "
                                f"{(done.stderr or done.stdout).strip()}{self._log_tail()}")
        return done

    def _log_tail(self, lines: int = 15) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- " + str(self.logfile) + " ---\n" + "\n".join(tail) if tail else ""

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.root / OWNER_FILE).exists():
            (self.root / OWNER_FILE).write_text(f"{os.getpid()}\n")
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._cmd("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\ninclude 'p2psc.conf'\n")

    def _write_conf(self) -> None:
        # a unix socket path longer than ~107 bytes fails; TCP is what the tests use anyway
        sockdir = str(self.root) if len(str(self.root)) < 90 else ""
        conf = (f"listen_addresses = '{HOST}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{sockdir}'\n"
                "fsync = off\n"
                "full_page_writes = off\n"
                "max_connections = 200\n"
                "shared_buffers = 32MB\n"
                "dynamic_shared_memory_type = posix\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n")
        path = self.data / "p2psc.conf"
        path.write_text(conf)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    @property
    def running(self) -> bool:
        """Whether the postmaster of ``data`` is alive."""
        pid = _postmaster_pid(self.data)
        return pid is not None and _alive(pid)

    def start(self) -> PgServer:
        """initdb (first time only), then start the server and wait until it takes connections."""
        if self.running:
            return self
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(3):
            self._write_conf()
            done = self._cmd("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.data),
                             "-l", str(self.logfile), check=False)
            if done.returncode == 0:
                _LIVE.add(self)
                log.debug("postgres on %s:%d (%s)", HOST, self.port, self.root)
                return self
            tail = self._log_tail()
            if self._fixed_port or attempt == 2 or "could not bind" not in tail:
                break
            self.port = _free_port()  # someone took the port between choosing and binding
        raise PgServerError(f"pg_ctl start failed ({done.returncode}): "
                            f"{(done.stderr or done.stdout).strip()}{self._log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m mode``; SIGKILL if that fails); nothing if stopped."""
        _LIVE.discard(self)
        if not self.running:
            return
        done = self._cmd("pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.data),
                         check=False)
        if done.returncode != 0 and self.running:
            log.warning("pg_ctl stop failed (%s), killing", (done.stderr or done.stdout).strip())
            self.kill()

    def restart(self) -> PgServer:
        """Stop (fast) and start again, on the same port."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash) and wait for its children to exit."""
        _LIVE.discard(self)
        pid = _postmaster_pid(self.data)
        if pid is not None and _alive(pid):
            _kill_tree(pid)
            _drop_shm(self.data)
            # all gone, but a parent that does not reap (some container inits) leaves a zombie
            # that postgres would take for a live postmaster: drop the stale lock files
            for lock in (self.data / "postmaster.pid", self.root / f".s.PGSQL.{self.port}.lock"):
                try:
                    lock.unlink()
                except FileNotFoundError:
                    pass

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- databases --------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://p2psc@127.0.0.1:PORT/dbname``."""
        return f"postgresql://{USER}@{HOST}:{self.port}/{dbname}"

    def execute(self, sql: str, dbname: str = "postgres", timeout: float = 30.0) -> str:
        """Run ``sql`` (no parameters) in ``dbname``; asyncpg's status line."""
        import asyncpg

        async def go() -> str:
            conn = await asyncpg.connect(self.url(dbname), timeout=min(timeout, 10.0))
            try:
                return await conn.execute(sql)  # type: ignore[no-any-return]
            finally:
                await conn.close(timeout=5)

        return _run_async(go, timeout)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name`` (lower case, digits, _) and return its url."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad database name {name!r}")
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ``name`` if it exists, closing its connections."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad database name {name!r}")
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __repr__(self) -> str:
        return f"PgServer({str(self.root)!r}, port={self.port})"


@atexit.register
def _stop_all() -> None:
    """Stop the servers still running when the interpreter exits."""
    for server in list(_LIVE):
        try:
            server.stop()
        except (PgServerError, OSError) as e:
            log.warning("stopping %r at exit: %s", server, e)
