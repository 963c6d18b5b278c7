"""NAT traversal on 127.0.0.1: relay throughput and CPU per MB against the direct path.

The "relay" group. Each round runs, for TCP and for UDP, three variants with the same peer
folders, both ends configured with the same relay (``"relay": {...}`` in their config):

- ``direct``: the client knows the server at its real address, so it reaches it directly
  (TCP: ``connect_peer`` connects; UDP: the rendezvous' punch finds the known address);
- ``relayed``: the client knows the server at a closed TCP port (``connect_peer`` is
  refused and falls back to a relayed circuit) or, for UDP, at port 0 with ``nat_punch:
  false`` (its sealed datagrams go in DGRAM frames over both control links). The relay is
  :mod:`bench.relayproc`: the relay of ``p2psc relay serve`` with its byte-rate limit
  raised, so the relay's own cost is measured;
- ``relayed-cli``: the same through ``python -m p2psc relay serve`` itself, with its
  default limits (8 MiB/s per peer), to show what a default relay gives one peer.

The relays run in their own processes (started by the parent for the round, stopped after);
the client reads a relay's CPU time from ``/proc/<pid>`` around the timed transfer. Every
path is checked: a variant whose connection took another path than the one named fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import HOST
from .material import CLIENT_PEER_ID, SERVER_PEER_ID, _pem_private, _pem_public, _rsa_key, p2psc_config

RELAY_PEER_ID = "bench-relay"
REPO = Path(__file__).resolve().parent.parent
#: the variants, in the order of the tables
VARIANTS = ("direct", "relayed", "relayed-cli")
#: the path each variant must get
EXPECTED_PATH = {"direct": "direct", "relayed": "relayed", "relayed-cli": "relayed"}
#: which relay process each variant's ends are configured with ("direct" uses the raised one)
RELAY_OF = {"direct": "raised", "relayed": "raised", "relayed-cli": "cli"}


# --------------------------------------------------------------------------------------------
# the relay's peer folder and process
# --------------------------------------------------------------------------------------------
def write_relay_folder(directory: Path, key: Any, known: dict[str, bytes]) -> None:
    """The relay's peer folder in ``directory``: its private ``key`` and the peers it knows,
    ``known`` mapping each peer id to its PEM public key (several ids may share one key)."""
    data = directory / "data"
    (directory / "conf").mkdir(parents=True, exist_ok=True)
    (data / "pubkeys").mkdir(parents=True, exist_ok=True)
    private = data / "private_key.pem"
    private.write_bytes(_pem_private(key))
    private.chmod(0o600)
    records = {}
    for peer, public_pem in known.items():
        (data / "pubkeys" / f"{peer}.pubkey.pem").write_bytes(public_pem)
        records[peer] = {"peer_id": peer, "host": HOST, "port": 0}
    (data / "peers.json").write_text(json.dumps(records))
    (data / "config.json").write_text(json.dumps({"peer_id": RELAY_PEER_ID, "host": HOST, "port": 0}))
    (directory / "conf" / "config.json").write_text(json.dumps({
        "my_prikey_file": "$[workdir]$/data/private_key.pem",
        "xconfig": "$[workdir]$/data/config.json",
        "known_peers_file": "$[workdir]$/data/peers.json",
        "peer_pubkey_path": "$[workdir]$/data/pubkeys",
    }))


def make_relay_folder(material: dict[str, str], directory: Path) -> dict[str, str]:
    """A peer folder for the relay (its own key; knows the bench server and client)."""
    key = _rsa_key(2048)
    write_relay_folder(directory, key, {peer: Path(material[f"{peer}:public"]).read_bytes()
                                        for peer in (SERVER_PEER_ID, CLIENT_PEER_ID)})
    public = directory / f"{RELAY_PEER_ID}.pub.pem"
    public.write_bytes(_pem_public(key))
    return {"workdir": str(directory), "public": str(public)}


def relay_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by process ``pid``: the sum of its threads' run time from
    ``/proc/<pid>/task/*/schedstat`` (nanoseconds), else utime + stime from ``/proc/<pid>/stat``
    (clock ticks)."""
    total_ns = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                    total_ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        if total_ns:
            return total_ns / 1e9
    except OSError:
        pass
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def readline_timeout(stream: Any, timeout: float) -> str:
    """One line from a subprocess' text stream, or "" after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        buf += chunk
        if chunk == b"\n":
            break
    return buf.decode("utf-8", "replace")


class RelayProcess:
    """A relay in its own process: ``kind`` "cli" (``python -m p2psc relay serve``, default
    limits) or "raised" (``python -m bench.relayproc``)."""

    def __init__(self, kind: str, workdir: str, log_path: Path, cpu: int | None = None,
                 profile: str | None = None) -> None:
        self.kind = kind
        self.workdir = workdir
        self.log_path = log_path
        self.cpu = cpu
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def launch(self) -> None:
        """Start the process (:meth:`wait_ready` reads its port)."""
        if self.kind == "cli":
            argv = [sys.executable, "-m", "p2psc", "relay", "serve", "--workdir", self.workdir,
                    "--host", HOST, "--port", "0"]
        else:
            argv = [sys.executable, "-m", "bench.relayproc", "--workdir", self.workdir, "--host", HOST,
                    "--port", "0"]
            if self.profile:
                argv += ["--profile", self.profile]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=str(REPO), env=env)

    def wait_ready(self, timeout: float = 30.0) -> int:
        """Its port, from the line it prints once listening; pins it to ``cpu`` if given."""
        assert self.proc is not None
        line = readline_timeout(self.proc.stdout, timeout)
        if "listening on tcp " not in line:
            self.stop()
            raise RuntimeError(f"the {self.kind} relay did not start: {line.strip()!r}; "
                               f"stderr: {self.log_path.read_text(errors='replace')[-500:]!r}")
        self.port = int(line.split("listening on tcp ", 1)[1].split(",", 1)[0].rsplit(":", 1)[1])
        if self.cpu is not None and hasattr(os, "sched_setaffinity"):
            available = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(self.proc.pid, {available[self.cpu % len(available)]})
        return self.port

    def start(self, timeout: float = 30.0) -> int:
        self.launch()
        return self.wait_ready(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def info(self) -> dict[str, Any]:
        return {"peer_id": RELAY_PEER_ID, "host": HOST, "port": self.port, "pid": self.pid, "kind": self.kind}

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode


# --------------------------------------------------------------------------------------------
# the peers' configs
# --------------------------------------------------------------------------------------------
def nat_config(spec: dict[str, Any], role: str, peer_port: int, **settings: Any) -> dict[str, Any]:
    """The config of the bench server (``role`` "server") or client, with the relay."""
    me, peer = (SERVER_PEER_ID, CLIENT_PEER_ID) if role == "server" else (CLIENT_PEER_ID, SERVER_PEER_ID)
    workdir = Path(spec["workdir"]) / role
    config = p2psc_config(spec["p2psc"], workdir, me, peer, peer_port=peer_port)
    relay = spec["relay"]
    (workdir / "pubkeys" / f"{RELAY_PEER_ID}.pubkey.pem").write_bytes(Path(spec["relay_public"]).read_bytes())
    known_file = Path(config["known_peers_file"])
    known = json.loads(known_file.read_text())
    known[RELAY_PEER_ID] = {"peer_id": RELAY_PEER_ID, "host": relay["host"], "port": relay["port"]}
    known_file.write_text(json.dumps(known))
    config["relay"] = {"peer_id": RELAY_PEER_ID, "host": relay["host"], "port": relay["port"]}
    config.update(settings)
    return config


def closed_port() -> int:
    """A TCP port on HOST that nothing listens on (it was free a moment ago)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def wait_attached(handler: Any, udp: bool, timeout: float = 20.0) -> None:
    """Until the handler's control link is up and, for a UDP server, its mapping probed."""
    nat = handler.nat
    if nat is None:
        raise RuntimeError("no relay configured")
    await asyncio.wait_for(nat.ensure_link(), timeout)
    if not udp:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tap = getattr(nat, "_udp_server", None)
        mappings = getattr(tap, "mappings", None)
        if mappings is None:  # (the agent changed): what test/nat_peer.py does
            await asyncio.sleep(0.5)
            return
        if all(m is not None for m in mappings):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the UDP server's mapping was not probed in time")


