"""The benchmark's smoke mode runs end to end and writes well-formed results.

It asserts structure and that every measured number is positive, never any speed: the smoke
run uses tiny counts and its numbers mean nothing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the bench pins CPUs via Linux APIs")


def _positive(stat: Any, what: str) -> None:
    assert isinstance(stat, dict) and {"median", "min", "max", "runs"} <= set(stat), what
    assert stat["runs"], f"{what}: no runs"
    for value in stat["runs"]:
        assert isinstance(value, float) and math.isfinite(value) and value > 0, f"{what}: {value!r}"


def _finite(stat: Any, what: str) -> None:
    assert isinstance(stat, dict) and stat["runs"], what
    for value in stat["runs"]:
        assert isinstance(value, float) and math.isfinite(value), f"{what}: {value!r}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--no-plot"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"bench --smoke failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    data = json.loads((out / "latest-smoke.json").read_text())
    assert data["settings"]["smoke"] is True
    return data


def test_every_run_succeeded(smoke: dict[str, Any]) -> None:
    assert smoke["runs"], "no measurement ran"
    failed = [r for r in smoke["runs"] if not r["ok"]]
    assert not failed, failed
    for key in ("machine", "settings", "results", "targets", "transports", "skipped"):
        assert key in smoke
    assert {"raw", "tls"} <= set(smoke["transports"])
    for kind in smoke["transports"]:
        assert kind not in smoke["skipped"]


def test_tcp_throughput(smoke: dict[str, Any]) -> None:
    tcp = smoke["results"]["tcp"]
    for kind in smoke["transports"]:
        for size in smoke["settings"]["sizes"]:
            for metric in ("mb_per_s", "msgs_per_s", "send_cpu_us_per_msg", "recv_cpu_us_per_msg"):
                _positive(tcp[kind][str(size)][metric], f"tcp {kind} {size} {metric}")


def test_latency(smoke: dict[str, Any]) -> None:
    for kind in smoke["transports"]:
        for metric in ("p50_us", "p99_us"):
            _positive(smoke["results"]["latency"][kind][metric], f"latency {kind} {metric}")


def test_handshakes(smoke: dict[str, Any]) -> None:
    hs = smoke["results"]["handshake"]
    assert {"raw", "tls"} <= set(hs)
    for kind, by_bits in hs.items():
        for bits, by_clients in by_bits.items():
            assert set(by_clients) == {"1", "16"}, (kind, bits)
            for clients, metrics in by_clients.items():
                _positive(metrics["per_s"], f"handshake {kind} {bits} {clients}")
                _positive(metrics["p50_ms"], f"handshake {kind} {bits} {clients} p50")


def test_memory(smoke: dict[str, Any]) -> None:
    mem = smoke["results"]["memory"]
    assert {"raw", "tls"} <= set(mem)
    for kind, metrics in mem.items():
        # RSS deltas of a handful of connections can be zero (page granularity): finite only
        _finite(metrics["server_kib_per_conn"], f"memory {kind} server")
        _finite(metrics["client_kib_per_conn"], f"memory {kind} client")
        _positive(metrics["open_s"], f"memory {kind} open_s")


def test_udp(smoke: dict[str, Any]) -> None:
    udp = smoke["results"]["udp"]
    for kind in smoke["udp_transports"]:
        for size in smoke["settings"]["udp"]["sizes"]:
            for metric in ("dgrams_per_s", "mb_per_s", "sent_per_s"):
                _positive(udp[kind][str(size)][metric], f"udp {kind} {size} {metric}")
            _finite(udp[kind][str(size)]["loss_pct"], f"udp {kind} {size} loss")


def test_targets_are_reported(smoke: dict[str, Any]) -> None:
    for row in smoke["targets"]:
        assert row["op"] in (">=", "<=") and isinstance(row["pass"], bool)
        assert math.isfinite(row["value"]["median"])


def test_nat_relay(smoke: dict[str, Any]) -> None:
    """The relay group ran each variant over the path it names (a run fails otherwise)."""
    relay = smoke["results"]["relay"]
    for variant in ("direct", "relayed", "relayed-cli"):
        tcp, udp = relay["tcp"][variant], relay["udp"][variant]
        for metric in ("mb_per_s", "send_cpu_s_per_mb", "recv_cpu_s_per_mb", "connect_ms"):
            _positive(tcp[metric], f"relay tcp {variant} {metric}")
        for metric in ("dgrams_per_s", "mb_per_s", "send_cpu_s_per_mb", "recv_cpu_s_per_mb", "connect_ms"):
            _positive(udp[metric], f"relay udp {variant} {metric}")
        # the relay's CPU: none on the direct path (the clock may still see a wake-up)
        _finite(tcp["relay_cpu_s_per_mb"], f"relay tcp {variant} relay CPU")
        _finite(udp["relay_cpu_s_per_mb"], f"relay udp {variant} relay CPU")
        _finite(udp["loss_pct"], f"relay udp {variant} loss")
    for proto in ("tcp", "udp"):
        _positive(relay[proto]["relayed"]["relay_cpu_s_per_mb"], f"relay {proto} relayed: relay CPU")
    ran = {(r["test"], r["transport"]) for r in smoke["runs"]}
    assert {("relay-tcp", "relayed"), ("relay-udp", "relayed-cli")} <= ran
    assert "natlab" not in smoke["settings"]["groups"] and smoke["natlab"] is None  # no lab in smoke


def test_directory(smoke: dict[str, Any]) -> None:
    """The directory group served lookups and updates without an error; PostgreSQL rows are
    there unless the run says why not."""
    points = smoke["directory"]["points"]
    backends = {p["backend"] for p in points}
    assert "sqlite" in backends
    assert "postgres" in backends or "directory-postgres" in smoke["skipped"]
    for p in points:
        for phase in ("lookup", "update"):
            m = p[phase]
            assert m["errors"] == 0 and m["count"] > 0, (p["label"], phase, m["error_samples"])
            for metric in ("per_s", "p50_ms", "p99_ms", "window_s"):
                assert isinstance(m[metric], float) and m[metric] > 0, (p["label"], phase, metric)
            assert m["server_cpu_s"] >= 0 and m["generator_cpu_s"] >= 0


def test_relay_scale(smoke: dict[str, Any]) -> None:
    """The relayscale group attached its peers to one relay process and measured it."""
    scale = smoke["relayscale"]
    assert scale is not None and scale["steps"], scale
    assert [s["peers"] for s in scale["steps"]] == smoke["settings"]["relayscale"]["peers"]
    for step in scale["steps"]:
        for key in ("attaches_per_s", "relay_cpu_ms_per_attach", "client_cpu_ms_per_attach", "rss_mib"):
            assert isinstance(step[key], float) and math.isfinite(step[key]) and step[key] > 0, (key, step)
        for key in ("kib_per_peer", "idle_relay_cpu_pct", "idle_cpu_ms_per_peer_per_min"):
            assert math.isfinite(step[key]), (key, step)  # a few peers: RSS may not move
    assert ("relayscale", "relay") in {(r["test"], r["transport"]) for r in smoke["runs"]}
