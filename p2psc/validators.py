"""The checks of a peer's address and id, shared by the config reader, the directory and both
command lines: :func:`check_port`, :func:`check_host`, :func:`check_peer_id`, and
:func:`port_arg`, the argparse ``type`` of every ``--port``.

Each ``check_*`` returns the value when it is valid and otherwise raises ``error``
(:class:`ConfigError` by default; the directory passes :class:`DirectoryError`) with a message
starting with ``what``. The rules:

* port: an ``int`` (not a bool, float or string) from 1 to 65535, or from 0 with
  ``allow_zero`` (a listening address: 0 picks a free port; a peer folder may also record a
  peer that never listens with port 0). Directory records always need 1 to 65535.
* host: a DNS name or an IP literal (optionally bracketed, with a ``%zone``): 1 to
  :data:`MAX_HOST_LEN` characters of ``A-Z a-z 0-9 . _ : % [ ] -``, nothing that needs
  escaping in a URL or HTML.
* peer id: :func:`p2psc.keys.validate_peer_id`.
"""

from __future__ import annotations

import argparse
import re

from . import keys
from .p2pexcept import ConfigError, P2PError

__all__ = ["MAX_HOST_LEN", "MAX_PORT", "check_host", "check_peer_id", "check_port", "port_arg"]

#: Longest host accepted (a DNS name is at most 253 characters).
MAX_HOST_LEN = 253
MAX_PORT = 65535

_HOST_RE = re.compile(r"[A-Za-z0-9._:%\[\]-]+")


def check_port(value: object, what: str = "port", *, allow_zero: bool = False,
               error: type[P2PError] = ConfigError) -> int:
    """Return a TCP/UDP port: 1..65535, or 0..65535 with ``allow_zero``; else raise ``error``."""
    low = 0 if allow_zero else 1
    if type(value) is not int or not low <= value <= MAX_PORT:
        raise error(f"{what} must be a whole number from {low} to {MAX_PORT}")
    return value


def check_host(value: object, what: str = "host", *, error: type[P2PError] = ConfigError) -> str:
    """Return a host (DNS name or IP literal, 1 to 253 safe ASCII characters); else raise ``error``."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_HOST_LEN:
        raise error(f"{what} must be a string of 1 to {MAX_HOST_LEN} characters")
    if not _HOST_RE.fullmatch(value):
        raise error(f"{what} has characters a host name or IP address cannot have")
    return value


def check_peer_id(value: object, what: str = "peer_id", *,
                  error: type[P2PError] = ConfigError) -> str:
    """Return a valid peer id (:func:`p2psc.keys.validate_peer_id`); else raise ``error``.

    A :class:`ConfigError` names the refused value; any other ``error`` says only
    ``"<what>: invalid peer id"`` (the directory sends it to whoever asked).
    """
    try:
        return keys.validate_peer_id(value)
    except ConfigError:
        if error is ConfigError:
            raise
        raise error(f"{what}: invalid peer id") from None


def port_arg(text: str) -> int:
    """argparse ``type`` of a ``--port`` option: :func:`check_port` with ``allow_zero``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    try:
        return check_port(value, allow_zero=True)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
