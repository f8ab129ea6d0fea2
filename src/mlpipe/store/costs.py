"""The cost ledger (``ml_costs``) and in-flight budget reservations (``ml_cost_reservations``).

A paid call is checked against its task type's ceilings *before* it runs: under a per-task-type
advisory lock, the rolling last-hour and last-day spend plus open reservations plus the new
estimate must stay within the ceilings, and the estimate is then reserved. The reservation is
replaced by the real charges in the result's transaction, or deleted if the handler fails, so
two workers can never both squeeze under the same ceiling. A reservation orphaned by a crash
counts against its window until the window passes it: erring on the side of spending less.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from mlpipe.store.pool import DB

_SPEND = """
    SELECT coalesce(sum(usd) FILTER (WHERE created_at > now() - interval '1 hour'), 0) AS hour,
           coalesce(sum(usd), 0) AS day
    FROM (
        SELECT usd, created_at FROM ml_costs
         WHERE task_type = $1 AND created_at > now() - interval '1 day'
        UNION ALL
        SELECT usd, created_at FROM ml_cost_reservations
         WHERE task_type = $1 AND created_at > now() - interval '1 day'
    ) spend
"""


@dataclass(frozen=True)
class Spend:
    hour_usd: Decimal
    day_usd: Decimal


async def spend(conn: DB, task_type: str) -> Spend:
    row = await conn.fetchrow(_SPEND, task_type)
    assert row is not None
    return Spend(Decimal(row["hour"]), Decimal(row["day"]))


async def reserve_if_within(conn: DB, task_type: str, share_id: str,
                            estimate: Decimal, hourly: Decimal, daily: Decimal
                            ) -> tuple[int | None, Spend]:
    """Reserve ``estimate`` if it fits both ceilings (0 = no ceiling); return the reservation id
    (None when refused) and the spend it was judged against. Call inside a transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('mlpipe-budget:' || $1))",
                       task_type)
    current = await spend(conn, task_type)
    over_hour = hourly > 0 and current.hour_usd + estimate > hourly
    over_day = daily > 0 and current.day_usd + estimate > daily
    if over_hour or over_day:
        return None, current
    rid = await conn.fetchval(
        "INSERT INTO ml_cost_reservations (task_type, share_id, usd) VALUES ($1, $2, $3) "
        "RETURNING id", task_type, share_id, estimate)
    return int(rid), current


async def reserve_many_if_within(conn: DB, task_type: str, wanted: list[tuple[str, Decimal]],
                                 hourly: Decimal, daily: Decimal
                                 ) -> list[tuple[int | None, Spend]]:
    """``reserve_if_within`` for several (share id, estimate) of one task type at once, in
    order, under one advisory lock and one spend query: each is judged against the spend
    plus the estimates reserved before it in the batch, exactly as if they had come one after
    the other. Returns, per item, its reservation id (None when refused) and the spend it was
    judged against. Call inside a transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('mlpipe-budget:' || $1))",
                       task_type)
    current = await spend(conn, task_type)
    hour, day = current.hour_usd, current.day_usd
    judged: list[tuple[bool, Spend]] = []
    for _share, estimate in wanted:
        fits = not ((hourly > 0 and hour + estimate > hourly)
                    or (daily > 0 and day + estimate > daily))
        judged.append((fits, Spend(hour, day)))
        if fits:
            hour, day = hour + estimate, day + estimate
    accepted = [w for w, (fits, _) in zip(wanted, judged, strict=True) if fits]
    ids: list[int] = []
    if accepted:
        rows = await conn.fetch(
            "WITH ins AS (INSERT INTO ml_cost_reservations (task_type, share_id, usd) "
            "SELECT $1, s, u FROM unnest($2::text[], $3::numeric[]) WITH ORDINALITY "
            "AS t(s, u, n) ORDER BY n RETURNING id) SELECT id FROM ins ORDER BY id",
            task_type, [a[0] for a in accepted], [a[1] for a in accepted])
        ids = [int(r["id"]) for r in rows]
    taken = iter(ids)
    return [(next(taken) if fits else None, seen) for fits, seen in judged]


async def release(conn: DB, reservation_id: int) -> None:
    await conn.execute("DELETE FROM ml_cost_reservations WHERE id = $1", reservation_id)


async def summary(conn: DB, *,
                  window: str = "1 day") -> list[dict[str, Any]]:
    """Spend by task type and model over ``window`` (a Postgres interval)."""
    rows = await conn.fetch(
        """
        SELECT task_type, model, unit_kind, count(*) AS calls, sum(units) AS units,
               sum(usd) AS usd
        FROM ml_costs WHERE created_at > now() - $1::text::interval
        GROUP BY task_type, model, unit_kind ORDER BY task_type, model
        """, window)
    return [dict(r) for r in rows]


async def charges(conn: DB, task_type: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT share_id, model, units, unit_kind, usd, created_at FROM ml_costs "
        "WHERE task_type = $1 ORDER BY id", task_type)
    return [dict(r) for r in rows]
