"""Shared test helpers: throwaway peer folders with real keys, and running coroutines on
both event loops with a timeout."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from pg_fixtures import own_pg_server, pg_server, pg_url  # noqa: F401 - fixtures for all tests

from p2psc import keys

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
    uvloop = None  # type: ignore[assignment]

LOOP_KINDS = ["asyncio"] + (["uvloop"] if uvloop is not None else [])
_KEY_CACHE: dict[str, rsa.RSAPrivateKey] = {}


def rsa_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A private key per name, made once per test session (key generation is slow)."""
    key = _KEY_CACHE.get(f"{name}/{bits}")
    if key is None:
        key = _KEY_CACHE[f"{name}/{bits}"] = keys.generate_private_key(bits)
    return key


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        assert uvloop is not None
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Awaitable[T], *, loop: str = "asyncio", timeout: float = 30.0) -> T:
    """Run ``coro`` to completion on a new loop of the given kind, failing after ``timeout``."""
    ev = new_loop(loop)
    try:
        return ev.run_until_complete(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]
    finally:
        ev.run_until_complete(ev.shutdown_asyncgens())
        ev.close()


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Run the test on the stdlib loop and on uvloop."""
    return request.param  # type: ignore[no-any-return]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago (for subprocess servers)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # type: ignore[no-any-return]


@dataclass
class PeerDir:
    """A peer folder in the original layout, made by :func:`make_peer`."""

    peer_id: str
    workdir: Path
    key: rsa.RSAPrivateKey

    @property
    def pubkeys(self) -> Path:
        return self.workdir / "data" / "pubkeys"

    def set_port(self, port: int, host: str = "127.0.0.1") -> None:
        (self.workdir / "data" / "config.json").write_text(
            json.dumps({"peer_id": self.peer_id, "host": host, "port": port}))

    def update_conf(self, **settings: Any) -> None:
        path = self.workdir / "conf" / "config.json"
        conf = json.loads(path.read_text())
        conf.update(settings)
        path.write_text(json.dumps(conf))

    def know(self, other: "PeerDir", port: int = 0, host: str = "127.0.0.1",
             key: rsa.RSAPrivateKey | None = None) -> None:
        """Record ``other`` as a known peer (its public key, or ``key``'s, and its address)."""
        peers_file = self.workdir / "data" / "peers.json"
        table = json.loads(peers_file.read_text())
        table[other.peer_id] = {"peer_id": other.peer_id, "host": host, "port": port}
        peers_file.write_text(json.dumps(table))
        (self.pubkeys / f"{other.peer_id}.pubkey.pem").write_bytes(
            keys.public_key_pem(key or other.key))

    def config(self) -> dict[str, Any]:
        """The config mapping (variables substituted), for P2PHandler(config=...)."""
        from p2psc.config import read_config_file
        return read_config_file(self.workdir)


def make_peer(root: Path, peer_id: str, *, port: int = 0, key_name: str | None = None,
              **settings: Any) -> PeerDir:
    """Create ``root/<peer_id>`` as a ready peer folder with no known peers."""
    wd = root / peer_id
    (wd / "conf").mkdir(parents=True)
    (wd / "data" / "pubkeys").mkdir(parents=True)
    key = rsa_key(key_name or peer_id)
    keys.write_private_key(wd / "data" / "private_key.pem", key)
    conf = {"my_prikey_file": "$[workdir]$/data/private_key.pem",
            "xconfig": "$[workdir]$/data/config.json",
            "known_peers_file": "$[workdir]$/data/peers.json",
            "peer_pubkey_path": "$[workdir]$/data/pubkeys"}
    conf.update(settings)
    (wd / "conf" / "config.json").write_text(json.dumps(conf))
    (wd / "data" / "peers.json").write_text("{}")
    peer = PeerDir(peer_id, wd, key)
    peer.set_port(port)
    return peer


@pytest.fixture
def peers(tmp_path: Path) -> Callable[..., PeerDir]:
    """``peers("a.test", ...)`` makes a peer folder under this test's tmp_path."""
    def factory(peer_id: str, **kw: Any) -> PeerDir:
        return make_peer(tmp_path, peer_id, **kw)
    return factory


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[PeerDir, PeerDir]]:
    """Two peers that know each other: ``server`` (port 0) and ``client``."""
    server = make_peer(tmp_path, "server.test")
    client = make_peer(tmp_path, "client.test")
    server.know(client)
    client.know(server)
    yield server, client


def server_port(handler: Any) -> int:
    """The port a P2PHandler's server is bound to."""
    return handler.server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]


def point_at(client: PeerDir, server: PeerDir, port: int) -> None:
    """Tell ``client`` that ``server`` listens on 127.0.0.1:port."""
    client.know(server, port=port)


def env_without_password() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("P2PSC_PRIKEY_PASSWORD", None)
    return env


class TcpProxy:
    """A man in the middle on 127.0.0.1 for tests: forwards both directions between a client
    and ``target_port``, through ``mutate(direction, chunk_index, data) -> bytes`` hooks
    (direction "c2s" or "s2c"), and can stop forwarding (a network cut) with ``frozen``."""

    def __init__(self, target_port: int,
                 mutate: Callable[[str, int, bytes], bytes] | None = None):
        self.target_port = target_port
        self.mutate = mutate
        self.frozen = False
        self.server: asyncio.AbstractServer | None = None
        self.captured: dict[str, list[bytes]] = {"c2s": [], "s2c": []}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]  # type: ignore[no-any-return]

    async def start(self) -> "TcpProxy":
        self.server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        return self

    async def _pipe(self, direction: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        index = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.captured[direction].append(data)
                if self.mutate is not None:
                    data = self.mutate(direction, index, data)
                index += 1
                if not self.frozen and data:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not self.frozen:
                writer.close()

    async def _on_client(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [cwriter, swriter]
        for t in (asyncio.ensure_future(self._pipe("c2s", creader, swriter)),
                  asyncio.ensure_future(self._pipe("s2c", sreader, cwriter))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def decrypts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts RSA-OAEP decryptions (``decrypts[0]``): none may happen for a forged INIT."""
    calls = [0]
    from p2psc._proto import rsakeys  # every RSA operation of the protocol goes through it
    real = rsakeys.decrypt

    def counting(key: Any, ct: bytes) -> Any:
        calls[0] += 1
        return real(key, ct)

    monkeypatch.setattr(rsakeys, "decrypt", counting)
    return calls


async def dead_port() -> int:
    """A port on 127.0.0.1 where nothing listens any more."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the NAT matrix (test/nat_matrix.py) when NAT tests ran."""
    from nat_matrix import table
    text = table()
    if text:
        terminalreporter.write_sep("-", "NAT matrix (docs/NAT.md)")
        terminalreporter.write_line(text)
