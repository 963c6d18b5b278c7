"""Replay protection: the responder's cache of recent INITs, and the sliding window of
datagram counters (RFC 6479 style) used by UDP sessions."""

from __future__ import annotations

import heapq

__all__ = ["InitReplayCache", "ReplayWindow"]


class InitReplayCache:
    """Remembers the INITs accepted within the timestamp window, bounded in size.

    An entry expires when its INIT's timestamp leaves the window (a replay is then refused as
    stale). When the cache is full the entry with the lowest timestamp is evicted and its
    timestamp becomes a floor: every INIT at or below the floor is refused, so an evicted
    INIT can never be replayed. Evicting the lowest timestamp keeps the floor below every
    INIT still cached, so a peer whose clock runs ahead cannot raise it for everyone. Only
    INITs whose signature verified are added, so filling it needs a known key.
    """

    def __init__(self, max_entries: int = 65536, window: float = 120.0):
        self.max_entries = max(1, max_entries)
        self.window = window
        self._entries: dict[bytes, float] = {}
        self._by_time: list[tuple[float, bytes]] = []  # a heap: the lowest timestamp first
        self._floor = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, key: bytes, timestamp: float) -> bool:
        """True when :meth:`check_and_add` would refuse this INIT now (nothing is changed)."""
        return timestamp <= self._floor or key in self._entries

    def check_and_add(self, key: bytes, timestamp: float, now: float) -> bool:
        """True (and remembered) when this INIT was not seen; False for a replay."""
        entries, by_time = self._entries, self._by_time
        while by_time and by_time[0][0] + self.window < now:
            del entries[heapq.heappop(by_time)[1]]
        if timestamp <= self._floor or key in entries:
            return False
        entries[key] = timestamp
        heapq.heappush(by_time, (timestamp, key))
        while len(entries) > self.max_entries:
            evicted_ts, evicted_key = heapq.heappop(by_time)
            del entries[evicted_key]
            self._floor = max(self._floor, evicted_ts)
        return True


class ReplayWindow:
    """A sliding bitmap window over 64-bit counters (RFC 6479; WireGuard keeps 8,192 bits).

    :meth:`check` tells whether a counter may be new; :meth:`mark` records it, to be called
    only after the datagram authenticated. Counters more than ``size - 1`` below the highest
    one marked are refused. The bitmap is a ring of bytes, so moving the window costs no more
    than clearing the bytes it passes (no big-integer shifts on the per-datagram path).
    """

    __slots__ = ("size", "_top", "_ring", "_nbytes")

    def __init__(self, size: int = 8192):
        if size < 8 or size % 8:
            raise ValueError("the window size must be a positive multiple of 8")
        self.size = size
        self._top = -1                   # highest counter marked
        self._nbytes = size // 8 + 1     # one byte of slack: the top byte is partly ahead
        self._ring = bytearray(self._nbytes)

    @property
    def top(self) -> int:
        """The highest counter marked (-1 before any)."""
        return self._top

    def check(self, counter: int) -> bool:
        """False for a counter already seen or older than the window."""
        top = self._top
        if counter > top:
            return True
        if top - counter >= self.size or counter < 0:
            return False
        return not (self._ring[(counter >> 3) % self._nbytes] >> (counter & 7)) & 1

    def mark(self, counter: int) -> None:
        """Record ``counter`` as seen (call after :meth:`check` and authentication)."""
        top = self._top
        ring, nbytes = self._ring, self._nbytes
        if counter > top:
            old_byte, new_byte = top >> 3, counter >> 3
            if new_byte - old_byte >= nbytes:
                ring[:] = bytes(nbytes)
            else:
                for b in range(old_byte + 1, new_byte + 1):
                    ring[b % nbytes] = 0
            self._top = counter
        elif top - counter >= self.size or counter < 0:
            return  # outside the window: nothing to remember (check() refuses it anyway)
        ring[(counter >> 3) % nbytes] |= 1 << (counter & 7)
