"""The p2psc exception hierarchy: every error the library raises is a :class:`P2PError`.

The names of the original library (``UnknownPeerError``, ``MissRemoteAddr``, ``CRCError``,
``ChannelNotReady``, ``InvalidDataType``, ``SignCheckError``, ``StatusError``) are kept.
"""

from __future__ import annotations

__all__ = [
    "P2PError",
    "ConfigError",
    "UnknownPeerError",
    "MissRemoteAddr",
    "CRCError",
    "ChannelNotReady",
    "InvalidDataType",
    "SignCheckError",
    "StatusError",
    "HandshakeError",
    "HandshakeTimeout",
    "ProtocolError",
    "MessageTooLarge",
    "ConnectionLost",
    "DirectoryError",
]


class P2PError(Exception):
    """Base class of every p2psc error."""


class ConfigError(P2PError):
    """The configuration or a key file is missing, unreadable or malformed."""


class UnknownPeerError(P2PError):
    """The peer id is not known (no public key on file, and the directory did not know it)."""


class MissRemoteAddr(P2PError):
    """A datagram was to be sent with no address to send it to."""


class ProtocolError(P2PError):
    """The peer sent bytes that do not follow the protocol (malformed, oversized, out of place)."""


class CRCError(ProtocolError):
    """A record failed authentication (forged, corrupted, replayed or reordered).

    The name is the original library's, which used a checksum; p2psc uses an AEAD tag.
    """


class ChannelNotReady(P2PError):
    """Data was sent before the handshake completed and the pre-handshake queue is full,
    or after the channel was closed."""


class InvalidDataType(P2PError):
    """``send`` was given something that is not bytes-like."""


class HandshakeError(P2PError):
    """The handshake failed (wrong recipient, stale or replayed INIT, bad FINISHED, ...)."""


class SignCheckError(HandshakeError):
    """A handshake signature did not verify with the peer's public key."""


class HandshakeTimeout(HandshakeError):
    """The handshake did not complete within ``handshake_timeout``."""


class StatusError(P2PError):
    """An operation was attempted in a state that does not allow it."""


class MessageTooLarge(P2PError):
    """A message is larger than the configured limit (``max_message_size``)."""


class ConnectionLost(P2PError):
    """The connection ended without the peer's authenticated CLOSE record (truncation or loss)."""


class DirectoryError(P2PError):
    """The peer directory could not be reached or returned a record that does not verify."""
