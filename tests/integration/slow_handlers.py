"""Handlers for subprocess tests: slow, and observable through a log file.

Loaded by ``mlpipe consume --handlers tests.integration.slow_handlers:build_registry``; each
run appends ``start <share>`` and ``done <share>`` lines to ``$TEST_HANDLER_LOG``. With
``TEST_COST_USD`` set, each run is a paid call of that cost (estimated the same), so budgets
apply.
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal

from mlpipe.contract.models import Task, TaskType
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.settings import Settings


def _log(line: str) -> None:
    with open(os.environ["TEST_HANDLER_LOG"], "a") as f:
        f.write(line + "\n")


def _cost() -> Decimal | None:
    raw = os.environ.get("TEST_COST_USD")
    return Decimal(raw) if raw else None


async def slow(task: Task, ctx: TaskContext) -> HandlerResult:
    _log(f"start {task.share_id} {os.getpid()}")
    await asyncio.sleep(float(os.environ.get("TEST_HANDLER_SLEEP_S", "1.0")))
    _log(f"done {task.share_id} {os.getpid()}")
    usd = _cost()
    costs = (Cost(units=1000, unit_kind="tokens", usd=usd, model="test-model"),) if usd else ()
    return HandlerResult({"slept": True, "pid": os.getpid()}, model_version="test-1",
                         costs=costs)


def build_registry(settings: Settings) -> Registry:
    runtime = float(os.environ.get("TEST_EXPECTED_RUNTIME_S", "60"))
    usd = _cost()
    registry = Registry()
    for tt in TaskType:
        registry.register(tt, slow, expected_runtime_s=runtime,
                          estimate_cost=(lambda _t: usd) if usd else None)
    return registry
