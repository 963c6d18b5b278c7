"""Attacks on NAT traversal (outside review): a peer attached to the relay, a malicious relay,
and strangers on the network, against real sockets on 127.0.0.1 and the sans-IO objects.
Each test names the weakness it pins down; docs/NAT.md ("Threat model") says what is out of
scope and why."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from nat_util import RELAY_ID, FrameClient, RelayEnv, probe, run, udp_socket, until, with_env
from nat_util import with_relay as _with_relay

from p2psc.nat import wire
from p2psc.nat.wire import Addr, RelayAddress
from p2psc.p2phandler import P2PHandler
from p2psc.udp_p2p import UdpP2P

A, B, C = "alice.test", "bob.test", "carol.test"
EP_M = b"mallory!"


def with_relay(env: RelayEnv, peer: Any, **settings: Any) -> P2PHandler:
    return _with_relay(env, peer, **{"nat_punch_timeout": 3.0, **settings})


class UdpEcho(UdpP2P):
    def on_datagram(self, data: bytes, peer_id: str, addr: Any) -> None:
        self.reply(data)


async def udp_server_bob(env: RelayEnv, handlers: list[P2PHandler], **settings: Any
                         ) -> P2PHandler:
    """bob: a UDP server that uses the relay (attached, its mapping probed)."""
    b = with_relay(env, env.peers[B].dir, **settings)
    handlers.append(b)
    await b.run_as_udp_server(UdpEcho, host="127.0.0.1", port=0)
    assert b.nat is not None
    await b.nat.ensure_link()
    await until(lambda: b.nat is not None and b.nat._udp_server is not None
                and any(b.nat._udp_server.mappings), 5, "bob's probes")
    return b


async def mallory_punch(env: RelayEnv, target: str = B,
                        local: tuple[Addr, ...] = ()) -> tuple[FrameClient, wire.Punch]:
    """alice (the attacker) attaches with a raw control link, probes, and CONNECTs to
    ``target``: the relay gives her the punch id it also gives the target."""
    alice = env.peers[A]
    la = await env.attach(alice, hello=wire.Hello(wire.FLAG_UDP, EP_M))
    sock = await udp_socket(alice)
    assert alice.welcome is not None
    await probe(sock, alice.welcome.probe_token, EP_M, env.server.udp_ports[0])
    la.send_frame(wire.Connect(1, EP_M, local, target))
    return la, await la.expect(wire.Punch)


# -- 1. a relayed NAT datagram reaches the puncher, whose answer kills the UDP socket ------------

def test_relayed_punch_ping_does_not_kill_the_udp_server(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    """A peer on the relay CONNECTs to bob (so it knows the punch id bob now answers) and
    relays him a PUNCH_PING in a DGRAM. It reached bob's Puncher with a RelayAddress as
    source; the PONG went to ``transport.sendto(RelayAddress)``: TypeError -> asyncio's
    "Fatal write error on datagram transport" -> bob's UDP server socket closed for everyone.
    NAT datagrams never travel through the relay: a relayed one is dropped."""
    caplog.set_level(logging.DEBUG)

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server_bob(env, handlers)
        assert b.nat is not None and b.nat._udp_server is not None
        ep_b = b.nat._udp_server.endpoint
        la, punch = await mallory_punch(env)
        assert punch.peer_endpoint == ep_b
        await until(lambda: b.nat is not None and b.nat._udp_server is not None
                    and punch.punch_id in b.nat._udp_server.punchers, 5, "bob punching")
        ping = wire.encode_punch(wire.U_PUNCH_PING, punch.punch_id, b"txid0001")
        for payload in (ping, wire.encode_probe_reply(b"txid0001", Addr("127.0.0.1", 1)),
                        bytes((wire.U_PROBE,)) + bytes(63)):
            la.send_frame(wire.Dgram(EP_M, ep_b, B, payload))
        await la.nothing(0.3)
        transport = b.udp_transport
        assert transport is not None and not transport.is_closing(), "bob's UDP socket died"
        assert b.udp_server_protocol is not None
        # (and a NAT datagram is never sent to a RelayAddress, whoever asks)
        b.udp_server_protocol.send_nat_datagram(ping, RelayAddress(A, EP_M))
        b.udp_server_protocol.send_nat_datagram(ping, RelayAddress(A, EP_M), 2)
        await asyncio.sleep(0.05)
        assert not transport.is_closing()
        puncher = b.nat._udp_server.punchers[punch.punch_id][0]
        assert not any(isinstance(c, RelayAddress) for c in puncher.candidates)
        assert "Fatal write error" not in caplog.text
        assert "Traceback" not in caplog.text

    run(with_env(tmp_path, body))


# -- 2. the relayed circuit's hand-off to the p2psc protocol drops bytes -------------------------

class _FakeHost:
    """What NatAgent needs of a handler, for agent tests against a fake relay."""

    def __init__(self, **settings: Any) -> None:
        from p2psc.config import Settings
        self.settings = Settings(**settings)

    def get_myid(self) -> str:
        return B

    async def connect_address(self, *a: Any) -> Any:
        raise OSError("no control link in this test")


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.path = "direct"
        self.got = bytearray()

    def data_received(self, data: bytes) -> None:
        self.got += data


class _StreamingRelay(asyncio.Protocol):
    """A relay's circuit side: answers the preamble with 0, then streams ``chunks`` one per
    loop iteration (the other peer's first bytes, arriving just after the join)."""

    chunks = [bytes([i]) * 1000 for i in range(1, 41)]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""
        self.joined = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= wire.CIRCUIT_PREAMBLE_LEN and not self.joined:
            self.joined = True
            self.transport.write(b"\x00")
            self._next(0)

    def _next(self, i: int) -> None:
        if i < len(self.chunks):
            self.transport.write(self.chunks[i])
            asyncio.get_running_loop().call_soon(self._next, i + 1)


def test_circuit_handoff_loses_no_bytes_sent_right_after_the_join() -> None:
    """The peer's first bytes that arrive after the relay's 0 but before ``_join`` resumes
    (``wait_for`` adds a loop iteration or two) went to ``_CircuitJoin.data_received``, which
    dropped them once ``joined`` was done: a relayed connection that starts with a corrupt or
    missing INIT. The joiner must stop reading at the join until the protocol takes over."""
    from p2psc.config import PeerAddress
    from p2psc.nat.agent import NatAgent

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_StreamingRelay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = NatAgent(_FakeHost(), PeerAddress(RELAY_ID, "127.0.0.1", port))  # type: ignore[arg-type]
        want = b"".join(_StreamingRelay.chunks)
        try:
            for _ in range(5):
                transport, proto = await agent._join(bytes(32), _Collect)  # type: ignore[arg-type]
                got = proto.got  # type: ignore[attr-defined]
                try:
                    await until(lambda got=got: len(got) >= len(want), 2, "the streamed bytes")
                except AssertionError:
                    pass
                transport.close()
                assert bytes(got) == want, f"{len(want) - len(got)} bytes lost at the hand-off"
        finally:
            server.close()
            await agent.close()

    run(main())


# -- 3. punch requests make a peer ping whatever addresses they name, without bound ---------------

async def victims(n: int) -> list[Any]:
    return [await udp_socket() for _ in range(n)]


def received(socks: list[Any]) -> int:
    return sum(s.queue.qsize() for s in socks)


def test_connect_burst_from_one_peer_runs_one_punch_at_a_time_at_the_target(tmp_path: Path
                                                                           ) -> None:
    """Through an honest relay, a peer sends its whole CONNECT burst (20) to bob, each naming
    7 "local addresses" that are a victim's. Bob ran one Puncher per PUNCH, all at once, each
    pinging every candidate every ``nat_punch_interval``: ~20 x 7 x 6 datagrams per second
    toward the victim for ~1.5 KB of frames, again every 4 s. One attempt per requesting peer
    at a time bounds it to one attempt's pings."""
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        await udp_server_bob(env, handlers)
        socks = await victims(7)
        local = tuple(Addr("127.0.0.1", s.port) for s in socks)
        la, _ = await mallory_punch(env, local=local)
        for i in range(2, 20):
            la.send_frame(wire.Connect(i, EP_M, local, B))
        await asyncio.sleep(1.0)
        n = received(socks)
        # one attempt: a low-TTL ping and ~1.0 / 0.2 rounds to each of the 7 (x2 for slack)
        assert n <= 2 * 7 * (1 + 1.0 / 0.2 + 1), f"{n} datagrams toward the victim"
        for s in socks:
            s.transport.close()

    run(with_env(tmp_path, body))


def relay_link_to(env: RelayEnv, peer_id: str) -> Any:
    """The relay's end of ``peer_id``'s control link: frames sent on it are a malicious relay's."""
    link = env.server.rendezvous.link_of(peer_id)
    assert link is not None
    return link


def test_a_malicious_relays_punch_flood_is_bounded(tmp_path: Path) -> None:
    """A malicious relay sends bob 200 PUNCH frames (each as from another peer id), each with 8
    candidates at a victim. Every one became a Puncher at once (200 x 8 low-TTL pings
    immediately, then 200 x 8 every 0.2 s): the relay makes bob flood any address, ~100 times
    what it sends. The agent runs a bounded number of answering attempts at once."""
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server_bob(env, handlers)
        assert b.nat is not None and b.nat._udp_server is not None
        ep_b = b.nat._udp_server.endpoint
        socks = await victims(8)
        cands = tuple(Addr("127.0.0.1", s.port) for s in socks)
        link = relay_link_to(env, B)
        for i in range(200):
            link.send(wire.encode(wire.Punch(0, bytes([i % 256]) * 16, ep_b, EP_M, cands,
                                             f"p{i}.test")))
        await asyncio.sleep(1.0)
        n = received(socks)
        assert n <= 8 * 8 * (1 + 1.0 / 0.2 + 1) * 2, f"{n} datagrams toward the victim"
        assert b.udp_transport is not None and not b.udp_transport.is_closing()
        for s in socks:
            s.transport.close()

    run(with_env(tmp_path, body))


def test_a_malicious_relays_incoming_flood_opens_a_bounded_number_of_connections(
        tmp_path: Path) -> None:
    """A malicious relay sends bob 200 INCOMING frames and never answers the circuit
    preambles: bob opened 200 TCP connections (and tasks) at once, each held for twice
    ``nat_relay_timeout``. A bounded number of joins run at once; the rest are refused."""
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = with_relay(env, env.peers[B].dir)
        handlers.append(b)
        from p2psc.p2p import TcpP2P
        await b.run_as_server(TcpP2P, host="127.0.0.1", port=0)
        assert b.nat is not None
        await b.nat.ensure_link()
        await until(lambda: env.server.rendezvous.link_of(B) is not None, 5, "bob attached")
        env.server.preamble = lambda side, token: None  # type: ignore[method-assign]
        link = relay_link_to(env, B)
        for i in range(200):
            link.send(wire.encode(wire.Incoming(i.to_bytes(32, "big"), A)))
        await asyncio.sleep(1.0)
        held = len(env.server._accepted)
        assert held <= 32, f"bob holds {held} circuit connections open for the relay"
        assert len(b.nat._tasks) <= 32

    run(with_env(tmp_path, body))


# -- 4. one peer holds all of another's circuits -----------------------------------------------

def test_one_peer_cannot_take_all_of_a_targets_circuits(tmp_path: Path) -> None:
    """alice OPENs 8 circuits to bob and never joins them (again every
    ``circuit_join_timeout``, 0.8 requests/s, well within her rate): bob is at
    ``circuits_per_peer`` and nobody else can open a circuit to him: ERROR E_LIMIT "the target
    has 8 circuits". Circuits between one pair of peers have a limit of their own
    (``circuits_per_pair``), below the per-peer one."""
    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        la = await env.attach(env.peers[A])
        lb = await env.attach(env.peers[B], hello=wire.Hello(wire.FLAG_TCP, bytes(8)))
        lc = await env.attach(env.peers[C])
        per_peer = env.server.limits.circuits_per_peer
        got = 0
        for req in range(1, per_peer + 1):
            la.send_frame(wire.Open(req, B))
            frame = await la.next()
            if isinstance(frame, wire.Circuit):
                got += 1
                await lb.expect(wire.Incoming)
            else:
                assert isinstance(frame, wire.Error) and frame.code == wire.E_LIMIT
        assert got < per_peer
        lc.send_frame(wire.Open(99, B))
        frame = await lc.next()
        assert isinstance(frame, wire.Circuit), f"carol cannot reach bob: {frame}"

    run(with_env(tmp_path, body, peers=(A, B, C)))


# -- 5. a relayed peer whose id looks like an IP address shares that address's rate limits ------

def test_a_relayed_peer_named_like_an_ip_address_has_rate_buckets_of_its_own() -> None:
    """Peer ids may look like IPv4 addresses ("10.0.0.1" is a valid id). The UDP core keys its
    INIT buckets (and the handler its directory-lookup budget) on ``addr[0]``, which for a
    RelayAddress is the peer id: a relayed peer named "10.0.0.1" spent the buckets of the
    real host 10.0.0.1, whose handshakes were then refused. A RelayAddress has a key of its
    own kind."""
    from conftest import rsa_key

    from p2psc._proto.ratelimit import rate_key
    from p2psc._proto.udp import UdpEndpoint
    from p2psc.config import Settings
    from p2psc.lookup_budget import LookupBudget

    relayed = RelayAddress("10.0.0.1", EP_M)
    assert rate_key(relayed) != rate_key(("10.0.0.1", 40000))
    budget = LookupBudget(1.0, 2, 8)
    for _ in range(2):
        assert budget.acquire(relayed, 0.0) is not None
    assert budget.acquire(("10.0.0.1", 40000), 0.0) is not None

    now, wall = 100.0, 1_700_000_000.0
    s = Settings(udp_init_rate_per_addr=0.001, udp_init_burst_per_addr=3)
    keys = {n: rsa_key(n) for n in ("a.test", "b.test", "m.test")}
    pubs = {n: k.public_key() for n, k in keys.items()}
    b = UdpEndpoint("b.test", keys["b.test"], s, key_lookup=pubs.get, now=now, wall_offset=wall)

    def init_from(name: str) -> bytes:
        c = UdpEndpoint(name, keys[name], s, key_lookup=pubs.get, accept_from="b.test", now=now,
                        wall_offset=wall)
        c.connect("b.test", pubs["b.test"], ("10.0.0.2", 10098), now)
        (dgram, _), = c.datagrams_to_send()
        return dgram

    for _ in range(5):  # mallory, "10.0.0.1" on the relay, spends her own bucket
        b.receive(init_from("m.test"), relayed, now)
    b.datagrams_to_send()
    b.receive(init_from("a.test"), ("10.0.0.1", 40000), now)
    assert [addr for _, addr in b.datagrams_to_send()] == [("10.0.0.1", 40000)], \
        "the real 10.0.0.1 got no RESP: its bucket was spent by a relayed peer"


# -- 6. a relay that answers a request with a frame of the wrong kind --------------------------

def test_an_answer_of_the_wrong_kind_is_a_relay_error_not_an_assertion(tmp_path: Path) -> None:
    """A (malicious or broken) relay answers OPEN with a PUNCH and CONNECT with a CIRCUIT,
    each naming the request. ``open_circuit`` and ``find_udp_path`` asserted the kind: the
    application's ``connect_peer`` / ``connect_udp_peer`` got an AssertionError (under
    ``python -O``, an AttributeError), not the documented PeerUnreachable."""
    from p2psc import PeerUnreachable
    from p2psc.nat.rendezvous import SendFrame
    from p2psc.p2p import TcpP2P

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server_bob(env, handlers)
        await b.run_as_server(TcpP2P, host="127.0.0.1", port=0)
        rv = env.server.rendezvous
        rv._open = lambda peer, f, now: [SendFrame(peer.link, wire.encode(  # type: ignore
            wire.Punch(f.request, bytes(16), bytes(8), bytes(8), (), B)))]
        rv._connect = lambda peer, f, now: [SendFrame(peer.link, wire.encode(  # type: ignore
            wire.Circuit(f.request, bytes(32))))]
        a_dir = env.peers[A].dir
        a_dir.know(env.peers[B].dir, port=0)
        a = with_relay(env, a_dir)
        handlers.append(a)
        with pytest.raises(PeerUnreachable):
            await a.connect_peer(B)
        with pytest.raises(PeerUnreachable):
            await a.connect_udp_peer(B)

    run(with_env(tmp_path, body))


# -- 7. log lines forged through peer ids and error texts in frames -----------------------------

FORGED = "\n2030-01-01 00:00:00 INFO p2psc.relay: FORGED line"


def raw_id(peer_id: str) -> bytes:
    """A frame's id field, whatever the id (``wire.encode`` refuses an invalid one)."""
    b = peer_id.encode()
    return bytes((len(b),)) + b


def forged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "\n2030-01-01" in r.getMessage()]


