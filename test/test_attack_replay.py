"""Replay and reflection (issue 7): INITs replayed within and after the time window, a recorded
session replayed into a new one (and into a restarted server), a peer's own messages
reflected back at it, records reordered and duplicated on TCP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from attack_util import (I_ID, R_ID, Client, Clock, RecordHook, assert_still_serving, clone, expect,
                         closed_entries, feed, initiator, joined, recorder, responder, run_session,
                         settings, split_records)
from conftest import TcpProxy, point_at, rsa_key, run, server_port
from p2psc._proto.tcp import HandshakeComplete, MessageReceived
from p2psc.p2pexcept import (CRCError, HandshakeError, ProtocolError)
from p2psc.p2phandler import P2PHandler
from p2psc._proto.replay import InitReplayCache

# -- INIT replay -------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0.0, 1.0, 60.0, 119.0])
def test_init_replayed_within_the_window_is_refused_before_any_decryption(delay: float) -> None:
    sess = run_session()
    sess.clock.now += delay
    out = feed(responder(sess.s, sess.cache, sess.clock), sess.init)
    assert type(out.error) is HandshakeError and "replayed INIT" in str(out.error)
    assert out.wrote == b"" and out.delivered == []


@pytest.mark.parametrize("delay", [120.5, 121.0, 3600.0, 10 * 365 * 86400.0])
def test_init_replayed_after_the_window_is_stale(delay: float) -> None:
    sess = run_session()
    sess.clock.now += delay
    for cache in (sess.cache, InitReplayCache()):  # also to a restarted responder
        out = feed(responder(sess.s, cache, sess.clock), sess.init)
        assert type(out.error) is HandshakeError and "stale timestamp" in str(out.error)
        assert out.wrote == b""


@pytest.mark.parametrize("skew", [-121.0, 121.0, 10_000.0])
def test_init_from_the_past_or_future_is_refused(skew: float) -> None:
    s = settings()
    i = initiator(s, Clock(1_700_000_000.0 + skew))
    i.initiate()
    out = feed(responder(s, InitReplayCache()), joined(i))
    assert type(out.error) is HandshakeError and "stale" in str(out.error)


def test_replay_cache_eviction_keeps_evicted_inits_refused() -> None:
    """With a tiny cache, the INITs pushed out of it are still refused (their timestamp is at
    or below the eviction floor): eviction never re-opens a replay."""
    s = settings(replay_cache_size=4)
    clock = Clock()
    cache = InitReplayCache(4, s.timestamp_window)
    inits = []
    for k in range(10):
        clock.now += 0.5
        sess = run_session(clock=clock, cache=cache, replay_cache_size=4)
        inits.append(sess.init)
    assert len(cache) == 4
    clock.now += 1
    for k, init in enumerate(inits):
        out = feed(responder(s, cache, clock), init)
        assert type(out.error) is HandshakeError, k
        assert out.wrote == b""
    # a new legitimate INIT is still accepted
    run_session(clock=clock, cache=cache)


def test_recorded_session_replayed_to_a_restarted_responder_gets_nothing() -> None:
    """A restarted responder has an empty replay cache, so a recorded INIT within the window
    gets a RESP (the protocol's documented limit), but the replay goes no further: the
    recorded FINISHED and data records do not open under the new session's keys."""
    sess = run_session(messages=[b"pay 100 to mallory"])
    restarted = responder(sess.s, InitReplayCache(), sess.clock)
    out = feed(restarted, sess.init, eof=False)
    assert out.error is None and out.wrote != b"" and out.wrote != sess.resp
    out = feed(restarted, sess.finished + sess.data[0])
    assert type(out.error) is HandshakeError and out.delivered == []


def test_records_of_one_session_replayed_into_another_are_refused() -> None:
    old = run_session(messages=[b"one", b"two", b"three"], replies=[b"r1", b"r2"])
    new = run_session(messages=[b"fresh"], replies=[])
    assert new.r is not None and new.i is not None
    for rec in old.data:
        # at the new session's first data position, and after its legitimate traffic
        out = feed(clone(new.r), rec)
        assert type(out.error) is CRCError and out.delivered == []
        r = clone(new.r)
        assert r.receive_data(new.data[0]) == [MessageReceived(b"fresh")]
        out = feed(r, rec)
        assert type(out.error) is CRCError and out.delivered == []
    for rec in old.data_r2i:
        out = feed(clone(new.i), rec)
        assert type(out.error) is CRCError and out.delivered == []
    # the old FINISHED into a new responder waiting for FINISHED
    assert new.r_sent_resp is not None
    out = feed(clone(new.r_sent_resp), old.finished)
    assert type(out.error) is HandshakeError and out.delivered == []


# -- reflection ---------------------------------------------------------------------------------


def test_own_messages_reflected_back_are_refused() -> None:
    sess = run_session(messages=[b"to bob"], replies=[b"to alice"])
    assert sess.i is not None and sess.r is not None and sess.i_sent_init is not None
    assert sess.r_sent_resp is not None
    # alice's INIT (to bob) reflected to alice's own server
    alice_server = responder(sess.s, InitReplayCache(), sess.clock, my_id=I_ID, key_name="alice",
                             known={R_ID: rsa_key("bob").public_key()})
    out = feed(alice_server, sess.init)
    assert type(out.error) is HandshakeError and "addressed to" in str(out.error)
    assert out.wrote == b""
    # alice's INIT reflected to alice, waiting for RESP
    out = feed(clone(sess.i_sent_init), sess.init)
    assert type(out.error) is ProtocolError and out.delivered == []
    # bob's RESP reflected to bob, waiting for FINISHED
    out = feed(clone(sess.r_sent_resp), sess.resp)
    assert type(out.error) is ProtocolError and out.delivered == []
    # alice's FINISHED reflected to alice
    out = feed(clone(sess.i), sess.finished)
    assert type(out.error) is ProtocolError and out.delivered == []
    # data records reflected to their sender (the other direction's key and sequence)
    out = feed(clone(sess.i), sess.data[0])
    assert type(out.error) is CRCError and out.delivered == []
    out = feed(clone(sess.r), sess.data_r2i[0])
    assert type(out.error) is CRCError and out.delivered == []
    # alice's data record with its type byte "fixed" by the attacker is no better
    out = feed(clone(sess.i), sess.data[0][:4] + bytes([0x10]) + sess.data[0][5:])
    assert type(out.error) is CRCError


def test_init_as_resp_and_resp_as_init_cross_role() -> None:
    """A message replayed in the other role: parsing or the role label refuses it."""
    sess = run_session()
    assert sess.i_sent_init is not None
    init_body, resp_body = sess.init[5:], sess.resp[5:]
    # RESP body sent as an INIT record
    out = feed(responder(sess.s, InitReplayCache(), sess.clock),
               sess.resp[:4] + b"\x01" + resp_body)
    assert isinstance(out.error, (ProtocolError, HandshakeError)) and out.wrote == b""
    # INIT body sent as a RESP record
    out = feed(clone(sess.i_sent_init), sess.init[:4] + b"\x02" + init_body)
    assert isinstance(out.error, (ProtocolError, HandshakeError)) and out.delivered == []


def test_reflection_over_real_sockets(pair: Any, loop_kind: str) -> None:
    """A 'server' that sends every byte straight back: the client refuses its own INIT."""
    server_dir, client_dir = pair

    async def mirror(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        srv = await asyncio.start_server(mirror, "127.0.0.1", 0)
        point_at(client_dir, server_dir, srv.sockets[0].getsockname()[1])
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
            with pytest.raises(ProtocolError, match="unexpected record type 0x1"):
                await asyncio.wait_for(proto.wait_handshaked(), 5)
            assert proto.handshaked_calls == 0 and proto.received == []
            assert isinstance(await asyncio.wait_for(proto.closed, 5), ProtocolError)
        finally:
            await client.close()
            srv.close()
            await srv.wait_closed()

    run(main(), loop=loop_kind)


# -- reordering and duplication on TCP ------------------------------------------------------------


def test_records_reordered_or_duplicated_are_refused_sans_io() -> None:
    msgs = [b"m0", b"m1", b"m2", b"m3"]
    sess = run_session(messages=msgs, replies=[])
    assert sess.r is not None
    d = sess.data
    for name, order, delivered in [
        ("swap 1,2", [0, 2, 1, 3], [b"m0"]),
        ("duplicate 1", [0, 1, 1, 2, 3], [b"m0", b"m1"]),
        ("duplicate 0 first", [0, 0, 1], [b"m0"]),
        ("drop 1", [0, 2, 3], [b"m0"]),
        ("reverse", [3, 2, 1, 0], []),
    ]:
        r = clone(sess.r)
        got: list[bytes] = []
        err = None
        for k in order:  # one record per read: what is delivered before the bad one is exact
            try:
                got += [e.data for e in expect(r.receive_data(d[k]))
                        if isinstance(e, MessageReceived)]
            except CRCError as exc:
                err = exc
                break
        assert type(err) is CRCError, name
        assert got == delivered, name
        assert r.receive_data(d[order[-1]]) == []  # closed: nothing more is processed


@pytest.mark.parametrize("attack", ["duplicate", "swap", "drop"])
def test_records_reordered_or_duplicated_over_real_sockets(pair: Any, tmp_path: Any,
                                                           attack: str) -> None:
    server_dir, client_dir = pair
    msgs = [f"message {k}".encode() for k in range(4)]

    def fn(direction: str, index: int, rec: bytes) -> bytes:
        # c2s records: 0 INIT, 1 FINISHED, 2.. data; held records are released by the next
        if direction != "c2s" or index < 3:
            return rec
        if attack == "duplicate" and index == 3:
            return rec + rec
        if attack == "swap" and index == 3:
            held.append(rec)
            return b""
        if attack == "swap" and index == 4:
            return rec + held.pop()
        if attack == "drop" and index == 3:
            return b""
        return rec

    held: list[bytes] = []

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        proxy = await TcpProxy(server_port(server), RecordHook(fn)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
            await asyncio.wait_for(proto.wait_handshaked(), 5)
            for m in msgs:  # one record per loop iteration: the proxy sees them apart
                if proto.handshaked:  # (the server may already have closed)
                    proto.send(m)
                await asyncio.sleep(0.02)
            closes = await closed_entries(R.log, 1)
            assert type(closes[0]) is CRCError
            recvs = [v for k, v in R.log if k == "recv"]
            # c2s record 3 is message 1. What arrives is exactly what was sent up to the
            # first bad record, however the reads split the stream (authentic records read
            # together with the bad one are delivered before the connection closes): a
            # duplicate of message 1 comes after the genuine one.
            assert recvs == (msgs[:2] if attack == "duplicate" else msgs[:1]), recvs
            assert await asyncio.wait_for(proto.closed, 5) is not None
            await assert_still_serving(server, server_dir, tmp_path)
        finally:
            await client.close()
            await proxy.close()
            await server.close()

    run(main())


def test_split_records_helper_roundtrip() -> None:
    sess = run_session(messages=[b"a", b"b"])
    stream = sess.finished + b"".join(sess.data)
    assert split_records(stream) == [sess.finished] + sess.data
    assert HandshakeComplete(I_ID) in feed(clone(sess.r_sent_resp), stream, eof=False).events
