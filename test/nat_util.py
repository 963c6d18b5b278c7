"""Helpers for the NAT tests: a relay with peers that know it, a control-link client that
exchanges wire frames, UDP probes from real sockets, and circuit connections (raw streams,
or a p2psc TcpP2P run over a spliced circuit)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from conftest import PeerDir, make_peer

from p2psc.nat import wire
from p2psc.nat.relay_server import RelayServer
from p2psc.nat.rendezvous import RelayLimits
from p2psc.p2p import TcpP2P
from p2psc.p2phandler import P2PHandler

RELAY_ID = "relay.test"
T = TypeVar("T")

Frame = (wire.Welcome | wire.Punch | wire.RelayedDgram | wire.Circuit | wire.Pong
         | wire.Incoming | wire.Error)


class FrameClient(TcpP2P):
    """A peer's control link to the relay, for tests: every message is a relay frame, decoded
    into a queue (None when the link ends)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue()

    def on_recv(self, data: bytes) -> None:
        self.frames.put_nowait(wire.decode_relay_frame(data))

    def on_closed(self, exc: Exception | None) -> None:
        self.frames.put_nowait(None)

    def send_frame(self, frame: Any) -> None:
        self.send(wire.encode(frame))

    async def next(self, timeout: float = 5.0) -> Frame | None:
        """The next frame (None: the link ended)."""
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def expect(self, kind: type[T], timeout: float = 5.0) -> T:
        frame = await self.next(timeout)
        assert isinstance(frame, kind), f"expected {kind.__name__}, got {frame!r}"
        return frame

    async def nothing(self, wait: float = 0.2) -> None:
        """Assert that no frame arrives for ``wait`` seconds (after a round trip: PING)."""
        self.send_frame(wire.Ping(0x5A5A))
        assert await self.next() == wire.Pong(0x5A5A)
        await asyncio.sleep(wait)
        assert self.frames.empty(), self.frames.get_nowait()


@dataclass
class Peer:
    """A peer with its handler, its control link and what the relay told it."""

    dir: PeerDir
    handler: P2PHandler
    link: FrameClient | None = None
    welcome: wire.Welcome | None = None
    udp: list[Any] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.dir.peer_id


@dataclass
class RelayEnv:
    """A started relay and peer folders that know it (and that it knows)."""

    root: Path
    relay_dir: PeerDir
    relay_handler: P2PHandler
    server: RelayServer
    peers: dict[str, Peer] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.server.tcp_port

    async def attach(self, peer: Peer, *, hello: wire.Hello | None = None) -> FrameClient:
        """Open ``peer``'s control link, wait for WELCOME, send ``hello`` if given."""
        _, link = await peer.handler.connect_peer(RELAY_ID, FrameClient)
        await asyncio.wait_for(link.wait_handshaked(), 10)
        peer.link = link
        peer.welcome = await link.expect(wire.Welcome)
        if hello is not None:
            link.send_frame(hello)
        return link

    async def close(self) -> None:
        for p in self.peers.values():
            for t in p.udp:
                t.close()
            await p.handler.close()
        await self.server.close()
        await self.relay_handler.close()


async def start_relay(root: Path, peer_ids: tuple[str, ...] = ("alice.test", "bob.test"),
                      limits: RelayLimits | None = None, *, strangers: tuple[str, ...] = (),
                      **settings: Any) -> RelayEnv:
    """A relay on 127.0.0.1 (ephemeral TCP and UDP ports) and peers that know it and each
    other; the relay knows ``peer_ids`` but not ``strangers`` (who know the relay)."""
    relay_dir = make_peer(root, RELAY_ID, **settings)
    dirs = [make_peer(root, pid) for pid in peer_ids + strangers]
    for d in dirs:
        if d.peer_id in peer_ids:
            relay_dir.know(d)
        for other in dirs:
            if other is not d:
                d.know(other)
    handler = P2PHandler(workdir=relay_dir.workdir)
    server = RelayServer(handler, limits)
    await server.start("127.0.0.1", 0, 0, 0)
    env = RelayEnv(root, relay_dir, handler, server)
    for d in dirs:
        d.know(relay_dir, port=server.tcp_port)
        env.peers[d.peer_id] = Peer(d, P2PHandler(workdir=d.workdir))
    return env


# -- UDP ----------------------------------------------------------------------------------------

