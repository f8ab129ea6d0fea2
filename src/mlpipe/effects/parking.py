"""Parked results: paid work that finished but could not be stored yet.

A handler run that succeeded is money spent. When the transaction that stores its result fails
(Postgres down for longer than ``persist_retry_s``, or a connection that broke in a way the
driver reports as an internal error), the delivery is retried, and the retry would pay again.
So before giving up, the executor parks the result in Redis under
``<prefix>parked:<taskType>:<shareId>`` together with the input hash it was computed from; the
retry (on any worker) finds it under the task lock and stores it instead of running the
handler. Parking is best-effort: with Redis down too, the retry runs the handler again, which
is still correct, only not free.

The entry expires after ``parked_result_ttl_s`` so a result whose retries were dead-lettered
does not sit in Redis forever; a replay within that time still finds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from mlpipe.handlers import Cost, HandlerResult

log = structlog.get_logger(__name__)

_UNAVAILABLE = (redis.exceptions.RedisError, OSError)


@dataclass(frozen=True)
class Parked:
    result: HandlerResult
    processing_ms: int
    #: The delivery that paid for it (retries keep their message id).
    message_id: str | None


class ResultParking:
    def __init__(self, client: aioredis.Redis, *, prefix: str, ttl_s: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))

    def key(self, task_type: str, share_id: str) -> str:
        return f"{self._prefix}parked:{task_type}:{share_id}"

    async def park(self, task_type: str, share_id: str, input_hash: str,
                   result: HandlerResult, processing_ms: int, *,
                   message_id: str | None) -> bool:
        """Keep ``result`` for a retry; False (logged) when Redis could not take it."""
        body = _dumps({
            "input_hash": input_hash,
            "processing_ms": processing_ms,
            "message_id": message_id,
            "data": result.data,
            "model_version": result.model_version,
            "costs": [{"units": c.units, "unit_kind": c.unit_kind, "usd": str(c.usd),
                       "model": c.model} for c in result.costs],
        })
        try:
            await self._redis.set(self.key(task_type, share_id), body, px=self._ttl_ms)
        except _UNAVAILABLE as exc:
            log.warning("result.park_failed", task_type=task_type, share_id=share_id,
                        error=repr(exc))
            return False
        return True

    def parse(self, task_type: str, share_id: str, input_hash: str,
              raw: bytes | str | None) -> Parked | None:
        """The parked result for exactly this input, from the raw entry (read together with
        the task lock, in the same round trip). A parked result of another input is stale (the
        share's content changed) and is ignored; so is an unreadable one: the caller then pays
        again rather than fails."""
        if raw is None:
            return None
        try:
            body = json.loads(raw)
            if body["input_hash"] != input_hash:
                return None
            costs = tuple(Cost(units=float(c["units"]), unit_kind=str(c["unit_kind"]),
                               usd=Decimal(c["usd"]), model=str(c["model"]))
                          for c in body["costs"])
            return Parked(HandlerResult(dict(body["data"]), body["model_version"], costs),
                          int(body["processing_ms"]), body.get("message_id"))
        except (ValueError, KeyError, TypeError) as exc:  # not ours or corrupted: run again
            log.warning("result.parked_unreadable", task_type=task_type, share_id=share_id,
                        error=repr(exc))
            return None

    async def drop(self, task_type: str, share_id: str) -> None:
        """Forget a parked result once it is stored; if this fails the TTL does it."""
        try:
            await self._redis.delete(self.key(task_type, share_id))
        except _UNAVAILABLE as exc:
            log.warning("result.parked_drop_failed", task_type=task_type, share_id=share_id,
                        error=repr(exc))


def _dumps(value: Any) -> str:
    # the same rendering the jsonb codec gives the stored row (store/pool.py)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
