"""P2PHandler with a real directory server on 127.0.0.1 (issue 4, the client side): peers
that have never heard of each other connect by id; forged or changed keys are refused; a
moved peer is followed; a directory that is down gives a clear error and known peers still
work."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import PeerDir, dead_port, make_peer, rsa_key, run, server_port
from p2psc import keys
from p2psc.directory import CENTER_PEER_ID, update_address, update_url_for
from p2psc.directory.server import STATE_KEY, make_app, start_server
from p2psc.directory.store import DirectoryStore
from p2psc.p2p import TcpP2P
from p2psc.p2pexcept import (
    DirectoryError,
    DirectorySignatureError,
    HandshakeError,
    P2PError,
    PeerNotInDirectory,
    UnknownPeerError,
)
from p2psc.p2phandler import P2PHandler


class Echo(TcpP2P):
    def on_recv(self, data: bytes) -> None:
        self.send(b"recv:" + data)


class Client(TcpP2P):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.got = asyncio.get_running_loop().create_future()

    def on_recv(self, data: bytes) -> None:
        if not self.got.done():
            self.got.set_result(data)


class Directory:
    """A directory server on an ephemeral port, signing with the ``center`` test key
    (``clock``, unix seconds, and ``record_ttl`` are passed to the app)."""

    def __init__(self, tmp: Path, center_key_name: str = "center", **app_kw: Any):
        self.store = DirectoryStore(tmp / "directory.sqlite3")
        self.center = rsa_key(center_key_name)
        self.runner: Any = None
        self.port = 0
        self.app_kw = app_kw

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/get_peer_info"

    def register(self, peer: PeerDir, port: int) -> None:
        self.store.put(peer.peer_id, keys.public_key_pem(peer.key).decode(), "127.0.0.1", port)

    async def start(self) -> "Directory":
        self.app = make_app(self.store, self.center, **self.app_kw)
        self.runner, self.port = await start_server(self.app, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.store.close()


def use_directory(peer: PeerDir, url: str, center_key: Any = None, **settings: Any) -> None:
    """Point ``peer`` at the directory and give it the center's public key."""
    peer.update_conf(find_peer_info_url=url, directory_timeout=2.0, **settings)
    if center_key is not None:
        (peer.pubkeys / f"{CENTER_PEER_ID}.pubkey.pem").write_bytes(keys.public_key_pem(center_key))


def test_strangers_connect_by_id_through_the_directory(tmp_path: Path, loop_kind: str) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        for p in (server_dir, client_dir):
            use_directory(p, directory.url, directory.center)
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=Echo)
        directory.register(server_dir, server_port(server))
        directory.register(client_dir, 1)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        proto.send(b"hello stranger")
        assert await asyncio.wait_for(proto.got, 5) == b"recv:hello stranger"
        # both learned the other: keys and addresses stored on disk
        stored = client_dir.pubkeys / "server.test.pubkey.pem"
        assert keys.same_public_key(keys.load_public_key(stored), server_dir.key.public_key())
        peers = json.loads((client_dir.workdir / "data" / "peers.json").read_text())
        assert peers["server.test"].pop("updated_at") > 1_700_000_000  # the record's time
        # and its validity: the server's default record TTL, 24 hours
        assert abs(peers["server.test"].pop("expires_at") - (time.time() + 86400)) < 60
        assert peers["server.test"] == {"peer_id": "server.test", "host": "127.0.0.1",
                                        "port": server_port(server)}
        assert (server_dir.pubkeys / "client.test.pubkey.pem").exists()
        await client.close()
        await server.close()
        await directory.stop()

    run(main(), loop=loop_kind)


def test_record_signed_by_another_center_is_refused(tmp_path: Path) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")

    async def main() -> None:
        directory = await Directory(tmp_path, center_key_name="rogue-center").start()
        directory.register(server_dir, 4444)
        use_directory(client_dir, directory.url, rsa_key("center"))  # trusts the real center
        client = P2PHandler(workdir=client_dir.workdir)
        with pytest.raises(DirectorySignatureError):
            await client.connect_peer("server.test")
        assert not (client_dir.pubkeys / "server.test.pubkey.pem").exists()
        assert json.loads((client_dir.workdir / "data" / "peers.json").read_text()) == {}
        await client.close()
        await directory.stop()

    run(main())


