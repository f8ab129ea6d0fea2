"""The RabbitMQ topology mlpipe runs on, as data, and its idempotent declaration.

::

    producer --(routing key = task type [+ ".local"])--> [tasks: direct] --> ml.transcribe ...
    worker, transient error --> [delay: headers, x-delay-ms] --> mlpipe.delay.<ms>
        --(TTL expires, dead-lettered)--> [retry: direct, key = queue name] --> origin queue
    worker, permanent error --> [dlx: fanout] --> mlpipe.dead
    worker, result committed / dead-lettered --> [events: topic, ml.result.<taskType>] --> any
    quorum queue, delivery limit hit --(x-dead-letter-exchange)--> [dlx] --> mlpipe.dead

Every queue is a quorum queue: replicated, and with at-least-once dead-lettering so that a
message moving to the dead-letter or back from a delay queue cannot be dropped on the way.
Retries travel through delay queues (a fresh publish), so they never count against the
``x-delivery-limit`` that protects against crash loops.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, ExchangeType

from mlpipe.contract.models import Backend, Task, TaskType
from mlpipe.errors import TopologyMismatch

log = structlog.get_logger(__name__)

LOCAL_SUFFIX = ".local"
#: Header that picks a delay tier. Not ``x-``-prefixed: a headers exchange ignores those.
DELAY_TIER_HEADER = "mlpipe-delay-tier"


@dataclass(frozen=True)
class WorkQueue:
    """One workload class: a queue and the routing keys bound to it."""

    short_name: str
    task_types: tuple[TaskType, ...]
    local: bool = False

    @property
    def routing_keys(self) -> tuple[str, ...]:
        return tuple(routing_key(t, self.local) for t in self.task_types)


WORK_QUEUES: tuple[WorkQueue, ...] = (
    WorkQueue("transcribe", (TaskType.TRANSCRIBE_WHISPER,)),
    WorkQueue("summarize", (TaskType.SUMMARIZE_LLM, TaskType.SUMMARIZE_VIDEO_COMBINED)),
    WorkQueue("embed", (TaskType.EMBED_VECTORS,)),
    WorkQueue("transcribe_local", (TaskType.TRANSCRIBE_WHISPER,), local=True),
    WorkQueue("summarize_local", (TaskType.SUMMARIZE_LLM, TaskType.SUMMARIZE_VIDEO_COMBINED),
              local=True),
    WorkQueue("embed_local", (TaskType.EMBED_VECTORS,), local=True),
)
QUEUES_BY_NAME = {q.short_name: q for q in WORK_QUEUES}


def routing_key(task_type: TaskType, local: bool = False) -> str:
    return task_type.value + (LOCAL_SUFFIX if local else "")


def routing_key_for(task: Task) -> str:
    """Where a task goes: its task type, on the ``*_local`` queue when it asks for the
    self-hosted backend."""
    return routing_key(task.task_type, task.payload.options.backend is Backend.LOCAL)


def parse_queue_names(spec: str | Iterable[str]) -> list[WorkQueue]:
    """``"transcribe,embed"`` -> work queues; unknown names are a usage error."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in QUEUES_BY_NAME]
    if unknown or not names:
        raise ValueError(
            f"unknown queue name(s) {unknown or names!r}; choose from {sorted(QUEUES_BY_NAME)}"
        )
    return [QUEUES_BY_NAME[n] for n in dict.fromkeys(names)]


