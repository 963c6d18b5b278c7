"""What the asyncio protocol classes of both transports share: handshake waiters, the end of
the connection (fail/close), calling the application's hooks safely, the key-lookup tasks,
and one loop timer re-armed from the sans-IO core's ``get_timer()`` (aioquic's pattern).

:class:`~p2psc.p2p.TcpP2P` and :class:`~p2psc.udp_p2p.UdpP2P` are thin subclasses: they feed
the core, write what it produces and turn its events into hooks.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .p2pexcept import HandshakeError, P2PError

log = logging.getLogger("p2psc.aio")

__all__ = ["AdapterBase", "wall_offset"]


def wall_offset(loop: asyncio.AbstractEventLoop) -> float:
    """Wall-clock time minus the loop's clock: what the core adds to ``now`` for INIT
    timestamps."""
    return time.time() - loop.time()


class AdapterBase(abc.ABC):
    """The lifecycle both protocol classes share.

    Subclasses implement :meth:`_core_timer` (the core's next deadline) and
    :meth:`_on_core_timer` (run the core's ``handle_timer`` and act on its events), and call
    :meth:`_set_closed` when the connection or endpoint ends.
    """

    __slots__ = ("_loop", "_handshaked", "_error", "_closed", "_waiters", "_timer",
                 "_timer_at", "_tasks")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handshaked = False
        self._error: P2PError | None = None
        self._closed = False
        self._waiters: list[asyncio.Future[None]] | None = None  # a list once needed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._tasks: set[asyncio.Task[None]] | None = None  # key lookups, a set once needed

    # -- handshake waiters ----------------------------------------------------------------------

    async def _wait_handshaked(self, closed_message: str) -> None:
        if self._handshaked:
            return
        if self._error is not None:
            raise self._error
        if self._closed:
            raise HandshakeError(closed_message)
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        await fut

    def _wake_waiters(self, error: P2PError | None, closed_message: str = "") -> None:
        """Handshake waiters: done (``error`` None and not closed) or failed."""
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if fut.done():
                continue
            if error is None and not self._closed:
                fut.set_result(None)
            else:
                fut.set_exception(error or HandshakeError(closed_message))

    # -- the end ---------------------------------------------------------------------------------

    def _set_closed(self, error: P2PError | None, closed_message: str) -> bool:
        """Mark closed (once: False if it already was), keep the first error, stop the timer
        and the lookups, fail the handshake waiters."""
        if self._closed:
            return False
        self._closed = True
        if error is not None and self._error is None:
            self._error = error
        self._cancel_timer()
        for task in list(self._tasks or ()):
            task.cancel()
        self._tasks = None
        self._wake_waiters(self._error, closed_message)
        return True

    # -- hooks and tasks -------------------------------------------------------------------------

    def _call_hook(self, hook: Callable[..., Any], *args: Any) -> None:
        """Call an application hook; an exception in it is logged, never raised into the loop."""
        try:
            hook(*args)
        except Exception:
            log.exception("%s: exception in %s", self._describe(),
                          getattr(hook, "__name__", hook))

    def _start_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` (a key lookup) as a task owned by this protocol: cancelled when it
        closes."""
        task = asyncio.ensure_future(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)

    def _describe(self) -> str:
        return type(self).__name__

    # -- the core's timer ------------------------------------------------------------------------

    @abc.abstractmethod
    def _core_timer(self) -> float | None:
        """The core's next deadline (loop time), or None."""

    @abc.abstractmethod
    def _on_core_timer(self, now: float) -> None:
        """Run the core's ``handle_timer(now)`` and act on what it produced."""

    def _rearm_timer(self) -> None:
        """Set the loop timer to the core's next deadline, if it is earlier than the one set
        (a timer that fires early finds nothing due and re-arms)."""
        loop = self._loop
        if loop is None or self._closed:
            return
        when = self._core_timer()
        if when is None or when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._fire_timer)

    def _fire_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        loop = self._loop
        if loop is None or self._closed:
            return
        self._on_core_timer(loop.time())
        self._rearm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = float("inf")
