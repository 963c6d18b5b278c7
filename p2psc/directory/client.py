"""The directory client: signed lookups, self-service updates, a merging lookup cache, the
key-change policy, and :func:`save_peer`, which stores a looked-up peer into the key folder
and the known peers file (through :mod:`p2psc.config`, their one reader and writer).

:class:`P2PHandler` (``find_peer_info_url`` set) uses :func:`directory_lookup_for` and
:func:`learn_peer` (the trust policy: signature, nonce, expiry, key change, rollback, and
retiring a cached key the directory no longer vouches for) with its in-memory peer store.
Code without a handler can do::

    center = keys.load_public_key(Path(peer_pubkey_path) / "p2psc_center.pubkey.pem")
    lookup = DirectoryLookup(find_peer_info_url, center, timeout=5.0, negative_ttl=30.0)
    rec = await lookup.lookup(peer_id)           # DirectoryError on any failure (fresh nonce,
                                                 # signature and expiry checked)
    ok = await asyncio.to_thread(save_peer, rec, peer_pubkey_path, known_peers_file,
                                 allow_key_change=config_allows_it)
    if not ok: refuse the peer (its key changed, or the record is older than the one on file)
    ...
    await lookup.close()                         # when done

Every failure is a :class:`DirectoryError` (a 404 is :class:`PeerNotInDirectory`, also an
:class:`UnknownPeerError`; a bad signature is :class:`DirectorySignatureError`, which is not a
:class:`SignCheckError`: that one is a handshake failure). Nothing unverified is ever returned.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import aiohttp
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from .. import keys
from ..config import (
    PeerAddress,
    PeerConfig,
    PeerStore,
    peer_files,
    read_known_peers,
    read_public_key,
    write_peer_files,
)
from ..p2pexcept import (
    ConfigError,
    DirectoryError,
    DirectoryUnreachable,
    NotADirectory,
    PeerNotInDirectory,
    os_reason,
)
from .record import (
    CENTER_PEER_ID,
    MAX_RECORD_BODY,
    NONCE_BYTES,
    DirectorySignatureError,
    PeerRecord,
    check_nonce,
    check_peer_id,
    loads_strict,
    verify_record,
)
from .update import make_update_request

log = logging.getLogger("p2psc.directory")

__all__ = [
    "DEFAULT_TIMEOUT",
    "DirectoryLookup",
    "DirectorySignatureError",
    "PeerNotInDirectory",
    "PeerRecord",
    "accept_record",
    "directory_lookup_for",
    "fetch_peer_record",
    "learn_peer",
    "save_peer",
    "update_address",
    "update_url_for",
]

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_TIMEOUT = 5.0


def _check_url(url: str | URL) -> URL:
    try:
        u = URL(url)
    except (TypeError, ValueError):
        raise DirectoryError(f"invalid directory URL {url!r}") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise DirectoryError(f"directory URL must be http:// or https://, not {str(url)!r}")
    return u


def update_url_for(lookup_url: str) -> str:
    """The update endpoint next to a lookup URL: ``.../api/get_peer_info[.dspy]`` becomes
    ``.../api/update_address``; a bare ``http://host:port[/]`` gets ``/api/update_address``."""
    u = _check_url(lookup_url).with_query(None).with_fragment(None)
    name = u.name
    if name in ("get_peer_info", "get_peer_info.dspy"):
        return str(u.parent / "update_address")
    if u.path in ("", "/"):
        return str(u.with_path("/api/update_address"))
    raise DirectoryError(f"cannot derive the update URL from {lookup_url!r}; give it explicitly")


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a response body of at most ``limit`` bytes (checked before buffering more)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise DirectoryError(f"directory response too large ({resp.content_length} bytes)")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise DirectoryError(f"directory response larger than {limit} bytes")
        chunks.append(chunk)


def _error_message(body: bytes) -> str:
    try:
        msg = json.loads(body.decode("utf-8", "replace")).get("error")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return f": {msg[:200]}" if isinstance(msg, str) else ""