@dataclass(frozen=True)
class Topology:
    """Names and arguments of everything mlpipe declares, derived from settings."""

    namespace: str = ""
    delivery_limit: int = 10
    delay_tiers_ms: tuple[int, ...] = (1000,)
    queues: tuple[WorkQueue, ...] = field(default=WORK_QUEUES)

    def _n(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    @property
    def tasks_exchange(self) -> str:
        return self._n("mlpipe.tasks")

    @property
    def delay_exchange(self) -> str:
        return self._n("mlpipe.delay")

    @property
    def retry_exchange(self) -> str:
        return self._n("mlpipe.retry")

    @property
    def dead_letter_exchange(self) -> str:
        return self._n("mlpipe.dlx")

    @property
    def workflow_queue(self) -> str:
        """Control messages of the workflows (deadlines), delivered late through a delay tier."""
        return self._n("mlpipe.workflow")

    @property
    def events_exchange(self) -> str:
        return self._n("mlpipe.events")

    @property
    def dead_letter_queue(self) -> str:
        return self._n("mlpipe.dead")

    def queue_name(self, queue: WorkQueue | str) -> str:
        short = queue if isinstance(queue, str) else queue.short_name
        return self._n(f"ml.{short}")

    def delay_queue_name(self, delay_ms: int) -> str:
        return self._n(f"mlpipe.delay.{delay_ms}")

    def tier_for(self, delay_ms: int) -> int:
        """The smallest delay tier that can hold ``delay_ms`` (the largest if none can)."""
        for tier in self.delay_tiers_ms:
            if delay_ms <= tier:
                return tier
        return self.delay_tiers_ms[-1]

    def work_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def delay_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.retry_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }


def delay_tiers(base_s: float, max_s: float, max_retries: int) -> tuple[int, ...]:
    """One delay queue per distinct backoff step of the retry policy."""
    tiers = {
        round(min(max_s, base_s * 2**n) * 1000) for n in range(max(1, max_retries))
    }
    return tuple(sorted(tiers))


async def declare(channel: AbstractChannel, topo: Topology,
                  queues: Sequence[WorkQueue] | None = None, *, adopt: bool = False) -> None:
    """Declare exchanges and queues; safe to repeat. A queue that already exists with other
    arguments makes RabbitMQ close the channel: that becomes a ``TopologyMismatch`` naming
    the queue, raised at start-up rather than discovered mid-run."""
    try:
        await _declare(channel, topo, queues, adopt)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"an exchange or queue exists with different arguments than mlpipe declares: {exc}. "
            "Delete it, align its arguments, or set MLPIPE_ADOPT_EXISTING_QUEUES=true to "
            "consume existing work queues as they are (docs/migrating-from-celery.md)."
        ) from None


async def _declare_work_queue(channel: AbstractChannel, name: str, arguments: dict[str, Any],
                              adopt: bool) -> AbstractQueue:
    """Declare a work queue; with ``adopt``, a queue that exists with other arguments (the
    broker closes the channel over it) is used as it is, after reopening the channel."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        if not adopt:
            raise
        log.warning("topology.adopted_queue", queue=name, broker_said=str(exc)[:200],
                    effect="consumed as it is; mlpipe's delivery limit and DLX do not apply")
        await channel.reopen()
        return await channel.declare_queue(name, passive=True)


async def _declare(channel: AbstractChannel, topo: Topology,
                   queues: Sequence[WorkQueue] | None, adopt: bool) -> None:
    ex = channel.declare_exchange
    tasks = await ex(topo.tasks_exchange, ExchangeType.DIRECT, durable=True)
    retry = await ex(topo.retry_exchange, ExchangeType.DIRECT, durable=True)
    delay = await ex(topo.delay_exchange, ExchangeType.HEADERS, durable=True)
    await ex(topo.events_exchange, ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(topo.dead_letter_exchange, ExchangeType.FANOUT,
                                         durable=True)

    dead = await channel.declare_queue(
        topo.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx, routing_key="")

    for tier in topo.delay_tiers_ms:
        q = await channel.declare_queue(
            topo.delay_queue_name(tier), durable=True, arguments=topo.delay_queue_arguments()
        )
        await q.bind(delay, arguments={"x-match": "all", DELAY_TIER_HEADER: str(tier)})

    control = await channel.declare_queue(topo.workflow_queue, durable=True,
                                          arguments=topo.work_queue_arguments())
    await control.bind(retry, routing_key=topo.workflow_queue)

    for wq in queues if queues is not None else topo.queues:
        name = topo.queue_name(wq)
        q = await _declare_work_queue(channel, name, topo.work_queue_arguments(), adopt)
        for key in wq.routing_keys:
            await q.bind(tasks, routing_key=key)
        await q.bind(retry, routing_key=name)
