"""Fencing tokens: a run whose lock was lost cannot overwrite the newer holder's result, and a
lost lock stops a handler that awaits. Real Redis, Postgres and RabbitMQ; the daemon runs
in-process so the test can hold a handler at a point of its choosing."""

# The fixtures ``settings`` and ``listener`` (a queue bound to every result event) come from
# test_events; pyflakes then sees each test parameter as redefining the import.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import structlog
from structlog.testing import LogCapture

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.effects.events import add_completed
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.store import results
from mlpipe.store.results import FenceRefused
from mlpipe.testing import running_daemon, wait_for
from tests.integration.test_events import listener, settings  # noqa: F401

SHARE = "contested"
PRICE = Decimal("0.002")


def task(share: str = SHARE) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": "One article, two runs that both believe they own it."}})


class Runs:
    """A handler whose first run waits for ``release_first`` (the test decides when it ends,
    or that it never does); later runs return at once. Each result names its run."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.release_first = asyncio.Event()

    def registry(self, *, expected_runtime_s: float, paid: bool) -> Registry:
        registry = Registry()

        @registry.handler(TaskType.SUMMARIZE_LLM, expected_runtime_s=expected_runtime_s,
                          estimate_cost=(lambda _t: PRICE) if paid else None)
        async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
            run = len(self.started) + 1
            self.started.append(run)
            try:
                if run == 1 and task.share_id == SHARE:
                    await self.release_first.wait()
            except asyncio.CancelledError:
                self.cancelled.append(run)
                raise
            costs = (Cost(100, "tokens", PRICE, "m"),) if paid else ()
            return HandlerResult({"run": run}, model_version="m1", costs=costs)

        return registry


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What the delivery path logs (its own lines and the handler context's), recorded."""
    capture = LogCapture()
    monkeypatch.setattr("mlpipe.worker.process.log",
                        structlog.wrap_logger(None, processors=[capture]))
    return capture.entries


def completed(events: list[dict[str, Any]], share: str = SHARE) -> list[dict[str, Any]]:
    return [e for e in events if e["shareId"] == share and e["status"] == "completed"]


async def all_announced(p: Producer, events: list[dict[str, Any]]) -> None:
    """Events leave a daemon in order, each confirmed before its delivery is acked: once an
    event of a task published *now* arrives, every event of a delivery settled before it has
    arrived too. Proves "no second event" without sleeping on it."""
    await p.publish(task("marker"))
    await wait_for(lambda: completed(events, "marker") != [], timeout=15, message="marker event")


async def stored_row(effects: Effects) -> asyncpg.Record:
    assert effects.pool is not None
    row = await effects.pool.fetchrow(
        "SELECT result_data, fence FROM ml_results WHERE share_id = $1", SHARE)
    assert row is not None
    return row


@pytest.mark.parametrize("paid", [False, True], ids=["free", "paid"])
async def test_run_that_lost_its_lock_finishes_last_and_is_fenced(
        settings: Settings, listener: list[dict[str, Any]], logged: list[dict[str, Any]],
        paid: bool) -> None:
    """Run 1's lock expires without run 1 noticing (it only would at its next renewal, a
    third of the 60 s TTL away); run 2 takes the lock, stores and announces its result; then
    run 1 finishes. Its write is refused by the fence: the stored result stays run 2's, one
    ``completed`` event, no cost entry or outbox row of run 1, both deliveries acked."""
    runs = Runs()
    async with Effects(settings) as effects, \
            running_daemon(settings, runs.registry(expected_runtime_s=40, paid=paid), "summarize",
                           executor=effects.executor) as daemon, Producer(settings) as p:
        assert effects.redis is not None
        assert effects.pool is not None
        await p.publish(task())
        await wait_for(lambda: runs.started == [1], message="run 1 started")
        key = f"{settings.lock_prefix}lock:summarize_llm:{SHARE}"
        assert await effects.redis.delete(key) == 1  # run 1's lease expires
        await p.publish(task())  # the same share again: a new message takes the free lock
        await wait_for(lambda: len(completed(listener)) == 1, message="run 2 announced")
        assert runs.started == [1, 2]
        newer = await stored_row(effects)
        assert newer["result_data"] == {"run": 2}

        runs.release_first.set()  # the older run finishes last
        await wait_for(lambda: daemon.status().tasks_done == 2, message="both settled")
        await all_announced(p, listener)

        row = await stored_row(effects)
        assert row["result_data"] == {"run": 2}
        assert row["fence"] == newer["fence"] > 0
        assert len(completed(listener)) == 1
        outbox = await effects.pool.fetchval(
            "SELECT count(*) FROM ml_outbox WHERE share_id = $1", SHARE)
        assert outbox == 1
        if paid:  # run 2's charge only; run 1's reservation stays (that money was spent)
            charges = await effects.pool.fetchval(
                "SELECT count(*) FROM ml_costs WHERE share_id = $1", SHARE)
            reserved = await effects.pool.fetchval(
                "SELECT count(*) FROM ml_cost_reservations WHERE share_id = $1", SHARE)
            assert (charges, reserved) == (1, 1)
        assert runs.cancelled == []
    [fenced] = [e for e in logged if e["event"] == "result.fenced"]
    assert fenced["stored_fence"] == row["fence"] > fenced["fence"] > 0
    done = [e for e in logged if e["event"] == "task.done"]
    assert len(done) == 3  # runs 1 and 2 and the marker: all acked
    assert await list_dead(settings) == []


