"""The transactional outbox (``ml_outbox``): see sql/0005_outbox.sql for why it exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlpipe.store.pool import DB


@dataclass(frozen=True)
class OutboxMessage:
    id: int
    exchange: str
    routing_key: str
    message_id: str
    body: dict[str, Any]
    headers: dict[str, Any]
    kind: str


async def add(conn: DB, *, share_id: str, task_type: str, kind: str, exchange: str,
              routing_key: str, message_id: str, body: dict[str, Any],
              headers: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, message_id, "
        "body, headers) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        share_id, task_type, kind, exchange, routing_key, message_id, body, headers or {})


#: The columns of an ``OutboxMessage``.
COLUMNS = "id, exchange, routing_key, message_id, body, headers, kind"
#: Closes a statement whose CTE ``new`` inserted an outbox row for share ``$1`` and task type
#: ``$2``: every row still unpublished for them, the new one included (a statement does not
#: see its own CTE's inserts), oldest first; nothing at all when ``new`` inserted nothing (a
#: result refused by its fence queues no event, and must not publish anyone else's).
PENDING_WITH_NEW = (f"SELECT {COLUMNS} FROM ml_outbox WHERE share_id = $1 AND task_type = $2 "
                    "AND published_at IS NULL AND EXISTS (SELECT FROM new) "
                    "UNION ALL SELECT * FROM new ORDER BY id")


async def add_then_pending(conn: DB, *, share_id: str, task_type: str, kind: str,
                           exchange: str, routing_key: str, message_id: str,
                           body: dict[str, Any]) -> list[OutboxMessage]:
    """``add`` and ``pending`` in one round trip, for the last write of a result's transaction:
    the new row plus every row still unpublished for the share and task type (earlier
    statements of the same transaction included), oldest first."""
    rows = await conn.fetch(
        "WITH new AS (INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, "
        "message_id, body, headers) VALUES ($1, $2, $3, $4, $5, $6, $7, '{}'::jsonb) "
        f"RETURNING {COLUMNS}) {PENDING_WITH_NEW}",
        share_id, task_type, kind, exchange, routing_key, message_id, body)
    return [OutboxMessage(**dict(r)) for r in rows]


async def owed(conn: DB, older_than_s: float, limit: int = 500) -> list[OutboxMessage]:
    """Rows still unpublished ``older_than_s`` after they were written, oldest first: events
    whose delivery did not live to publish them (the partial index holds only these)."""
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM ml_outbox WHERE published_at IS NULL "
        "AND created_at < now() - make_interval(secs => $1) ORDER BY id LIMIT $2",
        older_than_s, limit)
    return [OutboxMessage(**dict(r)) for r in rows]


async def pending(conn: DB, share_id: str, task_type: str) -> list[OutboxMessage]:
    rows = await conn.fetch(
        "SELECT id, exchange, routing_key, message_id, body, headers, kind FROM ml_outbox "
        "WHERE share_id = $1 AND task_type = $2 AND published_at IS NULL ORDER BY id",
        share_id, task_type)
    return [OutboxMessage(**dict(r)) for r in rows]


async def mark_published(conn: DB, ids: list[int]) -> None:
    if ids:
        await conn.execute("UPDATE ml_outbox SET published_at = now() WHERE id = ANY($1)", ids)
