"""Generate the complete-handshake vectors test/vectors/handshake-tcp.json and
test/vectors/handshake-udp.json (checked by test/test_vectors.py).

Run by hand from the repository root (pytest does not run it)::

    .venv/bin/python test/make_handshake_vector.py

Regenerate only when the wire format or the handshake changes on purpose (then the change is
visible in the diff of the vectors, and docs/PROTOCOL.md should say what changed). A new run
makes new RSA-PSS signatures and RSA-OAEP ciphertexts (their salt and seed come from OpenSSL),
so every byte after them changes even when nothing else did: do not regenerate to make a
failing test pass without understanding why it failed.

What is fixed:

- the RSA keys: test/vectors/handshake-alice.key.pem (the initiator, peer id ``alice``) and
  handshake-bob.key.pem (the responder, ``bob``), 2048-bit TEST keys made once by this script
  (when missing) with ``cryptography``;
- the time: every input is at ``NOW`` (monotonic seconds) with ``wall_offset`` 0, so the INIT
  timestamp is ``NOW`` in milliseconds;
- everything :meth:`Randomness.random` returns (nonces, key material, X25519 private keys, UDP
  session indexes): one stream per side, ``block i = SHA-256(label || u64be(i))`` for i = 0,
  1, 2, ... concatenated; each ``random(n)`` takes the next n bytes of it (see
  :class:`StreamRandomness`; the labels are in the vector files);
- the RSA operations: :meth:`Randomness.sign` and :meth:`Randomness.encrypt` run the real
  OpenSSL operations here and their outputs are recorded in the vector, in the order each
  side asked for them; test/test_vectors.py returns the recorded outputs after checking that
  each signature verifies, and each ciphertext decrypts, with the real keys.

The scenario (:data:`TCP_STEPS`, :data:`UDP_STEPS`) is one list of flights: which side acts,
what the flight carries, and what it does. Each flight's wire bytes are delivered to the other
side, and the events that side reports are recorded with it. test/test_vectors.py imports the
scenario and the drivers (:func:`run_tcp`, :func:`run_udp`) from here, so a change to them
needs new vectors.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from p2psc._proto.events import Event
from p2psc._proto.handshake import Randomness
from p2psc._proto.settings import Settings
from p2psc._proto.tcp import Connection, Role
from p2psc._proto.udp import UdpEndpoint

VECTOR_DIR = Path(__file__).resolve().parent / "vectors"
TCP_VECTOR = VECTOR_DIR / "handshake-tcp.json"
UDP_VECTOR = VECTOR_DIR / "handshake-udp.json"
KEY_FILES = {"alice": "handshake-alice.key.pem", "bob": "handshake-bob.key.pem"}
INITIATOR, RESPONDER = "alice", "bob"
SIDES = {"initiator": INITIATOR, "responder": RESPONDER}
OTHER = {"initiator": "responder", "responder": "initiator"}

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, as monotonic seconds with wall_offset 0
WALL_OFFSET = 0.0
LABEL_PREFIX = "p2psc handshake vector v1"
#: key updates come on their own after four sealed records of a direction
REKEY_AFTER_MESSAGES = 4
TCP_SUITES = ("aes-256-gcm", "chacha20-poly1305")
UDP_SUITE = "aes-256-gcm"
UDP_ADDR = {"initiator": ("192.0.2.1", 40001), "responder": ("192.0.2.2", 40002)}

# the application messages, in the order they are sent
I2R = [b"hello bob, this is alice", b"", bytes(range(256)), b"alice after the first key update",
       b"alice after update_key()"]
R2I = [b"hi alice", bytes(range(255, -1, -1)) * 2, b"bob, message 3",
       b"bob after his key update", b"bob, last"]


def stream_label(transport: str, suite: str, side: str) -> str:
    return f"{LABEL_PREFIX} {transport} {suite} {side}"


class StreamRandomness(Randomness):
    """``random(n)``: the next ``n`` bytes of SHA-256(label || u64be(0)) || SHA-256(label ||
    u64be(1)) || ... (deterministic). ``sign``/``encrypt`` are the real (randomised) ones."""

    def __init__(self, label: str):
        self.label = label.encode()
        self._buf = b""
        self._block = 0

    def random(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += hashlib.sha256(self.label + self._block.to_bytes(8, "big")).digest()
            self._block += 1
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def key_name(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, keys: dict[str, rsa.RSAPrivateKey]) -> str:
    """Which of the vector's keys ``key`` is (or its public half)."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    for name, k in keys.items():
        if k.public_key().public_numbers() == pub.public_numbers():
            return name
    raise AssertionError("an RSA operation with a key that is not one of the vector's")


