"""The peer directory under load: signed lookups and signed address updates per second.

The "directory" group. For each configuration (backend, ``--workers``, center key bits) the
parent registers the peers in a fresh database (SQLite file, or a database of the PostgreSQL
that test/pgserver.py starts), then runs ``python -m p2psc directory serve`` as a subprocess
and, per number of concurrent clients, two timed phases against it:

- **lookups**: ``GET /api/get_peer_info?id=ID&nonce=32HEX``, a fresh nonce each time, the ids
  in a fixed cycle over all peers; the server signs one record per request (RSA-PSS);
- **updates**: ``POST /api/update_address``, requests pre-signed by the parent with each
  peer's own key (strictly increasing timestamps per peer, unique nonces, every peer updated
  by one client only so that they arrive in order); the server verifies, writes and signs.

The clients run in one or two load generator processes (raw HTTP/1.1 over asyncio streams on
uvloop, one keep-alive connection per client). Each phase: a warm-up, then a timed window;
the parent reads the CPU time of the server's processes and of PostgreSQL's processes from
``/proc`` at the edges of the window, the generators their own CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import os
import pstats
import secrets
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .common import HOST, CpuWindow, percentile, run_on_loop, wait_for_quiet_cpu
from .nat import readline_timeout

log = logging.getLogger("bench.directory")

REPO = Path(__file__).resolve().parent.parent
TEST_DIR = REPO / "test"
TICK = os.sysconf("SC_CLK_TCK")


def postgres_unavailable() -> str | None:
    """None when test/pgserver.py can start a PostgreSQL here, else one line saying why not."""
    if str(TEST_DIR) not in sys.path:
        sys.path.insert(0, str(TEST_DIR))
    try:
        import pgserver  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if exc.name != "pgserver":
            return f"test/pgserver.py cannot be imported: {exc}"
        return "PostgreSQL rows need test/pgserver.py (not in this tree)"
    except Exception as exc:  # noqa: BLE001 - any import failure: no PostgreSQL
        return f"test/pgserver.py cannot be imported: {exc}"
    reason: str | None = pgserver.postgres_unavailable()
    return reason


# --------------------------------------------------------------------------------------------
# CPU time from /proc
# --------------------------------------------------------------------------------------------
def _proc_stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and of its reaped children)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and all its descendants, reaped ones included (utime, stime,
    cutime and cstime: a child that exits moves its time into its parent's cutime)."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stats[int(name)] = _proc_stat(name)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


def main_thread_cpu_seconds(pid: int) -> tuple[float, float]:
    """(main thread, other threads) CPU seconds of one process."""
    main = other = 0.0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / TICK
                if int(tid) == pid:
                    main += cpu
                else:
                    other += cpu
    return main, other


# --------------------------------------------------------------------------------------------
# the peers, the databases, the server process
# --------------------------------------------------------------------------------------------
def _cli(*args: str, timeout: float = 60.0) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run([sys.executable, "-m", "p2psc", "directory", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"p2psc directory {args[0]} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


class Peers:
    """``count`` registered peers sharing ``keys`` RSA-2048 keys (peer i has key i % keys),
    and the timestamp of the last update signed for each (per database)."""

    def __init__(self, count: int, nkeys: int) -> None:
        from p2psc import keys

        self.ids = [f"bench-peer-{i:05d}" for i in range(count)]
        self.keys = [keys.generate_private_key(2048) for _ in range(max(1, min(nkeys, count)))]
        self.pems = [keys.public_key_pem(k).decode("ascii") for k in self.keys]

    def key(self, i: int) -> Any:
        return self.keys[i % len(self.keys)]

    def fill_sqlite(self, path: Path) -> None:
        from p2psc.directory.store import open_store

        with open_store(path) as store:
            for i, peer_id in enumerate(self.ids):
                store.put(peer_id, self.pems[i % len(self.pems)], HOST, 20000 + i % 10000)

    async def fill_postgres(self, url: str, template: Path) -> int:
        """Copy the SQLite template into the empty database at ``url`` (as ``p2psc directory
        migrate`` does); return the PostgreSQL postmaster's pid (for its CPU time)."""
        from p2psc.directory.pgstore import PostgresBackend
        from p2psc.directory.store import open_store

        with open_store(template) as store:
            peers, nonces = store.export()
        backend = await PostgresBackend.connect(url)
        try:
            await backend.import_store(peers, nonces)
            backend_pid = await backend._with("pid", lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
            return _proc_stat(int(backend_pid))[0]  # while that backend lives
        finally:
            await backend.close()


class ServerProcess:
    """``python -m p2psc directory serve`` (optionally under cProfile) until :meth:`stop`."""

    def __init__(self, workdir: Path, db: str, workers: int, log_path: Path, profile: Path | None = None):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
        argv = prefix + ["-m", "p2psc", "directory", "serve", "--workdir", str(workdir), "--db", db,
                         "--host", HOST, "--port", "0", "--workers", str(workers)]
        self.log_path = log_path
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=str(REPO), env=env)
        deadline = time.monotonic() + 60
        self.port = 0
        while time.monotonic() < deadline and not self.port:
            line = readline_timeout(self.proc.stdout, max(0.1, deadline - time.monotonic()))
            if not line:
                break
            if line.startswith("p2psc directory: http://"):
                self.port = int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        if not self.port:
            self.stop()
            raise RuntimeError(f"the directory server did not start; stderr: "
                               f"{log_path.read_text(errors='replace')[-400:]!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


# --------------------------------------------------------------------------------------------
# the load generator (a child process)
# --------------------------------------------------------------------------------------------
async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    i = lower.index(b"\r\ncontent-length:") + 17
    body = await reader.readexactly(int(lower[i:lower.index(b"\r\n", i)]))
    return status, body


def _lookup_requests(ids: list[str], client: int) -> Any:
    """Endless lookups of client ``client``: the ids in a cycle, a fresh nonce each."""
    j = client * 7919
    while True:
        nonce = secrets.token_hex(16)
        yield (f"GET /api/get_peer_info?id={ids[j % len(ids)]}&nonce={nonce} HTTP/1.1\r\n"
               f"Host: {HOST}\r\n\r\n").encode("ascii"), nonce.encode("ascii")
        j += 1


async def _generate(pipe: Connection, port: int, plan: dict[str, Any]) -> dict[str, Any]:
    clients = plan["clients"]  # per client: a list of update request bytes, or a lookup client index
    conns = [await asyncio.open_connection(HOST, port) for _ in clients]
    pipe.send(("ready", None))
    start_at = pipe.recv()[1]
    warm_end = start_at + plan["warmup_s"]
    end = warm_end + plan["duration_s"]
    latencies: list[float] = []
    out: dict[str, Any] = {"errors": 0, "error_samples": [], "exhausted": False, "last_done": warm_end}

    async def client(spec: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = (_lookup_requests(plan["ids"], spec) if plan["mode"] == "lookup"
                    else ((r, None) for r in spec))
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        for request, expect in requests:
            t0 = time.monotonic()
            if t0 >= end:
                return
            try:
                writer.write(request)
                status, body = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                out["errors"] += 1
                out["error_samples"].append(f"{type(exc).__name__}: {exc}"[:200])
                return
            t1 = time.monotonic()
            if status != 200 or (expect is not None and expect not in body):
                out["errors"] += 1
                if len(out["error_samples"]) < 5:
                    out["error_samples"].append(f"{status}: {body[:200]!r}")
            elif warm_end <= t0 and t1 <= end:
                latencies.append((t1 - t0) * 1e3)
                out["last_done"] = t1
        out["exhausted"] = True

    async def cpu_at(when: float) -> float:
        await asyncio.sleep(max(0.0, when - time.monotonic()))
        return time.process_time()

    cpu = asyncio.gather(cpu_at(warm_end), cpu_at(end))
    await asyncio.gather(*(client(spec, r, w) for spec, (r, w) in zip(clients, conns, strict=True)))
    cpu0, cpu1 = await cpu
    for _, writer in conns:
        writer.close()
    return {**out, "latencies_ms": latencies, "cpu_s": cpu1 - cpu0}


def generator_process(pipe: Connection, port: int, plan: dict[str, Any]) -> None:
    try:
        result = run_on_loop("uvloop", lambda: _generate(pipe, port, plan))
        pipe.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


# --------------------------------------------------------------------------------------------
# one phase: generators against a running server
# --------------------------------------------------------------------------------------------
def run_phase(server: ServerProcess, pg_pid: int | None, plan: dict[str, Any], nclients: int,
              generators: int, clients: list[Any]) -> dict[str, Any]:
    """Run ``clients`` (one spec each) spread over ``generators`` processes; measure the window."""
    waited, quiet = wait_for_quiet_cpu(plan.get("quiet_wait_s", 0.0))
    ctx = multiprocessing.get_context("fork")
    nproc = max(1, min(generators, nclients))
    procs, pipes = [], []
    try:
        for g in range(nproc):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=generator_process, daemon=True,
                               args=(child, server.port, {**plan, "clients": clients[g::nproc]}))
            proc.start()
            child.close()
            procs.append(proc)
            pipes.append(parent)
        for p in pipes:
            _expect(p, "ready", 30)
        start_at = time.monotonic() + 0.05
        for p in pipes:
            p.send(("go", start_at))
        warm_end = start_at + plan["warmup_s"]
        time.sleep(max(0.0, warm_end - time.monotonic()))
        window = CpuWindow()
        window.start()
        srv0 = tree_cpu_seconds(server.pid)
        threads0 = main_thread_cpu_seconds(server.pid)
        pg0 = tree_cpu_seconds(pg_pid) if pg_pid else 0.0
        time.sleep(max(0.0, warm_end + plan["duration_s"] - time.monotonic()))
        srv1 = tree_cpu_seconds(server.pid)
        threads1 = main_thread_cpu_seconds(server.pid)
        pg1 = tree_cpu_seconds(pg_pid) if pg_pid else 0.0
        busy, wall = window.stop()
        results = [_expect(p, "result", plan["duration_s"] + 60) for p in pipes]
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for p in pipes:
            p.close()
    lat = sorted(x for r in results for x in r["latencies_ms"])
    exhausted = any(r["exhausted"] for r in results)
    span = plan["duration_s"]
    if exhausted:  # the count bound ended the phase before the time bound
        span = max(1e-3, max(r["last_done"] for r in results) - warm_end)
    gen_cpu = sum(r["cpu_s"] for r in results)
    server_cpu, pg_cpu = srv1 - srv0, pg1 - pg0
    return {
        "clients": nclients,
        "count": len(lat),
        "per_s": len(lat) / span,
        "p50_ms": percentile(lat, 0.5) if lat else None,
        "p99_ms": percentile(lat, 0.99) if lat else None,
        "errors": sum(r["errors"] for r in results),
        "error_samples": [s for r in results for s in r["error_samples"]][:5],
        "count_bound": exhausted,
        "window_s": span,
        "server_cpu_s": server_cpu,
        "server_main_thread_cpu_s": threads1[0] - threads0[0],
        "server_other_threads_cpu_s": threads1[1] - threads0[1],
        "postgres_cpu_s": pg_cpu if pg_pid else None,
        "generator_processes": nproc,
        "generator_cpu_s": gen_cpu,
        "waited_for_quiet_s": waited,
        "found_quiet": quiet,
        "foreign_cpu_pct": max(0.0, (busy - server_cpu - pg_cpu - gen_cpu) / (wall * (os.cpu_count() or 1))
                               * 100),
    }


def _expect(pipe: Connection, what: str, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError(f"no {what} from a load generator within {timeout:.0f} s")
    command, value = pipe.recv()
    if command == "error":
        raise RuntimeError(f"load generator: {value}")
    if command != what:
        raise RuntimeError(f"load generator said {command!r}, expected {what!r}")
    return value


def update_requests(peers: Peers, last_ts: dict[int, int], nclients: int, count: int) -> list[list[bytes]]:
    """``count`` signed update requests as HTTP bytes, per client; client c updates the peers
    i with i % nclients == c, each with a timestamp newer than the last one signed for it."""
    from p2psc.directory.update import make_update_request

    per_client = math.ceil(count / nclients)
    floor = int(time.time()) - 60  # within the server's max skew (120 s) for a minute or two
    out: list[list[bytes]] = []
    for c in range(nclients):
        mine = list(range(c, len(peers.ids), nclients))
        reqs = []
        for j in range(per_client):
            i = mine[j % len(mine)]
            ts = last_ts[i] = max(last_ts.get(i, 0) + 1, floor)
            host = f"10.1.{i // 250}.{i % 250 + 1}"
            body = json.dumps(make_update_request(peers.ids[i], peers.key(i), host, 1024 + ts % 50000,
                                                  timestamp=ts)).encode("ascii")
            reqs.append(b"POST /api/update_address HTTP/1.1\r\nHost: " + HOST.encode() +
                        b"\r\nContent-Type: application/json\r\nContent-Length: " +
                        str(len(body)).encode() + b"\r\n\r\n" + body)
        out.append(reqs)
    return out


# --------------------------------------------------------------------------------------------
# the group
# --------------------------------------------------------------------------------------------
def config_label(cfg: dict[str, Any]) -> str:
    return f"{cfg['backend']}-w{cfg['workers']}-rsa{cfg['bits']}"


def run_directory(params: dict[str, Any], root: Path, runs: list[dict[str, Any]],
                  profile_dir: str | None) -> tuple[dict[str, Any], str | None]:
    """Every configuration of ``params['configs']``; returns the results and, when PostgreSQL
    cannot run here, the reason (its configurations are then left out)."""
    root.mkdir(parents=True, exist_ok=True)
    pg_reason = postgres_unavailable()
    configs = [c for c in params["configs"] if c["backend"] == "sqlite" or pg_reason is None]
    t0 = time.perf_counter()
    peers = Peers(params["peers"], params["peer_keys"])
    template = root / "template.sqlite3"
    peers.fill_sqlite(template)
    centers: dict[int, Path] = {}
    for bits in sorted({c["bits"] for c in configs}):
        centers[bits] = root / f"center-{bits}"
        _cli("init-center", "--workdir", str(centers[bits]), "--bits", str(bits))
    out: dict[str, Any] = {"params": params, "setup_s": 0.0, "points": [], "profile": None}
    out["setup_s"] = time.perf_counter() - t0
    with contextlib.ExitStack() as stack:
        pg = None
        if any(c["backend"] == "postgres" for c in configs):
            import pgserver

            pg_root = pgserver.new_root()  # reachable by the user PostgreSQL runs as
            stack.callback(shutil.rmtree, pg_root, True)
            pg = stack.enter_context(pgserver.PgServer(pg_root))
            for sql in ("ALTER SYSTEM SET fsync = on", "ALTER SYSTEM SET full_page_writes = on",
                        "SELECT pg_reload_conf()"):
                pg.execute(sql)  # durable commits, as in production (test/pgserver.py turns them off)
        for n, cfg in enumerate(configs):
            label = config_label(cfg)
            try:
                db, pg_pid = _fresh_db(cfg, n, peers, template, root, pg)
                out["points"] += _run_config(cfg, label, db, pg_pid, peers, centers[cfg["bits"]], params,
                                             root, runs)
            except Exception as exc:  # noqa: BLE001 - the next configuration still runs
                log.error("directory %s failed: %s", label, exc)
                runs.append({"test": "directory", "transport": label, "round": 0, "wall_s": 0.0,
                             "foreign_cpu_pct": 0.0, "waited_for_quiet_s": 0.0, "found_quiet": True,
                             "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        if params.get("profile") and pg is not None:
            cfg = {"backend": "postgres", "workers": 1, "bits": 3072}
            try:
                db, pg_pid = _fresh_db(cfg, len(configs), peers, template, root, pg)
                out["profile"] = profile_server(db, pg_pid, peers, centers.get(3072) or centers[max(centers)],
                                                params, root, profile_dir)
            except Exception as exc:  # noqa: BLE001 - the measurements stand without it
                log.error("directory profile failed: %s", exc)
                out["profile"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out, pg_reason


def _fresh_db(cfg: dict[str, Any], n: int, peers: Peers, template: Path, root: Path,
              pg: Any) -> tuple[str, int | None]:
    if cfg["backend"] == "sqlite":
        path = root / f"db-{n}.sqlite3"
        shutil.copyfile(template, path)
        return str(path), None
    url = pg.create_database(f"bench_directory_{n}")
    return url, asyncio.run(peers.fill_postgres(url, template))


def _run_config(cfg: dict[str, Any], label: str, db: str, pg_pid: int | None, peers: Peers, center: Path,
                params: dict[str, Any], root: Path, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points = []
    last_ts: dict[int, int] = {}
    server = ServerProcess(center, db, cfg["workers"], root / f"{label}.log")
    try:
        for nclients in cfg.get("clients") or params["clients"]:
            t_point = time.monotonic()
            base = {"warmup_s": params["warmup_s"], "duration_s": params["duration_s"],
                    "quiet_wait_s": params.get("quiet_wait_s", 0.0)}
            look = run_phase(server, pg_pid, {**base, "mode": "lookup", "ids": peers.ids}, nclients,
                             params["generators"], list(range(nclients)))
            # enough pre-signed updates for 1.5x the lookup rate (the count bound rarely ends it)
            need = int(look["per_s"] * (params["warmup_s"] + params["duration_s"]) * 1.5) + 20 * nclients
            upd = run_phase(server, pg_pid, {**base, "mode": "update"}, nclients, params["generators"],
                            update_requests(peers, last_ts, nclients, min(need, params["max_updates"])))
            point = {**cfg, "label": label, "clients": nclients, "lookup": look, "update": upd}
            points.append(point)
            errors = look["errors"] + upd["errors"]
            meta = {"test": "directory", "transport": f"{label} c{nclients}", "round": 0,
                    "wall_s": time.monotonic() - t_point,
                    "foreign_cpu_pct": max(look["foreign_cpu_pct"], upd["foreign_cpu_pct"]),
                    "waited_for_quiet_s": look["waited_for_quiet_s"] + upd["waited_for_quiet_s"],
                    "found_quiet": look["found_quiet"] and upd["found_quiet"],
                    "ok": errors == 0 and look["count"] > 0 and upd["count"] > 0}
            if not meta["ok"]:
                meta["error"] = (f"{errors} failed requests "
                                 f"{(look['error_samples'] + upd['error_samples'])[:2]}")
            runs.append(meta)
            log.info("directory %s c%d: %.0f lookups/s, %.0f updates/s", label, nclients, look["per_s"],
                     upd["per_s"])
    finally:
        code = server.stop()
        if code not in (0, None):
            log.warning("directory %s: the server exited with %s", label, code)
    return points


# --------------------------------------------------------------------------------------------
# the profile
# --------------------------------------------------------------------------------------------
#: where the main thread's own time goes, by the file or built-in its functions live in
PROFILE_BUCKETS = (
    ("socket send/recv system calls (loopback TCP: the kernel delivers to the receiver here)",
     ("_socket.socket",)),
    ("aiohttp (HTTP parsing, request and response objects, routing)", ("aiohttp",)),
    ("asyncpg (queries, protocol, pool)", ("asyncpg",)),
    ("JSON (encode the answer)", ("/json/", "_json")),
    ("asyncio event loop and thread hand-offs", ("/asyncio/", "selectors", "concurrent/futures", "threading",
                                                 "_asyncio", "_thread", "_queue", "_contextvars")),
    ("p2psc (handlers, validation)", ("/p2psc/",)),
)


#: start-up left after the idle run's subtraction, and each new PostgreSQL connection (asyncpg
#: builds an SSL context for sslmode "prefer"): not per request, left out of the shares
ONE_OFF = ("<frozen", "builtins.compile", "_imp.", "set_default_verify_paths", "load_pem_private_key",
           "__build_class__", "typing.py", "_abc.", "posix.stat", "marshal.")


def profile_server(db: str, pg_pid: int | None, peers: Peers, center: Path, params: dict[str, Any],
                   root: Path, profile_dir: str | None) -> dict[str, Any]:
    """cProfile of the one-process PostgreSQL server under lookups (``profile_clients``), minus
    the profile of the same server started and stopped without load (start-up, imports)."""
    out_dir = Path(profile_dir) if profile_dir else root
    idle, prof = out_dir / "directory-postgres-w1-idle.prof", out_dir / "directory-postgres-w1-lookups.prof"
    server = ServerProcess(center, db, 1, root / "profile.log", profile=idle)
    idle_cpu = main_thread_cpu_seconds(server.pid)[0]
    server.stop()
    server = ServerProcess(center, db, 1, root / "profile.log", profile=prof)
    plan = {"warmup_s": params["warmup_s"], "duration_s": params["profile_s"], "mode": "lookup",
            "ids": peers.ids}
    try:
        n = params["profile_clients"]
        phase = run_phase(server, pg_pid, plan, n, params["generators"], list(range(n)))
        loaded_cpu = main_thread_cpu_seconds(server.pid)[0]
    finally:
        code = server.stop()
    if not prof.exists() or not idle.exists():
        raise RuntimeError(f"no profile written (server exit {code})")
    return {"file": str(prof), "baseline_file": str(idle), "clients": params["profile_clients"],
            "lookups_per_s": phase["per_s"], "count": phase["count"], "server_cpu_s": phase["server_cpu_s"],
            "main_thread_cpu_s": phase["server_main_thread_cpu_s"],
            "other_threads_cpu_s": phase["server_other_threads_cpu_s"],
            "main_thread_cpu_net_s": loaded_cpu - idle_cpu, **summarize_profile(prof, idle)}


def summarize_profile(path: Path, baseline: Path) -> dict[str, Any]:
    """The main thread's own time under load minus that of the idle run, by bucket (epoll
    waits and :data:`ONE_OFF` left out), as shares of the main thread's busy time; and a few cumulative
    times (seconds, the idle run's subtracted too)."""
    loaded = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    base = pstats.Stats(str(baseline)).stats  # type: ignore[attr-defined]
    busy = idle = one_off = 0.0
    buckets = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    buckets["other"] = 0.0
    for key, (_cc, _nc, tottime, _ct, _callers) in loaded.items():
        filename, _line, name = key
        own = tottime - base.get(key, (0, 0, 0.0))[2]
        if "poll' of 'select.epoll" in name:
            idle += own
            continue
        if any(k in f"{filename} {name}" for k in ONE_OFF):
            one_off += own
            continue
        busy += own
        where = f"{filename} {name}"
        bucket = next((b for b, keys in PROFILE_BUCKETS if any(k in where for k in keys)), "other")
        buckets[bucket] += own
    wanted = {
        "aiohttp RequestHandler.data_received (HTTP parsing)": ("aiohttp/web_protocol.py", "data_received"),
        "aiohttp Application._handle (routing, the handler, middleware)": ("aiohttp/web_app.py", "_handle"),
        "json.dumps": ("json/__init__.py", "dumps"),
        "PostgresBackend.lookup (asyncpg query, CPU part)": ("pgstore.py", "lookup"),
        "asyncio.to_thread (hand-off of the signature)": ("asyncio/threads.py", "to_thread"),
    }
    cumulative = {}
    for label, (suffix, fname) in wanted.items():
        cumulative[label] = sum(v[3] - base.get(k, (0, 0, 0.0, 0.0))[3] for k, v in loaded.items()
                                if k[0].endswith(suffix) and k[2] == fname)
    return {"main_busy_s": busy, "main_idle_s": idle, "main_one_off_s": one_off,
            "self_shares": {k: v / busy for k, v in buckets.items()} if busy > 0 else {},
            "cumulative_s": cumulative}
