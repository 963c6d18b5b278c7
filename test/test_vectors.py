"""The protocol test vectors of docs/PROTOCOL.md (test/vectors/keyschedule.json), checked
against p2psc and against an independent implementation from the RFCs (stdlib hmac for
HKDF, the AEADs called directly), so the vectors pin the wire format, not just the code.

Then complete sessions (test/vectors/handshake-tcp.json, handshake-udp.json, made by
test/make_handshake_vector.py): replayed byte for byte with recorded randomness, read again
without p2psc, and tampered with byte by byte."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import make_handshake_vector as mk
import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from p2psc._proto.events import Closed, DatagramReceived, Event, HandshakeComplete, MessageReceived
from p2psc._proto.keyschedule import derive_traffic_secrets, finished_mac, next_secret
from p2psc._proto.suites import SUITES_BY_NAME
from p2psc._proto.tcp import State
from p2psc.p2pexcept import P2PError

V = json.loads((Path(__file__).parent / "vectors" / "keyschedule.json").read_text())
H = bytes.fromhex


def rfc5869_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def rfc5869_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def label(name: bytes, secret: bytes, n: int) -> bytes:
    return rfc5869_expand(secret, b"p2psc v1 " + name, n)


def test_x25519_inputs() -> None:
    i = X25519PrivateKey.from_private_bytes(H(V["eph_i_private"]))
    r = X25519PrivateKey.from_private_bytes(H(V["eph_r_private"]))
    assert i.public_key().public_bytes_raw().hex() == V["eph_i_public"]
    assert i.exchange(r.public_key()).hex() == V["x25519_shared"]


@pytest.mark.parametrize("suite", sorted(V["suites"]))
def test_key_schedule_matches_vectors_and_rfc5869(suite: str) -> None:
    sv = V["suites"][suite]
    ikm = H(V["key_material"]) + H(V["x25519_shared"])
    salt = H(V["nonce_i"]) + H(V["nonce_r"])
    th = H(V["transcript_hash"])
    okm = rfc5869_expand(rfc5869_extract(salt, ikm),
                         b"p2psc v1 traffic" + bytes([sv["code"]]) + th, 96)
    assert okm.hex() == sv["i2r_secret"] + sv["r2i_secret"] + sv["finished_key"]
    secrets = derive_traffic_secrets(H(V["key_material"]), H(V["x25519_shared"]),
                                     H(V["nonce_i"]), H(V["nonce_r"]), sv["code"], th)
    assert (secrets.i2r.hex(), secrets.r2i.hex(), secrets.finished_key.hex()) == \
        (sv["i2r_secret"], sv["r2i_secret"], sv["finished_key"])
    mac = hmac.new(H(sv["finished_key"]), b"p2psc v1 finished" + th, hashlib.sha256).digest()
    assert mac.hex() == sv["finished_mac"] == finished_mac(secrets.finished_key, th).hex()
    assert label(b"key update", H(sv["i2r_secret"]), 32).hex() == \
        sv["i2r_secret_after_key_update"] == next_secret(secrets.i2r).hex()


@pytest.mark.parametrize("suite", ["aes-256-gcm", "chacha20-poly1305"])
def test_aead_record_vector(suite: str) -> None:
    sv = V["suites"][suite]
    secret, seq = H(sv["i2r_secret"]), 1
    pt, record = H(sv["data_record_seq1_plaintext"]), H(sv["data_record_seq1"])
    header = struct.pack(">IB", len(pt) + 16, 0x10)
    assert record[:5] == header
    key, iv = label(b"key", secret, 32), label(b"iv", secret, 12)
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    aead = AESGCM(key) if suite == "aes-256-gcm" else ChaCha20Poly1305(key)
    assert aead.encrypt(nonce, pt, header) == record[5:]
    cipher = SUITES_BY_NAME[suite].make_cipher(secret)
    assert cipher.seal(seq, pt, header) == record[5:]
    assert cipher.unseal(seq, record[5:], header) == pt


def test_rc4_record_vector() -> None:
    """rc4-hmac-sha256 (code 0x81): one RC4 keystream per direction key, its first 3,072
    bytes dropped; FINISHED (seq 0) takes the first bytes after the drop, DATA (seq 1) the
    next ones."""
    sv = V["suites"]["rc4-hmac-sha256"]
    assert sv["code"] == 0x81
    secret = H(sv["i2r_secret"])
    fin_pt, fin_rec = H(sv["finished_mac"]), H(sv["finished_record_seq0"])
    pt, record = H(sv["data_record_seq1_plaintext"]), H(sv["data_record_seq1"])
    fin_header = struct.pack(">IB", len(fin_pt) + 32, 0x03)
    header = struct.pack(">IB", len(pt) + 32, 0x10)
    stream = Cipher(ARC4(label(b"rc4 stream key", secret, 32)), mode=None).encryptor()
    stream.update(bytes(3072))
    mac_key = label(b"rc4 mac", secret, 32)
    expected = b""
    for seq, (hdr, plain) in enumerate([(fin_header, fin_pt), (header, pt)]):
        ct = stream.update(plain)
        tag = hmac.new(mac_key, seq.to_bytes(8, "big") + hdr + ct, hashlib.sha256).digest()
        expected += hdr + ct + tag
    assert fin_rec + record == expected
    cipher = SUITES_BY_NAME["rc4-hmac-sha256"].make_cipher(secret)
    assert cipher.seal(0, fin_pt, fin_header) == fin_rec[5:]
    assert cipher.seal(1, pt, header) == record[5:]
    assert cipher.unseal(0, fin_rec[5:], fin_header) == fin_pt
    assert cipher.unseal(1, record[5:], header) == pt


# -- complete sessions, byte for byte (test/vectors/handshake-*.json) ---------------------------
#
# test/make_handshake_vector.py ran a TCP session (both AEAD suites) and a UDP session with a
# seeded randomness stream and the real RSA operations, and recorded every flight. Here both
# sides run again with the same stream; the RSA operations return the recorded outputs once
# each is shown genuine (the signature verifies, the ciphertext decrypts, with the real keys).
# Every flight must come out byte-identical, and the receivers must report exactly the
# expected events: any change of the wire format, the sequence numbers, the nonces, the key
# schedule or the framing fails here.

TCP_V = json.loads(mk.TCP_VECTOR.read_text())
UDP_V = json.loads(mk.UDP_VECTOR.read_text())
KEYS = mk.load_keys()
SIDES = ("initiator", "responder")
# the RSA parameters of docs/PROTOCOL.md, written out here (not taken from p2psc)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_GENUINE: set[tuple[str, bytes, bytes]] = set()  # recorded RSA outputs already checked


class ReplayRandomness(mk.StreamRandomness):
    """The vector's stream; ``sign``/``encrypt`` return the recorded outputs, in order, after
    checking each is what the real key gives for the bytes the library asks about."""

    def __init__(self, label: str, recorded: Sequence[dict[str, str]]):
        super().__init__(label)
        self.recorded = list(recorded)
        self.used = 0

    def _next(self, op: str, key: rsa.RSAPublicKey | rsa.RSAPrivateKey, data: bytes
              ) -> tuple[str, bytes]:
        assert self.used < len(self.recorded), f"an RSA {op} that the vector did not record"
        rec = self.recorded[self.used]
        self.used += 1
        assert (rec["op"], rec["key"]) == (op, mk.key_name(key, KEYS))
        assert hashlib.sha256(data).hexdigest() == rec["input_sha256"], \
            f"the library asks to {op} other bytes than when the vector was made"
        return rec["key"], H(rec["output"])

    def sign(self, key: rsa.RSAPrivateKey, data: bytes) -> bytes:
        name, sig = self._next("sign", key, data)
        if ("sign", data, sig) not in _GENUINE:
            KEYS[name].public_key().verify(sig, data, _PSS, hashes.SHA256())  # raises if not
            _GENUINE.add(("sign", data, sig))
        return sig

    def encrypt(self, key: rsa.RSAPublicKey, data: bytes) -> bytes:
        name, ct = self._next("encrypt", key, data)
        if ("encrypt", data, ct) not in _GENUINE:
            assert KEYS[name].decrypt(ct, _OAEP) == data
            _GENUINE.add(("encrypt", data, ct))
        return ct


def replay_randomness(sv: dict[str, Any]) -> dict[str, ReplayRandomness]:
    return {side: ReplayRandomness(sv["randomness_labels"][side], sv["rsa"][side])
            for side in SIDES}


def check_flights(flights: Sequence[mk.Flight], sv: dict[str, Any]) -> None:
    assert len(flights) == len(sv["flights"])
    for i, (got, want) in enumerate(zip(flights, sv["flights"], strict=True)):
        assert (got.side, got.records) == (want["from"], want["records"]), f"flight {i}"
        assert got.wire.hex() == want["wire"], f"flight {i} ({want['records']}) differs"
        assert [mk.describe(e) for e in got.events] == want["receiver_events"], f"flight {i}"


def received(flights: Sequence[mk.Flight]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {side: [] for side in SIDES}
    for f in flights:
        out[mk.OTHER[f.side]] += f.events
    return out


def test_handshake_vectors_are_current() -> None:
    """The vectors were made with the scenario and settings the generator has now."""
    for v, transport, suites in ((TCP_V, "tcp", mk.TCP_SUITES), (UDP_V, "udp", (mk.UDP_SUITE,))):
        assert (v["now"], v["wall_offset"], v["rekey_after_messages"]) == \
            (mk.NOW, mk.WALL_OFFSET, mk.REKEY_AFTER_MESSAGES)
        assert sorted(v["suites"]) == sorted(suites)
        for suite, sv in v["suites"].items():
            assert sv["randomness_labels"] == {s: mk.stream_label(transport, suite, s)
                                               for s in SIDES}
    assert [H(m) for m in TCP_V["messages"]["i2r"]] == mk.I2R
    assert [H(m) for m in TCP_V["messages"]["r2i"]] == mk.R2I
    assert [H(m) for m in UDP_V["messages"]["i2r"]] == mk.I2R[:2]
    assert [H(m) for m in UDP_V["messages"]["r2i"]] == mk.R2I[:2]


@pytest.mark.parametrize("suite", mk.TCP_SUITES)
def test_tcp_session_replays_byte_for_byte(suite: str) -> None:
    sv = TCP_V["suites"][suite]
    rand = replay_randomness(sv)
    flights, conns = mk.run_tcp(suite, KEYS, rand)
    check_flights(flights, sv)
    assert [r.used for r in rand.values()] == [len(sv["rsa"][s]) for s in SIDES]
    assert [r["op"] for r in sv["rsa"]["initiator"]] == ["encrypt", "sign"]
    assert [r["op"] for r in sv["rsa"]["responder"]] == ["sign"]
    i2r = [H(m) for m in TCP_V["messages"]["i2r"]]
    r2i = [H(m) for m in TCP_V["messages"]["r2i"]]
    assert received(flights) == {
        "responder": [HandshakeComplete("alice"), *map(MessageReceived, i2r), Closed(None)],
        "initiator": [HandshakeComplete("bob"), *map(MessageReceived, r2i)],
    }
    assert all(c.state is State.CLOSED for c in conns.values())


def test_udp_session_replays_byte_for_byte() -> None:
    sv = UDP_V["suites"][mk.UDP_SUITE]
    rand = replay_randomness(sv)
    flights, eps = mk.run_udp(mk.UDP_SUITE, KEYS, rand)
    check_flights(flights, sv)
    assert [r.used for r in rand.values()] == [len(sv["rsa"][s]) for s in SIDES]
    ai, ar = (tuple(UDP_V["addresses"][s]) for s in SIDES)
    i2r = [H(m) for m in UDP_V["messages"]["i2r"]]
    r2i = [H(m) for m in UDP_V["messages"]["r2i"]]
    assert received(flights) == {
        "responder": [HandshakeComplete("alice", ai), *(DatagramReceived(m, "alice", ai)
                                                       for m in i2r), Closed(None, "alice", ai)],
        "initiator": [HandshakeComplete("bob", ar), *(DatagramReceived(m, "bob", ar)
                                                     for m in r2i)],
    }
    assert not eps["initiator"].sessions and not eps["responder"].sessions


# -- the same vectors read without p2psc: the formats of docs/PROTOCOL.md and docs/UDP.md --------

def stream(label: str, n: int) -> bytes:
    out = b"".join(hashlib.sha256(label.encode() + i.to_bytes(8, "big")).digest()
                   for i in range(n // 32 + 1))
    return out[:n]


class Fields:
    """Reads a handshake body field by field."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data)
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def var(self, width: int) -> bytes:
        return self.take(int.from_bytes(self.take(width), "big"))


