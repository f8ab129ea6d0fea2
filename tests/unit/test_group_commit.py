"""``GroupCommit``: concurrent writes gather while a flush is in flight; each caller gets its
own answer; one key per statement; a failed statement fails each of its callers."""

from __future__ import annotations

import asyncio

import pytest

from mlpipe.batching import GroupCommit


async def turns(n: int = 5) -> None:
    """Let the loop run the tasks just started (submit, then the flush it starts)."""
    for _ in range(n):
        await asyncio.sleep(0)


class Store:
    def __init__(self) -> None:
        self.statements: list[list[tuple[str, int]]] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    async def flush(self, items: list[tuple[str, int]]) -> list[int | BaseException]:
        self.statements.append(list(items))
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("connection lost mid-statement")
        return [ValueError(f"refused {k}") if n < 0 else n * 10 for k, n in items]


async def test_writes_gather_while_a_flush_is_in_flight() -> None:
    store = Store()
    commit: GroupCommit[tuple[str, int], int] = GroupCommit(store.flush, max_items=3,
                                                            key=lambda i: i[0])
    first = asyncio.create_task(commit.submit(("a", 1)))
    await turns()  # the lone write goes at once, no timer
    assert store.statements == [[("a", 1)]]
    rest = [asyncio.create_task(commit.submit(item))
            for item in [("b", 2), ("c", 3), ("b", 4), ("d", 5), ("e", -1)]]
    await turns()
    store.gate.set()
    assert await first == 10
    answers = await asyncio.gather(*rest, return_exceptions=True)
    assert answers[:4] == [20, 30, 40, 50]
    assert isinstance(answers[4], ValueError)
    # at most 3 a statement, and the second write of key b waited for the next statement
    assert store.statements == [[("a", 1)], [("b", 2), ("c", 3), ("d", 5)],
                                [("b", 4), ("e", -1)]]


async def test_a_failed_statement_fails_each_caller_and_the_next_one_runs() -> None:
    store = Store()
    store.fail_next = True
    commit: GroupCommit[tuple[str, int], int] = GroupCommit(store.flush)
    store.gate.set()
    results = await asyncio.gather(*(commit.submit((f"k{i}", i)) for i in range(3)),
                                   return_exceptions=True)
    assert any(isinstance(r, ConnectionError) for r in results)
    assert await commit.submit(("again", 7)) == 70


async def test_concurrency_bounds_the_statements_in_flight() -> None:
    store = Store()
    commit: GroupCommit[tuple[str, int], int] = GroupCommit(store.flush, max_items=1,
                                                            concurrency=2)
    tasks = [asyncio.create_task(commit.submit((f"k{i}", i))) for i in range(5)]
    await turns()
    assert len(store.statements) == 2
    store.gate.set()
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
    assert len(store.statements) == 5


async def test_a_flush_that_answers_too_few_fails_its_callers() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    commit: GroupCommit[int, int] = GroupCommit(short)
    with pytest.raises(RuntimeError, match="answered"):
        await asyncio.gather(commit.submit(1), commit.submit(2))
