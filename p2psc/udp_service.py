"""``UdpService``: a handler's UDP side, the server socket it runs and the clients it opens."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Set
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from ._host import ProtocolHost, UdpPeer
from .config import PeerAddress, PeerConfig
from .nat.agent import NatAgent
from .p2pexcept import ConnectError, StatusError
from .udp_p2p import UdpP2P

log = logging.getLogger("p2psc.udp")

__all__ = ["UdpService"]

_SOCK_BUF = 1 << 20        # socket buffers asked for (the kernel may cap them)

P = TypeVar("P", bound=UdpP2P)

#: How the service finds a peer: its address and public key (``PeerResolver.resolve``).
Resolve = Callable[[str], Awaitable[tuple[PeerAddress, rsa.RSAPublicKey]]]


def _udp_socket(family: int, bind_addr: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
            except OSError:
                pass
        sock.bind(bind_addr)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpService:
    """The UDP endpoints of one peer (``config``): at most one server, any number of clients.

    The protocols are built as ``ProtocolClass(host, myid[, peer_id])`` and report to
    ``host`` (the handler), which passes their ``udp_register``/``udp_unregister`` calls on to
    :meth:`register`/:meth:`unregister`. ``resolve`` finds a peer's address and key.
    """

    def __init__(self, host: ProtocolHost, config: PeerConfig, resolve: Resolve, *,
                 nat: NatAgent | None = None) -> None:
        self._host = host
        self._nat = nat
        self._config = config
        self._resolve = resolve
        self._protocols: set[UdpPeer] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._server_protocol: UdpP2P | None = None

    @property
    def transport(self) -> asyncio.DatagramTransport | None:
        """The server's transport, while it serves."""
        return self._transport

    @property
    def server_protocol(self) -> UdpP2P | None:
        """The server's protocol, while it serves."""
        return self._server_protocol

    @property
    def protocols(self) -> Set[UdpPeer]:
        """The open UDP endpoints, server and clients (a view)."""
        return self._protocols

    def register(self, proto: UdpPeer) -> None:
        """An endpoint opened its socket."""
        self._protocols.add(proto)

    def unregister(self, proto: UdpPeer) -> None:
        """An endpoint's socket closed."""
        self._protocols.discard(proto)
        if self._nat is not None and isinstance(proto, UdpP2P):
            self._nat.forget(proto)
        if self._server_protocol is proto:
            self._transport = self._server_protocol = None

    async def run_server(self, ProtocolClass: Callable[..., P], *, host: str | None = None,
                         port: int | None = None) -> tuple[asyncio.DatagramTransport, P]:
        """Serve UDP on the peer's host and port (or as given); see
        :meth:`~p2psc.p2phandler.P2PHandler.run_as_udp_server`."""
        if self._transport is not None:
            raise StatusError("already serving UDP; close() first")
        config = self._config
        loop = asyncio.get_running_loop()
        host = config.host if host is None else host
        port = config.port if port is None else port
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM,
                                       flags=socket.AI_PASSIVE)
        if not infos:
            raise OSError(f"cannot resolve {host!r}")
        family, _, _, _, sockaddr = infos[0]
        sock = _udp_socket(family, sockaddr)
        myid = config.peer_id

        def factory() -> P:
            proto = ProtocolClass(self._host, myid)
            proto.attach(sock)
            return proto

        transport, protocol = await loop.create_datagram_endpoint(factory, sock=sock)
        self._transport, self._server_protocol = transport, protocol
        log.info("%s serving UDP on %s", myid, transport.get_extra_info("sockname"))
        if self._nat is not None:
            self._nat.serve_udp(protocol)
        return transport, protocol

    async def connect(self, peer_id: str, ProtocolClass: Callable[..., P]
                      ) -> tuple[asyncio.DatagramTransport, P]:
        """Open a UDP socket to a peer and start the handshake; see
        :meth:`~p2psc.p2phandler.P2PHandler.connect_udp_peer`."""
        addr, key = await self._resolve(peer_id)
        if self._nat is not None:
            return await self._connect_nat(peer_id, ProtocolClass, addr, key)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(addr.host, addr.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ConnectError.from_os_error(exc, peer_id, addr.host, addr.port) from exc
        infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first, as peers.json has
        if not infos:
            raise OSError(f"cannot resolve {addr.host!r}")
        family, _, _, _, sockaddr = infos[0]
        sock = _udp_socket(family, ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        myid = self._config.peer_id

        def factory() -> P:
            proto = ProtocolClass(self._host, myid, peer_id)
            proto.attach(sock, (sockaddr, key))
            return proto

        transport, protocol = await loop.create_datagram_endpoint(factory, sock=sock)
        return transport, protocol

    async def _connect_nat(self, peer_id: str, ProtocolClass: Callable[..., P],
                           addr: PeerAddress, key: rsa.RSAPublicKey
                           ) -> tuple[asyncio.DatagramTransport, P]:
        """A client through NAT traversal: its socket first, then the path (direct, punched
        or relayed) found from that socket, then the handshake on that path."""
        assert self._nat is not None
        loop = asyncio.get_running_loop()
        direct: Any = None
        if addr.port != 0:
            try:
                infos = await loop.getaddrinfo(addr.host, addr.port, family=socket.AF_INET,
                                               type=socket.SOCK_DGRAM)
                direct = infos[0][4][:2] if infos else None
            except OSError as exc:
                log.info("%s: cannot resolve %s (%s); only the rendezvous can help", peer_id,
                         addr.host, exc)
        sock = _udp_socket(socket.AF_INET, ("0.0.0.0", 0))
        myid = self._config.peer_id

        def factory() -> P:
            proto = ProtocolClass(self._host, myid, peer_id)
            proto.attach(sock)
            return proto

        transport, protocol = await loop.create_datagram_endpoint(factory, sock=sock)
        try:
            path, where = await self._nat.find_udp_path(protocol, peer_id, direct)
            protocol.path = path
            protocol.start_handshake(where, key)
            self._nat.supervise(protocol)
        except BaseException:
            protocol.stop()
            raise
        log.info("%s: UDP to %s %s (%s)", myid, peer_id, path, where)
        return transport, protocol

    async def close(self) -> None:
        """Stop the server and every client."""
        for proto in list(self._protocols):
            try:
                proto.stop()
            except Exception:  # closing must go on for the others
                log.exception("error while stopping %r", proto)
        self._protocols.clear()
        self._transport = self._server_protocol = None
        await asyncio.sleep(0)  # let the transports close
