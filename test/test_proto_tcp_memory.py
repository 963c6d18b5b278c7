"""Issue 11, item 4: a record's header alone no longer makes the receiver allocate the size it
declares. Receive buffers grow with the bytes that arrive, a handler-wide budget bounds what
partly received records hold, and large records are still read straight into place (a pooled
buffer, reused: no copy)."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from attack_util import run_session
from attack_util import clone as clone_conn
from p2psc._proto.buffers import GROW_STEP, BufferPool, ReceiveBudget
from p2psc._proto.events import Closed, MessageReceived
from p2psc._proto.tcp import HEADER_LEN, RecordType
from p2psc.p2pexcept import LimitExceeded

MiB = 1024 * 1024


def _session() -> Any:
    # made when first needed, not at import: a session at module level would keep record
    # ciphers alive for the whole run (test_attack_secrets counts them)
    if not _SESSION:
        _SESSION.append(run_session(max_message_size=16 * MiB))
    return _SESSION[0]


def _established(budget: ReceiveBudget, pool: BufferPool | None = None) -> object:
    sess = _session()
    c = clone_conn(sess.r)
    # (the clone shares nothing mutable; give it this test's budget and pool)
    object.__setattr__(c, "_budget", budget)
    object.__setattr__(c, "_pool", pool)
    return c


_SESSION: list[Any] = []


@pytest.fixture(autouse=True, scope="module")
def _forget_the_session() -> Iterator[None]:
    yield
    _SESSION.clear()


def test_a_header_declaring_16_mib_allocates_what_arrived_not_what_it_declares() -> None:
    """64 connections each sent 5 bytes declaring a 16 MiB record (the review's attack took
    the process from 35 to 1,060 MiB): now each holds about GROW_STEP."""
    budget = ReceiveBudget(0)
    header = struct.pack(">IB", 16 * MiB, RecordType.DATA)
    conns = [_established(budget) for _ in range(64)]
    tracemalloc.start()
    try:
        for c in conns:
            assert c.receive_data(header) == []  # type: ignore[attr-defined]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert budget.used <= 64 * (HEADER_LEN + GROW_STEP)
    assert peak < 64 * (GROW_STEP + 64 * 1024)  # far below 64 x 16 MiB = 1 GiB
    # and a buffer grows only as bytes arrive: 1 MiB more into one of them
    c = conns[0]
    for _ in range(16):
        assert c.receive_data(bytes(64 * 1024)) == []  # type: ignore[attr-defined]
    assert budget.used <= 63 * (HEADER_LEN + GROW_STEP) + 2 * (1 * MiB + GROW_STEP)


def test_the_handler_wide_budget_closes_the_connection_that_would_pass_it() -> None:
    budget = ReceiveBudget(6 * MiB)
    header = struct.pack(">IB", 16 * MiB, RecordType.DATA)
    a, b = _established(budget), _established(budget)
    assert a.receive_data(header + bytes(2 * MiB)) == []  # type: ignore[attr-defined]
    used = budget.used
    assert 2 * MiB < used <= 4 * MiB + HEADER_LEN  # (the buffer doubles as bytes arrive)
    events = b.receive_data(header + bytes(2 * MiB))  # type: ignore[attr-defined]
    assert len(events) == 1 and isinstance(events[0], Closed)
    assert type(events[0].error) is LimitExceeded
    assert "max_partial_record_bytes" in str(events[0].error)
    assert budget.used == used  # b released what it held when it closed
    assert budget.used <= 6 * MiB


def test_budget_is_released_when_records_complete_and_when_connections_close() -> None:
    budget = ReceiveBudget(0)
    sess = _session()
    c = _established(budget)
    rec = sess.data[0]
    half = len(rec) // 2
    assert c.receive_data(rec[:half]) == []  # type: ignore[attr-defined]
    held = budget.used
    assert held > 0 or len(rec) < HEADER_LEN  # (a small record is handled from the scratch)
    assert c.receive_data(rec[half:]) == [MessageReceived(b"attack at dawn")]  # type: ignore[attr-defined]
    assert budget.used == 0
    d = _established(budget)
    d.receive_data(struct.pack(">IB", 5 * MiB, RecordType.DATA) + bytes(100))  # type: ignore[attr-defined]
    assert budget.used > 0
    d.abort()  # type: ignore[attr-defined]
    assert budget.used == 0


def test_large_records_are_read_in_place_into_a_reused_buffer() -> None:
    """The zero-copy path stays: once a large record has been received, the next one is read
    straight into the kept buffer (the views get_buffer hands out cover the whole rest)."""
    sess = run_session(messages=[b"x" * MiB, b"y" * MiB], replies=[], max_message_size=16 * MiB)
    pool = BufferPool()
    c = clone_conn(sess.r)
    object.__setattr__(c, "_pool", pool)
    first, second = sess.data
    # the first record grows its buffer as it arrives, then the buffer is kept
    got = []
    for k in range(0, len(first), 200_000):
        got += c.receive_data(first[k:k + 200_000])
    assert got == [MessageReceived(b"x" * MiB)]
    assert pool.retained >= len(first)
    # the second: after its first bytes, one view takes all the rest
    view = c.get_buffer(-1)
    view[:HEADER_LEN] = second[:HEADER_LEN]
    n = len(view)
    view.release()
    assert c.buffer_updated(HEADER_LEN) == []
    rest = c.get_buffer(-1)
    assert len(rest) == len(second) - HEADER_LEN  # the whole record, in place
    rest[:] = second[HEADER_LEN:]
    rest.release()
    assert c.buffer_updated(len(second) - HEADER_LEN) == [MessageReceived(b"y" * MiB)]
    assert n > HEADER_LEN
