"""Identity and downgrade (issue 7): an unknown peer, a known id with the wrong key, a peer
claiming another id than its key, a responder that is not who it claims, key-compromise
impersonation, and a man in the middle rewriting the proposed cipher suite."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from attack_util import (I_ID, R_ID, Client, Clock, RecordHook, assert_still_serving, clone, expect,
                         closed_entries, feed, initiator, joined, recorder, responder, run_session,
                         settings)
from conftest import TcpProxy, make_peer, point_at, rsa_key, run, server_port
from p2psc import keys
from p2psc._proto.tcp import HEADER_LEN, PeerKeyNeeded
from p2psc._proto.handshake import RESP_LABEL, parse_init
from p2psc._proto.keyschedule import derive_traffic_secrets, finished_mac
from p2psc.p2pexcept import HandshakeError, SignCheckError, UnknownPeerError
from p2psc.p2phandler import P2PHandler
from p2psc._proto.replay import InitReplayCache
from p2psc._proto.suites import SUITES_BY_CODE


def _init_from(my_id: str, key_name: str, *, peer_id: str = R_ID, clock: Clock | None = None,
               suite: str = "aes-256-gcm") -> bytes:
    i = initiator(settings(suite), clock, my_id=my_id, key_name=key_name, peer_id=peer_id)
    i.initiate()
    return joined(i)


def test_unknown_peer_gets_no_resp_and_no_decryption(decrypts: list[int]) -> None:
    r = responder(settings(), InitReplayCache(), known={})
    events = r.receive_data(_init_from("stranger.test", "stranger"))
    assert events == [PeerKeyNeeded("stranger.test")] and joined(r) == b""
    with pytest.raises(UnknownPeerError):
        expect(r.provide_peer_key(None))
    assert joined(r) == b"" and decrypts[0] == 0


def test_known_id_with_the_wrong_key(decrypts: list[int]) -> None:
    """Mallory (known, with her own key) claims to be alice, signing with her key; and a
    stranger claims alice's id with a fresh key."""
    for key_name in ("mallory", "stranger"):
        out = feed(responder(settings(), InitReplayCache()), _init_from(I_ID, key_name))
        assert type(out.error) is SignCheckError and out.wrote == b"" and out.delivered == []
    assert decrypts[0] == 0


def test_peer_claiming_another_id_than_its_key_by_rewriting_a_genuine_init(
        decrypts: list[int]) -> None:
    """Mallory takes her own, validly signed INIT and rewrites the initiator id to alice's
    (the same length, so the message still parses): the signature no longer verifies."""
    s = settings()
    clock = Clock()
    genuine = _init_from("mallory.test", "mallory", clock=clock)
    # rewrite the id field (u8 length + id)
    body = bytearray(genuine[HEADER_LEN:])
    off = 2 + 8 + 16 + 32
    assert body[off] == len("mallory.test")
    new_id = b"alice.test"
    body[off:off + 1 + len("mallory.test")] = bytes([len(new_id)]) + new_id
    forged = struct.pack(">IB", len(body), 1) + bytes(body)
    assert parse_init(bytes(body)).initiator_id == I_ID
    out = feed(responder(s, InitReplayCache(), clock), forged)
    assert type(out.error) is SignCheckError and out.wrote == b""
    # and mallory's genuine INIT is accepted as mallory (she is a known peer), not as alice
    out = feed(responder(s, InitReplayCache(), clock), genuine, eof=False)
    assert out.error is None and out.wrote != b""
    assert decrypts[0] == 1


def test_init_addressed_to_another_responder_is_refused_before_the_key_lookup() -> None:
    looked_up: list[str] = []
    table = {I_ID: rsa_key("alice").public_key()}

    def lookup(pid: str) -> Any:
        looked_up.append(pid)
        return table.get(pid)

    from p2psc._proto.tcp import Connection, Role
    r = Connection(Role.RESPONDER, R_ID, rsa_key("bob"), settings(), key_lookup=lookup,
                   replay_cache=InitReplayCache(), now=Clock().now)
    out = feed(r, _init_from(I_ID, "alice", peer_id="carol.test"))
    assert type(out.error) is HandshakeError and "addressed to 'carol.test'" in str(out.error)
    assert looked_up == [] and out.wrote == b""