# --------------------------------------------------------------------------------------------
# in the worker processes (bench.workers): servers and clients of the "relay" group
# --------------------------------------------------------------------------------------------
async def server_main(channel: Any, spec: dict[str, Any]) -> None:
    """The server of a ``relay-tcp`` / ``relay-udp`` measurement (pinned like every server)."""
    from .transports import _p2psc_classes, _P2PServer
    from .udp import P2PUdpServerSide

    params = spec["params"]
    if spec["test"] == "relay-udp":
        udp = P2PUdpServerSide(nat_config(spec, "server", peer_port=1))
        await udp.start()
        await wait_attached(udp.handler, udp=True)
        channel.send("ready", {"port": udp.port})
        while True:
            command, _ = await channel.recv()
            if command in ("udp_report", "udp_reset"):
                report = await udp.report_when_idle(limit=params["udp_drain_limit_s"])
                channel.send(command, report)
            elif command == "stop":
                break
        await udp.close()
        channel.send("bye", None)
        return
    from p2psc.p2phandler import P2PHandler

    server_cls, _ = _p2psc_classes()
    server_cls.echo = False  # type: ignore[attr-defined]
    handler = P2PHandler(config=nat_config(spec, "server", peer_port=1))
    await handler.run_as_server(ProtocolClass=server_cls)
    server = _P2PServer(handler)
    await wait_attached(handler, udp=False)
    channel.send("ready", {"port": server.port})
    while True:
        command, _ = await channel.recv()
        if command == "stop":
            break
    await server.close()
    channel.send("bye", None)


def _per_mb(cpu_s: float, nbytes: int) -> float:
    return cpu_s / (nbytes / 1e6) if nbytes else 0.0


