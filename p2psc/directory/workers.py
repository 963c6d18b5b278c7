"""Running the directory server: one process, or ``--workers N`` processes sharing the port.

:func:`serve_until_signal` is one server process: it opens the store that ``--db`` names,
serves until SIGTERM (or Ctrl-C), then closes the store. :func:`supervise` runs N of them as
child processes (``python -m p2psc.directory.workers``, its options as one JSON line on
stdin: they hold the --db URL, whose password must not show on a command line that every
local user can read in /proc), each listening on the
same address with SO_REUSEPORT so that the kernel spreads new connections over them. A
worker that dies is started again (after 0.5 s, doubling up to 10 s while workers keep dying
at once), and the others go on answering meanwhile. Nothing a request changes lives in a
worker: the state is in the shared database (PostgreSQL, or one SQLite file on this machine).

A worker keeps its stdin open to the supervisor and stops when it reaches end of file: a
supervisor that dies, even by SIGKILL, leaves no orphaned worker serving the port.

Several machines run the same command against one PostgreSQL database, with the same center
key, behind any load balancer (docs/DIRECTORY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from .. import keys
from ..p2pexcept import DirectoryError, P2PError

log = logging.getLogger("p2psc.directory.workers")

__all__ = ["MAX_WORKERS", "ServeOptions", "serve_until_signal", "supervise"]

#: Most worker processes ``--workers`` accepts.
MAX_WORKERS = 64
#: Seconds a worker has to start listening.
WORKER_START_TIMEOUT = 30.0
#: Seconds a worker has to finish after SIGTERM before it is killed.
WORKER_STOP_TIMEOUT = 10.0
_RESTART_DELAY = (0.5, 10.0)  # first and longest wait before a dead worker is started again
#: Environment variable holding the center private key's passphrase, if it has one.
PASSWORD_ENV = "P2PSC_CENTER_PASSWORD"


@dataclass(frozen=True)
class ServeOptions:
    """Everything a server process needs, as plain values (sent to workers as JSON)."""

    db: str
    key_path: str
    host: str = "127.0.0.1"
    port: int = 9999
    max_skew: int = 120
    record_ttl: int = 86400
    #: PostgreSQL only: pool size and timeout (``None``: the store's defaults)
    postgres: dict[str, Any] = field(default_factory=dict)
    log_level: int = logging.INFO


def center_key_password() -> bytes | None:
    """The center key's passphrase from ``$P2PSC_CENTER_PASSWORD`` (``None`` if unset)."""
    pw = os.environ.get(PASSWORD_ENV)
    return pw.encode("utf-8") if pw else None


def load_center_key(opts: ServeOptions) -> Any:
    """The center private key (passphrase from ``$P2PSC_CENTER_PASSWORD``)."""
    return keys.load_private_key(opts.key_path, center_key_password())


async def serve_until_signal(opts: ServeOptions, key: Any, *, reuse_port: bool = False,
                             ready: Callable[[int, str], None] | None = None,
                             also: Callable[[], Any] | None = None) -> None:
    """Serve until SIGTERM or cancellation: open the store, serve, close the store.

    ``ready(port, description)`` is called once listening. ``also`` is an async callable run
    before serving, returning an object with an async ``close()`` (the in-process relay).
    """
    from .backend import open_backend
    from .server import serve
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
    try:
        backend = await open_backend(opts.db, **opts.postgres)
        extra = None
        try:
            if also is not None:
                extra = await also()
            with contextlib.suppress(asyncio.CancelledError):
                await serve(backend, key, host=opts.host, port=opts.port,
                            max_skew=opts.max_skew, record_ttl=opts.record_ttl,
                            reuse_port=reuse_port, ready=None if ready is None else
                            (lambda port: ready(port, backend.description)))
        finally:
            if extra is not None:
                await extra.close()
            await backend.close()
    except asyncio.CancelledError:
        if not terminated:
            raise
        # SIGTERM while the store or the relay was still starting: a normal stop


#: Longest options line a worker reads from its stdin.
_MAX_OPTIONS = 65536


