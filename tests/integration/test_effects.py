"""Exactly-once effects in-process: stored results, forced recompute, budgets, deferral."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import Budget, RetryPolicy, Settings
from mlpipe.store import costs
from mlpipe.testing import running_daemon, wait_for
from mlpipe.worker.daemon import Daemon
from tests.conftest import REDIS_URL


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix,
                    retry=RetryPolicy(max_retries=3, base_delay_s=0.2, max_delay_s=1.0))


@pytest.fixture
async def effects(settings: Settings) -> AsyncIterator[Effects]:
    async with Effects(settings) as e:
        yield e


async def rows(effects: Effects, sql: str, *args: object) -> list[asyncpg.Record]:
    assert effects.pool is not None
    return await effects.pool.fetch(sql, *args)


def summarize(share: str, text: str = "An article long enough to summarise. " * 3,
              force: bool = False) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": text}, "options": {"forceRecompute": force}})


async def test_stored_result_short_circuits_and_force_recomputes(
        settings: Settings, effects: Effects) -> None:
    runs: list[str] = []
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        runs.append(task.share_id)
        return HandlerResult({"summary": f"run {len(runs)}"}, model_version="m1")

    async with running_daemon(settings, registry, "summarize",
                              executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(summarize("s1"))
        await wait_for(lambda: daemon.status().tasks_done == 1)
        await p.publish(summarize("s1"))  # the double-fire
        await wait_for(lambda: daemon.status().tasks_done == 2)
        assert runs == ["s1"]
        await p.publish(summarize("s1", text="Edited content, different from before. " * 3))
        await wait_for(lambda: daemon.status().tasks_done == 3)
        assert runs == ["s1", "s1"]  # new input: computed again
        await p.publish(summarize("s1", text="Edited content, different from before. " * 3,
                                  force=True))
        await wait_for(lambda: daemon.status().tasks_done == 4)
    assert runs == ["s1", "s1", "s1"]
    [row] = await rows(effects, "SELECT result_data, model_version FROM ml_results")
    assert row["result_data"] == {"summary": "run 3"}
    assert row["model_version"] == "m1"


async def test_a_burst_of_double_fires_is_checked_together_each_on_its_own_input(
        settings: Settings, effects: Effects) -> None:
    """Concurrent deliveries' stored-result checks share a statement; each still compares
    its own input: a duplicate of a stored result is skipped, a new input for a stored share
    runs again."""
    runs: list[str] = []
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        runs.append(task.share_id)
        return HandlerResult({"summary": task.payload.content.text[:20]})

    async with running_daemon(settings, registry, "summarize",
                              executor=effects.executor) as daemon, Producer(settings) as p:
        await asyncio.gather(*(p.publish(summarize(f"b{i}")) for i in range(30)))
        await wait_for(lambda: daemon.status().tasks_done == 30, timeout=30)
        assert sorted(runs) == sorted(f"b{i}" for i in range(30))
        edited = "Edited content, different from before. " * 3
        await asyncio.gather(*(p.publish(summarize(f"b{i}", text=edited)) for i in range(10)),
                             *(p.publish(summarize(f"b{i}")) for i in range(10, 30)))
        await wait_for(lambda: daemon.status().tasks_done == 60, timeout=30)
    assert sorted(runs[30:]) == sorted(f"b{i}" for i in range(10))
    checks = effects.executor._checks.batch_sizes
    assert sum(checks) == 60, list(checks)
    assert max(checks) > 1, list(checks)
    stored = {r["share_id"]: r["result_data"]["summary"]
              for r in await rows(effects, "SELECT share_id, result_data FROM ml_results")}
    assert stored == {f"b{i}": (edited if i < 10 else "An article long enough to summarise. ")[:20]
                      for i in range(30)}


async def test_budget_refuses_the_third_paid_task(broker_url: str, pg_dsn: str, pg_schema: str,
                                                  lock_prefix: str) -> None:
    settings = Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                        redis_url=REDIS_URL, lock_prefix=lock_prefix,
                        budgets={"summarize_llm": Budget(hourly_usd=0.01, daily_usd=1)})
    registry = Registry()
    price = Decimal("0.004")

    @registry.handler(TaskType.SUMMARIZE_LLM, estimate_cost=lambda _t: price)
    async def paid(task: Task, ctx: TaskContext) -> HandlerResult:
        return HandlerResult({"ok": True}, costs=(Cost(800, "tokens", price, "gpt-test"),))

    async with Effects(settings) as effects, \
            running_daemon(settings, registry, "summarize", executor=effects.executor) as d, \
            Producer(settings) as p:
        for i in range(3):
            await p.publish(summarize(f"paid-{i}"))
            await wait_for(lambda n=i: d.status().tasks_done == n + 1)
        dead = await list_dead(settings)
        assert [(e.share_id, e.reason) for e in dead] == [("paid-2", "budget_exceeded")]
        assert effects.pool is not None
        charges = await costs.charges(effects.pool, "summarize_llm")
        assert [c["share_id"] for c in charges] == ["paid-0", "paid-1"]
        assert sum(c["usd"] for c in charges) == Decimal("0.008")
        reservations = await effects.pool.fetchval("SELECT count(*) FROM ml_cost_reservations")
        assert reservations == 0


async def test_lock_held_for_other_input_defers_without_using_retries(
        settings: Settings, effects: Effects) -> None:
    runs: list[str] = []
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM, expected_runtime_s=1)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        runs.append(task.payload.content.text[:5])
        return HandlerResult({"ok": True})

    from mlpipe.idempotency.lock import LockManager

    assert effects.redis is not None
    other = LockManager(effects.redis, prefix=settings.lock_prefix)
    lease = await other.acquire("summarize_llm", "busy", ttl_s=1.0, tag="otherhash/othermsg")
    assert lease is not None
    async with running_daemon(settings, registry, "summarize",
                              executor=effects.executor) as daemon, Producer(settings) as p:
        async with lease:  # renewed while "another worker" runs
            await p.publish(summarize("busy", text="Fresh input for the busy share. " * 3))
            await wait_for(lambda: deferrals(daemon) >= 1, message="deferred on the lock")
            assert runs == []
        await wait_for(lambda: runs == ["Fresh"], timeout=10, message="ran after the lock freed")
        await wait_for(lambda: daemon.status().tasks_done >= 2,  # a deferral, then the run
                       message="the deferral and the run settled")
    assert await list_dead(settings) == []


def deferrals(daemon: Daemon) -> float:
    """Deliveries put back for later because another run held the lock."""
    return sum(sample.value for metric in daemon.metrics.retries.collect()
               for sample in metric.samples
               if sample.name == "mlpipe_retries_total"
               and sample.labels["reason"] == "lock_contention")


async def test_unmigrated_schema_fails_at_start(pg_dsn: str, broker_url: str) -> None:
    from mlpipe.errors import MlpipeError

    settings = Settings(broker_url=broker_url, database_url=pg_dsn,
                        database_schema="never_migrated", redis_url=REDIS_URL)
    with pytest.raises(MlpipeError, match="mlpipe migrate"):
        await Effects(settings).start()
