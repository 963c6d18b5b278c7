"""Orchestration in the parent process: key material, rounds, process pairs, aggregation."""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import relayscale
from .common import (
    CpuWindow,
    children_cpu_seconds,
    once_measured,
    self_cpu_seconds,
    size_label,
    summarize,
    wait_for_quiet_cpu,
)
from .directory import run_directory
from .lab import lab_unavailable, run_lab
from .material import make_p2psc_material, make_tls_material
from .nat import RELAY_OF, VARIANTS, RelayProcess, make_relay_folder, relay_cpu_seconds
from .transports import p2psc_available
from .udp import p2psc_udp_available
from .workers import client_process, server_process

log = logging.getLogger("bench.runner")

NON_DEFAULT_SUITES = ("p2psc-aes", "p2psc-chacha")
GROUPS = ("tcp", "latency", "handshake", "memory", "udp", "relay", "natlab", "relayscale", "directory")
DEFAULT_SIZES = (100, 1024, 64 * 1024, 1 << 20)


@dataclass
class Settings:
    """Every knob of one benchmark invocation."""

    groups: tuple[str, ...] = GROUPS
    rounds: int = 5
    memory_rounds: int = 3
    loop: str = "uvloop"
    sizes: tuple[int, ...] = DEFAULT_SIZES
    smoke: bool = False
    quiet_wait_s: float = 4.0
    profile_dir: str | None = None
    transports: tuple[str, ...] | None = None  # None: raw, tls, p2psc and the other suite
    # per test parameters (full-run defaults; see :func:`smoke_settings`)
    tcp_warmup_s: float = 0.15
    tcp_duration_s: float = 0.5
    tcp_max_messages_bytes: int = 4_000_000_000  # count bound: at most ~4 GB per timed blast
    tcp_max_messages: int = 2_000_000
    latency: dict[str, Any] = field(
        default_factory=lambda: {"size": 100, "warmup": 200, "max_count": 5000, "duration_s": 0.5})
    handshake: dict[str, Any] = field(
        default_factory=lambda: {"warmup": 3, "duration_s": 0.5, "max_count": 3000, "clients": [1, 16]})
    handshake_bits: tuple[int, ...] = (2048, 3072)
    memory: dict[str, Any] = field(
        default_factory=lambda: {"connections": 1000, "batch": 50, "warmup": 10, "settle_s": 0.2})
    udp: dict[str, Any] = field(
        default_factory=lambda: {"sizes": [100, 1024], "duration_s": 0.5, "max_count": 2_000_000})
    #: NAT relay on 127.0.0.1 (bench/nat.py): bytes / datagrams per variant and round
    relay: dict[str, Any] = field(default_factory=lambda: {
        "tcp_bytes": 256 << 20, "tcp_size": 64 << 10, "tcp_duration_s": 10.0, "tcp_capped_duration_s": 2.0,
        "warmup_s": 0.15, "udp_size": 1200, "udp_count": 20_000, "udp_duration_s": 2.0,
        "udp_drain_limit_s": 25.0})
    #: CPU the relay process is pinned to (None: not pinned)
    relay_cpu: int | None = None
    #: NAT lab (bench/lab.py): fresh client processes per path
    natlab: dict[str, Any] = field(default_factory=lambda: {"count": 10, "gap_s": 0.5})
    #: peer directory (bench/directory.py): configurations, clients per point, time and count bounds
    directory: dict[str, Any] = field(default_factory=lambda: {
        "configs": [{"backend": "sqlite", "workers": 1, "bits": 3072},
                    {"backend": "postgres", "workers": 1, "bits": 3072},
                    {"backend": "postgres", "workers": 2, "bits": 3072},
                    {"backend": "postgres", "workers": 1, "bits": 2048, "clients": [16]}],
        "clients": [1, 4, 16, 64], "warmup_s": 0.5, "duration_s": 3.0, "max_updates": 20_000,
        "peers": 1000, "peer_keys": 50, "generators": 2,
        "profile": True, "profile_clients": 16, "profile_s": 5.0})
    #: attached peers per relay process (bench/relayscale.py)
    relayscale: dict[str, Any] = field(default_factory=lambda: dict(relayscale.DEFAULT_PARAMS))

    def tcp_max_counts(self) -> dict[str, int]:
        """Count bound per message size (the time bound usually ends the blast first)."""
        return {str(s): max(4, min(self.tcp_max_messages, self.tcp_max_messages_bytes // s))
                for s in self.sizes}


def p2psc_default_suite() -> str | None:
    """The suite p2psc picks when none is configured, if the library says."""
    try:
        from p2psc.config import default_suite_name

        return str(default_suite_name())
    except Exception:  # noqa: BLE001 - informational only
        return None


def smoke_settings(base: Settings) -> Settings:
    """Tiny counts and one round: checks that every part still runs, measures nothing."""
    base.smoke = True
    base.rounds = 1
    base.memory_rounds = 1
    base.quiet_wait_s = 0.0
    base.tcp_warmup_s = 0.005
    base.tcp_duration_s = 0.02
    base.tcp_max_messages = 500
    base.tcp_max_messages_bytes = 8 << 20
    base.latency = {"size": 100, "warmup": 5, "max_count": 50, "duration_s": 0.05}
    base.handshake = {"warmup": 1, "duration_s": 0.05, "max_count": 16, "clients": [1, 16]}
    base.handshake_bits = (2048,)
    base.memory = {"connections": 20, "batch": 10, "warmup": 1, "settle_s": 0.0}
    base.udp = {"sizes": [100, 1024], "duration_s": 0.02, "max_count": 5000}
    base.relay = {"tcp_bytes": 1 << 20, "tcp_size": 64 << 10, "tcp_duration_s": 1.0,
                  "tcp_capped_duration_s": 0.5, "warmup_s": 0.005, "udp_size": 1200, "udp_count": 200,
                  "udp_duration_s": 0.5, "udp_drain_limit_s": 5.0}
    base.directory = {
        "configs": [{"backend": "sqlite", "workers": 1, "bits": 2048},
                    {"backend": "postgres", "workers": 1, "bits": 2048}],
        "clients": [2], "warmup_s": 0.1, "duration_s": 0.3, "max_updates": 500, "peers": 20, "peer_keys": 2,
        "generators": 1, "profile": False, "profile_clients": 2, "profile_s": 0.3}
    base.relayscale = dict(relayscale.SMOKE_PARAMS)
    base.groups = tuple(g for g in base.groups if g != "natlab")  # loopback only: no lab
    return base


@dataclass
class PairOutcome:
    """What one server/client process pair produced."""

    result: dict[str, Any] | None = None
    server: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _recv(pipe: Connection, timeout: float, who: str) -> tuple[str, Any]:
    if not pipe.poll(timeout):
        raise TimeoutError(f"no answer from the {who} within {timeout:.0f} s")
    command, value = pipe.recv()
    if command == "error":
        raise RuntimeError(value)
    return command, value


def _pids_cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += relay_cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            pass
    return total


def run_pair(spec: dict[str, Any], quiet_wait_s: float, timeout: float = 180.0,
             also_ours: list[int] | None = None) -> PairOutcome:
    """Run one test in a fresh server process (CPU 1) and client process (CPU 0).

    ``also_ours``: pids of other running children (a relay) whose CPU is not foreign."""
    ctx = multiprocessing.get_context("fork")
    outcome = PairOutcome()
    waited, quiet = wait_for_quiet_cpu(quiet_wait_s)
    window = CpuWindow()
    window.start()
    children0, self0 = children_cpu_seconds(), self_cpu_seconds()
    extra0 = _pids_cpu_seconds(also_ours or [])
    s_parent, s_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    server = ctx.Process(target=server_process, args=(s_child, spec), daemon=True)
    client: multiprocessing.process.BaseProcess | None = None
    try:
        server.start()
        s_child.close()
        _, ready = _recv(s_parent, 60, "server")
        outcome.server["ready"] = ready
        client = ctx.Process(target=client_process, args=(c_child, spec, ready["port"]), daemon=True)
        client.start()
        c_child.close()
        deadline = time.monotonic() + timeout
        while True:
            command, value = _recv(c_parent, max(1.0, deadline - time.monotonic()), "client")
            if command == "result":
                outcome.result = value
                break
            if command in ("warm", "opened"):  # memory test: measure the server now
                s_parent.send(("rss", None))
                _, outcome.server[command] = _recv(s_parent, 30, "server")
                outcome.server[f"client_{command}"] = value
                c_parent.send(("go", None))
            elif command == "udp_sent":
                s_parent.send(("udp_report", None))
                _, outcome.server[f"udp:{value}"] = _recv(s_parent, 30, "server")
                c_parent.send(("next", None))
            elif command == "udp_reset":  # after a warm-up: the receiver's counters start afresh
                s_parent.send(("udp_reset", None))
                _recv(s_parent, 30, "server")
                c_parent.send(("next", None))
            else:
                raise RuntimeError(f"unexpected message from the client: {command!r}")
        s_parent.send(("stop", None))
        _recv(s_parent, 30, "server")
    except Exception as exc:  # noqa: BLE001 - one failed pair must not end the run
        outcome.error = str(exc)
        log.error("%s %s failed: %s", spec["test"], spec["transport"], exc)
    finally:
        for proc in (client, server):
            if proc is None:
                continue
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        s_parent.close()
        c_parent.close()
    busy, wall = window.stop()
    ours = (children_cpu_seconds() - children0) + (self_cpu_seconds() - self0)
    ours += _pids_cpu_seconds(also_ours or []) - extra0
    ncpu = os.cpu_count() or 1
    outcome.meta = {
        "test": spec["test"],
        "transport": spec["transport"],
        "round": spec["round"],
        "wall_s": wall,
        "foreign_cpu_pct": max(0.0, (busy - ours) / (wall * ncpu) * 100) if wall > 0 else 0.0,
        "waited_for_quiet_s": waited,
        "found_quiet": quiet,
        "ok": outcome.error is None,
    }
    if outcome.error:
        outcome.meta["error"] = outcome.error
    return outcome


class Collector:
    """Per-round values keyed by a path; summarised at the end (median, [min, max])."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], dict[int, float]] = {}

    def add(self, path: tuple[str, ...], round_index: int, value: float) -> None:
        self.values.setdefault(path, {})[round_index] = float(value)

    def tree(self) -> dict[str, Any]:
        """Nested dict: path components -> {"median", "min", "max", "runs", "rounds"}."""
        root: dict[str, Any] = {}
        for path, by_round in self.values.items():
            node = root
            for key in path[:-1]:
                node = node.setdefault(key, {})
            rounds = sorted(by_round)
            stat = summarize([by_round[r] for r in rounds])
            stat["rounds"] = rounds
            node[path[-1]] = stat
        return root


def _record(col: Collector, spec: dict[str, Any], out: PairOutcome) -> None:
    """Turn one pair's raw output into per-round values."""
    r, kind, test = spec["round"], spec["transport"], spec["test"]
    res = out.result or {}
    if test == "tcp":
        for size, m in res.items():
            for metric in ("mb_per_s", "msgs_per_s", "send_cpu_us_per_msg", "recv_cpu_us_per_msg"):
                col.add(("tcp", kind, size, metric), r, m[metric])
    elif test == "latency":
        for metric in ("p50_us", "p99_us"):
            col.add(("latency", kind, metric), r, res[metric])
    elif test == "handshake":
        bits = str(spec.get("bits", "none"))
        for clients, m in res.items():
            for metric in ("per_s", "p50_ms"):
                col.add(("handshake", kind, bits, clients, metric), r, m[metric])
    elif test == "memory":
        n = res["connections"]
        srv = out.server
        col.add(("memory", kind, "client_kib_per_conn"), r, res["client_kib_per_conn"])
        col.add(("memory", kind, "server_kib_per_conn"), r, (srv["opened"] - srv["warm"]) / n / 1024)
        col.add(("memory", kind, "server_baseline_mib"), r, srv["warm"] / 2**20)
        col.add(("memory", kind, "open_s"), r, res["open_s"])
    elif test == "udp":
        for size, m in res.items():
            rep = out.server.get(f"udp:{size}", {})
            received = rep.get("received", 0)
            span = rep.get("span_s", 0.0)
            rate = (received - 1) / span if received > 1 and span > 0 else 0.0
            col.add(("udp", kind, size, "dgrams_per_s"), r, rate)
            col.add(("udp", kind, size, "mb_per_s"), r, rate * int(size) / 1e6)
            col.add(("udp", kind, size, "sent_per_s"), r, m["sent_per_s"])
            col.add(("udp", kind, size, "loss_pct"), r, max(0.0, 1 - received / m["sent"]) * 100)
            col.add(("udp", kind, size, "send_cpu_us_per_dgram"), r, m["send_cpu_us_per_dgram"])
            if received:
                col.add(("udp", kind, size, "recv_cpu_us_per_dgram"), r, rep["recv_cpu_s"] / received * 1e6)
    elif test == "relay-tcp":
        for metric in ("mb_per_s", "send_cpu_s_per_mb", "recv_cpu_s_per_mb", "relay_cpu_s_per_mb",
                       "connect_ms"):
            col.add(("relay", "tcp", kind, metric), r, res[metric])
    elif test == "relay-udp":
        rep = out.server.get(f"udp:{res['size']}", {})
        received, span = rep.get("received", 0), rep.get("span_s", 0.0)
        if received < 2 or span <= 0:
            raise ZeroDivisionError(f"the receiver got {received} datagrams")
        rate = (received - 1) / span
        mb = received * res["size"] / 1e6
        col.add(("relay", "udp", kind, "dgrams_per_s"), r, rate)
        col.add(("relay", "udp", kind, "mb_per_s"), r, rate * res["size"] / 1e6)
        col.add(("relay", "udp", kind, "loss_pct"), r, max(0.0, 1 - received / res["sent"]) * 100)
        col.add(("relay", "udp", kind, "send_cpu_s_per_mb"), r, res["send_cpu_s"] / mb)
        col.add(("relay", "udp", kind, "recv_cpu_s_per_mb"), r, rep["recv_cpu_s"] / mb)
        col.add(("relay", "udp", kind, "relay_cpu_s_per_mb"), r, res["relay_cpu_s"] / mb)
        col.add(("relay", "udp", kind, "connect_ms"), r, res["connect_ms"])


def run_natlab(settings: Settings, root: Path, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The NAT lab part, once (not per round); its outcome is one entry of ``runs``."""
    root.mkdir(parents=True, exist_ok=True)
    waited, quiet = wait_for_quiet_cpu(settings.quiet_wait_s)
    meta: dict[str, Any] = {"test": "natlab", "transport": "lab", "round": 0, "waited_for_quiet_s": waited,
                            "found_quiet": quiet}
    result: dict[str, Any] | None = None
    with once_measured(meta, runs):
        try:
            result = run_lab(settings.natlab, root)
            failed = {k: v["errors"] for k, v in result["paths"].items() if v["errors"]}
            meta["ok"] = not failed
            if failed:
                meta["error"] = "; ".join(f"{k}: {len(e)} failed ({e[0]})" for k, e in failed.items())
        except Exception as exc:  # noqa: BLE001 - the rest of the run goes on
            log.error("natlab failed: %s", exc)
            meta["ok"] = False
            meta["error"] = f"{type(exc).__name__}: {exc}"
    return result


def run_relayscale_group(settings: Settings, ok: bool, why: str, base: Path, runs: list[dict[str, Any]],
                         skipped: dict[str, str]) -> dict[str, Any] | None:
    """The "relayscale" group if requested (once, after the rounds), else None."""
    if "relayscale" not in settings.groups:
        return None
    if not ok:
        skipped["relayscale"] = f"p2psc not importable ({why.splitlines()[0][:200]})"
        return None
    return relayscale.run_group(settings.relayscale, settings.loop, settings.relay_cpu, settings.quiet_wait_s,
                                base / "relayscale", runs)


def run_all(settings: Settings) -> dict[str, Any]:
    """Run every requested group for ``settings.rounds`` interleaved rounds; return the results."""
    started = time.time()
    skipped: dict[str, str] = {}
    ok, why = p2psc_available()
    default_suite = p2psc_default_suite() if ok else None
    if settings.transports is None:
        other = "p2psc-chacha" if default_suite == "aes-256-gcm" else "p2psc-aes"
        transports = ["raw", "tls", "p2psc", other]
    else:
        transports = list(settings.transports)
    if not ok:
        for kind in [t for t in transports if t.startswith("p2psc")]:
            skipped[kind] = f"p2psc not importable ({why.splitlines()[0][:200]})"
            transports.remove(kind)
    udp_transports = ["udp"]
    udp_ok, udp_why = p2psc_udp_available() if ok else (False, why)
    if udp_ok:
        udp_transports.append("p2psc-udp")
    else:
        skipped["p2psc-udp"] = udp_why

    tmp = tempfile.TemporaryDirectory(prefix="p2psc-bench-")
    base = Path(tmp.name)
    need_bits = sorted({2048, *(settings.handshake_bits if "handshake" in settings.groups else ())})
    t_keys = time.perf_counter()
    tls_material = {bits: make_tls_material(base / f"tls-{bits}", bits) for bits in need_bits}
    p2p_material = {bits: make_p2psc_material(base / f"p2psc-{bits}", bits) for bits in need_bits}
    keygen_s = time.perf_counter() - t_keys

    relay_folder = (make_relay_folder(p2p_material[2048], base / "relay") if "relay" in settings.groups
                    else None)

    col = Collector()
    runs: list[dict[str, Any]] = []
    pair_id = 0

    def spec_for(test: str, kind: str, round_index: int, bits: int = 2048,
                 params: Any = None) -> dict[str, Any]:
        nonlocal pair_id
        pair_id += 1
        return {
            "test": test,
            "transport": kind,
            "round": round_index,
            "bits": bits,
            "loop": settings.loop,
            "params": params,
            "tls": tls_material[bits],
            "p2psc": p2p_material[bits],
            "workdir": str(base / f"pair-{pair_id}"),
            "profile_dir": settings.profile_dir,
            "nofile": 4 * settings.memory["connections"] + 256,
            "handshake_timeout": 10.0 if settings.smoke else 30.0,
        }

    def execute(spec: dict[str, Any], also_ours: list[int] | None = None) -> None:
        out = run_pair(spec, settings.quiet_wait_s, timeout=60.0 if settings.smoke else 180.0,
                       also_ours=also_ours)
        runs.append(out.meta)
        if out.error is None:
            try:
                _record(col, spec, out)
            except (KeyError, TypeError, ZeroDivisionError) as exc:
                log.error("bad output from %s %s: %s", spec["test"], spec["transport"], exc)
                out.meta["ok"] = False
                out.meta["error"] = f"bad output: {exc}"
        log.info("round %d %s %-10s %s in %.2f s", spec["round"] + 1, spec["test"], spec["transport"],
                 "ok" if out.meta["ok"] else "FAILED", out.meta["wall_s"])

    def relay_round(r: int) -> None:
        """Both relays for this round, then TCP and UDP, each variant in a fresh process pair."""
        assert relay_folder is not None
        relays: dict[str, RelayProcess] = {}
        for kind in ("raised", "cli"):
            profile = (str(Path(settings.profile_dir) / f"relay-{kind}-round{r + 1}.prof")
                       if settings.profile_dir and kind == "raised" else None)
            relays[kind] = RelayProcess(kind, relay_folder["workdir"], base / f"relay-{kind}-{r}.log",
                                        settings.relay_cpu, profile)
        variants = list(VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)])
        try:
            started = None
            try:
                for rp in relays.values():
                    rp.launch()
                for rp in relays.values():
                    rp.wait_ready()
            except Exception as exc:  # noqa: BLE001 - recorded as failed runs; the rest goes on
                started = str(exc)
                log.error("relay: %s", exc)
            for test in ("relay-tcp", "relay-udp"):
                for kind in variants:
                    if started is not None:
                        runs.append({"test": test, "transport": kind, "round": r, "wall_s": 0.0,
                                     "foreign_cpu_pct": 0.0, "waited_for_quiet_s": 0.0, "found_quiet": True,
                                     "ok": False, "error": started})
                        continue
                    spec = spec_for(test, kind, r, params=settings.relay)
                    spec["relay"] = relays[RELAY_OF[kind]].info()
                    spec["relay_public"] = relay_folder["public"]
                    execute(spec, [rp.pid for rp in relays.values()])
        finally:
            for rp in relays.values():
                rp.stop()

    tcp_params = {
        "sizes": list(settings.sizes),
        "max_counts": settings.tcp_max_counts(),
        "warmup_s": settings.tcp_warmup_s,
        "duration_s": settings.tcp_duration_s,
    }
    for r in range(settings.rounds):
        # rotate the order of transports each round so no transport always runs first
        order = transports[r % len(transports):] + transports[: r % len(transports)] if transports else []
        for group in settings.groups:
            if group == "tcp":
                for kind in order:
                    execute(spec_for("tcp", kind, r, params=tcp_params))
            elif group == "latency":
                for kind in order:
                    execute(spec_for("latency", kind, r, params=settings.latency))
            elif group == "handshake":
                kinds = [k for k in order if k not in NON_DEFAULT_SUITES]  # the suite barely matters here
                for kind in kinds:
                    for bits in (settings.handshake_bits if kind != "raw" else (2048,)):
                        spec = spec_for("handshake", kind, r, bits=bits, params=settings.handshake)
                        if kind == "raw":
                            spec["bits"] = "none"
                        execute(spec)
            elif group == "memory" and r < settings.memory_rounds:
                for kind in [k for k in order if k not in NON_DEFAULT_SUITES]:
                    execute(spec_for("memory", kind, r, params=settings.memory))
            elif group == "udp":
                for kind in udp_transports:
                    execute(spec_for("udp", kind, r, params=settings.udp))
            elif group == "relay":
                if ok:
                    relay_round(r)
                elif r == 0:
                    skipped["relay"] = f"p2psc not importable ({why.splitlines()[0][:200]})"
    natlab: dict[str, Any] | None = None
    if "natlab" in settings.groups:
        reason = lab_unavailable()
        if reason is not None:
            skipped["natlab"] = reason  # the report's one line: "skipped natlab: <reason>"
        else:
            natlab = run_natlab(settings, base / "natlab", runs)
    directory: dict[str, Any] | None = None
    if "directory" in settings.groups:
        directory, pg_reason = run_directory({"quiet_wait_s": settings.quiet_wait_s, **settings.directory},
                                             base / "directory", runs,
                                             settings.profile_dir)
        if pg_reason is not None:
            skipped["directory-postgres"] = pg_reason
    scale = run_relayscale_group(settings, ok, why, base, runs, skipped)
    tmp.cleanup()
    results = col.tree()
    return {
        "settings": {
            "groups": list(settings.groups),
            "rounds": settings.rounds,
            "memory_rounds": min(settings.memory_rounds, settings.rounds),
            "loop": settings.loop,
            "sizes": list(settings.sizes),
            "size_labels": {str(s): size_label(s) for s in settings.sizes},
            "smoke": settings.smoke,
            "quiet_wait_s": settings.quiet_wait_s,
            "tcp": {k: v for k, v in tcp_params.items()},
            "latency": settings.latency,
            "handshake": {**settings.handshake, "bits": list(settings.handshake_bits)},
            "memory": settings.memory,
            "udp": settings.udp,
            "relay": settings.relay,
            "relay_cpu": settings.relay_cpu,
            "natlab": settings.natlab,
            "directory": settings.directory,
            "relayscale": settings.relayscale,
        },
        "transports": transports,
        "p2psc_default_suite": default_suite,
        "udp_transports": udp_transports,
        "skipped": skipped,
        "results": results,
        "natlab": natlab,
        "directory": directory,
        "relayscale": scale,
        "runs": runs,
        "keygen_s": keygen_s,
        "started_unix": started,
        "wall_s": time.time() - started,
    }