async def _request(method: str, url: URL, *, timeout: float, session: aiohttp.ClientSession | None,
                   json_body: Any = None) -> tuple[int, bytes]:
    """One HTTP exchange, all of it (connect, send, read) bounded by ``timeout``."""
    async def go(s: aiohttp.ClientSession) -> tuple[int, bytes]:
        async with s.request(method, url, json=json_body, allow_redirects=False,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            return resp.status, await _read_limited(resp, MAX_RECORD_BODY)

    async def run() -> tuple[int, bytes]:
        if session is not None:
            return await go(session)
        async with aiohttp.ClientSession() as s:
            return await go(s)

    where = str(url.with_query(None).with_fragment(None))
    try:
        return await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError:
        raise DirectoryUnreachable(f"the directory at {where} did not answer within "
                                   f"{timeout:g} s") from None
    except aiohttp.ClientConnectorError as exc:
        raise DirectoryUnreachable(f"cannot reach the directory at {where}: "
                                   f"{_reason(exc.os_error, url)}") from None
    except aiohttp.ClientError as exc:
        raise DirectoryUnreachable(f"cannot reach the directory at {where}: "
                                   f"{_client_error_text(exc)}") from None
    except OSError as exc:
        raise DirectoryUnreachable(f"cannot reach the directory at {where}: "
                                   f"{_reason(exc, url)}") from None


def _reason(exc: OSError, url: URL) -> str:
    """Why a connection failed, in words ("connection refused", "cannot resolve HOST: ...")."""
    if isinstance(exc, socket.gaierror) or (exc.errno is not None and exc.errno < 0):
        return f"cannot resolve {url.host}: {os_reason(exc)}"
    text = os_reason(exc)
    return text[:1].lower() + text[1:]


def _client_error_text(exc: aiohttp.ClientError) -> str:
    """aiohttp's error without its class names and internals."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"malformed HTTP answer ({exc.message})"
    return " ".join(str(exc).split()) or type(exc).__name__


def _not_a_directory(url: URL, status: int, body: bytes) -> NotADirectory | None:
    """:class:`NotADirectory` when the answer is not a p2psc directory's (whose every answer,
    errors included, is a JSON object), else None."""
    try:
        ok = isinstance(json.loads(body.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        ok = False
    if ok:
        return None
    where = str(url.with_query(None).with_fragment(None))
    what = "not JSON" if status == 200 else f"HTTP {status}, not JSON"
    return NotADirectory(f"{where} did not answer as a p2psc directory ({what}); is the URL "
                         "right? (a lookup URL ends in /api/get_peer_info)")


async def fetch_peer_record(url: str, peer_id: str, center_public_key: rsa.RSAPublicKey, *,
                            timeout: float = DEFAULT_TIMEOUT,
                            session: aiohttp.ClientSession | None = None,
                            nonce: str | None = None,
                            clock: Callable[[], float] = time.time) -> PeerRecord:
    """Look ``peer_id`` up at the lookup URL (``find_peer_info_url``) and verify the record.

    Sends ``GET url?id=peer_id&nonce=N`` (no redirects followed), bounded by ``timeout``
    seconds in total, with a fresh random nonce ``N`` (16 bytes as 32 hex digits; ``nonce``
    gives it, for tests), and checks the center's signature with ``center_public_key``, that
    the record's signed nonce is ``N`` and that it has not expired at ``clock()`` (unix
    seconds; see :func:`~p2psc.directory.record.verify_record`).

    Raises :class:`PeerNotInDirectory` on 404, :class:`DirectorySignatureError` when the
    signature does not verify, and :class:`DirectoryError` when the directory is down, slow,
    answers another status, or sends a malformed, oversized, other-peer, expired or replayed
    (other nonce) record.
    """
    peer_id = check_peer_id(peer_id)
    nonce = check_nonce(secrets.token_hex(NONCE_BYTES) if nonce is None else nonce)
    u = _check_url(url).update_query(id=peer_id, nonce=nonce)
    status, body = await _request("GET", u, timeout=timeout, session=session)
    wrong = _not_a_directory(u, status, body)
    if wrong is not None:
        raise wrong
    if status == 404:
        raise PeerNotInDirectory(f"the directory does not know peer {peer_id!r}")
    if status != 200:
        raise DirectoryError(f"directory answered HTTP {status} for peer {peer_id!r}"
                             f"{_error_message(body)}")
    return verify_record(center_public_key, body, peer_id, nonce=nonce, now=clock())


async def update_address(url: str, peer_id: str, private_key: rsa.RSAPrivateKey, host: str,
                         port: int, *, timeout: float = DEFAULT_TIMEOUT,
                         center_public_key: rsa.RSAPublicKey | None = None,
                         session: aiohttp.ClientSession | None = None) -> dict[str, Any]:
    """Move this peer's directory entry to ``host:port`` (self-service, signed with its own key).

    ``url`` is the update endpoint (``.../api/update_address``; see :func:`update_url_for`).
    Returns the new record as JSON; with ``center_public_key`` it is verified first, with the
    update request's nonce, which the server signs into it (and returned as its
    :meth:`PeerRecord.to_dict`). Raises :class:`DirectoryError` when the directory refuses
    (bad signature, stale timestamp, replay, out of order, unknown peer) or cannot be reached.
    """
    req = make_update_request(peer_id, private_key, host, port)
    u = _check_url(url)
    status, body = await _request("POST", u, timeout=timeout, session=session, json_body=req)
    wrong = _not_a_directory(u, status, body)
    if wrong is not None:
        raise wrong
    if status == 404:
        raise PeerNotInDirectory(f"the directory does not know peer {peer_id!r}"
                                 f"{_error_message(body)}")
    if status != 200:
        raise DirectoryError(f"directory refused the address update (HTTP {status})"
                             f"{_error_message(body)}")
    if center_public_key is not None:
        return verify_record(center_public_key, body, peer_id, nonce=req["nonce"]).to_dict()
    return loads_strict(body, MAX_RECORD_BODY, "directory response")


class DirectoryLookup:
    """Directory lookups for a handler: merged, bounded, with a short negative cache.

    * Concurrent :meth:`lookup` calls for the same peer id share one HTTP request.
    * At most ``max_concurrent`` requests run at once; beyond ``max_pending`` distinct peer ids
      waiting, new lookups fail at once (a flood of INITs from strangers cannot queue forever).
    * A failure (any :class:`DirectoryError`) is remembered for ``negative_ttl`` seconds and
      re-raised without asking the directory again; :meth:`forget` drops it.
    * Successes are not cached: store them with :func:`save_peer`.
    * Every request carries a fresh nonce, and records are checked against ``wall_clock``
      (unix seconds) for expiry (see :func:`fetch_peer_record`).

    ``session`` (an :class:`aiohttp.ClientSession`) is used if given, else one is created on
    first use and closed by :meth:`close`. Must be used from a single event loop. ``clock``
    (monotonic) times the negative cache.
    """

    def __init__(self, url: str, center_public_key: rsa.RSAPublicKey, *,
                 timeout: float = DEFAULT_TIMEOUT, negative_ttl: float = 30.0,
                 max_concurrent: int = 8, max_pending: int = 256, max_negative: int = 4096,
                 session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        _check_url(url)
        self.url = url
        self.center_public_key = center_public_key
        self.timeout = timeout
        self.negative_ttl = negative_ttl
        self.max_pending = max_pending
        self.max_negative = max_negative
        self._clock = clock
        self.wall_clock = wall_clock
        self._session = session
        self._own_session = session is None
        self._sem = asyncio.Semaphore(max_concurrent)
        self._inflight: dict[str, asyncio.Task[PeerRecord]] = {}
        self._failed: dict[str, tuple[float, DirectoryError]] = {}
        self.requests = 0  # HTTP requests actually sent

    async def lookup(self, peer_id: str) -> PeerRecord:
        """The verified record of ``peer_id``; raises :class:`DirectoryError` (see the module)."""
        peer_id = check_peer_id(peer_id)
        cached = self._failed.get(peer_id)
        if cached is not None:
            left = cached[0] - self._clock()
            if left > 0:
                err = cached[1]
                raise type(err)(f"{err} (a cached failure: not retried for another "
                                f"{math.ceil(left):d} s)")
            del self._failed[peer_id]
        task = self._inflight.get(peer_id)
        if task is None:
            if len(self._inflight) >= self.max_pending:
                raise DirectoryError(f"too many directory lookups in progress; "
                                     f"not looking up {peer_id!r}")
            task = asyncio.get_running_loop().create_task(self._fetch(peer_id))
            self._inflight[peer_id] = task
            task.add_done_callback(functools.partial(self._done, peer_id))
        # shield: a cancelled waiter does not cancel the lookup other waiters share.
        return await asyncio.shield(task)

    def _done(self, peer_id: str, task: asyncio.Task[PeerRecord]) -> None:
        if self._inflight.get(peer_id) is task:
            del self._inflight[peer_id]
        if task.cancelled():
            return
        exc = task.exception()  # also marks it retrieved when no waiter is left
        if isinstance(exc, DirectoryError) and self.negative_ttl > 0:
            if len(self._failed) >= self.max_negative:
                self._expire()
            if len(self._failed) >= self.max_negative:
                self._failed.pop(next(iter(self._failed)))
            self._failed[peer_id] = (self._clock() + self.negative_ttl, exc)

    def _expire(self) -> None:
        now = self._clock()
        for pid in [p for p, (exp, _) in self._failed.items() if exp <= now]:
            del self._failed[pid]

    async def _fetch(self, peer_id: str) -> PeerRecord:
        async with self._sem:
            if self._session is None:
                self._session = aiohttp.ClientSession()
            self.requests += 1
            try:
                return await fetch_peer_record(self.url, peer_id, self.center_public_key,
                                               timeout=self.timeout, session=self._session,
                                               clock=self.wall_clock)
            except DirectoryError as exc:
                if self.negative_ttl > 0:
                    log.warning("directory lookup of %s failed: %s; not retried for %g s",
                                peer_id, exc, self.negative_ttl)
                else:
                    log.warning("directory lookup of %s failed: %s", peer_id, exc)
                raise

    def forget(self, peer_id: str | None = None) -> None:
        """Drop the cached failure of ``peer_id`` (of every peer when ``None``)."""
        if peer_id is None:
            self._failed.clear()
        else:
            self._failed.pop(peer_id, None)

    async def close(self) -> None:
        """Cancel lookups in progress and close the session this object created."""
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> DirectoryLookup:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def accept_record(record: PeerRecord, current_key: rsa.RSAPublicKey | None, *,
                  allow_key_change: bool = False) -> bool:
    """Decide whether a verified record may be used, given the key already known for the peer.

    ``True`` when no key is known (``current_key is None``) or it is the same key. A different
    key is refused (``False``, logged at ERROR) unless ``allow_key_change``, in which case it is
    accepted and logged at WARNING. A record for ``p2psc_center`` with another key is always
    refused. Logs show fingerprints only. Non-blocking: usable on the event loop together with
    the handler's in-memory peer store (e.g. ``PeerStore.public_key`` / ``PeerStore.add``).
    """
    if current_key is None or keys.same_public_key(current_key, record.public_key):
        return True
    if record.peer_id == CENTER_PEER_ID:
        log.error("directory: REFUSED a record replacing the center key (%s) by %s; the center "
                  "key is never changed from the directory", keys.fingerprint(current_key),
                  record.fingerprint)
        return False
    if not allow_key_change:
        log.error("directory: REFUSED a KEY CHANGE for peer %s: on file %s, directory says %s. "
                  "If the peer really changed its key, set allow_key_change or replace its "
                  "public key file by hand.", record.peer_id, keys.fingerprint(current_key),
                  record.fingerprint)
        return False
    log.warning("directory: KEY CHANGE ACCEPTED for peer %s (allow_key_change): was %s, now %s",
                record.peer_id, keys.fingerprint(current_key), record.fingerprint)
    return True


def _address_of(record: PeerRecord) -> PeerAddress:
    """The known-peers entry of a verified record (with its time and its validity)."""
    return PeerAddress(record.peer_id, record.host, record.port, record.updated_at,
                       record.expires_at)


def directory_lookup_for(config: PeerConfig) -> DirectoryLookup:
    """The :class:`DirectoryLookup` of a peer (a handler): ``find_peer_info_url``, the center
    key from ``peer_pubkey_path`` (:class:`DirectoryError` if there is none: unsigned records
    are never trusted), ``directory_timeout``, and the peer store's clock for record expiry."""
    peers = config.peers
    center = peers.pinned_key(CENTER_PEER_ID)
    if center is None:
        raise DirectoryError(
            f"cannot use the directory: no center key "
            f"{peers.peer_pubkey_path / (CENTER_PEER_ID + keys.PUBKEY_SUFFIX)} "
            "(unsigned records are never trusted)")
    if config.find_peer_info_url is None:
        raise DirectoryError("cannot use the directory: no find_peer_info_url")
    return DirectoryLookup(config.find_peer_info_url, center,
                           timeout=config.settings.directory_timeout,
                           wall_clock=lambda: peers.clock())


