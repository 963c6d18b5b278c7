"""The "Directory" tables, section of docs/BENCHMARKS.md and curve (results of bench/directory.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import fmt_num

BACKEND_LABELS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def load_saved(path: Path) -> dict[str, Any] | None:
    """The directory results saved by the last run of the group (``directory.json``), if any."""
    if not path.exists():
        return None
    saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return saved


def _per(count: float, seconds: float | None) -> str:
    return fmt_num(count / seconds) if seconds else "-"


def _cpu_per_s(phase: dict[str, Any], key: str) -> str:
    value = phase.get(key)
    return "-" if value is None else f"{value / phase['window_s']:.2f}"


def _ms_per(phase: dict[str, Any], key: str) -> str:
    value = phase.get(key)
    return "-" if value is None or not phase["count"] else f"{value / phase['count'] * 1e3:.2f}"


def directory_tables(directory: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, markdown table): throughput and latency; CPU per request."""
    points = directory.get("points") or []
    if not points:
        return []
    p = directory["params"]
    rows, cpu_rows = [], []
    for pt in points:
        look, upd = pt["lookup"], pt["update"]
        name = [BACKEND_LABELS.get(pt["backend"], pt["backend"]), str(pt["workers"]), f"RSA-{pt['bits']}",
                str(pt["clients"])]
        rows.append(name + [
            fmt_num(look["per_s"]), fmt_num(look["p50_ms"]), fmt_num(look["p99_ms"]),
            fmt_num(upd["per_s"]) + (" (count bound)" if upd["count_bound"] else ""),
            fmt_num(upd["p50_ms"]), fmt_num(upd["p99_ms"]), str(look["errors"] + upd["errors"]),
            _cpu_per_s(look, "server_cpu_s"), _per(look["count"], look["server_cpu_s"])])
        gen = max(look["generator_cpu_s"] / look["window_s"], upd["generator_cpu_s"] / upd["window_s"])
        cpu_rows.append(name + [
            _ms_per(look, "server_cpu_s"), _ms_per(look, "server_other_threads_cpu_s")
            if pt["workers"] == 1 else "-", _ms_per(look, "postgres_cpu_s"),
            _ms_per(upd, "server_cpu_s"), _per(upd["count"], upd["server_cpu_s"]),
            _ms_per(upd, "postgres_cpu_s"),
            f"{gen * 100:.0f} % of a core ({look['generator_processes']} proc.)",
            f"{max(look['foreign_cpu_pct'], upd['foreign_cpu_pct']):.0f}"])
    return [
        (f"Lookups and updates per second ({p['duration_s']:g} s windows after {p['warmup_s']:g} s warm-up; "
         "server CPU/s and lookups per server-CPU-second over the lookup window)",
         _md_table(["backend", "workers", "center key", "clients", "lookups/s", "p50 ms", "p99 ms",
                    "updates/s", "p50 ms", "p99 ms", "errors", "server CPU/s", "lookups per server-CPU-s"],
                   rows)),
        ("CPU per request: the server's processes, its signing threads, PostgreSQL's processes; the load "
         "generators (busiest phase); other processes' CPU (% of both CPUs, busiest phase)",
         _md_table(["backend", "workers", "center key", "clients", "server ms/lookup", "of which threads",
                    "PostgreSQL ms/lookup", "server ms/update", "updates per server-CPU-s",
                    "PostgreSQL ms/update", "load generators", "foreign CPU %"], cpu_rows)),
    ]


