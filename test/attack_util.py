"""Helpers of the attack and fault suite (issue 7): sans-IO handshakes whose every message can
be captured, cloned and mutated thousands of times without sockets, a record-aware
man-in-the-middle hook for :class:`conftest.TcpProxy`, and a server that records every hook."""

from __future__ import annotations

import asyncio
import copy
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from conftest import PeerDir, make_peer, rsa_key, server_port
from p2psc.config import PeerAddress, Settings
from p2psc._proto.events import Closed, HandshakeComplete, MessageReceived, PeerKeyNeeded
from p2psc._proto.tcp import HEADER_LEN, Connection, Role, State
from p2psc.p2p import TcpP2P
from p2psc.p2pexcept import P2PError
from p2psc.p2phandler import P2PHandler
from p2psc._proto.replay import InitReplayCache

I_ID, R_ID, M_ID = "alice.test", "bob.test", "mallory.test"
SUITE_NAMES = ("aes-256-gcm", "chacha20-poly1305", "rc4-hmac-sha256")


class Clock:
    """A settable clock: a connection made with it takes ``now`` from it (the wall clock too:
    ``wall_offset`` is 0)."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings(suite: str = "aes-256-gcm", **kw: Any) -> Settings:
    s = Settings(cipher_suite=suite, enable_rc4=suite.startswith("rc4"))
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def key_table(**extra: Any) -> dict[str, Any]:
    """The responder's known peers: alice and mallory (each with their own key)."""
    table = {I_ID: rsa_key("alice").public_key(), M_ID: rsa_key("mallory").public_key()}
    table.update(extra)
    return table


def responder(s: Settings, cache: InitReplayCache, clock: Clock | None = None,
              known: dict[str, Any] | None = None, my_id: str = R_ID,
              key_name: str = "bob") -> Connection:
    table = key_table() if known is None else known
    return Connection(Role.RESPONDER, my_id, rsa_key(key_name), s, key_lookup=table.get,
                      replay_cache=cache, now=(clock or Clock()).now)


def initiator(s: Settings, clock: Clock | None = None, *, my_id: str = I_ID,
              key_name: str = "alice", peer_id: str = R_ID, peer_key_name: str = "bob"
              ) -> Connection:
    return Connection(Role.INITIATOR, my_id, rsa_key(key_name), s, peer_id=peer_id,
                      peer_public_key=rsa_key(peer_key_name).public_key(),
                      now=(clock or Clock()).now)


@dataclass
class Session:
    """One legitimate handshake, with the wire records and both ends at each stage."""

    s: Settings
    cache: InitReplayCache
    clock: Clock
    init: bytes = b""
    resp: bytes = b""
    finished: bytes = b""
    data: list[bytes] = field(default_factory=list)      # initiator -> responder
    data_r2i: list[bytes] = field(default_factory=list)  # responder -> initiator
    i_sent_init: Connection | None = None   # initiator waiting for RESP (clone it)
    i_sent_finished: Connection | None = None  # established initiator that sent only FINISHED
    r_sent_resp: Connection | None = None   # responder waiting for FINISHED (clone it)
    i: Connection | None = None             # established ends
    r: Connection | None = None


def joined(conn: Connection) -> bytes:
    return b"".join(conn.data_to_send())


