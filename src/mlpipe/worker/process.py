"""The path of one delivery, from bytes to outcome.

Reads top to bottom as the failure table of the design: decode and validate, find the handler,
run it through the executor (which, with the effects layer, adds the stored-result check, lock,
budget pre-flight and persistence), then let ``outcome.decide`` turn whatever was raised into
retry or dead-letter; a result is an ``Ack``, covered work a ``Skip``. The value returned is
the delivery's one outcome; nothing here touches the broker, ``settle`` does that.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from mlpipe.contract.celery import from_celery, is_celery
from mlpipe.contract.codec import decode
from mlpipe.contract.models import Task
from mlpipe.errors import ContractError
from mlpipe.execution import Executor
from mlpipe.handlers import Registry, TaskContext
from mlpipe.observability.tracing import recording, task_span
from mlpipe.settings import Settings
from mlpipe.worker.delivery import InboundMessage
from mlpipe.worker.headers import deferrals_of, retry_count_of
from mlpipe.worker.outcome import ACK, Processed, Skip, decide

log = structlog.get_logger(__name__)

_JSON_TYPES = {None, "", "application/json", "text/json"}


def _celery_id(message: InboundMessage) -> str | None:
    """Celery protocol 2 carries its task id in a header, not in ``message_id``."""
    raw = (message.headers or {}).get("id")
    return raw.decode() if isinstance(raw, bytes) else (str(raw) if raw else None)


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
        # Bound in the delivery's own task (``QueueConsumer`` runs each in one), whose context
        # copy ends with it: no reset needed, and the settle step's lines carry them too.
        structlog.contextvars.bind_contextvars(
            queue=queue, message_id=message.message_id, correlation_id=message.correlation_id)
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
            if recording():  # a span's name and attributes are built only when it records
                with task_span(f"mlpipe.{task_type}", task.metadata.traceparent,
                               {"mlpipe.share_id": task.share_id, "mlpipe.queue": queue,
                                "mlpipe.attempt": retry_count + 1}):
                    result = await self._executor.execute(task, spec, ctx)
            else:
                result = await self._executor.execute(task, spec, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = decide(exc, retry_count, self._settings.retry,
                             deferrals=deferrals_of(message),
                             max_deferrals=self._settings.max_deferrals)
            log.info("task.failed", outcome=type(outcome).__name__,
                     error_class=type(exc).__name__, error=str(exc)[:300])
            return Processed(outcome, task_type, task=task)
        if isinstance(result, Skip):
            log.info("task.done", skipped=True, why=result.reason)
            return Processed(result, task_type, task=task)
        log.info("task.done", skipped=False)
        return Processed(ACK, task_type, result, task)