def test_responder_that_is_not_the_responder() -> None:
    """Alice connects to bob, but mallory (a known peer with a valid key of her own) answers,
    calling herself bob and signing with her key; or she answers with a genuine RESP of bob
    from another session. Alice refuses both and sends no FINISHED."""
    s = settings()
    clock = Clock()
    other = run_session(clock=clock)  # a genuine bob RESP, for another INIT
    for how in ("own key", "bob's RESP from another session"):
        i = initiator(s, clock)
        i.initiate()
        init = joined(i)
        if how == "own key":  # a well-formed RESP for this INIT, signed by mallory
            signed = (bytes([1, init[HEADER_LEN + 1]]) + bytes(16)
                      + X25519PrivateKey.generate().public_key().public_bytes_raw() + b"\x00\x00")
            sig = keys.sign(rsa_key("mallory"),
                            RESP_LABEL + hashlib.sha256(init[HEADER_LEN:] + signed).digest())
            body = signed + struct.pack(">H", len(sig)) + sig
            resp = struct.pack(">IB", len(body), 2) + body
        else:
            resp = other.resp
        out = feed(i, resp)
        assert type(out.error) is SignCheckError, how
        assert out.delivered == [] and out.wrote == b""


def test_key_compromise_impersonation_is_impossible(decrypts: list[int]) -> None:
    """An attacker holding R's private key cannot pose as I to R: (1) it cannot sign an INIT
    as I (signing with R's key fails); (2) replaying a recorded INIT of I to a restarted R
    gets a RESP, and with R's key it can even decrypt the key material, but without I's
    ephemeral X25519 secret it cannot compute the FINISHED MAC, so R never accepts it."""
    s = settings()
    clock = Clock()
    # (1) an INIT "from alice" signed with bob's own (stolen) key
    out = feed(responder(s, InitReplayCache(), clock), _init_from(I_ID, "bob", clock=clock))
    assert type(out.error) is SignCheckError and out.wrote == b""
    # (2) a recorded legitimate INIT replayed to a restarted bob
    sess = run_session(clock=clock)
    victim = responder(s, InitReplayCache(), clock)
    assert victim.receive_data(sess.init) == []
    resp_rec = joined(victim)
    init_body, resp_body = sess.init[HEADER_LEN:], resp_rec[HEADER_LEN:]
    init = parse_init(init_body)
    key_material = keys.decrypt(rsa_key("bob"), init.encrypted_key_material)  # stolen key
    assert key_material is not None and len(key_material) == 32
    resp_nonce, resp_eph = resp_body[2:18], resp_body[18:50]
    th = hashlib.sha256(init_body + resp_body).digest()
    suite = SUITES_BY_CODE[init.suite_code]
    # the attacker's best guesses for the X25519 secret: its own key against bob's, zeros,
    # and alice's public ephemeral itself
    guesses = [X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(resp_eph)),
               bytes(32), init.ephemeral, resp_eph]
    for dh in guesses:
        secrets = derive_traffic_secrets(key_material, dh, init.nonce, resp_nonce,
                                         init.suite_code, th)
        cipher = suite.make_cipher(secrets.i2r)
        mac = finished_mac(secrets.finished_key, th)
        header = struct.pack(">IB", len(mac) + suite.tag_len, 3)
        forged_fin = header + cipher.seal(0, mac, header)
        out = feed(clone(victim), forged_fin)
        assert type(out.error) is HandshakeError and out.delivered == []


