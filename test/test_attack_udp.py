"""UDP mutation (issue 7), sans-IO: every single-bit flip and every truncation of INIT, RESP,
FINISHED and a DATA datagram is dropped by the receiving UdpEndpoint -- no exception, no
payload, no HandshakeComplete, no answer to a forged INIT -- and the endpoint's state is not
poisoned: after all of them the genuine datagram is still accepted (so the replay window,
the replay cache and the half-open session survived the flood)."""

from __future__ import annotations

from typing import Any

import pytest

from attack_util import bit_flips
from conftest import rsa_key
from p2psc._proto import rsakeys as keys
from p2psc._proto.events import HandshakeComplete
from udp_util import Endpoint
from p2psc.config import Settings

udp = pytest.importorskip("p2psc._proto.udp")

A_ADDR, B_ADDR = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
WALL = 1_700_000_000.0


def _endpoints() -> tuple[Any, Any]:
    s = Settings(udp_init_rate=1e9, udp_init_burst=10 ** 9, udp_init_rate_per_addr=1e9,
                 udp_init_burst_per_addr=10 ** 9)
    ka, kb = rsa_key("a.test"), rsa_key("b.test")
    pubs = {"a.test": ka.public_key(), "b.test": kb.public_key()}
    a = Endpoint("a.test", ka, s, key_lookup=pubs.get, accept_from="b.test", now=100.0,
                        wall_offset=WALL - 100.0)
    b = Endpoint("b.test", kb, s, key_lookup=pubs.get, now=100.0, wall_offset=WALL - 100.0)
    return a, b


def _mutations(d: bytes) -> Any:
    for _pos, _bit, m in bit_flips(d):
        yield m
    for cut in range(len(d)):
        yield d[:cut]


def _hostile(ep: Any, datagrams: Any, addr: Any) -> int:
    n = 0
    for m in datagrams:
        assert ep.receive(m, addr, 100.0) is None
        n += 1
    evs = ep.take_events()
    assert not any(isinstance(e, HandshakeComplete) for e in evs), evs
    return n


def test_udp_every_bit_flip_and_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    decrypts = [0]
    real = keys.decrypt

    def counting(key: Any, ct: bytes) -> Any:
        decrypts[0] += 1
        return real(key, ct)

    monkeypatch.setattr(keys, "decrypt", counting)
    a, b = _endpoints()
    a.connect("b.test", rsa_key("b.test").public_key(), B_ADDR, 100.0)
    (init, _), = a.datagrams_to_send()
    total = 0
    # INIT: dropped, no RESP, no decryption
    total += _hostile(b, _mutations(init), A_ADDR)
    assert b.datagrams_to_send() == [] and decrypts[0] == 0
    assert b.receive(init, A_ADDR, 100.0) is None  # the genuine one still gets its RESP
    (resp, _), = b.datagrams_to_send()
    # RESP: the initiator drops every forgery and still completes with the genuine one
    total += _hostile(a, _mutations(resp), B_ADDR)
    assert a.datagrams_to_send() == []
    assert a.receive(resp, B_ADDR, 100.0) is None
    assert [type(e) for e in a.take_events()] == [HandshakeComplete]
    fin = [d for d, _ in a.datagrams_to_send()]
    assert fin
    # FINISHED: forgeries do not confirm the responder's session
    for f in fin:
        total += _hostile(b, _mutations(f), A_ADDR)
    for f in fin:
        b.receive(f, A_ADDR, 100.0)
    assert [type(e) for e in b.take_events()] == [HandshakeComplete]
    # DATA both ways
    sent = a.send("b.test", b"attack at dawn", 100.0)
    assert sent is not None
    total += _hostile(b, _mutations(sent[0]), A_ADDR)
    assert b.receive(sent[0], A_ADDR, 100.0) == b"attack at dawn"
    assert b.receive(sent[0], A_ADDR, 100.0) is None  # and a replay of it is dropped
    back = b.send("a.test", b"at dawn", 100.0)
    assert back is not None
    total += _hostile(a, _mutations(back[0]), B_ADDR)
    assert a.receive(back[0], B_ADDR, 100.0) == b"at dawn"
    print(f"\nUDP mutations tried: {total}")
    assert total > 5_000


def test_udp_arbitrary_datagrams_never_raise() -> None:
    """Random datagrams of every type byte and length: dropped, nothing raised or delivered."""
    import random
    rng = random.Random(7)
    a, b = _endpoints()
    for k in range(3000):
        n = rng.choice([0, 1, 2, 5, 16, 40, 100, 600, 1200, 1500])
        d = bytes([k % 256]) + rng.randbytes(n)
        assert b.receive(d, ("127.0.0.1", 50000 + k % 100), 100.0) is None
    assert not any(isinstance(e, HandshakeComplete) for e in b.take_events())
    assert len(b.sessions) == 0
