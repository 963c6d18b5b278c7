"""The p2psc exception hierarchy: every error the library raises is a :class:`P2PError`.

Every exception class of the library is defined here. The tree::

    P2PError
    ├── UsageError                the local program misused the API or its configuration
    │   ├── ConfigError
    │   ├── InvalidDataType
    │   ├── MessageTooLarge       a local send over max_message_size / udp_max_payload
    │   ├── MissRemoteAddr
    │   ├── StatusError
    │   └── ChannelNotReady
    │       └── ChannelClosed
    ├── PeerError                 the remote peer (or the network path to it) broke the
    │   │                         protocol or went away
    │   ├── ProtocolError
    │   │   ├── CRCError
    │   │   └── RecordTooLarge    a peer's record over the limit
    │   ├── LimitExceeded         a per-peer or handler-wide resource bound was reached
    │   ├── HandshakeError
    │   │   ├── SignCheckError
    │   │   └── HandshakeTimeout
    │   ├── ConnectionLost
    │   ├── ConnectError      connecting to the peer failed (also an OSError)
    │   └── RelayError        the relay/rendezvous refused a request or is unreachable
    │       └── PeerUnreachable   no path (direct, punched or relayed) reached the peer
    ├── UnknownPeerError          no public key for a peer id (local lookup or incoming INIT)
    │   └── PeerNotInDirectory    (also a DirectoryError)
    ├── TransferError             a file transfer of p2psc send/listen failed (p2psc.transfer)
    └── DirectoryError            the peer directory service could not be used
        ├── DirectorySignatureError
        ├── DirectoryUnreachable  no answer from the directory's URL
        ├── NotADirectory         the URL answered, but not as a p2psc directory
        ├── PeerNotInDirectory    (also an UnknownPeerError)
        ├── UnknownEntryError
        ├── ReplayError
        └── DirectoryStoreError   the directory server's database failed or did not answer

:class:`UsageError` means "fix the calling program or its configuration"; :class:`PeerError`
means "the other side (or the network) is at fault; this connection or session is over".
:class:`UnknownPeerError` and :class:`DirectoryError` are neither: they say that this peer
cannot find out who the other one is.

A directory record or update with a bad signature is a :class:`DirectorySignatureError`: a
:class:`DirectoryError` only, not a :class:`SignCheckError`, which is about the handshake.

The names of the original library (``UnknownPeerError``, ``MissRemoteAddr``, ``CRCError``,
``ChannelNotReady``, ``InvalidDataType``, ``SignCheckError``, ``StatusError``) are kept, and
every class is still importable from where it was defined before (``p2psc.channel``,
``p2psc.directory.client``, ``p2psc.directory.record``, ``p2psc.directory.store``).

The command line's own ``CliError`` (:mod:`p2psc.cli`) is not raised by the library: it is
how a ``p2psc`` command reports a one-line failure (a usage mistake or an unreachable peer
alike) before exiting with status 1, so it stays in the command line and outside this tree.
"""

from __future__ import annotations

import os
import socket
from typing import Any

__all__ = [
    "P2PError",
    "UsageError",
    "ConfigError",
    "InvalidDataType",
    "MessageTooLarge",
    "MissRemoteAddr",
    "StatusError",
    "ChannelNotReady",
    "RelayError",
    "TransferError",
    "PeerUnreachable",
    "ChannelClosed",
    "PeerError",
    "ProtocolError",
    "CRCError",
    "RecordTooLarge",
    "LimitExceeded",
    "HandshakeError",
    "SignCheckError",
    "HandshakeTimeout",
    "ConnectionLost",
    "ConnectError",
    "UnknownPeerError",
    "DirectoryError",
    "DirectorySignatureError",
    "DirectoryUnreachable",
    "NotADirectory",
    "PeerNotInDirectory",
    "UnknownEntryError",
    "ReplayError",
    "DirectoryStoreError",
]


class P2PError(Exception):
    """Base class of every p2psc error."""


# -- the local program ---------------------------------------------------------------------------

class UsageError(P2PError):
    """The local program misused the API or its configuration."""


class ConfigError(UsageError):
    """The configuration or a key file is missing, unreadable or malformed."""


class InvalidDataType(UsageError):
    """``send`` was given something that is not bytes-like."""


class MessageTooLarge(UsageError):
    """A local ``send`` is larger than the configured limit (``max_message_size``, or
    ``udp_max_payload`` for a datagram). A peer's oversized record is :class:`RecordTooLarge`."""


class MissRemoteAddr(UsageError):
    """A datagram was to be sent with no address to send it to."""


class StatusError(UsageError):
    """An operation was attempted in a state that does not allow it."""


class ChannelNotReady(UsageError):
    """Data was sent before the handshake completed and the pre-handshake queue is full,
    or after the channel was closed."""


class ChannelClosed(ChannelNotReady):
    """The channel was closed cleanly (by either side); no more messages will come."""


# -- the remote peer -----------------------------------------------------------------------------

class PeerError(P2PError):
    """The remote peer (or the network path to it) broke the protocol or went away."""


