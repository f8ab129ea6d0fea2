"""Workload 2, full path: per message a Redis lock, a Postgres upsert of a small result, an ack.

* **mlpipe**: the daemon with the effects executor (``mlpipe.effects.Effects``) and a handler
  returning ``{"ok": true}``. Per message the effects layer does: input hash, ``SET NX PX``
  lock, stored-result ``SELECT``, (no budget: the handler has no cost estimate), handler,
  ``BEGIN; INSERT .. ON CONFLICT DO UPDATE; COMMIT``, compare-and-delete release (Lua), ack;
  plus the lease's renewal task, which never fires for a run this short.
* **raw aio-pika**: the same calls written by hand in the consumer callback: ``json.loads``,
  input hash of the payload, ``SET NX PX``, the same ``SELECT``, the same upsert in a
  transaction, the same Lua release, ack. Same asyncpg pool size, same Redis client settings.

Both run against a throwaway migrated schema on the pgvector Postgres and a lock prefix of
their own, every message a distinct share (no lock contention, no stored-result hits), and
``ml_results`` is emptied before each run so both insert into a table of the same size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import asyncpg
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from bench import broker
from bench.consume_noop import EMBED, PREFETCH, mlpipe_settings, prepare_mlpipe_queue, settled
from bench.measure import Completion, Run, deadline_for, quiesce
from mlpipe.contract.models import EmbedTask, TaskType
from mlpipe.effects import Effects
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.settings import Settings
from mlpipe.store.migrate import migrate
from mlpipe.worker.daemon import Daemon

#: The result every handler stores.
RESULT = {"ok": True, "vector_count": 1}
#: Same as ``Settings.database_pool_size``'s default, for both contenders.
POOL_SIZE = Settings.model_fields["database_pool_size"].default
LOCK_TTL_MS = 90_000  # mlpipe: expected_runtime_s (60) x 1.5
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_UPSERT = """
INSERT INTO ml_results (share_id, task_type, input_hash, result_data, model_version,
                        processing_ms, cost_usd)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7)
ON CONFLICT (share_id, task_type) DO UPDATE SET
    input_hash = EXCLUDED.input_hash, result_data = EXCLUDED.result_data,
    model_version = EXCLUDED.model_version, processing_ms = EXCLUDED.processing_ms,
    cost_usd = EXCLUDED.cost_usd, updated_at = now()
"""


@dataclass(frozen=True)
class Stores:
    """Where the full path writes: the pgvector Postgres schema and the Redis URL."""

    dsn: str
    schema: str
    redis_url: str


@contextlib.asynccontextmanager
async def throwaway_schema(dsn: str, redis_url: str) -> AsyncIterator[Stores]:
    """A migrated schema of its own, dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    await migrate(dsn, schema=schema)
    try:
        yield Stores(dsn, schema, redis_url)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        finally:
            await conn.close()


async def _empty_results(stores: Stores) -> None:
    conn = await asyncpg.connect(stores.dsn)
    try:
        await conn.execute(f'TRUNCATE "{stores.schema}".ml_results')
    finally:
        await conn.close()


async def _count_results(stores: Stores) -> int:
    conn = await asyncpg.connect(stores.dsn)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{stores.schema}".ml_results'))
    finally:
        await conn.close()


def _registry(handled: Completion) -> Registry:
    registry = Registry()

    async def handle(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        handled.started()
        handled.finished()
        return HandlerResult(dict(RESULT), model_version="bench")

    registry.register(TaskType.EMBED_VECTORS, handle)
    return registry


async def mlpipe_full(url: str, n: int, stores: Stores) -> Run:
    await _empty_results(stores)
    queue = await prepare_mlpipe_queue(url, n)
    settings = mlpipe_settings(url, database_url=stores.dsn, database_schema=stores.schema,
                               redis_url=stores.redis_url,
                               lock_prefix=f"bench:{uuid.uuid4().hex[:8]}:")
    handled = Completion(n)
    async with Effects(settings) as effects:
        daemon = Daemon(settings, _registry(handled), [EMBED], executor=effects.executor,
                        name="bench-mlpipe-full")
        quiesce()
        await daemon.start()
        try:
            run = await settled(daemon, handled)
        finally:
            await daemon.stop()
    await _verify(url, queue, stores, n)
    return run


async def raw_full(url: str, n: int, stores: Stores) -> Run:
    await _empty_results(stores)
    queue = "bench.raw_full"
    await broker.declare_queue(url, queue)
    await broker.prefill(url, queue, n)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    search_path = f"{stores.schema}, public"
    pool = await asyncpg.create_pool(stores.dsn, min_size=1, max_size=POOL_SIZE,
                                     server_settings={"search_path": search_path})
    assert pool is not None
    redis = aioredis.Redis.from_url(stores.redis_url, socket_timeout=2.0,
                                    socket_connect_timeout=2.0)
    release = redis.register_script(_RELEASE)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    done = Completion(n)

    async def on_message(message: AbstractIncomingMessage) -> None:
        done.started()
        doc = json.loads(message.body)
        share, task_type = doc["shareId"], doc["taskType"]
        digest = hashlib.sha256(json.dumps(doc["payload"], sort_keys=True,
                                           separators=(",", ":")).encode()).hexdigest()[:32]
        key = f"{prefix}lock:{task_type}:{share}"
        token = f"{owner}:{uuid.uuid4().hex}:{digest}/{message.message_id}"
        if not await redis.set(key, token, nx=True, px=LOCK_TTL_MS):
            raise RuntimeError(f"lock {key} unexpectedly held")
        try:
            stored = await pool.fetchrow(
                "SELECT input_hash FROM ml_results WHERE share_id = $1 AND task_type = $2",
                share, task_type)
            if stored is None or stored["input_hash"] != digest:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.execute(_UPSERT, share, task_type, digest, json.dumps(RESULT),
                                       "bench", 0, 0)
        finally:
            await release(keys=[key], args=[token])
        await message.ack()
        done.finished()

    quiesce()
    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-raw-full"})
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue, ensure=False)
        tag = await q.consume(on_message, no_ack=False)
        run = await done.wait(deadline_for(n, slowest_rate=50.0))
        await q.cancel(tag)
    finally:
        await conn.close()
        await pool.close()
        await redis.aclose()
    await _verify(url, queue, stores, n)
    return run


async def _verify(url: str, queue: str, stores: Stores, n: int) -> None:
    """Both contenders must really have done the work: every result stored, queue empty."""
    left = await broker.queue_depth(url, queue)
    stored = await _count_results(stores)
    if left or stored != n:
        raise RuntimeError(f"full path on {queue}: {left} messages left, {stored} of {n} "
                           "results stored")
    await broker.delete_queue(url, queue)
