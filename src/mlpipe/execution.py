"""How a handler is run, and what the daemon and an executor owe each other.

The daemon decodes a delivery and finds its handler; an ``Executor`` runs it and makes its
effects durable (``DirectExecutor`` keeps nothing; ``mlpipe.effects`` adds locks, stored
results, budgets and the outbox). Both sides import this module and neither imports the
other: the daemon hands the executor a ``Runtime`` once (its producer, metrics and the
registry's workflows) and gets ``Bindings`` back, the few things it must wire up for the
executor (queues to consume, what to do on a dead letter, gauges to read at scrape time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mlpipe.contract.models import Task
from mlpipe.errors import HandlerTimeout
from mlpipe.handlers import HandlerResult, HandlerSpec, TaskContext
from mlpipe.settings import Settings
from mlpipe.worker.outcome import DeliveryProcessor, Skip

if TYPE_CHECKING:
    from mlpipe.observability.metrics import Metrics
    from mlpipe.producer import Producer


@dataclass(frozen=True)
class Runtime:
    """What the daemon lends an executor for the daemon's lifetime."""

    producer: Producer
    metrics: Metrics
    #: The registry's workflows (``mlpipe.effects.hooks.Workflow``).
    workflows: Sequence[Any] = ()


@dataclass(frozen=True)
class Bindings:
    """What the daemon wires up for an executor: more queues to consume (workflow control
    messages), a dead-letter hook (workflow fallbacks), gauges read at scrape time."""

    control_processors: dict[str, DeliveryProcessor] = field(default_factory=dict)
    on_dead_letter: Callable[[Task, str], Awaitable[None]] | None = None
    collect_metrics: Callable[[], Awaitable[None]] | None = None
    #: Loops the daemon runs while it consumes and cancels when it stops (the outbox sweep).
    background: tuple[Callable[[], Coroutine[Any, Any, None]], ...] = ()


class Executor(Protocol):
    def bind(self, runtime: Runtime) -> Bindings:
        """Called once by the daemon before it consumes."""

    async def execute(self, task: Task, spec: HandlerSpec,
                      ctx: TaskContext) -> HandlerResult | Skip:
        """Run the handler and make its effects durable; ``Skip`` when the work is covered
        already (the delivery is acked without running). Raises what decides a retry or a
        dead letter."""


async def run_handler(task: Task, spec: HandlerSpec, ctx: TaskContext,
                      default_timeout_s: float) -> HandlerResult:
    """Run the handler under its time limit; a run past it is a transient ``HandlerTimeout``."""
    seconds = spec.timeout_s or default_timeout_s
    try:
        async with asyncio.timeout(seconds):
            result = await spec.func(task, ctx)
    except TimeoutError:
        raise HandlerTimeout(f"{task.task_type.value} ran longer than {seconds}s") from None
    if not isinstance(result, HandlerResult):
        raise TypeError(f"handler for {task.task_type.value} returned {type(result).__name__}, "
                        "not HandlerResult")
    return result


class DirectExecutor:
    """Runs the handler and keeps nothing: for handlers whose effects are their own business
    (tests, fire-and-forget work). The daemon uses the effects executor when Postgres and
    Redis are configured."""

    def __init__(self, settings: Settings) -> None:
        self._timeout = settings.handler_timeout_s

    def bind(self, runtime: Runtime) -> Bindings:
        return Bindings()

    async def execute(self, task: Task, spec: HandlerSpec,
                      ctx: TaskContext) -> HandlerResult | Skip:
        return await run_handler(task, spec, ctx, self._timeout)