async def client_main(channel: Any, spec: dict[str, Any], port: int) -> dict[str, Any]:
    """The client of a ``relay-tcp`` / ``relay-udp`` measurement; returns its result."""
    if spec["test"] == "relay-udp":
        return await _udp_client(channel, spec, port)
    return await _tcp_client(spec, port)


def _check_path(spec: dict[str, Any], path: Any) -> None:
    want = EXPECTED_PATH[spec["transport"]]
    if path != want:
        raise RuntimeError(f"{spec['test']} {spec['transport']}: the connection took the {path!r} path, "
                           f"not {want!r}")


async def _tcp_client(spec: dict[str, Any], port: int) -> dict[str, Any]:
    from p2psc.p2phandler import P2PHandler

    from .transports import P2PClientConn, _p2psc_classes

    params = spec["params"]
    variant = spec["transport"]
    relay_pid = spec["relay"]["pid"]
    _, client_cls = _p2psc_classes()
    handler = P2PHandler(config=nat_config(spec, "client", port if variant == "direct" else closed_port()))
    clock = time.perf_counter
    try:
        t_connect = clock()
        transport, protocol = await asyncio.wait_for(
            handler.connect_peer(SERVER_PEER_ID, ProtocolClass=client_cls), spec["handshake_timeout"])
        await asyncio.wait_for(protocol.wait_handshaked(), spec["handshake_timeout"])
        connect_s = clock() - t_connect
        _check_path(spec, protocol.path)
        conn = P2PClientConn(transport, protocol)
        try:
            size = params["tcp_size"]
            payload = os.urandom(size)
            max_count = max(1, params["tcp_bytes"] // size)
            duration = params["tcp_capped_duration_s" if variant == "relayed-cli" else "tcp_duration_s"]
            await conn.blast(payload, max(1, max_count // 8), clock() + params["warmup_s"])
            await conn.sync()
            relay0, cpu0, t0 = relay_cpu_seconds(relay_pid), time.process_time(), clock()
            sent = await conn.blast(payload, max_count, t0 + duration)
            count, nbytes, recv_cpu = await conn.sync(timeout=60.0)
            seconds = clock() - t0
            send_cpu, relay_cpu = time.process_time() - cpu0, relay_cpu_seconds(relay_pid) - relay0
            if count != sent or nbytes != sent * size:
                raise RuntimeError(f"sent {sent} messages, the receiver counted {count} ({nbytes} B)")
        finally:
            await conn.close()
    finally:
        await asyncio.wait_for(handler.close(), 10.0)
    return {
        "path": protocol.path,
        "connect_ms": connect_s * 1e3,
        "messages": sent,
        "bytes": nbytes,
        "seconds": seconds,
        "mb_per_s": nbytes / seconds / 1e6,
        "send_cpu_s_per_mb": _per_mb(send_cpu, nbytes),
        "recv_cpu_s_per_mb": _per_mb(recv_cpu, nbytes),
        "relay_cpu_s_per_mb": _per_mb(relay_cpu, nbytes),
        "relay_cpu_s": relay_cpu,
    }


async def _udp_client(channel: Any, spec: dict[str, Any], port: int) -> dict[str, Any]:
    from p2psc.p2phandler import P2PHandler

    from .udp import P2PUdpSender

    params = spec["params"]
    variant = spec["transport"]
    relay_pid = spec["relay"]["pid"]
    if variant == "direct":
        config = nat_config(spec, "client", port)
    else:
        config = nat_config(spec, "client", 0, nat_punch=False)
    sender = P2PUdpSender(config, SERVER_PEER_ID)
    sender.handler = P2PHandler(config=config)  # its key loaded (~40 ms) before the clock starts
    clock = time.perf_counter
    try:
        t_connect = clock()
        await asyncio.wait_for(sender.connect(spec["handshake_timeout"]), spec["handshake_timeout"])
        connect_s = clock() - t_connect
        path = sender.protocol.path
        _check_path(spec, path)
        size, count = params["udp_size"], params["udp_count"]
        payload = os.urandom(size)
        # warm-up: a tenth of the count; then the receiver's counters start afresh
        await sender.blast(payload, max(1, count // 10), params["udp_duration_s"])
        channel.send("udp_reset", None)
        await channel.recv()
        relay0, cpu0 = relay_cpu_seconds(relay_pid), time.process_time()
        sent, send_seconds = await sender.blast(payload, count, params["udp_duration_s"])
        channel.send("udp_sent", size)
        await channel.recv(timeout=120.0)  # the parent has the receiver's report: all arrived
        send_cpu, relay_cpu = time.process_time() - cpu0, relay_cpu_seconds(relay_pid) - relay0
    finally:
        await sender.close()
    return {
        "path": path,
        "connect_ms": connect_s * 1e3,
        "size": size,
        "sent": sent,
        "send_seconds": send_seconds,
        "send_cpu_s": send_cpu,
        "relay_cpu_s": relay_cpu,
    }
