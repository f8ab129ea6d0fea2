"""Group commit: the calls of concurrent deliveries in one statement or one pipeline.

A delivery's result and its ``completed`` event are one statement, and marking the event
published is another; per delivery, each is a round trip and a commit (a WAL flush) in
Postgres, and its lock and release are two Redis round trips. It lives outside ``effects``
because the lock manager (``idempotency``) pipelines its calls through it too.

Databases reach their speed by group commit, and the daemon runs many deliveries at once,
so ``GroupCommit`` does what per-message code cannot: while one flush is in flight the next
writes gather, and go together in the next statement. There is no timer: a write that
finds a flush slot free goes at once, sent by its own caller, so a lone delivery waits for
nothing, and under load a
batch is as large as what arrived during one round trip (at most ``max_items``).

Each delivery still gets its own answer: its rows, its own error (a refused fence), or, when
the statement itself fails, that failure, which its caller retries as before. Two writes with
the same key (the same share and task type) never share a statement: the second waits for
the next one, as it would have waited for the first's commit anyway.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Answers a batch of items in order: a result or an exception per item.
Flush = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class GroupCommit(Generic[T, R]):
    def __init__(self, flush: Flush[T, R], *, max_items: int = 64, concurrency: int = 1,
                 key: Callable[[T], Hashable] | None = None) -> None:
        self._flush = flush
        self._max_items = max_items
        self._concurrency = concurrency
        self._key = key
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Sizes of the latest statements sent, for the tests (bounded: a daemon sends millions).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1024)

    async def submit(self, item: T) -> R:
        if not self._pending and self._running < self._concurrency:
            return await self._alone(item)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._kick()
        return await future

    async def _alone(self, item: T) -> R:
        """Nothing to gather and a flush slot free: the caller sends its item itself, from its
        own task (no task and no future per call: at low load most batches are of one).
        Whatever arrives meanwhile gathers for the next flush, as behind any other."""
        self._running += 1
        self.batch_sizes.append(1)
        try:
            answers = await self._flush([item])
        finally:
            self._running -= 1
            self._kick()
        if len(answers) != 1:
            raise RuntimeError(f"a flush answered {len(answers)} of 1 items")
        answer = answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _kick(self) -> None:
        while self._pending and self._running < self._concurrency:
            batch = self._take()
            self._running += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """Up to ``max_items`` waiting items, no two with the same key, oldest first."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        rest: list[tuple[T, asyncio.Future[R]]] = []
        keys: set[Hashable] = set()
        for entry in self._pending:
            key = self._key(entry[0]) if self._key is not None else None
            if len(batch) >= self._max_items or (key is not None and key in keys):
                rest.append(entry)
                continue
            keys.add(key)
            batch.append(entry)
        self._pending = rest
        return batch

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            answers = await self._flush([item for item, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"a flush answered {len(answers)} of {len(batch)} items")
        except BaseException as exc:  # the statement failed: each caller sees it (and retries)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), answer in zip(batch, answers, strict=True):
                if future.done():
                    continue
                if isinstance(answer, BaseException):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        finally:
            self._running -= 1
            self._kick()