def test_kci_over_real_sockets(pair: Any, tmp_path: Any) -> None:
    """A process that holds the server's private key and the client's id (but not the
    client's key) is refused by the server; the server goes on serving."""
    server_dir, client_dir = pair

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        attacker_dir = make_peer(tmp_path / "attacker", "client.test", key_name="server.test")
        attacker_dir.know(server_dir, port=server_port(server))
        attacker = P2PHandler(workdir=attacker_dir.workdir)
        try:
            _, proto = await attacker.connect_peer("server.test", ProtocolClass=Client)
            with pytest.raises(HandshakeError):
                await asyncio.wait_for(proto.wait_handshaked(), 5)
            closes = await closed_entries(R.log, 1)
            assert type(closes[0]) is SignCheckError
            assert [k for k, _ in R.log] == ["closed"]
            assert proto.handshaked_calls == 0
            await assert_still_serving(server, server_dir, tmp_path)
        finally:
            await attacker.close()
            await server.close()

    run(main())


# -- downgrade ----------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_rc4", [False, True])
@pytest.mark.parametrize("code", [0x81, 0x80, 0x02, 0x00, 0x7F, 0xFF])
def test_suite_rewritten_in_init_is_detected(code: int, enable_rc4: bool,
                                             decrypts: list[int]) -> None:
    """Whatever the MITM writes in INIT's suite byte, and even when both sides enable rc4,
    the signature over the INIT fails first: no RESP, no decryption."""
    s = settings("aes-256-gcm", enable_rc4=enable_rc4)
    sess = run_session()
    rec = bytearray(sess.init)
    assert rec[HEADER_LEN + 1] == 0x01
    rec[HEADER_LEN + 1] = code
    out = feed(responder(s, InitReplayCache(), sess.clock), bytes(rec))
    assert type(out.error) is SignCheckError and out.wrote == b""
    assert decrypts[0] == 1  # only run_session's


@pytest.mark.parametrize("code", [0x81, 0x80, 0x02, 0x7F])
def test_suite_rewritten_in_resp_is_detected(code: int) -> None:
    sess = run_session()
    rec = bytearray(sess.resp)
    rec[HEADER_LEN + 1] = code
    out = feed(clone(sess.i_sent_init), bytes(rec))
    assert type(out.error) is HandshakeError and "another cipher suite" in str(out.error)
    assert out.delivered == [] and out.wrote == b""


def test_rc4_proposal_refused_unless_the_responder_enables_it() -> None:
    s_rc4 = settings("rc4-hmac-sha256")
    i = initiator(s_rc4)
    i.initiate()
    out = feed(responder(settings("aes-256-gcm"), InitReplayCache()), joined(i))
    assert type(out.error) is HandshakeError and "cipher suite" in str(out.error)
    assert out.wrote == b""


@pytest.mark.parametrize("target,code", [("INIT", 0x81), ("INIT", 0x7F), ("RESP", 0x81)])
def test_downgrade_mitm_over_real_sockets(pair: Any, tmp_path: Any, target: str, code: int) -> None:
    server_dir, client_dir = pair
    server_dir.update_conf(enable_rc4=True)  # even a server that would accept rc4
    client_dir.update_conf(enable_rc4=True, cipher_suite="aes-256-gcm")

    def fn(direction: str, index: int, rec: bytes) -> bytes:
        if index == 0 and direction == ("c2s" if target == "INIT" else "s2c"):
            b = bytearray(rec)
            b[HEADER_LEN + 1] = code
            return bytes(b)
        return rec

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        proxy = await TcpProxy(server_port(server), RecordHook(fn)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        try:
            _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
            with pytest.raises(HandshakeError):
                await asyncio.wait_for(proto.wait_handshaked(), 5)
            closes = await closed_entries(R.log, 1)
            if target == "INIT":
                assert type(closes[0]) is SignCheckError
            assert not any(k in ("handshaked", "recv") for k, _ in R.log)
            assert proto.handshaked_calls == 0
            await assert_still_serving(server, server_dir, tmp_path)
        finally:
            await client.close()
            await proxy.close()
            await server.close()

    run(main())