class RecordingRandomness(StreamRandomness):
    """The stream, and the real RSA operations with their outputs recorded (generation)."""

    def __init__(self, label: str, keys: dict[str, rsa.RSAPrivateKey]):
        super().__init__(label)
        self.keys = keys
        self.recorded: list[dict[str, str]] = []

    def sign(self, key: rsa.RSAPrivateKey, data: bytes) -> bytes:
        out = super().sign(key, data)
        self.recorded.append({"op": "sign", "key": key_name(key, self.keys),
                              "input_sha256": hashlib.sha256(data).hexdigest(), "output": out.hex()})
        return out

    def encrypt(self, key: rsa.RSAPublicKey, data: bytes) -> bytes:
        out = super().encrypt(key, data)
        self.recorded.append({"op": "encrypt", "key": key_name(key, self.keys),
                              "input_sha256": hashlib.sha256(data).hexdigest(), "output": out.hex()})
        return out


def load_keys(create: bool = False) -> dict[str, rsa.RSAPrivateKey]:
    """The two TEST keys (made and written once when ``create`` and missing)."""
    keys: dict[str, rsa.RSAPrivateKey] = {}
    for name, file in KEY_FILES.items():
        path = VECTOR_DIR / file
        if not path.exists() and create:
            new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            path.write_bytes(new.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        keys[name] = key
    return keys


def describe(event: Event) -> dict[str, Any]:
    """An event as JSON: its class name and fields (bytes as hex, addresses as lists, an error
    as its class name)."""
    out: dict[str, Any] = {"event": type(event).__name__}
    for f in fields(event):  # type: ignore[arg-type]
        v = getattr(event, f.name)
        if isinstance(v, bytes):
            v = v.hex()
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, BaseException):
            v = type(v).__name__
        out[f.name] = v
    return out


