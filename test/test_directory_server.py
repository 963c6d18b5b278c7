"""The directory server and client end to end: a real aiohttp server on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from p2psc import keys
from p2psc.directory import (
    DirectoryLookup,
    DirectorySignatureError,
    PeerNotInDirectory,
    fetch_peer_record,
    make_update_request,
    sign_record,
    update_address,
    update_url_for,
)
from p2psc.directory.server import LOOKUP_PATH, STATE_KEY, UPDATE_PATH, make_app, start_server
from p2psc.directory.store import DirectoryStore
from p2psc.p2pexcept import (
    DirectoryError,
    DirectoryUnreachable,
    NotADirectory,
    SignCheckError,
    UnknownPeerError,
)

T = TypeVar("T")
WAIT = 10.0  # upper bound on any single wait in these tests


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(main())


@pytest.fixture(scope="module")
def k() -> dict[str, Any]:
    return {name: keys.generate_private_key(2048) for name in ("center", "alice", "bob", "mallory")}


def pem(key: Any) -> str:
    return keys.public_key_pem(key).decode("ascii")


@pytest.fixture
def store(k: dict[str, Any]) -> DirectoryStore:
    s = DirectoryStore(":memory:")
    s.put("alice", pem(k["alice"]), "127.0.0.1", 7001)
    s.put("bob", pem(k["bob"]), "localhost", 7002)
    return s


@contextlib.asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[str]:
    runner, port = await asyncio.wait_for(start_server(app, "127.0.0.1", 0), WAIT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await asyncio.wait_for(runner.cleanup(), WAIT)


@contextlib.asynccontextmanager
async def directory(store: DirectoryStore, center: Any, **kw: Any
                    ) -> AsyncIterator[tuple[web.Application, str]]:
    app = make_app(store, center, **kw)
    async with running(app) as base:
        yield app, base


async def raw(method: str, url: str, **kw: Any) -> tuple[int, str, Any]:
    """One request; returns (status, content type, parsed JSON or text)."""
    async with aiohttp.ClientSession() as s, s.request(
            method, url, timeout=aiohttp.ClientTimeout(total=WAIT), **kw) as r:
        text = await r.text()
        ctype = r.content_type
        return r.status, ctype, json.loads(text) if ctype == "application/json" else text


# -- lookups --------------------------------------------------------------------------------

def test_signed_lookup(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            rec = await fetch_peer_record(base + LOOKUP_PATH, "alice", k["center"].public_key())
            assert (rec.peer_id, rec.host, rec.port) == ("alice", "127.0.0.1", 7001)
            assert keys.same_public_key(rec.public_key, k["alice"].public_key())
            assert rec.fingerprint == keys.fingerprint(k["alice"])
            # the original README's URL works too
            rec2 = await fetch_peer_record(base + LOOKUP_PATH + ".dspy", "bob",
                                           k["center"].public_key())
            assert rec2.port == 7002
            # verified against another center key: refused
            with pytest.raises(DirectorySignatureError):
                await fetch_peer_record(base + LOOKUP_PATH, "alice", k["mallory"].public_key())
    run(go())


def test_unknown_peer_is_404_json(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            status, ctype, body = await raw("GET", base + LOOKUP_PATH + "?id=ghost")
            assert (status, ctype) == (404, "application/json") and "ghost" in body["error"]
            with pytest.raises(PeerNotInDirectory) as ei:
                await fetch_peer_record(base + LOOKUP_PATH, "ghost", k["center"].public_key())
            assert isinstance(ei.value, UnknownPeerError)
            assert isinstance(ei.value, DirectoryError)
    run(go())


def _forgeries(k: dict[str, Any]) -> dict[str, Any]:
    center, mallory = k["center"], k["mallory"]
    good = sign_record(center, {"peer_id": "alice", "pubkey": pem(k["alice"]),
                                "host": "127.0.0.1", "port": 7001, "updated_at": 1_700_000_000,
                                "expires_at": int(time.time()) + 3600, "nonce": None})
    return {
        "wrong signature": sign_record(mallory, {kk: v for kk, v in good.items() if kk != "sig"}),
        "swapped pubkey": {**good, "pubkey": pem(mallory)},
        "altered port": {**good, "port": 7999},
        "altered host": {**good, "host": "10.6.6.6"},
        "altered updated_at": {**good, "updated_at": good["updated_at"] + 1},
        "altered expires_at": {**good, "expires_at": good["expires_at"] + 86400},
        "garbage signature": {**good, "sig": "AAAA"},
    }


@pytest.mark.parametrize("kind", ["wrong signature", "swapped pubkey", "altered port",
                                  "altered host", "altered updated_at", "altered expires_at",
                                  "garbage signature"])
def test_forged_records_refused(k: dict[str, Any], kind: str) -> None:
    forged = _forgeries(k)[kind]

    async def handler(request: web.Request) -> web.Response:
        # the forger copies the client's nonce in: only the signature can catch it
        return web.json_response({**forged, "nonce": request.query["nonce"]})

    async def go() -> None:
        app = web.Application()
        app.router.add_get(LOOKUP_PATH, handler)
        async with running(app) as base:
            with pytest.raises(DirectorySignatureError) as ei:
                await fetch_peer_record(base + LOOKUP_PATH, "alice", k["center"].public_key())
            assert isinstance(ei.value, DirectoryError) and not isinstance(ei.value, SignCheckError)
    run(go())


@pytest.mark.parametrize("body", [
    b"not json", b"[1,2]", b"{}", b'{"peer_id":"alice"}', b"\xff\xfe", b"x" * 20000,
])
def test_malformed_responses_refused(k: dict[str, Any], body: bytes) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def go() -> None:
        app = web.Application()
        app.router.add_get(LOOKUP_PATH, handler)
        async with running(app) as base:
            with pytest.raises(DirectoryError):
                await fetch_peer_record(base + LOOKUP_PATH, "alice", k["center"].public_key())
    run(go())


def test_record_for_another_peer_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    """A validly signed record for bob served in answer to a lookup of alice."""
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            status, _, bob = await raw("GET", base + LOOKUP_PATH + "?id=bob")
            assert status == 200

            async def handler(request: web.Request) -> web.Response:
                return web.json_response(bob)
            app = web.Application()
            app.router.add_get(LOOKUP_PATH, handler)
            async with running(app) as evil:
                with pytest.raises(DirectoryError, match="another peer"):
                    await fetch_peer_record(evil + LOOKUP_PATH, "alice",
                                            k["center"].public_key())
    run(go())


def test_redirects_and_bad_status_are_errors(k: dict[str, Any]) -> None:
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:1/elsewhere")

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "database on fire"}, status=503)

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/r", redirect)
        app.router.add_get("/b", broken)
        async with running(app) as base:
            with pytest.raises(DirectoryError, match="HTTP 302"):
                await fetch_peer_record(base + "/r", "alice", k["center"].public_key())
            with pytest.raises(DirectoryError, match="HTTP 503.*database on fire"):
                await fetch_peer_record(base + "/b", "alice", k["center"].public_key())
    run(go())


# -- directory down or slow -----------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_directory_down_is_a_quick_directory_error(k: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}{LOOKUP_PATH}"

    async def go() -> None:
        t0 = time.monotonic()
        with pytest.raises(DirectoryUnreachable,
                           match=r"cannot reach the directory at http://127\.0\.0\.1:\d+"
                                 r"/api/get_peer_info: connection refused$"):
            await fetch_peer_record(url, "alice", k["center"].public_key(), timeout=3.0)
        assert time.monotonic() - t0 < 2.0
    run(go())


def test_directory_slow_times_out(k: dict[str, Any]) -> None:
    release = None

    async def slow(request: web.Request) -> web.Response:
        assert release is not None
        await release.wait()
        return web.json_response({})

    async def go() -> None:
        nonlocal release
        release = asyncio.Event()
        app = web.Application()
        app.router.add_get(LOOKUP_PATH, slow)
        async with running(app) as base:
            t0 = time.monotonic()
            with pytest.raises(DirectoryError, match="did not answer within 0.3 s"):
                await fetch_peer_record(base + LOOKUP_PATH, "alice", k["center"].public_key(),
                                        timeout=0.3)
            assert time.monotonic() - t0 < 2.0
            release.set()
    run(go())


# -- self-service updates -------------------------------------------------------------------

def test_update_moves_port_and_lookup_follows(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            lookup_url = base + LOOKUP_PATH
            before = await fetch_peer_record(lookup_url, "alice", k["center"].public_key())
            new = await update_address(update_url_for(lookup_url), "alice", k["alice"],
                                       "127.0.0.2", 7101, center_public_key=k["center"].public_key())
            assert (new["host"], new["port"]) == ("127.0.0.2", 7101)
            after = await fetch_peer_record(lookup_url, "alice", k["center"].public_key())
            assert (after.host, after.port) == ("127.0.0.2", 7101)
            assert after.updated_at >= before.updated_at
            assert keys.same_public_key(after.public_key, before.public_key)  # key untouched
            other = await fetch_peer_record(lookup_url, "bob", k["center"].public_key())
            assert other.port == 7002
    run(go())


def test_replayed_update_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            # signed a second earlier: updates must be newer than the last accepted one
            req = make_update_request("alice", k["alice"], "127.0.0.1", 7201,
                                      timestamp=int(time.time()) - 1)
            status, _, body = await raw("POST", base + UPDATE_PATH, json=req)
            assert status == 200 and body["port"] == 7201
            # alice moves on; an attacker replays the first request to move her back
            await update_address(base + UPDATE_PATH, "alice", k["alice"], "127.0.0.1", 7202)
            status, ctype, body = await raw("POST", base + UPDATE_PATH, json=req)
            assert (status, ctype) == (409, "application/json") and "replay" in body["error"]
            assert store.get("alice").port == 7202  # type: ignore[union-attr]
    run(go())


def test_out_of_order_update_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    """Issue 11 item 6: two signed updates, the newer delivered first; the older (delayed by
    an on-path attacker) is then refused with 409 and the address stays the newer one."""
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            now = int(time.time())
            older = make_update_request("alice", k["alice"], "10.0.0.1", 7801, timestamp=now - 10)
            newer = make_update_request("alice", k["alice"], "10.0.0.2", 7802, timestamp=now - 5)
            status, _, body = await raw("POST", base + UPDATE_PATH, json=newer)
            assert status == 200 and body["port"] == 7802
            status, ctype, body = await raw("POST", base + UPDATE_PATH, json=older)
            assert (status, ctype) == (409, "application/json"), body
            assert "not newer" in body["error"] and "out of order" in body["error"]
            entry = store.get("alice")
            assert entry is not None and (entry.host, entry.port) == ("10.0.0.2", 7802)
            assert store.last_update_ts("alice") == now - 5
    run(go())


def test_stale_and_future_timestamps_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"], max_skew=120) as (_, base):
            now = int(time.time())
            for ts in (now - 121 - 5, now + 121 + 5, 0):
                req = make_update_request("alice", k["alice"], "127.0.0.1", 7301, timestamp=ts)
                status, ctype, body = await raw("POST", base + UPDATE_PATH, json=req)
                assert (status, ctype) == (400, "application/json"), body
                assert "timestamp" in body["error"]
            assert store.get("alice").port == 7001  # type: ignore[union-attr]
            # within the window: accepted
            req = make_update_request("alice", k["alice"], "127.0.0.1", 7302, timestamp=now - 60)
            status, _, _ = await raw("POST", base + UPDATE_PATH, json=req)
            assert status == 200
    run(go())


def test_update_of_someone_elses_record_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            # bob (registered) and mallory (not) each sign an update of alice's record
            for signer in ("bob", "mallory"):
                req = make_update_request("alice", k[signer], "10.6.6.6", 6666)
                status, ctype, body = await raw("POST", base + UPDATE_PATH, json=req)
                assert (status, ctype) == (403, "application/json"), body
            # bob's own valid request with alice's id swapped in
            req = make_update_request("bob", k["bob"], "10.6.6.6", 6666)
            status, _, _ = await raw("POST", base + UPDATE_PATH, json={**req, "peer_id": "alice"})
            assert status == 403
            with pytest.raises(DirectoryError, match="HTTP 403"):
                await update_address(base + UPDATE_PATH, "alice", k["bob"], "10.6.6.6", 6666)
            assert store.get("alice").port == 7001  # type: ignore[union-attr]
            assert store.get("bob").port == 7002  # type: ignore[union-attr]
            # a tampered field breaks alice's own signature
            req = make_update_request("alice", k["alice"], "127.0.0.1", 7401)
            status, _, _ = await raw("POST", base + UPDATE_PATH, json={**req, "port": 7402})
            assert status == 403
    run(go())


def test_update_cannot_change_the_key_or_add_peers(k: dict[str, Any],
                                                   store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            req = make_update_request("alice", k["alice"], "127.0.0.1", 7501)
            status, _, body = await raw("POST", base + UPDATE_PATH,
                                        json={**req, "pubkey": pem(k["mallory"])})
            assert status == 400 and "fields" in body["error"]
            req = make_update_request("mallory", k["mallory"], "127.0.0.1", 7501)
            status, _, _ = await raw("POST", base + UPDATE_PATH, json=req)
            assert status == 404
            with pytest.raises(PeerNotInDirectory):
                await update_address(base + UPDATE_PATH, "mallory", k["mallory"], "h", 1)
            assert store.get("mallory") is None
            assert keys.same_public_key(
                keys.parse_public_key(store.get("alice").pubkey.encode()),  # type: ignore
                k["alice"].public_key())
    run(go())


# -- bad input ------------------------------------------------------------------------------

def test_bad_input_gets_4xx_json(k: dict[str, Any], store: DirectoryStore) -> None:
    good = make_update_request("alice", k["alice"], "127.0.0.1", 7601)
    posts: list[tuple[Any, int]] = [
        (b"{not json", 400),
        (b"[]", 400),
        (b'"alice"', 400),
        (b"\xff\xfe\xfd", 400),
        (json.dumps({**good, "port": True}).encode(), 400),
        (json.dumps({**good, "port": "7601"}).encode(), 400),
        (json.dumps({**good, "port": 70000}).encode(), 400),
        (json.dumps({**good, "nonce": "00"}).encode(), 400),
        (json.dumps({**good, "host": "<b>x</b>"}).encode(), 400),
        (json.dumps({**good, "peer_id": "../etc/passwd"}).encode(), 400),
        (json.dumps({**good, "sig": "***"}).encode(), 400),
        (b'{"peer_id":"alice","peer_id":"bob"}', 400),
        (b'{"port": NaN}', 400),
        (b"[" * 3000 + b"]" * 3000, 413),
        (b"x" * 100_000, 413),
    ]

    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            for body, want in posts:
                status, ctype, got = await raw("POST", base + UPDATE_PATH, data=body,
                                               headers={"Content-Type": "application/json"})
                assert (status, ctype) == (want, "application/json"), (body[:40], got)
                assert isinstance(got["error"], str) and "Traceback" not in got["error"]
            # oversized body without a Content-Length (chunked)
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(100):
                    yield b"x" * 1024
            status, ctype, got = await raw("POST", base + UPDATE_PATH, data=chunks())
            assert (status, ctype) == (413, "application/json")
            gets = [("?id=", 400), ("", 400), ("?id=a&id=b", 400), ("?id=%00", 400),
                    ("?id=" + "a" * 300, 400), ("?id=ghost", 404)]
            for query, want in gets:
                status, ctype, got = await raw("GET", base + LOOKUP_PATH + query)
                assert (status, ctype) == (want, "application/json"), (query, got)
            for method, path, want in [("GET", "/nope", 404), ("GET", UPDATE_PATH, 405),
                                       ("POST", LOOKUP_PATH, 405), ("DELETE", "/", 405)]:
                status, ctype, got = await raw(method, base + path)
                assert (status, ctype) == (want, "application/json"), (method, path, got)
            assert store.get("alice").port == 7001  # type: ignore[union-attr]
    run(go())


# -- HTML page ------------------------------------------------------------------------------

def test_html_page_lists_peers_and_escapes(k: dict[str, Any], store: DirectoryStore) -> None:
    # The store validates what it writes; bypass it to simulate a tampered database.
    store._db.execute("INSERT INTO peers (peer_id, pubkey, host, port, updated_at) "
                      "VALUES (?, ?, ?, ?, ?)",
                      ("<script>alert(1)</script>", "junk", "<img src=x onerror=y>", 1, 2**62))

    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            async with aiohttp.ClientSession() as s, s.get(
                    base + "/", timeout=aiohttp.ClientTimeout(total=WAIT)) as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert "default-src 'none'" in r.headers["Content-Security-Policy"]
                page = await r.text()
            assert "alice" in page and "bob" in page
            assert "127.0.0.1:7001" in page and "localhost:7002" in page
            assert keys.fingerprint(k["alice"]) in page and keys.fingerprint(k["bob"]) in page
            assert "<script" not in page and "<img" not in page
            assert "&lt;script&gt;" in page and "&lt;img src=x onerror=y&gt;" in page
            assert "(unreadable key)" in page
            assert "3 registered peers" in page
            # the one thing a visitor must check: the center key's fingerprint, in the format
            # of `p2psc fingerprint`
            assert f"<code>{keys.fingerprint(k['center'])}</code>" in page
    run(go())


# -- DirectoryLookup against the real server ------------------------------------------------

def test_concurrent_lookups_are_merged(k: dict[str, Any], store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (app, base):  # noqa: SIM117
            async with DirectoryLookup(base + LOOKUP_PATH, k["center"].public_key()) as dl:
                recs = await asyncio.wait_for(
                    asyncio.gather(*(dl.lookup("alice") for _ in range(20)),
                                   *(dl.lookup("bob") for _ in range(20))), WAIT)
                assert {r.peer_id for r in recs} == {"alice", "bob"}
                assert app[STATE_KEY].lookups == 2  # counted server-side
                assert dl.requests == 2
                # once finished, a new lookup asks again (successes are not cached)
                await asyncio.wait_for(dl.lookup("alice"), WAIT)
                assert app[STATE_KEY].lookups == 3
    run(go())


def test_negative_cache(k: dict[str, Any], store: DirectoryStore) -> None:
    now = [1000.0]

    async def go() -> None:
        async with directory(store, k["center"]) as (app, base):
            dl = DirectoryLookup(base + LOOKUP_PATH, k["center"].public_key(),
                                 negative_ttl=30.0, clock=lambda: now[0])
            try:
                with pytest.raises(PeerNotInDirectory):
                    await asyncio.wait_for(dl.lookup("carol"), WAIT)
                assert app[STATE_KEY].lookups == 1
                for _ in range(50):  # a stranger hammering: answered from the cache
                    with pytest.raises(PeerNotInDirectory, match="cached"):
                        await asyncio.wait_for(dl.lookup("carol"), WAIT)
                assert app[STATE_KEY].lookups == 1
                # carol registers; still cached until the TTL passes
                store.put("carol", pem(k["mallory"]), "127.0.0.1", 7700)
                now[0] += 29.0
                with pytest.raises(PeerNotInDirectory):
                    await asyncio.wait_for(dl.lookup("carol"), WAIT)
                now[0] += 2.0
                rec = await asyncio.wait_for(dl.lookup("carol"), WAIT)
                assert rec.port == 7700 and app[STATE_KEY].lookups == 2
                # forget() drops a cached failure at once
                with pytest.raises(PeerNotInDirectory):
                    await asyncio.wait_for(dl.lookup("dave"), WAIT)
                dl.forget("dave")
                with pytest.raises(PeerNotInDirectory):
                    await asyncio.wait_for(dl.lookup("dave"), WAIT)
                assert app[STATE_KEY].lookups == 4
            finally:
                await asyncio.wait_for(dl.close(), WAIT)
    run(go())


def test_lookup_when_directory_down_is_cached_and_quick(k: dict[str, Any]) -> None:
    async def go() -> None:
        async with DirectoryLookup(f"http://127.0.0.1:{_closed_port()}{LOOKUP_PATH}",
                                   k["center"].public_key(), timeout=2.0) as dl:
            t0 = time.monotonic()
            with pytest.raises(DirectoryUnreachable, match="connection refused$"):
                await dl.lookup("alice")
            with pytest.raises(DirectoryUnreachable,
                               match=r"connection refused \(a cached failure: not retried "
                                     r"for another (29|30) s\)"):
                await dl.lookup("alice")
            assert dl.requests == 1 and time.monotonic() - t0 < 2.0
    run(go())


def test_lookup_bounds_and_cancellation(k: dict[str, Any]) -> None:
    hits: list[str] = []

    async def go() -> None:
        release = asyncio.Event()

        async def slow(request: web.Request) -> web.Response:
            hits.append(request.query["id"])
            await release.wait()
            real = sign_record(k["center"], {"peer_id": "alice", "pubkey": pem(k["alice"]),
                                             "host": "127.0.0.1", "port": 1, "updated_at": 1,
                                             "expires_at": int(time.time()) + 60,
                                             "nonce": request.query["nonce"]})
            return web.json_response(real)

        app = web.Application()
        app.router.add_get(LOOKUP_PATH, slow)
        async with running(app) as base:
            dl = DirectoryLookup(base + LOOKUP_PATH, k["center"].public_key(), max_pending=2,
                                 max_concurrent=1)
            try:
                first = asyncio.ensure_future(dl.lookup("alice"))
                second = asyncio.ensure_future(dl.lookup("alice"))
                other = asyncio.ensure_future(dl.lookup("bob"))  # waits for the semaphore
                await asyncio.sleep(0.2)
                with pytest.raises(DirectoryError, match="too many"):
                    await dl.lookup("carol")
                assert hits == ["alice"]  # max_concurrent=1: bob not sent yet
                # a cancelled waiter does not cancel the shared lookup
                first.cancel()
                release.set()
                rec = await asyncio.wait_for(second, WAIT)
                assert rec.peer_id == "alice"
                with pytest.raises(DirectoryError, match="another peer"):
                    await asyncio.wait_for(other, WAIT)
                assert hits == ["alice", "bob"]
            finally:
                await asyncio.wait_for(dl.close(), WAIT)
    run(go())


def test_close_cancels_lookups_in_progress(k: dict[str, Any]) -> None:
    async def go() -> None:
        release = asyncio.Event()

        async def slow(request: web.Request) -> web.Response:
            await release.wait()
            return web.json_response({})

        app = web.Application()
        app.router.add_get(LOOKUP_PATH, slow)
        async with running(app) as base:
            dl = DirectoryLookup(base + LOOKUP_PATH, k["center"].public_key())
            waiter = asyncio.ensure_future(dl.lookup("alice"))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(dl.close(), WAIT)
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(waiter, WAIT)
            release.set()
    run(go())


# -- freshness: expiry, re-signing and the lookup nonce (issue 11 item 2) --------------------

def test_lookup_carries_the_nonce_and_a_validity_window(k: dict[str, Any],
                                                        store: DirectoryStore) -> None:
    now = [1_800_000_000.0]

    async def go() -> None:
        async with directory(store, k["center"], clock=lambda: now[0],
                             record_ttl=3600) as (_, base):
            nonce = "5a" * 16
            status, _, body = await raw("GET", base + LOOKUP_PATH + f"?id=alice&nonce={nonce}")
            assert status == 200
            assert (body["nonce"], body["expires_at"]) == (nonce, 1_800_000_000 + 3600)
            # without a nonce: a signed null nonce (such an answer satisfies no nonce lookup)
            status, _, body = await raw("GET", base + LOOKUP_PATH + "?id=alice")
            assert status == 200 and body["nonce"] is None
            for query in ("&nonce=" + "5A" * 16, "&nonce=abc", "&nonce=", "&nonce=" + "5a" * 17,
                          f"&nonce={nonce}&nonce={nonce}"):
                status, ctype, body = await raw("GET", base + LOOKUP_PATH + "?id=alice" + query)
                assert (status, ctype) == (400, "application/json"), (query, body)
                assert "nonce" in body["error"]
            # the client checks the record at the time it is given (the record's clock here)
            rec = await fetch_peer_record(base + LOOKUP_PATH, "alice", k["center"].public_key(),
                                          nonce=nonce, clock=lambda: now[0])
            assert (rec.nonce, rec.expires_at) == (nonce, 1_800_000_000 + 3600)
    run(go())


def test_server_resigns_past_the_threshold(k: dict[str, Any], store: DirectoryStore) -> None:
    """Lookups without a nonce reuse a cached signature while it is valid for at least half the
    TTL; past that, each lookup gets a record signed anew with a fresh expires_at. Lookups
    with a nonce are always signed for the request, expiring TTL from now."""
    t0 = 1_800_000_000
    now = [float(t0)]
    ttl = 3600

    async def go() -> None:
        async with directory(store, k["center"], clock=lambda: now[0],
                             record_ttl=ttl) as (app, base):
            state = app[STATE_KEY]

            async def plain() -> Any:
                status, _, body = await raw("GET", base + LOOKUP_PATH + "?id=alice")
                assert status == 200
                return body

            first = await plain()
            assert first["expires_at"] == t0 + ttl and state.signatures == 1
            now[0] = t0 + ttl // 2  # exactly half the TTL left: still served from the cache
            assert await plain() == first and state.signatures == 1
            now[0] = t0 + ttl // 2 + 1  # past the threshold: signed anew
            second = await plain()
            assert second["expires_at"] == t0 + ttl // 2 + 1 + ttl and state.signatures == 2
            assert second["sig"] != first["sig"]
            now[0] += 10
            assert await plain() == second and state.signatures == 2
            for i in range(3):  # with a nonce: a fresh signature and expiry every time
                now[0] += 1
                status, _, body = await raw(
                    "GET", base + LOOKUP_PATH + f"?id=alice&nonce={i:032x}")
                assert status == 200 and body["expires_at"] == int(now[0]) + ttl
            assert state.signatures == 5
            # a changed entry (moved, new key) is signed at once, whatever the cache holds
            store.put("alice", pem(k["bob"]), "127.0.0.9", 7009)
            moved = await plain()
            assert (moved["port"], moved["pubkey"]) == (7009, pem(k["bob"]))
    run(go())


def test_record_ttl_bounds(k: dict[str, Any], store: DirectoryStore) -> None:
    for bad in (0, 59, 7 * 86400 + 1, 1.5, True):
        with pytest.raises(DirectoryError, match="TTL"):
            make_app(store, k["center"], record_ttl=bad)  # type: ignore[arg-type]
    make_app(store, k["center"], record_ttl=60)
    make_app(store, k["center"], record_ttl=7 * 86400)


def test_replayed_old_answer_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    """An attacker who answers lookups replays a genuine, unexpired answer recorded earlier
    (for another lookup, whose nonce it carries): the client refuses it."""
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            status, _, recorded = await raw("GET", base + LOOKUP_PATH
                                            + "?id=alice&nonce=" + "11" * 16)
            assert status == 200
            # the real directory moves alice on; the attacker keeps replaying the old answer
            store.put("alice", pem(k["alice"]), "10.6.6.6", 6666)
            seen: list[str] = []

            async def replay(request: web.Request) -> web.Response:
                seen.append(request.query.get("nonce", ""))
                return web.json_response(recorded)
            app = web.Application()
            app.router.add_get(LOOKUP_PATH, replay)
            async with running(app) as evil:
                with pytest.raises(DirectoryError, match="another request") as ei:
                    await fetch_peer_record(evil + LOOKUP_PATH, "alice",
                                            k["center"].public_key())
                assert not isinstance(ei.value, DirectorySignatureError)
                async with DirectoryLookup(evil + LOOKUP_PATH, k["center"].public_key()) as dl:
                    with pytest.raises(DirectoryError, match="another request"):
                        await dl.lookup("alice")
            # each lookup sent its own fresh nonce
            assert len(seen) == 2 and len(set(seen)) == 2 and "11" * 16 not in seen
            assert all(len(n) == 32 and int(n, 16) >= 0 for n in seen)
    run(go())


def test_expired_answer_refused(k: dict[str, Any], store: DirectoryStore) -> None:
    """A record signed (for this very nonce) by a directory whose records have expired by the
    client's clock: refused. The server's and the client's clocks are both injected."""
    server_now = [1_800_000_000.0]

    async def go() -> None:
        async with directory(store, k["center"], clock=lambda: server_now[0],
                             record_ttl=3600) as (_, base):
            url = base + LOOKUP_PATH
            ok = await fetch_peer_record(url, "alice", k["center"].public_key(),
                                         clock=lambda: 1_800_000_000 + 3600 + 300)
            assert ok.expires_at == 1_800_000_000 + 3600
            with pytest.raises(DirectoryError, match="expired"):
                await fetch_peer_record(url, "alice", k["center"].public_key(),
                                        clock=lambda: 1_800_000_000 + 3600 + 301)
            async with DirectoryLookup(url, k["center"].public_key(),
                                       wall_clock=lambda: 1_900_000_000) as dl:
                with pytest.raises(DirectoryError, match="expired"):
                    await dl.lookup("alice")
    run(go())