def run_session(suite: str = "aes-256-gcm", messages: Iterable[bytes] = (b"attack at dawn",),
                replies: Iterable[bytes] = (b"at dawn, then",), *, clock: Clock | None = None,
                cache: InitReplayCache | None = None, **kw: Any) -> Session:
    """A full legitimate handshake and exchange, every record captured."""
    s = settings(suite, **kw)
    clock = clock or Clock()
    cache = cache if cache is not None else InitReplayCache(s.replay_cache_size, s.timestamp_window)
    sess = Session(s, cache, clock)
    i = initiator(s, clock)
    r = responder(s, cache, clock)
    i.initiate()
    sess.init = joined(i)
    sess.i_sent_init = clone(i)
    assert r.receive_data(sess.init) == []
    sess.resp = joined(r)
    sess.r_sent_resp = clone(r)
    assert i.receive_data(sess.resp) == [HandshakeComplete(R_ID)]
    sess.finished = joined(i)
    sess.i_sent_finished = clone(i)
    assert r.receive_data(sess.finished) == [HandshakeComplete(I_ID)]
    for m in messages:
        i.send(m)
        sess.data.append(joined(i))
    for m in replies:
        r.send(m)
        sess.data_r2i.append(joined(r))
    sess.i, sess.r = clone(i), clone(r)
    # the captured originals are what the receivers expect next: consume them on the clones
    for rec, m in zip(sess.data, messages):
        assert r.receive_data(rec) == [MessageReceived(m)]
    for rec, m in zip(sess.data_r2i, replies):
        assert i.receive_data(rec) == [MessageReceived(m)]
    return sess


def clone(conn: Connection) -> Connection:
    """An independent copy of a sans-IO connection in its current state (sharing the
    immutable keys and the replay cache), so one captured state can take thousands of
    different inputs."""
    c = copy.copy(conn)
    c._out = []
    for name in type(conn).__slots__:  # own buffers (record, held bytes, scratch)
        value = getattr(conn, name, None)
        if isinstance(value, bytearray):
            setattr(c, name, bytearray(value))
    if conn._initiator is not None:
        c._initiator = copy.copy(conn._initiator)
    for name in ("_send", "_recv"):
        d = getattr(conn, name)
        if d is not None:
            d2 = copy.copy(d)
            d2._set_cipher(copy.copy(d.cipher))  # (rc4's keystream is state: its own copy)
            setattr(c, name, d2)
    return c


@dataclass
class Outcome:
    """What a victim did with some bytes followed by the end of the stream."""

    events: list[Any]
    error: P2PError | None
    wrote: bytes

    @property
    def delivered(self) -> list[Any]:
        return [e for e in self.events if isinstance(e, (HandshakeComplete, MessageReceived))]

    @property
    def closed_error(self) -> P2PError | None:
        """The error the connection ended with (a raised one, or the EOF's)."""
        if self.error is not None:
            return self.error
        for e in self.events:
            if isinstance(e, Closed):
                return e.error
        return None


def expect(events: list[Any]) -> list[Any]:
    """``events``, or the error of a final ``Closed`` raised (for ``pytest.raises``)."""
    if events and isinstance(events[-1], Closed) and events[-1].error is not None:
        raise events[-1].error
    return events


def _split_error(events: list[Any]) -> tuple[list[Any], P2PError | None]:
    """The events before a final ``Closed`` carrying an error, and that error."""
    if events and isinstance(events[-1], Closed) and events[-1].error is not None:
        return events[:-1], events[-1].error
    return events, None


def feed(conn: Connection, data: bytes, *, eof: bool = True,
         refuse_unknown: bool = True) -> Outcome:
    """Give ``data`` then (with ``eof``) the end of the stream to ``conn``. ``error`` is the
    error a protocol failure closed it with (the core never raises for bad input: any
    exception propagates and fails the test)."""
    events, error = _split_error(conn.receive_data(data))
    if error is None and refuse_unknown and any(isinstance(e, PeerKeyNeeded) for e in events):
        more, error = _split_error(conn.provide_peer_key(None))
        events += more
    wrote = joined(conn)
    if error is None:
        conn.derive_keys()  # as the adapter does once RESP is written (a no-op otherwise)
    if error is None and eof:
        events += conn.receive_eof()
    return Outcome(events, error, wrote)


def bit_flips(data: bytes) -> Iterable[tuple[int, int, bytes]]:
    """Every single-bit flip of ``data``: (position, bit, mutated)."""
    buf = bytearray(data)
    for pos in range(len(buf)):
        for bit in range(8):
            buf[pos] ^= 1 << bit
            yield pos, bit, bytes(buf)
            buf[pos] ^= 1 << bit


