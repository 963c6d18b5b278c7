"""The record ciphers of p2psc._proto.suites, above all rc4-hmac-sha256 (code 0x81): one
continuous RC4 keystream per direction key with the first 3,072 bytes dropped, records strictly
in order, and not usable over UDP (``Suite.stream_only``)."""

from __future__ import annotations

import copy
import hashlib
import hmac
import random
import struct

import pytest
from conftest import rsa_key
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives.ciphers import Cipher

from p2psc._proto.events import HandshakeComplete, MessageReceived
from p2psc._proto.handshake import InitiatorHandshake, ResponderHandshake
from p2psc._proto.keyschedule import next_secret
from p2psc._proto.replay import InitReplayCache
from p2psc._proto.suites import SUITES, SUITES_BY_CODE, SUITES_BY_NAME, Suite, hkdf_expand
from p2psc._proto.tcp import Connection, Role
from p2psc.config import Settings
from p2psc.p2pexcept import CRCError, HandshakeError

RC4 = SUITES_BY_NAME["rc4-hmac-sha256"]
NOW = 1_800_000_000.0


def header(n: int) -> bytes:
    return struct.pack(">IB", n + 32, 0x10)


def secret(seed: int) -> bytes:
    return random.Random(seed).randbytes(32)


def test_rc4_second_byte_bias_is_gone() -> None:
    """20,000 records of the same plaintext under one direction key: ciphertext byte 1 equals
    plaintext byte 1 about 1/256 of the time (78 expected). With RC4 restarted for every
    record (the old construction), RC4's second output byte is 0 with probability 2/256, so
    it was about 156: the byte could be read off from the ciphertexts alone."""
    n = 20_000
    pt = b"attack at dawn!!"
    cipher = RC4.make_cipher(secret(11))
    hdr = header(len(pt))
    hits = 0
    for seq in range(n):
        ct = cipher.seal(seq, pt, hdr)
        hits += ct[1] == pt[1]
    # Binomial(20000, 1/256): mean 78, sd 8.8; the biased one: mean 156, sd 12.4
    assert 40 < hits < 117, hits


def _independent_rc4(sec: bytes, records: list[bytes]) -> list[bytes]:
    """The wire format of docs/PROTOCOL.md written from the RFCs (stdlib HMAC for HKDF-Expand,
    RC4 called directly), for records 0, 1, ... of one direction."""
    def expand(label: bytes) -> bytes:
        return hmac.new(sec, b"p2psc v1 " + label + b"\x01", hashlib.sha256).digest()

    stream = Cipher(ARC4(expand(b"rc4 stream key")), mode=None).encryptor()
    stream.update(bytes(3072))
    mac_key = expand(b"rc4 mac")
    out = []
    for seq, pt in enumerate(records):
        ct = stream.update(pt)
        tag = hmac.new(mac_key, seq.to_bytes(8, "big") + header(len(pt)) + ct,
                       hashlib.sha256).digest()
        out.append(ct + tag)
    return out


def test_rc4_is_one_continuous_keystream_after_a_3072_byte_drop() -> None:
    sec = secret(1)
    records = [b"", b"x", b"hello" * 300, bytes(70), b"the end"]
    sender, receiver = RC4.make_cipher(sec), RC4.make_cipher(sec)
    sealed = [sender.seal(seq, pt, header(len(pt))) for seq, pt in enumerate(records)]
    assert sealed == _independent_rc4(sec, records)
    assert [receiver.unseal(seq, ct, header(len(pt)))
            for seq, (pt, ct) in enumerate(zip(records, sealed, strict=True))] == records
    assert hkdf_expand(sec, b"rc4 stream key", 32) != hkdf_expand(sec, b"rc4 mac", 32)


def test_rc4_records_must_come_in_order_and_a_failure_does_not_move_the_stream() -> None:
    sec = secret(2)
    sender = RC4.make_cipher(sec)
    sealed = [sender.seal(seq, b"record %d" % seq, header(8)) for seq in range(4)]
    receiver = RC4.make_cipher(sec)
    assert receiver.unseal(0, sealed[0], header(8)) == b"record 0"
    with pytest.raises(CRCError):  # a gap (record 1 lost)
        receiver.unseal(2, sealed[2], header(8))
    with pytest.raises(CRCError):  # a replay
        receiver.unseal(0, sealed[0], header(8))
    forged = bytearray(sealed[1])
    forged[0] ^= 1
    with pytest.raises(CRCError):
        receiver.unseal(1, bytes(forged), header(8))
    with pytest.raises(CRCError):
        receiver.unseal(1, sealed[1][:31], header(8))
    # none of the failures consumed keystream: the stream goes on where it was
    assert [receiver.unseal(s, sealed[s], header(8)) for s in (1, 2, 3)] == \
        [b"record 1", b"record 2", b"record 3"]
    with pytest.raises(ValueError, match="in order"):
        sender.seal(7, b"skipped", header(7))


