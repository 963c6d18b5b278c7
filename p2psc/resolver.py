"""``PeerResolver``: where a peer is and which public key it has, from the known peers or the
signed directory, with the trust policy for what the directory says (key changes, rollbacks)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import rsa

from .config import PeerAddress, PeerConfig
from .keys import validate_peer_id
from .lookup_budget import LookupBudget
from .p2pexcept import ConfigError, P2PError, UnknownPeerError

if TYPE_CHECKING:
    from .directory import DirectoryLookup, PeerRecord

# the handler's logger: these are the handler's messages, as before the split
log = logging.getLogger("p2psc.p2phandler")

__all__ = ["PeerResolver"]


class PeerResolver:
    """Resolves peer ids for one peer (``config``): its known peers first, else the directory
    at ``find_peer_info_url``, whose client it owns (made on first use, closed by
    :meth:`close`). What the directory says is stored (atomically, in a thread) once checked.

    Lookups for unknown initiators are charged to the INIT's source address: a
    :class:`~p2psc.lookup_budget.LookupBudget` made from ``lookup_rate_per_addr`` and
    ``lookup_burst_per_addr`` when the first one comes."""

    #: sources (IPs, IPv6 /64s) whose lookup budgets are remembered, at most
    MAX_BUDGET_SOURCES = 4096

    def __init__(self, config: PeerConfig) -> None:
        self._config = config
        self._directory: DirectoryLookup | None = None
        self._budget: LookupBudget | None = None
        self._tasks: set[asyncio.Task[rsa.RSAPublicKey | None]] = set()

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
                                   f"(or no public key in {peers.peer_pubkey_path}, or its "
                                   "directory record expired), and no find_peer_info_url to "
                                   "look it up")
        record = await self._directory_lookup(peer_id, refresh=refresh)
        return (PeerAddress(record.peer_id, record.host, record.port, record.updated_at),
                record.public_key)

    async def lookup_unknown(self, peer_id: str, source: Any) -> rsa.RSAPublicKey | None:
        """The public key of a peer that sent an INIT from ``source`` (its address) but is not
        known: looked up in the directory when one is configured (lookups merged, failures
        cached briefly), else None.

        Nothing about such an INIT can be verified before the lookup, so each lookup is
        charged to ``source``'s budget; once that is spent (or ``lookup_burst_per_addr``
        lookups of that source are in flight) the INIT is refused: None, one INFO line, and no
        lookup. A lookup runs to its end even if the connection that asked for it goes (its
        answer is stored, and it counts as in flight until then)."""
        if self._config.find_peer_info_url is None:
            return None
        loop = asyncio.get_running_loop()
        if self._budget is None:
            s = self._config.settings
            self._budget = LookupBudget(s.lookup_rate_per_addr, s.lookup_burst_per_addr,
                                        s.lookup_burst_per_addr,
                                        max_sources=self.MAX_BUDGET_SOURCES)
        slot = self._budget.acquire(source, loop.time())
        if slot is None:
            s = self._config.settings
            log.info("refused INIT from %s at %s: that source spent its directory lookup "
                     "budget (lookup_rate_per_addr %g/s, lookup_burst_per_addr %d); not "
                     "looking the peer up", peer_id, source, s.lookup_rate_per_addr,
                     s.lookup_burst_per_addr)
            return None
        task = loop.create_task(self._lookup_key(peer_id))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._lookup_done, slot))
        return await asyncio.shield(task)

    def _lookup_done(self, slot: Hashable, task: asyncio.Task[rsa.RSAPublicKey | None]) -> None:
        self._tasks.discard(task)
        if self._budget is not None:
            self._budget.release(slot)
        if not task.cancelled():
            task.exception()  # retrieved, even when no waiter is left

    async def _lookup_key(self, peer_id: str) -> rsa.RSAPublicKey | None:
        try:
            record = await self._directory_lookup(peer_id)
        except P2PError as exc:
            log.info("directory lookup of %s failed: %s", peer_id, exc)
            return None
        return record.public_key

    async def close(self) -> None:
        """Cancel the lookups for unknown initiators in progress; close the directory client,
        if one was made."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._directory is not None:
            directory, self._directory = self._directory, None
            await directory.close()

    async def _directory_lookup(self, peer_id: str, *, refresh: bool = False) -> PeerRecord:
        """Look ``peer_id`` up in the directory and apply the trust policy (signature, nonce,
        expiry, key change, rollback, retirement; see :func:`p2psc.directory.client.learn_peer`),
        storing the peer (files written in a thread, atomically)."""
        from .directory.client import directory_lookup_for, learn_peer

        config = self._config
        if self._directory is None:
            self._directory = directory_lookup_for(config)
        if refresh:
            self._directory.forget(peer_id)
        return await learn_peer(self._directory, config.peers, peer_id,
                                allow_key_change=config.settings.allow_key_change)
