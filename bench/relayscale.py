"""How far one NAT relay process goes: memory, attach rate and idle CPU per attached peer.

The "relayscale" group (once per run, not per round). The relay is ``python -m p2psc relay
serve`` itself (default limits, ``max_peers`` 10,000), in its own process pinned to CPU 1.
Its peer folder knows ``peers[-1] + warmup`` peer ids (``scale-00000``, ...), all with the
same public key: the relay looks a key up by peer id (``<id>.pubkey.pem``), so one key pair
serves every peer id and only two keys are generated (the relay's and the peers').

One client process (CPU 0) holds every attaching peer: a
:class:`~p2psc.p2phandler.P2PHandler` per peer id, each with its
:class:`~p2psc.nat.agent.NatAgent`; attaching is ``handler.nat.ensure_link()`` (TCP connect,
the p2psc handshake with the relay, its WELCOME; the agent then sends its HELLO). The
handlers share one loaded :class:`~p2psc.config.PeerConfig` with only the peer id replaced:
loading the private key costs ~50 ms, 1,000 times would dominate the run.

Steps: ``warmup`` peers attach first (the relay's first-use allocations); then the baseline
(relay RSS from ``/proc/<pid>/status`` VmRSS, CPU from ``/proc/<pid>``); then per step the
client attaches peers up to ``peers[i]``, at most ``concurrency`` handshakes in flight
(the relay listens with asyncio's backlog of 100). Measured per step: the attach rate
(peers / seconds from the first connect to the last WELCOME), the relay's CPU over the step
per attach, its RSS after ``settle_s`` (KiB per attached peer = (RSS - baseline) / peers
attached since the baseline), and its CPU over ``idle_s`` with every peer attached and idle
(only keepalive PINGs: each end of a control link sends one after 25 s without sending; a
window of one whole keepalive interval holds one PING each way per link).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .common import CLIENT_CPU, HOST, SERVER_CPU, CpuWindow, raise_nofile
from .material import _pem_private, _pem_public, _rsa_key
from .nat import RELAY_PEER_ID, RelayProcess, relay_cpu_seconds, write_relay_folder

log = logging.getLogger("bench.relayscale")

PEER_PREFIX = "scale-"


def peer_id(index: int) -> str:
    return f"{PEER_PREFIX}{index:05d}"


def make_scale_folders(directory: Path, count: int) -> dict[str, Any]:
    """The relay's peer folder (knowing ``count`` peer ids, all with one public key) and the
    peers' shared files (private key, the relay's public key); returns their paths."""
    relay_dir = directory / "relay"
    relay_key, peer_key = _rsa_key(2048), _rsa_key(2048)
    peer_public = _pem_public(peer_key)
    write_relay_folder(relay_dir, relay_key, {peer_id(i): peer_public for i in range(count)})
    peers = directory / "peers"
    (peers / "pubkeys").mkdir(parents=True, exist_ok=True)
    (peers / "private_key.pem").write_bytes(_pem_private(peer_key))
    (peers / "private_key.pem").chmod(0o600)
    (peers / "pubkeys" / f"{RELAY_PEER_ID}.pubkey.pem").write_bytes(_pem_public(relay_key))
    (peers / "xconfig.json").write_text(json.dumps({"peer_id": peer_id(0), "host": HOST, "port": 0}))
    return {"relay_workdir": str(relay_dir), "peers": str(peers)}


def proc_rss_bytes(pid: int) -> int:
    """VmRSS of process ``pid`` (bytes)."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------------------------
# the client process: every attaching peer
# --------------------------------------------------------------------------------------------
def _peer_config(peers: str, relay_port: int) -> dict[str, Any]:
    known = Path(peers) / "peers.json"
    known.write_text(json.dumps({RELAY_PEER_ID: {"peer_id": RELAY_PEER_ID, "host": HOST,
                                                 "port": relay_port}}))
    return {
        "my_prikey_file": str(Path(peers) / "private_key.pem"),
        "xconfig": str(Path(peers) / "xconfig.json"),
        "known_peers_file": str(known),
        "peer_pubkey_path": str(Path(peers) / "pubkeys"),
        "relay": {"peer_id": RELAY_PEER_ID, "host": HOST, "port": relay_port},
        "nat_relay_timeout": 60.0,
    }


def _handlers(base: Any, ids: list[str]) -> list[Any]:
    """A P2PHandler per peer id, all on ``base`` (a loaded PeerConfig) with the id replaced:
    ``load_peer_config`` is swapped for the duration (it would load the private key again)."""
    from unittest import mock

    import p2psc.p2phandler as ph

    out = []
    for pid in ids:
        with mock.patch.object(ph, "load_peer_config", lambda _conf, _pid=pid: replace(base, peer_id=_pid)):
            out.append(ph.P2PHandler(config={}))
    return out


