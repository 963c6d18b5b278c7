"""The per-source budget of directory lookups for unknown initiators (issue 11, item 5): a
stranger's INIT triggers a directory lookup before anything can be verified, so a flood of
INITs with random ids from one source must not exhaust the lookups of others."""

from __future__ import annotations

from p2psc.lookup_budget import LookupBudget

# -- the budget itself ----------------------------------------------------------------------


def test_budget_per_ip_per_64_and_in_flight() -> None:
    b = LookupBudget(rate=1.0, burst=2, max_in_flight=2)
    one = b.acquire(("192.0.2.1", 1000), 0.0)
    two = b.acquire(("192.0.2.1", 1001), 0.0)  # the port is ignored: the same budget
    assert one is not None and two is not None
    assert b.acquire(("192.0.2.1", 1002), 0.0) is None      # two in flight
    b.release(one)
    b.release(two)
    assert b.acquire(("192.0.2.1", 1003), 0.1) is None      # no token left (0.1 refilled)
    got = b.acquire(("192.0.2.1", 1004), 1.0)               # refilled: one more
    assert got is not None and b.acquire(("192.0.2.1", 1), 1.0) is None
    b.release(got)
    assert b.acquire(("192.0.2.2", 1), 1.0) is not None     # another IP has its own
    # IPv6: one budget per /64 (scope and port ignored); an IPv4-mapped address is its IPv4
    assert b.acquire(("2001:db8::1", 1, 0, 0), 0.0) is not None
    assert b.acquire(("2001:db8::ffff:1", 2, 0, 0), 0.0) is not None
    assert b.acquire(("2001:db8::2%eth0", 3, 0, 3), 0.0) is None
    assert b.acquire(("2001:db8:0:1::1", 1, 0, 0), 0.0) is not None  # another /64
    assert b.acquire(("::ffff:192.0.2.2", 5, 0, 0), 1.0) is not None
    assert b.acquire(("192.0.2.2", 6), 1.0) is None


def test_in_flight_bound_holds_with_tokens_to_spare() -> None:
    b = LookupBudget(rate=1000.0, burst=1000, max_in_flight=3)
    slots = [b.acquire(("198.51.100.7", p), 0.0) for p in range(3)]
    assert None not in slots
    assert b.acquire(("198.51.100.7", 9), 0.0) is None
    assert b.in_flight(("198.51.100.7", 0)) == 3
    b.release(slots[0])  # type: ignore[arg-type]
    assert b.in_flight(("198.51.100.7", 0)) == 2
    assert b.acquire(("198.51.100.7", 9), 0.0) is not None


def test_bucket_table_is_bounded_least_recently_used_first() -> None:
    b = LookupBudget(rate=0.0, burst=1, max_in_flight=1, max_sources=3)
    for n in range(1, 4):
        b.release(b.acquire((f"203.0.113.{n}", 1), 0.0))  # type: ignore[arg-type]
    assert len(b) == 3
    assert b.acquire(("203.0.113.1", 1), 0.0) is None  # spent (rate 0: never refilled)
    b.release(b.acquire(("203.0.113.4", 1), 0.0))      # type: ignore[arg-type]
    assert len(b) == 3  # .2 went: the least recently used (.1 was just used)
    assert b.acquire(("203.0.113.3", 1), 0.0) is None
    assert b.acquire(("203.0.113.1", 1), 0.0) is None
    # thousands of sources: the table stays at its bound
    for n in range(5000):
        b.release(b.acquire((f"10.{n >> 8}.{n & 255}.1", 1), 0.0))  # type: ignore[arg-type]
    assert len(b) == 3
