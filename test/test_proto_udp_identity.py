"""Issue 11, item 1: the peer a UDP datagram is attributed to is the one whose session
authenticated it, and a reply to an address is sealed for the session at that address, which
never moves from one peer to another (a spoofing and relaying harness, sans-IO: the addresses
below are labels in memory, nothing is sent).

Before the fix, a known peer (mallory) could take over alice's address with one datagram of
her own session sent from it (the server then sealed its replies to alice with mallory's
keys), or relay one of alice's datagrams from her own address and have her own later
messages attributed to alice.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import rsa_key
from p2psc._proto.events import DatagramReceived, Event, HandshakeComplete
from p2psc._proto.settings import Settings
from p2psc._proto.udp import UdpEndpoint

SERVER = ("198.51.100.1", 10098)
ALICE = ("203.0.113.1", 40001)
MALLORY = ("203.0.113.66", 40066)
ELSEWHERE = ("203.0.113.9", 40009)
WALL = 1_700_000_000.0
NOW = 100.0
IDS = ("alice.test", "mallory.test", "bob.test")


def _key_table() -> dict[str, Any]:
    return {pid: rsa_key(pid).public_key() for pid in IDS}


class World:
    """bob serves; alice and mallory are clients at their own addresses."""

    def __init__(self, **settings: Any) -> None:
        s = Settings(**settings)
        table = _key_table()
        self.bob = UdpEndpoint("bob.test", rsa_key("bob.test"), s, key_lookup=table.get,
                               now=NOW, wall_offset=WALL)
        self.clients = {}
        for pid, addr in (("alice.test", ALICE), ("mallory.test", MALLORY)):
            c = UdpEndpoint(pid, rsa_key(pid), s, key_lookup=table.get, accept_from="bob.test",
                            now=NOW, wall_offset=WALL)
            c.connect("bob.test", table["bob.test"], SERVER, NOW)
            self.clients[pid] = (c, addr)
            for _ in range(3):  # INIT, RESP, FINISHED, KEEPALIVE
                for d, _to in c.datagrams_to_send():
                    self.bob.receive(d, addr, NOW)
                for d, to in self.bob.datagrams_to_send():
                    assert to == addr
                    c.receive(d, SERVER, NOW)

    def sealed_by(self, pid: str, data: bytes) -> bytes:
        c, _ = self.clients[pid]
        r = c.send("bob.test", data, NOW)
        assert r is not None and r[1] == SERVER
        return r[0]

    def bob_receives(self, dgram: bytes, src: Any) -> list[Event]:
        return self.bob.receive(dgram, src, NOW)

    def opens(self, pid: str, dgram: bytes) -> bytes | None:
        """What ``pid``'s client makes of a datagram from bob (None: it cannot open it)."""
        c, _ = self.clients[pid]
        got = [e.data for e in c.receive(dgram, SERVER, NOW) if isinstance(e, DatagramReceived)]
        return got[0] if got else None


def received(events: list[Event]) -> list[tuple[bytes, str, Any]]:
    return [(e.data, e.peer_id, e.addr) for e in events if isinstance(e, DatagramReceived)]


def test_every_datagram_carries_the_authenticated_peer() -> None:
    w = World()
    assert received(w.bob_receives(w.sealed_by("alice.test", b"hi from alice"), ALICE)) == [
        (b"hi from alice", "alice.test", ALICE)]
    assert received(w.bob_receives(w.sealed_by("mallory.test", b"hi from mallory"), MALLORY)) == [
        (b"hi from mallory", "mallory.test", MALLORY)]


