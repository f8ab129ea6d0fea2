"""How task handlers are written and registered.

A handler is an async function ``(task, ctx) -> HandlerResult``. It is registered for one task
type together with the settings that belong to it (timeout, expected runtime for the lock TTL,
cost estimate), arq-style, so everything that governs one kind of work sits in one place::

    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM, timeout_s=120, expected_runtime_s=20)
    async def summarize(task: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        ...

A handler signals failure by raising ``PermanentError`` or ``TransientError`` (any other
exception counts as transient: a bug may be fixed by a redeploy before the retries run out).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import structlog

from mlpipe.contract.models import Task, TaskType
from mlpipe.errors import NoHandler


@dataclass(frozen=True)
class Cost:
    """What one paid call consumed; recorded in the cost ledger with the result."""

    units: float
    #: ``audio_seconds`` or ``tokens``.
    unit_kind: str
    usd: Decimal
    model: str


@dataclass(frozen=True)
class HandlerResult:
    data: dict[str, Any]
    model_version: str | None = None
    costs: tuple[Cost, ...] = ()


@dataclass
class TaskContext:
    """What a handler may use besides its task: its position in the retry sequence, the queue,
    a logger with the task's fields bound, and shared resources owned by the daemon."""

    queue: str
    attempt: int
    message_id: str | None
    log: structlog.typing.FilteringBoundLogger
    resources: dict[str, Any] = field(default_factory=dict)


class Handler(Protocol):
    def __call__(self, task: Any, ctx: TaskContext, /) -> Awaitable[HandlerResult]: ...


#: Estimate of the USD a task will cost, checked against the budget before the handler runs.
#: A coroutine function is awaited: an estimator that needs a tokenizer vocabulary loads it
#: on the first task (off the event loop) instead of at daemon start.
CostEstimator = Callable[[Task], Decimal | Awaitable[Decimal]]


async def estimate_of(estimator: CostEstimator, task: Task) -> Decimal:
    """What ``estimator`` says ``task`` will cost, whether it answers now or later."""
    value = estimator(task)
    if inspect.isawaitable(value):
        value = await value
    return Decimal(value)


@dataclass(frozen=True)
class HandlerSpec:
    task_type: TaskType
    func: Handler
    #: Wall-clock limit of one run; a run past it is cancelled and retried as transient.
    timeout_s: float | None = None
    #: Typical runtime; the idempotency lock lives 1.5x this and is renewed while running.
    expected_runtime_s: float = 60.0
    estimate_cost: CostEstimator | None = None


#: The daemon's ``Metrics`` among a handler's resources, for handlers with figures of their own
#: (the embedding batch sizes).
METRICS_RESOURCE = "mlpipe.metrics"

#: Makes a long-lived resource (a model, an API client, a micro-batcher) for the daemon's
#: lifetime: entered when the daemon starts, exited after it drained.
ResourceFactory = Callable[[], AbstractAsyncContextManager[Any]]


class Registry:
    """Task type -> handler, plus the named resources handlers share. One registry is handed to
    the daemon; nothing registers itself globally at import time."""

    def __init__(self) -> None:
        self._specs: dict[TaskType, HandlerSpec] = {}
        self.resources: dict[str, ResourceFactory] = {}
        #: Multi-step workflows driven by results (``mlpipe.effects.hooks.Workflow``).
        self.workflows: list[Any] = []

    def add_workflow(self, workflow: Any) -> None:
        """A workflow (``mlpipe.effects.hooks.Workflow``) whose hooks the effects layer calls
        around the tasks it watches: before they run, inside the transaction that stores their
        result, when they are dead-lettered, and for its own delayed control messages."""
        if any(w.name == workflow.name for w in self.workflows):
            raise ValueError(f"a workflow named {workflow.name!r} is already registered")
        self.workflows.append(workflow)

    def add_resource(self, name: str, factory: ResourceFactory) -> None:
        """Handlers reach it as ``ctx.resources[name]``. Make heavy resources lazy (load a model
        on first use) so a daemon that never runs that task type never pays for it."""
        if name in self.resources:
            raise ValueError(f"resource {name!r} is already registered")
        self.resources[name] = factory

    def register(self, task_type: TaskType | str, func: Handler, *,
                 timeout_s: float | None = None, expected_runtime_s: float = 60.0,
                 estimate_cost: CostEstimator | None = None) -> HandlerSpec:
        tt = TaskType(task_type)
        if tt in self._specs:
            raise ValueError(f"a handler for {tt.value} is already registered")
        spec = HandlerSpec(tt, func, timeout_s, expected_runtime_s, estimate_cost)
        self._specs[tt] = spec
        return spec

    def handler(self, task_type: TaskType | str, **kwargs: Any) -> Callable[[Handler], Handler]:
        def deco(func: Handler) -> Handler:
            self.register(task_type, func, **kwargs)
            return func

        return deco

    def get(self, task_type: TaskType) -> HandlerSpec:
        try:
            return self._specs[task_type]
        except KeyError:
            raise NoHandler(f"no handler registered for {task_type.value}") from None

    def __contains__(self, task_type: object) -> bool:
        return task_type in self._specs

    def __iter__(self) -> Iterator[HandlerSpec]:
        return iter(self._specs.values())
