"""Issue 11, item 4, over real sockets on 127.0.0.1: a record header no longer buys memory, the
handler-wide budget for partly received records closes the connection that would pass it,
and one peer holds at most ``max_connections_per_peer`` connections."""

from __future__ import annotations

import asyncio
import gc
import struct
import tracemalloc
from typing import Any

import pytest

from attack_util import Client, assert_still_serving, recorder, wait_until
from conftest import point_at, run, server_port
from p2psc._proto.tcp import RecordType
from p2psc.p2pexcept import LimitExceeded
from p2psc.p2phandler import P2PHandler

MiB = 1024 * 1024


async def serve_and_point(server_dir: Any, client_dir: Any, R: Any) -> tuple[P2PHandler, P2PHandler]:
    """A server (protocol ``R``) on an ephemeral port, and a client handler pointed at it."""
    server = P2PHandler(workdir=server_dir.workdir)
    await server.run_as_server(ProtocolClass=R, host="127.0.0.1", port=0)
    point_at(client_dir, server_dir, server_port(server))
    return server, P2PHandler(workdir=client_dir.workdir)


def test_64_headers_declaring_16_mib_cost_what_arrived(pair: Any, tmp_path: Any) -> None:
    """The review's attack: 64 handshaked connections each send a 5-byte header declaring a
    16 MiB record, then nothing (it took the server from 35 to 1,060 MiB). Now the server's
    Python heap grows by about 256 KiB per connection, and it still serves others. (One peer
    may now hold only max_connections_per_peer connections: the cap is raised here so that the
    buffers alone are measured.)"""
    server_dir, client_dir = pair
    for d in (server_dir, client_dir):  # (the cap holds on both ends)
        d.update_conf(max_connections_per_peer=64)

    async def main() -> None:
        server, client = await serve_and_point(server_dir, client_dir, recorder())
        protos = []
        for _ in range(64):
            _, p = await client.connect_peer("server.test", ProtocolClass=Client)
            await asyncio.wait_for(p.wait_handshaked(), 5)
            protos.append(p)
        await wait_until(lambda: sum(c.handshaked for c in server.connections.protocols) == 64,
                         5, f"64 handshaked ({len(server.connections.protocols)} "
                            f"{sum(c.handshaked for c in server.connections.protocols)})")
        gc.collect()
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            header = struct.pack(">IB", 16 * MiB, RecordType.DATA)
            for p in protos:
                p.transport.raw.write(header)  # type: ignore[union-attr]
            await asyncio.sleep(0.3)
            grown, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        per_conn = (grown - base) / 64
        assert per_conn < 512 * 1024, f"{per_conn / 1024:.0f} KiB per connection"
        await assert_still_serving(server, server_dir, tmp_path)
        await client.close()
        await server.close()

    run(main(), timeout=60)


def test_the_partial_record_budget_closes_the_connection_that_would_pass_it(
        pair: Any, tmp_path: Any) -> None:
    server_dir, client_dir = pair
    # budget 20 MiB, messages up to 16 MiB: two half-sent 12 MiB records cannot both fit
    server_dir.update_conf(max_partial_record_bytes=20 * MiB, max_message_size=16 * MiB)

    async def main() -> None:
        R = recorder()
        server, client = await serve_and_point(server_dir, client_dir, R)
        a = (await client.connect_peer("server.test", ProtocolClass=Client))[1]
        b = (await client.connect_peer("server.test", ProtocolClass=Client))[1]
        for p in (a, b):
            await asyncio.wait_for(p.wait_handshaked(), 5)
        header = struct.pack(">IB", 12 * MiB, RecordType.DATA)
        a.transport.raw.write(header + bytes(7 * MiB))  # type: ignore[union-attr]
        await asyncio.sleep(0.3)
        b.transport.raw.write(header + bytes(7 * MiB))  # type: ignore[union-attr]
        err = await asyncio.wait_for(b.closed, 5)
        assert err is not None  # b was aborted by the server
        closes = [v for k, v in R.log if k == "closed"]
        assert len(closes) == 1 and type(closes[0]) is LimitExceeded
        assert "max_partial_record_bytes" in str(closes[0])
        assert not a.closed.done()  # a is unaffected
        await assert_still_serving(server, server_dir, tmp_path)
        await client.close()
        await server.close()

    run(main(), timeout=60)


