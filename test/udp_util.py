"""Helpers for the UDP tests: a collecting UdpP2P, an echo server, and a man-in-the-middle
UDP relay that drops, duplicates, reorders, captures and rebinds (seeded)."""

from __future__ import annotations

import asyncio
import random
import socket
from typing import Any, Callable

from p2psc.udp_p2p import UdpP2P


class Echo(UdpP2P):
    """Echoes every datagram back to where it came from, and remembers what it got."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.received: list[tuple[bytes, Any]] = []
        self.handshaked_peers: list[tuple[str, Any]] = []
        self.closed_peers: list[tuple[str, Any]] = []

    def on_peer_handshaked(self, peer_id: str, addr: Any) -> None:
        self.handshaked_peers.append((peer_id, addr))

    def on_peer_closed(self, peer_id: str, error: Exception | None) -> None:
        self.closed_peers.append((peer_id, error))

    def on_recv(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))
        self.send(b"recv:" + data, addr)


class Collector(UdpP2P):
    """A client that collects what arrives; ``expect(n)`` gives a future done at n."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.received: list[bytes] = []
        self.addrs: list[Any] = []
        self.handshaked_calls = 0
        self._want = 0
        self._fut: asyncio.Future[None] | None = None

    def on_handshaked(self) -> None:
        self.handshaked_calls += 1

    def expect(self, n: int) -> asyncio.Future[None]:
        self._want = n
        self._fut = asyncio.get_running_loop().create_future()
        self._check()
        return self._fut

    def _check(self) -> None:
        if self._fut is not None and not self._fut.done() and len(self.received) >= self._want:
            self._fut.set_result(None)

    def on_recv(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        self.addrs.append(addr)
        self._check()


def udp_port(handler: Any) -> int:
    return handler.udp_transport.get_extra_info("sockname")[1]  # type: ignore[no-any-return]


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Any], None]):
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class UdpRelay:
    """Client -> relay port -> server, and back. ``policy(direction, data) -> list[bytes]``
    decides what is forwarded (empty: dropped; two copies: duplicated); ``reorder`` holds
    datagrams back at random (seeded) so that later ones overtake them; everything is
    captured per direction ("c2s", "s2c"). :meth:`rebind` moves the upstream side to a new
    source port (a NAT rebinding, as the server sees it)."""

    def __init__(self, server_port: int, *, seed: int = 0, drop: float = 0.0,
                 dup: float = 0.0, reorder: float = 0.0,
                 policy: Callable[[str, bytes], list[bytes] | None] | None = None):
        self.server_addr = ("127.0.0.1", server_port)
        self.rng = random.Random(seed)
        self.drop, self.dup, self.reorder = drop, dup, reorder
        self.policy = policy
        self.captured: dict[str, list[bytes]] = {"c2s": [], "s2c": []}
        self.client_addr: Any = None
        self.front: _Side | None = None
        self.back: _Side | None = None
        self._held: dict[str, list[bytes]] = {"c2s": [], "s2c": []}
        self._old_backs: list[_Side] = []

    @property
    def port(self) -> int:
        assert self.front is not None and self.front.transport is not None
        return self.front.transport.get_extra_info("sockname")[1]  # type: ignore[no-any-return]

    async def start(self) -> "UdpRelay":
        loop = asyncio.get_running_loop()
        _, self.front = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=("127.0.0.1", 0))
        await self.rebind()
        return self

    async def rebind(self) -> int:
        """Forward from a new upstream socket; returns its port."""
        loop = asyncio.get_running_loop()
        if self.back is not None:
            self._old_backs.append(self.back)
        _, self.back = await loop.create_datagram_endpoint(
            lambda: _Side(self._from_server), local_addr=("127.0.0.1", 0))
        assert self.back.transport is not None
        return self.back.transport.get_extra_info("sockname")[1]  # type: ignore[no-any-return]

    def _from_client(self, data: bytes, addr: Any) -> None:
        self.client_addr = addr
        self._forward("c2s", data)

    def _from_server(self, data: bytes, addr: Any) -> None:
        self._forward("s2c", data)

    def _send(self, direction: str, data: bytes) -> None:
        if direction == "c2s":
            assert self.back is not None and self.back.transport is not None
            self.back.transport.sendto(data, self.server_addr)
        elif self.client_addr is not None:
            assert self.front is not None and self.front.transport is not None
            self.front.transport.sendto(data, self.client_addr)

    def _forward(self, direction: str, data: bytes) -> None:
        self.captured[direction].append(data)
        if self.policy is not None:
            out = self.policy(direction, data)
            copies = [data] if out is None else out
        else:
            copies = [data]
        rng = self.rng
        if rng.random() < self.drop:
            copies = []
        elif copies and rng.random() < self.dup:
            copies = copies + copies[:1]
        held = self._held[direction]
        for c in copies:
            if rng.random() < self.reorder:
                held.append(c)
                asyncio.get_running_loop().call_later(0.02, self._release, direction, c)
            else:
                self._send(direction, c)
        # held datagrams are overtaken by later ones, then released
        while held and rng.random() < 0.5:
            self._send(direction, held.pop(rng.randrange(len(held))))

    def _release(self, direction: str, data: bytes) -> None:
        held = self._held[direction]
        if data in held:
            held.remove(data)
            self._send(direction, data)

    def close(self) -> None:
        for side in [self.front, self.back, *self._old_backs]:
            if side is not None and side.transport is not None:
                side.transport.close()


async def raw_socket() -> tuple[asyncio.DatagramTransport, _Side]:
    """A plain UDP socket on 127.0.0.1 (an attacker), collecting what it receives."""
    got: list[bytes] = []
    side = _Side(lambda d, a: got.append(d))
    side.got = got  # type: ignore[attr-defined]
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: side, local_addr=("127.0.0.1", 0))
    return transport, side


def fd_limit_at_least(n: int) -> bool:
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < n and hard >= n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
            soft = n
        return soft >= n or soft == resource.RLIM_INFINITY
    except (ImportError, ValueError, OSError):
        return True


__all__ = ["Echo", "Collector", "UdpRelay", "udp_port", "raw_socket", "fd_limit_at_least",
           "socket"]


class Endpoint:
    """A sans-IO :class:`p2psc._proto.udp.UdpEndpoint` for the tests that drive it by hand:
    ``receive`` gives the payload of an authenticated datagram (or None), and the other events
    the inputs return are kept for :meth:`take_events`."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        from p2psc._proto.udp import UdpEndpoint
        self.ep = UdpEndpoint(*args, **kw)
        self.kept: list[Any] = []

    def receive(self, data: Any, addr: Any, now: float) -> bytes | None:
        from p2psc._proto.events import DatagramReceived
        payload = None
        for ev in self.ep.receive(data, addr, now):
            if isinstance(ev, DatagramReceived):
                payload = ev.data
            else:
                self.kept.append(ev)
        return payload

    def handle_timer(self, now: float) -> None:
        self.kept += self.ep.handle_timer(now)

    def provide_peer_key(self, token: bytes, key: Any, now: float) -> None:
        self.kept += self.ep.provide_peer_key(token, key, now)

    def take_events(self) -> list[Any]:
        kept, self.kept = self.kept, []
        return kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ep, name)