def test_no_center_key_is_a_clear_error(tmp_path: Path) -> None:
    client_dir = make_peer(tmp_path, "client.test")
    use_directory(client_dir, "http://127.0.0.1:9/api/get_peer_info")

    async def main() -> None:
        client = P2PHandler(workdir=client_dir.workdir)
        with pytest.raises(DirectoryError, match="no center key"):
            await client.connect_peer("server.test")

    run(main())


def test_changed_key_is_refused_unless_allowed(tmp_path: Path, caplog: Any) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")
    old_key = rsa_key("old-server-key")

    async def main(allow: bool) -> None:
        directory = await Directory(tmp_path / str(allow)).start()
        directory.register(server_dir, 4444)
        # the client has an old key on file for server.test, but no address
        use_directory(client_dir, directory.url, directory.center, allow_key_change=allow)
        (client_dir.pubkeys / "server.test.pubkey.pem").write_bytes(keys.public_key_pem(old_key))
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            if allow:
                addr, key = await client.resolver.resolve("server.test")
                assert keys.same_public_key(key, server_dir.key.public_key())
                assert addr.port == 4444
            else:
                with pytest.raises(DirectoryError, match="differs"):
                    await client.connect_peer("server.test")
                on_file = keys.load_public_key(client_dir.pubkeys / "server.test.pubkey.pem")
                assert keys.same_public_key(on_file, old_key.public_key())
        finally:
            await client.close()
            await directory.stop()

    (tmp_path / "False").mkdir()
    (tmp_path / "True").mkdir()
    with caplog.at_level(logging.WARNING, logger="p2psc"):
        run(main(False))
        assert any("REFUSED a KEY CHANGE" in r.message for r in caplog.records)
        run(main(True))
        assert any("KEY CHANGE ACCEPTED" in r.message for r in caplog.records)


def test_moved_peer_is_followed_after_a_failed_connect(tmp_path: Path) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        for p in (server_dir, client_dir):
            use_directory(p, directory.url, directory.center)
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=Echo)
        directory.register(client_dir, 1)
        # the client knows server.test at an old address where nothing listens
        port_nobody_uses = await dead_port()
        client_dir.know(server_dir, port=port_nobody_uses)
        directory.register(server_dir, port_nobody_uses)
        # the server moves itself in the directory with a signed self-service update
        await update_address(update_url_for(directory.url), "server.test", server_dir.key,
                             "127.0.0.1", server_port(server), timeout=2)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        proto.send(b"found you")
        assert await asyncio.wait_for(proto.got, 5) == b"recv:found you"
        assert client.config.peers.address("server.test").port == server_port(server)
        await client.close()
        await server.close()
        await directory.stop()

    run(main())


def test_directory_down_is_a_clear_error_and_known_peers_still_work(pair: Any) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        port_nobody_uses = await dead_port()
        use_directory(client_dir, f"http://127.0.0.1:{port_nobody_uses}/api/get_peer_info",
                      rsa_key("center"))
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=Echo)
        client_dir.know(server_dir, port=server_port(server))
        client = P2PHandler(workdir=client_dir.workdir)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DirectoryError):
            await client.connect_peer("elsewhere.test")
        assert loop.time() - t0 < 3.0
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        proto.send(b"known peers keep working")
        assert await asyncio.wait_for(proto.got, 5) == b"recv:known peers keep working"
        await client.close()
        await server.close()

    run(main())


def test_responder_refuses_a_stranger_the_directory_does_not_know(tmp_path: Path) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    stranger = make_peer(tmp_path, "stranger.test")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        use_directory(server_dir, directory.url, directory.center)
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=Echo)
        stranger.know(server_dir, port=server_port(server))
        client = P2PHandler(workdir=stranger.workdir)
        for _ in range(3):
            _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
            with pytest.raises(HandshakeError):
                await asyncio.wait_for(proto.wait_handshaked(), 5)
        # failures are cached: three INITs from the stranger cost one directory request
        assert server.resolver.directory.requests == 1
        assert not (server_dir.pubkeys / "stranger.test.pubkey.pem").exists()
        await client.close()
        await server.close()
        await directory.stop()

    run(main())


