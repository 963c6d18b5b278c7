"""Tables (console and Markdown), target checks, the plot, and docs/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import ssl
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import fmt_num, fmt_stat, size_label
from .directory_report import directory_markdown, directory_tables

P2PSC_KINDS = ("p2psc", "p2psc-aes", "p2psc-chacha")
STREAM_ORDER = ("raw", "tls", "p2psc", "p2psc-aes", "p2psc-chacha")
LABELS = {
    "raw": "raw TCP",
    "tls": "TLS 1.3",
    "p2psc": "p2psc (default suite)",
    "p2psc-aes": "p2psc aes-256-gcm",
    "p2psc-chacha": "p2psc chacha20-poly1305",
    "udp": "plain UDP",
    "p2psc-udp": "p2psc UDP",
}


def machine_info(loop: str) -> dict[str, Any]:
    """Python, platform, CPUs and library versions of this machine."""
    info: dict[str, Any] = {
        "when_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ssl_openssl": ssl.OPENSSL_VERSION,
        "loop": loop,
    }
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend

        info["cryptography"] = cryptography.__version__
        info["cryptography_openssl"] = backend.openssl_version_text()
    except Exception as exc:  # noqa: BLE001 - informational only
        info["cryptography"] = f"unknown ({exc})"
    try:
        import uvloop

        info["uvloop"] = uvloop.__version__
    except Exception:  # noqa: BLE001
        info["uvloop"] = None
    try:
        from importlib.metadata import version

        info["p2psc"] = version("p2psc")
    except Exception:  # noqa: BLE001
        info["p2psc"] = None
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _set_default_label(data: dict[str, Any]) -> None:
    suite = data.get("p2psc_default_suite")
    if suite:
        LABELS["p2psc"] = f"p2psc default ({suite})"


# --------------------------------------------------------------------------------------------
# lookups and ratios
# --------------------------------------------------------------------------------------------
def _get(tree: dict[str, Any], *path: str) -> dict[str, Any] | None:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, dict) and "median" in node else None


def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> dict[str, Any] | None:
    """Ratio num/den: the median of per-round ratios where rounds pair up, else of medians."""
    if not num or not den or num.get("median") is None or not den.get("median"):
        return None
    pairs = dict(zip(den.get("rounds", []), den.get("runs", []), strict=False))
    per_round = [v / pairs[r] for r, v in zip(num.get("rounds", []), num.get("runs", []), strict=False)
                 if pairs.get(r)]
    if per_round:
        return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                "runs": per_round}
    value = num["median"] / den["median"]
    return {"median": value, "min": value, "max": value, "runs": [value]}


@dataclass(frozen=True)
class Target:
    """One target of issue 6: a ratio against a baseline transport, or an absolute bound."""

    key: str
    label: str
    path: tuple[str, ...]  # with "{t}" for the transport
    baseline: str | None  # transport to divide by; None = absolute value
    op: str  # ">=" or "<="
    bound: float
    unit: str = "x"


TARGETS = (
    Target("tput_64k", "throughput 64 KiB vs TLS", ("tcp", "{t}", "65536", "mb_per_s"), "tls", ">=", 1.2),
    Target("tput_1m", "throughput 1 MiB vs TLS", ("tcp", "{t}", "1048576", "mb_per_s"), "tls", ">=", 1.2),
    Target("msgs_100", "messages/s 100 B vs TLS", ("tcp", "{t}", "100", "msgs_per_s"), "tls", ">=", 2.0),
    Target("msgs_1k", "messages/s 1 KiB vs TLS", ("tcp", "{t}", "1024", "msgs_per_s"), "tls", ">=", 2.0),
    Target("rtt_p50", "RTT p50 100 B vs TLS (lower is better)", ("latency", "{t}", "p50_us"), "tls", "<=",
           1.0),
    Target("hs_seq", "handshakes/s sequential, RSA-2048, vs TLS", ("handshake", "{t}", "2048", "1", "per_s"),
           "tls", ">=", 1.5),
    Target("hs_16", "handshakes/s 16 clients, RSA-2048, vs TLS", ("handshake", "{t}", "2048", "16", "per_s"),
           "tls", ">=", 1.5),
    Target("mem_server", "memory per idle connection, server (KiB)", ("memory", "{t}", "server_kib_per_conn"),
           None, "<=", 8.0, "KiB"),
    Target("mem_client", "memory per idle connection, client (KiB)", ("memory", "{t}", "client_kib_per_conn"),
           None, "<=", 8.0, "KiB"),
    Target("udp_100", "UDP datagrams/s 100 B vs plain UDP", ("udp", "{t}", "100", "dgrams_per_s"), "udp",
           ">=", 0.6),
    Target("udp_1k", "UDP datagrams/s 1 KiB vs plain UDP", ("udp", "{t}", "1024", "dgrams_per_s"), "udp",
           ">=", 0.6),
)


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target for every p2psc variant that was measured: value, bound, pass/fail."""
    tree = data["results"]
    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        kinds = ("p2psc-udp",) if target.path[0] == "udp" else P2PSC_KINDS
        for kind in kinds:
            path = tuple(p.replace("{t}", kind) for p in target.path)
            value = _get(tree, *path)
            if value is None:
                continue
            if target.baseline is not None:
                base = _get(tree, *(p.replace("{t}", target.baseline) for p in target.path))
                value = ratio(value, base)
                if value is None:
                    continue
            median = value["median"]
            passed = median >= target.bound if target.op == ">=" else median <= target.bound
            rows.append({
                "target": target.key,
                "label": target.label,
                "transport": kind,
                "value": value,
                "op": target.op,
                "bound": target.bound,
                "unit": target.unit,
                "pass": passed,
            })
    return rows


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A Markdown table (also readable as console output)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    sep = ["--:" if a == "r" else ":--" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pair_cell(first: dict[str, Any] | None, second: dict[str, Any] | None) -> str:
    """'median / median' of two statistics ('-' for a missing one)."""
    return (f"{fmt_num(first['median']) if first else '-'} / "
            f"{fmt_num(second['median']) if second else '-'}")


def _ratio_cell(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
    r = ratio(num, den)
    return f"{r['median']:.2f}" if r else "-"


def tables(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, markdown table) for every measured section."""
    _set_default_label(data)
    tree = data["results"]
    stream = [t for t in STREAM_ORDER if t in tree.get("tcp", {})]
    p2p = [t for t in P2PSC_KINDS if t in stream]
    out: list[tuple[str, str]] = []
    if "tcp" in tree:
        header = ["message", "metric"] + [LABELS[t] for t in stream]
        for t in p2p:
            header += [f"{t}/TLS", f"{t}/raw"]
        rows = []
        for size in data["settings"]["sizes"]:
            s = str(size)
            for metric, name in (("mb_per_s", "MB/s"), ("msgs_per_s", "msg/s")):
                row = [size_label(size), name] + [fmt_stat(_get(tree, "tcp", t, s, metric)) for t in stream]
                for t in p2p:
                    mine = _get(tree, "tcp", t, s, metric)
                    row += [_ratio_cell(mine, _get(tree, "tcp", "tls", s, metric)),
                            _ratio_cell(mine, _get(tree, "tcp", "raw", s, metric))]
                rows.append(row)
        out.append(("One-way throughput (MB/s = 10^6 payload bytes/s; median [min–max] over rounds)",
                    md_table(header, rows, ["l", "l"] + ["r"] * (len(header) - 2))))
        header = ["message"] + [LABELS[t] for t in stream]
        rows = []
        for size in data["settings"]["sizes"]:
            s = str(size)
            cells = []
            for t in stream:
                snd = _get(tree, "tcp", t, s, "send_cpu_us_per_msg")
                rcv = _get(tree, "tcp", t, s, "recv_cpu_us_per_msg")
                cells.append(_pair_cell(snd, rcv))
            rows.append([size_label(size)] + cells)
        out.append(("CPU µs per message, sender / receiver (medians)", md_table(header, rows)))
    if "latency" in tree:
        kinds = [t for t in STREAM_ORDER if t in tree["latency"]]
        rows = []
        for t in kinds:
            p50 = _get(tree, "latency", t, "p50_us")
            rows.append([LABELS[t], fmt_stat(p50), fmt_stat(_get(tree, "latency", t, "p99_us")),
                         _ratio_cell(p50, _get(tree, "latency", "tls", "p50_us")),
                         _ratio_cell(p50, _get(tree, "latency", "raw", "p50_us"))])
        size = data["settings"]["latency"]["size"]
        out.append((f"Request/response latency, {size} B (client sends, server echoes from its callback)",
                    md_table(["transport", "p50 µs", "p99 µs", "p50 x TLS", "p50 x raw"], rows)))
    if "handshake" in tree:
        rows = []
        hs = tree["handshake"]
        for t in [k for k in ("raw", "tls", "p2psc") if k in hs]:
            for bits in sorted(hs[t], key=lambda b: (b != "none", b)):
                for clients in sorted(hs[t][bits], key=int):
                    per_s = _get(hs, t, bits, clients, "per_s")
                    tls = _get(hs, "tls", bits, clients, "per_s")
                    label = "TCP connect only" if t == "raw" else LABELS[t]
                    rows.append([label, "-" if bits == "none" else f"RSA-{bits}", clients, fmt_stat(per_s),
                                 fmt_stat(_get(hs, t, bits, clients, "p50_ms")),
                                 _ratio_cell(per_s, tls) if t != "tls" and t != "raw" else "-"])
        out.append(("Full handshakes per second (connect + handshake + one ping round trip + close)",
                    md_table(["transport", "keys", "clients", "handshakes/s", "p50 ms", "x TLS"], rows)))
    if "memory" in tree:
        rows = []
        mem = tree["memory"]
        for t in [k for k in ("raw", "tls", "p2psc") if k in mem]:
            rows.append([LABELS[t], fmt_stat(_get(mem, t, "server_kib_per_conn")),
                         fmt_stat(_get(mem, t, "client_kib_per_conn")),
                         fmt_stat(_get(mem, t, "server_baseline_mib")), fmt_stat(_get(mem, t, "open_s"))])
        n = data["settings"]["memory"]["connections"]
        out.append((f"Memory per idle established connection ({n:,} connections; RSS delta / count)",
                    md_table(["transport", "server KiB/conn", "client KiB/conn", "server baseline MiB",
                              f"open {n:,} s"], rows)))
    if "udp" in tree:
        rows = []
        udp = tree["udp"]
        for t in [k for k in ("udp", "p2psc-udp") if k in udp]:
            for size in sorted(udp[t], key=int):
                dg = _get(udp, t, size, "dgrams_per_s")
                snd = _get(udp, t, size, "send_cpu_us_per_dgram")
                rcv = _get(udp, t, size, "recv_cpu_us_per_dgram")
                rows.append([LABELS[t], size_label(int(size)), fmt_stat(_get(udp, t, size, "sent_per_s")),
                             fmt_stat(dg), fmt_stat(_get(udp, t, size, "mb_per_s")),
                             fmt_stat(_get(udp, t, size, "loss_pct")),
                             _pair_cell(snd, rcv),
                             _ratio_cell(dg, _get(udp, "udp", size, "dgrams_per_s")) if t != "udp" else "-"])
        out.append(("UDP datagrams (receiver rate = received / (last − first arrival); "
                    "loss = 1 − received/sent)",
                    md_table(["transport", "payload", "sent/s", "received dgram/s", "received MB/s", "loss %",
                              "CPU µs/dgram snd / rcv", "x plain"], rows)))
    targets = evaluate_targets(data)
    if targets:
        rows = []
        for target_row in targets:
            v = target_row["value"]
            unit = "" if target_row["unit"] == "x" else f" {target_row['unit']}"
            spread = f" [{v['min']:.2f}–{v['max']:.2f}]" if len(v["runs"]) > 1 else ""
            rows.append([target_row["label"], target_row["transport"], f"{v['median']:.2f}{unit}{spread}",
                         f"{target_row['op']} {target_row['bound']:g}{unit}",
                         "PASS" if target_row["pass"] else "FAIL"])
        out.append(("Targets of issue 6 (informational; ratios are medians of per-round ratios)",
                    md_table(["target", "transport", "measured", "target", "result"], rows,
                             ["l", "l", "r", "r", "l"])))
    return out


RELAY_LABELS = {
    "direct": "direct",
    "relayed": "relayed (relay limits raised)",
    "relayed-cli": "relayed (`p2psc relay serve`, default limits)",
}


def _small_ratio_cell(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
    """As :func:`_ratio_cell`, with two significant digits below 0.1 (0.0047, not 0.00)."""
    r = ratio(num, den)
    if not r:
        return "-"
    return f"{r['median']:.2g}" if r["median"] < 0.1 else f"{r['median']:.2f}"


def _ms_per_mb(stat: dict[str, Any] | None) -> str:
    """CPU seconds per MB as milliseconds per MB."""
    return fmt_num(stat["median"] * 1e3) if stat and stat.get("median") is not None else "-"


def _lab_ms(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("median") is None:
        return "-"
    return f"{fmt_num(stat['median'])} / {fmt_num(stat['p90'])}"


def nat_tables(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The NAT traversal tables: the lab's time to first message, the relay on loopback."""
    out: list[tuple[str, str]] = []
    lab = data.get("natlab")
    if lab and lab.get("paths"):
        rows = []
        plain = {p["kind"]: p["first_ms"] for p in lab["paths"].values() if p["client"] == "cplain"}
        for p in lab["paths"].values():
            got = ", ".join(f"{'direct (path None: no relay)' if name == 'None' else name} ×{n}"
                            for name, n in sorted(p["paths"].items(), key=lambda kv: -kv[1]))
            base = plain.get(p["kind"])
            mine = p["first_ms"].get("median")
            x = (f"{mine / base['median']:.1f}" if base and base.get("median") and mine
                 and p["client"] != "cplain" else "-")
            rows.append([p["label"], f"{p['client']} → {p['server']}", got, _lab_ms(p["handshake_ms"]),
                         _lab_ms(p["first_ms"]), x])
        n = max((len(p["samples"]) for p in lab["paths"].values()), default=0)
        out.append((f"NAT traversal in the namespace lab: time to the first echoed message ({n} fresh client "
                    "processes per path; median / p90)",
                    md_table(["path", "client → server", "path got", "handshake done ms", "first echo ms",
                              "first echo x no relay"], rows, ["l", "l", "l", "r", "r", "r"])))
    relay = data["results"].get("relay")
    if relay:
        tcp, udp = relay.get("tcp", {}), relay.get("udp", {})
        rows = []
        for v in [k for k in RELAY_LABELS if k in tcp]:
            mb = _get(tcp, v, "mb_per_s")
            rows.append([RELAY_LABELS[v], fmt_stat(mb),
                         _small_ratio_cell(mb, _get(tcp, "direct", "mb_per_s")) if v != "direct" else "-",
                         f"{_ms_per_mb(_get(tcp, v, 'send_cpu_s_per_mb'))} / "
                         f"{_ms_per_mb(_get(tcp, v, 'recv_cpu_s_per_mb'))} / "
                         f"{_ms_per_mb(_get(tcp, v, 'relay_cpu_s_per_mb'))}",
                         fmt_stat(_get(tcp, v, "connect_ms"))])
        if rows:
            r = data["settings"]["relay"]
            out.append((f"NAT relay on 127.0.0.1, TCP: {r['tcp_bytes'] / 2**20:g} MiB in "
                        f"{size_label(r['tcp_size'])} messages, one connection "
                        "(median [min–max] over rounds)",
                        md_table(["path", "MB/s", "x direct", "CPU ms per MB: sender / receiver / relay",
                                  "connect + handshake ms"], rows)))
        rows = []
        for v in [k for k in RELAY_LABELS if k in udp]:
            dg = _get(udp, v, "dgrams_per_s")
            rows.append([RELAY_LABELS[v], fmt_stat(dg), fmt_stat(_get(udp, v, "mb_per_s")),
                         _small_ratio_cell(dg, _get(udp, "direct", "dgrams_per_s")) if v != "direct" else "-",
                         fmt_stat(_get(udp, v, "loss_pct")),
                         f"{_ms_per_mb(_get(udp, v, 'send_cpu_s_per_mb'))} / "
                         f"{_ms_per_mb(_get(udp, v, 'recv_cpu_s_per_mb'))} / "
                         f"{_ms_per_mb(_get(udp, v, 'relay_cpu_s_per_mb'))}",
                         fmt_stat(_get(udp, v, "connect_ms"))])
        if rows:
            r = data["settings"]["relay"]
            out.append((f"NAT relay on 127.0.0.1, UDP: {r['udp_count']:,} datagrams of {r['udp_size']} B "
                        "(received rate = received / (last − first arrival))",
                        md_table(["path", "received dgram/s", "received MB/s", "x direct", "loss %",
                                  "CPU ms per received MB: sender / receiver / relay",
                                  "connect + handshake ms"], rows)))
    return out


def _wrap_bullets(paragraphs: list[str]) -> list[str]:
    """Markdown bullets, one line each (the file's other method bullets are one line too)."""
    return [f"- {p}" for p in paragraphs]


def nat_markdown(data: dict[str, Any]) -> list[str]:
    """The "NAT traversal" section of docs/BENCHMARKS.md: the tables and how they were made."""
    s = data["settings"]
    skipped = data.get("skipped", {})
    tabs = dict(nat_tables(data))
    if not tabs and "natlab" not in skipped and "relay" not in skipped:
        return []
    lines = ["## NAT traversal", ""]
    lab_title = next((t for t in tabs if t.startswith("NAT traversal in the namespace lab")), None)
    if lab_title is not None:
        lab = data["natlab"]
        lines += [f"### {lab_title}", "", tabs[lab_title], "", *_wrap_bullets([
            "**Lab**: test/natlab.py, network namespaces with nftables NATs and no added delay (a veth "
            "round trip is ~0.05 ms): what is measured is p2psc's own cost, CPU and timers. The relay "
            "(`python -m p2psc relay serve`) runs on the public server host; echo servers "
            "(test/nat_peer.py) behind a cone NAT (`sa-*`) and on a public host (`sp-*`); clients "
            "behind a second cone NAT (`cb`, `cbn`, `cplain`, `cbd`) and a symmetric NAT (`ce`). Peers "
            "behind NAT are known at their private address, which other sites cannot reach (the lab's "
            "router answers ICMP unreachable); `cbd` knows `sa-tcp` at an address whose packets the "
            "router drops without a word.",
            "**Each sample is a fresh client process** (test/nat_peer.py): the times run from just after "
            "its handler is built, so a NAT path includes attaching to the relay (a p2psc handshake "
            "with it), the UDP probe and the rendezvous. 'handshake done': the connect call until the "
            "p2psc handshake with the server completed; 'first echo': until the echo of one 1000-byte "
            "message came back. The samples of all paths are interleaved, a client every "
            f"{s['natlab'].get('gap_s', 0.5)} s.",
            f"**Settings**: {lab.get('settings', '')}, so the relayed UDP row honestly "
            "includes the punch budget spent before the fallback; the `nat_punch: false` row shows the "
            "relay's own cost. TCP is never punched: a TCP client tries the address it knows and then "
            "opens a relayed circuit, at once where that address is refused, after "
            "`nat_direct_timeout` where its packets vanish.",
            "'x no relay': the median first echo over that of the client without a relay, same "
            "transport.",
        ]), ""]
    elif "natlab" in skipped:
        lines += [f"- **NAT lab skipped**: {skipped['natlab']}", ""]
    for title, table in tabs.items():
        if title == lab_title:
            continue
        lines += [f"### {title}", "", table, ""]
    if any(t.startswith("NAT relay") for t in tabs):
        r = s["relay"]
        pin = f"on CPU {s['relay_cpu']}" if s.get("relay_cpu") is not None else "not pinned"
        lines += [*_wrap_bullets([
            "**Relay on 127.0.0.1**, in its own process: `relayed (relay limits raised)` is `python -m "
            "bench.relayproc`, the relay of `p2psc relay serve` (same `RelayServer`, same handler, "
            "uvloop) with `relay_bytes_per_sec` and `relay_burst_bytes` raised out of reach, so that its "
            "own cost is measured; `p2psc relay serve` itself, with its default limits (8 MiB/s per "
            f"peer, 1 MiB burst), is the last row. Client on CPU 0, server on CPU 1, relay {pin}: on "
            "this 2-CPU machine a relayed transfer runs three busy processes on two CPUs.",
            "**Same peers, same config** (both ends name the relay) on every row; only what the client "
            "knows of the server differs. direct: its real address. Relayed TCP: a closed port, so "
            "`connect_peer` is refused and opens a relayed circuit. Relayed UDP: port 0 and "
            "`nat_punch: false`, so sealed datagrams travel in DGRAM frames over both peers' control "
            "links. Each row checks the path the connection got.",
            f"**TCP**: a warm-up, then {r['tcp_bytes'] / 2**20:g} MiB in {size_label(r['tcp_size'])} "
            "messages (`send` + `drain`), timed from the first send to the receiver's answer to a sync "
            f"marker; bounded by {r['tcp_duration_s']:g} s ({r['tcp_capped_duration_s']:g} s through the "
            f"default-limits relay). **UDP**: a warm-up of a tenth, then {r['udp_count']:,} datagrams "
            f"of {r['udp_size']} B sent as fast as the sender goes (yielding every 64); received rate = "
            "received / (last − first arrival), waiting until the receiver is idle. A relayed sender "
            "has no backpressure: its datagrams queue in its control link.",
            "**CPU per MB** (10^6 payload bytes received): each end's own CPU time "
            "(`time.process_time`) over the transfer, and the relay process's from "
            "`/proc/<pid>/task/*/schedstat`, read by the client around the transfer. 'connect + "
            "handshake': from the connect call (the client's handler, its key loaded, built before) "
            "to the handshake done: for UDP, attaching to the relay, the probe and the rendezvous "
            "come first; for relayed TCP, the refused connect, the attach, OPEN and the circuit.",
        ]), ""]
    elif "relay" in skipped:
        lines += [f"- **relay skipped**: {skipped['relay']}", ""]
    return lines


# --------------------------------------------------------------------------------------------
# NAT relay: attached peers per process (bench/relayscale.py)
# --------------------------------------------------------------------------------------------
RELAYSCALE_TITLE = "NAT relay: attached peers per process"


def relayscale_table(scale: dict[str, Any] | None) -> str | None:
    """The table of :func:`bench.relayscale.results_of`'s outcome, one row per step."""
    if not scale:
        return None
    rows = []
    for st in scale["relayscale"]["steps"]:
        rows.append([f"{st['peers']:,}", fmt_num(st["rss_mib"]), fmt_num(st["kib_per_peer"]),
                     f"{fmt_num(st['attaches_per_s'])} ({st['concurrency']} at once)",
                     fmt_num(st["relay_cpu_ms_per_attach"]), fmt_num(st["client_cpu_ms_per_attach"]),
                     fmt_num(st["relay_busy_pct_attaching"]), fmt_num(st["idle_relay_cpu_pct"]),
                     fmt_num(st["idle_cpu_ms_per_peer_per_min"]),
                     f"{fmt_num(st.get('foreign_cpu_pct_attaching'))} / "
                     f"{fmt_num(st.get('foreign_cpu_pct_idle'))}"])
    return md_table(["attached peers", "relay RSS MiB", "KiB per attached peer", "attaches/s",
                     "relay CPU ms per attach", "client CPU ms per attach", "relay busy % attaching",
                     "idle: relay CPU %", "idle: relay CPU ms per peer per minute",
                     "other processes' CPU %: attaching / idle"], rows)


def relayscale_tables(data: dict[str, Any]) -> list[tuple[str, str]]:
    """For the console: the run's own relayscale table, if the group ran."""
    from .relayscale import results_of

    table = relayscale_table(results_of(data, saved=None))
    return [(RELAYSCALE_TITLE, table)] if table else []


def relayscale_markdown(data: dict[str, Any], saved: Path | None = None) -> list[str]:
    """The section of docs/BENCHMARKS.md: from run ``data``, else from the saved measurement
    (``bench/results/relayscale.json``, written by any real run of the group), else nothing."""
    from .relayscale import SAVED, results_of

    scale = results_of(data, saved=saved or SAVED)
    table = relayscale_table(scale)
    if scale is None or table is None:
        return []
    r = scale["relayscale"]
    p = scale["settings"]["relayscale"]
    last = r["steps"][-1]
    m = scale.get("machine", {})
    own = data.get("relayscale") is not None
    argv = " ".join(scale.get("argv", []))
    where = ("this run" if own else f"a separate run ({m.get('when_utc', '?')}, `python -m bench {argv}`, "
             "saved in `bench/results/relayscale.json`)")
    cap = 10_000
    mem_cap = r["baseline_rss_mib"] + last["kib_per_peer"] * cap / 1024
    cpu_cap = last["idle_cpu_ms_per_peer_per_min"] * cap / 60_000 * 100
    quiet = min(r["steps"], key=lambda st: st.get("foreign_cpu_pct_attaching", 0.0))  # the least disturbed
    attach_cap = 1e3 / quiet["relay_cpu_ms_per_attach"] if quiet["relay_cpu_ms_per_attach"] > 0 else 0.0
    return [
        f"## {RELAYSCALE_TITLE}", "", table, "", *_wrap_bullets([
            f"**From {where}.** One relay process, `python -m p2psc relay serve` with its default "
            f"limits (`max_peers` 10,000), pinned to one CPU; one client process on the other CPU holds "
            "every peer: a `P2PHandler` and its `NatAgent` per peer id, attaching with "
            "`nat.ensure_link()` (TCP connect, the p2psc handshake with the relay, RSA-2048, its "
            f"WELCOME, then the peer's HELLO), at most {p['concurrency']} at once. The relay knows "
            f"{r['known_peers']:,} peer ids, all with one public key (bench/relayscale.py).",
            f"**Memory**: the relay's VmRSS after {p['warmup']} warm-up attaches (baseline "
            f"{fmt_num(r['baseline_rss_mib'])} MiB, every peer's key already loaded) and after each "
            f"step, {p['settle_s']:g} s after its last attach; KiB per attached peer = growth / peers "
            "attached since the baseline. It includes the control link's TCP transport and p2psc "
            "connection state, the rendezvous' peer entry and the handshake's INIT replay-cache entry "
            "(kept for `timestamp_window`, 120 s); the kernel's socket buffers are not in RSS.",
            "**Attach rate**: the step's new peers / the seconds from the first connect to the last "
            "WELCOME; relay and client CPU per attach over the same span (the relay's from "
            "`/proc/<pid>/task/*/schedstat`). 'relay busy %' below 100 means the relay did not set the "
            "pace (the client, or other processes on the machine did): at its CPU per attach in the "
            f"least disturbed step ({quiet['peers']:,} peers), the relay alone would do about "
            f"{fmt_num(attach_cap)} attaches/s. That CPU includes the relay's log line per attach "
            "(`p2psc relay serve` logs attaches at INFO).",
            "**Other processes' CPU** (% of all CPUs, from `/proc/stat` minus the relay's and the "
            "client's): CPU time per attach and per PING holds up under it better than attaches/s, "
            "though a busy sibling CPU still slows both.",
            f"**Idle**: the relay's CPU over {fmt_num(last['idle_s'])} s with every peer attached and "
            "nothing sent but keepalives (each end of a control link sends an authenticated PING after "
            "25 s without sending; the window spans one interval, so one PING each way per link).",
            f"**Extrapolated to `max_peers` ({cap:,}) from the last row** (not measured): about "
            f"{fmt_num(mem_cap)} MiB of RSS and {fmt_num(cpu_cap)} % of one CPU when idle. Peers that "
            "also serve UDP add a PROBE pair every `nat_probe_interval` (25 s); relayed traffic costs "
            "what the 'NAT relay on 127.0.0.1' tables show.",
        ]), "",
    ]


def console_report(data: dict[str, Any]) -> str:
    """The tables plus a short header, for the terminal."""
    m = data["machine"]
    lines = [f"p2psc bench — loop {m['loop']}, python {m['python']}, {m['cpus']} CPUs, "
             f"{data['settings']['rounds']} round(s), {data['wall_s']:.0f} s"
             + ("  [SMOKE: numbers are meaningless]" if data["settings"]["smoke"] else "")]
    for kind, why in data.get("skipped", {}).items():
        lines.append(f"skipped {kind}: {why}")
    failed = [r for r in data["runs"] if not r["ok"]]
    for r in failed:
        lines.append(f"FAILED round {r['round'] + 1} {r['test']} {r['transport']}: "
                     f"{r.get('error', '')[:300]}")
    for title, table in (tables(data) + nat_tables(data) + relayscale_tables(data)
                         + directory_tables(data.get("directory") or {})):
        lines += ["", title, table]
    return "\n".join(lines)


def foreign_cpu_summary(data: dict[str, Any]) -> dict[str, Any]:
    """Foreign CPU (other processes) per test group, and the quiet-CPU waits."""
    out: dict[str, Any] = {}
    for test in sorted({r["test"] for r in data["runs"]}):
        runs = [r for r in data["runs"] if r["test"] == test]
        foreign = [r["foreign_cpu_pct"] for r in runs]
        out[test] = {
            "runs": len(runs),
            "foreign_cpu_pct_median": statistics.median(foreign),
            "foreign_cpu_pct_max": max(foreign),
            "waited_s": sum(r["waited_for_quiet_s"] for r in runs),
            "gave_up_waiting": sum(1 for r in runs if not r["found_quiet"]),
        }
    return out


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------
COLORS = {"raw": "#9e9e9e", "tls": "#1f77b4", "p2psc": "#d62728", "p2psc-aes": "#ff7f0e",
          "p2psc-chacha": "#ff7f0e", "udp": "#9e9e9e", "p2psc-udp": "#d62728"}


def plot(data: dict[str, Any], path: Path) -> None:
    """Draw the comparison into a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _set_default_label(data)
    tree = data["results"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    fig.suptitle(f"p2psc vs raw TCP and TLS 1.3 — {data['machine']['loop']}, "
                 f"{data['settings']['rounds']} rounds, median with min–max", fontsize=12)

    def bars(ax: Any, groups: list[str], kinds: list[str], getter: Any, ylabel: str,
             log: bool = False) -> None:
        width = 0.8 / max(1, len(kinds))
        for i, kind in enumerate(kinds):
            med, lo, hi, xs = [], [], [], []
            for j, g in enumerate(groups):
                stat = getter(kind, g)
                if stat is None:
                    continue
                xs.append(j + (i - (len(kinds) - 1) / 2) * width)
                med.append(stat["median"])
                lo.append(stat["median"] - stat["min"])
                hi.append(stat["max"] - stat["median"])
            if xs:
                ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=LABELS.get(kind, kind),
                       color=COLORS.get(kind))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    stream = [t for t in STREAM_ORDER if t in tree.get("tcp", {})]
    sizes = [str(s) for s in data["settings"]["sizes"]]
    size_names = [size_label(int(s)) for s in sizes]
    name_to_size = dict(zip(size_names, sizes, strict=True))
    ax = axes[0][0]
    if stream:
        bars(ax, size_names, stream, lambda k, g: _get(tree, "tcp", k, name_to_size[g], "mb_per_s"), "MB/s",
             True)
        ax.set_title("one-way throughput")
        ax.legend(fontsize=8)
    ax = axes[0][1]
    if stream:
        bars(ax, size_names, stream, lambda k, g: _get(tree, "tcp", k, name_to_size[g], "msgs_per_s"),
             "messages/s", True)
        ax.set_title("messages per second")
    ax = axes[0][2]
    lat = [t for t in STREAM_ORDER if t in tree.get("latency", {})]
    if lat:
        bars(ax, ["p50", "p99"], lat, lambda k, g: _get(tree, "latency", k, f"{g}_us"), "µs", True)
        ax.set_title(f"round trip, {data['settings']['latency']['size']} B")
        ax.legend(fontsize=8)
    ax = axes[1][0]
    hs = tree.get("handshake", {})
    hs_kinds = [t for t in ("raw", "tls", "p2psc") if t in hs]
    if hs_kinds:
        groups = []
        for bits in ("2048", "3072"):
            for clients in ("1", "16"):
                if any(_get(hs, t, bits, clients, "per_s") for t in hs_kinds):
                    groups.append(f"{bits}\n{clients} cl.")

        def hs_get(kind: str, g: str) -> dict[str, Any] | None:
            bits, clients = g.split("\n")
            return _get(hs, kind, "none" if kind == "raw" else bits, clients.split()[0], "per_s")

        bars(ax, groups, hs_kinds, hs_get, "handshakes/s", True)
        ax.set_title("full handshakes per second (raw = TCP connect)")
        ax.legend(fontsize=8)
    ax = axes[1][1]
    mem = tree.get("memory", {})
    mem_kinds = [t for t in ("raw", "tls", "p2psc") if t in mem]
    if mem_kinds:
        bars(ax, ["server", "client"], mem_kinds, lambda k, g: _get(mem, k, f"{g}_kib_per_conn"),
             "KiB / connection")
        ax.axhline(8, color="#d62728", linestyle="--", linewidth=1, label="target 8 KiB")
        ax.set_title("memory per idle connection")
        ax.legend(fontsize=8)
    ax = axes[1][2]
    udp = tree.get("udp", {})
    udp_kinds = [t for t in ("udp", "p2psc-udp") if t in udp]
    if udp_kinds:
        usizes = sorted({s for k in udp_kinds for s in udp[k]}, key=int)
        names = [size_label(int(s)) for s in usizes]
        back = dict(zip(names, usizes, strict=True))
        bars(ax, names, udp_kinds, lambda k, g: _get(udp, k, back[g], "dgrams_per_s"), "datagrams/s received")
        ax.set_title("UDP datagrams per second")
        ax.legend(fontsize=8)
    for row in axes:
        for a in row:
            if not a.has_data():
                a.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# docs/BENCHMARKS.md
# --------------------------------------------------------------------------------------------
def write_markdown(data: dict[str, Any], path: Path, plot_name: str | None, notes: Path | None,
                   directory: dict[str, Any] | None = None, directory_plot: str | None = None) -> None:
    """Write docs/BENCHMARKS.md: machine, method, tables, plot, how to rerun, and notes.

    ``directory``: the directory group's last results (bench/results/directory.json, written by
    every run of the group), shown instead of those in ``data``."""
    m = data["machine"]
    s = data["settings"]
    fc = foreign_cpu_summary(data)
    lines = [
        "# p2psc benchmarks",
        "",
        "Generated by `python -m bench` (bench/report.py); do not edit by hand — the hand-written",
        "part at the end comes from `bench/NOTES.md`.",
        "",
        "## Machine",
        "",
        md_table(["", ""], [
            ["when (UTC)", m["when_utc"]],
            ["python", f"{m['python']} ({m['implementation']})"],
            ["platform", m["platform"]],
            ["CPUs", f"{m['cpus']} ({m.get('cpu_model') or 'unknown model'})"],
            ["event loop", f"{m['loop']}" + (f" (uvloop {m['uvloop']})" if m["loop"] == "uvloop" else "")],
            ["ssl module OpenSSL (TLS rows)", m["ssl_openssl"]],
            ["cryptography (p2psc)", f"{m.get('cryptography')} ({m.get('cryptography_openssl')})"],
            ["p2psc", str(m.get("p2psc"))],
            ["rounds", f"{s['rounds']} (memory: {s['memory_rounds']})"],
            ["wall time", f"{data['wall_s']:.0f} s"],
        ], ["l", "l"]),
        "",
    ]
    if plot_name:
        lines += [f"![p2psc benchmarks]({plot_name})", ""]
    for kind, why in data.get("skipped", {}).items():
        lines.append(f"- **skipped {kind}**: {why}")
    failed = [r for r in data["runs"] if not r["ok"]]
    for r in failed:
        lines.append(f"- **failed** round {r['round'] + 1} {r['test']} {r['transport']}: "
                     f"`{r.get('error', '').splitlines()[0][:200] if r.get('error') else ''}`")
    if data.get("skipped") or failed:
        lines.append("")
    for title, table in tables(data):
        lines += [f"## {title}", "", table, ""]
    lines += nat_markdown(data)
    source = directory or data  # the saved results of the group's last run win
    lines += relayscale_markdown(data)
    lines += directory_markdown(source.get("directory"), source.get("skipped", {}), directory_plot)
    lines += [
        "## Method",
        "",
        ("- Sender/client and receiver/server run in **separate processes** pinned with "
        "`os.sched_setaffinity` (server on CPU 1, client on CPU 0), on the **same event loop kind**, "
        "over 127.0.0.1 with ephemeral ports. A fresh process pair runs each measurement."),
        ("- **Rounds are interleaved**: round 1 of every transport and test, then round 2, ...; "
        "the order of the transports rotates from round to round. Every number is the **median** "
        "over rounds with **[min–max]**; ratios are medians of the per-round ratios."),
        ("- Before each measurement the runner waits (at most "
        f"{s.get('quiet_wait_s', 2.0):g} s) for the machine's CPU to be under 10 % busy, and it "
        "records the CPU used by other processes during the measurement (see below)."),
        (f"- **Throughput**: one connection; per size a {s['tcp']['warmup_s']} s warm-up blast, a sync "
        f"marker, then a blast of {s['tcp']['duration_s']} s (or the count bound "
        f"{', '.join(f'{size_label(int(k))}: {v:,}' for k, v in s['tcp']['max_counts'].items())}), "
        "timed from the first send to the receiver's answer to a sync marker sent after the last "
        "message (the receiver counts messages and bytes, and they must match). MB/s = 10^6 payload "
        "bytes/s. raw and TLS use a 4-byte big-endian length prefix, a `BufferedProtocol` receiver with "
        "one reusable buffer (one `bytes` per message) and **one `transport.write()` per message**, "
        "honouring `pause_writing()`. p2psc is driven as a user would: `protocol.send(msg); "
        "await protocol.drain()` per message."),
        (f"- **Latency**: {s['latency']['size']} B request, the server echoes it from its receive "
        f"callback; {s['latency']['warmup']} warm-up round trips, then up to {s['latency']['max_count']:,} "
        f"or {s['latency']['duration_s']} s."),
        (f"- **Handshakes**: connect + full handshake + one 16 B ping round trip + close (waiting for "
        f"`connection_lost`), in a loop for {s['handshake']['duration_s']} s with "
        f"{' and '.join(str(c) for c in s['handshake']['clients'])} concurrent client tasks in one client "
        "process. TLS: TLS 1.3 only, mutual authentication with RSA certificates signed by a CA generated "
        "at start, `check_hostname` on, client certificate required, no session tickets. "
        "'TCP connect only' is the floor without any security."),
        (f"- **Memory**: {s['memory']['connections']:,} connections opened {s['memory']['batch']} at a "
        "time, each handshaken with one ping round trip, then idle; RSS delta of each process (after "
        "`gc.collect()`, against a baseline taken after warm-up connections) divided by the count."),
        (f"- **UDP**: the sender blasts for {s['udp']['duration_s']} s, yielding to the loop every 64 "
        "datagrams; receiver rate = received / (last − first arrival); loss = 1 − received/sent "
        "(default socket buffers)."),
        "",
        "Other processes' CPU during the measurements (% of all CPUs) and waiting for a quiet machine:",
        "",
        md_table(["test", "runs", "foreign CPU median %", "max %", "waited s", "gave up waiting"],
                 [[k, str(v["runs"]), f"{v['foreign_cpu_pct_median']:.1f}", f"{v['foreign_cpu_pct_max']:.1f}",
                   f"{v['waited_s']:.1f}", str(v["gave_up_waiting"])] for k, v in fc.items()]),
        "",
        "## How to rerun",
        "",
        "```",
        "make bench                                  # full run (uvloop), ~5-10 minutes",
        "make bench-smoke                            # a few seconds: checks that the bench still runs",
        ".venv/bin/python -m bench --loop asyncio    # stdlib event loop",
        ".venv/bin/python -m bench --only tcp --rounds 3 --sizes 100,64K",
        ".venv/bin/python -m bench --profile /tmp/prof --only tcp   # cProfile of both processes",
        ".venv/bin/python -m bench --only relay --rounds 3          # the NAT relay on 127.0.0.1",
        ".venv/bin/python -m bench --only natlab --lab-count 10     # the NAT lab (root, nftables)",
        ".venv/bin/python -m bench --only directory                 # directory load (PostgreSQL: initdb)",
        ".venv/bin/python -m bench --only relayscale                # attached peers per relay process",
        ".venv/bin/python -m bench --render bench/results/latest.json   # docs again (+ directory.json, relayscale.json)",
        "```",
        "",
        ("Results: `bench/results/latest.json` (every per-round value, the foreign CPU of each run). "
        "The plot is `docs/benchmarks.png`. Options: `python -m bench --help`."),
        "",
    ]
    if notes is not None and notes.exists():
        lines += [notes.read_text(encoding="utf-8").rstrip(), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


def python_command() -> str:
    """How this interpreter was started (for messages)."""
    return sys.executable