def profile_lines(profile: dict[str, Any] | None) -> list[str]:
    """The profile's summary as Markdown bullets."""
    if not profile:
        return []
    if "error" in profile:
        return [f"- **profile failed**: {profile['error']}", ""]
    main, other = profile["main_thread_cpu_s"], profile["other_threads_cpu_s"]
    total = main + other
    lines = [
        f"Profile: the 1-process PostgreSQL server (RSA-3072) under {profile['clients']} clients' lookups, "
        f"{fmt_num(profile['lookups_per_s'])} lookups/s under cProfile. Server CPU in the window, from "
        f"`/proc`: main thread {main:.2f} s ({main / total:.0%}), signing threads {other:.2f} s "
        f"({other / total:.0%}) — cProfile sees only the main thread. The main thread's own time by "
        f"where it is spent ({profile['main_busy_s']:.2f} s busy after subtracting an idle start/stop; "
        f"{max(0.0, profile['main_one_off_s']):.2f} s of one-off imports and new-connection set-up "
        "left out; its CPU time "
        f"over the same span, from `/proc`, was {profile.get('main_thread_cpu_net_s', 0.0):.2f} s: "
        "cProfile's clock is the wall clock, so time the process spent preempted counts too, mostly in "
        "the socket `send` that woke the receiver):" if total else "Profile:",
        "",
        _md_table(["where (self time)", "share"],
                  [[k, f"{v:.0%}"] for k, v in sorted(profile["self_shares"].items(),
                                                      key=lambda kv: -kv[1])]),
        "",
        _md_table(["cumulative (main thread)", "seconds"],
                  [[k, f"{v:.2f}"] for k, v in profile["cumulative_s"].items()]),
        "",
    ]
    return lines


def directory_markdown(directory: dict[str, Any] | None, skipped: dict[str, str],
                       plot_name: str | None = None) -> list[str]:
    """The "Directory" section of docs/BENCHMARKS.md."""
    if not directory:
        return []
    lines = ["## Directory", ""]
    if directory.get("when_utc"):
        lines += [f"From the run of {directory['when_utc']} (`bench/results/directory.json`, written by the "
                  "last run of this group).", ""]
    if "directory-postgres" in skipped:
        lines += [f"- **PostgreSQL rows skipped**: {skipped['directory-postgres']}", ""]
    for title, table in directory_tables(directory):
        lines += [f"### {title}", "", table, ""]
    if plot_name:
        lines += [f"![directory lookups and updates per second]({plot_name})", ""]
    lines += profile_lines(directory.get("profile"))
    p = directory["params"]
    lines += [
        f"- **Setup**: {p['peers']:,} registered peers (sharing {p['peer_keys']} RSA-2048 keys), all on "
        "127.0.0.1: `python -m p2psc directory serve --port 0 --workers N` as a subprocess (its log, one "
        "line per update, to a file); PostgreSQL started by test/pgserver.py with `fsync` and "
        "`full_page_writes` turned back on, a fresh database per row filled as `p2psc directory migrate` "
        "does; SQLite with its defaults (a rollback journal, an fsync per commit).",
        f"- **Load**: {p['generators']} load generator processes (raw HTTP/1.1 over asyncio streams, uvloop, "
        "one keep-alive connection per client, one request in flight per client). Lookups: "
        "`GET /api/get_peer_info?id=ID&nonce=32HEX`, a fresh nonce each (one RSA-PSS signature each, no "
        "cache), ids in a fixed cycle; the answer must carry the nonce. Updates: `POST /api/update_address`, "
        "pre-signed by the parent with each peer's own key, each peer updated by one client in timestamp "
        "order; the server verifies, writes the nonce and address in one transaction, and signs the answer.",
        "- **CPU**: utime+stime of the server's process tree and of PostgreSQL's (the postmaster and "
        "every backend) from `/proc` at the edges of the timed window; the generators' own process time. "
        "Both CPUs run everything (server, PostgreSQL, generators): nothing is pinned. One run, no rounds; "
        "each phase waits (at most a few seconds) for a quiet machine first, and the foreign CPU column "
        "says how busy other processes kept it.",
        "",
    ]
    return lines


def plot_directory(directory: dict[str, Any], path: Path) -> None:
    """Lookups/s and updates/s against the number of clients, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels: dict[str, list[dict[str, Any]]] = {}
    for pt in directory.get("points") or []:
        backend = BACKEND_LABELS.get(pt["backend"], pt["backend"])
        name = f"{backend}, {pt['workers']} worker(s), RSA-{pt['bits']}"
        labels.setdefault(name, []).append(pt)
    for ax, phase, title in ((axes[0], "lookup", "lookups/s (a fresh nonce each)"),
                             (axes[1], "update", "signed address updates/s")):
        for name, pts in labels.items():
            xs = [pt["clients"] for pt in pts]
            ax.plot(xs, [pt[phase]["per_s"] for pt in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ticks = sorted({pt["clients"] for pts in labels.values() for pt in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
