"""``ml_results``: one row per ``(share_id, task_type)``, the sequential-duplicate guard.

A delivery whose input hash matches the stored row is acked without running the handler; a
different input (edited content) or ``forceRecompute`` runs again and the upsert replaces the
row. The result, its cost entries and the release of its budget reservation are written in one
transaction, and the message is acked only after it committed.

Each write carries the fencing token of the lease it was computed under (``fence``, see
``idempotency/lock.py``), and the upsert replaces only a row with a lower token: a worker whose
lease was lost cannot overwrite the newer holder's result. A refused write raises
``FenceRefused`` before anything else of it (costs, outbox rows, reservation release) is
written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NoReturn

from mlpipe.contract.models import Task
from mlpipe.errors import MlpipeError
from mlpipe.handlers import Cost, HandlerResult
from mlpipe.store import outbox
from mlpipe.store.pool import DB

_UPSERT = """
INSERT INTO ml_results (share_id, task_type, input_hash, result_data, model_version,
                        processing_ms, cost_usd, fence)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (share_id, task_type) DO UPDATE SET
    input_hash = EXCLUDED.input_hash, result_data = EXCLUDED.result_data,
    model_version = EXCLUDED.model_version, processing_ms = EXCLUDED.processing_ms,
    cost_usd = EXCLUDED.cost_usd, fence = EXCLUDED.fence, updated_at = now()
WHERE ml_results.fence < EXCLUDED.fence
"""
#: The result and its ``completed`` event in one statement (one round trip, atomic without an
#: explicit transaction), returning every outbox row still unpublished for the share and task
#: type, the new one included, oldest first; no row at all when the fence refused the result.
_UPSERT_WITH_EVENT = """
WITH result AS (""" + _UPSERT.strip() + """
     RETURNING 1),
new AS (
    INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, message_id, body,
                           headers)
    SELECT $1, $2, 'event', $9, $10, $11, $12, '{}'::jsonb FROM result
    RETURNING """ + outbox.COLUMNS + ") " + outbox.PENDING_WITH_NEW


class FenceRefused(MlpipeError):
    """The stored row was written under a lease at least as new as this write's: the write was
    refused, and nothing of it was stored. ``stored_fence == fence`` means this very lease
    wrote the row already (an earlier attempt committed but its reply was lost)."""

    reason = "fenced"

    def __init__(self, share_id: str, task_type: str, fence: int,
                 stored_fence: int | None) -> None:
        super().__init__(f"{task_type} for {share_id}: stored result has fence {stored_fence}, "
                         f"this write {fence}")
        self.fence = fence
        self.stored_fence = stored_fence


def input_hash(task: Task) -> str:
    """Identity of a task's input: the payload without the options that only steer how it is
    run (``forceRecompute``), canonically serialised."""
    payload = task.payload.model_dump(mode="json", by_alias=True, exclude_none=True)
    payload.get("options", {}).pop("forceRecompute", None)
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


async def stored_input_hash(conn: DB, share_id: str, task_type: str) -> str | None:
    """The input hash of the stored result of one ``(share_id, task_type)``, if any."""
    value: str | None = await conn.fetchval(
        "SELECT input_hash FROM ml_results WHERE share_id = $1 AND task_type = $2",
        share_id, task_type)
    return value


async def stored_input_hashes(conn: DB, keys: list[tuple[str, str]]
                              ) -> dict[tuple[str, str], str | None]:
    """The input hash of the stored result of each ``(share_id, task_type)`` that has one, in
    one statement for a batch of concurrent deliveries' stored-result checks."""
    rows = await conn.fetch(
        "SELECT r.share_id, r.task_type, r.input_hash FROM ml_results r "
        "JOIN unnest($1::text[], $2::text[]) AS k(share_id, task_type) "
        "ON r.share_id = k.share_id AND r.task_type = k.task_type",
        [k[0] for k in keys], [k[1] for k in keys])
    return {(r["share_id"], r["task_type"]): r["input_hash"] for r in rows}


