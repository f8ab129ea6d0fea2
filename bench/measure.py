"""Timing one run: count completions, remember the first and the n-th.

Every throughput figure is ``n / (t_last - t_first)`` where ``t_first`` is when the first
handler started and ``t_last`` when the n-th message was done (acked or confirmed). Start-up
(connecting, declaring, a Celery worker forking its pool) is outside the window for every
contender alike: what is compared is steady consuming, not boot time.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import time
from dataclasses import dataclass


def cpu_seconds() -> float:
    """CPU time (user + system) this process used so far. Unlike wall-clock throughput it
    hardly moves when other processes load the machine, so it shows a client's own cost per
    message even on a busy shared box."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Run:
    """One measured run of one contender; ``cpu_s`` is the bench process's CPU time over the
    window, for contenders that run inside it."""

    n: int
    seconds: float
    cpu_s: float | None = None

    @property
    def cpu_us_per_message(self) -> float | None:
        return None if self.cpu_s is None else self.cpu_s / self.n * 1e6

    @property
    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


class Completion:
    """Counts finished messages; ``done`` fires at the n-th. ``started`` is called by the
    handler, ``finished`` after the ack (or confirm)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_first: float | None = None
        self.cpu_last: float | None = None
        self.done = asyncio.Event()

    def started(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.cpu_first = cpu_seconds()

    def finished(self) -> None:
        self.count += 1
        if self.count >= self.n and not self.done.is_set():
            self.last = time.perf_counter()
            self.cpu_last = cpu_seconds()
            self.done.set()

    async def wait(self, timeout: float) -> Run:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"only {self.count} of {self.n} messages done in {timeout}s") \
                from None
        return self.run()

    def run(self) -> Run:
        assert self.first is not None
        assert self.last is not None
        assert self.cpu_first is not None
        assert self.cpu_last is not None
        return Run(self.n, self.last - self.first, self.cpu_last - self.cpu_first)


def quiesce() -> None:
    """Collect garbage left by the previous contender so it is not billed to the next."""
    gc.collect()


def deadline_for(n: int, slowest_rate: float = 200.0, floor_s: float = 60.0) -> float:
    """A generous time limit for ``n`` messages, so a stuck contender fails the run instead of
    hanging it."""
    return max(floor_s, n / slowest_rate)
