"""``Puncher``: one hole-punching attempt from one UDP socket toward one peer (sans-IO).

Both sides run one when the rendezvous sends them PUNCH (at the same moment), each from the
socket whose public mapping the rendezvous saw:

1. At once, one PUNCH_PING to every candidate address with a low TTL (``low_ttl``, default 2):
   it leaves our own NAT, so the NAT now has a mapping (and a filter entry) for the peer's
   address, but it dies at the next router and never reaches the peer's NAT. A Linux NAT that
   received the peer's packet before its own host sent anything would record an unreplied
   flow and give its host's packets another port, spoiling the punch for half a minute; the
   low-TTL packet prevents that (HyperDHT does the same).
2. After ``sync_delay``, PUNCH_PINGs with the normal TTL to every candidate every
   ``interval`` until ``budget`` is spent.
3. A PUNCH_PING that names our punch id, from any address, is answered with a PUNCH_PONG of
   the same size to where it came from, and that address becomes a candidate too (it is the
   peer's mapping toward us, which differs from the one the rendezvous saw when the peer's
   NAT maps per destination).
4. The first PUNCH_PONG that echoes one of our txids decides the path: the address it came
   from. The attempt then stops pinging but goes on answering pings until ``budget`` ends,
   so the other side can find the path too.

Nothing here is trusted: the punch id only keeps strangers' datagrams out of the way. The
path is as trustworthy as the p2psc handshake that then runs over it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import wire

__all__ = ["Puncher", "MAX_CANDIDATES"]

MAX_CANDIDATES = 16          # addresses pinged per attempt, those learned from pings included
_MAX_TXIDS = 512             # txids remembered (an attempt sends far fewer)


class Puncher:
    """One attempt: feed it punch datagrams and timer wake-ups, send what ``out`` holds.

    ``out`` holds ``(datagram, address, ttl)`` triples; ``ttl`` None means the socket's
    default. ``path`` is the address found (None until then); ``finished`` is True once the
    budget is spent (whether or not a path was found).
    """

    def __init__(self, punch_id: bytes, candidates: list[Any] | tuple[Any, ...], now: float, *,
                 interval: float = 0.2, sync_delay: float = 0.2, budget: float = 4.0,
                 low_ttl: int | None = 2, random: Callable[[int], bytes] = os.urandom) -> None:
        if len(punch_id) != wire.PUNCH_ID_LEN:
            raise ValueError("bad punch id length")
        if interval <= 0 or budget <= 0 or sync_delay < 0:
            raise ValueError("interval and budget must be positive")
        self.punch_id = punch_id
        self.candidates: list[Any] = []
        for addr in candidates:
            self._add_candidate(addr)
        self.interval = interval
        self.deadline = now + budget
        self.random = random
        self.path: Any = None
        self.found_at: float | None = None
        self.finished = False
        self.pings_sent = 0
        self.out: list[tuple[bytes, Any, int | None]] = []
        self._txids: OrderedDict[bytes, Any] = OrderedDict()
        if low_ttl is not None:
            for addr in self.candidates:
                self._ping(addr, low_ttl)
        self._next = now + sync_delay

    # -- inputs -------------------------------------------------------------------------------

    def receive(self, data: bytes | memoryview, addr: Any, now: float) -> bool:
        """A punch datagram that arrived from ``addr``; True if it was for this attempt."""
        msg = wire.decode_punch(data)
        if msg is None or msg.punch_id != self.punch_id or self.finished:
            return False
        if isinstance(msg, wire.PunchPing):
            if msg.txid in self._txids:
                return True  # our own ping, come back (a candidate that is our own address)
            self.out.append((wire.encode_punch(wire.U_PUNCH_PONG, self.punch_id, msg.txid),
                             addr, None))
            if self.path is None and self._add_candidate(addr):
                self._ping(addr, None)
            return True
        if self._txids.pop(msg.txid, None) is None:
            return True  # a pong we did not ask for (or asked for twice): ignored
        if self.path is None:
            self.path = addr
            self.found_at = now
        return True

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is next due (None once finished)."""
        if self.finished:
            return None
        if self.path is not None:
            return self.deadline
        return min(self._next, self.deadline)

    def handle_timer(self, now: float) -> None:
        """Send the pings that are due; finish at the end of the budget."""
        if self.finished:
            return
        if now >= self.deadline:
            self.finished = True
            return
        if self.path is None and now >= self._next:
            for addr in self.candidates:
                self._ping(addr, None)
            self._next = now + self.interval

    def datagrams_to_send(self) -> list[tuple[bytes, Any, int | None]]:
        """What is to be sent, emptied."""
        out, self.out = self.out, []
        return out

    # -- internals ------------------------------------------------------------------------------

    def _add_candidate(self, addr: Any) -> bool:
        if len(self.candidates) >= MAX_CANDIDATES or addr in self.candidates:
            return False
        self.candidates.append(addr)
        return True

    def _ping(self, addr: Any, ttl: int | None) -> None:
        txid = self.random(8)
        self._txids[txid] = addr
        if len(self._txids) > _MAX_TXIDS:
            self._txids.popitem(last=False)
        self.pings_sent += 1
        self.out.append((wire.encode_punch(wire.U_PUNCH_PING, self.punch_id, txid), addr, ttl))