def test_update_answer_carries_the_request_nonce(k: dict[str, Any],
                                                 store: DirectoryStore) -> None:
    async def go() -> None:
        async with directory(store, k["center"]) as (_, base):
            req = make_update_request("alice", k["alice"], "127.0.0.1", 7901,
                                      timestamp=int(time.time()) - 1)
            status, _, body = await raw("POST", base + UPDATE_PATH, json=req)
            assert status == 200 and body["nonce"] == req["nonce"]
            assert body["expires_at"] >= int(time.time()) + 86400 - 5
            new = await update_address(base + UPDATE_PATH, "alice", k["alice"], "127.0.0.1",
                                       7902, center_public_key=k["center"].public_key())
            assert new["port"] == 7902 and len(new["nonce"]) == 32
    run(go())


# -- errors a user can act on (issue 14) -----------------------------------------------------

@pytest.mark.parametrize(("status", "body", "what"), [
    (404, b"<html><body>404 Not Found</body></html>", r"HTTP 404, not JSON"),
    (200, b"<html><body>Directory listing for /</body></html>", r"not JSON"),
])
def test_a_url_that_is_not_a_directory_says_so(k: dict[str, Any], status: int, body: bytes,
                                               what: str) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="text/html")

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/", page)
        async with running(app) as base:
            with pytest.raises(NotADirectory,
                               match=rf"^{base}/ did not answer as a p2psc directory \({what}\)"):
                await fetch_peer_record(base + "/", "alice", k["center"].public_key())
    run(go())


def test_directory_name_that_does_not_resolve(k: dict[str, Any]) -> None:
    async def go() -> None:
        with pytest.raises(DirectoryUnreachable,
                           match=r"cannot reach the directory at http://nosuchhost\.invalid:9/"
                                 r"api/get_peer_info: cannot resolve nosuchhost\.invalid: "):
            await fetch_peer_record("http://nosuchhost.invalid:9" + LOOKUP_PATH, "alice",
                                    k["center"].public_key(), timeout=10.0)
    run(go())


def test_a_cached_failure_is_logged_with_how_long(k: dict[str, Any],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with DirectoryLookup(f"http://127.0.0.1:{_closed_port()}{LOOKUP_PATH}",
                                   k["center"].public_key(), timeout=2.0,
                                   negative_ttl=30.0) as dl:
            with caplog.at_level(logging.WARNING, logger="p2psc.directory"), \
                    pytest.raises(DirectoryUnreachable):
                await dl.lookup("alice")
    run(go())
    assert any("directory lookup of alice failed: cannot reach the directory" in r.message
               and r.message.endswith("; not retried for 30 s") for r in caplog.records)