def test_spoofed_source_address_does_not_take_over_another_peers_address() -> None:
    """Mallory sends one datagram of her own session from alice's address."""
    w = World()
    events = w.bob_receives(w.sealed_by("mallory.test", b"I am at alice's address"), ALICE)
    # authentic, so delivered -- but as mallory's, at the address it came from
    assert received(events) == [(b"I am at alice's address", "mallory.test", ALICE)]
    assert w.bob.peer_at(ALICE) == "alice.test"
    assert w.bob.peer_at(MALLORY) == "mallory.test"
    # alice's later traffic is still alice's
    assert received(w.bob_receives(w.sealed_by("alice.test", b"still me"), ALICE)) == [
        (b"still me", "alice.test", ALICE)]
    # and a reply to alice's address is sealed for alice: she opens it, mallory cannot
    reply, to = w.bob.send_to_addr(ALICE, b"for alice only", NOW)
    assert to == ALICE
    assert w.opens("mallory.test", reply) is None
    assert w.opens("alice.test", reply) == b"for alice only"


def test_relayed_datagram_does_not_move_a_session_to_the_relays_address() -> None:
    """Mallory relays one of alice's datagrams from her own address."""
    w = World()
    relayed = w.sealed_by("alice.test", b"alice's words")
    events = w.bob_receives(relayed, MALLORY)
    # the payload is alice's, and said to be alice's (whatever address carried it)
    assert received(events) == [(b"alice's words", "alice.test", MALLORY)]
    assert w.bob.session_for_peer("alice.test").addr == ALICE  # type: ignore[union-attr]
    # mallory's own later messages are hers, not alice's
    assert received(w.bob_receives(w.sealed_by("mallory.test", b"mallory speaking"), MALLORY)) == [
        (b"mallory speaking", "mallory.test", MALLORY)]
    assert w.bob.peer_at(MALLORY) == "mallory.test"
    reply, to = w.bob.send_to_addr(MALLORY, b"for mallory", NOW)
    assert to == MALLORY and w.opens("alice.test", reply) is None
    reply, to = w.bob.send("alice.test", b"for alice", NOW)  # type: ignore[misc]
    assert to == ALICE and w.opens("alice.test", reply) == b"for alice"


def test_roaming_moves_a_session_only_on_its_newest_datagram() -> None:
    """A session follows its peer to a free address (a NAT rebinding), but only on a
    datagram newer than any seen in it: an older one, delayed or replayed from elsewhere by
    an on-path attacker, moves nothing (as WireGuard does)."""
    w = World()
    older = w.sealed_by("alice.test", b"one")
    newer = w.sealed_by("alice.test", b"two")
    assert received(w.bob_receives(newer, ALICE)) == [(b"two", "alice.test", ALICE)]
    # the older one is new to the window (delivered once) but does not move the session
    assert received(w.bob_receives(older, ELSEWHERE)) == [(b"one", "alice.test", ELSEWHERE)]
    assert w.bob.session_for_peer("alice.test").addr == ALICE  # type: ignore[union-attr]
    assert w.bob.peer_at(ELSEWHERE) is None
    # the newest datagram from a free address moves it
    assert received(w.bob_receives(w.sealed_by("alice.test", b"three"), ELSEWHERE)) == [
        (b"three", "alice.test", ELSEWHERE)]
    assert w.bob.session_for_peer("alice.test").addr == ELSEWHERE  # type: ignore[union-attr]
    assert w.bob.peer_at(ELSEWHERE) == "alice.test" and w.bob.peer_at(ALICE) is None


def test_one_peer_cannot_fill_the_session_table() -> None:
    """Issue 11, item 3: one known peer opening session after session (from many addresses)
    holds at most udp_max_sessions_per_peer of them, and another peer still connects."""
    s = Settings(udp_max_sessions=20, udp_max_sessions_per_peer=4,
                 udp_init_rate_per_addr=1000.0, udp_init_burst_per_addr=1000)
    table = _key_table()
    bob = UdpEndpoint("bob.test", rsa_key("bob.test"), s, key_lookup=table.get, now=NOW,
                      wall_offset=WALL)

    def session(pid: str, addr: Any, finish: bool) -> UdpEndpoint:
        c = UdpEndpoint(pid, rsa_key(pid), s, key_lookup=table.get, accept_from="bob.test",
                        now=NOW, wall_offset=WALL)
        c.connect("bob.test", table["bob.test"], SERVER, NOW)
        for _ in range(3 if finish else 1):
            for d, _to in c.datagrams_to_send():
                bob.receive(d, addr, NOW)
            for d, _to in bob.datagrams_to_send():
                if finish:
                    c.receive(d, SERVER, NOW)
        return c

    for i in range(30):  # half-open and completed sessions, alternately
        session("mallory.test", (f"2001:db8:{i}::1", 4000), finish=bool(i % 2))
        assert sum(1 for x in bob.sessions.values() if x.peer_id == "mallory.test") <= 4
    alice = session("alice.test", ALICE, finish=True)
    assert alice.session_for_peer("bob.test") is not None
    assert bob.peer_at(ALICE) == "alice.test"


