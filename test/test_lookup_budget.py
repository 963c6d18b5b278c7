"""The per-source budget of directory lookups for unknown initiators (issue 11, item 5): a
stranger's INIT triggers a directory lookup before anything can be verified, so a flood of
INITs with random ids from one source must not exhaust the lookups of others."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from test_handler_directory import Client, Echo
from conftest import PeerDir, make_peer, rsa_key, run, server_port
from p2psc import keys
from p2psc._proto.settings import Settings
from p2psc._proto.tcp import Connection, Role
from p2psc.directory import CENTER_PEER_ID
from p2psc.directory.server import STATE_KEY, make_app, start_server
from p2psc.directory.store import DirectoryStore
from p2psc.lookup_budget import LookupBudget
from p2psc.p2phandler import P2PHandler

# -- the budget itself ----------------------------------------------------------------------


def test_budget_per_ip_per_64_and_in_flight() -> None:
    b = LookupBudget(rate=1.0, burst=2, max_in_flight=2)
    one = b.acquire(("192.0.2.1", 1000), 0.0)
    two = b.acquire(("192.0.2.1", 1001), 0.0)  # the port is ignored: the same budget
    assert one is not None and two is not None
    assert b.acquire(("192.0.2.1", 1002), 0.0) is None      # two in flight
    b.release(one)
    b.release(two)
    assert b.acquire(("192.0.2.1", 1003), 0.1) is None      # no token left (0.1 refilled)
    got = b.acquire(("192.0.2.1", 1004), 1.0)               # refilled: one more
    assert got is not None and b.acquire(("192.0.2.1", 1), 1.0) is None
    b.release(got)
    assert b.acquire(("192.0.2.2", 1), 1.0) is not None     # another IP has its own
    # IPv6: one budget per /64 (scope and port ignored); an IPv4-mapped address is its IPv4
    assert b.acquire(("2001:db8::1", 1, 0, 0), 0.0) is not None
    assert b.acquire(("2001:db8::ffff:1", 2, 0, 0), 0.0) is not None
    assert b.acquire(("2001:db8::2%eth0", 3, 0, 3), 0.0) is None
    assert b.acquire(("2001:db8:0:1::1", 1, 0, 0), 0.0) is not None  # another /64
    assert b.acquire(("::ffff:192.0.2.2", 5, 0, 0), 1.0) is not None
    assert b.acquire(("192.0.2.2", 6), 1.0) is None


def test_in_flight_bound_holds_with_tokens_to_spare() -> None:
    b = LookupBudget(rate=1000.0, burst=1000, max_in_flight=3)
    slots = [b.acquire(("198.51.100.7", p), 0.0) for p in range(3)]
    assert None not in slots
    assert b.acquire(("198.51.100.7", 9), 0.0) is None
    assert b.in_flight(("198.51.100.7", 0)) == 3
    b.release(slots[0])  # type: ignore[arg-type]
    assert b.in_flight(("198.51.100.7", 0)) == 2
    assert b.acquire(("198.51.100.7", 9), 0.0) is not None


def test_bucket_table_is_bounded_least_recently_used_first() -> None:
    b = LookupBudget(rate=0.0, burst=1, max_in_flight=1, max_sources=3)
    for n in range(1, 4):
        b.release(b.acquire((f"203.0.113.{n}", 1), 0.0))  # type: ignore[arg-type]
    assert len(b) == 3
    assert b.acquire(("203.0.113.1", 1), 0.0) is None  # spent (rate 0: never refilled)
    b.release(b.acquire(("203.0.113.4", 1), 0.0))      # type: ignore[arg-type]
    assert len(b) == 3  # .2 went: the least recently used (.1 was just used)
    assert b.acquire(("203.0.113.3", 1), 0.0) is None
    assert b.acquire(("203.0.113.1", 1), 0.0) is None
    # thousands of sources: the table stays at its bound
    for n in range(5000):
        b.release(b.acquire((f"2001:db8:{n:x}::1", 1), 0.0))  # type: ignore[arg-type]
    assert len(b) == 3


# -- over real sockets: a flood from 127.0.0.2 against a slow directory -------------------

DELAY = 0.5          # the directory answers each lookup after this long
JUNK = "junk-" + "0" * 16 + ".test"  # a placeholder id, replaced by random ids of its length
FLOOD_TOTAL = 400    # INITs, each on its own connection from 127.0.0.2 ...
FLOOD_BATCH = 20     # ... sent this many every FLOOD_PERIOD seconds (2 s in all)
FLOOD_PERIOD = 0.1
STRANGER_AFTER = 300  # the registered stranger connects once this many junk INITs went out


class SlowDirectory:
    """The real directory app, with a middleware that answers each lookup after ``DELAY``
    and records which ids were looked up (and how many junk lookups ran at once)."""

    def __init__(self, tmp: Path):
        self.store = DirectoryStore(tmp / "directory.sqlite3")
        self.center = rsa_key("center")
        self.ids: list[str] = []
        self.junk_active = 0
        self.junk_peak = 0
        self.runner: Any = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/get_peer_info"

    @property
    def junk_lookups(self) -> int:
        return sum(1 for i in self.ids if i.startswith("junk-"))

    def register(self, peer: PeerDir, port: int) -> None:
        self.store.put(peer.peer_id, keys.public_key_pem(peer.key).decode(), "127.0.0.1", port)

    @web.middleware
    async def delay(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.path != "/api/get_peer_info":
            return await handler(request)
        peer_id = request.query.get("id", "")
        self.ids.append(peer_id)
        junk = peer_id.startswith("junk-")
        if junk:
            self.junk_active += 1
            self.junk_peak = max(self.junk_peak, self.junk_active)
        try:
            await asyncio.sleep(DELAY)
            return await handler(request)
        finally:
            if junk:
                self.junk_active -= 1

    async def start(self) -> SlowDirectory:
        self.app = make_app(self.store, self.center)
        self.app.middlewares.append(self.delay)
        self.runner, self.port = await start_server(self.app, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.store.close()


def junk_init_template(server: PeerDir) -> bytes:
    """One INIT record from ``JUNK`` to ``server`` (signed by a key nobody knows); the id is
    replaced per connection, so the signature never matters: it cannot be checked anyway."""
    now = time.monotonic()
    conn = Connection(Role.INITIATOR, JUNK, rsa_key("mallory"), Settings(),
                      peer_id=server.peer_id, peer_public_key=server.key.public_key(), now=now,
                      wall_offset=time.time() - now)
    conn.initiate()
    record = b"".join(conn.data_to_send())
    assert record.count(JUNK.encode()) == 1
    return record


def test_flood_of_unknown_ids_from_one_source_does_not_starve_a_registered_stranger(
        tmp_path: Path, caplog: Any) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    stranger_dir = make_peer(tmp_path, "stranger.test")  # registered; the server never heard of it
    template = junk_init_template(server_dir)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        directory = await SlowDirectory(tmp_path).start()
        server_dir.update_conf(find_peer_info_url=directory.url, directory_timeout=5.0)
        (server_dir.pubkeys / f"{CENTER_PEER_ID}.pubkey.pem").write_bytes(
            keys.public_key_pem(directory.center))
        server = P2PHandler(workdir=server_dir.workdir)
        stranger: P2PHandler | None = None
        readers: list[asyncio.StreamReader] = []
        writers: list[asyncio.StreamWriter] = []
        try:
            await server.run_as_server(ProtocolClass=Echo)
            port = server_port(server)
            directory.register(server_dir, port)
            directory.register(stranger_dir, 1)
            stranger_dir.know(server_dir, port=port)  # the stranger knows where the server is
            stranger = P2PHandler(workdir=stranger_dir.workdir)
            stranger_ready = asyncio.Event()

            async def flood() -> float:
                start = loop.time()
                sent = 0
                while sent < FLOOD_TOTAL and loop.time() - start < 10:
                    for _ in range(FLOOD_BATCH):
                        r, w = await asyncio.wait_for(asyncio.open_connection(
                            "127.0.0.1", port, local_addr=("127.0.0.2", 0)), 2)
                        readers.append(r)
                        writers.append(w)
                        junk_id = ("junk-" + os.urandom(8).hex() + ".test").encode()
                        w.write(template.replace(JUNK.encode(), junk_id))
                        sent += 1
                    if sent >= STRANGER_AFTER:
                        stranger_ready.set()
                    await asyncio.sleep(FLOOD_PERIOD)
                return start

            async def stranger_connects() -> bytes:
                await asyncio.wait_for(stranger_ready.wait(), 10)
                assert stranger is not None
                _, proto = await asyncio.wait_for(
                    stranger.connect_peer("server.test", ProtocolClass=Client), 5)
                await asyncio.wait_for(proto.wait_handshaked(), 5)
                proto.send(b"hello, I am registered")
                return await asyncio.wait_for(proto.got, 5)  # type: ignore[no-any-return]

            with caplog.at_level(logging.INFO, logger="p2psc"):
                flood_task = loop.create_task(flood())
                try:
                    reply = await stranger_connects()
                finally:
                    start = await flood_task
            assert reply == b"recv:hello, I am registered"
            assert "stranger.test" in directory.ids
            # the server closes every junk connection, refused at once or after its lookup:
            # then every lookup the flood caused has been made
            await asyncio.wait_for(asyncio.gather(*(r.read() for r in readers),
                                                  return_exceptions=True), 10)
            end = loop.time()
            assert len(readers) == FLOOD_TOTAL
            rate, burst = server.settings.lookup_rate_per_addr, server.settings.lookup_burst_per_addr
            assert 1 <= directory.junk_lookups <= burst + rate * (end - start)
            assert directory.junk_peak <= burst  # lookups in flight for one source
            refusals = [r for r in caplog.records if "lookup_burst_per_addr" in r.getMessage()]
            assert refusals and all(r.levelno == logging.INFO for r in refusals)
            assert "127.0.0.2" in refusals[0].getMessage()
        finally:
            for w in writers:
                w.close()
            if stranger is not None:
                await stranger.close()
            await server.close()
            await directory.stop()

    run(main(), timeout=30)


def test_spent_budget_refuses_without_asking_the_directory(tmp_path: Path, caplog: Any) -> None:
    """In process: the handler's lookup for an unknown initiator spends the source's budget;
    once spent, nothing is looked up and one INFO line names the source and the setting."""
    server_dir = make_peer(tmp_path, "server.test")

    async def main() -> None:
        directory = await SlowDirectory(tmp_path).start()
        server_dir.update_conf(find_peer_info_url=directory.url, lookup_burst_per_addr=3,
                               lookup_rate_per_addr=0.01)
        (server_dir.pubkeys / f"{CENTER_PEER_ID}.pubkey.pem").write_bytes(
            keys.public_key_pem(directory.center))
        server = P2PHandler(workdir=server_dir.workdir)
        try:
            source = ("127.0.0.9", 4000)
            with caplog.at_level(logging.INFO, logger="p2psc"):
                found = await asyncio.wait_for(asyncio.gather(*(
                    server.lookup_unknown_peer(f"junk-{n}.test", source) for n in range(5))), 5)
            assert found == [None] * 5
            assert directory.app[STATE_KEY].lookups == 3
            assert sorted(directory.ids) == [f"junk-{n}.test" for n in range(3)]
            refused = [r.getMessage() for r in caplog.records
                       if "lookup_burst_per_addr" in r.getMessage()]
            assert len(refused) == 2 and "127.0.0.9" in refused[0]
            # another source still has its budget
            assert await asyncio.wait_for(
                server.lookup_unknown_peer("junk-x.test", ("127.0.0.10", 1)), 5) is None
            assert directory.app[STATE_KEY].lookups == 4
        finally:
            await server.close()
            await directory.stop()

    run(main(), timeout=20)