async def test_lost_lock_cancels_an_awaiting_handler_and_the_delivery_waits(
        settings: Settings, listener: list[dict[str, Any]], logged: list[dict[str, Any]]) -> None:
    """Run 1 awaits a paid call that never ends; its lock is lost and another message takes
    over. Run 1 is cancelled at its next renewal (a third of its 3 s TTL), its delivery is
    deferred rather than dead-lettered, and the deferred copy finds run 2's result stored and
    is acked without a third run."""
    runs = Runs()
    async with Effects(settings) as effects, \
            running_daemon(settings, runs.registry(expected_runtime_s=2, paid=True),
                           "summarize", executor=effects.executor) as daemon, \
            Producer(settings) as p:
        assert effects.redis is not None
        assert effects.pool is not None
        await p.publish(task())
        await wait_for(lambda: runs.started == [1], message="run 1 started")
        key = f"{settings.lock_prefix}lock:summarize_llm:{SHARE}"
        assert await effects.redis.delete(key) == 1
        await p.publish(task())
        await wait_for(lambda: runs.cancelled == [1], timeout=5, message="run 1 cancelled")
        # run 1 deferred, run 2 done, run 1's deferred copy acked as already done
        await wait_for(lambda: daemon.status().tasks_done == 3, timeout=20,
                       message="the deferred copy came back")
        await all_announced(p, listener)
        assert runs.started == [1, 2, 3]  # the third is the marker's
        assert (await stored_row(effects))["result_data"] == {"run": 2}
        assert len(completed(listener)) == 1
        reserved = await effects.pool.fetchval("SELECT count(*) FROM ml_cost_reservations")
        assert reserved == 0  # the cancelled run's reservation was released
    failed = [e for e in logged if e["event"] == "task.failed"]
    assert [(e["outcome"], e["error_class"]) for e in failed] == [("Retry", "LockLost")]
    assert await list_dead(settings) == []


async def test_refusal_by_its_own_earlier_attempt_is_a_success(
        settings: Settings, listener: list[dict[str, Any]], logged: list[dict[str, Any]]) -> None:
    """The persist attempt committed but its reply was lost, so the retry meets a row with its
    own fence: not fenced, but done; the event that attempt queued goes out, once."""
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        result = HandlerResult({"run": "committed"})
        if task.share_id != SHARE:
            return result
        # the lease just taken is the prefix's latest token: commit as its first attempt would
        assert effects.redis is not None
        assert effects.pool is not None
        fence = int(await effects.redis.get(f"{settings.lock_prefix}fence"))
        async with effects.pool.acquire() as conn, conn.transaction():
            await results.save(conn, task, result, input_hash=results.input_hash(task),
                               processing_ms=1, correlation_id=None, reservation_id=None,
                               fence=fence)
            await add_completed(conn, task, result, topology.events_exchange, ctx.message_id)
        return HandlerResult({"run": "retried"})

    async with Effects(settings) as effects, \
            running_daemon(settings, registry, "summarize",
                           executor=effects.executor) as daemon, Producer(settings) as p:
        topology = p.topology
        await p.publish(task())
        await wait_for(lambda: daemon.status().tasks_done == 1, message="settled")
        await all_announced(p, listener)
        assert (await stored_row(effects))["result_data"] == {"run": "committed"}
        unpublished = await effects.pool.fetchval(  # type: ignore[union-attr]
            "SELECT count(*) FROM ml_outbox WHERE published_at IS NULL")
        assert unpublished == 0
    assert len(completed(listener)) == 1
    assert not [e for e in logged if e["event"] == "result.fenced"]


# --- the fenced upsert itself -------------------------------------------------------------------


