"""Handler time limits on one shared timer per event loop.

``asyncio.timeout`` arms a timer when a run starts and cancels it when the run ends: under
uvloop a libuv timer handle created and stopped per delivery, ~4 µs of the no-op consume path
(``make bench``, workload 1). ``limit`` registers the run with its loop's ``_Sweeper``, which
keeps one timer armed at (or before) the earliest deadline of the runs in flight. A run that
ends leaves the timer armed: when it fires with nothing due, it re-arms for the earliest
remaining deadline, or disarms when no run is left. Under steady load that is about one timer
per limit's length, not one per delivery.

Otherwise ``limit`` behaves as ``asyncio.timeout``: a run past its deadline has its task
cancelled, and the cancellation leaves the ``with`` as ``TimeoutError``, unless the task was
also cancelled from elsewhere (then the ``CancelledError`` propagates).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: Timers may fire this much before their time (libuv counts whole milliseconds): a run this
#: close to its deadline counts as due rather than re-arming a timer for the rest.
_RESOLUTION_S = 0.001


class _Sweeper:
    """The runs in flight on one loop, and its timers (usually one)."""

    __slots__ = ("_loop", "_next", "_pending", "_runs")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._runs: set[limit] = set()
        #: Loop times a timer is scheduled for, and the earliest of them.
        self._pending: set[float] = set()
        self._next: float | None = None

    def add(self, run: limit) -> None:
        self._runs.add(run)
        if self._next is None or run.deadline < self._next:
            self._arm(run.deadline)

    def discard(self, run: limit) -> None:
        self._runs.discard(run)  # the timer stays: the next run will likely need it

    def _arm(self, when: float) -> None:
        self._pending.add(when)
        self._next = when
        self._loop.call_at(when, self._fire, when)

    def _fire(self, when: float) -> None:
        self._pending.discard(when)
        self._next = min(self._pending) if self._pending else None
        if not self._runs:
            return
        now = self._loop.time() + _RESOLUTION_S
        due = [run for run in self._runs if run.deadline <= now]
        for run in due:
            self._runs.discard(run)
            run.expire()
        if self._runs:
            earliest = min(run.deadline for run in self._runs)
            if self._next is None or earliest < self._next:
                self._arm(earliest)


#: The sweeper of the loop last used: one daemon runs one loop, so this is nearly always a
#: hit; another loop (tests, a second thread) gets its own and takes the slot.
_current: _Sweeper | None = None


def _sweeper(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    global _current
    sweeper = _current
    if sweeper is None or sweeper._loop is not loop:
        sweeper = _current = _Sweeper(loop)
    return sweeper


class limit:
    """``with limit(seconds):`` inside a task: cancel the block after ``seconds``, raising
    ``TimeoutError`` where it was."""

    __slots__ = ("_cancelling", "_expired", "_seconds", "_sweeper", "_task", "deadline")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._expired = False

    def __enter__(self) -> limit:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("limit() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.deadline = loop.time() + self._seconds
        self._sweeper = _sweeper(loop)
        self._sweeper.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._expired:
            self._sweeper.discard(self)
        elif (self._task.uncancel() <= self._cancelling
              and exc_type is asyncio.CancelledError):
            raise TimeoutError from exc

    def expired(self) -> bool:
        return self._expired

    def expire(self) -> None:
        self._expired = True
        self._task.cancel()