def check_handshake(v: dict[str, Any], sv: dict[str, Any], suite: str, init: bytes, resp: bytes,
                    eph_offset: int) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """Check INIT and RESP field by field, their signatures, and derive the key schedule
    (RFC 5869 HKDF of this file); returns the i2r and r2i secrets, the FINISHED MAC, the INIT
    and RESP ext fields and the transcript hash."""
    code = {"aes-256-gcm": 1, "chacha20-poly1305": 2}[suite]
    f = Fields(init)
    assert struct.unpack(">BBQ", f.take(10)) == (1, code, int(v["now"] * 1000))
    nonce_i, eph_i_pub = f.take(16), f.take(32)
    assert (f.var(1), f.var(1)) == (b"alice", b"bob")
    init_ext, enc = f.var(2), f.var(2)
    signed_i = init[:f.pos]
    sig_i = f.var(2)
    assert f.pos == len(init)
    assert (enc.hex(), sig_i.hex()) == (sv["rsa"]["initiator"][0]["output"],
                                        sv["rsa"]["initiator"][1]["output"])
    KEYS["alice"].public_key().verify(sig_i, b"p2psc v1 INIT by initiator\x00" + signed_i,
                                      _PSS, hashes.SHA256())
    key_material = KEYS["bob"].decrypt(enc, _OAEP)
    assert len(key_material) == 32
    f = Fields(resp)
    assert struct.unpack(">BB", f.take(2)) == (1, code)
    nonce_r, eph_r_pub = f.take(16), f.take(32)
    resp_ext = f.var(2)
    signed_r = resp[:f.pos]
    sig_r = f.var(2)
    assert f.pos == len(resp) and sig_r.hex() == sv["rsa"]["responder"][0]["output"]
    KEYS["bob"].public_key().verify(
        sig_r, b"p2psc v1 RESP by responder\x00" + hashlib.sha256(init + signed_r).digest(),
        _PSS, hashes.SHA256())
    # the initiator's X25519 key is the first 32 bytes it drew (after a UDP index)
    eph_i = X25519PrivateKey.from_private_bytes(
        stream(sv["randomness_labels"]["initiator"], eph_offset + 32)[eph_offset:])
    assert eph_i.public_key().public_bytes_raw() == eph_i_pub
    shared = eph_i.exchange(X25519PublicKey.from_public_bytes(eph_r_pub))
    th = hashlib.sha256(init + resp).digest()
    okm = rfc5869_expand(rfc5869_extract(nonce_i + nonce_r, key_material + shared),
                         b"p2psc v1 traffic" + bytes([code]) + th, 96)
    mac = hmac.new(okm[64:96], b"p2psc v1 finished" + th, hashlib.sha256).digest()
    return okm[0:32], okm[32:64], mac, init_ext, resp_ext, th


