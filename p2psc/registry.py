"""``ConnectionRegistry``: the TCP connections of a handler, live, pending and handshaked."""

from __future__ import annotations

import logging
from collections.abc import Set

from ._host import TcpPeer
from .config import Settings
from .p2pexcept import HandshakeError, LimitExceeded

# the handler's logger: these are the handler's messages, as before the split
log = logging.getLogger("p2psc.p2phandler")

__all__ = ["ConnectionRegistry"]


class ConnectionRegistry:
    """Every live TCP protocol of a handler; the accepted ones whose handshake is pending,
    oldest first and at most ``max_pending_handshakes`` of them (the oldest is dropped to make
    room); and, per peer, its handshaked ones, at most ``max_connections_per_peer`` (the
    oldest is closed with :class:`LimitExceeded` when a new one completes its handshake)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._protocols: set[TcpPeer] = set()
        self._pending: dict[TcpPeer, None] = {}  # insertion order: oldest first
        self._peer_conns: dict[str, TcpPeer] = {}
        self._by_peer: dict[str, dict[TcpPeer, None]] = {}  # handshaked, oldest first

    @property
    def protocols(self) -> Set[TcpPeer]:
        """The live protocols (a view)."""
        return self._protocols

    @property
    def pending(self) -> Set[TcpPeer]:
        """The accepted protocols not yet authenticated, oldest first (a view)."""
        return self._pending.keys()

    def peer_conn(self, peer_id: str) -> TcpPeer | None:
        """The live, handshaked protocol for ``peer_id`` (the latest one), or None."""
        proto = self._peer_conns.get(peer_id)
        if proto is not None and proto.handshaked:
            return proto
        return None

    def add(self, proto: TcpPeer) -> None:
        """A connection was made; an accepted one (no ``peer_id`` yet) is pending."""
        self._protocols.add(proto)
        if proto.peer_id is None:  # accepted: unauthenticated until its handshake completes
            limit = self._settings.max_pending_handshakes
            while limit and len(self._pending) >= limit:
                oldest = next(iter(self._pending))
                del self._pending[oldest]
                oldest.drop_pending(HandshakeError(
                    f"dropped: {limit} handshakes pending (max_pending_handshakes); this one "
                    "was the oldest"))
            self._pending[proto] = None

    def handshaked(self, proto: TcpPeer) -> None:
        """``proto`` completed its handshake: it is now the peer's latest connection."""
        self._pending.pop(proto, None)
        peer_id = proto.peer_id
        if peer_id is None:
            return
        self._peer_conns[peer_id] = proto
        mine = self._by_peer.setdefault(peer_id, {})
        mine[proto] = None
        limit = self._settings.max_connections_per_peer
        while limit and len(mine) > limit:
            oldest = next(iter(mine))
            del mine[oldest]
            log.warning("%s: %d connections (max_connections_per_peer); closing the oldest",
                        peer_id, limit + 1)
            oldest.fail(LimitExceeded(
                f"closed: {peer_id} has {limit} newer connections (max_connections_per_peer)"))

    def remove(self, proto: TcpPeer) -> None:
        """A connection ended."""
        self._protocols.discard(proto)
        self._pending.pop(proto, None)
        peer_id = proto.peer_id
        if peer_id is None:
            return
        mine = self._by_peer.get(peer_id)
        if mine is not None:
            mine.pop(proto, None)
            if not mine:
                del self._by_peer[peer_id]
        if self._peer_conns.get(peer_id) is proto:
            del self._peer_conns[peer_id]
            if mine:  # the latest of those left
                self._peer_conns[peer_id] = next(reversed(mine))

    def close_all(self) -> None:
        """Close every live connection (gracefully: each sends its CLOSE)."""
        for proto in list(self._protocols):
            try:
                proto.close()
            except Exception:  # closing must go on for the others
                log.exception("error while closing %r", proto)
