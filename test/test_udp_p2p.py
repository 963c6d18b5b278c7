"""UdpP2P and the handler's UDP calls over real sockets on 127.0.0.1: echo on both loops,
a lossy relay, lost INITs, attacks, roaming, many peers and an INIT flood."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from conftest import make_peer, rsa_key, run
from p2psc import keys
from p2psc._proto import ratelimit, rsakeys
from p2psc.config import Settings
from p2psc.p2pexcept import (ChannelNotReady, ConnectionLost, HandshakeTimeout, InvalidDataType,
                             MessageTooLarge, MissRemoteAddr)
from p2psc.p2phandler import P2PHandler
from p2psc._proto.udp import UdpEndpoint
from p2psc._proto.udp_wire import T_DATA, T_INIT, T_KEEPALIVE
from udp_util import Collector, Echo, UdpRelay, fd_limit_at_least, raw_socket, udp_port

FAST = {"udp_handshake_retry": 0.2, "udp_handshake_timeout": 3.0}


async def start_server(server_dir: Any, cls: type = Echo) -> tuple[P2PHandler, Any]:
    server = P2PHandler(workdir=server_dir.workdir)
    _, proto = await server.run_as_udp_server(ProtocolClass=cls, host="127.0.0.1", port=0)
    return server, proto


async def start_client(client_dir: Any, server_dir: Any, port: int,
                       cls: type = Collector) -> tuple[P2PHandler, Any]:
    client_dir.know(server_dir, port=port)
    client = P2PHandler(workdir=client_dir.workdir)
    _, proto = await client.connect_udp_peer(server_dir.peer_id, ProtocolClass=cls)
    return client, proto


def test_echo_hooks_and_api(pair: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair
    rng = random.Random(3)
    payloads = [rng.randbytes(rng.choice([0, 1, 100, 1000, 1195])) for _ in range(300)]

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        client, cproto = await start_client(client_dir, server_dir, udp_port(server))
        cproto.send(b"queued before the handshake")
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        assert cproto.handshaked and cproto.handshaked_calls == 1
        await asyncio.wait_for(cproto.expect(1), 5)
        assert cproto.received == [b"recv:queued before the handshake"]
        for i, p in enumerate(payloads):
            cproto.send(p)
            if i % 50 == 49:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(cproto.expect(1 + len(payloads)), 10)
        assert cproto.received[1:] == [b"recv:" + p for p in payloads]  # loopback: in order
        assert [pid for pid, _ in sproto.handshaked_peers] == ["client.test"]
        await asyncio.wait_for(sproto.wait_handshaked(), 1)
        caddr = sproto.handshaked_peers[0][1]
        assert sproto.peer_of(caddr) == "client.test"
        # the server talks first, by peer id and by address
        sproto.send_to_peer("client.test", b"push")
        sproto.send(b"push2", caddr)
        await asyncio.wait_for(cproto.expect(len(payloads) + 3), 5)
        assert cproto.received[-2:] == [b"push", b"push2"]
        with pytest.raises(MissRemoteAddr):
            sproto.send(b"to whom?")
        with pytest.raises(ChannelNotReady):
            sproto.send(b"x", ("127.0.0.1", 9))
        with pytest.raises(MessageTooLarge):
            cproto.send(bytes(1201))
        with pytest.raises(InvalidDataType):
            cproto.send("text")  # type: ignore[arg-type]
        # stop(): the server hears the authenticated CLOSE
        cproto.stop()
        for _ in range(100):
            if sproto.closed_peers:
                break
            await asyncio.sleep(0.01)
        assert sproto.closed_peers == [("client.test", None)]
        with pytest.raises(ChannelNotReady):
            cproto.send(b"after stop")
        await client.close()
        await server.close()
        assert server.udp_transport is None

    run(main(), loop=loop_kind, timeout=40)


def test_pre_handshake_queue_is_bounded(pair: Any) -> None:
    server_dir, client_dir = pair
    client_dir.update_conf(pending_max_messages=4, **FAST)

    async def main() -> None:
        # nobody listens: the handshake cannot complete
        client, proto = await start_client(client_dir, server_dir, 9)
        for _ in range(4):
            proto.send(b"x")
        with pytest.raises(ChannelNotReady):
            proto.send(b"one too many")
        with pytest.raises(HandshakeTimeout):
            await asyncio.wait_for(proto.wait_handshaked(), 10)
        await client.close()

    run(main(), timeout=20)


def test_lossy_relay_exactly_once_byte_exact(pair: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair
    for d in pair:
        d.update_conf(**FAST)
    rng = random.Random(11)
    payloads = [b"%06d:" % i + rng.randbytes(rng.randint(0, 1100)) for i in range(600)]

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        relay = await UdpRelay(udp_port(server), seed=5, drop=0.10, dup=0.05,
                               reorder=0.10).start()
        client, cproto = await start_client(client_dir, server_dir, relay.port)
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        for i, p in enumerate(payloads):
            cproto.send(p)
            if i % 20 == 19:
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        got_server = [d for d, _ in sproto.received]
        sent = set(payloads)
        assert len(got_server) == len(set(got_server))          # exactly once
        assert set(got_server) <= sent                         # byte-exact, only what was sent
        assert len(got_server) > 0.7 * len(payloads)
        echoed = {b"recv:" + d for d in got_server}
        assert len(cproto.received) == len(set(cproto.received))
        assert set(cproto.received) <= echoed
        assert len(cproto.received) > 0.6 * len(payloads)
        # the relay really duplicated and dropped
        assert len(relay.captured["c2s"]) > len(payloads)
        relay.close()
        await client.close()
        await server.close()

    run(main(), loop=loop_kind, timeout=40)


def test_first_two_inits_dropped(pair: Any) -> None:
    server_dir, client_dir = pair
    for d in pair:
        d.update_conf(**FAST)
    dropped: list[bytes] = []

    def policy(direction: str, data: bytes) -> list[bytes] | None:
        if direction == "c2s" and data[0] == T_INIT and len(dropped) < 2:
            dropped.append(data)
            return []
        return None

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        relay = await UdpRelay(udp_port(server), policy=policy).start()
        client, cproto = await start_client(client_dir, server_dir, relay.port)
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        assert len(dropped) == 2 and dropped[0] == dropped[1]  # the same INIT, retransmitted
        cproto.send(b"ping")
        await asyncio.wait_for(cproto.expect(1), 5)
        assert cproto.received == [b"recv:ping"]
        relay.close()
        await client.close()
        await server.close()

    run(main(), timeout=20)


def test_attacks_nothing_delivered_server_keeps_working(pair: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        relay = await UdpRelay(udp_port(server)).start()
        client, cproto = await start_client(client_dir, server_dir, relay.port)
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        for i in range(5):
            cproto.send(b"legit %d" % i)
        await asyncio.wait_for(cproto.expect(5), 5)
        c2s, s2c = list(relay.captured["c2s"]), list(relay.captured["s2c"])
        assert c2s[0][0] == T_INIT and sum(d[0] == T_DATA for d in c2s) == 5
        attacker, side = await raw_socket()
        saddr = ("127.0.0.1", udp_port(server))
        caddr = ("127.0.0.1", cproto.transport.get_extra_info("sockname")[1])
        rng = random.Random(99)
        bad: list[bytes] = []
        bad += c2s                                                    # replays, handshake too
        for d in c2s:
            for _ in range(3):                                        # flipped bits
                b = bytearray(d)
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
                bad.append(bytes(b))
            bad += [d[:n] for n in (0, 1, 5, 13, 28, len(d) - 1)]      # truncations
            b = bytearray(d)
            b[1:5] = rng.randbytes(4)                                  # unknown index
            bad.append(bytes(b))
        for _ in range(300):                                          # garbage of any size
            g = bytearray(rng.randbytes(rng.choice([1, 10, 29, 200, 1500, 9000])))
            g[0] = rng.randrange(8)
            bad.append(bytes(g))
        bad.append(bytes(65000))
        for d in bad:
            attacker.sendto(d, saddr)
        for d in s2c:                                                 # the client, too
            attacker.sendto(d, caddr)
        await asyncio.sleep(0.5)
        assert [d for d, _ in sproto.received] == [b"legit %d" % i for i in range(5)]
        assert len(sproto.handshaked_peers) == 1
        assert len(cproto.received) == 5 and cproto.handshaked_calls == 1
        # RESPs re-sent from the cache to the attacker carry nothing it can use; no data
        assert all(d[0] != T_DATA for d in side.got)  # type: ignore[attr-defined]
        cproto.send(b"still working")
        await asyncio.wait_for(cproto.expect(6), 5)
        assert cproto.received[-1] == b"recv:still working"
        attacker.close()
        relay.close()
        await client.close()
        await server.close()

    run(main(), loop=loop_kind, timeout=30)


def test_roaming_source_port_changes(pair: Any) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        relay = await UdpRelay(udp_port(server)).start()
        client, cproto = await start_client(client_dir, server_dir, relay.port)
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        cproto.send(b"before")
        await asyncio.wait_for(cproto.expect(1), 5)
        first_addr = sproto.received[0][1]
        session = sproto.endpoint.session_for_addr(first_addr)
        new_port = await relay.rebind()                 # the NAT maps us to a new port
        for i in range(3):
            cproto.send(b"after %d" % i)
        await asyncio.wait_for(cproto.expect(4), 5)
        assert cproto.received == [b"recv:before"] + [b"recv:after %d" % i for i in range(3)]
        assert sproto.received[-1][1] == ("127.0.0.1", new_port) != first_addr
        assert sproto.endpoint.session_for_addr(("127.0.0.1", new_port)) is session
        assert len(sproto.handshaked_peers) == 1   # the same session, no new handshake
        relay.close()
        await client.close()
        await server.close()

    run(main(), timeout=20)


def test_rekey_by_time_keeps_the_flow(pair: Any) -> None:
    server_dir, client_dir = pair
    for d in pair:
        d.update_conf(rekey_after_time=0.3)

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        client, cproto = await start_client(client_dir, server_dir, udp_port(server))
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        first = cproto.endpoint.session_for_peer("server.test")
        n = 0
        for _ in range(20):
            for _ in range(5):
                cproto.send(b"m%d" % n)
                n += 1
            await asyncio.sleep(0.05)
        await asyncio.wait_for(cproto.expect(n), 5)
        assert cproto.received == [b"recv:m%d" % i for i in range(n)]
        assert cproto.handshaked_calls == 1 and len(sproto.handshaked_peers) == 1
        assert cproto.endpoint.session_for_peer("server.test") is not first  # rekeyed
        await client.close()
        await server.close()

    run(main(), timeout=20)


@pytest.mark.parametrize("interval", [0.2, 0.0])
def test_keepalives_hold_a_silent_session_open(pair: Any, interval: float) -> None:
    """Both applications silent for 2.5 s, past a 1 s udp_session_idle_timeout. Keepalives
    every 0.2 s (counted on a relay): one stream each way, none answering another, nothing
    delivered, and the session lives on. Without them (0): nothing is sent, and it expires."""
    server_dir, client_dir = pair
    for d in pair:
        d.update_conf(udp_keepalive_interval=interval, udp_session_idle_timeout=1.0)

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        relay = await UdpRelay(udp_port(server)).start()
        client, cproto = await start_client(client_dir, server_dir, relay.port)
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        cproto.send(b"hello")
        await asyncio.wait_for(cproto.expect(1), 5)
        session = cproto.endpoint.session_for_peer("server.test")
        start = {k: len(v) for k, v in relay.captured.items()}
        await asyncio.sleep(2.5)
        quiet = {k: [d[0] for d in v[start[k]:]] for k, v in relay.captured.items()}
        if interval:
            for direction in ("c2s", "s2c"):
                # at most one per 0.2 s from each side (a ping-pong would be twice that)
                assert set(quiet[direction]) == {T_KEEPALIVE}, quiet
                assert 6 <= len(quiet[direction]) <= 13, quiet
            assert sproto.closed_peers == []
            assert cproto.endpoint.session_for_peer("server.test") is session
            assert [d for d, _ in sproto.received] == [b"hello"]
            assert cproto.received == [b"recv:hello"]
            cproto.send(b"still there")
            await asyncio.wait_for(cproto.expect(2), 5)
            assert cproto.received == [b"recv:hello", b"recv:still there"]
            assert cproto.handshaked_calls == 1 and len(sproto.handshaked_peers) == 1
        else:
            assert quiet == {"c2s": [], "s2c": []}
            [(peer, error)] = sproto.closed_peers
            assert peer == "client.test" and isinstance(error, ConnectionLost)
            assert cproto.endpoint.session_for_peer("server.test") is None
        relay.close()
        await client.close()
        await server.close()

    run(main(), timeout=20)


def test_200_concurrent_client_sessions(tmp_path: Path) -> None:
    assert fd_limit_at_least(600)
    # INITs are rate limited per source IP, and every client here is 127.0.0.1
    server_dir = make_peer(tmp_path, "server.test", udp_init_rate_per_addr=1000.0,
                           udp_init_burst_per_addr=1000)
    # one peer id per client: a peer's new session supersedes its older ones
    # (udp_max_sessions_per_peer), so 240 live sessions need 240 peers
    n_clients = 240
    client_dirs = [make_peer(tmp_path, f"c{i}.test", key_name="client")
                   for i in range(n_clients)]
    for c in client_dirs:
        server_dir.know(c)

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        port = udp_port(server)
        handlers = []
        for c in client_dirs:
            c.know(server_dir, port=port)
            handlers.append(P2PHandler(workdir=c.workdir))
        sem = asyncio.Semaphore(60)

        async def one(i: int) -> Any:
            async with sem:
                _, proto = await handlers[i].connect_udp_peer("server.test",
                                                             ProtocolClass=Collector)
                await asyncio.wait_for(proto.wait_handshaked(), 15)
                return proto

        protos = await asyncio.gather(*(one(i) for i in range(n_clients)))
        assert len(sproto.endpoint.sessions) == n_clients
        for rnd in range(3):
            for i, p in enumerate(protos):
                p.send(b"%d/%d" % (i, rnd))
            await asyncio.gather(*(asyncio.wait_for(p.expect(rnd + 1), 10) for p in protos))
        for i, p in enumerate(protos):
            assert p.received == [b"recv:%d/%d" % (i, r) for r in range(3)]
        assert len(sproto.handshaked_peers) == n_clients
        for h in handlers:
            await h.close()
        await server.close()

    run(main(), timeout=50)


def test_init_flood_from_one_address(pair: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server_dir, client_dir = pair
    # INITs are rate limited per source IP; on loopback the rogue and the legitimate client
    # share 127.0.0.1, so here each source port stands for a host of its own
    monkeypatch.setattr(ratelimit, "rate_key", lambda addr: addr)
    rogue = make_peer(tmp_path, "rogue.test")
    server_dir.know(rogue)
    decrypts = [0]
    orig = rsakeys.decrypt

    def counting(*a: Any, **kw: Any) -> Any:
        decrypts[0] += 1
        return orig(*a, **kw)

    async def main() -> None:
        server, sproto = await start_server(server_dir)
        port = udp_port(server)
        # a known peer gone rogue floods distinct, validly signed INITs (each would cost two
        # RSA private operations), plus INIT-typed garbage, all from one address
        rogue_key = rsa_key("rogue.test")
        inits = []
        for _ in range(150):
            ep = UdpEndpoint("rogue.test", rogue_key, Settings())
            ep.connect("server.test", rsa_key("server.test").public_key(),
                       ("127.0.0.1", port), 0.0)
            inits.append(ep.datagrams_to_send()[0][0])
        attacker, _ = await raw_socket()
        rng = random.Random(1)
        stop = asyncio.Event()
        sent = [0]

        async def flood() -> None:
            while not stop.is_set():
                for _ in range(20):
                    attacker.sendto(inits[sent[0] % len(inits)], ("127.0.0.1", port))
                    attacker.sendto(b"\x01" + rng.randbytes(600), ("127.0.0.1", port))
                    sent[0] += 1
                await asyncio.sleep(0.002)

        rsakeys.decrypt = counting  # type: ignore[assignment]
        try:
            task = asyncio.ensure_future(flood())
            await asyncio.sleep(0.3)
            t0 = asyncio.get_running_loop().time()
            client, cproto = await start_client(client_dir, server_dir, port)
            await asyncio.wait_for(cproto.wait_handshaked(), 10)
            cproto.send(b"through the flood")
            await asyncio.wait_for(cproto.expect(1), 5)
            elapsed = asyncio.get_running_loop().time() - t0 + 0.3
            stop.set()
            await task
        finally:
            rsakeys.decrypt = orig  # type: ignore[assignment]
        assert cproto.received == [b"recv:through the flood"]
        assert sent[0] > 1000, sent
        # the rogue address got its burst and its rate, no more (+1: the legit client)
        s = Settings()
        assert decrypts[0] <= s.udp_init_burst_per_addr + s.udp_init_rate_per_addr * elapsed + 1
        attacker.close()
        await client.close()
        await server.close()

    run(main(), timeout=30)


def test_handshake_timeout_without_server(pair: Any) -> None:
    server_dir, client_dir = pair
    client_dir.update_conf(udp_handshake_retry=0.1, udp_handshake_timeout=0.5)

    async def main() -> None:
        client, proto = await start_client(client_dir, server_dir, 9)
        with pytest.raises(HandshakeTimeout):
            await asyncio.wait_for(proto.wait_handshaked(), 5)
        assert not proto.handshaked
        await client.close()

    run(main(), timeout=10)


def test_unknown_initiator_looked_up_through_the_handler(tmp_path: Path) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")   # the server does not know the client
    asked: list[str] = []
    sources: list[Any] = []

    async def main() -> None:
        server, sproto = await start_server(server_dir)

        async def lookup(peer_id: str, source: Any) -> Any:
            asked.append(peer_id)
            sources.append(source)
            return rsa_key("client.test").public_key() if peer_id == "client.test" else None

        server.lookup_unknown_peer = lookup  # type: ignore[method-assign]
        client, cproto = await start_client(client_dir, server_dir, udp_port(server))
        await asyncio.wait_for(cproto.wait_handshaked(), 10)
        cproto.send(b"looked up")
        await asyncio.wait_for(cproto.expect(1), 5)
        assert asked == ["client.test"]
        # the INIT's source address goes along (the lookup budget is charged to it)
        assert sources == [("127.0.0.1", cproto.transport.get_extra_info("sockname")[1])]
        assert sproto.handshaked_peers[0][0] == "client.test"
        await client.close()
        await server.close()

    run(main(), timeout=20)