def test_one_peer_holds_at_most_max_connections_per_peer(pair: Any, tmp_path: Any) -> None:
    server_dir, client_dir = pair
    server_dir.update_conf(max_connections_per_peer=3)

    async def main() -> None:
        R = recorder()
        server, client = await serve_and_point(server_dir, client_dir, R)
        protos = []
        for _ in range(5):
            _, p = await client.connect_peer("server.test", ProtocolClass=Client)
            await asyncio.wait_for(p.wait_handshaked(), 5)
            protos.append(p)
        await asyncio.wait_for(asyncio.gather(protos[0].closed, protos[1].closed), 5)
        closes = [v for k, v in R.log if k == "closed"]
        assert [type(e) for e in closes] == [LimitExceeded, LimitExceeded]
        assert "max_connections_per_peer" in str(closes[0])
        for i, p in enumerate(protos[2:]):  # the three newest still work
            p.send(b"n%d" % i)
            assert await asyncio.wait_for(p.got, 5) == b"recv:n%d" % i
        assert server.get_peer_conn("client.test") is not None
        await assert_still_serving(server, server_dir, tmp_path)  # another peer connects
        await client.close()
        await server.close()

    run(main(), timeout=60)


def test_rekey_by_time_repeats_with_keepalive_and_idle_off(
        pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With keepalive_interval and idle_timeout 0 (allowed), rekey_after_time still rekeys
    again and again (found by an adversarial review: after the first key update nothing
    re-armed the loop timer, so the key was never updated again)."""
    from p2psc._proto import tcp
    ratchets = [0]
    original = tcp._Direction.ratchet

    def counting(self: Any, now: float) -> None:
        ratchets[0] += 1
        original(self, now)

    monkeypatch.setattr(tcp._Direction, "ratchet", counting)
    server_dir, client_dir = pair
    for d in (server_dir, client_dir):
        d.update_conf(keepalive_interval=0, idle_timeout=0, rekey_after_time=0.2)

    async def main() -> None:
        R = recorder()
        server, client = await serve_and_point(server_dir, client_dir, R)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        for k in range(15):  # one message every 0.1 s for 1.5 s: about 7 key updates
            proto.send(b"m%d" % k)
            await asyncio.sleep(0.1)
        await wait_until(lambda: sum(k == "recv" for k, _ in R.log) == 15, 5, "15 messages")
        assert [v for k, v in R.log if k == "recv"] == [b"m%d" % k for k in range(15)]
        await client.close()
        await server.close()

    run(main(), timeout=30)
    # each key update ratchets the client's sending key and the server's receiving key (and
    # the server's replies ratchet the other direction): more than one round is the point
    assert ratchets[0] >= 8, ratchets


def test_one_peer_cannot_take_the_whole_partial_record_budget() -> None:
    """One peer's parked partial records fill its own share (max_partial_record_bytes_per_peer)
    and no more: another peer's records still fit in the handler's budget (found by an
    adversarial review: one peer could make every other peer's next record fail)."""
    from p2psc._proto.buffers import ReceiveBudget
    budget = ReceiveBudget(64 * MiB, 20 * MiB)
    assert budget.reserve(19 * MiB, "mallory.test") is None
    assert budget.reserve(2 * MiB, "mallory.test") == "max_partial_record_bytes_per_peer"
    assert budget.held_by("mallory.test") == 19 * MiB and budget.used == 19 * MiB
    assert budget.reserve(19 * MiB, "alice.test") is None  # alice is unaffected
    budget.release(19 * MiB, "mallory.test")
    assert budget.held_by("mallory.test") == 0 and budget.used == 19 * MiB
    assert budget.reserve(21 * MiB, "bob.test") == "max_partial_record_bytes_per_peer"
    assert budget.reserve(20 * MiB, "bob.test") is None
    assert budget.reserve(26 * MiB, None) == "max_partial_record_bytes"  # the total still holds