def opener(suite: str, secret: bytes) -> Callable[[int, bytes, bytes], bytes]:
    key, iv = label(b"key", secret, 32), int.from_bytes(label(b"iv", secret, 12), "big")
    aead = AESGCM(key) if suite == "aes-256-gcm" else ChaCha20Poly1305(key)
    return lambda seq, ct, aad: aead.decrypt((iv ^ seq).to_bytes(12, "big"), ct, aad)


TCP_TYPES = {0x01: "INIT", 0x02: "RESP", 0x03: "FINISHED", 0x10: "DATA", 0x11: "KEY_UPDATE",
             0x12: "CLOSE", 0x13: "PING"}


@pytest.mark.parametrize("suite", mk.TCP_SUITES)
def test_tcp_vector_reads_independently(suite: str) -> None:
    """Every record of the TCP vector parsed and opened from the protocol document alone:
    framing, INIT/RESP fields and signatures, key schedule, the nonce (IV XOR sequence
    number), sequence numbers that count every sealed record and restart at a KEY_UPDATE."""
    sv = TCP_V["suites"][suite]
    records = []  # (sender, type name, header, body)
    for fl in sv["flights"]:
        wire, pos, names = H(fl["wire"]), 0, []
        while pos < len(wire):
            length, rtype = struct.unpack_from(">IB", wire, pos)
            records.append((fl["from"], TCP_TYPES[rtype], wire[pos:pos + 5],
                            wire[pos + 5:pos + 5 + length]))
            names.append(TCP_TYPES[rtype])
            pos += 5 + length
        assert pos == len(wire) and "+".join(names) == fl["records"]
    assert [r[1] for r in records[:2]] == ["INIT", "RESP"]
    i2r, r2i, mac, init_ext, resp_ext, _ = check_handshake(TCP_V, sv, suite, records[0][3],
                                                           records[1][3], 0)
    assert init_ext == resp_ext == b""
    secret = {"initiator": i2r, "responder": r2i}
    seq = {"initiator": 0, "responder": 0}
    messages = {"initiator": [H(m) for m in TCP_V["messages"]["i2r"]],
                "responder": [H(m) for m in TCP_V["messages"]["r2i"]]}
    seqs = []
    for side, name, header, body in records[2:]:
        pt = opener(suite, secret[side])(seq[side], body, header)
        seqs.append(seq[side])
        seq[side] += 1
        if name == "FINISHED":
            assert pt == mac
        elif name == "DATA":
            assert pt == messages[side].pop(0)
        else:
            assert pt == b""
        if name == "KEY_UPDATE":
            secret[side] = label(b"key update", secret[side], 32)
            seq[side] = 0
    assert messages == {"initiator": [], "responder": []}
    assert records[-1][1] == "CLOSE"
    # FINISHED 0, DATA 1-3 | DATA 0-2 | PING 4, KEY_UPDATE 5, DATA 0 | PING 3, KEY_UPDATE 4,
    # DATA 0, DATA 1 | KEY_UPDATE 1, DATA 0, CLOSE 1
    assert seqs == [0, 1, 2, 3, 0, 1, 2, 4, 5, 0, 3, 4, 0, 1, 1, 0, 1]


