"""``PeerResolver``: where a peer is and which public key it has, from the known peers or the
signed directory, with the trust policy for what the directory says (key changes, rollbacks)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import rsa

from .config import PeerAddress, PeerConfig
from .keys import PUBKEY_SUFFIX, same_public_key, validate_peer_id
from .p2pexcept import ConfigError, DirectoryError, P2PError, UnknownPeerError

if TYPE_CHECKING:
    from .directory import DirectoryLookup, PeerRecord

# the handler's logger: these are the handler's messages, as before the split
log = logging.getLogger("p2psc.p2phandler")

__all__ = ["PeerResolver"]


class PeerResolver:
    """Resolves peer ids for one peer (``config``): its known peers first, else the directory
    at ``find_peer_info_url``, whose client it owns (made on first use, closed by
    :meth:`close`). What the directory says is stored (atomically, in a thread) once checked."""

    def __init__(self, config: PeerConfig) -> None:
        self._config = config
        self._directory: DirectoryLookup | None = None

    @property
    def directory(self) -> DirectoryLookup | None:
        """The directory client, once a lookup made it (for inspection)."""
        return self._directory

    async def resolve(self, peer_id: str, *, refresh: bool = False
                      ) -> tuple[PeerAddress, rsa.RSAPublicKey]:
        """The address and public key of a peer to connect to: from the known peers, else
        (or with ``refresh``) from the directory when ``find_peer_info_url`` is set."""
        config = self._config
        peers = config.peers
        try:
            validate_peer_id(peer_id)
        except ConfigError as exc:
            raise UnknownPeerError(str(exc)) from None
        key = peers.public_key(peer_id)
        addr = peers.known_address(peer_id)
        if addr is not None and key is not None and not refresh:
            return addr, key
        if config.find_peer_info_url is None:
            raise UnknownPeerError(f"unknown peer {peer_id!r}: not in {peers.known_peers_file} "
                                   f"(or no public key in {peers.peer_pubkey_path}), and no "
                                   "find_peer_info_url to look it up")
        record = await self._directory_lookup(peer_id, refresh=refresh)
        return (PeerAddress(record.peer_id, record.host, record.port, record.updated_at),
                record.public_key)

    async def lookup_unknown(self, peer_id: str) -> rsa.RSAPublicKey | None:
        """The public key of a peer that sent an INIT but is not known: looked up in the
        directory when one is configured (lookups merged, failures cached briefly), else None."""
        if self._config.find_peer_info_url is None:
            return None
        try:
            record = await self._directory_lookup(peer_id)
        except P2PError as exc:
            log.info("directory lookup of %s failed: %s", peer_id, exc)
            return None
        return record.public_key

    async def close(self) -> None:
        """Close the directory client, if one was made."""
        if self._directory is not None:
            directory, self._directory = self._directory, None
            await directory.close()

    async def _directory_lookup(self, peer_id: str, *, refresh: bool = False) -> PeerRecord:
        """Look ``peer_id`` up in the directory (signature checked by the client), apply the
        key-change policy, and store the peer (files written in a thread, atomically)."""
        from .directory import CENTER_PEER_ID, DirectoryLookup, accept_record

        config = self._config
        settings = config.settings
        peers = config.peers
        if self._directory is None:
            center = peers.public_key(CENTER_PEER_ID)
            if center is None:
                raise DirectoryError(
                    f"cannot use the directory: no center key "
                    f"{peers.peer_pubkey_path / (CENTER_PEER_ID + PUBKEY_SUFFIX)} "
                    "(unsigned records are never trusted)")
            assert config.find_peer_info_url is not None
            self._directory = DirectoryLookup(config.find_peer_info_url, center,
                                              timeout=settings.directory_timeout)
        if refresh:
            self._directory.forget(peer_id)
        record = await self._directory.lookup(peer_id)
        if not accept_record(record, peers.public_key(peer_id),
                             allow_key_change=settings.allow_key_change):
            raise DirectoryError(f"the directory's key for {peer_id} differs from the one on "
                                 "file; refused (set allow_key_change to accept key changes)")
        known = peers.known_address(peer_id)
        if known is not None and known.updated_at is not None \
                and record.updated_at < known.updated_at:
            raise DirectoryError(f"the directory's record for {peer_id} is older than the one "
                                 "on file; refused (a replayed record?)")
        address = PeerAddress(record.peer_id, record.host, record.port, record.updated_at)
        on_file = peers.public_key(peer_id)
        if known != address or known.updated_at != address.updated_at or on_file is None \
                or not same_public_key(on_file, record.public_key):
            files = peers.files_for(address, record.public_key)
            await asyncio.to_thread(peers.write_files, files)
            peers.add(address, record.public_key, persist=False)
            log.info("learned peer %s at %s:%d from the directory (%s)", peer_id, record.host,
                     record.port, record.fingerprint)
        return record