async def save(conn: DB, task: Task, result: HandlerResult, *,
               input_hash: str, processing_ms: int, correlation_id: str | None,
               reservation_id: int | None, fence: int) -> None:
    """Upsert the result and record its costs; call inside a transaction. Raises
    ``FenceRefused`` (having written nothing) when the stored row's fence is not lower."""
    total = sum((c.usd for c in result.costs), start=0)
    status = await conn.execute(
        _UPSERT,
        task.share_id, task.task_type.value, input_hash, result.data, result.model_version,
        processing_ms, total, fence)
    if status.endswith(" 0"):  # "INSERT 0 0": the conflicting row kept, nothing written
        await _refused(conn, task, fence)
    if result.costs:
        await conn.executemany(
            "INSERT INTO ml_costs (task_type, model, units, unit_kind, usd, share_id, "
            "correlation_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(task.task_type.value, c.model, c.units, c.unit_kind, c.usd, task.share_id,
              correlation_id) for c in result.costs])
    if reservation_id is not None:
        await conn.execute("DELETE FROM ml_cost_reservations WHERE id = $1", reservation_id)


async def save_with_event(conn: DB, task: Task, result: HandlerResult, *, input_hash: str,
                          processing_ms: int, fence: int, exchange: str, routing_key: str,
                          message_id: str, event: dict[str, Any]
                          ) -> list[outbox.OutboxMessage]:
    """``save`` plus the result's ``completed`` event for a result with no cost entries and
    no reservation (the common case): one statement instead of a four-round-trip
    transaction. Returns what the outbox holds for the share and task type; raises
    ``FenceRefused`` (the event not queued, nothing pending returned) like ``save``."""
    if result.costs:
        raise ValueError("save_with_event is for results without cost entries")
    rows = await conn.fetch(
        _UPSERT_WITH_EVENT, task.share_id, task.task_type.value, input_hash, result.data,
        result.model_version, processing_ms, 0, fence, exchange, routing_key, message_id, event)
    if not rows:  # a stored result always returns at least its own new outbox row
        await _refused(conn, task, fence)
    return [outbox.OutboxMessage(**dict(r)) for r in rows]


async def _refused(conn: DB, task: Task, fence: int) -> NoReturn:
    """Only on a refusal: one more read, for the log line and the caller's decision."""
    stored = await conn.fetchval(
        "SELECT fence FROM ml_results WHERE share_id = $1 AND task_type = $2",
        task.share_id, task.task_type.value)
    raise FenceRefused(task.share_id, task.task_type.value, fence,
                       None if stored is None else int(stored))


@dataclass(frozen=True)
class EventedResult:
    """One delivery's part of ``save_many_with_events``: a result, its ``completed`` event,
    its cost entries and the budget reservation they replace (what ``save`` writes in its
    transaction)."""

    share_id: str
    task_type: str
    input_hash: str
    data: dict[str, Any]
    model_version: str | None
    processing_ms: int
    fence: int
    exchange: str
    routing_key: str
    message_id: str
    event: dict[str, Any]
    costs: tuple[Cost, ...] = ()
    correlation_id: str | None = None
    reservation_id: int | None = None