class UdpSock(asyncio.DatagramProtocol):
    """A UDP socket whose datagrams land in a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


async def udp_socket(peer: Peer | None = None) -> UdpSock:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(UdpSock, local_addr=("127.0.0.1", 0))
    if peer is not None:
        peer.udp.append(transport)
    return proto


async def probe(sock: UdpSock, token: bytes, ep: bytes, port: int, txid: bytes = b"txid-001",
                timeout: float = 5.0) -> wire.ProbeReply:
    """Send a PROBE to 127.0.0.1:port and return the decoded reply (it must be 64 bytes)."""
    assert sock.transport is not None
    req = wire.encode_probe(token, ep, txid)
    sock.transport.sendto(req, ("127.0.0.1", port))
    data, addr = await asyncio.wait_for(sock.queue.get(), timeout)
    assert addr[1] == port and len(data) == len(req) == wire.PROBE_SIZE
    reply = wire.decode_probe_reply(data)
    assert reply is not None and reply.txid == txid
    return reply


# -- circuits -----------------------------------------------------------------------------------

async def circuit_stream(port: int, token: bytes, *, timeout: float = 5.0
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a circuit connection, send the preamble, wait for the relay's 0 byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(wire.circuit_preamble(token))
    assert await asyncio.wait_for(reader.readexactly(1), timeout) == b"\x00"
    return reader, writer


async def circuit_pair(env: RelayEnv, a: Peer, b: Peer, request: int = 1
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                  asyncio.StreamReader, asyncio.StreamWriter]:
    """``a`` OPENs a circuit to ``b``; both join it: (a's reader, writer, b's reader, writer)."""
    assert a.link is not None and b.link is not None
    a.link.send_frame(wire.Open(request, b.id))
    circ = await a.link.expect(wire.Circuit)
    inc = await b.link.expect(wire.Incoming)
    assert circ.request == request and inc.source_peer == a.id
    ja = asyncio.ensure_future(circuit_stream(env.port, circ.token))
    jb = asyncio.ensure_future(circuit_stream(env.port, inc.token))
    (ra, wa), (rb, wb) = await asyncio.wait_for(asyncio.gather(ja, jb), 10)
    return ra, wa, rb, wb


class _Joiner(asyncio.Protocol):
    """Sends a circuit preamble, then waits for the relay's 0 byte (and keeps what follows)."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.joined: asyncio.Future[tuple[asyncio.Transport, bytes]] = (
            asyncio.get_running_loop().create_future())
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's is no subclass)
        self.transport.write(wire.circuit_preamble(self.token))

    def data_received(self, data: bytes) -> None:
        if self.joined.done():
            return
        assert self.transport is not None
        if data[:1] != b"\x00":
            self.joined.set_exception(AssertionError(f"relay answered {data[:1]!r}"))
            return
        self.transport.pause_reading()  # until the p2psc protocol takes over
        self.joined.set_result((self.transport, data[1:]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("the relay closed the circuit"))


async def p2p_over_circuit(port: int, token: bytes, handler: P2PHandler,
                           peer_id: str | None, cls: type[TcpP2P] = TcpP2P,
                           timeout: float = 10.0) -> TcpP2P:
    """Join a circuit and run a p2psc TCP connection over it: the initiator if ``peer_id`` is
    given (the peer at the other end), else the responder (what the NAT agent does)."""
    loop = asyncio.get_running_loop()
    _, joiner = await loop.create_connection(lambda: _Joiner(token), "127.0.0.1", port)
    transport, rest = await asyncio.wait_for(joiner.joined, timeout)
    proto = cls(handler, handler.get_myid(), peer_id)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if rest:
        proto.data_received(rest)
    transport.resume_reading()
    return proto


# -- waiting ------------------------------------------------------------------------------------

async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``cond`` every 10 ms until it holds, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def with_timeout(aw: Awaitable[T], timeout: float = 10.0) -> T:
    return await asyncio.wait_for(aw, timeout)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


# -- peers that use the relay (NatAgent tests) ----------------------------------------------------

def run(coro: Any, timeout: float = 60) -> Any:
    """``asyncio.run(coro)``, bounded by ``timeout`` seconds."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def with_relay(env: RelayEnv, peer: PeerDir, **settings: Any) -> P2PHandler:
    """A handler of ``peer`` whose config names ``env``'s relay (short NAT timeouts unless
    ``settings`` say otherwise)."""
    peer.update_conf(relay={"peer_id": RELAY_ID, "host": "127.0.0.1", "port": env.port},
                     **{"nat_punch_timeout": 2.0, "nat_relay_timeout": 3.0, **settings})
    return P2PHandler(workdir=peer.workdir)


async def with_env(tmp_path: Path, body: Callable[[RelayEnv, list[P2PHandler]], Awaitable[None]],
                   peers: tuple[str, ...] = ("alice.test", "bob.test")) -> None:
    """Run ``body(env, handlers)`` with a started relay; closes the handlers it appended to
    ``handlers``, then the relay, whatever happens."""
    env = await start_relay(tmp_path, peers)
    handlers: list[P2PHandler] = []
    try:
        await body(env, handlers)
    finally:
        for h in handlers:
            await h.close()
        await env.close()
