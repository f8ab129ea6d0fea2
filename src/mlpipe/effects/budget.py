"""Budget pre-flight: refuse (or defer) a paid call whose estimate would cross a ceiling."""

from __future__ import annotations

from decimal import Decimal

import asyncpg

from mlpipe.contract.models import Task
from mlpipe.errors import BudgetExceeded, Deferred
from mlpipe.handlers import HandlerSpec
from mlpipe.observability.metrics import Metrics
from mlpipe.settings import Settings
from mlpipe.store import costs
from mlpipe.store.pool import unavailable_is_transient


class BudgetGuard:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self.metrics: Metrics | None = None

    async def reserve(self, task: Task, spec: HandlerSpec) -> int | None:
        """Reserve the task's estimated cost; None when it is free or has no estimator.
        Raises ``BudgetExceeded`` (or ``Deferred`` with ``budget_action=retry``)."""
        if spec.estimate_cost is None:
            return None
        estimate = Decimal(spec.estimate_cost(task))
        if estimate <= 0:
            return None
        ceiling = self._settings.budget(task.task_type.value)
        async with unavailable_is_transient("budget check"), self._pool.acquire() as conn, \
                conn.transaction():
            rid, spent = await costs.reserve_if_within(
                conn, task.task_type.value, task.share_id, estimate,
                Decimal(str(ceiling.hourly_usd)), Decimal(str(ceiling.daily_usd)))
        self._report(task.task_type.value, spent, estimate if rid is not None else Decimal(0),
                     ceiling.hourly_usd, ceiling.daily_usd)
        if rid is not None:
            return rid
        message = (f"{task.task_type.value}: estimate ${estimate} on top of ${spent.hour_usd} "
                   f"this hour / ${spent.day_usd} today exceeds the ceiling "
                   f"${ceiling.hourly_usd}/h, ${ceiling.daily_usd}/day")
        if self._settings.budget_action == "retry":
            raise Deferred(message, reason="budget_exceeded",
                           delay_s=self._settings.budget_retry_delay_s)
        raise BudgetExceeded(message)

    def _report(self, task_type: str, spent: costs.Spend, reserved: Decimal, hourly: float,
                daily: float) -> None:
        if self.metrics is None:
            return
        for window, used, limit in (("hour", spent.hour_usd, hourly),
                                    ("day", spent.day_usd, daily)):
            if limit:
                total = float(used + reserved)
                self.metrics.budget_remaining.labels(task_type, window).set(
                    max(0.0, limit - total))
                self.metrics.budget_used_ratio.labels(task_type, window).set(total / limit)

    async def release(self, reservation_id: int | None) -> None:
        if reservation_id is None:
            return
        async with unavailable_is_transient("budget release"):
            await costs.release(self._pool, reservation_id)
