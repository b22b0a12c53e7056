"""One asyncio event loop per simulated host, in virtual time, driven one step at a time.

The agent is asyncio code; the simulator runs it unchanged. Each simulated agent gets its own
:class:`SimLoop`, whose clock is the host's clock (virtual time, with the host's drift), and
which never waits: it has no I/O to poll (every I/O of a simulated agent is an in-memory fake
that schedules callbacks). The simulator (:mod:`vmcluster.sim.world`) asks each loop when it
next has work (:meth:`SimLoop.next_at`), moves virtual time there, and runs one iteration of
that loop (:func:`step`). A loop that is not stepped is a hung process; one that is dropped is
a dead one. As nothing else decides what runs when, a run is decided by its seed alone.

This uses two internals of CPython's asyncio (``BaseEventLoop._run_once`` and its ``_ready``
and ``_scheduled`` queues), stable since Python 3.8; tests/sim pins the behaviour.
"""

import asyncio
import heapq
import math
from asyncio import base_events, events
from collections.abc import Callable
from typing import Any


class _NoSelector:
    """Nothing to poll: a simulated loop's I/O is in memory."""

    def select(self, timeout: float | None) -> list[Any]:
        return []

    def close(self) -> None:
        pass


class SimLoop(base_events.BaseEventLoop):
    def __init__(self, clock: Callable[[], float], name: str) -> None:
        super().__init__()
        self._clock = clock
        self._selector = _NoSelector()
        self.name = name
        self.set_exception_handler(_record_exception)
        self.exceptions: list[dict[str, Any]] = []

    def time(self) -> float:
        return self._clock()

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass

    def next_at(self) -> float:
        """When (on this loop's clock) it next has something to run; inf: nothing."""
        internals: Any = self  # BaseEventLoop's queues (see the module's docstring)
        if internals._ready:
            return -math.inf
        scheduled = internals._scheduled
        while scheduled and scheduled[0]._cancelled:
            heapq.heappop(scheduled)._scheduled = False
            internals._timer_cancelled_count -= 1
        return float(scheduled[0]._when) if scheduled else math.inf


def _record_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    assert isinstance(loop, SimLoop)
    loop.exceptions.append(context)


def step(loop: SimLoop) -> None:
    """Run one iteration of ``loop``: what is ready, and the timers that are due."""
    events._set_running_loop(loop)
    try:
        internals: Any = loop
        internals._run_once()
    finally:
        events._set_running_loop(None)