def test_invalid_peer_id_is_refused_before_any_lookup(pair: Any) -> None:
    _, client_dir = pair

    async def main() -> None:
        client = P2PHandler(workdir=client_dir.workdir)
        with pytest.raises(UnknownPeerError):
            await client.connect_peer("../../etc/passwd")

    run(main())


def test_an_older_directory_record_is_refused(tmp_path: Path) -> None:
    """A replayed (older) signed record cannot roll a peer back to a previous address."""
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        use_directory(client_dir, directory.url, directory.center)
        directory.store.put("server.test", keys.public_key_pem(server_dir.key).decode(),
                            "127.0.0.1", 4444, updated_at=1_700_000_000)
        client = P2PHandler(workdir=client_dir.workdir)
        addr, _ = await client.resolver.resolve("server.test")
        assert (addr.port, addr.updated_at) == (4444, 1_700_000_000)
        on_file = json.loads((client_dir.workdir / "data" / "peers.json").read_text())
        assert on_file["server.test"]["updated_at"] == 1_700_000_000
        # the directory now serves an older record (as a replay would)
        directory.store.put("server.test", keys.public_key_pem(server_dir.key).decode(),
                            "127.0.0.1", 5555, updated_at=1_600_000_000)
        with pytest.raises(DirectoryError, match="older"):
            await client.resolver.resolve("server.test", refresh=True)
        assert client.config.peers.address("server.test").port == 4444
        await client.close()
        await directory.stop()

    run(main())
    # a restarted peer still knows the record's time
    again = P2PHandler(workdir=client_dir.workdir)
    assert again.config.peers.address("server.test").updated_at == 1_700_000_000


# -- expiry and revocation of directory-sourced keys (issue 11 item 2) ------------------------
# Time is injected: the directory's clock (make_app(clock=...)) and the peer's
# (handler.config.peers.clock, also used to check the records it fetches) read ``now``.

TTL = 3600
SKEW = 300  # p2psc.directory.record.CLOCK_SKEW


def peers_json(peer: PeerDir) -> dict[str, Any]:
    return json.loads((peer.workdir / "data" / "peers.json").read_text())  # type: ignore[no-any-return]


def test_cached_directory_key_is_refetched_after_expiry(tmp_path: Path) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")
    t0 = 1_800_000_000
    now = [float(t0)]

    async def main() -> None:
        directory = await Directory(tmp_path, clock=lambda: now[0], record_ttl=TTL).start()
        directory.register(server_dir, 4444)
        use_directory(client_dir, directory.url, directory.center)
        client = P2PHandler(workdir=client_dir.workdir)
        peers = client.config.peers
        peers.clock = lambda: now[0]
        state = directory.app[STATE_KEY]
        await client.resolver.resolve("server.test")
        assert state.lookups == 1
        assert peers.known_address("server.test").expires_at == t0 + TTL  # type: ignore[union-attr]
        assert peers_json(client_dir)["server.test"]["expires_at"] == t0 + TTL
        # valid (up to the clock skew past expires_at): the cached key is used, no lookup
        for t in (t0 + TTL - 1, t0 + TTL + SKEW):
            now[0] = t
            assert peers.public_key("server.test") is not None
            await client.resolver.resolve("server.test")
        assert state.lookups == 1
        # expired: not used for a handshake (TCP or UDP, initiator or responder) until the
        # directory has vouched for it again
        now[0] = t0 + TTL + SKEW + 1
        assert peers.public_key("server.test") is None
        assert peers.pinned_key("server.test") is not None  # kept for the key-change policy
        addr, key = await client.resolver.resolve("server.test")
        assert state.lookups == 2 and addr.port == 4444
        assert keys.same_public_key(key, server_dir.key.public_key())
        fresh = int(now[0]) + TTL
        assert peers.known_address("server.test").expires_at == fresh  # type: ignore[union-attr]
        assert peers_json(client_dir)["server.test"]["expires_at"] == fresh
        assert peers.public_key("server.test") is not None
        # expired again while the directory is down: refused, never the stale key
        await directory.stop()
        now[0] = fresh + SKEW + 1
        with pytest.raises(DirectoryError):
            await client.connect_peer("server.test")
        assert peers.public_key("server.test") is None
        await client.close()

    run(main())
    # a restarted peer reads expires_at back from peers.json and still refuses the key
    again = P2PHandler(workdir=client_dir.workdir)
    again.config.peers.clock = lambda: now[0]
    assert again.config.peers.public_key("server.test") is None
    again.config.peers.clock = lambda: now[0] - 2 * SKEW
    assert again.config.peers.public_key("server.test") is not None