# -- the scenarios ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One flight: ``side`` acts (``action``, or None when the flight is what it queued on the
    last delivery), and the flight carries ``records`` (record/datagram type names, ``+``)."""

    side: str
    records: str
    action: Callable[[Any], Any] | None = None


def _send_tcp(data: bytes) -> Callable[[Connection], None]:
    return lambda c: c.send(data)


TCP_STEPS: list[Step] = [
    Step("initiator", "INIT", lambda c: c.initiate()),
    Step("responder", "RESP"),
    Step("initiator", "FINISHED"),
    *[Step("initiator", "DATA", _send_tcp(m)) for m in I2R[:3]],
    *[Step("responder", "DATA", _send_tcp(m)) for m in R2I[:3]],
    Step("initiator", "PING", lambda c: c.send_ping()),
    Step("initiator", "KEY_UPDATE+DATA", _send_tcp(I2R[3])),  # rekey_after_messages reached
    Step("responder", "PING", lambda c: c.send_ping()),
    Step("responder", "KEY_UPDATE+DATA", _send_tcp(R2I[3])),
    Step("responder", "DATA", _send_tcp(R2I[4])),
    Step("initiator", "KEY_UPDATE", lambda c: c.update_key()),
    Step("initiator", "DATA", _send_tcp(I2R[4])),
    Step("initiator", "CLOSE", lambda c: c.close()),
]


def _send_udp(side: str, data: bytes) -> Callable[[UdpEndpoint], Any]:
    return lambda e: e.send(SIDES[OTHER[side]], data, NOW)


UDP_STEPS: list[Step] = [
    Step("initiator", "INIT", None),  # connect() (needs the peer's key: see run_udp)
    Step("responder", "RESP"),
    Step("initiator", "FINISHED"),
    Step("responder", "KEEPALIVE"),
    *[Step("initiator", "DATA", _send_udp("initiator", m)) for m in I2R[:2]],
    *[Step("responder", "DATA", _send_udp("responder", m)) for m in R2I[:2]],
    Step("initiator", "CLOSE", lambda e: e.close_peer(RESPONDER)),
]


@dataclass
class Flight:
    side: str
    records: str
    wire: bytes
    events: list[Event]  # what the other side reported on receiving it


#: ``deliver(i, wire, receive, receiver)``: hands flight ``i`` to its receiver (a Connection or
#: UdpEndpoint; ``receive(bytes)`` delivers and returns its events). A test's hook may tamper
#: with the bytes, or deliver more than once.
Deliver = Callable[[int, bytes, Callable[[bytes], list[Event]], Any], list[Event]]


def _as_is(_i: int, wire: bytes, receive: Callable[[bytes], list[Event]], _to: Any) -> list[Event]:
    return receive(wire)


def tcp_settings(suite: str) -> Settings:
    return Settings(cipher_suite=suite, rekey_after_messages=REKEY_AFTER_MESSAGES)


def run_tcp(suite: str, keys: dict[str, rsa.RSAPrivateKey], rand: Mapping[str, Randomness], *,
            deliver: Deliver = _as_is, stop_after: int | None = None
            ) -> tuple[list[Flight], dict[str, Connection]]:
    """Run :data:`TCP_STEPS` between two connections (``deliver``: see :data:`Deliver`); stop
    after flight ``stop_after``."""
    settings = tcp_settings(suite)
    peers = {INITIATOR: keys[INITIATOR].public_key()}
    conns = {
        "initiator": Connection(Role.INITIATOR, INITIATOR, keys[INITIATOR], settings,
                                peer_id=RESPONDER, peer_public_key=keys[RESPONDER].public_key(),
                                now=NOW, wall_offset=WALL_OFFSET, randomness=rand["initiator"]),
        "responder": Connection(Role.RESPONDER, RESPONDER, keys[RESPONDER], settings,
                                key_lookup=peers.get, now=NOW, wall_offset=WALL_OFFSET,
                                randomness=rand["responder"]),
    }
    flights: list[Flight] = []
    for i, step in enumerate(TCP_STEPS):
        sender, receiver = conns[step.side], conns[OTHER[step.side]]
        if step.action is not None:
            step.action(sender)
        wire = b"".join(sender.data_to_send())
        if sender.needs_key_derivation:  # as the adapter does: after writing RESP
            sender.derive_keys()
        events = deliver(i, wire, functools.partial(receiver.receive_data, now=NOW), receiver)
        flights.append(Flight(step.side, step.records, wire, events))
        if i == stop_after:
            break
    return flights, conns


def run_udp(suite: str, keys: dict[str, rsa.RSAPrivateKey], rand: Mapping[str, Randomness], *,
            deliver: Deliver = _as_is, stop_after: int | None = None
            ) -> tuple[list[Flight], dict[str, UdpEndpoint]]:
    """Run :data:`UDP_STEPS` between two endpoints (one datagram per flight)."""
    settings = Settings(cipher_suite=suite, rekey_after_messages=REKEY_AFTER_MESSAGES)
    peers = {INITIATOR: keys[INITIATOR].public_key()}
    eps = {
        "initiator": UdpEndpoint(INITIATOR, keys[INITIATOR], settings, accept_from=RESPONDER,
                                 now=NOW, wall_offset=WALL_OFFSET, randomness=rand["initiator"]),
        "responder": UdpEndpoint(RESPONDER, keys[RESPONDER], settings, key_lookup=peers.get,
                                 now=NOW, wall_offset=WALL_OFFSET, randomness=rand["responder"]),
    }
    flights: list[Flight] = []
    for i, step in enumerate(UDP_STEPS):
        sender, receiver = eps[step.side], eps[OTHER[step.side]]
        to = UDP_ADDR[OTHER[step.side]]
        if i == 0:
            sender.connect(RESPONDER, keys[RESPONDER].public_key(), to, NOW)
        sent = step.action(sender) if step.action is not None else None
        out = [sent] if sent is not None else sender.datagrams_to_send()
        assert len(out) == 1 and out[0][1] == to, f"flight {i}: {out!r}"
        wire = out[0][0]
        events = deliver(i, wire, functools.partial(receiver.receive, addr=UDP_ADDR[step.side],
                                                    now=NOW), receiver)
        flights.append(Flight(step.side, step.records, wire, events))
        if i == stop_after:
            break
    return flights, eps


# -- what the receivers must report (checked here before writing, and by the test) ---------------

def expected_tcp_events() -> dict[str, list[dict[str, Any]]]:
    """Each side's events over the whole run, as :func:`describe` gives them."""
    def msg(m: bytes) -> dict[str, Any]:
        return {"event": "MessageReceived", "data": m.hex()}
    return {
        "responder": [{"event": "HandshakeComplete", "peer_id": INITIATOR, "addr": None,
                       "rekey": False}] + [msg(m) for m in I2R]
                     + [{"event": "Closed", "error": None, "peer_id": None, "addr": None}],
        "initiator": [{"event": "HandshakeComplete", "peer_id": RESPONDER, "addr": None,
                       "rekey": False}] + [msg(m) for m in R2I],
    }


