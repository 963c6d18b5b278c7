"""The wire formats of NAT traversal (docs/NAT.md). Pure functions: no I/O, no clock.

Three kinds of bytes:

**Control frames** travel between a peer and its relay inside the p2psc records of an
ordinary, authenticated and encrypted p2psc TCP connection (the relay is a p2psc peer with
its own id and key), one frame per message. The first byte is the type; integers are
big-endian; ``id`` is a peer id (u8 length + its bytes; a valid peer id, as
:func:`p2psc._proto.rsakeys.validate_peer_id` says: any other is a malformed frame, so
that no frame can put a newline or a control character into a log line); ``addr`` is
``u8 family (4|6) | 4 or 16 bytes | u16 port``; ``ep`` is an 8-byte endpoint id (a random
name the peer gives one of its UDP sockets)::

    peer -> relay
    HELLO    0x01  u8 version | u8 flags (1: serves TCP, 2: serves UDP) | ep udp server
                   | u8 n | n * addr (the server socket's local addresses)
    CONNECT  0x02  u32 request | ep mine | u8 n | n * addr (local) | id target
    DGRAM    0x03  ep source | ep destination | id target | payload (rest of the frame)
    OPEN     0x04  u32 request | id target
    PING     0x05  u64 cookie
    relay -> peer
    WELCOME  0x81  16 B probe token | u16 udp port 1 | u16 udp port 2 | addr (your TCP
                   address as the relay sees it) | u32 max dgram payload
    PUNCH    0x82  u32 request (0: you are the target) | 16 B punch id | ep yours
                   | ep theirs | u8 n | n * addr (their candidates) | id peer
    DGRAM    0x83  ep source | ep destination | id source | payload
    CIRCUIT  0x84  u32 request | 32 B token
    PONG     0x85  u64 cookie
    INCOMING 0x86  32 B token | id source
    ERROR    0x87  u32 request | u8 code | UTF-8 text (at most 200 bytes; decoded with its
                   control characters replaced by "?": it is logged and shown)

**UDP datagrams** share the socket of p2psc's own UDP (types 0x01..0x06); theirs are
0x50..0x53, so a socket tells them apart by the first byte::

    PROBE       0x50  16 B probe token | ep | 8 B txid | zeros to 64 bytes
    PROBE_REPLY 0x51  8 B txid | addr (the source address the relay saw) | zeros to 64 bytes
    PUNCH_PING  0x52  16 B punch id | 8 B txid
    PUNCH_PONG  0x53  16 B punch id | 8 B txid

A PROBE_REPLY is never larger than the PROBE it answers, and a PUNCH_PONG is the size of
its PING: nobody can use either for amplification.

**A relayed circuit** is a new TCP connection to the relay's port that starts with
``b"P2RC" | u8 version | 32 B token`` instead of a p2psc record (whose first byte, the top
of a u32 length, is 0); the relay answers one byte, 0, once both ends are joined, and from
then on forwards the bytes both ways unchanged. A refused token (unknown, used, expired) is a
close without an answer. Bytes sent after the preamble but before the 0 are held (at most
64 KiB, then reading pauses) and forwarded at the join.

The UDP ports in WELCOME are on the relay's own address (the one the control link reached).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .._proto.rsakeys import validate_peer_id
from ..p2pexcept import ConfigError, ProtocolError

__all__ = [
    "VERSION", "FLAG_TCP", "FLAG_UDP", "EP_LEN", "TOKEN_LEN", "PUNCH_ID_LEN", "CIRCUIT_TOKEN_LEN",
    "MAX_ADDRS", "MAX_ERROR_TEXT", "PROBE_SIZE", "PUNCH_SIZE", "CIRCUIT_MAGIC", "CIRCUIT_PREAMBLE_LEN",
    "C_HELLO", "C_CONNECT", "C_DGRAM", "C_OPEN", "C_PING",
    "R_WELCOME", "R_PUNCH", "R_DGRAM", "R_CIRCUIT", "R_PONG", "R_INCOMING", "R_ERROR",
    "U_PROBE", "U_PROBE_REPLY", "U_PUNCH_PING", "U_PUNCH_PONG", "is_nat_datagram",
    "E_NOT_CONNECTED", "E_NO_MAPPING", "E_RATE_LIMITED", "E_LIMIT", "E_BAD_REQUEST", "E_NO_UDP",
    "E_NO_TCP", "ERROR_NAMES",
    "Addr", "RelayAddress", "Hello", "Connect", "Dgram", "Open", "Ping", "Welcome", "Punch",
    "RelayedDgram", "Circuit", "Pong", "Incoming", "Error", "Probe", "ProbeReply", "PunchPing",
    "PunchPong", "Frame",
    "encode", "decode_peer_frame", "decode_relay_frame", "encode_dgram_header",
    "encode_probe", "decode_probe", "encode_probe_reply", "decode_probe_reply",
    "encode_punch", "decode_punch", "circuit_preamble", "parse_circuit_preamble",
]

VERSION = 1
FLAG_TCP, FLAG_UDP = 1, 2
EP_LEN = 8
TOKEN_LEN = 16            # probe token
PUNCH_ID_LEN = 16
CIRCUIT_TOKEN_LEN = 32
MAX_ADDRS = 8             # addresses in one frame, at most
MAX_ERROR_TEXT = 200
PROBE_SIZE = 64
PUNCH_SIZE = 1 + PUNCH_ID_LEN + 8
CIRCUIT_MAGIC = b"P2RC"
CIRCUIT_PREAMBLE_LEN = len(CIRCUIT_MAGIC) + 1 + CIRCUIT_TOKEN_LEN

C_HELLO, C_CONNECT, C_DGRAM, C_OPEN, C_PING = 0x01, 0x02, 0x03, 0x04, 0x05
R_WELCOME, R_PUNCH, R_DGRAM, R_CIRCUIT, R_PONG, R_INCOMING, R_ERROR = (
    0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87)
U_PROBE, U_PROBE_REPLY, U_PUNCH_PING, U_PUNCH_PONG = 0x50, 0x51, 0x52, 0x53

E_NOT_CONNECTED = 1    # the target has no control link to this relay
E_NO_MAPPING = 2       # no PROBE was seen from the endpoint named in CONNECT
E_RATE_LIMITED = 3     # the request rate of this peer is over its limit
E_LIMIT = 4            # a connection/circuit limit (per peer or in total) is reached
E_BAD_REQUEST = 5      # the frame made no sense (e.g. a request to oneself)
E_NO_UDP = 6           # the target serves no UDP
E_NO_TCP = 7           # the target serves no TCP
ERROR_NAMES = {E_NOT_CONNECTED: "not connected to the relay", E_NO_MAPPING: "no UDP mapping",
               E_RATE_LIMITED: "rate limited", E_LIMIT: "limit reached",
               E_BAD_REQUEST: "bad request", E_NO_UDP: "serves no UDP",
               E_NO_TCP: "serves no TCP"}

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")


def is_nat_datagram(first_byte: int) -> bool:
    """Whether a datagram starting with ``first_byte`` is one of ours (not p2psc's own UDP)."""
    return 0x50 <= first_byte <= 0x53


class Addr(NamedTuple):
    """An IP address and port, as sockets give them (``(host, port)``)."""

    host: str
    port: int


class RelayAddress(NamedTuple):
    """The "address" of a peer endpoint reached through the relay: its authenticated peer id
    and its endpoint id. It stands where a socket address would in the UDP core, whose rate
    limits key it per peer (:func:`p2psc._proto.ratelimit.rate_key`: apart from any IP
    address, even for a peer id that looks like one)."""

    peer_id: str
    endpoint: bytes


# -- frames -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello:
    flags: int
    udp_endpoint: bytes
    local_addrs: tuple[Addr, ...] = ()
    version: int = VERSION


@dataclass(frozen=True)
class Connect:
    request: int
    endpoint: bytes
    local_addrs: tuple[Addr, ...]
    target: str


@dataclass(frozen=True)
class Dgram:
    """peer -> relay: a datagram for ``target``'s endpoint ``destination``."""

    source: bytes
    destination: bytes
    target: str
    payload: bytes


@dataclass(frozen=True)
class Open:
    request: int
    target: str


@dataclass(frozen=True)
class Ping:
    cookie: int


@dataclass(frozen=True)
class Welcome:
    probe_token: bytes
    udp_port1: int
    udp_port2: int
    observed: Addr
    max_dgram: int


@dataclass(frozen=True)
class Punch:
    request: int
    punch_id: bytes
    endpoint: bytes          # the receiver's own endpoint that is to punch
    peer_endpoint: bytes     # the other side's endpoint
    candidates: tuple[Addr, ...]
    peer_id: str


@dataclass(frozen=True)
class RelayedDgram:
    """relay -> peer: a datagram from ``source_peer``'s endpoint ``source``."""

    source: bytes
    destination: bytes
    source_peer: str
    payload: bytes


@dataclass(frozen=True)
class Circuit:
    request: int
    token: bytes


@dataclass(frozen=True)
class Pong:
    cookie: int


@dataclass(frozen=True)
class Incoming:
    token: bytes
    source_peer: str


@dataclass(frozen=True)
class Error:
    request: int
    code: int
    text: str


Frame = (Hello | Connect | Dgram | Open | Ping | Welcome | Punch | RelayedDgram | Circuit | Pong
         | Incoming | Error)


def _valid_id(peer_id: str) -> bool:
    try:
        validate_peer_id(peer_id)
    except ConfigError:
        return False
    return True


def _id(peer_id: str) -> bytes:
    if not _valid_id(peer_id):
        raise ValueError("not a valid peer id")
    b = peer_id.encode("utf-8")
    return bytes((len(b),)) + b


def _printable(text: str) -> str:
    """``text`` with every character that is not printable (newlines, escapes) as "?"."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _addr(a: Addr) -> bytes:
    ip = ipaddress.ip_address(a.host.partition("%")[0])
    return bytes((ip.version,)) + ip.packed + _U16.pack(a.port)


def _addrs(addrs: tuple[Addr, ...]) -> bytes:
    if len(addrs) > MAX_ADDRS:
        raise ValueError(f"at most {MAX_ADDRS} addresses")
    return bytes((len(addrs),)) + b"".join(_addr(a) for a in addrs)


def _ep(ep: bytes) -> bytes:
    if len(ep) != EP_LEN:
        raise ValueError(f"an endpoint id is {EP_LEN} bytes")
    return ep


def encode(frame: Frame) -> bytes:
    """The bytes of one control frame (raises ValueError on a value that cannot be sent)."""
    t = type(frame)
    if t is Hello:
        assert isinstance(frame, Hello)
        return (bytes((C_HELLO, frame.version, frame.flags)) + _ep(frame.udp_endpoint)
                + _addrs(frame.local_addrs))
    if t is Connect:
        assert isinstance(frame, Connect)
        return (bytes((C_CONNECT,)) + _U32.pack(frame.request) + _ep(frame.endpoint)
                + _addrs(frame.local_addrs) + _id(frame.target))
    if t is Dgram:
        assert isinstance(frame, Dgram)
        return encode_dgram_header(C_DGRAM, frame.source, frame.destination,
                                   frame.target) + frame.payload
    if t is Open:
        assert isinstance(frame, Open)
        return bytes((C_OPEN,)) + _U32.pack(frame.request) + _id(frame.target)
    if t is Ping:
        assert isinstance(frame, Ping)
        return bytes((C_PING,)) + _U64.pack(frame.cookie)
    if t is Welcome:
        assert isinstance(frame, Welcome)
        if len(frame.probe_token) != TOKEN_LEN:
            raise ValueError("bad probe token length")
        return (bytes((R_WELCOME,)) + frame.probe_token + _U16.pack(frame.udp_port1)
                + _U16.pack(frame.udp_port2) + _addr(frame.observed) + _U32.pack(frame.max_dgram))
    if t is Punch:
        assert isinstance(frame, Punch)
        if len(frame.punch_id) != PUNCH_ID_LEN:
            raise ValueError("bad punch id length")
        return (bytes((R_PUNCH,)) + _U32.pack(frame.request) + frame.punch_id
                + _ep(frame.endpoint) + _ep(frame.peer_endpoint) + _addrs(frame.candidates)
                + _id(frame.peer_id))
    if t is RelayedDgram:
        assert isinstance(frame, RelayedDgram)
        return encode_dgram_header(R_DGRAM, frame.source, frame.destination,
                                   frame.source_peer) + frame.payload
    if t is Circuit:
        assert isinstance(frame, Circuit)
        if len(frame.token) != CIRCUIT_TOKEN_LEN:
            raise ValueError("bad circuit token length")
        return bytes((R_CIRCUIT,)) + _U32.pack(frame.request) + frame.token
    if t is Pong:
        assert isinstance(frame, Pong)
        return bytes((R_PONG,)) + _U64.pack(frame.cookie)
    if t is Incoming:
        assert isinstance(frame, Incoming)
        if len(frame.token) != CIRCUIT_TOKEN_LEN:
            raise ValueError("bad circuit token length")
        return bytes((R_INCOMING,)) + frame.token + _id(frame.source_peer)
    if t is Error:
        assert isinstance(frame, Error)
        text = frame.text.encode("utf-8")[:MAX_ERROR_TEXT]
        text = text.decode("utf-8", "ignore").encode("utf-8")  # not cut inside a character
        return bytes((R_ERROR,)) + _U32.pack(frame.request) + bytes((frame.code,)) + text
    raise TypeError(f"not a frame: {frame!r}")


def encode_dgram_header(kind: int, source: bytes, destination: bytes, peer_id: str) -> bytes:
    """The header of a DGRAM frame (``kind`` C_DGRAM or R_DGRAM); the payload follows it."""
    return bytes((kind,)) + _ep(source) + _ep(destination) + _id(peer_id)


class _Reader:
    """Reads a frame front to back; every read checks the length first."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = bytes(data)
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("NAT frame truncated")
        b = self.data[self.pos:end]
        self.pos = end
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def peer_id(self) -> str:
        n = self.u8()
        if n == 0:
            raise ProtocolError("empty peer id in NAT frame")
        try:
            peer_id = self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("peer id in NAT frame is not UTF-8") from None
        if not _valid_id(peer_id):
            raise ProtocolError("invalid peer id in NAT frame")
        return peer_id

    def addr(self) -> Addr:
        family = self.u8()
        if family == 4:
            host = str(ipaddress.IPv4Address(self.take(4)))
        elif family == 6:
            host = str(ipaddress.IPv6Address(self.take(16)))
        else:
            raise ProtocolError(f"bad address family {family} in NAT frame")
        return Addr(host, self.u16())

    def addrs(self) -> tuple[Addr, ...]:
        n = self.u8()
        if n > MAX_ADDRS:
            raise ProtocolError(f"more than {MAX_ADDRS} addresses in NAT frame")
        return tuple(self.addr() for _ in range(n))

    def rest(self) -> bytes:
        b = self.data[self.pos:]
        self.pos = len(self.data)
        return b

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes in NAT frame")


def decode_peer_frame(data: bytes | memoryview) -> Hello | Connect | Dgram | Open | Ping:
    """A frame a peer sent to the relay; :class:`ProtocolError` if malformed."""
    r = _Reader(data)
    t = r.u8()
    frame: Hello | Connect | Dgram | Open | Ping
    if t == C_HELLO:
        version, flags = r.u8(), r.u8()
        if version != VERSION:
            raise ProtocolError(f"unsupported NAT protocol version {version}")
        frame = Hello(flags, r.take(EP_LEN), r.addrs(), version)
    elif t == C_CONNECT:
        request, ep = r.u32(), r.take(EP_LEN)
        frame = Connect(request, ep, r.addrs(), r.peer_id())
    elif t == C_DGRAM:
        src, dst = r.take(EP_LEN), r.take(EP_LEN)
        return Dgram(src, dst, r.peer_id(), r.rest())
    elif t == C_OPEN:
        frame = Open(r.u32(), r.peer_id())
    elif t == C_PING:
        frame = Ping(r.u64())
    else:
        raise ProtocolError(f"unknown NAT frame type 0x{t:02x} from a peer")
    r.end()
    return frame


def decode_relay_frame(data: bytes | memoryview
                       ) -> Welcome | Punch | RelayedDgram | Circuit | Pong | Incoming | Error:
    """A frame the relay sent to a peer; :class:`ProtocolError` if malformed."""
    r = _Reader(data)
    t = r.u8()
    frame: Welcome | Punch | RelayedDgram | Circuit | Pong | Incoming | Error
    if t == R_WELCOME:
        token, p1, p2 = r.take(TOKEN_LEN), r.u16(), r.u16()
        frame = Welcome(token, p1, p2, r.addr(), r.u32())
    elif t == R_PUNCH:
        request, punch_id = r.u32(), r.take(PUNCH_ID_LEN)
        ep, peer_ep = r.take(EP_LEN), r.take(EP_LEN)
        frame = Punch(request, punch_id, ep, peer_ep, r.addrs(), r.peer_id())
    elif t == R_DGRAM:
        src, dst = r.take(EP_LEN), r.take(EP_LEN)
        return RelayedDgram(src, dst, r.peer_id(), r.rest())
    elif t == R_CIRCUIT:
        frame = Circuit(r.u32(), r.take(CIRCUIT_TOKEN_LEN))
    elif t == R_PONG:
        frame = Pong(r.u64())
    elif t == R_INCOMING:
        frame = Incoming(r.take(CIRCUIT_TOKEN_LEN), r.peer_id())
    elif t == R_ERROR:
        request, code = r.u32(), r.u8()
        text = r.rest()
        if len(text) > MAX_ERROR_TEXT:
            raise ProtocolError("NAT error text too long")
        frame = Error(request, code, _printable(text.decode("utf-8", "replace")))
    else:
        raise ProtocolError(f"unknown NAT frame type 0x{t:02x} from the relay")
    r.end()
    return frame


# -- UDP datagrams ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Probe:
    token: bytes
    endpoint: bytes
    txid: bytes


@dataclass(frozen=True)
class ProbeReply:
    txid: bytes
    observed: Addr


@dataclass(frozen=True)
class PunchPing:
    punch_id: bytes
    txid: bytes


@dataclass(frozen=True)
class PunchPong:
    punch_id: bytes
    txid: bytes


def encode_probe(token: bytes, endpoint: bytes, txid: bytes) -> bytes:
    if len(token) != TOKEN_LEN or len(txid) != 8:
        raise ValueError("bad probe token or txid length")
    body = bytes((U_PROBE,)) + token + _ep(endpoint) + txid
    return body + bytes(PROBE_SIZE - len(body))


def decode_probe(data: bytes | memoryview) -> Probe | None:
    """A PROBE, or None if ``data`` is not exactly one (wrong size or type)."""
    if len(data) != PROBE_SIZE or data[0] != U_PROBE:
        return None
    b = bytes(data)
    return Probe(b[1:17], b[17:25], b[25:33])


def encode_probe_reply(txid: bytes, observed: Addr) -> bytes:
    body = bytes((U_PROBE_REPLY,)) + txid + _addr(observed)
    return body + bytes(PROBE_SIZE - len(body))


def decode_probe_reply(data: bytes | memoryview) -> ProbeReply | None:
    """A PROBE_REPLY, or None if ``data`` is not one."""
    if len(data) != PROBE_SIZE or data[0] != U_PROBE_REPLY:
        return None
    r = _Reader(data)
    r.u8()
    txid = r.take(8)
    try:
        observed = r.addr()
    except ProtocolError:
        return None
    return ProbeReply(txid, observed)


def encode_punch(kind: int, punch_id: bytes, txid: bytes) -> bytes:
    """A PUNCH_PING or PUNCH_PONG (``kind``)."""
    if kind not in (U_PUNCH_PING, U_PUNCH_PONG) or len(punch_id) != PUNCH_ID_LEN or len(txid) != 8:
        raise ValueError("bad punch datagram")
    return bytes((kind,)) + punch_id + txid


def decode_punch(data: bytes | memoryview) -> PunchPing | PunchPong | None:
    """A PUNCH_PING or PUNCH_PONG, or None if ``data`` is neither."""
    if len(data) != PUNCH_SIZE:
        return None
    b = bytes(data)
    if b[0] == U_PUNCH_PING:
        return PunchPing(b[1:17], b[17:25])
    if b[0] == U_PUNCH_PONG:
        return PunchPong(b[1:17], b[17:25])
    return None


# -- relayed circuits -------------------------------------------------------------------------

def circuit_preamble(token: bytes) -> bytes:
    """What a peer sends first on a circuit connection to the relay."""
    if len(token) != CIRCUIT_TOKEN_LEN:
        raise ValueError("bad circuit token length")
    return CIRCUIT_MAGIC + bytes((VERSION,)) + token


def parse_circuit_preamble(data: bytes) -> bytes | None:
    """The token of a complete circuit preamble, or None if ``data`` is not one."""
    if (len(data) != CIRCUIT_PREAMBLE_LEN or data[:4] != CIRCUIT_MAGIC
            or data[4] != VERSION):
        return None
    return data[5:]
