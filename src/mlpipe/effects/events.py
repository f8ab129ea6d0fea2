"""Result events and the outbox relay.

A ``completed`` event is written to the outbox in the result's transaction and published
(confirmed) before the delivery is acked; ``flush`` is also called when a redelivery finds the
result already stored, which is how an event interrupted by a crash still goes out. Events
are published without ``mandatory``: nobody has to be listening.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg

from mlpipe.batching import GroupCommit
from mlpipe.broker.messages import event_message
from mlpipe.contract import events
from mlpipe.contract.models import Task
from mlpipe.handlers import HandlerResult
from mlpipe.producer import Producer
from mlpipe.store import outbox
from mlpipe.store.pool import DB


def completed_event(task: Task, result: HandlerResult, message_id: str | None) -> dict[str, Any]:
    event = events.ResultEvent(
        share_id=task.share_id, task_type=task.task_type, status="completed",
        result_ref=events.ResultRef(share_id=task.share_id, task_type=task.task_type),
        summary=events.summarize_result(result.data),
        cost_usd=float(sum((c.usd for c in result.costs), start=0)),
        correlation_id=task.metadata.correlation_id, traceparent=task.metadata.traceparent,
        message_id=message_id, occurred_at=time.time())
    # JSON-ready values straight from the model (no serialise-then-parse round trip)
    doc: dict[str, Any] = event.model_dump(mode="json", by_alias=True, exclude_none=True)
    return doc


async def add_completed(conn: DB, task: Task, result: HandlerResult, exchange: str,
                        message_id: str | None) -> list[outbox.OutboxMessage]:
    """Queue the ``completed`` event; returns everything now waiting to go out for this share
    and task type (the caller publishes it once the transaction committed)."""
    return await outbox.add_then_pending(
        conn, share_id=task.share_id, task_type=task.task_type.value, kind="event",
        exchange=exchange, routing_key=events.routing_key(task.task_type),
        message_id=uuid.uuid4().hex, body=completed_event(task, result, message_id))


def new_completed(task: Task, result: HandlerResult, exchange: str,
                  message_id: str | None) -> tuple[str, str, str, dict[str, Any]]:
    """Exchange, routing key, event id and body of a task's ``completed`` event."""
    return (exchange, events.routing_key(task.task_type), uuid.uuid4().hex,
            completed_event(task, result, message_id))


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, producer: Producer) -> None:
        self._pool = pool
        self._producer = producer
        #: Concurrent deliveries' "published" marks in one UPDATE.
        self._marks: GroupCommit[list[int], None] = GroupCommit(self._mark_batch,
                                                                 max_items=256)

    async def _mark_batch(self, batches: list[list[int]]) -> list[None]:
        await outbox.mark_published(self._pool, [i for ids in batches for i in ids])
        return [None] * len(batches)

    async def flush(self, share_id: str, task_type: str) -> int:
        """Publish what is still unpublished for this share and task type; raises
        ``PublishError`` if the broker does not confirm (the delivery then stays unacked)."""
        return await self.publish(await outbox.pending(self._pool, share_id, task_type))

    async def publish(self, pending: list[outbox.OutboxMessage]) -> int:
        """Publish rows read from the outbox (confirmed, in order) and mark them published."""
        if not pending:
            return 0
        done: list[int] = []
        try:
            for m in pending:
                await self._producer.publish_message(
                    m.exchange, m.routing_key, event_message(m.body, m.message_id, m.headers),
                    mandatory=m.kind == "task")
                done.append(m.id)
        finally:
            if done:
                await self._marks.submit(done)
        return len(done)
