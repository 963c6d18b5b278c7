"""The p2psc peer directory: a signed lookup service for peers' keys and addresses.

* :mod:`.record` — the record format, its canonical encoding and the center's signature;
* :mod:`.update` — the self-service address update request;
* :mod:`.store` — the SQLite store of the server;
* :mod:`.server` — the aiohttp web app (``make_app``, ``serve``);
* :mod:`.client` — lookups (``fetch_peer_record``, ``DirectoryLookup``), ``update_address``
  and ``save_peer`` for the handler;
* :mod:`.cli` — ``p2psc directory ...`` commands.

See docs/DIRECTORY.md. The server side (aiohttp web app, SQLite) is imported lazily: importing
this package only loads the record format and the client.
"""

from __future__ import annotations

from .client import (
    DEFAULT_TIMEOUT,
    DirectoryLookup,
    PeerNotInDirectory,
    accept_record,
    fetch_peer_record,
    save_peer,
    update_address,
    update_url_for,
)
from .record import (
    CENTER_PEER_ID,
    DirectorySignatureError,
    PeerRecord,
    canonical_record_bytes,
    sign_record,
    verify_record,
)
from .update import canonical_update_bytes, make_update_request

__all__ = [
    "CENTER_PEER_ID",
    "DEFAULT_TIMEOUT",
    "DirectoryLookup",
    "DirectorySignatureError",
    "PeerNotInDirectory",
    "PeerRecord",
    "accept_record",
    "canonical_record_bytes",
    "canonical_update_bytes",
    "fetch_peer_record",
    "make_update_request",
    "save_peer",
    "sign_record",
    "update_address",
    "update_url_for",
    "verify_record",
]
