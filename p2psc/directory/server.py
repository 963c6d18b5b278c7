"""The directory web server (aiohttp): signed lookups, self-service updates, an HTML listing.

Endpoints (see docs/DIRECTORY.md):

* ``GET /api/get_peer_info?id=<peer_id>[&nonce=<32 hex>]`` -> the center-signed record, valid
  until its ``expires_at`` and carrying the client's nonce (404 if unknown);
  ``/api/get_peer_info.dspy`` is an alias for the original README's URL.
* ``POST /api/update_address`` -> a registered peer moves its own host/port (signed by itself).
* ``GET /`` -> a plain HTML page listing the peers, their key fingerprints and addresses.

Every error is a 4xx (or, if something unforeseen breaks, a bare 500) with a JSON body
``{"error": "..."}``; no traceback ever reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Union

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from .. import keys
from ..p2pexcept import DirectoryError, P2PError
from .backend import DirectoryBackend, SqliteBackend
from .record import (
    CENTER_PEER_ID,
    DEFAULT_RECORD_TTL,
    MAX_RECORD_TTL,
    MIN_RECORD_TTL,
    DirectorySignatureError,
    check_nonce,
    check_peer_id,
    loads_strict,
    sign_record,
    verify_record,
)
from .store import DirectoryStore, PeerEntry, ReplayError, UnknownEntryError
from .update import MAX_UPDATE_BODY, parse_update_request

log = logging.getLogger("p2psc.directory.server")

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_SKEW",
    "DEFAULT_PORT",
    "DEFAULT_RECORD_TTL",
    "LOOKUP_PATH",
    "UPDATE_PATH",
    "make_app",
    "serve",
    "start_server",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999
#: Largest clock difference accepted for an update's timestamp, in seconds.
DEFAULT_MAX_SKEW = 120
#: Most peers shown on the HTML page.
MAX_LISTED = 1000
#: Key fingerprints kept in memory for the HTML page.
SIG_CACHE_SIZE = 4096
LOOKUP_PATH = "/api/get_peer_info"
UPDATE_PATH = "/api/update_address"

_JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=_JSON_HEADERS)


class _State:
    """The center key, the clock and the backend shared by the handlers."""

    def __init__(self, backend: DirectoryBackend, center_private_key: rsa.RSAPrivateKey,
                 max_skew: int, clock: Callable[[], float], max_body: int,
                 record_ttl: int) -> None:
        self.backend = backend
        self.max_body = max_body
        self._lock = threading.Lock()
        self.key = center_private_key
        self.public_key = center_private_key.public_key()
        self.max_skew = max_skew
        self.clock = clock
        self.record_ttl = record_ttl
        #: what the HTML page shows a visitor to check against the key they were given
        self.center_fingerprint = keys.fingerprint(center_private_key)
        self._fingerprints: OrderedDict[str, str] = OrderedDict()
        self.lookups = 0  # lookups served (the tests count requests with it)
        self.signatures = 0  # records signed (RSA private-key operations)
        self.store_error_logged_at = -1e9  # monotonic time of the last database error logged

    def _fresh(self, entry: PeerEntry, rec: dict[str, Any] | None) -> bool:
        """Whether a cached record is of exactly ``entry``, nonce-less, valid for at least half
        the record TTL from now (and not longer than one TTL: a clock set back), and signed by
        this server's center key."""
        if rec is None or rec.get("nonce") is not None:
            return False
        if any(rec.get(k) != v for k, v in entry.fields().items()):
            return False
        now = int(self.clock())
        expires = rec.get("expires_at")
        if not (isinstance(expires, int) and
                now + self.record_ttl // 2 <= expires <= now + self.record_ttl):
            return False
        # signed by this server's key: the cache may be a database table, which outlives a
        # change of center key and is shared with other servers (one may have another key)
        try:
            verify_record(self.public_key, rec, entry.peer_id, nonce=None, now=now)
        except DirectoryError:
            return False
        return True

    def _sign(self, entry: PeerEntry, nonce: str | None) -> dict[str, Any]:
        rec = sign_record(self.key, {**entry.fields(),
                                     "expires_at": int(self.clock()) + self.record_ttl,
                                     "nonce": nonce})
        with self._lock:
            self.signatures += 1
        return rec

    async def signed(self, entry: PeerEntry, nonce: str | None = None,
                     cached: dict[str, Any] | None = None) -> dict[str, Any]:
        """The signed record of ``entry``, valid from now for at least half the record TTL.

        With a ``nonce`` the record is signed for this request (one RSA private-key operation).
        Without one, ``cached`` (the backend's cached record) is returned if it is of this
        entry and has at least ``record_ttl / 2`` seconds left; otherwise the record is signed
        anew with ``expires_at = now + record_ttl`` and cached in the backend. Signing runs in
        a worker thread (OpenSSL releases the GIL, so signatures use every core).
        """
        if cached is not None and nonce is None and self._fresh(entry, cached):
            return cached
        rec = await asyncio.to_thread(self._sign, entry, nonce)
        if nonce is None:
            await self.backend.cache_record(entry, rec)
        return rec

    async def lookup(self, peer_id: str, nonce: str | None) -> dict[str, Any] | None:
        found = await self.backend.lookup(peer_id)
        if found is None:
            return None
        entry, cached = found
        return await self.signed(entry, nonce, cached)

    def fingerprint(self, pubkey_pem: str) -> str:
        with self._lock:
            fp = self._fingerprints.get(pubkey_pem)
        if fp is None:
            try:
                fp = keys.fingerprint(keys.parse_public_key(pubkey_pem.encode("ascii")))
            except (P2PError, UnicodeEncodeError):
                fp = "(unreadable key)"
            with self._lock:
                self._fingerprints[pubkey_pem] = fp
                while len(self._fingerprints) > SIG_CACHE_SIZE:
                    self._fingerprints.popitem(last=False)
        return fp

    async def listing(self) -> tuple[list[tuple[PeerEntry, str]], int]:
        entries = await self.backend.list(limit=MAX_LISTED)
        total = await self.backend.count()
        listed = await asyncio.to_thread(lambda: [(e, self.fingerprint(e.pubkey))
                                                  for e in entries])
        return listed, total


STATE_KEY = web.AppKey("p2psc_directory_state", _State)
#: Seconds between purges of expired update nonces (every server process purges).
NONCE_PURGE_INTERVAL = 60.0


async def _purge_nonces(app: web.Application) -> AsyncIterator[None]:
    """Delete expired nonces now and then, so that the table holds only live ones."""
    state = app[STATE_KEY]

    async def purge_forever() -> None:
        while True:
            await asyncio.sleep(NONCE_PURGE_INTERVAL)
            try:
                n = await state.backend.purge_nonces(int(state.clock()))
            except DirectoryError as exc:
                log.warning("directory: purging expired nonces failed: %s", exc)
            else:
                if n:
                    log.debug("directory: purged %d expired nonces", n)

    task = asyncio.create_task(purge_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@web.middleware
async def _json_errors(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """Turn every error into a JSON body: HTTP errors keep their status, unforeseen ones are 500."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason or "error"
        if exc.status == 413:
            reason = f"request body too large (limit {request.app[STATE_KEY].max_body} bytes)"
        return _error(exc.status, reason)
    except asyncio.CancelledError:
        raise
    except DirectoryError as exc:  # a database failure (busy, down, timed out, disk full, ...)
        _log_store_error(request, exc)
        resp = _error(503, "directory database unavailable, try again shortly")
        resp.headers["Retry-After"] = "1"
        return resp
    except Exception:
        log.exception("directory: unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal error")


def _log_store_error(request: web.Request, exc: DirectoryError) -> None:
    """Log a database failure: at most one line a second while the database is down."""
    state = request.app[STATE_KEY]
    now = time.monotonic()
    if now - state.store_error_logged_at >= 1.0:
        state.store_error_logged_at = now
        log.error("directory: %s %s failed: %s", request.method, request.path, exc)


async def _get_peer_info(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    ids = request.query.getall("id", [])
    if len(ids) != 1:
        return _error(400, "give exactly one id parameter")
    nonces = request.query.getall("nonce", [])
    if len(nonces) > 1:
        return _error(400, "give at most one nonce parameter")
    try:
        peer_id = check_peer_id(ids[0], "id")
        nonce = check_nonce(nonces[0]) if nonces else None
    except DirectoryError as exc:
        return _error(400, str(exc))
    state.lookups += 1
    rec = await state.lookup(peer_id, nonce)
    if rec is None:
        return _error(404, f"unknown peer {peer_id!r}")
    return web.json_response(rec, headers=_JSON_HEADERS)


async def _update_address(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if request.content_length is not None and request.content_length > MAX_UPDATE_BODY:
        return _error(413, f"request body too large (limit {MAX_UPDATE_BODY} bytes)")
    body = await request.read()  # bounded by client_max_size (413 beyond it)
    try:
        req = parse_update_request(loads_strict(body, MAX_UPDATE_BODY, "update request"))
    except DirectoryError as exc:
        status = 413 if len(body) > MAX_UPDATE_BODY else 400
        return _error(status, str(exc))
    now = int(state.clock())
    if abs(req.timestamp - now) > state.max_skew:
        return _error(400, f"stale or future timestamp (allowed clock difference "
                           f"{state.max_skew} s)")
    entry = await state.backend.get(req.peer_id)
    if entry is None:
        return _error(404, f"unknown peer {req.peer_id!r}")
    try:
        req.verify(keys.parse_public_key(entry.pubkey.encode("ascii")))
    except DirectorySignatureError:
        log.warning("directory: update for %s with a bad signature refused", req.peer_id)
        return _error(403, "signature does not verify with the peer's registered key")
    try:
        new = await state.backend.update_address(
            req.peer_id, req.host, req.port, updated_at=now, nonce=req.nonce,
            nonce_expires_at=max(req.timestamp, now) + state.max_skew + 1,
            timestamp=req.timestamp)
    except ReplayError as exc:  # a nonce seen before, or a timestamp not newer than the last
        log.warning("directory: update for %s refused: %s", req.peer_id, exc)
        return _error(409, str(exc))
    except UnknownEntryError:  # removed between the two statements
        return _error(404, f"unknown peer {req.peer_id!r}")
    rec = await state.signed(new, req.nonce)  # the answer carries the request's nonce
    return web.json_response(rec, headers=_JSON_HEADERS)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>p2psc peer directory</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 12px;text-align:left}}
code{{font-size:90%}}</style></head>
<body><h1>p2psc peer directory</h1>
<p>Center key fingerprint: <code>{center_fp}</code> (compare it with
<code>p2psc fingerprint --pubkey p2psc_center.pubkey.pem</code> before trusting this directory)</p>
<p>{summary}</p>
<table><thead><tr><th>peer id</th><th>key fingerprint</th><th>address</th><th>updated (UTC)</th>
</tr></thead><tbody>
{rows}
</tbody></table>
<p>Lookups: <code>GET {lookup}?id=PEER_ID&amp;nonce=32_HEX_DIGITS</code> returns the record
signed by the center key (<code>{center}</code>), valid for {ttl} s.</p>
</body></html>
"""


def _utc(ts: object) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


async def _index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    listed, total = await state.listing()
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(entry.peer_id)}</td><td><code>{e(fp)}</code></td>"
        f"<td>{e(entry.host)}:{entry.port:d}</td>"
        f"<td>{e(_utc(entry.updated_at))}</td></tr>"
        for entry, fp in listed)
    summary = f"{total:d} registered peer{'s' if total != 1 else ''}"
    if total > len(listed):
        summary += f" (the first {len(listed):d} are shown)"
    page = _PAGE.format(summary=e(summary), rows=rows, lookup=e(LOOKUP_PATH),
                        center=e(CENTER_PEER_ID), ttl=state.record_ttl,
                        center_fp=e(state.center_fingerprint))
    return web.Response(text=page, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


#: What :func:`make_app` and :func:`serve` store in: an async backend, or an SQLite store
#: (run in worker threads).
StoreLike = Union[DirectoryBackend, DirectoryStore]


def _backend(store: StoreLike) -> DirectoryBackend:
    return SqliteBackend(store) if isinstance(store, DirectoryStore) else store


def make_app(store: StoreLike, center_private_key: rsa.RSAPrivateKey, *,
             max_skew: int = DEFAULT_MAX_SKEW, clock: Callable[[], float] = time.time,
             client_max_size: int = MAX_UPDATE_BODY,
             record_ttl: int = DEFAULT_RECORD_TTL) -> web.Application:
    """Build the directory web application.

    ``store`` holds the peers (a :class:`~.backend.DirectoryBackend`, e.g. PostgreSQL, or an
    SQLite :class:`~.store.DirectoryStore`); ``center_private_key`` signs every record; ``max_skew`` bounds
    the clock difference accepted on update timestamps; ``clock`` (unix seconds) is injectable
    for tests; ``client_max_size`` caps request bodies (aiohttp answers 413 beyond it, before
    buffering); ``record_ttl`` is the validity of a signed record in seconds
    (:data:`MIN_RECORD_TTL` .. :data:`MAX_RECORD_TTL`; :class:`DirectoryError` otherwise).
    ``app[STATE_KEY].lookups`` counts lookup requests, ``.signatures`` records signed.
    """
    if isinstance(record_ttl, bool) or not isinstance(record_ttl, int) \
            or not MIN_RECORD_TTL <= record_ttl <= MAX_RECORD_TTL:
        raise DirectoryError(f"record TTL must be a whole number of seconds from "
                             f"{MIN_RECORD_TTL} to {MAX_RECORD_TTL}, not {record_ttl!r}")
    app = web.Application(middlewares=[_json_errors], client_max_size=client_max_size)
    app[STATE_KEY] = _State(_backend(store), center_private_key, max_skew, clock, client_max_size,
                            record_ttl)
    app.router.add_get(LOOKUP_PATH, _get_peer_info)
    app.router.add_get(LOOKUP_PATH + ".dspy", _get_peer_info)
    app.router.add_post(UPDATE_PATH, _update_address)
    app.router.add_get("/", _index)
    app.cleanup_ctx.append(_purge_nonces)
    return app


async def start_server(app: web.Application, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                       *, shutdown_timeout: float = 5.0,
                       reuse_port: bool = False) -> tuple[web.AppRunner, int]:
    """Start ``app`` on ``host:port`` (``port=0`` picks a free one) inside the running loop;
    with ``reuse_port`` the socket has SO_REUSEPORT, so that several processes share the port.

    Returns the runner (``await runner.cleanup()`` stops it, waiting at most
    ``shutdown_timeout`` seconds for requests in progress) and the bound port.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, bound


async def serve(store: StoreLike, center_private_key: rsa.RSAPrivateKey, *,
                host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                max_skew: int = DEFAULT_MAX_SKEW, ready: Callable[[int], None] | None = None,
                record_ttl: int = DEFAULT_RECORD_TTL, reuse_port: bool = False) -> None:
    """Run the directory server until cancelled; ``ready(port)`` is called once it listens.
    ``reuse_port``: share the port with other processes (SO_REUSEPORT, ``--workers``)."""
    runner, bound = await start_server(make_app(store, center_private_key, max_skew=max_skew,
                                                record_ttl=record_ttl), host, port,
                                       reuse_port=reuse_port)
    log.info("directory: serving on http://%s:%d/ (center key %s)", host, bound,
             keys.fingerprint(center_private_key))
    try:
        if ready is not None:
            ready(bound)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()