def test_entry_learned_before_expiry_existed_is_refetched(tmp_path: Path) -> None:
    """A peers.json entry written from a v1 record (updated_at, no expires_at) came from the
    directory but never expires by itself: it is treated as expired. A hand-written entry
    (neither field) never expires."""
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")
    other = make_peer(tmp_path, "other.test")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        directory.register(server_dir, 5555)
        use_directory(client_dir, directory.url, directory.center)
        client_dir.know(server_dir, port=4444)
        client_dir.know(other, port=4445)
        table = peers_json(client_dir)
        table["server.test"]["updated_at"] = 1_600_000_000  # as a v1 client stored it
        (client_dir.workdir / "data" / "peers.json").write_text(json.dumps(table))
        client = P2PHandler(workdir=client_dir.workdir)
        assert client.config.peers.public_key("server.test") is None
        assert client.config.peers.public_key("other.test") is not None  # hand-written
        addr, _ = await client.resolver.resolve("server.test")
        assert addr.port == 5555 and directory.app[STATE_KEY].lookups == 1
        assert client.config.peers.public_key("server.test") is not None
        assert "expires_at" in peers_json(client_dir)["server.test"]
        assert "expires_at" not in peers_json(client_dir)["other.test"]
        await client.close()
        await directory.stop()

    run(main())


def test_removed_peer_is_refused_at_once_by_a_client_that_looks_up_again(
        tmp_path: Path, caplog: Any) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        directory.register(server_dir, 4444)
        use_directory(client_dir, directory.url, directory.center)
        client = P2PHandler(workdir=client_dir.workdir)
        peers = client.config.peers
        await client.resolver.resolve("server.test")
        assert peers.public_key("server.test") is not None
        assert directory.store.remove("server.test")  # what `p2psc directory remove` does
        with caplog.at_level(logging.WARNING, logger="p2psc.directory"):
            with pytest.raises(PeerNotInDirectory):
                await client.resolver.resolve("server.test", refresh=True)
        assert any("no longer knows" in r.message for r in caplog.records)
        # the old key is retired at once, in memory and on disk (kept only as the pinned key)
        assert peers.public_key("server.test") is None
        assert peers.pinned_key("server.test") is not None
        assert peers_json(client_dir)["server.test"]["expires_at"] == 0
        with pytest.raises(UnknownPeerError):
            await client.connect_peer("server.test")
        await client.close()
        await directory.stop()

    run(main())
    assert P2PHandler(workdir=client_dir.workdir).config.peers.public_key("server.test") is None


def test_replaced_key_is_refused_at_once_by_a_client_that_looks_up_again(tmp_path: Path) -> None:
    server_dir = make_peer(tmp_path, "server.test")
    client_dir = make_peer(tmp_path, "client.test")
    new_key = rsa_key("server-replacement-key")

    async def main() -> None:
        directory = await Directory(tmp_path).start()
        directory.register(server_dir, 4444)
        use_directory(client_dir, directory.url, directory.center)
        client = P2PHandler(workdir=client_dir.workdir)
        peers = client.config.peers
        await client.resolver.resolve("server.test")
        # the admin replaces the key (`p2psc directory add` again)
        directory.store.put("server.test", keys.public_key_pem(new_key).decode(),
                            "127.0.0.1", 4444)
        with pytest.raises(DirectoryError, match="differs"):
            await client.resolver.resolve("server.test", refresh=True)
        # neither key is usable: the old one is retired, the new one refused by the pin
        assert peers.public_key("server.test") is None
        assert keys.same_public_key(peers.pinned_key("server.test"),  # type: ignore[arg-type]
                                    server_dir.key.public_key())
        with pytest.raises(DirectoryError):
            await client.connect_peer("server.test")
        # with allow_key_change the new key replaces the old one
        client.settings.allow_key_change = True
        _, key = await client.resolver.resolve("server.test", refresh=True)
        assert keys.same_public_key(key, new_key.public_key())
        assert keys.same_public_key(peers.public_key("server.test"),  # type: ignore[arg-type]
                                    new_key.public_key())
        await client.close()
        await directory.stop()

    run(main())


