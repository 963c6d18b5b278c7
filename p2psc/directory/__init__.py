"""The p2psc peer directory: a center-signed lookup service for peers' public keys and
addresses, its server, and the client a peer uses.

* :mod:`.record` -- the record ``{peer_id, pubkey, host, port, updated_at, expires_at, nonce,
  sig}`` (format v2), its canonical encoding, the center's signature (``sign_record``,
  ``verify_record``, which also checks expiry and the lookup nonce) and the field checks
  (wrappers of :mod:`p2psc.validators` that raise :class:`DirectoryError`);
* :mod:`.update` -- the self-service address update request a peer signs with its own key;
* :mod:`.client` -- verified lookups (``fetch_peer_record``, and ``DirectoryLookup``, which
  merges concurrent lookups and caches failures), ``update_address``, the key-change policy
  ``accept_record``, the handler's trust policy ``learn_peer`` (with
  ``directory_lookup_for``), and ``save_peer``, which stores a looked-up peer in a peer
  folder through :mod:`p2psc.config`;
* :mod:`.store` -- the server's SQLite store of registered peers, seen update nonces and the
  last accepted update time of each peer;
* :mod:`.server` -- the aiohttp web app (``make_app``, ``start_server``, ``serve``): lookups,
  address updates and an HTML listing;
* :mod:`.cli` -- the ``p2psc directory ...`` commands (init-center, serve, add, remove,
  list, lookup, update-address).

This package re-exports the record, update and client API below. Importing it loads those
three modules (and so aiohttp, for the client); the store and the server (sqlite3, the web
app) are only imported by whoever uses them, e.g. ``p2psc directory serve``.
See docs/DIRECTORY.md.
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
