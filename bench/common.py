"""Shared helpers: process pinning, event loops, quiet-CPU waiting, RSS, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("bench")

T = TypeVar("T")

HOST = "127.0.0.1"
#: CPU of the receiver / server, and of the sender / client (as in the anchor baselines).
SERVER_CPU = 1
CLIENT_CPU = 0

LOOP_KINDS = ("uvloop", "asyncio")


def pin_to_cpu(cpu: int) -> int:
    """Pin the calling process to one CPU (modulo the CPUs available); return the CPU used."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    chosen = available[cpu % len(available)]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {chosen})
    return chosen


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A fresh event loop of the given kind ("uvloop" or "asyncio"), set as current."""
    if kind == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    elif kind == "asyncio":
        loop = asyncio.new_event_loop()
    else:
        raise ValueError(f"unknown loop kind {kind!r}")
    asyncio.set_event_loop(loop)
    return loop


def run_on_loop(kind: str, main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` to completion on a new loop of ``kind`` and close the loop."""
    loop = new_loop(kind)
    try:
        return loop.run_until_complete(main())
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (bounded by the hard limit); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_bytes() -> int:
    """Resident set size of this process, after a full garbage collection."""
    gc.collect()
    with open("/proc/self/statm", "rb") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


@dataclass
class CpuWindow:
    """Measures the CPU busy fraction of the whole machine over a span of wall time."""

    busy0: int = 0
    total0: int = 0
    wall0: float = 0.0

    def start(self) -> None:
        self.busy0, self.total0 = _cpu_jiffies()
        self.wall0 = time.monotonic()

    def stop(self) -> tuple[float, float]:
        """Return (busy CPU seconds of all processes, wall seconds) since :meth:`start`."""
        busy1, _total1 = _cpu_jiffies()
        wall = time.monotonic() - self.wall0
        ticks = os.sysconf("SC_CLK_TCK")
        return (busy1 - self.busy0) / ticks, wall


def wait_for_quiet_cpu(max_wait: float, threshold: float = 0.10, window: float = 0.05) -> tuple[float, bool]:
    """Wait (at most ``max_wait`` s) until the machine's CPU busy fraction is under ``threshold``.

    Returns (seconds waited, whether the machine was found quiet).
    """
    start = time.monotonic()
    if max_wait <= 0:
        return 0.0, True
    deadline = start + max_wait
    while True:
        busy0, total0 = _cpu_jiffies()
        time.sleep(window)
        busy1, total1 = _cpu_jiffies()
        fraction = (busy1 - busy0) / max(1, total1 - total0)
        now = time.monotonic()
        if fraction < threshold:
            return now - start, True
        if now >= deadline:
            return now - start, False


def children_cpu_seconds() -> float:
    """User+system CPU seconds of all reaped children of this process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    """User+system CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median and [min, max] of a list of per-round values (which are kept too)."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "runs": vals,
    }


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    index = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return float(sorted_values[index])


def fmt_num(value: float | None, digits: int = 3) -> str:
    """A compact human number: 3 significant digits, thousands separators above 1000."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.{digits}g}"


def fmt_stat(stat: dict[str, Any] | None) -> str:
    """'median [min-max]' of a :func:`summarize` result."""
    if not stat or stat.get("median") is None:
        return "-"
    if len(stat.get("runs", [])) <= 1:
        return fmt_num(stat["median"])
    return f"{fmt_num(stat['median'])} [{fmt_num(stat['min'])}–{fmt_num(stat['max'])}]"


def size_label(size: int) -> str:
    """'100 B', '1 KiB', '64 KiB', '1 MiB'."""
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size >> 10} KiB"
    return f"{size} B"


def parse_size(text: str) -> int:
    """Parse '100', '100B', '1K', '1KiB', '64k', '1M', '1MiB' into bytes."""
    t = text.strip().lower().replace("ib", "").rstrip("b").strip()
    mult = 1
    if t.endswith("k"):
        mult, t = 1024, t[:-1]
    elif t.endswith("m"):
        mult, t = 1 << 20, t[:-1]
    value = int(t) * mult
    if value <= 4:
        raise ValueError(f"message size must be more than 4 bytes: {text!r}")
    return value


@contextlib.contextmanager
def once_measured(meta: dict[str, Any], runs: list[dict[str, Any]]) -> Iterator[None]:
    """Time a group that runs once (not per round): the block's wall time and the CPU that
    other processes used meanwhile (% of all CPUs) go into ``meta``, which is appended to
    ``runs``, even when the block fails."""
    window = CpuWindow()
    window.start()
    children0, self0 = children_cpu_seconds(), self_cpu_seconds()
    try:
        yield
    finally:
        busy, wall = window.stop()
        ours = (children_cpu_seconds() - children0) + (self_cpu_seconds() - self0)
        meta["wall_s"] = wall
        ncpu = os.cpu_count() or 1
        meta["foreign_cpu_pct"] = max(0.0, (busy - ours) / (wall * ncpu) * 100) if wall > 0 else 0.0
        runs.append(meta)
