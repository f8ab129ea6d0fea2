"""Carry out an outcome on the broker: ack, re-publish through a delay queue, or dead-letter.

Retries and dead-letters are fresh publishes (confirmed) followed by an ack of the original,
in that order: if the publish fails the original is requeued instead, so a message can be
duplicated by a crash between the two steps but never lost.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import structlog
from pydantic import ValidationError

from mlpipe.broker.messages import event_message
from mlpipe.broker.topology import DELAY_TIER_HEADER, Topology
from mlpipe.contract import events
from mlpipe.errors import PublishError
from mlpipe.producer import Producer
from mlpipe.worker.delivery import InboundMessage
from mlpipe.worker.headers import (
    H_ATTEMPTS,
    H_DEAD_AT,
    H_DEFERRALS,
    H_ERROR,
    H_ERROR_CLASS,
    H_ORIGIN_QUEUE,
    H_REASON,
    H_RETRY_COUNT,
    H_ROUTING_KEY,
    deferrals_of,
    original_routing_key,
    retry_count_of,
)
from mlpipe.worker.outcome import DeadLetter, Outcome, Processed, Requeue, Retry

log = structlog.get_logger(__name__)

#: How long a delivery whose settle could not publish is held (unacked) waiting for the
#: publish connection before it is handed back: a requeue at once would come straight back,
#: fail the same way, and use up the quorum queue's delivery limit within seconds.
HOLD_FOR_PUBLISHER_S = 30.0
#: And at least this long: a connection that is up but still refuses publishes must not turn
#: into a redelivery a few milliseconds later either.
MIN_HOLD_S = 1.0

#: What the dead-letter branch tells the workflows: the task failed for good, and why.
DeadLetterHook = Callable[[Any, str], Awaitable[None]]


def _copy(message: InboundMessage, body: bytes, headers: dict[str, Any],
          expiration_s: float | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        body=body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
        expiration=expiration_s,
    )


def failed_event(message: InboundMessage, outcome: DeadLetter) -> dict[str, Any] | None:
    try:
        doc = json.loads(message.body)
        meta = doc.get("metadata") or {}
        event = events.ResultEvent.model_validate({
            "share_id": doc["shareId"], "task_type": doc["taskType"], "status": "failed",
            "reason": outcome.reason, "error": outcome.error,
            "correlation_id": meta.get("correlationId") or message.correlation_id,
            "traceparent": meta.get("traceparent"), "message_id": message.message_id,
            "occurred_at": time.time()}, strict=False)
    except (ValueError, TypeError, KeyError, AttributeError, ValidationError, RecursionError):
        return None
    out: dict[str, Any] = json.loads(event.model_dump_json(by_alias=True, exclude_none=True))
    return out


def bump_retry_count(body: bytes, retry_count: int) -> bytes:
    """Write ``metadata.retryCount`` into the body, keeping every other field (including ones
    this version does not know) as the producer sent them."""
    try:
        doc = json.loads(body)
        doc["metadata"]["retryCount"] = retry_count
    except (ValueError, TypeError, KeyError, RecursionError):
        return body
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


class Settler:
    """Turns outcomes into broker operations for one daemon: the only place that acks, nacks,
    re-publishes or dead-letters a delivery. ``on_dead_letter`` (the workflows' fallback) runs
    on the dead-letter branch, before the ``failed`` event and the dead-letter publish."""

    def __init__(self, producer: Producer, topology: Topology,
                 on_dead_letter: DeadLetterHook | None = None) -> None:
        self._producer = producer
        self._topo = topology
        self.on_dead_letter = on_dead_letter

    async def settle(self, message: InboundMessage, done: Processed | Outcome,
                     origin_queue: str) -> None:
        processed = done if isinstance(done, Processed) else Processed(done, "unknown")
        outcome = processed.outcome
        if isinstance(outcome, Requeue):
            await self._requeue(message)
            return
        try:
            if isinstance(outcome, Retry):
                await self._retry(message, outcome, origin_queue)
            elif isinstance(outcome, DeadLetter):
                await self._tell_workflows(processed.task, outcome)
                await self._dead_letter(message, outcome, origin_queue)
        except PublishError as exc:
            log.warning("settle.publish_failed_requeue", error=str(exc),
                        message_id=message.message_id)
            await self._hold_until_publishable()
            await self._requeue(message)
            return
        await self._ack(message)  # Ack, Skip, and a Retry or DeadLetter once re-published

    async def _hold_until_publishable(self) -> None:
        """The consume side can be back before the publish side (after a broker restart the
        two connections recover independently). Keeping the delivery until the producer is
        connected again turns a redelivery storm into one retry."""
        try:
            await asyncio.gather(self._producer.wait_connected(timeout=HOLD_FOR_PUBLISHER_S),
                                 asyncio.sleep(MIN_HOLD_S))
        except (TimeoutError, RuntimeError) as exc:  # still down, or the daemon is closing
            log.warning("settle.publisher_still_down", error=repr(exc))

    async def _tell_workflows(self, task: Any, outcome: DeadLetter) -> None:
        if task is None or self.on_dead_letter is None:
            return
        try:
            await self.on_dead_letter(task, outcome.reason)
        except Exception as exc:  # the dead-letter itself must still happen
            log.warning("task.dead_letter_hook_failed", error=repr(exc))

    async def _retry(self, message: InboundMessage, outcome: Retry,
                     origin_queue: str) -> None:
        attempt = retry_count_of(message) + (1 if outcome.counts else 0)
        headers = dict(message.headers or {})
        tier = self._topo.tier_for(int(outcome.delay_s * 1000))
        headers.update({
            H_RETRY_COUNT: attempt,
            H_DEFERRALS: deferrals_of(message) + (0 if outcome.counts else 1),
            H_ROUTING_KEY: original_routing_key(message),
            H_REASON: outcome.reason,
            H_ERROR: outcome.error,
            DELAY_TIER_HEADER: str(tier),
        })
        delay = max(0.001, min(outcome.delay_s, tier / 1000))
        copy = _copy(message, bump_retry_count(message.body, attempt), headers, delay)
        await self._producer.publish_message(self._topo.delay_exchange, origin_queue, copy)
        log.info("task.retry_scheduled", attempt=attempt, delay_s=round(delay, 3),
                 reason=outcome.reason, message_id=message.message_id)

    async def _dead_letter(self, message: InboundMessage, outcome: DeadLetter,
                           origin_queue: str) -> None:
        headers = dict(message.headers or {})
        headers.pop(DELAY_TIER_HEADER, None)
        headers.update({
            H_REASON: outcome.reason,
            H_ERROR_CLASS: outcome.error_class,
            H_ERROR: outcome.error,
            H_ATTEMPTS: retry_count_of(message) + 1,
            H_ORIGIN_QUEUE: origin_queue,
            H_ROUTING_KEY: original_routing_key(message),
            H_DEAD_AT: int(time.time()),
        })
        await self._publish_failed_event(message, outcome)
        await self._producer.publish_message(
            self._topo.dead_letter_exchange, origin_queue, _copy(message, message.body, headers)
        )
        log.warning("task.dead_lettered", reason=outcome.reason, error=outcome.error,
                    error_class=outcome.error_class, message_id=message.message_id)

    async def _publish_failed_event(self, message: InboundMessage,
                                    outcome: DeadLetter) -> None:
        """Tell listeners a task failed for good. A message too broken to name its share and
        task type is not a task anyone waits for: it only goes to the dead-letter queue."""
        body = failed_event(message, outcome)
        if body is None:
            return
        await self._producer.publish_message(
            self._topo.events_exchange, events.routing_key(body["taskType"]),
            event_message(body, uuid.uuid4().hex), mandatory=False)

    @staticmethod
    async def _ack(message: InboundMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:  # channel gone: the broker redelivers; handlers are idempotent
            log.warning("settle.ack_failed", error=repr(exc), message_id=message.message_id)

    @staticmethod
    async def _requeue(message: InboundMessage) -> None:
        try:
            await message.nack(requeue=True)
        except Exception as exc:
            log.warning("settle.nack_failed", error=repr(exc), message_id=message.message_id)

