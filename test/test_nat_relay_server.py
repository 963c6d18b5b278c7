"""p2psc.nat.relay_server: a real RelayServer on 127.0.0.1 with real peers (p2psc control
links, UDP probes from real sockets, TCP circuits), every wait bounded."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest

from conftest import run
from nat_util import (
    RELAY_ID,
    FrameClient,
    RelayEnv,
    circuit_pair,
    circuit_stream,
    p2p_over_circuit,
    probe,
    random_bytes,
    start_relay,
    udp_socket,
    until,
)
from p2psc.nat import wire
from p2psc.nat.rendezvous import RelayLimits
from p2psc.nat.wire import Addr
from p2psc.p2p import TcpP2P
from p2psc.p2pexcept import P2PError

A, B, C = "alice.test", "bob.test", "carol.test"
EP_A, EP_B = b"alice-ep", b"bob-ep-1"
UDP_BOTH = wire.FLAG_TCP | wire.FLAG_UDP


def relay_test(tmp_path: Path, body: Any, *, limits: RelayLimits | None = None,
               peers: tuple[str, ...] = (A, B), strangers: tuple[str, ...] = (),
               loop: str = "asyncio", timeout: float = 60.0, **settings: Any) -> None:
    async def main() -> None:
        env = await start_relay(tmp_path, peers, limits, strangers=strangers, **settings)
        try:
            await body(env)
        finally:
            await env.close()
    run(main(), loop=loop, timeout=timeout)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- control links ------------------------------------------------------------------------------

def test_welcome_arrives_with_the_ports_and_the_observed_address(tmp_path: Path,
                                                                 loop_kind: str) -> None:
    async def body(env: RelayEnv) -> None:
        alice = env.peers[A]
        link = await env.attach(alice)
        w = alice.welcome
        assert w is not None and len(w.probe_token) == wire.TOKEN_LEN
        assert (w.udp_port1, w.udp_port2) == env.server.udp_ports
        assert 0 not in env.server.udp_ports and len(set(env.server.udp_ports)) == 2
        assert w.observed == Addr(*link.transport.get_extra_info("sockname")[:2])
        assert w.max_dgram == env.server.limits.max_dgram_payload
        assert env.server.rendezvous.peer_of(next(iter(env.server.links))) == A
        link.send_frame(wire.Ping(12345))
        assert await link.next() == wire.Pong(12345)
    relay_test(tmp_path, body, loop=loop_kind)


def test_a_second_control_link_replaces_the_first(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        alice = env.peers[A]
        first = await env.attach(alice)
        token1 = alice.welcome.probe_token  # type: ignore[union-attr]
        second = await env.attach(alice)
        assert await first.next() is None                     # the relay closed the first
        assert alice.welcome.probe_token != token1  # type: ignore[union-attr]
        second.send_frame(wire.Ping(2))
        assert await second.next() == wire.Pong(2)
        assert env.server.rendezvous.attached == 1
    relay_test(tmp_path, body)


def test_an_unknown_peer_cannot_attach_and_gets_nothing(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    async def body(env: RelayEnv) -> None:
        mallory = env.peers["mallory.test"]
        _, link = await mallory.handler.connect_peer(RELAY_ID, FrameClient)
        with pytest.raises(P2PError):
            await asyncio.wait_for(link.wait_handshaked(), 10)
        assert await link.next() is None                      # closed, and no frame before
        assert env.server.rendezvous.attached == 0
        assert env.server.rendezvous.counters["attached"] == 0
        # a known peer is served meanwhile
        await env.attach(env.peers[A])
    with caplog.at_level(logging.INFO):
        relay_test(tmp_path, body, strangers=("mallory.test",))
    assert any("mallory.test" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                                     b"\x00\x00\x00\x05\x01hello" + bytes(100),
                                     b"\xff" * 4096])
def test_garbage_closes_only_that_connection(tmp_path: Path, garbage: bytes) -> None:
    async def body(env: RelayEnv) -> None:
        link = await env.attach(env.peers[A])
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(garbage)
        assert await asyncio.wait_for(read_all(reader), 15) == b""   # closed, nothing said
        writer.close()
        link.send_frame(wire.Ping(9))
        assert await link.next() == wire.Pong(9)
        await env.attach(env.peers[B])
    relay_test(tmp_path, body, handshake_timeout=3.0)


def test_a_malformed_or_oversize_frame_closes_only_that_link(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    async def body(env: RelayEnv) -> None:
        a = await env.attach(env.peers[A])
        b = await env.attach(env.peers[B])
        c = await env.attach(env.peers[C])
        a.send(b"\x99not a frame")
        assert await a.next() is None
        big = wire.Dgram(EP_A, EP_B, B, bytes(env.server.limits.max_frame))
        c.send_frame(big)
        assert await c.next() is None
        b.send_frame(wire.Ping(4))
        assert await b.next() == wire.Pong(4)
        await b.nothing()
        assert env.server.rendezvous.counters["bad_frames"] == 2
    with caplog.at_level(logging.WARNING, logger="p2psc.relay"):
        relay_test(tmp_path, body, peers=(A, B, C))
    lines = [r.getMessage() for r in caplog.records if r.name == "p2psc.relay"]
    assert any("alice.test: malformed control frame" in m for m in lines), lines
    assert any("carol.test: malformed control frame" in m for m in lines), lines


# -- UDP probes and punching --------------------------------------------------------------------

def test_a_probe_from_a_real_socket_gets_its_real_port(tmp_path: Path, loop_kind: str) -> None:
    async def body(env: RelayEnv) -> None:
        alice = env.peers[A]
        await env.attach(alice)
        assert alice.welcome is not None
        sock = await udp_socket(alice)
        p1, p2 = env.server.udp_ports
        for port, index in ((p1, 1), (p2, 2)):
            reply = await probe(sock, alice.welcome.probe_token, EP_A, port,
                                txid=b"txid-00" + bytes([index]))
            assert reply.observed == Addr("127.0.0.1", sock.port)
        assert env.server.rendezvous.mappings(A) == {
            EP_A: {1: Addr("127.0.0.1", sock.port), 2: Addr("127.0.0.1", sock.port)}}
        # an unknown token: no reply, counted
        assert sock.transport is not None
        sock.transport.sendto(wire.encode_probe(b"\x07" * 16, EP_A, b"txid-bad"),
                              ("127.0.0.1", p1))
        sock.transport.sendto(b"\x50" * 63, ("127.0.0.1", p1))
        await until(lambda: env.server.rendezvous.counters["probes_dropped"] == 2)
        await probe(sock, alice.welcome.probe_token, EP_A, p1)   # (no reply was queued)
    relay_test(tmp_path, body, loop=loop_kind)


def test_probes_are_rate_limited_per_source_ip(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        alice = env.peers[A]
        await env.attach(alice)
        assert alice.welcome is not None
        sock = await udp_socket(alice)
        assert sock.transport is not None
        for i in range(10):
            sock.transport.sendto(wire.encode_probe(alice.welcome.probe_token, EP_A,
                                                    b"txid-%03d" % i),
                                  ("127.0.0.1", env.server.udp_ports[0]))
        await until(lambda: env.server.rendezvous.counters["probes_dropped"] == 7)
        assert env.server.rendezvous.counters["probes_answered"] == 3
        await asyncio.sleep(0.1)
        assert sock.queue.qsize() == 3
    relay_test(tmp_path, body, limits=RelayLimits(probe_burst_per_ip=3,
                                                  probe_rate_per_ip=0.001))


def test_connect_sends_punch_to_both_links(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        alice, bob = env.peers[A], env.peers[B]
        la = await env.attach(alice, hello=wire.Hello(wire.FLAG_UDP, EP_A))
        lb = await env.attach(bob, hello=wire.Hello(UDP_BOTH, EP_B, (Addr("10.9.8.7", 4444),)))
        sa, sb = await udp_socket(alice), await udp_socket(bob)
        p1, p2 = env.server.udp_ports
        assert alice.welcome is not None and bob.welcome is not None
        await probe(sa, alice.welcome.probe_token, EP_A, p1)
        await probe(sb, bob.welcome.probe_token, EP_B, p1)
        await probe(sb, bob.welcome.probe_token, EP_B, p2)
        local = (Addr("192.168.1.5", 5555),)
        la.send_frame(wire.Connect(4242, EP_A, local, B))
        pa = await la.expect(wire.Punch)
        pb = await lb.expect(wire.Punch)
        assert pa.punch_id == pb.punch_id and len(pa.punch_id) == wire.PUNCH_ID_LEN
        assert pa == wire.Punch(4242, pa.punch_id, EP_A, EP_B,
                                (Addr("127.0.0.1", sb.port), Addr("10.9.8.7", 4444)), B)
        assert pb == wire.Punch(0, pa.punch_id, EP_B, EP_A,
                                (Addr("127.0.0.1", sa.port), Addr("192.168.1.5", 5555)), A)
        # a refusal goes to the requester only
        lb.send_frame(wire.Connect(7, EP_B, (), "nobody.test"))
        err = await lb.expect(wire.Error)
        assert (err.request, err.code) == (7, wire.E_NOT_CONNECTED)
        await la.nothing()
    relay_test(tmp_path, body)


# -- relayed datagrams --------------------------------------------------------------------------

def test_dgram_is_relayed_byte_exact_with_the_authenticated_source(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B])
        lc = await env.attach(env.peers[C])
        payload = random_bytes(env.server.limits.max_dgram_payload)
        la.send_frame(wire.Dgram(EP_A, EP_B, B, payload))
        got = await lb.expect(wire.RelayedDgram)
        assert got == wire.RelayedDgram(EP_A, EP_B, A, payload)
        # carol forges alice's endpoints: delivered as carol's
        lc.send_frame(wire.Dgram(EP_A, EP_B, B, b"i am alice"))
        assert await lb.expect(wire.RelayedDgram) == wire.RelayedDgram(EP_A, EP_B, C,
                                                                       b"i am alice")
        # ... and a relay->peer DGRAM naming alice is no peer frame at all: carol is cut off
        lc.send(wire.encode(wire.RelayedDgram(EP_A, EP_B, A, b"i am alice")))
        assert await lc.next() is None
        # over the size limit, or to a peer not attached: dropped
        la.send_frame(wire.Dgram(EP_A, EP_B, B, payload + b"x"))
        la.send_frame(wire.Dgram(EP_A, EP_B, "nobody.test", b"x"))
        la.send_frame(wire.Dgram(EP_A, EP_B, B, b"after"))
        assert await lb.expect(wire.RelayedDgram) == wire.RelayedDgram(EP_A, EP_B, A, b"after")
        c = env.server.rendezvous.counters
        assert c["dgrams_relayed"] == 3 and c["dgrams_dropped"] == 2
    relay_test(tmp_path, body, peers=(A, B, C))


def test_dgrams_to_a_link_that_does_not_read_are_dropped_not_buffered(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B])
        assert lb.transport is not None
        lb.transport.pause_reading()                          # bob stops reading
        payload = bytes(60000)
        for _ in range(400):                                  # 24 MB
            la.send_frame(wire.Dgram(EP_A, EP_B, B, payload))
            await la.drain()
        counters = env.server.rendezvous.counters
        await until(lambda: counters["dgrams_relayed"] == 400, timeout=20,
                    what="all datagrams handled")
        assert counters["lossy_dropped"] > 0 and counters["dgrams_dropped"] == 0
        relay_side = [lk for lk in env.server.links
                      if env.server.rendezvous.peer_of(lk) == B]
        assert relay_side and relay_side[0].transport is not None
        limit = env.server.limits.dgram_backlog_bytes
        # at most the bound, one frame and one coalesced flush (64 KiB) over it
        assert relay_side[0].transport.get_write_buffer_size() <= limit + 2 * 70000
        lb.transport.resume_reading()
        la.send_frame(wire.Ping(1))
        assert await la.next() == wire.Pong(1)                # alice's link is unaffected
    relay_test(tmp_path, body, limits=RelayLimits(relay_bytes_per_sec=1 << 30,
                                                  relay_burst_bytes=1 << 30,
                                                  dgram_backlog_bytes=256 * 1024))


# -- requests: limits ---------------------------------------------------------------------------

def test_per_peer_circuit_limit_gives_e_limit(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        for req in (1, 2):
            la.send_frame(wire.Open(req, B))
            assert (await la.expect(wire.Circuit)).request == req
            await lb.expect(wire.Incoming)
        la.send_frame(wire.Open(3, B))
        err = await la.expect(wire.Error)
        assert (err.request, err.code) == (3, wire.E_LIMIT)
        la.send_frame(wire.Open(4, A))
        assert (await la.expect(wire.Error)).code == wire.E_BAD_REQUEST
        await lb.nothing()
    relay_test(tmp_path, body, limits=RelayLimits(circuits_per_peer=2))


def test_request_rate_gives_e_rate_limited(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        await env.attach(env.peers[B])
        for req in range(1, 5):
            la.send_frame(wire.Open(req, B))
        codes = [(e.request, e.code) for e in [await la.expect(wire.Error) for _ in range(4)]]
        assert codes == [(1, wire.E_NO_TCP), (2, wire.E_NO_TCP), (3, wire.E_NO_TCP),
                         (4, wire.E_RATE_LIMITED)]
    relay_test(tmp_path, body, limits=RelayLimits(request_burst=3, requests_per_sec=0.01))


# -- circuits -----------------------------------------------------------------------------------

def test_a_circuit_carries_5_mb_each_way_byte_exact(tmp_path: Path, loop_kind: str) -> None:
    async def body(env: RelayEnv) -> None:
        await env.attach(env.peers[A])
        await env.attach(env.peers[B], hello=wire.Hello(UDP_BOTH, EP_B))
        ra, wa, rb, wb = await circuit_pair(env, env.peers[A], env.peers[B], request=77)
        up, down = random_bytes(5_000_000), random_bytes(5_000_000)

        async def send(w: asyncio.StreamWriter, data: bytes) -> None:
            for i in range(0, len(data), 100_000):
                w.write(data[i:i + 100_000])
                await w.drain()
            w.write_eof()                                   # half-close: forwarded

        got = await asyncio.wait_for(asyncio.gather(send(wa, up), send(wb, down),
                                                    read_all(rb), read_all(ra)), 30)
        assert hashlib.sha256(got[2]).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got[3]).digest() == hashlib.sha256(down).digest()
        assert len(got[2]) == len(got[3]) == 5_000_000
        wa.close()
        wb.close()
        rv = env.server.rendezvous
        await until(lambda: rv.circuits == 0, what="the circuit to end")
        assert rv.counters["circuit_bytes_relayed"] == 10_000_000
        assert rv.counters["circuits_spliced"] == 1
    relay_test(tmp_path, body, loop=loop_kind,
               limits=RelayLimits(relay_bytes_per_sec=1 << 30, relay_burst_bytes=1 << 30))


def test_a_p2psc_handshake_runs_end_to_end_over_a_circuit(tmp_path: Path,
                                                          loop_kind: str) -> None:
    class Collect(TcpP2P):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.got: asyncio.Queue[bytes] = asyncio.Queue()

        def on_recv(self, data: bytes) -> None:
            self.got.put_nowait(data)

    async def body(env: RelayEnv) -> None:
        alice, bob = env.peers[A], env.peers[B]
        la = await env.attach(alice)
        lb = await env.attach(bob, hello=wire.Hello(wire.FLAG_TCP, EP_B))
        la.send_frame(wire.Open(5, B))
        circ = await la.expect(wire.Circuit)
        inc = await lb.expect(wire.Incoming)
        assert inc.source_peer == A
        # bob answers as a responder, alice initiates: the handshake runs through the relay
        resp_task = asyncio.ensure_future(
            p2p_over_circuit(env.port, inc.token, bob.handler, None, Collect))
        init = await p2p_over_circuit(env.port, circ.token, alice.handler, B, Collect)
        resp = await asyncio.wait_for(resp_task, 10)
        await asyncio.wait_for(init.wait_handshaked(), 10)
        await asyncio.wait_for(resp.wait_handshaked(), 10)
        assert resp.peer_id == A and init.peer_id == B
        big = random_bytes(3_000_000)
        init.send(big)
        resp.send(b"hello alice")
        assert isinstance(init, Collect) and isinstance(resp, Collect)
        assert await asyncio.wait_for(resp.got.get(), 20) == big
        assert await asyncio.wait_for(init.got.get(), 10) == b"hello alice"
        # the relay holds only its two control links: it never had the circuit's keys
        relay_conns = env.relay_handler.connections.protocols
        assert {p.peer_id for p in relay_conns} == {A, B} and len(relay_conns) == 2
        (info,) = env.server.circuits()
        assert (info.requester_id, info.target_id) == (A, B)
        init.close()
        assert await asyncio.wait_for(resp.wait_closed(), 10) is None   # a clean CLOSE
        await until(lambda: env.server.rendezvous.circuits == 0, what="the circuit to end")
    relay_test(tmp_path, body, loop=loop_kind,
               limits=RelayLimits(relay_bytes_per_sec=1 << 30, relay_burst_bytes=1 << 30))


def test_a_reader_that_stops_does_not_grow_the_relays_memory(tmp_path: Path,
                                                            loop_kind: str) -> None:
    async def body(env: RelayEnv) -> None:
        await env.attach(env.peers[A])
        await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        ra, wa, rb, wb = await circuit_pair(env, env.peers[A], env.peers[B])
        data = random_bytes(48 << 20)
        wa.write(data)                     # the test's own buffer: the relay must not hold it
        # bob never reads: the relay stops reading alice once bob's side is full
        await until(lambda: bool(env.server.circuits())
                    and "peer" in env.server.circuits()[0].paused[0], timeout=20,
                    what="the relay to pause reading the requester")
        for _ in range(20):
            (info,) = env.server.circuits()
            to_bob = info.buffered[1]
            assert to_bob <= 1 << 20, to_bob   # high-water mark plus one read, not 48 MB
            assert info.buffered[0] == 0
            await asyncio.sleep(0.02)
        assert "peer" in env.server.circuits()[0].paused[0]
        wa.write_eof()
        got = await asyncio.wait_for(read_all(rb), 60)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert not env.server.circuits()[0].paused[0]
        wa.close()
        wb.close()
    relay_test(tmp_path, body, loop=loop_kind, timeout=120,
               limits=RelayLimits(relay_bytes_per_sec=1 << 30, relay_burst_bytes=1 << 30))


def test_the_byte_rate_pauses_reading_and_resumes_on_refill(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        await env.attach(env.peers[A])
        await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        ra, wa, rb, wb = await circuit_pair(env, env.peers[A], env.peers[B])
        data = random_bytes(3 << 20)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        wa.write(data)
        wa.write_eof()
        saw_rate_pause = False

        async def watch() -> None:
            nonlocal saw_rate_pause
            while not saw_rate_pause:
                infos = env.server.circuits()
                saw_rate_pause = bool(infos) and "rate" in infos[0].paused[0]
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch())
        got = await asyncio.wait_for(read_all(rb), 30)
        elapsed = loop.time() - t0
        watcher.cancel()
        assert got == data
        assert saw_rate_pause
        # 1 MiB burst, then 1 MiB/s: about 2 s for 3 MiB (a lower bound is safe to check)
        assert elapsed >= 1.5, elapsed
        wa.close()
        wb.close()
    relay_test(tmp_path, body, limits=RelayLimits(relay_bytes_per_sec=1 << 20,
                                                  relay_burst_bytes=1 << 20))


def test_an_idle_circuit_is_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(env: RelayEnv) -> None:
        await env.attach(env.peers[A])
        await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        ra, wa, rb, wb = await circuit_pair(env, env.peers[A], env.peers[B])
        wa.write(b"ping")
        assert await asyncio.wait_for(rb.readexactly(4), 5) == b"ping"
        # then nothing either way: both ends are closed after the idle timeout
        assert await asyncio.wait_for(ra.read(), 10) == b""
        assert await asyncio.wait_for(rb.read(), 10) == b""
        await until(lambda: env.server.rendezvous.circuits == 0, what="the circuit to end")
        wa.close()
        wb.close()
    with caplog.at_level(logging.INFO, logger="p2psc.relay"):
        relay_test(tmp_path, body, limits=RelayLimits(circuit_idle_timeout=0.5))
    assert any("no bytes for 0.5 s; closed" in r.getMessage() for r in caplog.records)


def test_half_open_preambles_and_silent_connections_are_closed(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        link = await env.attach(env.peers[A])
        half = await asyncio.open_connection("127.0.0.1", env.port)
        half[1].write(b"P2R")                               # never completed
        silent = await asyncio.open_connection("127.0.0.1", env.port)
        for reader, writer in (half, silent):
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        # a bad preamble, and a good one with an unknown token: closed at once
        for pre in (b"P2RC\x09" + bytes(32), wire.circuit_preamble(b"\x01" * 32)):
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            writer.write(pre)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        link.send_frame(wire.Ping(3))
        assert await link.next() == wire.Pong(3)
    relay_test(tmp_path, body, limits=RelayLimits(preamble_timeout=0.5))


def test_a_circuit_whose_other_side_never_joins_is_closed(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        la.send_frame(wire.Open(1, B))
        circ = await la.expect(wire.Circuit)
        await lb.expect(wire.Incoming)                       # bob ignores it
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(wire.circuit_preamble(circ.token) + b"early bytes")
        assert await asyncio.wait_for(reader.read(), 10) == b""   # no 0 byte: closed
        writer.close()
        rv = env.server.rendezvous
        assert rv.counters["circuits_expired"] == 1 and rv.circuits == 0
        # the token is spent
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(wire.circuit_preamble(circ.token))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    relay_test(tmp_path, body, limits=RelayLimits(circuit_join_timeout=0.5))


def test_a_circuit_token_joins_once(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        la.send_frame(wire.Open(1, B))
        circ = await la.expect(wire.Circuit)
        inc = await lb.expect(wire.Incoming)
        first = asyncio.ensure_future(circuit_stream(env.port, circ.token))
        await until(lambda: env.server.rendezvous.counters["joins_refused"] == 0
                    and env.server.waiting_circuits == 1, what="the first side to wait")
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        writer.write(wire.circuit_preamble(circ.token))       # the same token again
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        rb, wb = await circuit_stream(env.port, inc.token)
        ra, wa = await asyncio.wait_for(first, 5)
        wb.write(b"to alice")
        assert await asyncio.wait_for(ra.readexactly(8), 5) == b"to alice"
        wa.close()
        assert await asyncio.wait_for(rb.read(), 5) == b""    # one side closed: both are
        wb.close()
    relay_test(tmp_path, body)


def test_early_bytes_after_the_preamble_are_forwarded_at_the_splice(tmp_path: Path) -> None:
    async def body(env: RelayEnv) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, EP_B))
        la.send_frame(wire.Open(1, B))
        circ = await la.expect(wire.Circuit)
        inc = await lb.expect(wire.Incoming)
        ra, wa = await asyncio.open_connection("127.0.0.1", env.port)
        wa.write(wire.circuit_preamble(circ.token) + b"early")
        await until(lambda: env.server.waiting_circuits == 1, what="alice's side to wait")
        rb, wb = await circuit_stream(env.port, inc.token)
        assert await asyncio.wait_for(ra.readexactly(1), 5) == b"\x00"
        assert await asyncio.wait_for(rb.readexactly(5), 5) == b"early"
        wa.close()
        wb.close()
    relay_test(tmp_path, body)
