"""``P2PHandler``: a peer's identity, its known peers, and its servers and connections."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from . import channel
from ._aio import wall_offset
from ._host import TcpPeer, UdpPeer
from ._proto.buffers import BufferPool, ReceiveBudget
from ._proto.replay import InitReplayCache
from ._proto.tcp import SCRATCH_SIZE, Connection, Role, State
from .channel import Channel, DatagramChannel, OnChannel, _Connecting
from .config import (
    PeerConfig,
    Settings,
    config_from_appublic,
    load_peer_config,
    read_config_file,
)
from .nat.agent import NatAgent
from .p2p import TcpP2P
from .p2pexcept import (
    ConfigError,
    ConnectError,
    P2PError,
    PeerUnreachable,
    RelayError,
    StatusError,
    UnknownPeerError,
)
from .registry import ConnectionRegistry
from .resolver import PeerResolver
from .udp_p2p import UdpP2P
from .udp_service import UdpService

log = logging.getLogger("p2psc.p2phandler")

__all__ = ["P2PHandler"]

P = TypeVar("P", bound=TcpP2P)
UP = TypeVar("UP", bound=UdpP2P)


class P2PHandler:
    """One peer: its RSA key, its known peers, and the connections it makes or accepts.

    - ``P2PHandler(loop=None)``: ``./conf/config.json``, the file the original README gives
      appPublic's ``getConfig()``, read by p2psc itself (``$[workdir]$`` is the current folder;
      no config text is evaluated);
    - ``P2PHandler(workdir=DIR)``: reads ``DIR/conf/config.json`` itself (several peers can
      live in one process);
    - ``P2PHandler(config=mapping)``: the same keys as conf/config.json.

    Config mistakes raise :class:`~p2psc.p2pexcept.ConfigError` here, at start-up.

    ``async with P2PHandler(workdir=DIR) as handler:`` calls :meth:`close` on exit (its
    servers stop, its connections close), also when the block raises.

    It is made of ``resolver`` (:class:`~p2psc.resolver.PeerResolver`: known peers and the
    directory), ``connections`` (:class:`~p2psc.registry.ConnectionRegistry`: its TCP
    connections) and ``udp_service`` (:class:`~p2psc.udp_service.UdpService`: its UDP server and
    clients); the channel methods call :mod:`p2psc.channel`. To the protocols it builds, it is a
    :class:`~p2psc._host.ProtocolHost`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *,
                 workdir: str | os.PathLike[str] | None = None,
                 config: Mapping[str, Any] | None = None):
        if workdir is not None and config is not None:
            raise ConfigError("give workdir or config, not both")
        if config is not None:
            conf = dict(config)
        elif workdir is not None:
            conf = read_config_file(workdir)
        else:
            conf = config_from_appublic()
        self.loop = loop
        self.config: PeerConfig = load_peer_config(conf)
        self.settings: Settings = self.config.settings
        self.server: asyncio.Server | None = None
        self.replay_cache = InitReplayCache(self.settings.replay_cache_size,
                                            self.settings.timestamp_window)
        self.resolver = PeerResolver(self.config)
        self.connections = ConnectionRegistry(self.settings)
        #: NAT traversal through the relay named by the "relay" key (docs/NAT.md), or None
        self.nat: NatAgent | None = (NatAgent(self, self.config.relay)
                                     if self.config.relay is not None else None)
        self.udp_service = UdpService(self, self.config, self.resolver.resolve, nat=self.nat)
        self._scratch: bytearray | None = None
        self._buffer_pool = BufferPool()
        self._receive_budget = ReceiveBudget(self.settings.max_partial_record_bytes,
                                             self.settings.max_partial_record_bytes_per_peer)
        # resolved by close(): each running reconnecting() loop waits on one
        self._closing: set[asyncio.Future[None]] = set()

    async def __aenter__(self) -> P2PHandler:  # noqa: PYI034
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- identity -------------------------------------------------------------------------------

    def get_myid(self) -> str:
        """This peer's id."""
        return self.config.peer_id

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return self.config.private_key

    def get_peer_conn(self, peer_id: str) -> TcpP2P | None:
        """The live, handshaked protocol for ``peer_id`` (the latest one), or None."""
        proto = self.connections.peer_conn(peer_id)
        return proto if isinstance(proto, TcpP2P) else None

    # -- TCP ------------------------------------------------------------------------------------

    async def run_as_server(self, ProtocolClass: Callable[..., TcpP2P] = TcpP2P, *,
                            host: str | None = None, port: int | None = None
                            ) -> asyncio.Server:
        """Listen on this peer's host and port (from ``xconfig``, or as given); the server is
        kept as ``self.server`` (with port 0, read the bound port from ``self.server.sockets``)."""
        if self.server is not None:
            raise StatusError("already serving; close() first")
        loop = asyncio.get_running_loop()
        myid = self.get_myid()
        self.server = await loop.create_server(
            lambda: ProtocolClass(self, myid),
            self.config.host if host is None else host,
            self.config.port if port is None else port)
        log.info("%s listening on %s", myid,
                 ", ".join(str(s.getsockname()) for s in self.server.sockets))
        if self.nat is not None:
            self.nat.serve_tcp(lambda: ProtocolClass(self, myid))
        return self.server

    async def connect_peer(self, peer_id: str, ProtocolClass: Callable[..., P] = TcpP2P  # type: ignore[assignment]
                           ) -> tuple[asyncio.Transport, P]:
        """Connect to a known peer and start the handshake; returns ``(transport, protocol)``
        as ``loop.create_connection`` does (``await protocol.wait_handshaked()`` to wait for it).

        With a relay configured (docs/NAT.md), a peer that cannot be reached directly within
        ``nat_direct_timeout`` is reached through the relay (``protocol.path`` is then
        "relayed"); if neither works, :class:`~p2psc.p2pexcept.PeerUnreachable`."""
        addr, _key = await self.resolver.resolve(peer_id)
        if self.nat is not None:
            return await self._connect_or_relay(peer_id, ProtocolClass, addr.host, addr.port)
        try:
            transport, protocol = await self._open_tcp(ProtocolClass, peer_id, addr.host, addr.port)
        except OSError as exc:
            if self.config.find_peer_info_url is None:
                raise
            # its address may have changed: look it up again, once
            log.info("connecting to %s at %s:%d failed (%s); asking the directory", peer_id,
                     addr.host, addr.port, exc)
            new_addr, _key = await self.resolver.resolve(peer_id, refresh=True)
            if (new_addr.host, new_addr.port) == (addr.host, addr.port):
                raise
            transport, protocol = await self._open_tcp(ProtocolClass, peer_id, new_addr.host,
                                                       new_addr.port)
        return transport, protocol

    async def _connect_or_relay(self, peer_id: str, ProtocolClass: Callable[..., P], host: str,
                                port: int) -> tuple[asyncio.Transport, P]:
        assert self.nat is not None
        if port == 0:
            direct_error = "it has no listening address"
        else:
            try:
                return await asyncio.wait_for(self._open_tcp(ProtocolClass, peer_id, host, port),
                                              self.settings.nat_direct_timeout)
            except asyncio.TimeoutError:
                direct_error = f"no answer within {self.settings.nat_direct_timeout:g} s"
            except OSError as exc:
                direct_error = exc.strerror or str(exc)
            log.info("%s at %s:%d: %s; trying the relay", peer_id, host, port, direct_error)
        myid = self.get_myid()
        try:
            transport, protocol = await self.nat.open_circuit(
                peer_id, lambda: ProtocolClass(self, myid, peer_id))
        except (RelayError, OSError, asyncio.TimeoutError) as exc:
            raise PeerUnreachable(f"cannot reach {peer_id}: directly: {direct_error}; through "
                                  f"the relay: {exc or type(exc).__name__}") from None
        return transport, protocol  # type: ignore[return-value]

    async def connect_address(self, peer_id: str, host: str, port: int,
                              ProtocolClass: Callable[..., P]) -> tuple[asyncio.Transport, P]:
        """Connect to ``peer_id`` at ``host``:``port`` (not looked up) and start the
        handshake; as :meth:`connect_peer` otherwise."""
        return await self._open_tcp(ProtocolClass, peer_id, host, port)

    async def _open_tcp(self, ProtocolClass: Callable[..., P], peer_id: str, host: str,
                        port: int) -> tuple[asyncio.Transport, P]:
        """Connect, signing INIT while the TCP handshake is under way (it costs one RSA
        private operation, about as long as a connect on a LAN)."""
        loop = asyncio.get_running_loop()
        myid = self.get_myid()
        conn = self.new_connection(Role.INITIATOR, peer_id)

        def factory() -> P:
            protocol = ProtocolClass(self, myid, peer_id)
            protocol.use_connection(conn)
            return protocol

        task = loop.create_task(loop.create_connection(factory, host, port))
        try:
            await asyncio.sleep(0)  # the connect has started (or failed)
            if not task.done() and conn.state is State.IDLE:
                conn.initiate(loop.time())
            transport, protocol = await task
        except BaseException as exc:
            # no connection is left without an owner
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result()[0].abort()
            if isinstance(exc, OSError) and not isinstance(exc, P2PError):
                # a P2PError that is still an OSError, saying where and why
                raise ConnectError.from_os_error(exc, peer_id, host, port) from exc
            raise
        return transport, protocol  # type: ignore[return-value]

    async def close(self) -> None:
        """Stop serving and close every connection this handler made or accepted (and end
        its :meth:`reconnecting` loops)."""
        for fut in list(self._closing):
            if not fut.done():
                fut.set_result(None)
        if self.server is not None:
            self.server.close()
            server, self.server = self.server, None
        else:
            server = None
        # (UDP, then NAT traversal, then TCP: a relayed session's CLOSE goes out over the
        # control link, which is one of the TCP connections)
        await self.udp_service.close()
        if self.nat is not None:
            await self.nat.close()
        self.connections.close_all()
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("server did not close within 5 s")
        await self.resolver.close()

    # -- UDP ------------------------------------------------------------------------------------

    @property
    def udp_transport(self) -> asyncio.DatagramTransport | None:
        """The UDP server's transport while it serves (``run_as_udp_server``), else None."""
        return self.udp_service.transport

    @property
    def udp_server_protocol(self) -> UdpP2P | None:
        """The UDP server's protocol while it serves (``run_as_udp_server``), else None."""
        return self.udp_service.server_protocol

    async def run_as_udp_server(self, ProtocolClass: Callable[..., UP] = UdpP2P,  # type: ignore[assignment]
                                *, host: str | None = None, port: int | None = None
                                ) -> tuple[asyncio.DatagramTransport, UP]:
        """Serve UDP on this peer's host and port (from ``xconfig``, or as given; port 0
        picks a free one: read it from ``self.udp_transport.get_extra_info('sockname')``).
        Returns ``(transport, protocol)``, also kept as ``udp_transport`` and
        ``udp_server_protocol``."""
        return await self.udp_service.run_server(ProtocolClass, host=host, port=port)

    async def connect_udp_peer(self, peer_id: str,
                               ProtocolClass: Callable[..., UP] = UdpP2P  # type: ignore[assignment]
                               ) -> tuple[asyncio.DatagramTransport, UP]:
        """Open a UDP socket to a known peer and start the handshake (INIT retransmitted
        until ``udp_handshake_timeout``); returns ``(transport, protocol)``:
        ``await protocol.wait_handshaked()`` to wait for it."""
        return await self.udp_service.connect(peer_id, ProtocolClass)

    # -- async/await channels (p2psc.channel) ---------------------------------------------------

    def open_channel(self, peer_id: str, *, timeout: float | None = None,
                     queue_size: int | None = None) -> _Connecting[Channel]:
        """Connect to ``peer_id`` over TCP: ``ch = await handler.open_channel(peer_id)``
        returns a :class:`Channel` once the handshake is done, and
        ``async with handler.open_channel(peer_id) as ch:`` also closes it gracefully on exit
        (also when the block raises). ``timeout`` bounds connecting and the handshake together
        (:class:`~p2psc.HandshakeTimeout`); ``queue_size`` overrides ``channel_queue_size``."""
        return _Connecting(functools.partial(channel.open_channel, self, peer_id,
                                             timeout=timeout, queue_size=queue_size))

    async def serve(self, on_channel: OnChannel, *, host: str | None = None,
                    port: int | None = None, queue_size: int | None = None
                    ) -> asyncio.Server:
        """Listen over TCP on this peer's address (or ``host``/``port``) and run
        ``await on_channel(ch)`` as a task for each handshaked connection. An exception in
        ``on_channel`` is logged and closes that channel only; the channel is closed
        gracefully when ``on_channel`` returns. Returns the server (also ``handler.server``;
        ``handler.close()`` stops it and closes every channel)."""
        return await channel.serve(self, on_channel, host=host, port=port, queue_size=queue_size)

    def open_datagram_channel(self, peer_id: str, *, timeout: float | None = None,
                              queue_size: int | None = None) -> _Connecting[DatagramChannel]:
        """Open a UDP session to ``peer_id``: ``await`` it for a :class:`DatagramChannel`
        once the handshake is done (``timeout`` bounds it, else ``udp_handshake_timeout``
        does), or ``async with`` it to have the channel closed on exit."""
        return _Connecting(functools.partial(channel.open_datagram_channel, self, peer_id,
                                             timeout=timeout, queue_size=queue_size))

    def reconnecting(self, peer_id: str, *, timeout: float | None = None,
                     queue_size: int | None = None, initial_backoff: float = 0.5,
                     max_backoff: float = 30.0, factor: float = 2.0, jitter: bool = True,
                     reset_after: float = 10.0,
                     sleep: Callable[[float], Awaitable[Any]] | None = None
                     ) -> AsyncGenerator[Channel, None]:
        """A long-lived link to ``peer_id``, as websockets' ``async for ws in connect(...)``::

            async for ch in handler.reconnecting(peer_id):
                try:
                    async for msg in ch: ...
                except p2psc.ConnectionLost:
                    continue            # the next iteration reconnects

        Yields an open :class:`Channel` (TCP); when the loop body is done with it (the next
        iteration), it is closed and, after a pause, a new one is opened. Failed attempts
        (``OSError``, timeouts, :class:`~p2psc.P2PError`) are logged at INFO with the reason
        and retried after ``initial_backoff`` seconds, times ``factor`` after each further
        failure, at most ``max_backoff`` (times a random 0.5-1 with ``jitter``). A channel
        that lasted less than ``reset_after`` seconds counts as a failure; a longer one resets
        the backoff, so the pause after it is ``initial_backoff``: the loop never spins.
        Mistakes another attempt cannot fix (an unknown peer, bad usage) are raised.
        ``timeout`` and ``queue_size`` are :meth:`open_channel`'s; ``sleep`` (by default
        ``asyncio.sleep``) waits out each pause.

        The loop ends when :meth:`close` is called (even mid-pause or mid-attempt); leaving it
        (``break``, an exception) closes the current channel when the generator is closed:
        at once with ``contextlib.aclosing``, else when it is collected (soon, in CPython).
        """
        return channel.reconnecting(
            functools.partial(channel.open_channel, self, peer_id, timeout=timeout,
                              queue_size=queue_size),
            peer_id, closing=self._closing, initial_backoff=initial_backoff,
            max_backoff=max_backoff, factor=factor, jitter=jitter, reset_after=reset_after,
            sleep=sleep)

    # -- used by the protocols (p2psc._host.ProtocolHost) ----------------------------------------

    async def lookup_unknown_peer(self, peer_id: str, source: Any) -> rsa.RSAPublicKey | None:
        """The public key of a peer that sent an INIT from address ``source`` but is not
        known: looked up in the directory when one is configured and ``source`` has not spent
        its lookup budget (``lookup_rate_per_addr``, ``lookup_burst_per_addr``; lookups
        merged, failures cached briefly), else None (used by the protocols)."""
        return await self.resolver.lookup_unknown(peer_id, source)

    def peer_public_key(self, peer_id: str) -> rsa.RSAPublicKey | None:
        """The public key on file for ``peer_id``, or None (used by the protocols)."""
        return self.config.peers.public_key(peer_id)

    def new_connection(self, role: Role, peer_id: str | None) -> Connection:
        """A sans-IO TCP connection for this peer (used by the protocols)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        now = loop.time()
        if role is Role.INITIATOR:
            assert peer_id is not None
            key = cfg.peers.public_key(peer_id)
            if key is None:
                raise UnknownPeerError(f"no public key for {peer_id!r}")
            return Connection(role, cfg.peer_id, cfg.private_key, self.settings,
                              peer_id=peer_id, peer_public_key=key, now=now,
                              wall_offset=wall_offset(loop), scratch=self._scratch_buffer(),
                              pool=self._buffer_pool, budget=self._receive_budget)
        return Connection(role, cfg.peer_id, cfg.private_key, self.settings,
                          key_lookup=cfg.peers.public_key, replay_cache=self.replay_cache,
                          now=now, wall_offset=wall_offset(loop),
                          scratch=self._scratch_buffer(), pool=self._buffer_pool,
                          budget=self._receive_budget)

    def _scratch_buffer(self) -> bytearray:
        """The receive buffer shared by this handler's TCP connections (they run on one event
        loop, and each handles its records before the next read)."""
        if self._scratch is None:
            self._scratch = bytearray(SCRATCH_SIZE)
        return self._scratch

    def tcp_register(self, proto: TcpPeer) -> None:
        """A TCP connection was made (used by the protocols)."""
        self.connections.add(proto)

    def tcp_handshaked(self, proto: TcpPeer) -> None:
        """A TCP connection completed its handshake (used by the protocols)."""
        self.connections.handshaked(proto)

    def tcp_unregister(self, proto: TcpPeer) -> None:
        """A TCP connection ended (used by the protocols)."""
        self.connections.remove(proto)

    def udp_register(self, proto: UdpPeer) -> None:
        """A UDP endpoint opened its socket (used by the protocols)."""
        self.udp_service.register(proto)

    def udp_unregister(self, proto: UdpPeer) -> None:
        """A UDP endpoint's socket closed (used by the protocols)."""
        self.udp_service.unregister(proto)
