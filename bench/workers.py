"""The two benchmark processes: the server / receiver (CPU 1) and the client / sender (CPU 0).

Both talk to the parent over a multiprocessing pipe with ``(command, value)`` tuples. The server
starts, reports ``("ready", {"port": ...})``, answers ``rss`` / ``udp_report`` and stops on
``stop``. The client runs one test and reports ``("result", {...})``; the memory and UDP tests
also exchange intermediate messages with the parent so it can query the server in between.
"""

from __future__ import annotations

import asyncio
import cProfile
import logging
import os
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from . import nat
from .apps import ClientConn
from .common import (
    CLIENT_CPU,
    SERVER_CPU,
    percentile,
    pin_to_cpu,
    raise_nofile,
    rss_bytes,
    run_on_loop,
)
from .material import CLIENT_PEER_ID, SERVER_PEER_ID, p2psc_config
from .transports import client_factory, start_stream_server
from .udp import P2PUdpSender, P2PUdpServerSide, UdpServerSide, udp_plain_sender

log = logging.getLogger("bench.workers")


class Channel:
    """Async access to the parent pipe from inside the event loop."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe

    def send(self, command: str, value: Any = None) -> None:
        self.pipe.send((command, value))

    async def recv(self, timeout: float = 120.0) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.pipe.fileno()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, readable)
        try:
            if not self.pipe.poll():
                await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(fd)
        command, value = self.pipe.recv()
        return command, value


def _process_main(role: str, cpu: int, pipe: Connection, spec: dict[str, Any],
                  body: Callable[[Channel], Any]) -> None:
    """Pin, optionally profile, run ``body`` on the requested loop; report errors to the parent."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {role} %(name)s: %(message)s")
    pin_to_cpu(cpu)
    raise_nofile(spec.get("nofile", 4096))
    channel = Channel(pipe)
    profiler: cProfile.Profile | None = None
    if spec.get("profile_dir"):
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        run_on_loop(spec["loop"], lambda: body(channel))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        try:
            channel.send("error", f"{role}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        except Exception:
            log.exception("%s failed and could not report it", role)
    finally:
        if profiler is not None:
            profiler.disable()
            out = Path(spec["profile_dir"]) / f"{spec['test']}-{spec['transport']}-{role}.prof"
            profiler.dump_stats(str(out))
        pipe.close()


# --------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------
def server_process(pipe: Connection, spec: dict[str, Any]) -> None:
    """Entry point of the server / receiver process."""
    _process_main("server", SERVER_CPU, pipe, spec, lambda ch: _server_main(ch, spec))


async def _server_main(channel: Channel, spec: dict[str, Any]) -> None:
    test = spec["test"]
    if test.startswith("relay-"):
        await nat.server_main(channel, spec)
        return
    if test == "udp":
        if spec["transport"] == "udp":
            udp = UdpServerSide()
        else:
            udp = P2PUdpServerSide(p2psc_config(spec["p2psc"], Path(spec["workdir"]) / "server",
                                                SERVER_PEER_ID, CLIENT_PEER_ID, peer_port=1))
        await udp.start()
        channel.send("ready", {"port": udp.port})
        while True:
            command, _ = await channel.recv()
            if command == "udp_report":
                channel.send("udp_report", await udp.report_when_idle())
            elif command == "stop":
                break
        await udp.close()
        channel.send("bye", None)
        return
    server = await start_stream_server(spec, echo=test != "tcp")
    channel.send("ready", {"port": server.port, "rss": rss_bytes()})
    while True:
        command, _ = await channel.recv()
        if command == "rss":
            channel.send("rss", rss_bytes())
        elif command == "stop":
            break
    await server.close()
    channel.send("bye", None)


# --------------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------------
def client_process(pipe: Connection, spec: dict[str, Any], port: int) -> None:
    """Entry point of the client / sender process."""
    _process_main("client", CLIENT_CPU, pipe, spec, lambda ch: _client_main(ch, spec, port))


async def _client_main(channel: Channel, spec: dict[str, Any], port: int) -> None:
    test = spec["test"]
    if test.startswith("relay-"):
        channel.send("result", await nat.client_main(channel, spec, port))
        return
    if test == "udp":
        channel.send("result", await _udp_test(channel, spec, port))
        return
    factory = client_factory(spec, port)
    try:
        if test == "tcp":
            result = await _throughput_test(factory, spec["params"])
        elif test == "latency":
            result = await _latency_test(factory, spec["params"])
        elif test == "handshake":
            result = await _handshake_test(factory, spec["params"])
        elif test == "memory":
            result = await _memory_test(factory, spec["params"], channel)
        else:
            raise ValueError(f"unknown test {test!r}")
    finally:
        await factory.close()
    channel.send("result", result)


async def _throughput_test(factory: Any, params: dict[str, Any]) -> dict[str, Any]:
    """One-way throughput per message size on one connection: warm-up, sync, timed blast, sync."""
    conn: ClientConn = await factory.connect()
    out: dict[str, Any] = {}
    clock = time.perf_counter
    try:
        for size in params["sizes"]:
            payload = os.urandom(size)
            max_count = params["max_counts"][str(size)]
            await conn.blast(payload, max(1, max_count // 4), clock() + params["warmup_s"])
            await conn.sync()
            cpu0 = time.process_time()
            t0 = clock()
            sent = await conn.blast(payload, max_count, t0 + params["duration_s"])
            count, nbytes, recv_cpu = await conn.sync()
            seconds = clock() - t0
            send_cpu = time.process_time() - cpu0
            if count != sent or nbytes != sent * size:
                raise RuntimeError(f"{size} B: sent {sent} messages, receiver counted {count} ({nbytes} B)")
            out[str(size)] = {
                "messages": sent,
                "seconds": seconds,
                "mb_per_s": sent * size / seconds / 1e6,
                "msgs_per_s": sent / seconds,
                "send_cpu_us_per_msg": send_cpu / sent * 1e6,
                "recv_cpu_us_per_msg": recv_cpu / sent * 1e6,
            }
    finally:
        await conn.close()
    return out


async def _latency_test(factory: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Request/response round trips of ``params['size']`` bytes; p50 / p99 in microseconds."""
    conn: ClientConn = await factory.connect()
    payload = os.urandom(params["size"])
    clock = time.perf_counter
    try:
        for _ in range(params["warmup"]):
            await conn.request(payload)
        samples: list[float] = []
        deadline = clock() + params["duration_s"]
        while len(samples) < params["max_count"] and clock() < deadline:
            t0 = clock()
            reply = await conn.request(payload)
            samples.append(clock() - t0)
            if len(reply) != len(payload):
                raise RuntimeError("echo of the wrong size")
    finally:
        await conn.close()
    samples.sort()
    return {
        "count": len(samples),
        "p50_us": percentile(samples, 0.50) * 1e6,
        "p99_us": percentile(samples, 0.99) * 1e6,
        "mean_us": sum(samples) / len(samples) * 1e6,
    }


async def _one_handshake(factory: Any, ping: bytes) -> float:
    """Connect, handshake, one ping round trip, close; return the seconds it took."""
    t0 = time.perf_counter()
    conn: ClientConn = await factory.connect()
    try:
        await conn.request(ping)
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def _handshake_worker(factory: Any, ping: bytes, deadline: float, budget: list[int],
                            durations: list[float]) -> None:
    """One client task: handshakes back to back until the deadline or the shared budget ends."""
    while budget[0] > 0 and time.perf_counter() < deadline:
        budget[0] -= 1
        durations.append(await _one_handshake(factory, ping))


async def _handshake_test(factory: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Full handshakes per second with 1 and with N concurrent clients."""
    ping = b"p" * 16
    for _ in range(params["warmup"]):
        await _one_handshake(factory, ping)
    out: dict[str, Any] = {}
    clock = time.perf_counter
    for clients in params["clients"]:
        durations: list[float] = []
        deadline = clock() + params["duration_s"]
        budget = [params["max_count"]]
        t0 = clock()
        workers = (_handshake_worker(factory, ping, deadline, budget, durations) for _ in range(clients))
        await asyncio.wait_for(asyncio.gather(*workers), params["duration_s"] + 60)
        seconds = clock() - t0
        durations.sort()
        out[str(clients)] = {
            "handshakes": len(durations),
            "seconds": seconds,
            "per_s": len(durations) / seconds,
            "p50_ms": percentile(durations, 0.5) * 1e3,
        }
    return out


async def _memory_test(factory: Any, params: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """Open N idle connections (handshake + one ping each); RSS delta per connection, both ends."""
    ping = b"p" * 16
    for _ in range(params["warmup"]):
        await _one_handshake(factory, ping)
    rss0 = rss_bytes()
    channel.send("warm", rss0)
    await channel.recv()  # parent measured the server baseline
    conns: list[ClientConn] = []
    t0 = time.perf_counter()

    async def open_one() -> ClientConn:
        conn: ClientConn = await factory.connect()
        await conn.request(ping)
        return conn

    try:
        total, batch = params["connections"], params["batch"]
        while len(conns) < total:
            n = min(batch, total - len(conns))
            conns.extend(await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(n))), 120))
        open_s = time.perf_counter() - t0
        await asyncio.sleep(params.get("settle_s", 0.2))
        rss1 = rss_bytes()
        channel.send("opened", rss1)
        await channel.recv()  # parent measured the server
    finally:
        for i in range(0, len(conns), 100):
            await asyncio.gather(*(c.close(2.0) for c in conns[i : i + 100]), return_exceptions=True)
    return {
        "connections": len(conns),
        "client_kib_per_conn": (rss1 - rss0) / len(conns) / 1024,
        "client_baseline_mib": rss0 / 2**20,
        "open_s": open_s,
    }


async def _udp_test(channel: Channel, spec: dict[str, Any], port: int) -> dict[str, Any]:
    """Blast each payload size; the parent fetches the receiver's counts after each size."""
    params = spec["params"]
    sender: Any
    if spec["transport"] == "udp":
        sender = await udp_plain_sender(port)
    else:
        sender = P2PUdpSender(p2psc_config(spec["p2psc"], Path(spec["workdir"]) / "client", CLIENT_PEER_ID,
                                           SERVER_PEER_ID, peer_port=port), SERVER_PEER_ID)
        await sender.connect(spec.get("handshake_timeout", 30.0))
    out: dict[str, Any] = {}
    try:
        for size in params["sizes"]:
            payload = os.urandom(size)
            cpu0 = time.process_time()
            sent, seconds = await sender.blast(payload, params["max_count"], params["duration_s"])
            out[str(size)] = {
                "sent": sent,
                "send_seconds": seconds,
                "sent_per_s": sent / seconds,
                "send_cpu_us_per_dgram": (time.process_time() - cpu0) / sent * 1e6,
            }
            channel.send("udp_sent", size)
            await channel.recv()  # parent has the receiver's report for this size
    finally:
        if isinstance(sender, P2PUdpSender):
            await sender.close()
        elif sender.transport is not None:
            sender.transport.close()
    return out