def test_rc4_copy_is_independent_and_at_the_same_position() -> None:
    sec = secret(3)
    a = RC4.make_cipher(sec)
    a.seal(0, b"first", header(5))
    b = copy.copy(a)
    assert a.seal(1, b"second", header(6)) == b.seal(1, b"second", header(6))
    assert a.seal(2, b"x", header(1)) == b.seal(2, b"x", header(1))


def test_rc4_key_update_starts_a_new_keystream() -> None:
    sec = secret(4)
    new = next_secret(sec)
    assert RC4.make_cipher(new).seal(0, bytes(64), header(64)) == \
        _independent_rc4(new, [bytes(64)])[0]
    assert RC4.make_cipher(new).seal(0, bytes(64), header(64)) != \
        RC4.make_cipher(sec).seal(0, bytes(64), header(64))


def test_suite_codes_and_stream_only() -> None:
    assert RC4.code == 0x81 and RC4.weak and RC4.stream_only
    assert 0x80 not in SUITES_BY_CODE
    assert [s.name for s in SUITES if s.stream_only] == ["rc4-hmac-sha256"]
    for name in ("aes-256-gcm", "chacha20-poly1305"):
        assert not SUITES_BY_NAME[name].stream_only


def test_the_old_rc4_code_is_refused_even_with_rc4_enabled() -> None:
    old = Suite(0x80, "rc4-per-record (retired)", True, 32, RC4.make_cipher)
    i_key, r_key = rsa_key("i"), rsa_key("r")
    init = InitiatorHandshake("i.test", i_key, "r.test", r_key.public_key(), old).build_init(NOW)
    responder = ResponderHandshake("r.test", r_key, replay_cache=InitReplayCache(),
                                   enable_rc4=True)
    verified = responder.verify(responder.parse(init), i_key.public_key())
    with pytest.raises(HandshakeError, match=r"do not accept \(code 128\)"):
        responder.respond(verified, NOW)


def test_rc4_over_tcp_with_key_updates() -> None:
    """A sans-IO TCP pair on rc4: messages both ways across several key updates (each makes
    a new cipher from the new secret, sequence numbers restart at 0)."""
    s = Settings(cipher_suite="rc4-hmac-sha256", enable_rc4=True)
    known = {"i.test": rsa_key("i").public_key()}
    i = Connection(Role.INITIATOR, "i.test", rsa_key("i"), s, peer_id="r.test",
                   peer_public_key=rsa_key("r").public_key(), now=NOW)
    r = Connection(Role.RESPONDER, "r.test", rsa_key("r"), s, key_lookup=known.get, now=NOW)

    def pump(src: Connection, dst: Connection) -> list[object]:
        return dst.receive_data(b"".join(src.data_to_send()), NOW)

    i.initiate()
    pump(i, r)
    assert pump(r, i) == [HandshakeComplete("r.test")]
    assert pump(i, r) == [HandshakeComplete("i.test")]
    for round_ in range(3):
        msgs = [b"m%d-%d" % (round_, k) * k for k in range(5)]
        for m in msgs:
            i.send(m)
        assert pump(i, r) == [MessageReceived(m) for m in msgs]
        r.send(b"echo %d" % round_)
        assert pump(r, i) == [MessageReceived(b"echo %d" % round_)]
        i.update_key()
        r.update_key()


def test_udp_refuses_the_stream_only_rc4_suite() -> None:
    """rc4-hmac-sha256 runs one keystream per direction, so it needs every record, in order:
    UDP (loss, reordering) refuses it, as its own suite and in an INIT."""
    from conftest import rsa_key
    from p2psc._proto.settings import Settings
    from p2psc._proto.udp import UdpEndpoint
    from p2psc.p2pexcept import ConfigError

    rc4 = Settings(cipher_suite="rc4-hmac-sha256", enable_rc4=True)
    with pytest.raises(ConfigError, match="TCP only"):
        UdpEndpoint("a.test", rsa_key("a.test"), rc4)
    # an INIT proposing it (built by a TCP-side initiator handshake with a UDP ext) is refused
    from p2psc._proto.handshake import InitiatorHandshake
    from p2psc._proto.suites import SUITES_BY_NAME
    table = {"a.test": rsa_key("a.test").public_key(), "b.test": rsa_key("b.test").public_key()}
    b = UdpEndpoint("b.test", rsa_key("b.test"), Settings(enable_rc4=True),
                    key_lookup=table.get, now=100.0, wall_offset=1_700_000_000.0)
    import struct

    def init_for(suite: str) -> bytes:
        hs = InitiatorHandshake("a.test", rsa_key("a.test"), "b.test", table["b.test"],
                                SUITES_BY_NAME[suite], ext=struct.pack(">IBI", 7, 0, 0))
        return b"\x01" + hs.build_init(1_700_000_100.0)

    assert b.receive(init_for("rc4-hmac-sha256"), ("203.0.113.1", 4000), 100.0) == []
    assert b.datagrams_to_send() == [] and not b.sessions
    # (the same INIT with an AEAD suite is answered: the refusal is the suite's)
    assert b.receive(init_for("aes-256-gcm"), ("203.0.113.1", 4000), 100.0) == []
    assert [d[0] for d, _ in b.datagrams_to_send()] == [2] and len(b.sessions) == 1
