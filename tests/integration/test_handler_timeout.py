"""A handler past its time limit is cancelled at the limit and retried; one within it is not
(the limits are ``asyncio.timeout`` in ``mlpipe.execution.run_handler``)."""

from __future__ import annotations

import asyncio
import time

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for


async def test_a_run_past_its_limit_is_cancelled_and_retried(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, shutdown_grace_s=5,
                        retry=RetryPolicy(max_retries=2, base_delay_s=0.1, max_delay_s=0.5))
    runs: list[tuple[str, int, float]] = []
    ended: list[tuple[str, int, str, float]] = []
    registry = Registry()

    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        started = time.monotonic()
        runs.append((task.share_id, ctx.attempt, started))
        try:
            # "slow" hangs on its first attempt; "quick" and the retry take 50 ms
            await asyncio.sleep(30 if task.share_id == "slow" and ctx.attempt == 1 else 0.05)
        except asyncio.CancelledError:
            ended.append((task.share_id, ctx.attempt, "cancelled", time.monotonic() - started))
            raise
        ended.append((task.share_id, ctx.attempt, "done", time.monotonic() - started))
        return HandlerResult({})

    registry.register(TaskType.EMBED_VECTORS, handle, timeout_s=0.5)
    async with running_daemon(settings, registry, "embed") as daemon, Producer(settings) as p:
        for share in ("slow", "quick"):
            await p.publish(build_task(TaskType.EMBED_VECTORS, share, {"content": {"text": "t"}}))
        await wait_for(lambda: daemon.status().tasks_done == 3, timeout=20,
                       message="slow timed out and retried, quick done")
        assert await list_dead(settings) == []
    by_run = {(share, attempt): (how, took) for share, attempt, how, took in ended}
    assert set(by_run) == {("slow", 1), ("slow", 2), ("quick", 1)}
    how, took = by_run[("slow", 1)]
    assert how == "cancelled"
    assert 0.499 <= took < 1.5
    assert by_run[("slow", 2)][0] == by_run[("quick", 1)][0] == "done"
