"""Run tasks through the daemon's delivery path in memory: the harness for handler authors.

Celery has eager mode, FastStream ``TestRabbitBroker``, Dramatiq ``StubBroker``. Here the
daemon's own ``Processor`` decodes and validates the message, finds the handler in the
registry, runs it through an executor and lets ``outcome.decide`` turn whatever was raised
into ack, retry or dead-letter: the same code as in production. Only the executor differs:
``MemoryEffects`` keeps locks, results, the cost ledger and the events in dictionaries, with
the rules of the real effects layer (``mlpipe.effects``):

- a lock per ``(taskType, shareId)``: the same input from another message while it is held
  is acked as a duplicate, anything else is deferred;
- a stored result from the same input (payload hash) is acked without running
  (``forceRecompute`` runs anyway);
- the handler's ``estimate_cost`` is reserved against the hourly and daily ceilings of
  ``settings.budgets`` (spent + reserved + estimate must fit): over them, ``budget_exceeded``;
- a result is stored with its costs, and its ``completed`` event queued; a dead letter
  queues a ``failed`` event.

What it cannot show is what only the services can: redelivery after a crash, persistence
under a database outage, lease expiry. ``running_daemon`` is for those::

    async def test_summary_is_stored() -> None:
        async with TaskHarness(build_registry(settings)) as harness:
            run = await harness.send(build_task("summarize_llm", "s1", {...}))
        assert run.outcome == Ack()
        assert run.stored is not None and run.stored.data["summary"]
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import structlog

from mlpipe.contract.codec import encode
from mlpipe.contract.models import Task
from mlpipe.effects.events import completed_event
from mlpipe.errors import BudgetExceeded, Deferred
from mlpipe.execution import Bindings, Runtime, run_handler
from mlpipe.handlers import (
    Cost,
    HandlerResult,
    HandlerSpec,
    Registry,
    TaskContext,
    estimate_of,
)
from mlpipe.settings import Settings
from mlpipe.store.results import input_hash
from mlpipe.worker.headers import H_DEFERRALS
from mlpipe.worker.outcome import Ack, DeadLetter, Outcome, Retry, Skip
from mlpipe.worker.process import Processor
from mlpipe.worker.settle import failed_event

log = structlog.get_logger(__name__)

HOUR_S, DAY_S = 3600.0, 86_400.0


@dataclass(frozen=True)
class Stored:
    """A row of ``ml_results`` as the real store would hold it."""

    share_id: str
    task_type: str
    input_hash: str
    data: dict[str, Any]
    model_version: str | None
    costs: tuple[Cost, ...]


@dataclass(frozen=True)
class Run:
    """One delivery's fate: its outcome, and what it stored and would have published."""

    outcome: Outcome
    task_type: str
    result: HandlerResult | None = None
    #: Why an ack ran no handler: ``duplicate_in_flight`` or ``already_done``.
    skipped: str | None = None
    stored: Stored | None = None
    events: tuple[dict[str, Any], ...] = ()

    @property
    def acked(self) -> bool:
        return isinstance(self.outcome, Ack | Skip)

    @property
    def reason(self) -> str | None:
        """The dead-letter or retry reason, if any."""
        return self.outcome.reason if isinstance(self.outcome, DeadLetter | Retry) else None


