"""NAT traversal in the namespace lab (test/natlab.py): time to the first echoed message, per path.

The "natlab" group. One lab: the relay (``python -m p2psc relay serve``, default limits) on
the public server host ``srv``; echo servers behind a cone NAT (site a) and on a public host
without NAT (``pubsrv``); clients behind a second cone NAT (site b) and behind a symmetric NAT
(site e). Every client and server is a process of test/nat_peer.py in its namespace. Peers
behind NAT are known at their private address (the lab's router answers ICMP unreachable),
except that client ``cbd`` knows the TCP server at an address the router drops silently.

Each sample is a **fresh client process**: it builds its handler, connects (for a NAT path:
attaches to the relay, probes, asks for the rendezvous, punches or falls back, then the
p2psc handshake runs end to end), sends one 1000-byte message and waits for its echo. It
prints ``handshake_ms`` (connect call until the handshake is done) and ``first_ms`` (until
the echo is back), both from just after the handler is built, and the path it got.
Every peer uses the default settings (``nat_punch_timeout`` 4 s, ``nat_direct_timeout``
3 s, ...), except the one client with ``nat_punch: false``. The samples of all paths are
interleaved, the order rotating from one sample to the next; ``gap_s`` separates two
clients (so the servers' per-address INIT rate limit, 2/s, is never what is measured).

Needs root, iproute2, nftables and conntrack (:func:`natlab.lab_available`); without them
the group is skipped with that one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import percentile
from .material import _pem_private, _pem_public, _rsa_key

log = logging.getLogger("bench.lab")

REPO = Path(__file__).resolve().parent.parent
TEST_DIR = REPO / "test"
PEER_SCRIPT = str(TEST_DIR / "nat_peer.py")
RELAY_ID = "relay.lab"
RELAY_IP = "203.0.113.10"
RELAY_PORT = 7000
SETTINGS = ("defaults (nat_punch_timeout 4 s, nat_direct_timeout 3 s, nat_relay_timeout 5 s, "
            "nat_punch_interval 0.2 s); cbn: nat_punch false")


@dataclass(frozen=True)
class LabPath:
    """One row of the table: a client reaching a server over one path."""

    key: str
    label: str
    kind: str          # "udp" or "tcp"
    client: str        # peer id of the client
    server: str        # peer id of the server
    expected: str      # the path it must get


#: the rows, in table order
PATHS = (
    LabPath("udp-plain", "UDP, no relay configured: public server", "udp", "cplain", "sp-udp", "direct"),
    LabPath("udp-direct", "UDP direct: public server", "udp", "cb", "sp-udp", "direct"),
    LabPath("udp-punched", "UDP punched: cone to cone", "udp", "cb", "sa-udp", "punched"),
    LabPath("udp-relayed", "UDP relayed: symmetric to cone (punch tried first)", "udp", "ce", "sa-udp",
            "relayed"),
    LabPath("udp-relayed-nopunch", "UDP relayed: cone to cone, nat_punch false", "udp", "cbn", "sa-udp",
            "relayed"),
    LabPath("tcp-plain", "TCP, no relay configured: public server", "tcp", "cplain", "sp-tcp", "direct"),
    LabPath("tcp-direct", "TCP direct: public server", "tcp", "cb", "sp-tcp", "direct"),
    LabPath("tcp-relayed", "TCP relayed: cone to cone (the router refuses the private address)", "tcp",
            "cb", "sa-tcp", "relayed"),
    LabPath("tcp-relayed-silent", "TCP relayed: cone to cone, the known address silently dropped", "tcp",
            "cbd", "sa-tcp", "relayed"),
)
#: where client ``cbd`` believes sa-tcp is: an address whose packets the router drops without a
#: word (as a provider that drops bogons does), so its direct attempt lasts nat_direct_timeout
SILENT_ADDR = "203.0.113.99"


def lab_unavailable() -> str | None:
    """None when the lab can run here, else one line saying why not."""
    if not (TEST_DIR / "natlab.py").exists():
        return "the NAT lab needs test/natlab.py (not in this tree)"
    if str(TEST_DIR) not in sys.path:
        sys.path.insert(0, str(TEST_DIR))
    try:
        import natlab  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - any import failure: no lab
        return f"the NAT lab cannot be imported: {exc}"
    reason: str | None = natlab.lab_available()
    return reason


class _Folder:
    """A peer folder (the layout ``p2psc init`` makes, as test/conftest.py's make_peer)."""

    def __init__(self, root: Path, peer_id: str, port: int, host: str, **conf: Any) -> None:
        self.peer_id = peer_id
        self.workdir = root / peer_id
        data = self.workdir / "data"
        (self.workdir / "conf").mkdir(parents=True)
        (data / "pubkeys").mkdir(parents=True)
        key = _rsa_key(2048)
        (data / "private_key.pem").write_bytes(_pem_private(key))
        (data / "private_key.pem").chmod(0o600)
        self.public_pem = _pem_public(key)
        (data / "config.json").write_text(json.dumps({"peer_id": peer_id, "host": host, "port": port}))
        (data / "peers.json").write_text("{}")
        (self.workdir / "conf" / "config.json").write_text(json.dumps({
            "my_prikey_file": "$[workdir]$/data/private_key.pem",
            "xconfig": "$[workdir]$/data/config.json",
            "known_peers_file": "$[workdir]$/data/peers.json",
            "peer_pubkey_path": "$[workdir]$/data/pubkeys",
            **conf}))

    def know(self, other: _Folder, host: str, port: int) -> None:
        peers_file = self.workdir / "data" / "peers.json"
        table = json.loads(peers_file.read_text())
        table[other.peer_id] = {"peer_id": other.peer_id, "host": host, "port": port}
        peers_file.write_text(json.dumps(table))
        (self.workdir / "data" / "pubkeys" / f"{other.peer_id}.pubkey.pem").write_bytes(other.public_pem)


def _summary(values: list[float]) -> dict[str, Any]:
    """Median, p90 (nearest rank), min and max of the samples (which are kept too)."""
    vals = sorted(values)
    if not vals:
        return {"median": None, "p90": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(vals), "p90": percentile(vals, 0.9), "min": vals[0], "max": vals[-1],
            "runs": values}


def run_lab(params: dict[str, Any], root: Path) -> dict[str, Any]:
    """Build the lab, start the relay and the servers, run ``params['count']`` fresh clients
    per path; return per path its samples and their summaries. Raises if the lab cannot be
    built or a server does not start; a client that fails is a sample with ``ok`` false."""
    import natlab

    count, gap = int(params["count"]), float(params.get("gap_s", 0.5))
    started = time.monotonic()
    out: dict[str, Any] = {"paths": {}, "settings": SETTINGS}
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(natlab.Lab())
        lab.add_site("a", "cone")        # the servers behind NAT
        lab.add_site("b", "cone")        # clients behind a cone NAT
        lab.add_site("e", "symmetric")   # a client behind a symmetric NAT
        public = lab.add_public_host("pubsrv")
        relay_conf = {"peer_id": RELAY_ID, "host": RELAY_IP, "port": RELAY_PORT}
        where: dict[str, tuple[str, str, int]] = {}   # peer id -> (namespace, known host, port)
        folders: dict[str, _Folder] = {}

        def peer(peer_id: str, ns: str, port: int = 0, relay: bool = True, **conf: Any) -> None:
            host = "0.0.0.0" if port else "127.0.0.1"
            folders[peer_id] = _Folder(root, peer_id, port, host,
                                       **({"relay": relay_conf} if relay else {}), **conf)
            where[peer_id] = (ns, lab.addr(ns), port)

        peer(RELAY_ID, "srv", RELAY_PORT, relay=False)
        peer("sa-udp", "hosta", 40001)
        peer("sa-tcp", "hosta", 40002)
        peer("sp-udp", "pubsrv", 40001)
        peer("sp-tcp", "pubsrv", 40002)
        peer("cb", "hostb")
        peer("cbn", "hostb", nat_punch=False)
        peer("cplain", "hostb", relay=False)
        peer("cbd", "hostb")
        peer("ce", "hoste")
        assert where["sp-udp"][1] == public
        for a in folders.values():
            for b in folders.values():
                if a is not b:
                    # peers behind NAT are known at their private address: unreachable from
                    # other sites, as a home address is from the internet
                    _, host, port = where[b.peer_id]
                    a.know(b, host, port)
        folders["cbd"].know(folders["sa-tcp"], SILENT_ADDR, where["sa-tcp"][2])
        lab.nft("pub", "table ip bench {\n  chain forward {\n"
                       "    type filter hook forward priority -10; policy accept;\n"
                       f"    ip daddr {SILENT_ADDR} drop\n  }}\n}}\n")

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        procs: list[Any] = []
        n_logs = [0]

        def start(ns: str, *argv: str, name: str) -> Any:
            n_logs[0] += 1
            path = root / f"{name}-{n_logs[0]}.log"
            with open(path, "w") as err:
                proc = lab.python(ns, *argv, env=env, stderr=err)
            proc.log_path = path
            return proc

        try:
            relay = start("srv", "-m", "p2psc", "relay", "serve", "--workdir", str(folders[RELAY_ID].workdir),
                          "--host", RELAY_IP, "--port", str(RELAY_PORT), name="relay")
            procs.append(relay)
            if not natlab.readline(relay, 30):
                raise RuntimeError(f"the lab relay did not start: {relay.log_path.read_text()[-1000:]}")
            for peer_id, kind in (("sa-udp", "serve-udp"), ("sa-tcp", "serve-tcp"),
                                  ("sp-udp", "serve-udp"), ("sp-tcp", "serve-tcp")):
                proc = start(where[peer_id][0], PEER_SCRIPT, kind, str(folders[peer_id].workdir),
                             name=peer_id)
                procs.append(proc)
                line = natlab.readline(proc, 30)
                if not line or json.loads(line) != {"serving": kind, "attached": True}:
                    raise RuntimeError(f"{peer_id} did not start ({line!r}): "
                                       f"{proc.log_path.read_text()[-1000:]}")
            samples: dict[str, list[dict[str, Any]]] = {p.key: [] for p in PATHS}
            for i in range(count):
                order = PATHS[i % len(PATHS):] + PATHS[: i % len(PATHS)]
                for p in order:
                    time.sleep(gap)
                    proc = start(where[p.client][0], PEER_SCRIPT, p.kind, str(folders[p.client].workdir),
                                 p.server, "1", name=p.client)
                    try:
                        line = natlab.readline(proc, 60)
                    finally:
                        lab.stop(proc)
                    try:
                        result = json.loads(line) if line else {"ok": False, "error": "no output"}
                    except ValueError:
                        result = {"ok": False, "error": f"bad output {line[:200]!r}"}
                    if not result.get("ok"):
                        result["stderr"] = proc.log_path.read_text()[-1500:]
                        log.error("natlab %s sample %d failed: %s", p.key, i + 1, result.get("error"))
                    samples[p.key].append(result)
                    log.info("natlab %-20s %d/%d path %s first %s ms", p.key, i + 1, count,
                             result.get("path"), result.get("first_ms"))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(OSError):
                        proc.send_signal(signal.SIGINT)
            for proc in procs:
                lab.stop(proc)
    for p in PATHS:
        got = samples[p.key]
        ok = [s for s in got if s.get("ok")]
        paths: dict[str, int] = {}
        for s in got:
            name = str(s.get("path")) if s.get("ok") else "failed"
            paths[name] = paths.get(name, 0) + 1
        out["paths"][p.key] = {
            "label": p.label, "kind": p.kind, "client": p.client, "server": p.server, "expected": p.expected,
            "samples": [{k: v for k, v in s.items() if k != "stderr"} for s in got],
            "errors": [s.get("error") for s in got if not s.get("ok")],
            "paths": paths,
            "first_ms": _summary([float(s["first_ms"]) for s in ok]),
            "handshake_ms": _summary([float(s["handshake_ms"]) for s in ok]),
        }
    out["wall_s"] = time.monotonic() - started
    return out