def test_udp_vector_reads_independently() -> None:
    """Every datagram of the UDP vector parsed and opened from the documents alone: INIT/RESP
    with the session indexes in their ext, the 13-byte header (type, receiver index,
    counter) as associated data, and the nonce (IV XOR counter)."""
    suite = mk.UDP_SUITE
    sv = UDP_V["suites"][suite]
    dgrams = [(fl["from"], fl["records"], H(fl["wire"])) for fl in sv["flights"]]
    assert [d[1] for d in dgrams] == ["INIT", "RESP", "FINISHED", "KEEPALIVE", "DATA", "DATA",
                                      "DATA", "DATA", "CLOSE"]
    init, resp = dgrams[0][2], dgrams[1][2]
    assert init[0] == 1 and resp[0] == 2
    i2r, r2i, mac, init_ext, resp_ext, _ = check_handshake(UDP_V, sv, suite, init[1:], resp[5:], 4)
    # the initiator's index is its first 4 random bytes, and so is the responder's
    i_index, flags, replaced = struct.unpack(">IBI", init_ext)
    (r_index,) = struct.unpack(">I", resp_ext)
    assert (flags, replaced) == (0, 0)
    assert i_index == int.from_bytes(stream(sv["randomness_labels"]["initiator"], 4), "big")
    assert r_index == int.from_bytes(stream(sv["randomness_labels"]["responder"], 4), "big")
    assert struct.unpack(">I", resp[1:5]) == (i_index,)
    types = {"FINISHED": 3, "DATA": 4, "KEEPALIVE": 5, "CLOSE": 6}
    to_index = {"initiator": r_index, "responder": i_index}
    open_ = {"initiator": opener(suite, i2r), "responder": opener(suite, r2i)}
    ctr = {"initiator": 0, "responder": 0}
    messages = {"initiator": [H(m) for m in UDP_V["messages"]["i2r"]],
                "responder": [H(m) for m in UDP_V["messages"]["r2i"]]}
    for side, name, d in dgrams[2:]:
        assert struct.unpack(">BIQ", d[:13]) == (types[name], to_index[side], ctr[side])
        pt = open_[side](ctr[side], d[13:], d[:13])
        ctr[side] += 1
        assert pt == (mac if name == "FINISHED" else
                      messages[side].pop(0) if name == "DATA" else b"")
    assert messages == {"initiator": [], "responder": []}


