"""The path of one delivery, from bytes to outcome.

Reads top to bottom as the failure table of the design: decode and validate, find the handler,
run it through the executor (which, with the effects layer, adds the stored-result check, lock,
budget pre-flight and persistence), then let ``outcome.decide`` turn whatever was raised into
ack, retry or dead-letter. Nothing here touches the broker; ``settle`` does that.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import structlog

from mlpipe.contract.celery import from_celery, is_celery
from mlpipe.contract.codec import decode
from mlpipe.contract.models import Task
from mlpipe.errors import ContractError, HandlerTimeout
from mlpipe.handlers import HandlerResult, HandlerSpec, Registry, TaskContext
from mlpipe.observability.tracing import task_span
from mlpipe.settings import Settings
from mlpipe.worker.delivery import InboundMessage
from mlpipe.worker.outcome import Ack, DeadLetter, Outcome, decide
from mlpipe.worker.settle import deferrals_of, retry_count_of
from mlpipe.worker.timeouts import limit

if TYPE_CHECKING:
    from mlpipe.observability.metrics import Metrics
    from mlpipe.producer import Producer

log = structlog.get_logger(__name__)

_JSON_TYPES = {None, "", "application/json", "text/json"}


class Executor(Protocol):
    """Runs a validated task's handler and makes its effects durable. Returns the handler's
    result, or None when the run was skipped (a duplicate, a result already stored)."""

    async def execute(self, task: Task, spec: HandlerSpec,
                      ctx: TaskContext) -> HandlerResult | None: ...


class DeliveryProcessor(Protocol):
    """Turns one delivery into an outcome; the task processor and the workflow's control
    processor both plug into ``QueueConsumer`` through this."""

    async def process(self, message: InboundMessage, queue: str) -> Processed: ...


@runtime_checkable
class ControlQueues(Protocol):
    """An executor that needs extra queues consumed (workflow deadlines)."""

    def control_processors(self) -> dict[str, DeliveryProcessor]: ...


@runtime_checkable
class DeadLetterAware(Protocol):
    """An executor that must hear when a task fails for good (a workflow falling back)."""

    async def on_dead_letter(self, task: Task, reason: str) -> None: ...


@runtime_checkable
class MetricsSource(Protocol):
    """An executor with gauges read from its store when Prometheus scrapes (workflow states)."""

    async def collect_metrics(self, metrics: Metrics) -> None: ...


@runtime_checkable
class PublishingExecutor(Protocol):
    """An executor whose effects include messages (result events, follow-up tasks): the daemon
    hands it its producer."""

    def attach(self, producer: Producer, metrics: Metrics) -> None: ...


async def run_handler(task: Task, spec: HandlerSpec, ctx: TaskContext,
                      default_timeout_s: float) -> HandlerResult:
    """Run the handler under its time limit; a run past it is a transient ``HandlerTimeout``."""
    seconds = spec.timeout_s or default_timeout_s
    try:
        with limit(seconds):  # asyncio.timeout, on a timer shared by the loop's runs
            result = await spec.func(task, ctx)
    except TimeoutError:
        raise HandlerTimeout(f"{task.task_type.value} ran longer than {seconds}s") from None
    if not isinstance(result, HandlerResult):
        raise TypeError(f"handler for {task.task_type.value} returned {type(result).__name__}, "
                        "not HandlerResult")
    return result


def _celery_id(message: InboundMessage) -> str | None:
    """Celery protocol 2 carries its task id in a header, not in ``message_id``."""
    raw = (message.headers or {}).get("id")
    return raw.decode() if isinstance(raw, bytes) else (str(raw) if raw else None)


class DirectExecutor:
    """Runs the handler and keeps nothing: for handlers whose effects are their own business
    (tests, fire-and-forget work). The daemon uses the effects executor when Postgres and
    Redis are configured."""

    def __init__(self, settings: Settings) -> None:
        self._timeout = settings.handler_timeout_s

    async def execute(self, task: Task, spec: HandlerSpec,
                      ctx: TaskContext) -> HandlerResult | None:
        return await run_handler(task, spec, ctx, self._timeout)


@dataclass(frozen=True)
class Processed:
    outcome: Outcome
    #: The task type, or ``invalid`` for a message that is not a valid task.
    task_type: str
    result: HandlerResult | None = None


class Processor:
    def __init__(self, settings: Settings, registry: Registry, executor: Executor,
                 resources: dict[str, Any] | None = None) -> None:
        self._settings = settings
        self._registry = registry
        self._executor = executor
        self._resources = resources if resources is not None else {}

    async def process(self, message: InboundMessage, queue: str) -> Processed:
        """Every log line emitted while this runs (handler and libraries included) carries the
        delivery's queue, message id and correlation id, and once decoded its share id, task
        type, attempt and traceparent."""
        # bind + reset rather than ``bound_contextvars``, which snapshots the whole context
        # first: this runs once per delivery (see ``make bench``)
        tokens = structlog.contextvars.bind_contextvars(
            queue=queue, message_id=message.message_id, correlation_id=message.correlation_id)
        try:
            return await self._process(message, queue)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    async def _process(self, message: InboundMessage, queue: str) -> Processed:
        retry_count = retry_count_of(message)
        task_type = "invalid"
        task: Task | None = None
        try:
            if message.content_type not in _JSON_TYPES:
                raise ContractError(f"content type {message.content_type!r} is not JSON; "
                                    "only application/json is accepted", reason="content_type")
            if is_celery(message.headers):
                task = from_celery(dict(message.headers or {}), message.body,
                                   self._settings.celery_task_map,
                                   local=queue.endswith("_local"))
            else:
                task = decode(message.body)
            task_type = task.task_type.value
            retry_count = max(retry_count, task.metadata.retry_count)
            structlog.contextvars.bind_contextvars(
                share_id=task.share_id, task_type=task_type, attempt=retry_count + 1,
                correlation_id=task.metadata.correlation_id,
                traceparent=task.metadata.traceparent)
            spec = self._registry.get(task.task_type)
            message_id = message.message_id or _celery_id(message)
            ctx = TaskContext(queue=queue, attempt=retry_count + 1,
                              message_id=message_id, log=log, resources=self._resources)
            with task_span(f"mlpipe.{task_type}", task.metadata.traceparent,
                           {"mlpipe.share_id": task.share_id, "mlpipe.queue": queue,
                            "mlpipe.attempt": retry_count + 1}):
                result = await self._executor.execute(task, spec, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = decide(exc, retry_count, self._settings.retry,
                             deferrals=deferrals_of(message),
                             max_deferrals=self._settings.max_deferrals)
            log.info("task.failed", outcome=type(outcome).__name__,
                     error_class=type(exc).__name__, error=str(exc)[:300])
            if isinstance(outcome, DeadLetter) and task is not None:
                await self._tell_dead_letter(task, outcome)
            return Processed(outcome, task_type)
        log.info("task.done", skipped=result is None)
        return Processed(Ack(), task_type, result)

    async def _tell_dead_letter(self, task: Task, outcome: DeadLetter) -> None:
        if not isinstance(self._executor, DeadLetterAware):
            return
        try:
            await self._executor.on_dead_letter(task, outcome.reason)
        except Exception as exc:  # the dead-letter itself must still happen
            log.warning("task.dead_letter_hook_failed", error=repr(exc))
