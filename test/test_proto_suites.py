"""p2psc._proto.suites and keyschedule: the record ciphers' tag lengths and exact errors, and
copies of an rc4 cipher at every keystream position (written against the survivors of
`make mutation`)."""

from __future__ import annotations

import copy
import struct

import pytest

from p2psc._proto.suites import SUITES_BY_NAME
from p2psc.p2pexcept import CRCError

SECRET = bytes(range(32))
RC4 = SUITES_BY_NAME["rc4-hmac-sha256"]


def header(n: int, tag: int = 32) -> bytes:
    return struct.pack(">IB", n + tag, 0x10)


@pytest.mark.parametrize("name,tag", [("aes-256-gcm", 16), ("chacha20-poly1305", 16),
                                      ("rc4-hmac-sha256", 32)])
def test_each_cipher_has_its_suites_tag_length(name: str, tag: int) -> None:
    suite = SUITES_BY_NAME[name]
    cipher = suite.make_cipher(SECRET)
    assert suite.tag_len == tag and cipher.tag_len == tag
    assert len(cipher.seal(0, b"abc", header(3, tag))) == 3 + tag


@pytest.mark.parametrize("name", ["aes-256-gcm", "chacha20-poly1305"])
def test_a_forged_aead_record_fails_with_the_exact_error(name: str) -> None:
    cipher = SUITES_BY_NAME[name].make_cipher(SECRET)
    ct = bytearray(cipher.seal(5, b"payload", header(7, 16)))
    ct[0] ^= 1
    with pytest.raises(CRCError) as info:
        cipher.unseal(5, bytes(ct), header(7, 16))
    assert str(info.value) == "record failed authentication"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _rc4_failure(opener: object, seq: int, ct: bytes) -> str:
    with pytest.raises(CRCError) as info:
        opener.unseal(seq, ct, header(len(ct) - 32))  # type: ignore[attr-defined]
    return str(info.value)


def test_rc4_failures_have_the_exact_error() -> None:
    sender, receiver = RC4.make_cipher(SECRET), RC4.make_cipher(SECRET)
    ct0 = sender.seal(0, b"zero", header(4))
    assert _rc4_failure(receiver, 0, ct0[:31]) == "record failed authentication"  # too short
    assert _rc4_failure(receiver, 1, ct0) == "record failed authentication"       # out of order
    forged = ct0[:-1] + bytes([ct0[-1] ^ 1])
    assert _rc4_failure(receiver, 0, forged) == "record failed authentication"    # bad MAC
    assert receiver.unseal(0, ct0, header(4)) == b"zero"


def test_rc4_copy_keeps_the_opening_position() -> None:
    sender, receiver = RC4.make_cipher(SECRET), RC4.make_cipher(SECRET)
    records = [b"first record", b"second", b"3", b"the fourth one"]
    sealed = [sender.seal(seq, pt, header(len(pt))) for seq, pt in enumerate(records)]
    assert receiver.unseal(0, sealed[0], header(len(records[0]))) == records[0]
    assert receiver.unseal(1, sealed[1], header(len(records[1]))) == records[1]
    twin = copy.copy(receiver)
    # both open record 2 and 3 on their own: the copy is at the same keystream position
    for c in (receiver, twin):
        assert c.unseal(2, sealed[2], header(1)) == b"3"
        assert c.unseal(3, sealed[3], header(len(records[3]))) == records[3]


def test_rc4_copy_keeps_both_positions() -> None:
    a = RC4.make_cipher(SECRET)
    sealed = [a.seal(seq, b"x" * (seq + 3), header(seq + 3)) for seq in range(3)]
    b = RC4.make_cipher(SECRET)
    for seq in range(3):
        assert b.unseal(seq, sealed[seq], header(seq + 3)) == b"x" * (seq + 3)
    # a has sealed 3 records, b opened 3: copies continue both streams
    a2, b2 = copy.copy(a), copy.copy(b)
    nxt = a.seal(3, b"next", header(4))
    assert a2.seal(3, b"next", header(4)) == nxt
    assert b2.unseal(3, nxt, header(4)) == b"next"
    assert b.unseal(3, nxt, header(4)) == b"next"


def test_a_fresh_rc4_copy_starts_both_streams_at_the_beginning() -> None:
    a = RC4.make_cipher(SECRET)
    b = copy.copy(a)
    ct = a.seal(0, b"hello", header(5))
    assert b.seal(0, b"hello", header(5)) == ct
    assert copy.copy(RC4.make_cipher(SECRET)).unseal(0, ct, header(5)) == b"hello"
