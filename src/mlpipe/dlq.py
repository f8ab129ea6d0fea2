"""Inspect and replay the dead-letter queue.

Messages are fetched with ``basic.get`` and held unacknowledged while we look at them, so a
listing never removes anything, and a replay removes a message only after its copy was
confirmed back on its origin queue. A replayed copy starts afresh: ``retryCount`` 0 and the
``x-mlpipe-*`` diagnosis headers removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from mlpipe.broker.connection import connect_any
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.worker.headers import (
    H_ATTEMPTS,
    H_DEAD_AT,
    H_ERROR,
    H_ERROR_CLASS,
    H_ORIGIN_QUEUE,
    H_REASON,
    H_ROUTING_KEY,
    MLPIPE_HEADERS,
)
from mlpipe.worker.settle import bump_retry_count


@dataclass(frozen=True)
class DeadLetterEntry:
    message_id: str | None
    reason: str
    error_class: str | None
    error: str | None
    attempts: int | None
    origin_queue: str | None
    routing_key: str | None
    task_type: str | None
    share_id: str | None
    dead_lettered_at: int | None
    body_preview: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe(message: AbstractIncomingMessage) -> DeadLetterEntry:
    h = dict(message.headers or {})
    death = _first_death(h)
    task_type = share_id = None
    try:
        doc = json.loads(message.body)
        if isinstance(doc, dict):
            task_type = _str(doc.get("taskType"))
            share_id = _str(doc.get("shareId"))
    except (ValueError, RecursionError):
        pass
    return DeadLetterEntry(
        message_id=message.message_id,
        reason=_str(h.get(H_REASON)) or _str(death.get("reason")) or "unknown",
        error_class=_str(h.get(H_ERROR_CLASS)),
        error=_str(h.get(H_ERROR)),
        attempts=_int(h.get(H_ATTEMPTS)) or _int(death.get("count")),
        origin_queue=_str(h.get(H_ORIGIN_QUEUE)) or _str(death.get("queue")),
        routing_key=_str(h.get(H_ROUTING_KEY)) or _first(death.get("routing-keys")),
        task_type=task_type,
        share_id=share_id,
        dead_lettered_at=_int(h.get(H_DEAD_AT)),
        body_preview=message.body[:200].decode("utf-8", "replace"),
    )


Filter = Callable[[DeadLetterEntry], bool]


def make_filter(*, message_id: str | None = None, reason: str | None = None,
                task_type: str | None = None, queue: str | None = None) -> Filter:
    def match(e: DeadLetterEntry) -> bool:
        return ((message_id is None or e.message_id == message_id)
                and (reason is None or e.reason == reason)
                and (task_type is None or e.task_type == task_type)
                and (queue is None or e.origin_queue == queue))

    return match


async def list_dead(settings: Settings, *, limit: int = 100) -> list[DeadLetterEntry]:
    entries: list[DeadLetterEntry] = []

    async def visit(m: AbstractIncomingMessage) -> bool:
        entries.append(describe(m))
        return False

    await _walk(settings, limit, visit)
    return entries


async def replay(settings: Settings, match: Filter, *, limit: int = 10_000,
                 dry_run: bool = False) -> list[DeadLetterEntry]:
    """Send matching dead letters back to the queue they died on; returns what was replayed."""
    replayed: list[DeadLetterEntry] = []
    async with Producer(settings, name="mlpipe-dlq-replay") as producer:
        topo = producer.topology

        async def visit(m: AbstractIncomingMessage) -> bool:
            entry = describe(m)
            if not match(entry) or entry.origin_queue is None:
                return False
            if not dry_run:
                headers = {k: v for k, v in (m.headers or {}).items()
                           if k not in MLPIPE_HEADERS and k != "x-death"}
                copy = aio_pika.Message(
                    body=bump_retry_count(m.body, 0), headers=headers,
                    content_type=m.content_type, content_encoding=m.content_encoding,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=m.message_id,
                    correlation_id=m.correlation_id, timestamp=m.timestamp, type=m.type,
                )
                await producer.publish_message(topo.retry_exchange, entry.origin_queue, copy)
            replayed.append(entry)
            return not dry_run

        await _walk(settings, limit, visit)
    return replayed


async def _walk(settings: Settings, limit: int,
                visit: Callable[[AbstractIncomingMessage], Any]) -> None:
    """Hold up to ``limit`` dead letters unacked; ack those ``visit`` consumed, return the
    rest to the queue."""
    from mlpipe.producer import topology_from

    topo = topology_from(settings)
    conn = await connect_any(settings.broker_url, name="mlpipe-dlq")
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(topo.dead_letter_queue, passive=True)
        total = queue.declaration_result.message_count or 0
        held: list[AbstractIncomingMessage] = []
        for _ in range(min(total, limit)):
            m = await queue.get(no_ack=False, fail=False)
            if m is None:
                break
            if await visit(m):
                await m.ack()
            else:
                held.append(m)
        for m in held:
            await m.nack(requeue=True)
    finally:
        await conn.close()


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _str(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _first(v: Any) -> str | None:
    return _str(v[0]) if isinstance(v, list) and v else None
