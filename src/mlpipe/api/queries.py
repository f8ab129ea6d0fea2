"""The SQL behind the read endpoints (results, workflow, ledger, task summary; search is
``mlpipe.search``'s).

Kept apart from the HTTP layer so each query can be read whole. Time ranges are half-open,
``[start, end)``, and a missing bound is no bound; conditions are only added for the filters
given, so the planner sees plain predicates it can match to the ``(task_type, created_at)``
indexes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg

from mlpipe.store.pool import DB


class _Where:
    """Conditions with numbered parameters, in the order they were added."""

    def __init__(self) -> None:
        self.args: list[Any] = []
        self._conditions: list[str] = []

    def add(self, condition: str, value: Any) -> None:
        """``condition`` holds ``{}`` where the parameter goes; skipped when value is None."""
        if value is None:
            return
        self.args.append(value)
        self._conditions.append(condition.format(f"${len(self.args)}"))

    def sql(self) -> str:
        return " AND ".join(self._conditions) or "true"


async def share_results(db: DB, share_id: str, task_type: str | None) -> list[asyncpg.Record]:
    where = _Where()
    where.add("share_id = {}", share_id)
    where.add("task_type = {}", task_type)
    return await db.fetch(
        "SELECT task_type, input_hash, result_data, model_version, processing_ms, cost_usd, "
        f"created_at, updated_at FROM ml_results WHERE {where.sql()} ORDER BY task_type",
        *where.args)


async def spend_rows(db: DB, start: dt.datetime, end: dt.datetime) -> list[asyncpg.Record]:
    return await db.fetch(
        """
        SELECT task_type, model, unit_kind, count(*) AS calls, sum(units) AS units,
               sum(usd) AS usd
        FROM ml_costs WHERE created_at >= $1 AND created_at < $2
        GROUP BY task_type, model, unit_kind ORDER BY task_type, model, unit_kind
        """, start, end)


async def cost_entries(db: DB, *, task_type: str | None, model: str | None,
                       share_id: str | None, start: dt.datetime | None,
                       end: dt.datetime | None, before_id: int | None,
                       limit: int) -> list[asyncpg.Record]:
    """Newest first, as a keyset walk on ``id`` (stable while new charges keep arriving)."""
    where = _Where()
    where.add("task_type = {}", task_type)
    where.add("model = {}", model)
    where.add("share_id = {}", share_id)
    where.add("created_at >= {}", start)
    where.add("created_at < {}", end)
    where.add("id < {}", before_id)
    return await db.fetch(
        "SELECT id, task_type, model, units, unit_kind, usd, share_id, correlation_id, "
        f"created_at FROM ml_costs WHERE {where.sql()} ORDER BY id DESC "
        f"LIMIT {int(limit)}", *where.args)


async def task_outcomes(db: DB, start: dt.datetime, end: dt.datetime) -> list[asyncpg.Record]:
    """Stored results by task type and outcome. Only successes are stored in Postgres: a
    dead-lettered task is in the dead-letter queue (``mlpipe dlq list``), not here."""
    return await db.fetch(
        """
        SELECT task_type, coalesce(result_data->>'status', 'ok') AS outcome, count(*) AS count,
               avg(processing_ms)::float8 AS avg_ms,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY processing_ms) AS p95_ms,
               sum(cost_usd) AS usd
        FROM ml_results WHERE updated_at >= $1 AND updated_at < $2
        GROUP BY 1, 2 ORDER BY 1, 2
        """, start, end)


async def in_flight(db: DB, start: dt.datetime, end: dt.datetime) -> list[asyncpg.Record]:
    return await db.fetch(
        """
        SELECT task_type, count(*) AS reservations, sum(usd) AS usd
        FROM ml_cost_reservations WHERE created_at >= $1 AND created_at < $2
        GROUP BY task_type ORDER BY task_type
        """, start, end)


async def workflow_counts(db: DB, start: dt.datetime,
                          end: dt.datetime) -> list[asyncpg.Record]:
    return await db.fetch(
        """
        SELECT state, count(*) AS count FROM ml_workflows
        WHERE updated_at >= $1 AND updated_at < $2 GROUP BY state ORDER BY state
        """, start, end)


async def ping(db: DB) -> None:
    await db.fetchval("SELECT 1")