@dataclass
class _Message:
    """A delivery in memory, shaped like the broker's (``InboundMessage``)."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    timestamp: datetime.datetime | None = None
    type: str | None = None
    app_id: str | None = None
    routing_key: str | None = None

    async def ack(self) -> None:
        return None

    async def nack(self, *, requeue: bool = True) -> None:
        return None


class MemoryEffects:
    """The effects layer's rules over dictionaries. ``clock`` (seconds) moves the budget
    windows in tests that need the next hour."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        #: (taskType, shareId) -> "inputHash/messageId" of the holder.
        self.locks: dict[tuple[str, str], str] = {}
        self.results: dict[tuple[str, str], Stored] = {}
        #: (when, taskType, usd) of every recorded cost.
        self.ledger: list[tuple[float, str, Decimal]] = []
        self.reservations: dict[int, tuple[float, str, Decimal]] = {}
        self.events: list[dict[str, Any]] = []
        self._next_reservation = 0

    def bind(self, runtime: Runtime) -> Bindings:
        """Nothing to wire up: there is no broker, and workflows need the real store."""
        return Bindings()

    async def execute(self, task: Task, spec: HandlerSpec,
                      ctx: TaskContext) -> HandlerResult | Skip:
        tt, share = task.task_type.value, task.share_id
        digest = input_hash(task)
        holder = self.locks.get((tt, share))
        if holder is not None:
            held_digest, _, held_message = holder.partition("/")
            if held_digest == digest and held_message != str(ctx.message_id):
                return Skip("duplicate_in_flight")
            raise Deferred(f"{tt} for {share} is locked by another run",
                           reason="lock_contention")
        self.locks[(tt, share)] = f"{digest}/{ctx.message_id}"
        try:
            stored = self.results.get((tt, share))
            if stored is not None and stored.input_hash == digest \
                    and not task.payload.options.force_recompute:
                return Skip("already_done")
            reservation = await self._reserve(task, spec)
            try:
                result = await run_handler(task, spec, ctx, self._settings.handler_timeout_s)
            finally:
                self.reservations.pop(reservation, None)
            now = self._clock()
            self.results[(tt, share)] = Stored(share, tt, digest, result.data,
                                               result.model_version, result.costs)
            self.ledger.extend((now, tt, c.usd) for c in result.costs)
            self.events.append(completed_event(task, result, ctx.message_id))
            return result
        finally:
            del self.locks[(tt, share)]

    async def _reserve(self, task: Task, spec: HandlerSpec) -> int:
        """``BudgetGuard.reserve`` over the ledger: both ceilings must hold the estimate."""
        self._next_reservation += 1
        if spec.estimate_cost is None:
            return self._next_reservation
        estimate = await estimate_of(spec.estimate_cost, task)
        if estimate <= 0:
            return self._next_reservation
        tt = task.task_type.value
        ceiling = self._settings.budget(tt)
        hour, day = self.spent(tt, HOUR_S), self.spent(tt, DAY_S)
        if (ceiling.hourly_usd and hour + estimate > Decimal(str(ceiling.hourly_usd))) or \
                (ceiling.daily_usd and day + estimate > Decimal(str(ceiling.daily_usd))):
            message = (f"{tt}: estimate ${estimate} on top of ${hour} this hour / ${day} today "
                       f"exceeds the ceiling ${ceiling.hourly_usd}/h, ${ceiling.daily_usd}/day")
            if self._settings.budget_action == "retry":
                raise Deferred(message, reason="budget_exceeded",
                               delay_s=self._settings.budget_retry_delay_s)
            raise BudgetExceeded(message)
        self.reservations[self._next_reservation] = (self._clock(), tt, estimate)
        return self._next_reservation

    def spent(self, task_type: str, window_s: float) -> Decimal:
        """Recorded costs plus open reservations of ``task_type`` in the last ``window_s``."""
        since = self._clock() - window_s
        entries = [*self.ledger, *self.reservations.values()]
        return sum((usd for at, tt, usd in entries if tt == task_type and at > since),
                   Decimal(0))


class TaskHarness:
    """Sends tasks through the daemon's processor with ``MemoryEffects``. Entering it opens
    the registry's resources, as the daemon does; ``settings`` defaults to ``Settings()``."""

    def __init__(self, registry: Registry, settings: Settings | None = None, *,
                 queue: str = "memory", resources: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or Settings()
        self.registry = registry
        self.effects = MemoryEffects(self.settings, clock=clock)
        self.resources: dict[str, Any] = dict(resources or {})
        self._queue = queue
        self._processor = Processor(self.settings, registry, self.effects, self.resources)
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> TaskHarness:
        for name, factory in self.registry.resources.items():
            self.resources[name] = await self._stack.enter_async_context(factory())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def send(self, task: Task | dict[str, Any] | bytes, *, message_id: str | None = None,
                   content_type: str | None = "application/json",
                   headers: dict[str, Any] | None = None) -> Run:
        """Deliver one message (a task, a JSON document, or raw bytes as a publisher might
        send them) and return its fate. Retries are not followed; see ``settle``."""
        body = _body(task)
        message = _Message(body, dict(headers or {}), content_type,
                           message_id=message_id or uuid.uuid4().hex,
                           routing_key=self._queue)
        events_before = len(self.effects.events)
        # its own task, as in the daemon: the log fields a delivery binds stay with it
        processed = await asyncio.create_task(self._processor.process(message, self._queue))
        if isinstance(processed.outcome, DeadLetter):
            failed = failed_event(message, processed.outcome)
            if failed is not None:
                self.effects.events.append(failed)
        stored = None
        if processed.result is not None and processed.task_type != "invalid":
            share = json.loads(body)["shareId"]
            stored = self.effects.results.get((processed.task_type, share))
        skipped = processed.outcome.reason if isinstance(processed.outcome, Skip) else None
        return Run(processed.outcome, processed.task_type, processed.result, skipped, stored,
                   tuple(self.effects.events[events_before:]))

    async def send_all(self, *tasks: Task | dict[str, Any] | bytes) -> list[Run]:
        """Deliver several messages at once, as concurrent deliveries of one daemon: how
        double-fires meet the lock."""
        return list(await asyncio.gather(*(self.send(t) for t in tasks)))

    async def settle(self, task: Task, *, message_id: str | None = None) -> list[Run]:
        """Deliver ``task`` and follow its retries (without their delays) until it is acked or
        dead-lettered, as the daemon's delay queues would; returns every attempt's run."""
        runs: list[Run] = []
        message_id = message_id or uuid.uuid4().hex
        deferrals = 0
        while True:
            run = await self.send(task, message_id=message_id,
                                  headers={H_DEFERRALS: deferrals} if deferrals else None)
            runs.append(run)
            if not isinstance(run.outcome, Retry):
                return runs
            if run.outcome.counts:
                meta = task.metadata.model_copy(
                    update={"retry_count": task.metadata.retry_count + 1})
                task = task.model_copy(update={"metadata": meta})
            else:
                deferrals += 1


def _body(task: Task | dict[str, Any] | bytes) -> bytes:
    if isinstance(task, bytes):
        return task
    if isinstance(task, dict):
        return json.dumps(task).encode()
    return encode(task)
