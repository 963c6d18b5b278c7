"""NatAgent with a real RelayServer on 127.0.0.1: the README's calls reach a peer directly,
by punching, or through the relay, and the application is told the authenticated peer id and
the path. (Real NATs: test_nat_lab_p2p.py; the emulator: test_nat_emulator.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import server_port
from nat_util import RELAY_ID, RelayEnv, run, with_env, with_relay

from p2psc import PeerUnreachable
from p2psc.nat.wire import RelayAddress
from p2psc.p2p import TcpP2P
from p2psc.p2phandler import P2PHandler
from p2psc.udp_p2p import UdpP2P

A, B = "alice.test", "bob.test"
ROOT = Path(__file__).resolve().parent.parent


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


def blob(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


class TcpEcho(TcpP2P):
    seen: list[tuple[str | None, str]] = []

    def on_handshaked(self) -> None:
        TcpEcho.seen.append((self.peer_id, self.path))

    def on_recv(self, data: bytes) -> None:
        self.send(data)


class UdpEcho(UdpP2P):
    seen: list[tuple[str, Any]] = []

    def on_datagram(self, data: bytes, peer_id: str, addr: Any) -> None:
        UdpEcho.seen.append((peer_id, addr))
        self.reply(data)


class Collect(TcpP2P):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def on_recv(self, data: bytes) -> None:
        self.got.put_nowait(data)


class UCollect(UdpP2P):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.got: asyncio.Queue[tuple[bytes, str | None, Any]] = asyncio.Queue()

    def on_recv(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait((data, self.current_peer, addr))


async def attached(h: P2PHandler) -> None:
    assert h.nat is not None
    await h.nat.ensure_link()
    for _ in range(100):  # the keeper's first probes (UDP server) take a moment
        await asyncio.sleep(0.02)
        if h.nat.welcome is not None:
            break
    await asyncio.sleep(0.2)


# -- TCP ----------------------------------------------------------------------------------------

def test_tcp_to_an_unreachable_address_goes_through_a_relayed_circuit(tmp_path: Path) -> None:
    TcpEcho.seen = []

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        a_dir, b_dir = env.peers[A].dir, env.peers[B].dir
        b = with_relay(env, b_dir)
        handlers.append(b)
        await b.run_as_server(TcpEcho, host="127.0.0.1", port=0)
        await attached(b)
        a_dir.know(b_dir, port=closed_port())  # bob's address refuses: behind NAT
        a = with_relay(env, a_dir)
        handlers.append(a)
        _, proto = await a.connect_peer(B, Collect)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert proto.path == "relayed" and proto.peer_id == B
        data = blob(3 * 1024 * 1024)
        proto.send(data)
        got = bytearray()
        while len(got) < len(data):
            got += await asyncio.wait_for(proto.got.get(), 10)
        assert bytes(got) == data
        assert TcpEcho.seen == [(A, "relayed")]
        assert len(env.server.circuits()) == 1  # the relay spliced one circuit
        proto.close()

    run(with_env(tmp_path, body))


def test_tcp_reachable_directly_stays_direct(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        a_dir, b_dir = env.peers[A].dir, env.peers[B].dir
        b = with_relay(env, b_dir)
        handlers.append(b)
        await b.run_as_server(TcpEcho, host="127.0.0.1", port=0)
        a_dir.know(b_dir, port=server_port(b))
        a = with_relay(env, a_dir)
        handlers.append(a)
        ch = await a.open_channel(B, timeout=10)
        assert ch.path == "direct"
        await ch.send(b"hello")
        assert await asyncio.wait_for(ch.recv(), 5) == b"hello"
        await ch.close()
        assert env.server.circuits() == []

    run(with_env(tmp_path, body))


def test_no_direct_and_no_relay_path_is_peer_unreachable(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        a_dir, b_dir = env.peers[A].dir, env.peers[B].dir
        a_dir.know(b_dir, port=closed_port())
        a = with_relay(env, a_dir)
        handlers.append(a)
        # bob never attached to the relay: the relay refuses the circuit
        with pytest.raises(PeerUnreachable, match="directly: .*through the relay: .*not "
                                                  "connected"):
            await a.connect_peer(B, Collect)
        assert env.server.circuits() == []

    run(with_env(tmp_path, body))


def test_an_unreachable_relay_is_named_in_the_error(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        a_dir, b_dir = env.peers[A].dir, env.peers[B].dir
        a_dir.know(b_dir, port=closed_port())
        a_dir.update_conf(relay={"peer_id": RELAY_ID, "host": "127.0.0.1",
                                 "port": closed_port()}, nat_relay_timeout=2.0)
        a = P2PHandler(workdir=a_dir.workdir)
        handlers.append(a)
        with pytest.raises(PeerUnreachable, match="cannot reach the relay"):
            await a.connect_peer(B, Collect)

    run(with_env(tmp_path, body))


# -- UDP ----------------------------------------------------------------------------------------

async def udp_server(env: RelayEnv, handlers: list[P2PHandler], **settings: Any) -> P2PHandler:
    b = with_relay(env, env.peers[B].dir, **settings)
    handlers.append(b)
    await b.run_as_udp_server(UdpEcho, host="127.0.0.1", port=0)
    await attached(b)
    return b


async def echo_round(proto: UCollect, n: int, size: int = 1000) -> None:
    for i in range(n):
        payload = blob(size, i)
        proto.send(payload)
        data, peer, _addr = await asyncio.wait_for(proto.got.get(), 5)
        assert data == payload and peer == B


def test_udp_without_a_known_address_is_punched(tmp_path: Path) -> None:
    UdpEcho.seen = []

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server(env, handlers)
        env.peers[A].dir.know(env.peers[B].dir, port=0)  # no address: only the rendezvous
        a = with_relay(env, env.peers[A].dir)
        handlers.append(a)
        _, proto = await a.connect_udp_peer(B, UCollect)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert proto.path == "punched"
        await echo_round(proto, 5)
        assert {peer for peer, _ in UdpEcho.seen} == {A}
        assert all(not isinstance(addr, RelayAddress) for _, addr in UdpEcho.seen)
        assert b.udp_server_protocol is not None

    run(with_env(tmp_path, body))


def test_udp_direct_address_among_the_candidates_is_reported_direct(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server(env, handlers)
        assert b.udp_transport is not None
        port = b.udp_transport.get_extra_info("sockname")[1]
        env.peers[A].dir.know(env.peers[B].dir, port=port)
        a = with_relay(env, env.peers[A].dir)
        handlers.append(a)
        ch = await a.open_datagram_channel(B, timeout=10)
        assert ch.path == "direct"
        await ch.send(b"ping")
        assert await asyncio.wait_for(ch.recv(), 5) == b"ping"
        await ch.close()

    run(with_env(tmp_path, body))


def test_udp_relayed_when_punching_is_off(tmp_path: Path) -> None:
    """Datagrams over the control links: each arrives once, byte-exact, attributed to the
    peer the end-to-end handshake authenticated; the server sees a RelayAddress."""
    UdpEcho.seen = []

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        await udp_server(env, handlers)
        env.peers[A].dir.know(env.peers[B].dir, port=0)
        a = with_relay(env, env.peers[A].dir, nat_punch=False)
        handlers.append(a)
        _, proto = await a.connect_udp_peer(B, UCollect)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert proto.path == "relayed"
        await echo_round(proto, 50)
        assert proto.got.empty()
        assert len(UdpEcho.seen) == 50
        assert {peer for peer, _ in UdpEcho.seen} == {A}
        assert all(isinstance(addr, RelayAddress) and addr.peer_id == A
                   for _, addr in UdpEcho.seen)

    run(with_env(tmp_path, body))


def test_a_udp_server_closing_with_relayed_sessions_sends_them_close(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The handler closes its UDP endpoints before its control link: a relayed peer gets the
    authenticated CLOSE through the relay, and nothing is handed to the socket as if a
    RelayAddress were an address (which failed and lost the CLOSEs that came after it)."""
    closed: list[tuple[str, Exception | None]] = []

    class Watch(UCollect):
        def on_peer_closed(self, peer_id: str, error: Exception | None) -> None:
            closed.append((peer_id, error))

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server(env, handlers)
        env.peers[A].dir.know(env.peers[B].dir, port=0)
        a = with_relay(env, env.peers[A].dir, nat_punch=False)
        handlers.append(a)
        _, proto = await a.connect_udp_peer(B, Watch)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert proto.path == "relayed"
        await echo_round(proto, 3)
        handlers.remove(b)
        await b.close()
        for _ in range(250):
            if closed:
                break
            await asyncio.sleep(0.02)
        assert closed == [(B, None)]

    with caplog.at_level("ERROR"):
        run(with_env(tmp_path, body))
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_udp_peer_not_on_the_relay_is_tried_directly(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = P2PHandler(workdir=env.peers[B].dir.workdir)  # no relay in its config
        handlers.append(b)
        await b.run_as_udp_server(UdpEcho, host="127.0.0.1", port=0)
        assert b.udp_transport is not None
        port = b.udp_transport.get_extra_info("sockname")[1]
        env.peers[A].dir.know(env.peers[B].dir, port=port)
        a = with_relay(env, env.peers[A].dir)
        handlers.append(a)
        _, proto = await a.connect_udp_peer(B, UCollect)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert proto.path == "direct"
        await echo_round(proto, 2)

    run(with_env(tmp_path, body))


def test_udp_with_no_address_and_no_rendezvous_is_peer_unreachable(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        env.peers[A].dir.know(env.peers[B].dir, port=0)
        a = with_relay(env, env.peers[A].dir)
        handlers.append(a)
        with pytest.raises(PeerUnreachable, match="not connected"):
            await a.connect_udp_peer(B, UCollect)

    run(with_env(tmp_path, body))


def test_a_serving_peer_reattaches_after_the_relay_restarts(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server(env, handlers)
        assert b.nat is not None
        port = env.server.tcp_port
        await env.server.close()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if b.nat.welcome is None:
                break
        assert b.nat.welcome is None
        await env.server.start("127.0.0.1", port, 0, 0)
        for _ in range(300):  # backoff starts at 1 s
            await asyncio.sleep(0.02)
            if b.nat.welcome is not None:
                break
        assert b.nat.welcome is not None
        assert [link.peer_id for link in env.server.links] == [B]

    run(with_env(tmp_path, body))


# -- the command line ---------------------------------------------------------------------------

def test_netcheck_on_loopback_says_no_nat(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        a_dir = env.peers[A].dir
        a_dir.update_conf(relay={"peer_id": RELAY_ID, "host": "127.0.0.1", "port": env.port})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2psc", "netcheck", "--workdir", str(a_dir.workdir),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        text = out.decode()
        assert proc.returncode == 0, err.decode()
        assert f"relay:        {RELAY_ID} at 127.0.0.1:{env.port}" in text
        assert "UDP:          gets out" in text
        assert "NAT:          no NAT" in text
        assert text.count("UDP mapping:  127.0.0.1:") == 2

    run(with_env(tmp_path, body))


def test_netcheck_without_a_relay_says_how_to_configure_one(tmp_path: Path) -> None:
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2psc", "netcheck", "--workdir",
            str(env.peers[A].dir.workdir), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        assert b"no relay is configured" in err and b"docs/NAT.md" in err

    run(with_env(tmp_path, body))