# -- tampering: any flipped byte makes the receiver fail (TCP) or drop it (UDP) -----------------

def flips(n_flights: int, lengths: Sequence[int], per_flight: int, seed: int
          ) -> list[tuple[int, int, int]]:
    """(flight, position, XOR mask): the header bytes, the first body byte and the last byte
    of every flight, and ``per_flight`` seeded random positions (bounded work)."""
    rng = random.Random(seed)
    out = []
    for k in range(n_flights):
        n = lengths[k]
        positions = {0, 3, 4, 5, n - 1} | {rng.randrange(n) for _ in range(per_flight)}
        out += [(k, p, rng.randrange(1, 256)) for p in sorted(x for x in positions if x < n)]
    return out


def flip(wire: bytes, pos: int, mask: int) -> bytes:
    return wire[:pos] + bytes([wire[pos] ^ mask]) + wire[pos + 1:]


@pytest.mark.parametrize("suite", mk.TCP_SUITES)
def test_tcp_flipped_byte_ends_the_connection_with_an_error(suite: str) -> None:
    sv = TCP_V["suites"][suite]
    lengths = [len(fl["wire"]) // 2 for fl in sv["flights"]]
    for k, pos, mask in flips(len(lengths), lengths, 2, seed=len(suite)):
        def deliver(i: int, wire: bytes, receive: Callable[[bytes], list[Event]], _to: Any,
                    k: int = k, pos: int = pos, mask: int = mask) -> list[Event]:
            return receive(flip(wire, pos, mask) if i == k else wire)
        flights, conns = mk.run_tcp(suite, KEYS, replay_randomness(sv),
                                    deliver=deliver, stop_after=k)
        receiver = conns[mk.OTHER[flights[k].side]]
        events = list(flights[k].events)
        if receiver.state is not State.CLOSED:  # (a longer length: it waits for the rest)
            events += receiver.receive_eof(mk.NOW)
        where = f"flight {k} ({flights[k].records}), byte {pos} ^ {mask:#04x}"
        assert len(events) == 1, f"{where}: {events}"
        assert isinstance(events[0], Closed) and isinstance(events[0].error, P2PError), where


def test_udp_flipped_byte_is_dropped_without_effect() -> None:
    """A datagram with a flipped byte is dropped: no handshake, datagram or close event and no
    answer; the genuine datagram delivered after it then does exactly what the vector says
    (the rest of the session is byte-identical), so the dropped one changed no state."""
    sv = UDP_V["suites"][mk.UDP_SUITE]
    lengths = [len(fl["wire"]) // 2 for fl in sv["flights"]]
    for k, pos, mask in flips(len(lengths), lengths, 3, seed=7):
        where = f"flight {k} ({sv['flights'][k]['records']}), byte {pos} ^ {mask:#04x}"

        def deliver(i: int, wire: bytes, receive: Callable[[bytes], list[Event]], to: Any,
                    k: int = k, pos: int = pos, mask: int = mask, where: str = where
                    ) -> list[Event]:
            if i == k:
                seen = receive(flip(wire, pos, mask))
                assert not [e for e in seen if isinstance(
                    e, (HandshakeComplete, DatagramReceived, Closed))], f"{where}: {seen}"
                assert to.datagrams_to_send() == [], f"{where}: answered"
            return receive(wire)
        flights, _ = mk.run_udp(mk.UDP_SUITE, KEYS, replay_randomness(sv),
                                deliver=deliver)
        check_flights(flights, sv)
