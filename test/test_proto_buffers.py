"""p2psc._proto.buffers: the buffer pool's bounds and replacement rule, the receive budget's
limit (written against the survivors of `make mutation`)."""

from __future__ import annotations

from p2psc._proto.buffers import BufferPool, ReceiveBudget


def test_pool_defaults_keep_two_buffers_of_up_to_4_mib_and_64_bytes() -> None:
    pool = BufferPool()
    assert pool.max_buffers == 2 and pool.max_buffer_size == 4 * 1024 * 1024 + 64
    a, b, c = bytearray(10), bytearray(20), bytearray(30)
    pool.put(a)
    pool.put(b)
    pool.put(c)
    assert pool.retained == 50
    assert pool.take(1) is c and pool.take(1) is b and pool.take(1) is None


def test_pool_keeps_a_buffer_of_exactly_the_largest_size_and_not_one_more() -> None:
    pool = BufferPool(max_buffers=4, max_buffer_size=100)
    pool.put(bytearray(101))
    assert pool.retained == 0
    big = bytearray(100)
    pool.put(big)
    assert pool.retained == 100
    assert pool.take(100) is big


def test_a_full_pool_replaces_its_smallest_buffer_by_a_larger_one_only() -> None:
    pool = BufferPool(max_buffers=3, max_buffer_size=1000)
    b30, b10, b20 = bytearray(30), bytearray(10), bytearray(20)
    for buf in (b30, b10, b20):
        pool.put(buf)
    assert pool.retained == 60
    same = bytearray(10)
    pool.put(same)                  # no larger than the smallest (10): not kept
    assert pool.retained == 60
    b15 = bytearray(15)
    pool.put(b15)                   # replaces the smallest (b10, not the first)
    assert pool.retained == 65
    got = [pool.take(1), pool.take(1), pool.take(1)]
    assert got[0] is b30 and got[1] is b15 and got[2] is b20
    assert pool.take(1) is None


def test_take_returns_the_first_buffer_large_enough() -> None:
    pool = BufferPool(max_buffers=3)
    small, large = bytearray(10), bytearray(100)
    pool.put(small)
    pool.put(large)
    assert pool.take(11) is large
    assert pool.take(11) is None
    assert pool.take(10) is small


def test_budget_reserves_up_to_exactly_its_limit() -> None:
    budget = ReceiveBudget(100)
    assert budget.reserve(60) is None  # (taken)
    assert budget.reserve(41) == "max_partial_record_bytes"  # (refused)
    assert budget.used == 60
    assert budget.reserve(40) is None  # (taken)
    assert budget.used == 100
    assert budget.reserve(1) == "max_partial_record_bytes"  # (refused)
    budget.release(30)
    assert budget.used == 70 and budget.reserve(30) is None


def test_budget_zero_is_no_limit() -> None:
    budget = ReceiveBudget(0)
    assert budget.reserve(1 << 40) is None  # (taken)
    assert budget.used == 1 << 40


def test_a_buffer_of_the_same_size_as_the_smallest_does_not_replace_it() -> None:
    pool = BufferPool(max_buffers=1)
    kept, same = bytearray(10), bytearray(10)
    pool.put(kept)
    pool.put(same)
    assert pool.take(10) is kept


# -- the per-peer share of the budget ---------------------------------------------------------

def test_per_peer_share_up_to_exactly_its_limit() -> None:
    budget = ReceiveBudget(1000, 100)
    assert budget.reserve(60, "a") is None
    assert budget.reserve(41, "a") == "max_partial_record_bytes_per_peer"
    assert (budget.used, budget.held_by("a")) == (60, 60)  # nothing taken by the refusal
    assert budget.reserve(40, "a") is None
    assert (budget.used, budget.held_by("a")) == (100, 100)
    assert budget.reserve(1, "a") == "max_partial_record_bytes_per_peer"
    assert budget.reserve(100, "b") is None  # another peer has its own share
    assert (budget.used, budget.held_by("b")) == (200, 100)


def test_per_peer_share_zero_is_no_limit_and_the_default() -> None:
    assert ReceiveBudget(0).per_peer == 0
    budget = ReceiveBudget(0)
    assert budget.reserve(1 << 40, "a") is None
    assert budget.held_by("a") == 1 << 40


def test_the_total_is_checked_before_the_share() -> None:
    budget = ReceiveBudget(100, 1000)
    assert budget.reserve(101, "a") == "max_partial_record_bytes"
    assert budget.held_by("a") == 0 and budget.used == 0


def test_bytes_before_the_handshake_count_in_the_total_only() -> None:
    budget = ReceiveBudget(100, 10)
    assert budget.reserve(50, None) is None  # over the per-peer share: not a peer's
    assert budget.used == 50 and budget.held_by("a") == 0
    budget.release(50, None)
    assert budget.used == 0


def test_release_gives_back_exactly_what_was_taken() -> None:
    budget = ReceiveBudget(1000, 100)
    assert budget.reserve(70, "a") is None
    assert budget.reserve(20, "b") is None
    budget.release(30, "a")
    assert (budget.used, budget.held_by("a"), budget.held_by("b")) == (60, 40, 20)
    assert budget.reserve(60, "a") is None  # the share is free again, to the byte
    assert budget.reserve(1, "a") == "max_partial_record_bytes_per_peer"
    budget.release(100, "a")
    assert (budget.used, budget.held_by("a")) == (20, 0)
    budget.release(20, "b")
    assert budget.used == 0 and budget.held_by("b") == 0
    assert budget.reserve(100, "a") is None and budget.reserve(100, "b") is None


def test_held_by_an_unknown_peer_is_zero() -> None:
    budget = ReceiveBudget(1000, 100)
    assert budget.held_by("nobody") == 0
    assert budget.reserve(5, "a") is None
    assert budget.held_by("a") == 5 and budget.held_by("nobody") == 0


def test_release_down_to_one_byte_keeps_that_byte_and_an_unknown_owner_is_harmless() -> None:
    budget = ReceiveBudget(1000, 100)
    assert budget.reserve(10, "a") is None
    budget.release(9, "a")
    assert budget.held_by("a") == 1 and budget.used == 1
    assert budget.reserve(100, "a") == "max_partial_record_bytes_per_peer"  # 1 + 100 > 100
    budget.release(1, "a")
    assert budget.held_by("a") == 0
    budget.release(5, "never-charged")  # (a misuse, but it must not raise)
    assert budget.held_by("never-charged") == 0 and budget.used == -5
