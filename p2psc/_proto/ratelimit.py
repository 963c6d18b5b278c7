"""Token buckets for the responder's INIT processing: one per source IP address (IPv6: per
/64) and one in total. Time is passed in (``now``)."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["TokenBucket", "InitRateLimiter", "rate_key"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = max(1.0, float(burst))
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


def rate_key(addr: Any) -> Hashable:
    """The rate-limit key of a source address: its IP address (the port is ignored), for IPv6
    the /64 prefix (one host or site commonly holds a whole /64). An IPv4-mapped IPv6 address
    counts as its IPv4 address. An address that is no socket address (its second field is not
    an integer port: a :class:`~p2psc.nat.wire.RelayAddress`, whose first field is a peer id
    the relay authenticated) has a key of its own kind: a peer id that looks like an IP
    address shares no bucket with that address."""
    if isinstance(addr, tuple) and len(addr) >= 2 and not isinstance(addr[1], int):
        return ("relayed", addr[0])
    host = addr[0] if isinstance(addr, tuple) and addr else addr
    if not isinstance(host, str):
        return host  # type: ignore[no-any-return]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return mapped.packed if mapped is not None else ip.packed[:8]
    return ip.packed


class InitRateLimiter:
    """Token buckets on INIT processing: one per source IP address (IPv6: per /64), and one in
    total.

    The IP's bucket is charged first, for every INIT that parses and names a peer we would
    answer (and for every RESP answered from the cache); it bounds the RSA verifications
    (cheap public-key operations) one IP can cause, whatever source ports it uses. The total
    bucket is charged only for INITs whose signature verified, just before the private-key
    work (sign + decrypt), so an attacker without a key cannot drain it. The per-IP table is
    bounded (least recently used buckets are dropped; a dropped bucket was full, or is
    refilled sooner than it would have been).
    """

    def __init__(self, rate: float, burst: float, per_addr_rate: float, per_addr_burst: float,
                 now: float, max_addrs: int = 4096):
        self.total = TokenBucket(rate, burst, now)
        self.per_addr_rate = per_addr_rate
        self.per_addr_burst = per_addr_burst
        self.max_addrs = max_addrs
        self._addrs: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def _addr_bucket(self, addr: Any, now: float) -> TokenBucket:
        key = rate_key(addr)
        b = self._addrs.get(key)
        if b is None:
            b = self._addrs[key] = TokenBucket(self.per_addr_rate, self.per_addr_burst, now)
            if len(self._addrs) > self.max_addrs:
                self._addrs.popitem(last=False)
        else:
            self._addrs.move_to_end(key)
        return b

    def allow_addr(self, addr: Any, now: float) -> bool:
        """The bucket of ``addr``'s IP (port ignored; IPv6: its /64)."""
        return self._addr_bucket(addr, now).take(now)

    def allow_total(self, now: float) -> bool:
        """The total bucket: for a verified INIT about to cost private-key work."""
        return self.total.take(now)
