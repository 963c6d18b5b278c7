"""The events the sans-IO core hands to an adapter: one vocabulary for TCP and UDP.

Every input of a core object (:class:`~p2psc._proto.tcp.Connection`,
:class:`~p2psc._proto.udp.UdpEndpoint`) returns the events it completed, in order. Receiving
never raises: a protocol failure is a final :class:`Closed` (TCP) or a dropped datagram
(UDP), after the events that were good.

::

    Event
    ├── HandshakeComplete   a peer is authenticated (UDP: ``rekey`` for a session's rekey)
    ├── HandshakeFailed     a handshake we started gave up (UDP; TCP ends with Closed)
    ├── PeerKeyNeeded       an INIT from a peer whose public key is not known
    ├── MessageReceived     one authenticated, decrypted message (TCP)
    │   └── DatagramReceived    ... with the session's peer and address (UDP)
    └── Closed              a connection (TCP) or a peer's session (UDP) ended
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..p2pexcept import P2PError

__all__ = ["Event", "HandshakeComplete", "HandshakeFailed", "PeerKeyNeeded", "MessageReceived",
           "DatagramReceived", "Closed"]


class Event:
    """Base class of the core's events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The handshake completed: ``peer_id`` is authenticated. UDP gives the peer's address,
    and ``rekey`` True when the session replaces one with the same peer (applications need
    not hear of it)."""

    peer_id: str
    addr: Any = None
    rekey: bool = False


@dataclass(frozen=True, slots=True)
class HandshakeFailed(Event):
    """A UDP handshake we initiated gave up (``error`` says why)."""

    peer_id: str
    error: P2PError
    rekey: bool = False


@dataclass(frozen=True, slots=True)
class PeerKeyNeeded(Event):
    """An INIT came from ``peer_id``, whose public key is not known: answer with the core
    object's ``provide_peer_key`` (the key, or None to refuse). UDP adds the INIT's
    ``token`` to pass back and its source address ``addr`` (TCP leaves it None: the adapter
    knows the connection's peer address)."""

    peer_id: str
    token: bytes = b""
    addr: Any = None


@dataclass(slots=True)
class MessageReceived(Event):
    """One authenticated, decrypted application message."""

    data: bytes


@dataclass(slots=True)
class DatagramReceived(MessageReceived):
    """One authenticated, decrypted datagram, with the session that opened it."""

    peer_id: str
    addr: Any


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """A TCP connection, or (UDP) a peer's session, ended: ``error`` is None for the peer's
    authenticated CLOSE (or a local close), else why. UDP gives the peer and its address."""

    error: P2PError | None
    peer_id: str | None = None
    addr: Any = None
