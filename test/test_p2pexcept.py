"""The exception tree of p2psc/p2pexcept.py: one module, a usage/peer split, old names kept."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest

import p2psc
from p2psc import p2pexcept as E

#: Every class defined in the module.
CLASSES = {name: obj for name, obj in vars(E).items()
           if inspect.isclass(obj) and obj.__module__ == E.__name__}

USAGE = {"ConfigError", "InvalidDataType", "MessageTooLarge", "MissRemoteAddr", "StatusError",
         "ChannelNotReady", "ChannelClosed"}
PEER = {"ProtocolError", "CRCError", "RecordTooLarge", "LimitExceeded", "HandshakeError", "SignCheckError",
        "HandshakeTimeout", "ConnectionLost", "RelayError", "PeerUnreachable", "ConnectError"}
NEITHER = {"P2PError", "UsageError", "PeerError", "UnknownPeerError", "DirectoryError",
           "DirectorySignatureError", "PeerNotInDirectory", "UnknownEntryError", "ReplayError",
           "DirectoryUnreachable", "NotADirectory", "TransferError", "DirectoryStoreError"}

#: Each class and its direct bases.
PARENTS = {
    "P2PError": ("Exception",),
    "UsageError": ("P2PError",),
    "ConfigError": ("UsageError",),
    "InvalidDataType": ("UsageError",),
    "MessageTooLarge": ("UsageError",),
    "MissRemoteAddr": ("UsageError",),
    "StatusError": ("UsageError",),
    "ChannelNotReady": ("UsageError",),
    "ChannelClosed": ("ChannelNotReady",),
    "PeerError": ("P2PError",),
    "ProtocolError": ("PeerError",),
    "CRCError": ("ProtocolError",),
    "RecordTooLarge": ("ProtocolError",),
    "LimitExceeded": ("PeerError",),
    "HandshakeError": ("PeerError",),
    "SignCheckError": ("HandshakeError",),
    "HandshakeTimeout": ("HandshakeError",),
    "ConnectionLost": ("PeerError",),
    "ConnectError": ("PeerError", "OSError"),
    "RelayError": ("PeerError",),
    "PeerUnreachable": ("RelayError",),
    "UnknownPeerError": ("P2PError",),
    "DirectoryError": ("P2PError",),
    "TransferError": ("P2PError",),
    "DirectorySignatureError": ("DirectoryError",),
    "DirectoryUnreachable": ("DirectoryError",),
    "NotADirectory": ("DirectoryError",),
    "PeerNotInDirectory": ("DirectoryError", "UnknownPeerError"),
    "UnknownEntryError": ("DirectoryError",),
    "ReplayError": ("DirectoryError",),
    "DirectoryStoreError": ("DirectoryError",),
}

#: Where each class was defined before p2pexcept held them all.
OLD_HOMES = {
    "ChannelClosed": "p2psc.channel",
    "PeerNotInDirectory": "p2psc.directory.client",
    "DirectorySignatureError": "p2psc.directory.record",
    "UnknownEntryError": "p2psc.directory.store",
    "ReplayError": "p2psc.directory.store",
}


def test_the_lists_here_cover_the_module() -> None:
    assert set(CLASSES) == USAGE | PEER | NEITHER == set(PARENTS) == set(E.__all__)
    assert not USAGE & PEER and not (USAGE | PEER) & NEITHER


def test_every_class_is_a_p2perror_with_the_drawn_parents() -> None:
    for name, cls in CLASSES.items():
        assert issubclass(cls, E.P2PError), name
        assert tuple(b.__name__ for b in cls.__bases__) == PARENTS[name], name


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_usage_or_peer(name: str) -> None:
    cls = CLASSES[name]
    assert issubclass(cls, E.UsageError) is (name in USAGE or name == "UsageError")
    assert issubclass(cls, E.PeerError) is (name in PEER or name == "PeerError")


def test_the_split_where_it_was_blurred() -> None:
    # a local send over the limit is the program's; a peer's oversized record is the peer's
    assert issubclass(E.MessageTooLarge, E.UsageError)
    assert not issubclass(E.MessageTooLarge, E.PeerError)
    assert issubclass(E.RecordTooLarge, E.ProtocolError)
    assert not issubclass(E.RecordTooLarge, E.MessageTooLarge)
    # a bad directory signature is a directory failure, not a handshake one
    assert issubclass(E.DirectorySignatureError, E.DirectoryError)
    assert not issubclass(E.DirectorySignatureError, (E.SignCheckError, E.HandshakeError,
                                                      E.PeerError))
    # a 404 from the directory is both a directory failure and an unknown peer
    assert issubclass(E.PeerNotInDirectory, E.DirectoryError)
    assert issubclass(E.PeerNotInDirectory, E.UnknownPeerError)


@pytest.mark.parametrize("name", sorted(OLD_HOMES))
def test_same_class_from_its_old_home(name: str) -> None:
    module = importlib.import_module(OLD_HOMES[name])
    assert getattr(module, name) is CLASSES[name]
    assert name in module.__all__


def test_directory_package_and_top_level_export_the_same_classes() -> None:
    from p2psc import directory
    assert directory.PeerNotInDirectory is E.PeerNotInDirectory
    assert directory.DirectorySignatureError is E.DirectorySignatureError
    for name, cls in CLASSES.items():
        assert name in p2psc.__all__, name
        assert getattr(p2psc, name) is cls, name


def test_the_docstring_tree_names_every_class() -> None:
    doc = E.__doc__
    assert doc is not None
    drawing = doc.split("::", 1)[1]
    drawn = set(re.findall(r"[├└]── (\w+)", drawing)) | {"P2PError"}
    assert drawn == set(CLASSES)
    for name in CLASSES:
        assert re.search(rf"\b{name}\b", doc), name


def test_cli_error_is_not_a_library_error() -> None:
    from p2psc.cli import CliError
    assert not issubclass(CliError, E.P2PError)
    assert "CliError" in (E.__doc__ or "")