async def test_upsert_replaces_only_a_lower_fence(settings: Settings) -> None:
    async with Effects(settings) as effects:
        pool = effects.pool
        assert pool is not None
        t = task()

        async def save(fence: int, run: str, *, costs: bool = False) -> list[Any]:
            result = HandlerResult({"run": run}, costs=(Cost(1, "tokens", PRICE, "m"),)
                                   if costs else ())
            if costs:
                async with pool.acquire() as conn, conn.transaction():
                    await results.save(conn, t, result, input_hash="h", processing_ms=1,
                                       correlation_id=None, reservation_id=None, fence=fence)
                return []
            return await results.save_with_event(
                pool, t, result, input_hash="h", processing_ms=1, fence=fence, exchange="x",
                routing_key="r", message_id=f"event-{run}", event={"run": run})

        async def stored() -> tuple[dict[str, Any], int]:
            row = await pool.fetchrow("SELECT result_data, fence FROM ml_results")
            assert row is not None
            return row["result_data"], row["fence"]

        # a row from before the fencing migration has fence 0: any lease replaces it
        await pool.execute(
            "INSERT INTO ml_results (share_id, task_type, result_data) VALUES ($1, $2, $3)",
            SHARE, t.task_type.value, {"run": "old"})
        assert await stored() == ({"run": "old"}, 0)
        assert [m.message_id for m in await save(10, "a")] == ["event-a"]
        assert await stored() == ({"run": "a"}, 10)

        for fence, costs in ((9, False), (9, True), (10, False)):  # older, and the same lease
            with pytest.raises(FenceRefused) as refused:
                await save(fence, "stale", costs=costs)
            assert (refused.value.fence, refused.value.stored_fence) == (fence, 10)
        assert await stored() == ({"run": "a"}, 10)
        assert await pool.fetchval("SELECT count(*) FROM ml_costs") == 0
        # the unpublished event of the stored result is not handed to a refused writer
        assert await pool.fetchval("SELECT count(*) FROM ml_outbox") == 1

        pending = await save(11, "b")
        assert [m.message_id for m in pending] == ["event-a", "event-b"]
        assert await stored() == ({"run": "b"}, 11)
        await save(12, "c", costs=True)
        assert await stored() == ({"run": "c"}, 12)
        assert await pool.fetchval("SELECT count(*) FROM ml_costs") == 1


async def test_batched_write_records_costs_and_settles_reservations_only_for_stored_results(
        settings: Settings) -> None:
    """``save_many_with_events`` writes what ``save`` writes in its transaction: a paid
    result's cost entries and total, its reservation deleted; a result the fence refused
    writes nothing (its reservation stays: that money was spent), whatever else is in the
    same statement."""
    async with Effects(settings) as effects:
        pool = effects.pool
        assert pool is not None
        reserve = "INSERT INTO ml_cost_reservations (task_type, share_id, usd) " \
                  "VALUES ('summarize_llm', $1, $2) RETURNING id"
        paid_rid = await pool.fetchval(reserve, "paid", PRICE)
        fenced_rid = await pool.fetchval(reserve, "fenced", PRICE)
        await pool.execute(
            "INSERT INTO ml_results (share_id, task_type, result_data, fence) "
            "VALUES ('fenced', 'summarize_llm', '{}'::jsonb, 50)")
        two = (Cost(100, "tokens", Decimal("0.0015"), "m"),
               Cost(20.5, "tokens", Decimal("0.0005"), "m2"))

        def item(share: str, fence: int, costs: tuple[Cost, ...],
                 rid: int | None) -> results.EventedResult:
            return results.EventedResult(
                share, "summarize_llm", "h", {"share": share}, "m1", 1, fence, "x", "r",
                f"event-{share}", {"share": share}, costs, f"corr-{share}", rid)

        async with pool.acquire() as conn:
            answers = await results.save_many_with_events(conn, [
                item("paid", 7, two, paid_rid), item("fenced", 7, two, fenced_rid),
                item("free", 7, (), None)])
        assert [m.message_id for m in answers[0]] == ["event-paid"]  # type: ignore[union-attr]
        assert isinstance(answers[1], FenceRefused)
        assert answers[1].stored_fence == 50
        assert [m.message_id for m in answers[2]] == ["event-free"]  # type: ignore[union-attr]
        costs = [tuple(r) for r in await pool.fetch(
            "SELECT share_id, model, units, unit_kind, usd, correlation_id FROM ml_costs "
            "ORDER BY model")]
        assert costs == [("paid", "m", Decimal("100.000"), "tokens", Decimal("0.001500"),
                          "corr-paid"),
                         ("paid", "m2", Decimal("20.500"), "tokens", Decimal("0.000500"),
                          "corr-paid")]
        totals = dict(await pool.fetch("SELECT share_id, cost_usd FROM ml_results"))
        assert totals["paid"] == Decimal("0.002")
        assert totals["free"] == 0
        reserved = [r["id"] for r in await pool.fetch("SELECT id FROM ml_cost_reservations")]
        assert reserved == [fenced_rid]
