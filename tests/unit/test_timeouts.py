"""``limit`` behaves as ``asyncio.timeout`` (deadline, cancellation semantics) on the asyncio
and uvloop loops, while runs share the loop's timer."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from mlpipe.worker import timeouts
from mlpipe.worker.timeouts import limit

RUNNERS: dict[str, Callable[[Awaitable[Any]], Any]] = {
    "asyncio": asyncio.run, "uvloop": uvloop.run}  # type: ignore[dict-item]


@pytest.fixture(params=sorted(RUNNERS))
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[Any]], Any]:
    return RUNNERS[request.param]


async def _timed(seconds: float, sleep: float) -> tuple[str, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        with limit(seconds):
            await asyncio.sleep(sleep)
    except TimeoutError:
        return "timeout", loop.time() - start
    return "done", loop.time() - start


def test_a_run_past_its_limit_times_out_at_its_deadline(run: Any) -> None:
    outcome, took = run(_timed(0.1, 5))
    assert outcome == "timeout"
    assert 0.099 <= took < 0.3


def test_concurrent_runs_each_time_out_at_their_own_deadline(run: Any) -> None:
    async def main() -> list[tuple[str, float]]:
        # the longest limit first, so the shorter ones must arm earlier timers
        return list(await asyncio.gather(*(_timed(s, 5) for s in (0.4, 0.1, 0.3, 0.2))))

    results = run(main())
    assert [r[0] for r in results] == ["timeout"] * 4
    for (_, took), seconds in zip(results, (0.4, 0.1, 0.3, 0.2), strict=True):
        assert seconds - 0.001 <= took < seconds + 0.15


def test_runs_within_their_limit_share_one_timer(run: Any) -> None:
    async def main() -> tuple[list[str], int]:
        outcomes = [(await _timed(30, 0))[0] for _ in range(500)]
        outcomes += [r[0] for r in await asyncio.gather(*(_timed(30, 0.01)
                                                           for _ in range(200)))]
        sweeper = timeouts._sweeper(asyncio.get_running_loop())
        return outcomes, len(sweeper._pending)

    outcomes, timers = run(main())
    assert outcomes == ["done"] * 700
    assert timers == 1


def test_a_cancel_from_outside_is_not_a_timeout(run: Any) -> None:
    async def main() -> str:
        async def body() -> None:
            with limit(10):
                await asyncio.sleep(10)

        task = asyncio.create_task(body())
        await asyncio.sleep(0.05)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    assert run(main()) == "cancelled"


def test_another_pending_cancel_wins_over_the_timeout(run: Any) -> None:
    async def main() -> str:
        task = asyncio.current_task()
        assert task is not None
        try:
            with limit(0.01):
                try:
                    await asyncio.sleep(5)
                except asyncio.CancelledError:
                    task.cancel()  # someone else asks for cancellation too
                    await asyncio.sleep(0)
        except TimeoutError:
            return "timeout"
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    assert run(main()) == "cancelled"


def test_a_swallowed_expiry_leaves_the_task_uncancelled(run: Any) -> None:
    async def main() -> tuple[str, int]:
        with limit(0.01), contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(5)
        task = asyncio.current_task()
        assert task is not None
        await asyncio.sleep(0.01)  # not cancelled again
        return "finished", task.cancelling()

    assert run(main()) == ("finished", 0)


def test_limit_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError), limit(1):
        pass


def test_loops_on_two_threads_keep_their_own_deadlines() -> None:
    """Each thread's runs time out on their own loop's timer, however the threads interleave."""
    results: dict[str, list[tuple[str, float]]] = {}

    def worker(name: str, runner: Callable[[Awaitable[Any]], Any]) -> None:
        async def main() -> list[tuple[str, float]]:
            fast = [await _timed(30, 0) for _ in range(200)]
            return fast + list(await asyncio.gather(_timed(0.2, 5), _timed(0.1, 5),
                                                    _timed(5, 0.05)))

        results[name] = runner(main())

    threads = [threading.Thread(target=worker, args=(name, runner))
               for name, runner in RUNNERS.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == sorted(RUNNERS)
    for outcomes in results.values():
        assert [o for o, _ in outcomes[:200]] == ["done"] * 200
        (o1, t1), (o2, t2), (o3, _) = outcomes[200:]
        assert (o1, o2, o3) == ("timeout", "timeout", "done")
        assert 0.199 <= t1 < 0.4
        assert 0.099 <= t2 < 0.3