def test_responder_refuses_a_removed_peer_within_one_validity_period(tmp_path: Path) -> None:
    """A peer removed from the directory, still holding its private key, is accepted by a
    responder that cached its key only until that record expires; then the responder asks
    the directory again and refuses it (TCP)."""
    server_dir = make_peer(tmp_path, "server.test")
    peer_dir = make_peer(tmp_path, "removed.test")
    t0 = int(time.time())
    now = [float(t0)]

    async def main() -> None:
        directory = await Directory(tmp_path, clock=lambda: now[0], record_ttl=TTL).start()
        use_directory(server_dir, directory.url, directory.center)
        server = P2PHandler(workdir=server_dir.workdir)
        server.config.peers.clock = lambda: now[0]
        await server.run_as_server(ProtocolClass=Echo)
        directory.register(peer_dir, 1)
        peer_dir.know(server_dir, port=server_port(server))
        peer = P2PHandler(workdir=peer_dir.workdir)

        async def attempt() -> bool:
            _, proto = await peer.connect_peer("server.test", ProtocolClass=Client)
            try:
                await asyncio.wait_for(proto.wait_handshaked(), 5)
            except HandshakeError:
                return False
            proto.close()
            return True

        assert await attempt()  # learned from the directory
        assert directory.store.remove("removed.test")
        now[0] = t0 + TTL  # still within the validity of the record the server holds
        assert await attempt()
        assert directory.app[STATE_KEY].lookups == 1
        now[0] = t0 + TTL + SKEW + 1  # expired: the responder looks it up and refuses it
        assert not await attempt()
        assert directory.app[STATE_KEY].lookups == 2
        assert server.config.peers.public_key("removed.test") is None
        await peer.close()
        await server.close()
        await directory.stop()

    run(main())


def test_udp_responder_does_not_use_an_expired_key(tmp_path: Path) -> None:
    """The UDP responder reads keys through the same PeerStore: an expired directory-sourced
    key makes it ask the directory, which no longer knows the peer."""
    from udp_util import Collector
    from udp_util import Echo as UdpEcho

    server_dir = make_peer(tmp_path, "server.test")
    peer_dir = make_peer(tmp_path, "removed.test")
    t0 = int(time.time())
    now = [float(t0)]
    fast = {"udp_handshake_retry": 0.2, "udp_handshake_timeout": 2.0}

    async def main() -> None:
        directory = await Directory(tmp_path, clock=lambda: now[0], record_ttl=TTL).start()
        use_directory(server_dir, directory.url, directory.center, **fast)
        peer_dir.update_conf(**fast)
        server = P2PHandler(workdir=server_dir.workdir)
        server.config.peers.clock = lambda: now[0]
        transport, _ = await server.run_as_udp_server(ProtocolClass=UdpEcho, host="127.0.0.1",
                                                      port=0)
        directory.register(peer_dir, 1)
        peer_dir.know(server_dir, port=transport.get_extra_info("sockname")[1])
        peer = P2PHandler(workdir=peer_dir.workdir)

        async def attempt() -> bool:
            _, proto = await peer.connect_udp_peer("server.test", ProtocolClass=Collector)
            try:
                await asyncio.wait_for(proto.wait_handshaked(), 5)
            except P2PError:
                return False
            finally:
                proto.stop()
            return True

        assert await attempt()
        assert directory.store.remove("removed.test")
        now[0] = t0 + TTL + SKEW + 1
        assert not await attempt()
        assert directory.app[STATE_KEY].lookups == 2
        await peer.close()
        await server.close()
        await directory.stop()

    run(main())