def split_records(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + HEADER_LEN <= len(stream):
        (n,) = struct.unpack_from(">I", stream, pos)
        out.append(stream[pos:pos + HEADER_LEN + n])
        pos += HEADER_LEN + n
    assert pos == len(stream), "not a whole number of records"
    return out


# -- over real sockets -------------------------------------------------------------------------

class RecordHook:
    """A :class:`conftest.TcpProxy` ``mutate`` hook that parses the record stream of each
    direction and lets ``fn(direction, index, record)`` replace each whole record (return
    ``b""`` to drop it, several records to inject, ``None`` to cut the stream: the rest of that
    direction is dropped)."""

    def __init__(self, fn: Callable[[str, int, bytes], bytes | None]):
        self.fn = fn
        self.buf = {"c2s": bytearray(), "s2c": bytearray()}
        self.index = {"c2s": 0, "s2c": 0}
        self.cut = {"c2s": False, "s2c": False}
        self.seen: dict[str, list[bytes]] = {"c2s": [], "s2c": []}

    def __call__(self, direction: str, _chunk: int, data: bytes) -> bytes:
        if self.cut[direction]:
            return b""
        buf = self.buf[direction]
        buf += data
        out = bytearray()
        while len(buf) >= HEADER_LEN:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) < HEADER_LEN + n:
                break
            rec = bytes(buf[:HEADER_LEN + n])
            del buf[:HEADER_LEN + n]
            self.seen[direction].append(rec)
            new = self.fn(direction, self.index[direction], rec)
            self.index[direction] += 1
            if new is None:
                self.cut[direction] = True
                return bytes(out)
            out += new
        return bytes(out)


class Recorder(TcpP2P):
    """Server side: logs every hook call (class attribute ``log``, one per subclass) and
    echoes what it receives."""

    log: list[tuple[str, Any]] = []

    def on_handshaked(self) -> None:
        self.log.append(("handshaked", self.peer_id))

    def on_recv(self, data: bytes) -> None:
        self.log.append(("recv", data))
        self.send(b"recv:" + data)

    def on_closed(self, exc: Exception | None) -> None:
        self.log.append(("closed", exc))


def recorder() -> type[Recorder]:
    class R(Recorder):
        log: list[tuple[str, Any]] = []
    return R


class Client(TcpP2P):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.received: list[bytes] = []
        self.handshaked_calls = 0
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[Any] = loop.create_future()
        self.got: asyncio.Future[bytes] = loop.create_future()

    def on_handshaked(self) -> None:
        self.handshaked_calls += 1

    def on_recv(self, data: bytes) -> None:
        self.received.append(data)
        if not self.got.done():
            self.got.set_result(data)

    def on_closed(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
                     ) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def closed_entries(log: list[tuple[str, Any]], n: int, timeout: float = 5.0) -> list[Any]:
    await wait_until(lambda: sum(k == "closed" for k, _ in log) >= n, timeout, f"{n} closes")
    return [v for k, v in log if k == "closed"]


_legit_counter = [0]


async def assert_still_serving(server: P2PHandler, server_dir: PeerDir, tmp_path: Any) -> None:
    """A fresh legitimate peer (new id, new folder) handshakes with ``server`` and gets its echo."""
    _legit_counter[0] += 1
    name = f"legit{_legit_counter[0]}.test"
    legit = make_peer(tmp_path, name, key_name="legit")
    server.config.peers.add(PeerAddress(name, "127.0.0.1", 1), legit.key.public_key(),
                            persist=False)
    legit.know(server_dir, port=server_port(server))
    handler = P2PHandler(workdir=legit.workdir)
    try:
        _, proto = await handler.connect_peer(server_dir.peer_id, ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        proto.send(b"still there?")
        assert await asyncio.wait_for(proto.got, 5) == b"recv:still there?"
    finally:
        await handler.close()


__all__ = ["Clock", "settings", "responder", "initiator", "run_session", "clone", "feed",
           "bit_flips", "split_records", "RecordHook", "Recorder", "recorder", "Client",
           "wait_until", "closed_entries", "assert_still_serving", "Outcome", "Session", "State",
           "I_ID", "R_ID", "M_ID", "SUITE_NAMES", "joined"]
