"""p2psc._proto.replay at its boundaries: the INIT replay cache's expiry, size bound and floor,
and the datagram replay window's edges (written against the survivors of `make mutation`)."""

from __future__ import annotations

import pytest

from p2psc._proto.replay import InitReplayCache, ReplayWindow

# -- InitReplayCache -------------------------------------------------------------------------


def test_defaults_are_65536_entries_and_a_120_second_window() -> None:
    cache = InitReplayCache()
    assert cache.max_entries == 65536 and cache.window == 120.0
    # the window: remembered while timestamp + 120 >= now, forgotten one tick later
    assert cache.check_and_add(b"a", 0.0, 0.0)
    assert not cache.check_and_add(b"a", 0.0, 120.0)
    assert cache.check_and_add(b"a", 0.0, 120.5)


def test_default_size_holds_exactly_65536_entries() -> None:
    cache = InitReplayCache()
    for n in range(65536):
        assert cache.check_and_add(n.to_bytes(4, "big"), 1000.0 + n, 1000.0)
    assert len(cache) == 65536
    # one more evicts the lowest timestamp (key 0), whose timestamp becomes the floor
    assert cache.check_and_add(b"new", 1000.0 + 65536, 1000.0)
    assert len(cache) == 65536
    assert not cache.check_and_add(b"other", 1000.0, 1000.0)     # at the floor
    assert cache.check_and_add(b"other", 1000.5, 1000.0)         # just above it


def test_a_size_below_one_is_one() -> None:
    cache = InitReplayCache(max_entries=0, window=60.0)
    assert cache.max_entries == 1
    assert cache.check_and_add(b"a", 10.0, 10.0)
    assert len(cache) == 1
    assert cache.check_and_add(b"b", 11.0, 11.0)
    assert len(cache) == 1


def test_an_entry_expires_strictly_after_timestamp_plus_window() -> None:
    cache = InitReplayCache(10, 30.0)
    assert cache.check_and_add(b"k", 100.0, 100.0)
    assert not cache.check_and_add(b"k", 100.0, 130.0)  # exactly at the edge: still a replay
    assert len(cache) == 1
    assert cache.check_and_add(b"x", 131.0, 130.0 + 2.0**-20)  # one tick past: "k" expired
    assert len(cache) == 1
    assert cache.check_and_add(b"k", 100.0, 131.0)  # (a stale INIT is refused by its timestamp)


def test_expiry_removes_every_entry_out_of_the_window_in_timestamp_order() -> None:
    cache = InitReplayCache(10, 10.0)
    for key, ts in ((b"c", 3.0), (b"a", 1.0), (b"b", 2.0), (b"d", 50.0)):
        assert cache.check_and_add(key, ts, 3.0)
    assert len(cache) == 4
    assert cache.check_and_add(b"e", 12.5, 12.5)  # a (1) and b (2) expired; c (3) not yet
    assert len(cache) == 3
    assert not cache.check_and_add(b"c", 3.0, 12.5)
    assert cache.check_and_add(b"a", 1.0, 12.5)
    assert cache.check_and_add(b"b", 2.0, 12.5)


def test_a_full_cache_evicts_the_lowest_timestamp_and_refuses_at_or_below_it() -> None:
    cache = InitReplayCache(2, 120.0)
    assert cache.check_and_add(b"a", 10.0, 20.0)
    assert cache.check_and_add(b"b", 5.0, 20.0)
    assert len(cache) == 2                       # exactly full: nothing evicted yet
    assert cache.check_and_add(b"a", 10.0, 20.0) is False  # still remembered
    assert cache.check_and_add(b"c", 15.0, 20.0)  # evicts b (the lowest timestamp, 5)
    assert len(cache) == 2
    assert not cache.check_and_add(b"b", 5.0, 20.0)    # evicted, but at the floor
    assert not cache.check_and_add(b"z", 5.0, 20.0)    # any INIT at the floor
    assert not cache.check_and_add(b"y", 4.0, 20.0)    # or below it
    assert not cache.check_and_add(b"a", 10.0, 20.0)   # a is still cached
    assert cache.check_and_add(b"d", 6.0, 20.0)        # above the floor: accepted ...
    # ... and then it is the lowest: evicted at once, raising the floor to 6
    assert len(cache) == 2
    assert not cache.check_and_add(b"d2", 6.0, 20.0)
    assert cache.check_and_add(b"e", 12.0, 20.0)       # evicts a (10): floor 10
    assert not cache.check_and_add(b"f", 10.0, 20.0)
    assert not cache.check_and_add(b"a", 10.0, 20.0)


def test_the_floor_never_goes_down() -> None:
    cache = InitReplayCache(1, 1000.0)
    assert cache.check_and_add(b"a", 50.0, 50.0)
    assert cache.check_and_add(b"b", 60.0, 60.0)   # evicts a: floor 50
    assert cache.check_and_add(b"c", 70.0, 70.0)   # evicts b: floor 60
    assert not cache.check_and_add(b"x", 60.0, 70.0)
    assert cache.check_and_add(b"y", 65.0, 70.0)   # evicted at once (lowest): floor 65
    assert not cache.check_and_add(b"w", 65.0, 70.0)
    assert cache.check_and_add(b"v", 66.0, 70.0)


# -- ReplayWindow ----------------------------------------------------------------------------


def test_window_default_is_8192_and_starts_below_zero() -> None:
    w = ReplayWindow()
    assert w.size == 8192
    assert w.top == -1
    assert w.check(0)


@pytest.mark.parametrize("size", [0, -8, 4, 9, 100, 8193])
def test_window_size_must_be_a_positive_multiple_of_8(size: int) -> None:
    with pytest.raises(ValueError) as info:
        ReplayWindow(size)
    assert str(info.value) == "the window size must be a positive multiple of 8"


def test_the_smallest_window_is_8() -> None:
    w = ReplayWindow(8)
    assert w.size == 8
    w.mark(100)
    assert [w.check(c) for c in range(90, 103)] == [False] * 3 + [True] * 7 + [False, True, True]


def test_a_counter_too_old_to_mark_leaves_the_window_unchanged() -> None:
    w = ReplayWindow(8192)
    w.mark(10000)
    # 1000 is outside the window (10000 - 1000 >= 8192); its byte in the ring is the byte
    # of 9200, which is inside: marking 1000 must not mark 9200
    w.mark(1000)
    assert w.check(9200)
    assert not w.check(1000)
    assert w.top == 10000
    w.mark(9200)
    assert not w.check(9200)


def test_a_counter_at_exactly_the_window_size_below_top_is_too_old() -> None:
    w = ReplayWindow(64)
    w.mark(200)
    assert not w.check(200 - 64)
    assert w.check(200 - 63)
    w.mark(200 - 64)  # ignored
    assert w.top == 200
    for c in range(201, 210):
        assert w.check(c)


def test_a_jump_of_exactly_the_ring_clears_it() -> None:
    w = ReplayWindow(64)       # a ring of 9 bytes
    for c in range(0, 8):
        w.mark(c)
    w.mark(72)                  # 9 bytes on: every old bit is gone
    assert w.top == 72
    assert [w.check(c) for c in range(9, 72)] == [True] * 63
    assert not w.check(72) and not w.check(8)  # 8 is at exactly 64 below the top


def test_marking_the_top_again_and_older_counters_keeps_the_top() -> None:
    w = ReplayWindow(64)
    w.mark(50)
    w.mark(50)
    w.mark(40)
    assert w.top == 50
    assert not w.check(50) and not w.check(40)
    assert w.check(49) and w.check(41)
