"""The UDP datagram formats (docs/UDP.md): type codes, headers, limits.

Datagrams (integers big-endian)::

    INIT      u8 0x01 | INIT body        (ext = u32 sender index | u8 flags | u32 replaced index)
    RESP      u8 0x02 | u32 receiver index | RESP body   (ext = u32 sender index)
    FINISHED  u8 0x03 | u32 receiver index | u64 counter | AEAD(FINISHED MAC)
    DATA      u8 0x04 | u32 receiver index | u64 counter | AEAD(payload)
    KEEPALIVE u8 0x05 | u32 receiver index | u64 counter | AEAD(empty)   (answers FINISHED;
                                                                        holds a quiet session)
    CLOSE     u8 0x06 | u32 receiver index | u64 counter | AEAD(empty)

The AEAD's associated data is the 13-byte header; its nonce is the direction's IV XOR the
counter (see :mod:`p2psc._proto.suites`).
"""

from __future__ import annotations

import struct

from .handshake import MAX_HANDSHAKE_BODY

__all__ = ["T_INIT", "T_RESP", "T_FINISHED", "T_DATA", "T_KEEPALIVE", "T_CLOSE", "HDR",
           "HEADER_LEN", "RESP_HDR", "INIT_EXT", "RESP_EXT", "FLAG_REKEY", "MAX_UDP_PAYLOAD",
           "MIN_SEALED", "MAX_HANDSHAKE_DGRAM", "max_payload_limit"]

T_INIT, T_RESP, T_FINISHED, T_DATA, T_KEEPALIVE, T_CLOSE = 1, 2, 3, 4, 5, 6
HDR = struct.Struct(">BIQ")          # type, receiver index, counter
HEADER_LEN = HDR.size                # 13
RESP_HDR = struct.Struct(">BI")
INIT_EXT = struct.Struct(">IBI")     # sender index, flags, replaced index (0: none)
RESP_EXT = struct.Struct(">I")
FLAG_REKEY = 0x01
MAX_UDP_PAYLOAD = 65507               # the largest IPv4 UDP payload
MIN_SEALED = HEADER_LEN + 16         # header + the shortest tag
MAX_HANDSHAKE_DGRAM = 5 + MAX_HANDSHAKE_BODY


def max_payload_limit(tag_len: int = 32) -> int:
    """The largest payload one datagram can carry (IPv4, the longest tag by default)."""
    return MAX_UDP_PAYLOAD - HEADER_LEN - tag_len
