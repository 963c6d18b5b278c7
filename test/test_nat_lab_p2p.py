"""The NAT matrix with real p2psc peers in the namespace lab (test/natlab.py): real kernels,
real nftables NATs, the relay on the "public" side, peers behind cone, symmetric and
UDP-blocking NATs. Needs root and nftables (installed by .ci/run); skips with one line where
they are missing. The same scenarios run without root in the emulator
(test/test_nat_emulator.py).

Each cell records a row (NAT of the client, NAT of the server, transport, ok, path, time to
the first echoed message) printed at the end of the run (conftest's terminal summary) and
copied into docs/NAT.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PeerDir, make_peer
from nat_matrix import record
from natlab import Lab, readline, skip_unless_available

HERE = Path(__file__).resolve().parent
PEER = str(HERE / "nat_peer.py")
RELAY_IP = "203.0.113.10"
RELAY_PORT = 7000
FAST = {"nat_relay_timeout": 5.0, "nat_punch_timeout": 3.0}


class World:
    """One lab with its sites, the relay, the servers, and peer folders that all know each
    other and the relay."""

    def __init__(self, lab: Lab, root: Path) -> None:
        self.lab = lab
        self.root = root
        self.peers: dict[str, PeerDir] = {}
        self.where: dict[str, tuple[str, str, int]] = {}   # peer id -> (namespace, host, port)
        self.servers: list[subprocess.Popen[Any]] = []
        self.n_logs = 0

    def peer(self, peer_id: str, ns: str, port: int = 0, **settings: Any) -> PeerDir:
        relay = {"peer_id": "relay.lab", "host": RELAY_IP, "port": RELAY_PORT}
        p = make_peer(self.root, peer_id, port=port, relay=relay, **{**FAST, **settings})
        host = "0.0.0.0" if port else "127.0.0.1"
        p.set_port(port, host)
        self.peers[peer_id] = p
        self.where[peer_id] = (ns, self.lab.addr(ns), port)
        return p

    def introduce(self) -> None:
        relay = self.peers["relay.lab"]
        for a in self.peers.values():
            for b in self.peers.values():
                if a is not b:
                    _, host, port = self.where[b.peer_id]
                    # peers behind NAT are listed at their private address: unreachable from
                    # other sites, as a home address is from the internet
                    a.know(b, port=port if b is not relay else RELAY_PORT, host=host)

    def start(self, ns: str, *argv: str, log: str | None = None) -> subprocess.Popen[Any]:
        """Run a script in ``ns``; its stderr goes to ``root/<log>.log``."""
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        self.n_logs += 1
        path = self.root / f"{log or 'proc'}-{self.n_logs}.log"
        with open(path, "w") as err:
            proc = self.lab.python(ns, *argv, env=env, stderr=err)
        proc.log_path = path  # type: ignore[attr-defined]
        self.servers.append(proc)
        return proc

    def client(self, peer_id: str, kind: str, target: str, count: int = 3,
               hold: float = 0.0, timeout: float = 60.0) -> dict[str, Any]:
        ns = self.where[peer_id][0]
        proc = self.start(ns, PEER, kind, str(self.peers[peer_id].workdir), target, str(count),
                          str(hold), log=peer_id)
        line = ""
        try:
            for _ in range(3):  # with hold, a progress line comes first
                line = readline(proc, timeout)
                if not line or "ok" in json.loads(line):
                    break
        finally:
            self.lab.stop(proc)
            err = proc.log_path.read_text()  # type: ignore[attr-defined]
        assert line, f"{peer_id} printed nothing; stderr:\n{err[-3000:]}"
        result: dict[str, Any] = json.loads(line)
        result["stderr"] = err[-3000:]
        return result


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    skip_unless_available()
    with contextlib.ExitStack() as stack:
        lab = stack.enter_context(Lab())
        root = tmp_path_factory.mktemp("natlab")
        w = World(lab, root)
        lab.add_site("a", "cone")          # servers behind a cone NAT
        lab.add_site("b", "cone")          # clients behind a cone NAT
        lab.add_site("c", "symmetric")     # a server behind a symmetric NAT
        lab.add_site("e", "symmetric")     # a client behind a symmetric NAT
        lab.add_site("f", "udp_blocked")   # a client whose network drops all UDP
        lab.add_site("g", "cone", udp_timeout=3)  # servers behind a NAT that forgets fast
        lab.add_site("k", "cone")          # a client whose NAT will rebind its port
        lab.add_public_host("pubsrv")      # a server on a public address (no NAT)
        lab.add_site("d", "cone")          # a client whose punched path will go dead
        lab.add_site("u", "udp_blocked")   # a client whose network lets UDP out later
        w.peer("relay.lab", "srv", RELAY_PORT)
        w.peer("sa-udp", "hosta", 40001)
        w.peer("sa-tcp", "hosta", 40002)
        w.peer("sc-udp", "hostc", 40001)
        w.peer("sg-ka", "hostg", 40001, udp_keepalive_interval=1.0)
        w.peer("sg-noka", "hostg", 40002, udp_keepalive_interval=0)
        w.peer("sp-udp", "pubsrv", 40001)
        w.peer("sa-ka", "hosta", 40003, udp_keepalive_interval=1.0)
        w.peer("cd", "hostd", udp_keepalive_interval=1.0, nat_path_timeout=3.0,
               nat_upgrade_interval=0)
        w.peer("cu", "hostu", nat_upgrade_interval=2.0)
        w.peer("cb", "hostb")
        w.peer("cb-ka", "hostb", udp_keepalive_interval=1.0)
        w.peer("cb-noka", "hostb", udp_keepalive_interval=0)
        w.peer("ce", "hoste")
        w.peer("cf", "hostf")
        w.peer("ck", "hostk")
        w.introduce()
        relay = w.start("srv", "-m", "p2psc", "relay", "serve", "--workdir",
                        str(w.peers["relay.lab"].workdir), "--host", RELAY_IP,
                        "--port", str(RELAY_PORT), log="relay")
        assert readline(relay, 20), "the relay did not start"
        for peer_id, kind in (("sa-udp", "serve-udp"), ("sa-tcp", "serve-tcp"),
                              ("sc-udp", "serve-udp"), ("sg-ka", "serve-udp"),
                              ("sg-noka", "serve-udp"), ("sp-udp", "serve-udp"),
                              ("sa-ka", "serve-udp")):
            proc = w.start(w.where[peer_id][0], PEER, kind, str(w.peers[peer_id].workdir),
                           log=peer_id)
            assert json.loads(readline(proc, 20)) == {"serving": kind, "attached": True}
        yield w
        for proc in w.servers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in w.servers:
            w.lab.stop(proc)


def check(result: dict[str, Any], path: str, client_nat: str, server_nat: str,
          kind: str) -> None:
    record("lab", client_nat, server_nat, kind, result.get("ok", False), result.get("path"),
           result.get("first_ms"))
    assert result["ok"], result
    assert result["path"] == path, result


def test_cone_to_cone_udp_is_punched(world: World) -> None:
    check(world.client("cb", "udp", "sa-udp"), "punched", "cone", "cone", "udp")


def test_cone_to_symmetric_udp_is_relayed(world: World) -> None:
    # Linux NATs filter per address and port: the symmetric side's new port never gets in
    check(world.client("cb", "udp", "sc-udp"), "relayed", "cone", "symmetric", "udp")


def test_symmetric_to_cone_udp_is_relayed(world: World) -> None:
    check(world.client("ce", "udp", "sa-udp"), "relayed", "symmetric", "cone", "udp")


def test_symmetric_to_symmetric_udp_is_relayed(world: World) -> None:
    check(world.client("ce", "udp", "sc-udp"), "relayed", "symmetric", "symmetric", "udp")


def test_udp_blocked_udp_goes_through_the_tcp_relay(world: World) -> None:
    result = world.client("cf", "udp", "sa-udp")
    check(result, "relayed", "udp blocked", "cone", "udp")
    assert "UDP seems blocked" in result["stderr"]


def test_tcp_behind_nat_is_relayed(world: World) -> None:
    check(world.client("cb", "tcp", "sa-tcp"), "relayed", "cone", "cone", "tcp")


def test_udp_blocked_tcp_is_relayed(world: World) -> None:
    check(world.client("cf", "tcp", "sa-tcp"), "relayed", "udp blocked", "cone", "tcp")


def test_keepalives_hold_a_mapping_that_expires_after_3s(world: World) -> None:
    # the server's NAT forgets an idle UDP mapping after 3 s; the session is silent for 6 s
    result = world.client("cb-ka", "udp", "sg-ka", hold=6.0)
    check(result, "punched", "cone", "cone (3 s mappings), keepalive 1 s", "udp")
    assert result["after_hold"] is True


def test_without_keepalives_the_expired_mapping_loses_the_message(world: World) -> None:
    result = world.client("cb-noka", "udp", "sg-noka", hold=6.0)
    record("lab", "cone", "cone (3 s mappings), no keepalive", "udp",
           "message after 6 s silence lost (as expected)" if result.get("after_hold") is False
           else "FAILED", result.get("path"), result.get("first_ms"))
    assert result["path"] == "punched", result
    assert result["echoed"] == 3 and result["after_hold"] is False, result


def test_public_server_udp_is_direct(world: World) -> None:
    check(world.client("cb", "udp", "sp-udp"), "direct", "cone", "none (public)", "udp")


def test_a_rebinding_nat_keeps_the_session(world: World) -> None:
    """The client's NAT gives it a new public port mid-session; its next authenticated
    datagram moves the public server's session there (roaming) and the echo comes back.
    (Toward a server behind an address-and-port-filtering NAT, a rebinding breaks a punched
    path: that NAT only lets in the old port, as RFC 4787 filtering says.)"""
    lab = world.lab
    ns = world.where["ck"][0]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = world.start(ns, PEER, "udp", str(world.peers["ck"].workdir), "sp-udp", "3", "4",
                       log="ck")
    try:
        # the session is up, then silent for 4 s: rebind during that time
        started = readline(proc, 30)
        assert json.loads(started).get("echoed") == 3, started
        rebound = lab.rebind("k")
        assert rebound, "no UDP mapping to rebind"
        line = readline(proc, 60)
    finally:
        lab.stop(proc)
    result = json.loads(line)
    record("lab", "cone, rebinding mid-session", "none (public)", "udp",
           result.get("ok", False), result.get("path"), result.get("first_ms"))
    assert result["ok"] and result["after_hold"] is True, result


def run_with_change(world: World, peer_id: str, target: str, hold: float,
                    change: Any) -> dict[str, Any]:
    """A client that echoes 3 messages, then is silent for ``hold`` seconds while ``change()``
    alters the network, then sends one more; its final JSON line."""
    ns = world.where[peer_id][0]
    proc = world.start(ns, PEER, "udp", str(world.peers[peer_id].workdir), target, "3",
                       str(hold), log=peer_id)
    try:
        progress = json.loads(readline(proc, 60))
        assert progress.get("echoed") == 3, (progress, proc.log_path.read_text()[-3000:])  # type: ignore[attr-defined]
        change()
        line = readline(proc, 60)
    finally:
        world.lab.stop(proc)
    result: dict[str, Any] = json.loads(line)
    result["stderr"] = proc.log_path.read_text()[-3000:]  # type: ignore[attr-defined]
    return result


def test_a_punched_path_that_dies_falls_back_to_the_relay(world: World) -> None:
    """UDP between the two sites stops getting through (the relay's TCP still does): after
    nat_path_timeout (3 s here) without an authenticated datagram, the client moves the
    session to the relay, the server follows, and the next message arrives, once."""
    server_wan = world.lab.addr("nata")

    def cut() -> None:
        for direction in ("daddr", "saddr"):
            world.lab.run("natd", ["nft", "insert", "rule", "ip", "filter", "forward", "ip",
                                   direction, server_wan, "meta", "l4proto", "udp", "drop"])

    result = run_with_change(world, "cd", "sa-ka", 8.0, cut)
    record("lab", "cone, its UDP to the server cut mid-session", "cone", "udp",
           result.get("ok", False), f"{result.get('path')} -> {result.get('path_end')}",
           result.get("first_ms"))
    assert result["path"] == "punched" and result["ok"] and result["after_hold"] is True, result
    assert result["path_end"] == "relayed", result
    assert "relaying" in result["stderr"]


def test_a_relayed_session_moves_to_a_punched_path_when_udp_opens(world: World) -> None:
    """The client's network blocks UDP, so it starts relayed over TCP; UDP is let out
    mid-session; within nat_upgrade_interval (2 s here) it punches and moves the session,
    keys and counters unchanged, and the next message arrives over the punched path."""
    def open_udp() -> None:
        listing = world.lab.run("natu", ["nft", "-a", "list", "chain", "ip", "filter",
                                         "forward"]).stdout
        handles = [line.rsplit("# handle", 1)[1].strip() for line in listing.splitlines()
                   if "udp" in line and "drop" in line and "# handle" in line]
        assert handles, listing
        for h in handles:
            world.lab.run("natu", ["nft", "delete", "rule", "ip", "filter", "forward",
                                   "handle", h])

    result = run_with_change(world, "cu", "sa-udp", 8.0, open_udp)
    record("lab", "UDP blocked, then opened mid-session", "cone", "udp",
           result.get("ok", False), f"{result.get('path')} -> {result.get('path_end')}",
           result.get("first_ms"))
    assert result["path"] == "relayed" and result["ok"] and result["after_hold"] is True, result
    assert result["path_end"] == "punched", result
