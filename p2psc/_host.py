"""What the protocols need from the handler that builds them.

:class:`~p2psc.p2p.TcpP2P` and :class:`~p2psc.udp_p2p.UdpP2P` are built as
``ProtocolClass(handler, myid, peer_id)``; ``handler`` is a :class:`ProtocolHost`, which
:class:`~p2psc.p2phandler.P2PHandler` implements. The protocols depend on this interface only,
never on the handler's module, so that the handler can import them and not the other way round.
"""

from __future__ import annotations

from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from ._proto.replay import InitReplayCache
from ._proto.tcp import Connection, Role
from .config import Settings
from .p2pexcept import P2PError

__all__ = ["NatTap", "ProtocolHost", "TcpPeer", "UdpPeer"]


class TcpPeer(Protocol):
    """What the handler needs of a TCP protocol (:class:`~p2psc.p2p.TcpP2P`)."""

    @property
    def peer_id(self) -> str | None:
        """The peer's id (None on the accepting side until the handshake names it)."""

    @property
    def handshaked(self) -> bool:
        """True once the handshake completed, until the connection closes."""

    def drop_pending(self, error: P2PError) -> None:
        """Give up on a connection whose handshake is pending."""

    def fail(self, error: P2PError) -> None:
        """End the connection for ``error`` (logged; nothing more is sent)."""

    def close(self) -> None:
        """Close gracefully."""


class UdpPeer(Protocol):
    """What the handler needs of a UDP protocol (:class:`~p2psc.udp_p2p.UdpP2P`)."""

    def stop(self) -> None:
        """Send CLOSE to every peer and close the socket."""


class NatTap(Protocol):
    """Where a UDP endpoint hands what is NAT traversal's (:mod:`p2psc.nat.agent`)."""

    def nat_datagram(self, data: bytes, addr: Any) -> None:
        """A discovery or punch datagram (first byte 0x50..0x53) arrived from ``addr``."""

    def relay_datagram(self, data: bytes, addr: Any) -> None:
        """A sealed datagram is to go through the relay to ``addr`` (a ``RelayAddress``)."""


class ProtocolHost(Protocol):
    """The handler as the protocols see it: this peer's identity and settings, the peers'
    keys, and the bookkeeping calls a protocol makes as it starts, authenticates and ends."""

    @property
    def settings(self) -> Settings:
        """Timeouts, limits and the cipher suite."""

    @property
    def private_key(self) -> rsa.RSAPrivateKey:
        """This peer's RSA private key."""

    @property
    def replay_cache(self) -> InitReplayCache:
        """The cache of recently seen INITs, shared by every responder of this peer."""

    def peer_public_key(self, peer_id: str) -> rsa.RSAPublicKey | None:
        """The public key on file for ``peer_id``, or None."""

    def new_connection(self, role: Role, peer_id: str | None) -> Connection:
        """A sans-IO TCP connection for this peer (``peer_id``: the initiator's peer)."""

    def tcp_register(self, proto: TcpPeer) -> None:
        """A TCP connection was made (accepted or connected)."""

    def tcp_handshaked(self, proto: TcpPeer) -> None:
        """A TCP connection completed its handshake: ``proto.peer_id`` is authenticated."""

    def tcp_unregister(self, proto: TcpPeer) -> None:
        """A TCP connection ended."""

    def udp_register(self, proto: UdpPeer) -> None:
        """A UDP endpoint opened its socket."""

    def udp_unregister(self, proto: UdpPeer) -> None:
        """A UDP endpoint's socket closed."""

    async def lookup_unknown_peer(self, peer_id: str, source: Any) -> rsa.RSAPublicKey | None:
        """The public key of a peer that sent an INIT from address ``source`` but is not known
        (looked up in the directory when there is one, within ``source``'s lookup budget), or
        None."""