async def _serve_while_parent(opts: ServeOptions, key: Any,
                              ready: Callable[[int, str], None]) -> None:
    """:func:`serve_until_signal`, stopped also when stdin (the supervisor's pipe) reaches
    end of file: the supervisor is gone."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.warning("directory: worker %d: the supervisor is gone; stopping", os.getpid())
            task.cancel()

    loop.add_reader(fd, readable)
    try:
        await serve_until_signal(opts, key, reuse_port=True, ready=ready)
    finally:
        loop.remove_reader(fd)


def _worker_main() -> int:
    """A worker process: ``python -m p2psc.directory.workers``, its options as one JSON line
    on stdin, which stays open (end of file: the supervisor died, the worker stops). Tells
    the supervisor its port with one line ``READY PORT`` on stdout once it listens."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s[%(process)d] %(message)s")
    line = sys.stdin.buffer.readline(_MAX_OPTIONS)
    try:
        opts = ServeOptions(**json.loads(line))
    except (ValueError, TypeError) as exc:
        log.error("p2psc directory: worker %d: no valid options on stdin (%s)", os.getpid(), exc)
        return 2
    logging.getLogger().setLevel(opts.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops workers with SIGTERM

    def ready(port: int, _description: str) -> None:
        sys.stdout.write(f"READY {port}\n")
        sys.stdout.flush()

    try:
        key = load_center_key(opts)
        asyncio.run(_serve_while_parent(opts, key, ready))
    except (P2PError, OSError) as exc:  # the database, the center key (ConfigError), the port
        log.error("p2psc directory: worker %d: %s", os.getpid(), exc)
        return 1
    except asyncio.CancelledError:  # stopped (SIGTERM, or the supervisor gone) while starting
        return 0
    return 0


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: it fixes the port
    that ``port=0`` picks, for every worker, while the supervisor runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Worker:
    """One child process and what the supervisor knows of it."""

    def __init__(self, index: int, opts: ServeOptions) -> None:
        self.index = index
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # the options go through stdin, never the command line (the password in --db); the
        # pipe stays open while the supervisor lives, its end of file stops the worker
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2psc.directory.workers"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.stdin: IO[bytes] = self.proc.stdin
        try:
            self.stdin.write(json.dumps(asdict(opts)).encode() + b"\n")
            self.stdin.flush()
        except OSError:  # it died already: the supervisor sees it exit
            pass
        self.stdout: IO[bytes] = self.proc.stdout
        os.set_blocking(self.stdout.fileno(), False)
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()

    def read_lines(self) -> list[str]:
        try:
            chunk = self.stdout.read(4096) or b""
        except BlockingIOError:
            chunk = b""
        self.buffer = (self.buffer + chunk)[-8192:]
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("directory: worker %d (pid %d) did not stop in time; killing it",
                        self.index, self.proc.pid)
            self.proc.kill()
            self.proc.wait(5)
        self.close_pipes()

    def close_pipes(self) -> None:
        self.stdout.close()
        with contextlib.suppress(OSError):
            self.stdin.close()


def supervise(opts: ServeOptions, workers: int,
              announce: Callable[[str], None] = log.info) -> int:
    """Run ``workers`` server processes on ``opts.host:opts.port`` until SIGTERM or SIGINT,
    restarting any that dies. ``announce`` gets one line per event (listening, a worker
    started or died). Returns the exit code: 0 after a signal, 1 if the first start failed."""
    if not 1 <= workers <= MAX_WORKERS:
        raise DirectoryError(f"--workers must be 1 to {MAX_WORKERS}, not {workers}")
    reserve = _reserve_port(opts.host, opts.port)
    port = reserve.getsockname()[1]
    opts = ServeOptions(**{**asdict(opts), "port": port})
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    sel = selectors.DefaultSelector()
    pool: dict[int, _Worker] = {}
    restart_at: dict[int, float] = {}
    delay = _RESTART_DELAY[0]
    announced = False
    try:
        for i in range(1, workers + 1):
            pool[i] = _Worker(i, opts)
            sel.register(pool[i].stdout, selectors.EVENT_READ, i)
        while not stopping:
            now = time.monotonic()
            for i, when in list(restart_at.items()):
                if now >= when:
                    del restart_at[i]
                    pool[i] = _Worker(i, opts)
                    sel.register(pool[i].stdout, selectors.EVENT_READ, i)
            for key, _ in sel.select(0.2):
                w = pool[key.data]
                for line in w.read_lines():
                    if line.startswith("READY ") and not w.ready:
                        w.ready = True
                        announce(f"p2psc directory: worker {w.index} (pid {w.proc.pid}) "
                                 f"serving on port {port}")
            for i, w in list(pool.items()):
                code = w.proc.poll()
                if stopping:  # a signal to the whole group: no restarts, no "died" lines
                    break
                if code is None:
                    if not w.ready and time.monotonic() - w.started > WORKER_START_TIMEOUT:
                        log.error("directory: worker %d (pid %d) did not start in %.0f s",
                                  i, w.proc.pid, WORKER_START_TIMEOUT)
                        w.proc.kill()
                    continue
                sel.unregister(w.stdout)
                w.close_pipes()
                del pool[i]
                if not announced and not w.ready:
                    # a worker failed before the service ever listened: a setup error
                    announce(f"p2psc directory: worker {i} failed to start (exit {code})")
                    return 1
                how = f"signal {-code}" if code < 0 else f"exit {code}"
                announce(f"p2psc directory: worker {i} (pid {w.proc.pid}) died ({how}); "
                         f"starting it again in {delay:g} s")
                restart_at[i] = time.monotonic() + delay
                delay = min(delay * 2, _RESTART_DELAY[1])
            if not announced and len(pool) == workers and all(w.ready for w in pool.values()):
                announced = True
                announce(f"p2psc directory: http://{opts.host}:{port}/  ({workers} workers, "
                         f"lookups at http://{opts.host}:{port}/api/get_peer_info?id=PEER_ID)")
            if pool and all(w.ready and time.monotonic() - w.started > 30 for w in
                            pool.values()) and not restart_at:
                delay = _RESTART_DELAY[0]  # everything healthy for a while: reset the backoff
        return 0
    finally:
        for w in pool.values():
            w.stop()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for w in pool.values():
            w.wait_or_kill(deadline)
        sel.close()
        reserve.close()
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(_worker_main())