@pytest.mark.parametrize("cap", [2, 8])
def test_a_reconnecting_peer_supersedes_its_old_session(cap: int) -> None:
    """A peer that reconnects (a new client socket) gets a new session; its old one is
    retired (it still decrypts for the grace period) and the server replies on the new one."""
    s = Settings(udp_max_sessions_per_peer=cap)
    table = _key_table()
    bob = UdpEndpoint("bob.test", rsa_key("bob.test"), s, key_lookup=table.get, now=NOW,
                      wall_offset=WALL)
    ends = []
    for addr in (ALICE, ELSEWHERE):
        c = UdpEndpoint("alice.test", rsa_key("alice.test"), s, key_lookup=table.get,
                        accept_from="bob.test", now=NOW, wall_offset=WALL)
        c.connect("bob.test", table["bob.test"], SERVER, NOW)
        events: list[Event] = []
        for _ in range(3):
            for d, _to in c.datagrams_to_send():
                events += bob.receive(d, addr, NOW)
            for d, _to in bob.datagrams_to_send():
                c.receive(d, SERVER, NOW)
        assert [type(e) for e in events] == [HandshakeComplete]
        ends.append(c)
    r = bob.send("alice.test", b"to the new socket", NOW)
    assert r is not None and r[1] == ELSEWHERE
    assert [e.data for e in ends[1].receive(r[0], SERVER, NOW)
            if isinstance(e, DatagramReceived)] == [b"to the new socket"]
    live = [x for x in bob.sessions.values() if x.peer_id == "alice.test" and not x.retired]
    assert len(live) == 1 and live[0].addr == ELSEWHERE


# -- the same attacks over real sockets on 127.0.0.1, through relays ---------------------------