#: ``save`` plus ``_UPSERT_WITH_EVENT`` for many results at once (arrays, one row per result;
#: cost entries in arrays of their own, one row per entry): one round trip and one commit for
#: a whole batch. A result the fence refused writes nothing: no cost entry, its reservation
#: kept (it ages out), no event. Returns, tagged with their share and task type, the new event
#: rows and every older row still unpublished for the same keys; a key whose result the fence
#: refused returns nothing.
_UPSERT_MANY_WITH_EVENTS = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::text[],
                         $6::int[], $7::bigint[], $8::text[], $9::text[], $10::text[],
                         $11::jsonb[], $12::numeric[], $13::bigint[])
        AS i(share_id, task_type, input_hash, result_data, model_version, processing_ms,
             fence, exchange, routing_key, message_id, event, cost_usd, reservation_id)
), result AS (
    INSERT INTO ml_results (share_id, task_type, input_hash, result_data, model_version,
                            processing_ms, cost_usd, fence)
    SELECT share_id, task_type, input_hash, result_data, model_version, processing_ms,
           cost_usd, fence
    FROM input
    ON CONFLICT (share_id, task_type) DO UPDATE SET
        input_hash = EXCLUDED.input_hash, result_data = EXCLUDED.result_data,
        model_version = EXCLUDED.model_version, processing_ms = EXCLUDED.processing_ms,
        cost_usd = EXCLUDED.cost_usd, fence = EXCLUDED.fence, updated_at = now()
    WHERE ml_results.fence < EXCLUDED.fence
    RETURNING share_id, task_type
), spent AS (
    INSERT INTO ml_costs (task_type, model, units, unit_kind, usd, share_id, correlation_id)
    SELECT c.task_type, c.model, c.units, c.unit_kind, c.usd, c.share_id, c.correlation_id
    FROM unnest($14::text[], $15::text[], $16::text[], $17::numeric[], $18::text[],
                $19::numeric[], $20::text[])
        AS c(share_id, task_type, model, units, unit_kind, usd, correlation_id)
    JOIN result r ON r.share_id = c.share_id AND r.task_type = c.task_type
), settled AS (
    DELETE FROM ml_cost_reservations
    WHERE id IN (SELECT i.reservation_id FROM input i
                 JOIN result r ON r.share_id = i.share_id AND r.task_type = i.task_type
                 WHERE i.reservation_id IS NOT NULL)
), new AS (
    INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, message_id, body,
                           headers)
    SELECT i.share_id, i.task_type, 'event', i.exchange, i.routing_key, i.message_id, i.event,
           '{}'::jsonb
    FROM input i JOIN result r ON r.share_id = i.share_id AND r.task_type = i.task_type
    RETURNING share_id, task_type, """ + outbox.COLUMNS + """
)
SELECT o.share_id, o.task_type, """ + ", ".join(f"o.{c.strip()}" for c in
                                               outbox.COLUMNS.split(",")) + """
FROM ml_outbox o JOIN (SELECT DISTINCT share_id, task_type FROM new) n
    ON o.share_id = n.share_id AND o.task_type = n.task_type
WHERE o.published_at IS NULL
UNION ALL SELECT * FROM new ORDER BY id
"""


async def save_many_with_events(conn: DB, items: list[EventedResult]
                                ) -> list[list[outbox.OutboxMessage] | FenceRefused]:
    """``save`` and ``save_with_event`` for a batch of results with distinct (share, task
    type): one statement. Each item gets what the outbox holds for its key, or its
    ``FenceRefused``."""
    costs = [(i, c) for i in items for c in i.costs]
    rows = await conn.fetch(
        _UPSERT_MANY_WITH_EVENTS, [i.share_id for i in items], [i.task_type for i in items],
        [i.input_hash for i in items], [i.data for i in items],
        [i.model_version for i in items], [i.processing_ms for i in items],
        [i.fence for i in items], [i.exchange for i in items], [i.routing_key for i in items],
        [i.message_id for i in items], [i.event for i in items],
        [sum((c.usd for c in i.costs), start=Decimal(0)) for i in items],
        [i.reservation_id for i in items],
        [i.share_id for i, _ in costs], [i.task_type for i, _ in costs],
        [c.model for _, c in costs], [Decimal(str(c.units)) for _, c in costs],
        [c.unit_kind for _, c in costs], [c.usd for _, c in costs],
        [i.correlation_id for i, _ in costs])
    by_key: dict[tuple[str, str], list[outbox.OutboxMessage]] = {}
    for r in rows:
        row = dict(r)
        key = (row.pop("share_id"), row.pop("task_type"))
        by_key.setdefault(key, []).append(outbox.OutboxMessage(**row))
    answers: list[list[outbox.OutboxMessage] | FenceRefused] = []
    for item in items:
        pending = by_key.get((item.share_id, item.task_type))
        if pending is not None:
            answers.append(pending)
            continue
        stored = await conn.fetchval(
            "SELECT fence FROM ml_results WHERE share_id = $1 AND task_type = $2",
            item.share_id, item.task_type)
        answers.append(FenceRefused(item.share_id, item.task_type, item.fence,
                                    None if stored is None else int(stored)))
    return answers