def expected_udp_events() -> dict[str, list[dict[str, Any]]]:
    ai, ar = list(UDP_ADDR["initiator"]), list(UDP_ADDR["responder"])

    def dgram(m: bytes, peer: str, addr: list[Any]) -> dict[str, Any]:
        return {"event": "DatagramReceived", "data": m.hex(), "peer_id": peer, "addr": addr}
    return {
        "responder": [{"event": "HandshakeComplete", "peer_id": INITIATOR, "addr": ai,
                       "rekey": False}] + [dgram(m, INITIATOR, ai) for m in I2R[:2]]
                     + [{"event": "Closed", "error": None, "peer_id": INITIATOR, "addr": ai}],
        "initiator": [{"event": "HandshakeComplete", "peer_id": RESPONDER, "addr": ar,
                       "rekey": False}] + [dgram(m, RESPONDER, ar) for m in R2I[:2]],
    }


def events_by_receiver(flights: Sequence[Flight]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"initiator": [], "responder": []}
    for f in flights:
        out[OTHER[f.side]] += [describe(e) for e in f.events]
    return out


# -- generation --------------------------------------------------------------------------------

RANDOMNESS_DOC = ("random(n) returns the next n bytes of the side's stream: block i (i = 0, 1, "
                  "...) = SHA-256(label as ASCII || i as u64 big-endian), blocks concatenated")


def _generate(transport: str, suite: str, keys: dict[str, rsa.RSAPrivateKey],
              run: Callable[..., tuple[list[Flight], Any]],
              expected: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    rand = {side: RecordingRandomness(stream_label(transport, suite, side), keys)
            for side in ("initiator", "responder")}
    flights, _ = run(suite, keys, rand)
    got = events_by_receiver(flights)
    assert got == expected, f"{transport} {suite}: unexpected events {got}"
    return {
        "randomness_labels": {side: r.label.decode() for side, r in rand.items()},
        "rsa": {side: r.recorded for side, r in rand.items()},
        "flights": [{"from": f.side, "records": f.records, "wire": f.wire.hex(),
                     "receiver_events": [describe(e) for e in f.events]} for f in flights],
    }


def _common(transport: str, i2r: list[bytes], r2i: list[bytes]) -> dict[str, Any]:
    return {
        "about": f"a complete p2psc {transport} session, byte for byte; made by "
                 "test/make_handshake_vector.py, checked by test/test_vectors.py",
        "keys": {"initiator": {"id": INITIATOR, "file": KEY_FILES[INITIATOR]},
                 "responder": {"id": RESPONDER, "file": KEY_FILES[RESPONDER]}},
        "now": NOW,
        "wall_offset": WALL_OFFSET,
        "rekey_after_messages": REKEY_AFTER_MESSAGES,
        "randomness": RANDOMNESS_DOC,
        "rsa_outputs": "each side's RSA operations in the order it asked for them: the real "
                       "RSA-PSS-SHA256 signature or RSA-OAEP-SHA256 ciphertext made at "
                       "generation, with the SHA-256 of the signed or encrypted bytes",
        "flights": "in order: who sent it, the record (TCP) or datagram (UDP) types it "
                   "carries, the exact wire bytes, and the events the other side reported",
        "messages": {"i2r": [m.hex() for m in i2r], "r2i": [m.hex() for m in r2i]},
    }


def main() -> None:
    keys = load_keys(create=True)
    tcp = _common("TCP", I2R, R2I)
    tcp["suites"] = {s: _generate("tcp", s, keys, run_tcp, expected_tcp_events())
                     for s in TCP_SUITES}
    udp = _common("UDP", I2R[:2], R2I[:2])
    udp["addresses"] = {side: list(a) for side, a in UDP_ADDR.items()}
    udp["suites"] = {UDP_SUITE: _generate("udp", UDP_SUITE, keys, run_udp,
                                          expected_udp_events())}
    for path, vector in ((TCP_VECTOR, tcp), (UDP_VECTOR, udp)):
        path.write_text(json.dumps(vector, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
