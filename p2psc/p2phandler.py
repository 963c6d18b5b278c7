"""``P2PHandler``: a peer's identity, its known peers, and its servers and connections."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import rsa

from ._aio import wall_offset
from ._proto.buffers import BufferPool
from ._proto.replay import InitReplayCache
from ._proto.tcp import SCRATCH_SIZE, Connection, Role, State
from .channel import ChannelHandlerMixin
from .config import (
    PeerAddress,
    PeerConfig,
    Settings,
    config_from_appublic,
    load_peer_config,
    read_config_file,
)
from .keys import validate_peer_id
from .p2p import TcpP2P
from .p2pexcept import ConfigError, HandshakeError, P2PError, StatusError, UnknownPeerError
from .udp_p2p import UdpHandlerMixin

log = logging.getLogger("p2psc.p2phandler")

__all__ = ["P2PHandler"]

P = TypeVar("P", bound=TcpP2P)


class P2PHandler(ChannelHandlerMixin, UdpHandlerMixin):
    """One peer: its RSA key, its known peers, and the connections it makes or accepts.

    - ``P2PHandler(loop=None)``: the config of appPublic's ``getConfig()`` (as the original
      README sets up, from ``./conf/config.json``);
    - ``P2PHandler(workdir=DIR)``: reads ``DIR/conf/config.json`` itself (several peers can
      live in one process);
    - ``P2PHandler(config=mapping)``: the same keys as conf/config.json.

    Config mistakes raise :class:`~p2psc.p2pexcept.ConfigError` here, at start-up.
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
        self.server: asyncio.AbstractServer | None = None
        self.replay_cache = InitReplayCache(self.settings.replay_cache_size,
                                            self.settings.timestamp_window)
        self._protocols: set[Any] = set()
        # accepted connections not yet authenticated, oldest first (max_pending_handshakes)
        self._pending: dict[Any, None] = {}
        self._peer_conns: dict[str, Any] = {}
        self._directory: Any = None
        self._scratch: bytearray | None = None
        self._buffer_pool = BufferPool()

    # -- identity -------------------------------------------------------------------------------

    def get_myid(self) -> str:
        """This peer's id."""
        return self.config.peer_id

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        return self.config.private_key

    def get_peer_conn(self, peer_id: str) -> Any:
        """The live, handshaked protocol for ``peer_id`` (the latest one), or None."""
        proto = self._peer_conns.get(peer_id)
        if proto is not None and proto.handshaked:
            return proto
        return None

    # -- TCP ------------------------------------------------------------------------------------

    async def run_as_server(self, ProtocolClass: type[TcpP2P] = TcpP2P, *,
                            host: str | None = None, port: int | None = None
                            ) -> asyncio.AbstractServer:
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
        return self.server

    async def connect_peer(self, peer_id: str, ProtocolClass: Callable[..., P] = TcpP2P  # type: ignore[assignment]
                           ) -> tuple[asyncio.Transport, P]:
        """Connect to a known peer and start the handshake; returns ``(transport, protocol)``
        as ``loop.create_connection`` does (``await protocol.wait_handshaked()`` to wait for it)."""
        addr, _key = await self._resolve_peer(peer_id)
        try:
            transport, protocol = await self._open_tcp(ProtocolClass, peer_id, addr.host, addr.port)
        except OSError as exc:
            if self.config.find_peer_info_url is None:
                raise
            # its address may have changed: look it up again, once
            log.info("connecting to %s at %s:%d failed (%s); asking the directory", peer_id,
                     addr.host, addr.port, exc)
            new_addr, _key = await self._resolve_peer(peer_id, refresh=True)
            if (new_addr.host, new_addr.port) == (addr.host, addr.port):
                raise
            transport, protocol = await self._open_tcp(ProtocolClass, peer_id, new_addr.host,
                                                       new_addr.port)
        return transport, protocol

    async def _open_tcp(self, ProtocolClass: Callable[..., P], peer_id: str, host: str,
                        port: int) -> tuple[asyncio.Transport, P]:
        """Connect, signing INIT while the TCP handshake is under way (it costs one RSA
        private operation, about as long as a connect on a LAN)."""
        loop = asyncio.get_running_loop()
        myid = self.get_myid()
        conn = self._new_connection(Role.INITIATOR, peer_id)

        def factory() -> P:
            protocol = ProtocolClass(self, myid, peer_id)
            protocol._prepared = conn
            return protocol

        task = loop.create_task(loop.create_connection(factory, host, port))
        try:
            await asyncio.sleep(0)  # the connect has started (or failed)
            if not task.done() and conn.state is State.IDLE:
                conn.initiate(loop.time())
            transport, protocol = await task
        except BaseException:
            # no connection is left without an owner
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result()[0].abort()
            raise
        return transport, protocol  # type: ignore[return-value]

    async def close(self) -> None:
        """Stop serving and close every connection this handler made or accepted."""
        if self.server is not None:
            self.server.close()
            server, self.server = self.server, None
        else:
            server = None
        for proto in list(self._protocols):
            try:
                proto.close()
            except Exception:  # closing must go on for the others
                log.exception("error while closing %r", proto)
        await self._close_udp()
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("server did not close within 5 s")
        if self._directory is not None:
            directory, self._directory = self._directory, None
            await directory.close()

    # -- peers ----------------------------------------------------------------------------------

    async def _resolve_peer(self, peer_id: str, *, refresh: bool = False
                            ) -> tuple[PeerAddress, rsa.RSAPublicKey]:
        """The address and public key of a peer to connect to: from the known peers, else
        (or with ``refresh``) from the directory when ``find_peer_info_url`` is set."""
        peers = self.config.peers
        try:
            validate_peer_id(peer_id)
        except ConfigError as exc:
            raise UnknownPeerError(str(exc)) from None
        key = peers.public_key(peer_id)
        addr = peers.known_address(peer_id)
        if addr is not None and key is not None and not refresh:
            return addr, key
        if self.config.find_peer_info_url is None:
            raise UnknownPeerError(f"unknown peer {peer_id!r}: not in {peers.known_peers_file} "
                                   f"(or no public key in {peers.peer_pubkey_path}, or its "
                                   "directory record expired), and no find_peer_info_url to "
                                   "look it up")
        record = await self._directory_lookup(peer_id, refresh=refresh)
        return (PeerAddress(record.peer_id, record.host, record.port, record.updated_at),
                record.public_key)

    async def _directory_lookup(self, peer_id: str, *, refresh: bool = False) -> Any:
        """Look ``peer_id`` up in the directory and apply the trust policy (signature, nonce,
        expiry, key change, rollback, retirement; see :func:`p2psc.directory.client.learn_peer`),
        storing the peer (files written in a thread, atomically)."""
        from .directory.client import directory_lookup_for, learn_peer

        if self._directory is None:
            self._directory = directory_lookup_for(self.config)
        if refresh:
            self._directory.forget(peer_id)
        return await learn_peer(self._directory, self.config.peers, peer_id,
                                allow_key_change=self.settings.allow_key_change)

    async def _lookup_unknown_peer(self, peer_id: str) -> rsa.RSAPublicKey | None:
        """The public key of a peer that sent an INIT but is not known: looked up in the
        directory when one is configured (lookups merged, failures cached briefly), else None."""
        if self.config.find_peer_info_url is None:
            return None
        try:
            record = await self._directory_lookup(peer_id)
        except P2PError as exc:
            log.info("directory lookup of %s failed: %s", peer_id, exc)
            return None
        return record.public_key  # type: ignore[no-any-return]

    # -- used by the protocols ------------------------------------------------------------------

    def _new_connection(self, role: Role, peer_id: str | None) -> Connection:
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
                              pool=self._buffer_pool)
        return Connection(role, cfg.peer_id, cfg.private_key, self.settings,
                          key_lookup=cfg.peers.public_key, replay_cache=self.replay_cache,
                          now=now, wall_offset=wall_offset(loop),
                          scratch=self._scratch_buffer(), pool=self._buffer_pool)

    def _scratch_buffer(self) -> bytearray:
        """The receive buffer shared by this handler's TCP connections (they run on one event
        loop, and each handles its records before the next read)."""
        if self._scratch is None:
            self._scratch = bytearray(SCRATCH_SIZE)
        return self._scratch

    def _register(self, proto: Any) -> None:
        self._protocols.add(proto)
        if proto.peer_id is None:  # accepted: unauthenticated until its handshake completes
            limit = self.settings.max_pending_handshakes
            while limit and len(self._pending) >= limit:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                oldest.fail(HandshakeError(
                    f"dropped: {limit} handshakes pending (max_pending_handshakes); this one "
                    "was the oldest"))
            self._pending[proto] = None

    def _unregister(self, proto: Any) -> None:
        self._protocols.discard(proto)
        self._pending.pop(proto, None)
        peer_id = proto.peer_id
        if peer_id is not None and self._peer_conns.get(peer_id) is proto:
            del self._peer_conns[peer_id]

    def _on_handshaked(self, proto: Any) -> None:
        self._pending.pop(proto, None)
        self._peer_conns[proto.peer_id] = proto
