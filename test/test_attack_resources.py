"""Resource limits (issue 7): a length prefix of 2**32-1 in every state, slowloris, thousands
of half-open connections (bounded by ``max_pending_handshakes``), an INIT flood. Memory and
open connections stay bounded and legitimate peers still connect."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import struct
import sys
import time
from typing import Any

import pytest

from attack_util import (Client, assert_still_serving, clone, expect, feed, initiator, joined, recorder,
                         responder, run_session, settings, wait_until)
from conftest import make_peer, point_at, run, server_port
from p2psc.config import Settings
from p2psc._proto.tcp import HEADER_LEN, State
from p2psc._proto.handshake import MAX_HANDSHAKE_BODY
from p2psc.p2p import TcpP2P
from p2psc.p2pexcept import (ConfigError, HandshakeError, HandshakeTimeout, ProtocolError,
                             RecordTooLarge)
from p2psc.p2phandler import P2PHandler
from p2psc._proto.replay import InitReplayCache

HUGE = struct.pack(">IB", 0xFFFFFFFF, 0x10)


@pytest.mark.parametrize("rtype", [0x01, 0x02, 0x03, 0x10, 0x12, 0xFF])
def test_length_prefix_2_32_minus_1_in_every_state_is_refused_at_the_header(rtype: int) -> None:
    """In every state, the 5-byte header alone is refused: nothing is buffered for it, even
    when a megabyte follows in the same read."""
    sess = run_session()
    header = struct.pack(">IB", 0xFFFFFFFF, rtype)
    states = {
        "responder idle": responder(sess.s, InitReplayCache(), sess.clock),
        "initiator sent INIT": clone(sess.i_sent_init),
        "responder sent RESP": clone(sess.r_sent_resp),
        "initiator established": clone(sess.i),
        "responder established": clone(sess.r),
    }
    for name, conn in states.items():
        for tail in (b"", bytes(1 << 20)):
            c = clone(conn)
            out = feed(c, header + tail)
            assert type(out.error) is RecordTooLarge, name
            assert out.delivered == [] and out.wrote == b""
            assert c.receive_data(bytes(1 << 16)) == []  # closed: not even buffered


def test_buffering_is_bounded_by_the_limits() -> None:
    """Whatever the peer sends, a connection never buffers more than one record's worth:
    MAX_HANDSHAKE_BODY during the handshake, max_message_size + tag after; one byte more in
    the length prefix is refused at the header."""
    sess = run_session(max_message_size=4096)
    for make, limit, rtype in (
            (lambda: responder(sess.s, InitReplayCache(), sess.clock), MAX_HANDSHAKE_BODY, 0x01),
            (lambda: clone(sess.r), 4096 + 32, 0x10)):
        conn = make()
        conn.receive_data(struct.pack(">IB", limit, rtype))
        for _ in range(limit // 1000):
            conn.receive_data(bytes(999))
            assert conn.buffered_bytes <= HEADER_LEN + limit
        with pytest.raises(RecordTooLarge):
            expect(make().receive_data(struct.pack(">IB", limit + 1, rtype)))


def test_await_peer_key_buffer_is_bounded() -> None:
    """While the key of an unknown initiator is being looked up, what it sends is bounded."""
    s = settings()
    i = initiator(s, my_id="stranger.test", key_name="stranger")
    i.initiate()
    r = responder(s, InitReplayCache(), known={})
    r.receive_data(joined(i))
    assert r.state is State.AWAIT_PEER_KEY
    with pytest.raises(ProtocolError, match="too much data"):
        for _ in range(100):
            expect(r.receive_data(bytes(4096)))
    assert r.buffered_bytes <= MAX_HANDSHAKE_BODY + 64 * 1024 + 4096


def test_slowloris_handshake_is_dropped_at_the_handshake_timeout(pair: Any, tmp_path: Any,
                                                                 loop_kind: str) -> None:
    """A genuine INIT sent a byte every 20 ms (it would take seconds): the server drops the
    connection at handshake_timeout (0.3 s) with HandshakeTimeout; so does one that sends a
    full INIT and never FINISHED; meanwhile a legitimate peer connects."""
    server_dir, client_dir = pair
    server_dir.update_conf(handshake_timeout=0.3)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        port = server_port(server)
        # a genuine INIT from the client to the server, captured sans-IO
        from p2psc._proto.tcp import Connection, Role
        c = Connection(Role.INITIATOR, "client.test", client_dir.key, server.settings,
                       peer_id="server.test", peer_public_key=server_dir.key.public_key(),
                       now=time.time())  # (wall_offset 0: now is the wall clock)
        c.initiate()
        init = joined(c)
        loop = asyncio.get_running_loop()

        async def slow(send_all_then_stall: bool) -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = loop.time()
            try:
                if send_all_then_stall:
                    writer.write(init)
                    assert len(await asyncio.wait_for(reader.read(65536), 2)) > HEADER_LEN  # RESP
                    assert await asyncio.wait_for(reader.read(65536), 2) == b""  # then dropped
                else:
                    for b in init:
                        writer.write(bytes([b]))
                        await writer.drain()
                        await asyncio.sleep(0.02)
            except (ConnectionError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()
            return loop.time() - t0

        slow_tasks = [asyncio.ensure_future(slow(False)), asyncio.ensure_future(slow(True))]
        await asyncio.sleep(0.05)
        await assert_still_serving(server, server_dir, tmp_path)
        elapsed = await asyncio.wait_for(asyncio.gather(*slow_tasks), 10)
        closes = [v for k, v in R.log if k == "closed"]
        timeouts = [e for e in closes if type(e) is HandshakeTimeout]
        assert len(timeouts) == 2, closes
        assert elapsed[0] < 1.5  # the byte-a-time sender was cut off long before the end
        assert sum(k == "handshaked" for k, _ in R.log) == 1  # only the legitimate peer
        await server.close()

    run(main(), loop=loop_kind, timeout=20)


def _open_raw(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def _raise_nofile(need: int) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")


def test_thousands_of_half_open_connections_are_bounded(pair: Any, tmp_path: Any,
                                                        loop_kind: str,
                                                        quiet_p2psc_logs: Any) -> None:
    """3,000 connections that never send a byte (500 of them half an INIT): the server
    holds at most max_pending_handshakes (200) of them, evicting the oldest; memory stays
    bounded; a legitimate peer connects in the middle of the flood; once the attackers go,
    nothing is left."""
    server_dir, client_dir = pair
    limit = 200
    server_dir.update_conf(max_pending_handshakes=limit)
    _raise_nofile(8000)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        port = server_port(server)
        gc.collect()
        blocks0 = sys.getallocatedblocks()
        socks: list[socket.socket] = []
        peak = 0
        legit = 0

        def accepted() -> int:
            return sum(k == "closed" for k, _ in R.log) + len(server.connections.pending) - legit

        for batch in range(60):  # 50 at a time: under the listen backlog (100)
            socks += _open_raw(port, 50)
            if batch % 6 == 5:
                for s in socks[-50:]:  # half an INIT on some
                    try:
                        s.send(struct.pack(">IB", 600, 1) + bytes(300))
                    except OSError:
                        pass
            await wait_until(lambda: accepted() >= len(socks), 5, "the batch to be accepted")
            peak = max(peak, len(server.connections.protocols))
            assert len(server.connections.pending) <= limit
            if batch == 30:
                await assert_still_serving(server, server_dir, tmp_path)
                legit = 1
        await wait_until(lambda: sum(k == "closed" for k, _ in R.log) >= 3000 - limit + 1, 10,
                         "evictions")
        peak = max(peak, len(server.connections.protocols))
        assert peak <= limit + 50, peak  # the limit, plus those accepted in one batch
        gc.collect()
        grown = sys.getallocatedblocks() - blocks0
        # every held connection costs a bounded amount (protocol, connection, buffers)
        assert grown < 300 * (limit + 50), grown
        evicted = [e for k, e in R.log if k == "closed" and e is not None]
        assert sum(k == "closed" and e is None for k, e in R.log) == 1  # the legitimate peer
        assert all(type(e) is HandshakeError and "max_pending_handshakes" in str(e)
                   for e in evicted), {str(e) for e in evicted}
        # the evicted sockets were closed by the server
        closed_by_server = 0
        for s in socks[:1000]:
            try:
                if s.recv(1) == b"":
                    closed_by_server += 1
            except ConnectionResetError:
                closed_by_server += 1
            except BlockingIOError:
                pass
        assert closed_by_server == 1000
        for s in socks:
            s.close()
        await wait_until(lambda: not server.connections.protocols and not server.connections.pending, 10,
                         "all connections gone")
        assert sum(k == "handshaked" for k, _ in R.log) == 1
        await server.close()

    run(main(), loop=loop_kind, timeout=60)


@pytest.fixture
def quiet_p2psc_logs() -> Any:
    """Keep thousands of per-connection warnings out of pytest's log capture (which would
    hold every record and blur the memory figures)."""
    lg = logging.getLogger("p2psc")
    level = lg.level
    lg.setLevel(logging.CRITICAL)  # (pytest attaches its handler to non-propagating loggers)
    yield
    lg.setLevel(level)


def test_init_flood_unknown_forged_and_replayed(pair: Any, tmp_path: Any,
                                                quiet_p2psc_logs: Any) -> None:
    """2,000 INITs over 2,000 connections (unknown peers, a known id with a wrong key,
    replays of one genuine INIT, garbage), 80 at a time: each refused with its error, the
    open connections never exceed the flood's concurrency, the server's memory returns to
    its baseline, and legitimate peers connect during the flood."""
    server_dir, client_dir = pair
    _raise_nofile(4000)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        port = server_port(server)
        s = server.settings
        from p2psc._proto.tcp import Connection, Role

        def init_from(my_id: str, key: Any) -> bytes:
            c = Connection(Role.INITIATOR, my_id, key, s, peer_id="server.test",
                           peer_public_key=server_dir.key.public_key(), now=time.time())
            c.initiate()
            return joined(c)

        stranger = make_peer(tmp_path / "x", "stranger.test")
        kinds = {
            "unknown": init_from("stranger.test", stranger.key),
            "wrong key": init_from("client.test", stranger.key),
            "replay": init_from("client.test", client_dir.key),
            "garbage": struct.pack(">IB", 40, 1) + bytes(40),
        }

        async def attack(kind: str) -> None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            try:
                writer.write(kinds[kind])
                await asyncio.wait_for(reader.read(65536), 5)
            except (ConnectionError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

        gc.collect()
        blocks0 = sys.getallocatedblocks()
        # the genuine INIT is accepted once (its RESP comes back), then only replays
        await attack("replay")
        order = ["unknown", "wrong key", "replay", "garbage"] * 500
        peak = 0
        t0 = time.monotonic()
        for k in range(0, len(order), 80):  # (under the listen backlog of 100)
            await asyncio.gather(*(attack(kind) for kind in order[k:k + 80]))
            peak = max(peak, len(server.connections.protocols))
            if k == 1040:
                await assert_still_serving(server, server_dir, tmp_path)
        flood_time = time.monotonic() - t0
        await wait_until(lambda: not server.connections.protocols, 10, "flood connections to close")
        closes = [v for k, v in R.log if k == "closed"]
        by_type: dict[str, int] = {}
        for e in closes:
            by_type[type(e).__name__] = by_type.get(type(e).__name__, 0) + 1
        assert by_type.get("UnknownPeerError", 0) == 500, by_type
        assert by_type.get("SignCheckError", 0) == 500, by_type
        assert by_type.get("ProtocolError", 0) == 500, by_type
        replays = [e for e in closes if type(e) is HandshakeError and "replayed" in str(e)]
        assert len(replays) == 500, by_type
        assert sum(k == "handshaked" for k, _ in R.log) == 1  # the legitimate peer only
        assert peak <= 80 + 10
        del closes, replays
        R.log.clear()  # (what the application kept) -- then nothing is left per attacker
        gc.collect()
        grown = sys.getallocatedblocks() - blocks0
        assert grown < 20_000, grown  # back near the baseline: nothing kept per attacker
        assert flood_time < 30
        await server.close()

    run(main(), timeout=60)


def test_max_pending_handshakes_setting() -> None:
    assert Settings().max_pending_handshakes == 1024
    assert Settings.from_mapping({"max_pending_handshakes": 0}, "x").max_pending_handshakes == 0
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ConfigError):
            Settings.from_mapping({"max_pending_handshakes": bad}, "x")


def test_eviction_spares_authenticated_connections(pair: Any, tmp_path: Any) -> None:
    """With max_pending_handshakes=2, established connections are never evicted by new
    half-open ones: only the unauthenticated oldest goes."""
    server_dir, client_dir = pair
    server_dir.update_conf(max_pending_handshakes=2)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        port = server_port(server)
        point_at(client_dir, server_dir, port)
        client = P2PHandler(workdir=client_dir.workdir)
        _, good = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(good.wait_handshaked(), 5)
        socks = _open_raw(port, 5)
        await wait_until(lambda: sum(k == "closed" for k, _ in R.log) >= 3, 5, "evictions")
        assert len(server.connections.pending) == 2
        good.send(b"still here")
        assert await asyncio.wait_for(good.got, 5) == b"recv:still here"
        for s in socks:
            s.close()
        await client.close()
        await server.close()

    run(main())


def test_no_limit_when_zero(pair: Any) -> None:
    server_dir, _ = pair
    server_dir.update_conf(max_pending_handshakes=0)

    async def main() -> None:
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=TcpP2P)
        socks = _open_raw(server_port(server), 50)
        await wait_until(lambda: len(server.connections.pending) == 50, 5, "50 pending")
        for s in socks:
            s.close()
        await wait_until(lambda: not server.connections.pending, 5, "none pending")
        await server.close()

    run(main())