class ProtocolError(PeerError):
    """The peer sent bytes that do not follow the protocol (malformed, oversized, out of place)."""


class CRCError(ProtocolError):
    """A record failed authentication (forged, corrupted, replayed or reordered).

    The name is the original library's, which used a checksum; p2psc uses an AEAD tag.
    """


class RecordTooLarge(ProtocolError):
    """The peer announced a record larger than this side's limit: ``max_message_size`` once
    established, ``MAX_HANDSHAKE_BODY`` during the handshake. Refused from its header alone."""


class LimitExceeded(PeerError):
    """A resource bound was reached: the bytes that partly received records may hold in one
    handler (``max_partial_record_bytes``), or the connections one peer may hold
    (``max_connections_per_peer``). The connection that would exceed it is closed."""


class HandshakeError(PeerError):
    """The handshake failed (wrong recipient, stale or replayed INIT, bad FINISHED, ...)."""


class SignCheckError(HandshakeError):
    """A handshake signature did not verify with the peer's public key."""


class HandshakeTimeout(HandshakeError):
    """The handshake did not complete within ``handshake_timeout``."""


class ConnectionLost(PeerError):
    """The connection ended without the peer's authenticated CLOSE record (truncation or loss)."""


def os_reason(exc: OSError) -> str:
    """The reason of an OSError in words: ``getaddrinfo``'s own text for a DNS failure
    (``os.strerror`` of its negative code says "Unknown error -2"), else the errno's text."""
    if isinstance(exc, socket.gaierror) or (exc.errno is not None and exc.errno < 0):
        return str(exc.strerror or exc)
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc.strerror or exc) or type(exc).__name__


class ConnectError(PeerError, OSError):
    """Connecting to the peer failed: its name did not resolve, or the connection was refused,
    reset or timed out. Also an :class:`OSError` (``errno`` and ``strerror`` are the original
    error's), so ``except OSError`` still catches it; ``host`` and ``port`` say where."""

    def __init__(self, message: str, *, errno: int | None = None, strerror: str | None = None,
                 host: str | None = None, port: int | None = None) -> None:
        OSError.__init__(self, message)
        self.errno = errno  # type: ignore[misc]
        self.strerror = strerror  # type: ignore[misc]
        self.message = message
        self.host = host
        self.port = port

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        return (_connect_error, (self.message, self.errno, self.strerror, self.host, self.port))

    @classmethod
    def from_os_error(cls, exc: OSError, peer_id: str | None, host: str, port: int
                      ) -> ConnectError:
        """The error of connecting to ``peer_id`` at ``host``:``port`` that raised ``exc``."""
        reason = os_reason(exc)
        who = f"{peer_id} at " if peer_id else ""
        if isinstance(exc, socket.gaierror):
            message = f"cannot connect to {who}{host}:{port}: cannot resolve {host}: {reason}"
        else:
            message = f"cannot connect to {who}{host}:{port}: {reason}"
        return cls(message, errno=exc.errno, strerror=reason, host=host, port=port)


def _connect_error(message: str, errno: int | None, strerror: str | None, host: str | None,
                   port: int | None) -> ConnectError:
    return ConnectError(message, errno=errno, strerror=strerror, host=host, port=port)


# -- who is the peer ------------------------------------------------------------------------------

class RelayError(PeerError):
    """The relay/rendezvous service refused a request (its reason is in the message), could not
    be reached, or sent a malformed frame (docs/NAT.md)."""


class PeerUnreachable(RelayError):
    """No path reached the peer: not its direct address, not a punched path, not the relay."""


class TransferError(P2PError):
    """A ``p2psc send`` / ``listen`` file transfer failed or a transfer message was malformed
    (:mod:`p2psc.transfer`); the message says why in one line."""


class UnknownPeerError(P2PError):
    """The peer id is not known (no public key on file, and the directory did not know it)."""


class DirectoryError(P2PError):
    """The peer directory could not be reached or returned a record that does not verify."""


class DirectorySignatureError(DirectoryError):
    """A directory record or update request whose signature does not verify.

    Only a :class:`DirectoryError`: it is not a :class:`SignCheckError` (a handshake failure).
    """


class DirectoryUnreachable(DirectoryError):
    """The directory's URL did not answer: its name did not resolve, the connection was
    refused or reset, or it did not answer within the time limit."""


class NotADirectory(DirectoryError):
    """The URL answered, but not as a p2psc directory (an HTML page, another status, not
    JSON): the URL is probably wrong."""


class PeerNotInDirectory(DirectoryError, UnknownPeerError):
    """The directory answered 404: it does not know this peer id."""


class UnknownEntryError(DirectoryError):
    """The peer id is not registered in the directory."""


class ReplayError(DirectoryError):
    """The update nonce was already used (a replayed request)."""


class DirectoryStoreError(DirectoryError):
    """The directory server's own database (SQLite or PostgreSQL) failed, is unreachable or
    did not answer in time; the server answers such a request 503. The message says which in
    one line and never holds a password."""
