"""p2psc._proto.ratelimit: the rate-limit key of an address and the bounded per-IP table
(written against the survivors of `make mutation`)."""

from __future__ import annotations

from p2psc._proto.ratelimit import InitRateLimiter, rate_key


def test_rate_key_of_an_ipv4_address_with_or_without_a_port() -> None:
    assert rate_key(("10.0.0.1", 4000)) == bytes([10, 0, 0, 1])
    assert rate_key("10.0.0.1") == bytes([10, 0, 0, 1])  # a bare host string, not its "1"


def test_rate_key_strips_a_zone_from_any_host() -> None:
    assert rate_key(("10.0.0.1%eth0", 1)) == bytes([10, 0, 0, 1])
    assert rate_key(("fe80::1%eth0", 1, 0, 2)) == bytes.fromhex("fe80000000000000")


def test_rate_key_of_ipv6_is_its_64_bit_prefix_and_of_mapped_ipv4_the_ipv4_address() -> None:
    assert rate_key(("2001:db8:1:2:3:4:5:6", 1, 0, 0)) == bytes.fromhex("20010db800010002")
    assert rate_key(("::ffff:10.0.0.1", 1, 0, 0)) == bytes([10, 0, 0, 1])


def test_rate_key_of_other_addresses_is_the_address_itself() -> None:
    assert rate_key(()) == ()
    assert rate_key(("not an ip", 1)) == "not an ip"
    assert rate_key((7, 1)) == 7
    assert rate_key(None) is None


def _drain(lim: InitRateLimiter, addr: tuple[str, int]) -> None:
    assert lim.allow_addr(addr, 0.0)
    assert not lim.allow_addr(addr, 0.0)


def test_the_per_ip_table_holds_4096_addresses_by_default() -> None:
    others = [(f"10.1.{n // 256}.{n % 256}", 1) for n in range(4096)]
    first = ("10.0.0.1", 1)
    for extra, kept in ((4095, True), (4096, False)):
        lim = InitRateLimiter(1e9, 10 ** 9, 0.0, 1, now=0.0)  # per IP: one INIT, no refill
        assert lim.max_addrs == 4096
        _drain(lim, first)
        for addr in others[:extra]:
            assert lim.allow_addr(addr, 0.0)
        # with 4095 others the table holds 4096 addresses, the first among them; one more
        # drops the least recently used, the first, which then comes back with a full bucket
        assert lim.allow_addr(first, 0.0) is not kept


def test_the_least_recently_used_address_is_dropped_and_only_when_over_the_bound() -> None:
    lim = InitRateLimiter(1e9, 10 ** 9, 0.0, 1, now=0.0, max_addrs=2)
    a, b, c = ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1)
    _drain(lim, a)
    _drain(lim, b)                       # two addresses: both kept
    assert not lim.allow_addr(a, 0.0)    # a is now the most recently used
    _drain(lim, c)                       # three: b (least recently used) is dropped
    assert not lim.allow_addr(a, 0.0)
    assert not lim.allow_addr(c, 0.0)
    assert lim.allow_addr(b, 0.0)        # b came back with a full bucket (dropping a)
    assert lim.allow_addr(a, 0.0)
