"""The protocol test vectors of docs/PROTOCOL.md (test/vectors/keyschedule.json), checked
against p2psc and against an independent implementation from the RFCs (stdlib hmac for
HKDF, the AEADs called directly), so the vectors pin the wire format, not just the code."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from p2psc._proto.keyschedule import derive_traffic_secrets, finished_mac, next_secret
from p2psc._proto.suites import SUITES_BY_NAME

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
    assert cipher.open(seq, record[5:], header) == pt


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
    assert cipher.open(0, fin_rec[5:], fin_header) == fin_pt
    assert cipher.open(1, record[5:], header) == pt
