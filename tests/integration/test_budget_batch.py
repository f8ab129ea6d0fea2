"""Budget reservations of concurrent deliveries go together (one lock, one spend query, one
insert) and are judged exactly as if they had come one after the other."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import asyncpg

from mlpipe.contract.models import TaskType, build_task
from mlpipe.effects.budget import BudgetGuard
from mlpipe.errors import BudgetExceeded
from mlpipe.handlers import HandlerResult, HandlerSpec, TaskContext
from mlpipe.settings import Settings
from mlpipe.store import costs
from mlpipe.store.pool import create_pool


async def test_a_batch_is_judged_in_order(pg_dsn: str, pg_schema: str) -> None:
    pool = await create_pool(pg_dsn, schema=pg_schema, size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            answers = await costs.reserve_many_if_within(
                conn, "summarize_llm",
                [("a", Decimal("0.4")), ("b", Decimal("0.4")), ("c", Decimal("0.4")),
                 ("d", Decimal("0.1"))], Decimal("1.0"), Decimal("5"))
        rows = await pool.fetch("SELECT id, share_id, usd FROM ml_cost_reservations ORDER BY id")
    finally:
        await pool.close()
    assert [rid is not None for rid, _ in answers] == [True, True, False, True]
    assert [spent.hour_usd for _, spent in answers] == [0, Decimal("0.4"), Decimal("0.8"),
                                                         Decimal("0.8")]
    assert [(r["share_id"], r["usd"]) for r in rows] == [("a", Decimal("0.4")),
                                                         ("b", Decimal("0.4")),
                                                         ("d", Decimal("0.1"))]
    assert [rid for rid, _ in answers if rid is not None] == [r["id"] for r in rows]


async def test_concurrent_deliveries_never_overshoot_together(pg_dsn: str,
                                                              pg_schema: str) -> None:
    settings = Settings(database_url=pg_dsn, database_schema=pg_schema,
                        budgets={"summarize_llm": {"hourly_usd": 1.0, "daily_usd": 10.0}})

    async def nothing(task: object, ctx: TaskContext) -> HandlerResult:
        return HandlerResult({})

    spec = HandlerSpec(TaskType.SUMMARIZE_LLM, nothing,
                       estimate_cost=lambda task: Decimal("0.15"))
    pool: asyncpg.Pool = await create_pool(pg_dsn, schema=pg_schema, size=4)
    try:
        guard = BudgetGuard(settings, pool)
        tasks = [build_task(TaskType.SUMMARIZE_LLM, f"s{i}", {"content": {"text": "t"}})
                 for i in range(20)]
        answers = await asyncio.gather(*(guard.reserve(t, spec) for t in tasks),
                                       return_exceptions=True)
        reserved = await pool.fetchval("SELECT coalesce(sum(usd), 0) FROM ml_cost_reservations")
        batches = [g.batch_sizes for g in guard._groups.values()]
    finally:
        await pool.close()
    accepted = [a for a in answers if isinstance(a, int)]
    refused = [a for a in answers if isinstance(a, BudgetExceeded)]
    assert len(accepted) == 6  # 6 x 0.15 = 0.90 <= 1.0 < 7 x 0.15
    assert len(refused) == 14
    assert reserved == Decimal("0.90")
    assert max(batches[0]) > 1  # they did go together