def test_a_peer_cannot_forge_lines_in_the_relays_log(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A frame's peer id was any UTF-8: alice CONNECTs to (or OPENs) a target named
    "nobody<newline><a whole log line>", and the relay logs "CONNECT 1 to nobody..." verbatim
    at INFO: a line of her making in the operator's log. A peer id in a frame must be a valid
    peer id (the alphabet of ids on file); any other is a malformed frame."""
    caplog.set_level(logging.DEBUG)

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        bad = raw_id("nobody" + FORGED)
        for frame in (bytes((wire.C_CONNECT,)) + bytes(4) + EP_M + b"\x00" + bad,
                      bytes((wire.C_OPEN,)) + bytes(4) + bad,
                      bytes((wire.C_DGRAM,)) + EP_M + EP_M + bad + b"x"):
            la = await env.attach(env.peers[A])
            la.send(frame)
            got = await la.next()
            assert got is None, f"the link stays up after {frame}: {got}"
        assert forged(caplog) == []

    run(with_env(tmp_path, body))


def test_a_relay_cannot_forge_lines_in_a_peers_log(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A malicious relay's ERROR text (and a peer id in its PUNCH or INCOMING) went verbatim
    into the peer's log ("the relay says: ...") and into RelayError messages."""
    caplog.set_level(logging.DEBUG)

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server_bob(env, handlers)
        from p2psc.p2p import TcpP2P
        await b.run_as_server(TcpP2P, host="127.0.0.1", port=0)
        assert b.nat is not None and b.nat._udp_server is not None
        ep_b = b.nat._udp_server.endpoint
        link = relay_link_to(env, B)
        link.send(wire.encode(wire.Error(0, wire.E_BAD_REQUEST, "x" + FORGED)))
        await asyncio.sleep(0.2)
        bad = raw_id("x" + FORGED)
        for frame in (bytes((wire.R_INCOMING,)) + bytes(32) + bad,
                      bytes((wire.R_PUNCH,)) + bytes(4 + 16) + ep_b + EP_M + b"\x00" + bad):
            await until(lambda: env.server.rendezvous.link_of(B) is not None, 10, "bob back")
            relay_link_to(env, B).send(frame)
            await asyncio.sleep(0.3)
        assert forged(caplog) == []

    run(with_env(tmp_path, body))


# -- 8. closing a handler with relayed UDP sessions ----------------------------------------------

class _UCollect(UdpP2P):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.got: asyncio.Queue[bytes] = asyncio.Queue()
        self.peer_closed: list[str] = []

    def on_recv(self, data: bytes, addr: Any) -> None:
        self.got.put_nowait(data)

    def on_peer_closed(self, peer_id: str, error: Exception | None) -> None:
        self.peer_closed.append(peer_id)


@pytest.mark.parametrize("closing", ["server", "client"])
def test_closing_a_handler_with_relayed_sessions_is_clean(tmp_path: Path, closing: str,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """``handler.close()`` closes the NAT agent first (the UDP endpoints lose their NAT tap),
    then the UDP endpoints, which send CLOSE to each session: for a relayed one, to a
    RelayAddress, which went to ``transport.sendto``: "Fatal write error on datagram
    transport" and a traceback in the loop, on every shutdown."""
    caplog.set_level(logging.DEBUG)

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = await udp_server_bob(env, handlers)
        env.peers[A].dir.know(env.peers[B].dir, port=0)
        a = with_relay(env, env.peers[A].dir, nat_punch=False)
        handlers.append(a)
        _, proto = await a.connect_udp_peer(B, _UCollect)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert proto.path == "relayed"
        proto.send(b"hello")
        assert await asyncio.wait_for(proto.got.get(), 5) == b"hello"
        victim = b if closing == "server" else a
        handlers.remove(victim)
        await victim.close()
        await asyncio.sleep(0.2)
        if closing == "server":  # (its CLOSE came through the relay)
            await until(lambda: proto.peer_closed == [B], 5, "the client told of the close")
        assert "Fatal write error" not in caplog.text
        assert "Traceback" not in caplog.text

    run(with_env(tmp_path, body))


# -- 9. a relay that stalls the control link's handshake past nat_relay_timeout -----------------

class _Staller(asyncio.Protocol):
    """Accepts, reads, answers nothing, and closes after ``hold`` seconds."""

    hold = 0.6

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        asyncio.get_running_loop().call_later(self.hold, transport.close)


def test_a_stalled_control_link_leaves_no_unretrieved_task_exception(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``ensure_link`` waits ``nat_relay_timeout`` on a shielded connect task; when it gives
    up, the task runs on, and when it then fails (the relay closes, or the handshake times
    out) nobody retrieves its RelayError: asyncio logs "Task exception was never retrieved"
    with a traceback, once per attempt (the keeper of a serving peer retries forever)."""
    import gc

    from conftest import make_peer

    from p2psc import RelayError

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Staller, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        d = make_peer(tmp_path, A)
        d.update_conf(relay={"peer_id": RELAY_ID, "host": "127.0.0.1", "port": port},
                      nat_relay_timeout=0.3)
        relay_dir = make_peer(tmp_path, RELAY_ID)
        d.know(relay_dir, port=port)
        h = P2PHandler(workdir=d.workdir)
        try:
            assert h.nat is not None
            with pytest.raises(RelayError):
                await h.nat.ensure_link()
            await asyncio.sleep(_Staller.hold + 0.3)  # the connect task fails now
            with pytest.raises(RelayError):
                await h.nat.ensure_link()  # (a new attempt: the old task is dropped)
            await asyncio.sleep(0.1)
            gc.collect()
            await asyncio.sleep(0.05)
        finally:
            await h.close()
            server.close()
        gc.collect()

    caplog.set_level(logging.DEBUG)
    run(main())
    assert "never retrieved" not in caplog.text


# -- 10. a control link that the relay closes right after WELCOME ---------------------------------

@pytest.mark.parametrize("who", ["malicious relay", "same id twice"])
def test_a_link_closed_right_after_welcome_is_not_redialled_in_a_tight_loop(
        tmp_path: Path, who: str) -> None:
    """The keeper of a serving peer backed off only when connecting failed. A link that the
    relay accepts and then closes at once (two processes of one peer id, each replacing the
    other's link; a relay that is full of it; a malicious relay) was redialled at once, again
    and again: a p2psc handshake (RSA on both sides) and two INFO lines per round, as fast
    as they go. A link that did not stay up a while counts as a failure for the backoff."""
    from p2psc.p2p import TcpP2P

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        b = with_relay(env, env.peers[B].dir)
        handlers.append(b)
        await b.run_as_server(TcpP2P, host="127.0.0.1", port=0)
        await until(lambda: env.server.rendezvous.link_of(B) is not None, 5, "bob attached")
        if who == "same id twice":  # a second process of bob's: each link replaces the other
            before = env.server.rendezvous.counters["attached"]
            b2 = P2PHandler(workdir=env.peers[B].dir.workdir)
            handlers.append(b2)
            await b2.run_as_server(TcpP2P, host="127.0.0.1", port=0)
            await asyncio.sleep(3.0)
            rounds = env.server.rendezvous.counters["attached"] - before
            assert rounds <= 8, f"the two redialled the relay {rounds} times in 3 s"
            return
        # a malicious relay: every link of bob's is closed right after its WELCOME
        orig = env.server.link_attached

        def attach_and_drop(link: Any) -> None:
            orig(link)
            asyncio.get_running_loop().call_soon(link.abort)

        env.server.link_attached = attach_and_drop  # type: ignore[method-assign]
        before = env.server.rendezvous.counters["attached"]
        relay_link_to(env, B).abort()
        await asyncio.sleep(3.0)
        rounds = env.server.rendezvous.counters["attached"] - before
        assert rounds <= 4, f"bob redialled the relay {rounds} times in 3 s"

    run(with_env(tmp_path, body))


# -- 11. relayed datagrams sent while the control link is down ---------------------------------

def test_datagrams_sent_while_the_link_is_down_start_one_reconnect(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every relayed datagram sent while the control link was down started a task of its own
    to reconnect (each waiting ``nat_relay_timeout``, each logging its failure): an
    application sending 2,000 datagrams while the relay is unreachable got 2,000 tasks and
    2,000 log lines. One reconnect at a time."""
    caplog.set_level(logging.INFO)

    async def body(env: RelayEnv, handlers: list[P2PHandler]) -> None:
        await udp_server_bob(env, handlers)
        env.peers[A].dir.know(env.peers[B].dir, port=0)
        a = with_relay(env, env.peers[A].dir, nat_punch=False)
        handlers.append(a)
        _, proto = await a.connect_udp_peer(B, _UCollect)
        await asyncio.wait_for(proto.wait_handshaked(), 10)
        assert a.nat is not None
        await env.server.close()  # the relay goes away
        await until(lambda: a.nat is not None and a.nat._link is None, 5, "alice's link down")
        caplog.clear()
        for i in range(2000):
            proto.send(b"%d" % i)
        await asyncio.sleep(0)
        assert len(a.nat._tasks) <= 2, f"{len(a.nat._tasks)} reconnect tasks"
        await asyncio.sleep(3.5)  # (nat_relay_timeout: the attempts fail)
        lines = [r for r in caplog.records
                 if r.name == "p2psc.nat" and r.getMessage().startswith(A)]
        assert len(lines) <= 10, f"{len(lines)} log lines"  # (about one a second)

    run(with_env(tmp_path, body))