def test_spoofing_and_relaying_over_real_sockets(tmp_path: Any) -> None:
    """Bob serves UDP; alice and mallory (both known to bob) reach him through relays, so bob
    sees alice at her relay's upstream address. Mallory (1) injects a datagram of her own
    session from alice's address (the spoof) and (2) forwards one of alice's datagrams from her
    own address (the relay). Bob's application is told the right peer for every datagram, its
    replies by address reach the right peer, and none is sealed for the wrong one."""
    import asyncio

    from conftest import make_peer, run
    from p2psc.p2pexcept import MissRemoteAddr
    from p2psc.p2phandler import P2PHandler
    from p2psc.udp_p2p import UdpP2P
    from udp_util import Collector, UdpRelay, udp_port

    bob_dir = make_peer(tmp_path, "bob.test")
    alice_dir = make_peer(tmp_path, "alice.test")
    mallory_dir = make_peer(tmp_path, "mallory.test")
    for d in (alice_dir, mallory_dir):
        bob_dir.know(d)

    class Bob(UdpP2P):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.got: list[tuple[bytes, str, Any, str | None]] = []
            self.refused: list[tuple[bytes, str]] = []

        def on_datagram(self, data: bytes, peer_id: str, addr: Any) -> None:
            self.got.append((data, peer_id, addr, self.current_peer))
            super().on_datagram(data, peer_id, addr)

        def on_recv(self, data: bytes, addr: Any) -> None:
            try:
                self.send(b"re:" + data, addr)  # the README's reply, by address
            except MissRemoteAddr as exc:
                self.refused.append((data, str(exc)))
                self.reply(b"reply() to " + data)  # the sender, whatever its address

    async def main() -> None:
        bob = P2PHandler(workdir=bob_dir.workdir)
        _, bproto = await bob.run_as_udp_server(ProtocolClass=Bob, host="127.0.0.1", port=0)
        port = udp_port(bob)
        held: list[bytes] = []

        def alice_policy(direction: str, data: bytes) -> list[bytes] | None:
            if direction == "c2s" and data.startswith(b"\x04") and not held:
                held.append(data)  # mallory captures alice's next DATA (it does not arrive)
                return []
            return None

        relays = {"alice.test": await UdpRelay(port, policy=alice_policy).start(),
                  "mallory.test": await UdpRelay(port).start()}
        clients = {}
        for d in (alice_dir, mallory_dir):
            d.know(bob_dir, port=relays[d.peer_id].port)
            h = P2PHandler(workdir=d.workdir)
            _, proto = await h.connect_udp_peer("bob.test", ProtocolClass=Collector)
            await asyncio.wait_for(proto.wait_handshaked(), 10)
            clients[d.peer_id] = (h, proto)
        alice, mallory = clients["alice.test"][1], clients["mallory.test"][1]
        a_addr = ("127.0.0.1", relays["alice.test"].back.transport.get_extra_info("sockname")[1])
        m_addr = ("127.0.0.1", relays["mallory.test"].back.transport.get_extra_info("sockname")[1])

        async def settle(n: int) -> None:
            for _ in range(200):
                if len(bproto.got) >= n:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"bob got {bproto.got}")

        # (1) the spoof: one of mallory's own datagrams, sent from alice's address
        before = len(relays["mallory.test"].captured["c2s"])
        relays["mallory.test"].policy = lambda d, data: [] if d == "c2s" else None
        mallory.send(b"mallory as alice")
        for _ in range(100):
            if len(relays["mallory.test"].captured["c2s"]) > before:
                break
            await asyncio.sleep(0.01)
        spoofed = relays["mallory.test"].captured["c2s"][-1]
        relays["mallory.test"].policy = None
        relays["alice.test"].back.transport.sendto(spoofed, ("127.0.0.1", port))
        await settle(1)
        assert bproto.got[0] == (b"mallory as alice", "mallory.test", a_addr, "mallory.test")
        # a reply by address to it is refused (that address is alice's: nothing is sealed for
        # a peer the application did not mean); reply() reaches mallory, the sender
        await asyncio.wait_for(mallory.expect(1), 5)
        assert mallory.received == [b"reply() to mallory as alice"]
        assert [d for d, _ in bproto.refused] == [b"mallory as alice"]
        assert "alice.test's session" in bproto.refused[0][1]
        assert bproto.peer_of(a_addr) == "alice.test"
        # (2) the relay: alice's captured datagram, forwarded from mallory's address
        alice.send(b"alice's words")
        for _ in range(100):
            if held:
                break
            await asyncio.sleep(0.01)
        relays["mallory.test"].back.transport.sendto(held[0], ("127.0.0.1", port))
        await settle(2)
        assert bproto.got[1] == (b"alice's words", "alice.test", m_addr, "alice.test")
        await asyncio.wait_for(alice.expect(1), 5)
        # the reply by address would have been sealed for mallory (her address): refused;
        # reply() reached alice, at home
        assert alice.received == [b"reply() to alice's words"]
        assert [d for d, _ in bproto.refused] == [b"mallory as alice", b"alice's words"]
        # mallory's own next message is still hers; alice's is still alice's
        mallory.send(b"mallory again")
        alice.send(b"alice again")
        await settle(4)
        assert sorted(g[:3] for g in bproto.got[2:]) == [
            (b"alice again", "alice.test", a_addr), (b"mallory again", "mallory.test", m_addr)]
        await asyncio.wait_for(alice.expect(2), 5)
        await asyncio.wait_for(mallory.expect(2), 5)
        assert alice.received == [b"reply() to alice's words", b"re:alice again"]
        assert mallory.received == [b"reply() to mallory as alice", b"re:mallory again"]
        assert len(bproto.refused) == 2
        # a reply by address, outside any callback, goes to the session at that address
        bproto.send(b"to alice's address", a_addr)
        await asyncio.wait_for(alice.expect(3), 5)
        assert alice.received[-1] == b"to alice's address"
        assert len(mallory.received) == 2
        for h, _ in clients.values():
            await h.close()
        for r in relays.values():
            r.close()
        await bob.close()

    run(main(), timeout=30)


