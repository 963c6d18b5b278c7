"""p2psc: authenticated, encrypted peer-to-peer channels over TCP and UDP for asyncio.

Each peer has an id, an RSA private key and the public keys of the peers it knows; a handshake
(RSA-PSS signatures, RSA-OAEP key transport and X25519) gives every connection fresh AEAD keys.
See README.md and docs/PROTOCOL.md.
"""

from typing import TYPE_CHECKING

from .p2pexcept import (
    ChannelClosed,
    ChannelNotReady,
    ConfigError,
    ConnectError,
    ConnectionLost,
    CRCError,
    DirectoryError,
    DirectorySignatureError,
    DirectoryStoreError,
    DirectoryUnreachable,
    HandshakeError,
    HandshakeTimeout,
    InvalidDataType,
    LimitExceeded,
    MessageTooLarge,
    MissRemoteAddr,
    NotADirectory,
    P2PError,
    PeerError,
    PeerNotInDirectory,
    PeerUnreachable,
    ProtocolError,
    RecordTooLarge,
    RelayError,
    ReplayError,
    SignCheckError,
    StatusError,
    TransferError,
    UnknownEntryError,
    UnknownPeerError,
    UsageError,
)

if TYPE_CHECKING:
    # What type checkers see; at run time these are imported lazily, by __getattr__ below.
    from .channel import Channel, DatagramChannel
    from .p2p import TcpP2P
    from .p2phandler import P2PHandler

__version__ = "1.0.0"

__all__ = [
    "P2PHandler", "TcpP2P", "Channel", "ChannelClosed", "DatagramChannel", "__version__",
    "P2PError", "ConfigError", "UnknownPeerError", "MissRemoteAddr", "CRCError",
    "ChannelNotReady", "InvalidDataType", "SignCheckError", "StatusError", "HandshakeError",
    "HandshakeTimeout", "ProtocolError", "MessageTooLarge", "ConnectionLost", "DirectoryError",
    "UsageError", "PeerError", "RecordTooLarge", "LimitExceeded", "DirectorySignatureError",
    "PeerNotInDirectory", "RelayError", "PeerUnreachable", "TransferError",
    "UnknownEntryError", "ReplayError", "ConnectError", "DirectoryUnreachable", "NotADirectory",
    "DirectoryStoreError",
]


def __getattr__(name: str) -> object:
    # Imported lazily so that `import p2psc.keys` stays light.
    if name == "P2PHandler":
        from .p2phandler import P2PHandler
        return P2PHandler
    if name == "TcpP2P":
        from .p2p import TcpP2P
        return TcpP2P
    if name in ("Channel", "DatagramChannel"):
        from . import channel
        return getattr(channel, name)
    raise AttributeError(f"module 'p2psc' has no attribute {name!r}")