async def _store(peers: PeerStore, address: PeerAddress, key: rsa.RSAPublicKey) -> None:
    """Write the peer's files atomically (in a thread), then update the in-memory store."""
    files = peers.files_for(address, key)
    await asyncio.to_thread(peers.write_files, files)
    peers.add(address, key, persist=False)


async def _retire(peers: PeerStore, peer_id: str, why: str) -> None:
    """Mark a peer learned from the directory as expired (``expires_at`` 0, in memory and in
    the known peers file): its key is kept as the pinned key but is not used for a handshake
    until the directory vouches for the peer again. Peers added by hand are left alone."""
    known = peers.known_address(peer_id)
    key = peers.pinned_key(peer_id)
    if known is None or key is None or not known.from_directory or known.expires_at == 0:
        return
    log.warning("directory: %s: %s; its key (%s) is no longer used", peer_id, why,
                keys.fingerprint(key))
    await _store(peers, PeerAddress(peer_id, known.host, known.port, known.updated_at, 0), key)


async def learn_peer(lookup: DirectoryLookup, peers: PeerStore, peer_id: str, *,
                     allow_key_change: bool = False) -> PeerRecord:
    """Look ``peer_id`` up (a fresh nonce, signature and expiry checked), apply the trust
    policy against what ``peers`` has on file, and store the peer with the record's
    ``expires_at``. What a handler does for a peer it must (re)learn from the directory.

    * The directory no longer knows the peer (404), or vouches for another key than the
      pinned one and ``allow_key_change`` is false: the peer's directory-sourced entry is
      retired at once (its key is not used for a handshake until a record vouches for it
      again), and :class:`PeerNotInDirectory` / :class:`DirectoryError` is raised.
    * A record older (``updated_at``) than the one on file is refused (no rollback).
    * Otherwise the record is stored and returned.

    The pinned key (:meth:`PeerStore.pinned_key`) is the comparison point even when its
    record has expired. Entries added by hand are never retired.
    """
    try:
        record = await lookup.lookup(peer_id)
    except PeerNotInDirectory:
        await _retire(peers, peer_id, "the directory no longer knows this peer")
        raise
    if not accept_record(record, peers.pinned_key(peer_id), allow_key_change=allow_key_change):
        await _retire(peers, peer_id, f"the directory now vouches for another key "
                                      f"({record.fingerprint})")
        raise DirectoryError(f"the directory's key for {peer_id} differs from the one on "
                             "file; refused (set allow_key_change to accept key changes)")
    known = peers.known_address(peer_id)
    if known is not None and known.updated_at is not None \
            and record.updated_at < known.updated_at:
        raise DirectoryError(f"the directory's record for {peer_id} is older than the one "
                             "on file; refused (a replayed record?)")
    address = _address_of(record)
    on_file = peers.pinned_key(peer_id)
    if known != address or known.updated_at != address.updated_at \
            or known.expires_at != address.expires_at or on_file is None \
            or not keys.same_public_key(on_file, record.public_key):
        await _store(peers, address, record.public_key)
        log.info("learned peer %s at %s:%d from the directory (%s), valid until %d", peer_id,
                 record.host, record.port, record.fingerprint, record.expires_at)
    return record


