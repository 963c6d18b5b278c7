"""``LookupBudget``: how many directory lookups each source address may cause.

An INIT from an unknown peer id makes the responder look that id up in the directory before
anything about the INIT can be verified (its signature needs the key being looked up). So
each lookup is charged to the INIT's source: a token bucket per source IP address (the port
is ignored; IPv6: per /64, see :func:`p2psc._proto.ratelimit.rate_key`), and a bound on the
lookups one source has in flight. Time is passed in (``now``: the loop's monotonic time).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from ._proto.ratelimit import TokenBucket, rate_key

__all__ = ["LookupBudget"]

#: the key of a source whose address is not known (all such sources share one budget)
UNKNOWN_SOURCE = "unknown source"


def _key(source: Any) -> Hashable:
    key = rate_key(source)
    return UNKNOWN_SOURCE if key is None else key


class LookupBudget:
    """Directory lookups per source: ``rate`` per second with ``burst`` saved up, and at most
    ``max_in_flight`` at once. :meth:`acquire` before a lookup (None: refused, do not look
    up), :meth:`release` once it is over.

    The table of buckets holds at most ``max_sources`` entries; the least recently used goes
    first (a dropped bucket starts full again if its source comes back, so a flood from more
    sources than that is bounded by the directory client's own limits only). A source's
    lookups in flight are counted apart from its bucket and dropped from the count when the
    last one ends, so that table never holds more entries than lookups are running.
    """

    def __init__(self, rate: float, burst: float, max_in_flight: int, *,
                 max_sources: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_in_flight = max(1, max_in_flight)
        self.max_sources = max(1, max_sources)
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._in_flight: dict[Hashable, int] = {}

    def __len__(self) -> int:
        """The number of sources with a bucket."""
        return len(self._buckets)

    def in_flight(self, source: Any) -> int:
        """The lookups ``source``'s IP (IPv6: its /64) has in flight."""
        return self._in_flight.get(_key(source), 0)

    def acquire(self, source: Any, now: float) -> Hashable | None:
        """Charge one lookup to ``source`` (an address tuple, or a host): its key, to pass to
        :meth:`release`, or None when it has ``max_in_flight`` lookups running or no token
        left (then nothing is charged). Sources whose address is not known (None) share one
        budget."""
        key = _key(source)
        running = self._in_flight.get(key, 0)
        if running >= self.max_in_flight:
            return None
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if not bucket.take(now):
            return None
        self._in_flight[key] = running + 1
        return key

    def release(self, key: Hashable) -> None:
        """A lookup charged by :meth:`acquire` (which returned ``key``) is over."""
        running = self._in_flight.get(key, 0) - 1
        if running > 0:
            self._in_flight[key] = running
        else:
            self._in_flight.pop(key, None)
