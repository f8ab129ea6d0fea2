"""Workflows: multi-step pipelines driven by results, plugged into the effects layer.

A workflow watches some tasks and is called at the points where the exactly-once layer can
keep its promises for it too:

=====================  ===========================================================  ==========
hook                    when                                                          may
=====================  ===========================================================  ==========
``skip_reason``         under the task's lock, before the stored-result check          skip it
``before_run``          after that check, before the handler; outbox rows it adds     arm timers
                        are published before the handler runs
``on_result``           inside the transaction that stores the task's result          queue the
                                                                                     next step
``on_dead_letter``      the task failed for good                                       fall back
``control``             one of its own delayed control messages came back             time out
``collect_metrics``     Prometheus scrapes                                            set gauges
=====================  ===========================================================  ==========

Follow-up tasks and control messages go through the outbox (``WorkflowEnv.follow_up`` and
``schedule``), so they leave if and only if the transaction that queued them commits. A task
no workflow ``watches`` takes the effects layer's fast path (one statement for result and
event), so workflows cost nothing to the tasks they ignore. Register one with
``Registry.add_workflow``; ``mlpipe.workflow.video.VideoWorkflow`` is the shipped one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from mlpipe.broker.topology import DELAY_TIER_HEADER, Topology, routing_key_for
from mlpipe.contract.codec import encode
from mlpipe.contract.models import Task
from mlpipe.errors import ContractError
from mlpipe.handlers import HandlerResult
from mlpipe.observability.metrics import Metrics
from mlpipe.settings import Settings
from mlpipe.store import outbox
from mlpipe.store.pool import DB, unavailable_is_transient
from mlpipe.worker.delivery import InboundMessage
from mlpipe.worker.headers import retry_count_of
from mlpipe.worker.outcome import Ack, Processed, decide

log = structlog.get_logger(__name__)

#: Handles a workflow's control message (its JSON body) on a connection of the effects pool.
ControlHandler = Callable[[DB, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class WorkflowEnv:
    """Where a workflow's messages go, and the two ways it sends them (through the outbox of
    the transaction it is called in)."""

    tasks_exchange: str
    delay_exchange: str
    control_queue: str
    topology: Topology

    async def follow_up(self, conn: DB, cause: Task, task: Task) -> None:
        """Queue ``task`` as the next step after ``cause``. Its message id is deterministic
        (``wf:<share>:<taskType>``), so a repeated step queues the same message."""
        body: dict[str, Any] = json.loads(encode(task))
        headers = {"traceparent": task.metadata.traceparent} if task.metadata.traceparent else {}
        await outbox.add(conn, share_id=cause.share_id, task_type=cause.task_type.value,
                         kind="task", exchange=self.tasks_exchange,
                         routing_key=routing_key_for(task),
                         message_id=f"wf:{task.share_id}:{task.task_type.value}", body=body,
                         headers=headers)

    async def schedule(self, conn: DB, cause: Task, kind: str, body: dict[str, Any],
                       delay_s: float, message_id: str) -> None:
        """A control message ``{"kind": kind, **body}`` back on the control queue after
        ``delay_s`` (a delay queue, not a poll), handled by the workflow's ``control[kind]``.
        The delay rounds up to a delay tier: the retry backoff's steps and
        ``workflow_timeout_s``."""
        tier = self.topology.tier_for(round(delay_s * 1000))
        await outbox.add(conn, share_id=cause.share_id, task_type=cause.task_type.value,
                         kind="task", exchange=self.delay_exchange,
                         routing_key=self.control_queue, message_id=message_id,
                         body={"kind": kind, **body}, headers={DELAY_TIER_HEADER: str(tier)})


class Workflow:
    """Base class with hooks that do nothing; a workflow overrides what it needs."""

    #: Unique among a registry's workflows; prefixes its control message kinds by convention.
    name = "workflow"
    #: Control message kind -> handler.
    control: dict[str, ControlHandler] = {}

    def watches(self, task: Task) -> bool:
        """Whether this workflow has anything to do with ``task``: cheap, no I/O. Only watched
        tasks reach the other hooks."""
        return False

    async def skip_reason(self, conn: DB, task: Task) -> str | None:
        """A reason to ack ``task`` without running it (work the workflow has moved past)."""
        return None

    async def before_run(self, conn: DB, task: Task, env: WorkflowEnv) -> None:
        """The task's handler is about to run."""

    async def on_result(self, conn: DB, task: Task, result: HandlerResult,
                        env: WorkflowEnv) -> None:
        """Inside the transaction that stores ``result``."""

    async def on_dead_letter(self, conn: DB, task: Task, reason: str) -> None:
        """``task`` failed for good."""

    async def collect_metrics(self, conn: DB, metrics: Metrics) -> None:
        """Set gauges when Prometheus scrapes."""


class ControlProcessor:
    """Consumes the control queue: each message names its ``kind``; the workflow that owns the
    kind handles it. Plugs into the daemon's ``QueueConsumer`` like a task processor, so it
    gets the same flow control, retries and dead-lettering."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool,
                 handlers: dict[str, ControlHandler]) -> None:
        self._settings = settings
        self._pool = pool
        self._handlers = handlers

    async def process(self, message: InboundMessage, queue: str) -> Processed:
        try:
            doc = json.loads(message.body)
            kind = doc.get("kind") if isinstance(doc, dict) else None
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ContractError(f"not a workflow control message: {message.body[:200]!r}")
            async with unavailable_is_transient(f"workflow control {doc['kind']}"):
                await handler(self._pool, doc)
        except (ValueError, RecursionError) as exc:
            return Processed(decide(ContractError(f"not JSON: {exc}"), 0,
                                    self._settings.retry), "workflow")
        except Exception as exc:
            return Processed(decide(exc, retry_count_of(message), self._settings.retry),
                             "workflow")
        return Processed(Ack(), "workflow")