# save_peer is blocking file I/O: call it with asyncio.to_thread. This lock serializes the
# read-modify-write of the known peers file between threads of one process.
_save_lock = threading.Lock()


def save_peer(record: PeerRecord, peer_pubkey_path: PathLike, known_peers_file: PathLike, *,
              allow_key_change: bool = False) -> bool:
    """Store a verified directory record: its key as ``<peer_pubkey_path>/<peer_id>.pubkey.pem``
    and ``{"peer_id", "host", "port", "updated_at", "expires_at"}`` under its id in
    ``known_peers_file`` (a handler does not use the key for a handshake after ``expires_at``).

    Both writes are atomic (temporary file, then rename); the key file is written first.
    Returns ``False``, writing nothing, when:

    * a different key is on file for the peer and ``allow_key_change`` is false (logged at
      ERROR level; with ``allow_key_change`` the change is accepted and logged at WARNING);
    * the record is for the reserved id ``p2psc_center`` with a key other than the one on
      file (the center key is never replaced from the directory, whatever the config);
    * the known peers file has a newer ``updated_at`` for this peer (a replayed old record).

    Blocking: call it with :func:`asyncio.to_thread` from async code. Raises
    :class:`ConfigError` when a file cannot be read or written.
    """
    if not isinstance(record, PeerRecord):
        raise TypeError("save_peer needs a verified PeerRecord (from fetch_peer_record)")
    key_dir = Path(peer_pubkey_path)
    peers_path = Path(known_peers_file)
    with _save_lock:
        old = read_public_key(key_dir, record.peer_id)
        if old is not None and not accept_record(record, old, allow_key_change=allow_key_change):
            return False
        write_key = old is None or not keys.same_public_key(old, record.public_key)
        peers = read_known_peers(peers_path, missing_ok=True)
        prev = peers.get(record.peer_id)
        if prev is not None and prev.updated_at is not None and prev.updated_at > record.updated_at:
            log.warning("directory: ignored a record for %s older than the one on file "
                        "(updated_at %d < %d)", record.peer_id, record.updated_at, prev.updated_at)
            return False
        address = _address_of(record)
        files = peer_files(key_dir, peers_path, peers, address,
                           record.public_key if write_key else None)
        try:
            if write_key:
                key_dir.mkdir(parents=True, exist_ok=True)
            write_peer_files(files)
        except OSError as exc:
            raise ConfigError(f"cannot store peer {record.peer_id!r}: "
                              f"{exc.strerror or exc}") from None
        log.info("directory: stored peer %s (%s) at %s:%d", record.peer_id, record.fingerprint,
                 record.host, record.port)
        return True