async def _client_main(channel: Any, spec: dict[str, Any]) -> None:
    from p2psc.config import load_peer_config

    base = load_peer_config(_peer_config(spec["peers"], spec["relay_port"]))
    handlers: list[Any] = []
    channel.send("ready", {"pid": os.getpid()})
    clock = time.perf_counter
    try:
        while True:
            command, value = await channel.recv(timeout=900.0)
            if command == "stop":
                break
            if command != "attach":
                raise RuntimeError(f"unexpected command {command!r}")
            new = _handlers(base, [peer_id(i) for i in range(value["first"], value["end"])])
            gate = asyncio.Semaphore(value["concurrency"])
            waits: list[float] = []

            async def attach(handler: Any, gate: asyncio.Semaphore = gate,
                             waits: list[float] = waits) -> None:
                async with gate:
                    t = clock()
                    await handler.nat.ensure_link()
                    waits.append(clock() - t)

            t0, cpu0 = clock(), time.process_time()
            outcomes = await asyncio.gather(*(attach(h) for h in new), return_exceptions=True)
            seconds, cpu = clock() - t0, time.process_time() - cpu0
            handlers += new
            errors = [f"{type(e).__name__}: {e}" for e in outcomes if isinstance(e, BaseException)]
            waits.sort()
            channel.send("attached", {"count": len(new), "seconds": seconds, "cpu_s": cpu,
                                      "errors": errors[:5],
                                      "failed": len(errors),
                                      "p50_ms": waits[len(waits) // 2] * 1e3 if waits else 0.0,
                                      "max_ms": waits[-1] * 1e3 if waits else 0.0})
    finally:
        await asyncio.wait_for(asyncio.gather(*(h.close() for h in handlers), return_exceptions=True), 60)
    channel.send("bye", None)


def client_process(pipe: Connection, spec: dict[str, Any]) -> None:
    """Entry point of the client process (CPU 0)."""
    from .workers import _process_main

    _process_main("relayscale-client", CLIENT_CPU, pipe, spec, lambda ch: _client_main(ch, spec))


# --------------------------------------------------------------------------------------------
# in the parent
# --------------------------------------------------------------------------------------------
def _recv(pipe: Connection, timeout: float, expect: str) -> dict[str, Any]:
    if not pipe.poll(timeout):
        raise TimeoutError(f"no {expect!r} from the client within {timeout:.0f} s")
    command, value = pipe.recv()
    if command == "error":
        raise RuntimeError(value)
    if command != expect:
        raise RuntimeError(f"expected {expect!r} from the client, got {command!r}")
    return dict(value) if isinstance(value, dict) else {}


def _foreign_pct(seconds: float, wall: float) -> float:
    """CPU seconds of other processes over ``wall`` as % of all CPUs (jiffies: coarse)."""
    return max(0.0, seconds / (wall * (os.cpu_count() or 1)) * 100) if wall > 0 else 0.0


def run_relayscale(params: dict[str, Any], root: Path, loop: str, relay_cpu: int | None) -> dict[str, Any]:
    """Run the steps; return ``{"steps": [...], "baseline_rss_mib": ..., ...}``. Raises on a
    failure (the caller records it)."""
    steps = sorted(int(n) for n in params["peers"])
    warmup = int(params["warmup"])
    total = steps[-1] + warmup
    root.mkdir(parents=True, exist_ok=True)
    t_keys = time.perf_counter()
    folders = make_scale_folders(root, total)
    setup_s = time.perf_counter() - t_keys
    relay = RelayProcess("cli", folders["relay_workdir"], root / "relay.log",
                         SERVER_CPU if relay_cpu is None else relay_cpu)
    relay.start(timeout=60.0)
    rpid = relay.pid
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    spec = {"peers": folders["peers"], "relay_port": relay.port, "loop": loop, "nofile": total + 256,
            "test": "relayscale", "transport": "client"}
    raise_nofile(total + 256)
    client = ctx.Process(target=client_process, args=(child, spec), daemon=True)
    out: dict[str, Any] = {"relay": "python -m p2psc relay serve", "setup_s": setup_s, "steps": []}
    try:
        client.start()
        child.close()
        _recv(parent, 60, "ready")
        settle = float(params["settle_s"])
        timeout = float(params.get("attach_timeout_s", 300.0))

        def attach(first: int, end: int) -> dict[str, Any]:
            window = CpuWindow()
            window.start()
            cpu0 = relay_cpu_seconds(rpid)
            parent.send(("attach", {"first": first, "end": end, "concurrency": params["concurrency"]}))
            got = _recv(parent, timeout, "attached")
            busy, wall = window.stop()
            cpu1 = relay_cpu_seconds(rpid)
            got["foreign_cpu_pct"] = _foreign_pct(busy - (cpu1 - cpu0) - got["cpu_s"], wall)
            time.sleep(settle)  # the last HELLOs are read
            got["relay_cpu_s"] = relay_cpu_seconds(rpid) - cpu0
            if got["failed"]:
                raise RuntimeError(f"{got['failed']} of {got['count']} peers did not attach: "
                                   f"{got['errors']}")
            return got

        attach(0, warmup)
        baseline = proc_rss_bytes(rpid)
        out["baseline_rss_mib"] = baseline / 2**20
        out["known_peers"] = total
        attached = warmup
        for n in steps:
            got = attach(attached, warmup + n)
            attached = warmup + n
            rss = proc_rss_bytes(rpid)
            idle_s = float(params["idle_s"])
            window = CpuWindow()
            window.start()
            cpu0, t0 = relay_cpu_seconds(rpid), time.monotonic()
            time.sleep(idle_s)
            idle_cpu, idle_wall = relay_cpu_seconds(rpid) - cpu0, time.monotonic() - t0
            busy, wall = window.stop()
            out["steps"].append({
                "peers": n,
                "attached_total": attached,
                "batch": got["count"],
                "concurrency": params["concurrency"],
                "attach_s": got["seconds"],
                "attaches_per_s": got["count"] / got["seconds"],
                "attach_p50_ms": got["p50_ms"],
                "attach_max_ms": got["max_ms"],
                "relay_cpu_ms_per_attach": got["relay_cpu_s"] / got["count"] * 1e3,
                "relay_busy_pct_attaching": got["relay_cpu_s"] / got["seconds"] * 100,
                "client_cpu_ms_per_attach": got["cpu_s"] / got["count"] * 1e3,
                "foreign_cpu_pct_attaching": got["foreign_cpu_pct"],
                "rss_mib": rss / 2**20,
                "kib_per_peer": (rss - baseline) / 1024 / n,
                "idle_s": idle_wall,
                "idle_relay_cpu_s": idle_cpu,
                "idle_relay_cpu_pct": idle_cpu / idle_wall * 100,
                "idle_cpu_ms_per_peer_per_min": idle_cpu / attached / idle_wall * 60 * 1e3,
                # (the client's keepalives included: a few ms)
                "foreign_cpu_pct_idle": _foreign_pct(busy - idle_cpu, wall),
            })
            log.info("relayscale: %d peers attached, %s", attached, out["steps"][-1])
        parent.send(("stop", None))
        _recv(parent, 90, "bye")
    finally:
        client.join(10)
        if client.is_alive():
            client.kill()
            client.join(5)
        parent.close()
        relay.stop()
    return out


#: the full run's parameters (``Settings.relayscale``) and the smoke run's
DEFAULT_PARAMS: dict[str, Any] = {"peers": [1000, 2000], "warmup": 20, "concurrency": 64, "settle_s": 1.0,
                                  "idle_s": 25.0}
SMOKE_PARAMS: dict[str, Any] = {"peers": [20], "warmup": 2, "concurrency": 8, "settle_s": 0.1, "idle_s": 0.5}


def run_group(params: dict[str, Any], loop: str, relay_cpu: int | None, quiet_wait_s: float, root: Path,
              runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The "relayscale" group, once: its outcome is one entry of ``runs`` (like the NAT lab)."""
    from .common import once_measured, wait_for_quiet_cpu

    waited, quiet = wait_for_quiet_cpu(quiet_wait_s)
    meta: dict[str, Any] = {"test": "relayscale", "transport": "relay", "round": 0,
                            "waited_for_quiet_s": waited, "found_quiet": quiet, "ok": True}
    result: dict[str, Any] | None = None
    with once_measured(meta, runs):
        try:
            result = run_relayscale(params, root, loop, relay_cpu)
        except Exception as exc:  # noqa: BLE001 - the rest of the run goes on
            log.error("relayscale failed: %s", exc)
            meta["ok"] = False
            meta["error"] = f"{type(exc).__name__}: {exc}"
    return result


# --------------------------------------------------------------------------------------------
# the saved measurement (a partial run cannot rewrite docs/BENCHMARKS.md)
# --------------------------------------------------------------------------------------------
#: where ``python -m bench`` saves the group's last real (not smoke) measurement
SAVED = Path(__file__).resolve().parent / "results" / "relayscale.json"


def save(data: dict[str, Any], path: Path = SAVED) -> None:
    """Save the group's outcome of run ``data`` with what the report needs (machine,
    settings), so that docs/BENCHMARKS.md can show it whichever run writes the docs."""
    keep = {
        "relayscale": data["relayscale"],
        "settings": {"relayscale": data["settings"]["relayscale"], "loop": data["settings"]["loop"],
                     "relay_cpu": data["settings"].get("relay_cpu")},
        "machine": data.get("machine", {}),
        "argv": data.get("argv", []),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(keep, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def results_of(data: dict[str, Any], saved: Path | None = SAVED) -> dict[str, Any] | None:
    """The group's outcome: from run ``data`` if it ran there, else the saved one (``saved``),
    else None. The result has the keys of :func:`save`."""
    if data.get("relayscale"):
        return {"relayscale": data["relayscale"], "settings": data["settings"],
                "machine": data.get("machine", {})}
    if saved is None or not saved.exists():
        return None
    try:
        loaded = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) and loaded.get("relayscale") else None
