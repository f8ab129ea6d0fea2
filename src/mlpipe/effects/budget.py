"""Budget pre-flight: refuse (or defer) a paid call whose estimate would cross a ceiling."""

from __future__ import annotations

import functools
from decimal import Decimal

import asyncpg

from mlpipe.batching import GroupCommit
from mlpipe.contract.models import Task
from mlpipe.errors import BudgetExceeded, Deferred
from mlpipe.handlers import HandlerSpec, estimate_of
from mlpipe.observability.metrics import Metrics
from mlpipe.settings import Settings
from mlpipe.store import costs
from mlpipe.store.pool import unavailable_is_transient


class BudgetGuard:
    """Concurrent deliveries of one task type reserve together (``GroupCommit``): one
    transaction, one advisory lock and one spend query for a batch, each judged in arrival
    order as if alone. One at a time, the advisory lock lined paid deliveries up in single
    file in front of the embedding batcher, which then saw two texts a call."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self.metrics: Metrics | None = None
        self._groups: dict[str, GroupCommit[tuple[str, Decimal],
                                            tuple[int | None, costs.Spend]]] = {}

    async def reserve(self, task: Task, spec: HandlerSpec) -> int | None:
        """Reserve the task's estimated cost; None when it is free or has no estimator.
        Raises ``BudgetExceeded`` (or ``Deferred`` with ``budget_action=retry``)."""
        if spec.estimate_cost is None:
            return None
        estimate = await estimate_of(spec.estimate_cost, task)
        if estimate <= 0:
            return None
        tt = task.task_type.value
        ceiling = self._settings.budget(tt)
        group = self._groups.get(tt)
        if group is None:
            group = self._groups[tt] = GroupCommit(functools.partial(self._reserve_batch, tt),
                                                   max_items=64)
        async with unavailable_is_transient("budget check"):
            rid, spent = await group.submit((task.share_id, estimate))
        self._report(tt, spent, estimate if rid is not None else Decimal(0),
                     ceiling.hourly_usd, ceiling.daily_usd)
        if rid is not None:
            return rid
        message = (f"{tt}: estimate ${estimate} on top of ${spent.hour_usd} "
                   f"this hour / ${spent.day_usd} today exceeds the ceiling "
                   f"${ceiling.hourly_usd}/h, ${ceiling.daily_usd}/day")
        if self._settings.budget_action == "retry":
            raise Deferred(message, reason="budget_exceeded",
                           delay_s=self._settings.budget_retry_delay_s)
        raise BudgetExceeded(message)

    async def _reserve_batch(self, task_type: str, wanted: list[tuple[str, Decimal]]
                             ) -> list[tuple[int | None, costs.Spend]]:
        ceiling = self._settings.budget(task_type)
        async with self._pool.acquire() as conn, conn.transaction():
            return await costs.reserve_many_if_within(
                conn, task_type, wanted, Decimal(str(ceiling.hourly_usd)),
                Decimal(str(ceiling.daily_usd)))

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