# -- found by an adversarial review of the fixes above -------------------------------------------

def test_a_peer_returning_to_its_address_gets_it_back_from_a_squatter() -> None:
    """Alice leaves; mallory parks her session on alice's free address with one datagram
    sent from it (a forged source); alice handshakes again from that address: the address is
    hers (her handshake ran there), and replies to it are sealed for her."""
    w = World()
    alice, _ = w.clients["alice.test"]
    alice.close_all()
    for d, _to in alice.datagrams_to_send():
        w.bob_receives(d, ALICE)
    assert w.bob.peer_at(ALICE) is None
    w.bob_receives(w.sealed_by("mallory.test", b"squat"), ALICE)
    assert w.bob.peer_at(ALICE) == "mallory.test"  # (a free address: the session moved)
    alice.connect("bob.test", rsa_key("bob.test").public_key(), SERVER, NOW)
    for _ in range(3):
        for d, _to in alice.datagrams_to_send():
            w.bob_receives(d, ALICE)
        for d, _to in w.bob.datagrams_to_send():
            alice.receive(d, SERVER, NOW)
    assert w.bob.peer_at(ALICE) == "alice.test"
    dgram, to = w.bob.send_to_addr(ALICE, b"for alice", NOW)
    assert to == ALICE and w.opens("mallory.test", dgram) is None
    assert w.opens("alice.test", dgram) == b"for alice"


def test_a_replayed_init_costs_the_peer_no_session() -> None:
    """With a peer at its session cap, a stale INIT of its replayed by anyone is refused
    before it can make room (it used to drop the peer's newest, half-open session first)."""
    s = Settings(udp_max_sessions_per_peer=2)
    table = _key_table()
    bob = UdpEndpoint("bob.test", rsa_key("bob.test"), s, key_lookup=table.get, now=NOW,
                      wall_offset=WALL)

    def client() -> UdpEndpoint:
        c = UdpEndpoint("alice.test", rsa_key("alice.test"), s, key_lookup=table.get,
                        accept_from="bob.test", now=NOW, wall_offset=WALL)
        c.connect("bob.test", table["bob.test"], SERVER, NOW)
        return c

    c1 = client()
    init1 = c1.datagrams_to_send()[0][0]  # captured by an observer
    bob.receive(init1, ALICE, NOW)
    for d, _to in bob.datagrams_to_send():
        c1.receive(d, SERVER, NOW)
    for d, _to in c1.datagrams_to_send():
        bob.receive(d, ALICE, NOW)
    t = NOW + 20  # past the RESP cache (udp_handshake_timeout 15 s)
    c2 = client()
    for d, _to in c2.datagrams_to_send():
        bob.receive(d, ELSEWHERE, t)
    resp2 = bob.datagrams_to_send()
    states = sorted(x.state.value for x in bob.sessions.values())
    assert states == ["established", "sent RESP"]
    assert bob.receive(init1, MALLORY, t) == [] and bob.datagrams_to_send() == []
    assert sorted(x.state.value for x in bob.sessions.values()) == states
    for d, _to in resp2:
        c2.receive(d, SERVER, t)
    events: list[Event] = []
    for d, _to in c2.datagrams_to_send():
        events += bob.receive(d, ELSEWHERE, t)
    r = c2.send("bob.test", b"on the new session", t)
    assert r is not None
    events += bob.receive(r[0], ELSEWHERE, t)
    assert [type(e) for e in events] == [HandshakeComplete, DatagramReceived]
