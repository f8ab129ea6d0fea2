"""What the console shows that the JSON endpoints do not: queue depths from the broker, task
counts over windows, workflows by state, one share's timeline.

Queue depth and consumers come from a passive ``queue.declare`` per queue (RabbitMQ answers
with both counts), so the console needs no management plugin; each declare gets a channel of
its own, since a missing queue closes the channel it was asked on. Done tasks are the results
Postgres stores; dead letters (and the failed events that go with them) are not in Postgres,
so they are counted from the dead-letter queue itself, by the time each died.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from aio_pika.abc import AbstractConnection

from mlpipe.broker.topology import Topology
from mlpipe.dlq import DeadLetterEntry

HOUR, DAY = 3600, 86400


@dataclass(frozen=True)
class QueueDepth:
    name: str
    messages: int | None
    consumers: int | None
    #: Why the counts are missing (queue not declared yet).
    note: str = ""


async def queue_depths(conn: AbstractConnection, topo: Topology) -> list[QueueDepth]:
    names = [topo.queue_name(q) for q in topo.queues]
    names += [topo.workflow_queue, topo.dead_letter_queue]
    out = []
    for name in names:
        channel = await conn.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            ok = queue.declaration_result
            out.append(QueueDepth(name, ok.message_count, ok.consumer_count))
        except Exception:  # not declared: the broker closes the channel with 404
            out.append(QueueDepth(name, None, None, "not declared"))
        finally:
            if not channel.is_closed:
                await channel.close()
    return out


@dataclass(frozen=True)
class Counts:
    hour: int
    day: int


async def done_counts(pool: asyncpg.Pool) -> Counts:
    row = await pool.fetchrow(
        "SELECT count(*) FILTER (WHERE updated_at >= now() - interval '1 hour') AS hour, "
        "count(*) AS day FROM ml_results WHERE updated_at >= now() - interval '1 day'")
    assert row is not None
    return Counts(row["hour"], row["day"])


def dead_counts(entries: list[DeadLetterEntry], *, failed_only: bool,
                now: float | None = None) -> Counts:
    """Dead letters by when they died; ``failed_only``: those that named their task (the
    ones a ``failed`` event was published for)."""
    now = time.time() if now is None else now
    ages = [now - e.dead_lettered_at for e in entries
            if e.dead_lettered_at is not None and (e.task_type or not failed_only)]
    return Counts(sum(a <= HOUR for a in ages), sum(a <= DAY for a in ages))


async def workflows(pool: asyncpg.Pool, state: str | None,
                    limit: int = 200) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT share_id, state, created_at, updated_at FROM ml_workflows "
        "WHERE ($1::text IS NULL OR state = $1) ORDER BY updated_at DESC LIMIT $2",
        state, limit)


async def workflow_states(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT state, count(*) AS count FROM ml_workflows GROUP BY state ORDER BY state")


@dataclass(frozen=True)
class Step:
    at: dt.datetime
    kind: str
    title: str
    detail: str
    cost_usd: str = ""


async def timeline(pool: asyncpg.Pool, share_id: str,
                   events: list[dict[str, Any]]) -> list[Step]:
    """State changes, stored results with their cost, and events remembered by this server,
    oldest first."""
    steps: list[Step] = []
    row = await pool.fetchrow("SELECT history FROM ml_workflows WHERE share_id = $1", share_id)
    for h in (row["history"] if row else None) or []:
        steps.append(Step(_at(h.get("at", 0)), "state", str(h.get("state", "")),
                          str(h.get("detail", ""))))
    for r in await pool.fetch(
            "SELECT task_type, model_version, processing_ms, cost_usd, updated_at "
            "FROM ml_results WHERE share_id = $1", share_id):
        steps.append(Step(r["updated_at"], "result", r["task_type"],
                          f"{r['model_version'] or ''} in {r['processing_ms'] or 0} ms",
                          format(r["cost_usd"], "f")))
    for e in events:
        steps.append(Step(_at(e.get("occurredAt", 0)), "event",
                          f"{e.get('taskType')} {e.get('status')}",
                          str(e.get("reason") or e.get("error") or "")))
    return sorted(steps, key=lambda s: s.at)


def _at(seconds: Any) -> dt.datetime:
    try:
        return dt.datetime.fromtimestamp(float(seconds), dt.UTC)
    except (TypeError, ValueError, OverflowError):
        return dt.datetime.fromtimestamp(0, dt.UTC)
