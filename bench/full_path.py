"""Workload 2, full path: per message a Redis lock, the stored result, its ``completed`` event,
an ack. Three contenders do the same work; a fourth, the old hand-written loop that skips the
outbox and the event, stays as a reference. The Celery contender is in ``bench.celery_full``.

* **mlpipe**: the daemon with the effects executor (``mlpipe.effects.Effects``) and a handler
  returning a small result. Per message: contract validation, input hash, the lock script
  (``SET NX PX``, the fencing token, a peek at the parked-result key: one round trip), the
  stored-result ``SELECT``, the handler, one statement that upserts the result under its
  fence, inserts the outbox row and returns what is pending, the confirmed publish of the
  event to ``mlpipe.events``, the outbox mark (``UPDATE .. published_at``), the
  compare-and-delete release (Lua), the ack. No workflow watches the task (the bench's
  registry holds none, as for any task type that is not part of one): no workflow read.
* **hand_written**: the same calls written by hand in an aio-pika consumer callback, with
  the same SQL text and the same Lua, kept in step with ``src/mlpipe/store/results.py``,
  ``store/outbox.py``, ``effects/executor.py`` and ``idempotency/lock.py`` by reading them (a
  baseline that does less would flatter nobody but the baseline). What it leaves out is what
  only a framework does: contract validation with pydantic, retries and parking, metrics, the
  JSON log line. It is given what a careful author would do anyway: a jsonb codec, a pool
  whose release costs no round trip, one confirming channel for events.
* **raw_no_events**: the hand-written loop of issue 7 (lock, stored-result check, upsert
  without fence, release, ack; no outbox row, no event), for reference.

Every contender's work is checked after its run, and a run that fails a check is a failed
round (no figure): the work queue is empty, every result is stored, and for those that
announce results every outbox row is marked published and every event arrived, exactly once
per share and contract-valid, on a queue bound to the events exchange.

All run against a throwaway migrated schema on the pgvector Postgres and a lock prefix of
their own, every message a distinct share (no lock contention, no stored-result hits), and
``ml_results``/``ml_outbox`` are emptied before each run so all insert into tables of the same
size. Client CPU (this process's user + system time over the window) is recorded for the
contenders that run in-process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from bench import broker
from bench.consume_noop import EMBED, PREFETCH, mlpipe_settings, prepare_mlpipe_queue, settled
from bench.measure import Completion, Run, deadline_for, quiesce
from mlpipe.broker.topology import Topology
from mlpipe.contract.events import ResultEvent
from mlpipe.contract.models import EmbedTask, TaskType
from mlpipe.effects import Effects
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.settings import Settings
from mlpipe.store.migrate import migrate
from mlpipe.worker.daemon import Daemon

#: The result every handler stores.
RESULT = {"ok": True, "vector_count": 1}
MODEL_VERSION = "bench"
#: Same as ``Settings.database_pool_size``'s default, for every asyncpg contender.
POOL_SIZE = Settings.model_fields["database_pool_size"].default
LOCK_TTL_MS = 90_000  # mlpipe: expected_runtime_s (60) x 1.5
#: The queue bound to the events exchange that every announcing contender's events must reach.
EVENTS_QUEUE = "bench.events"
EVENTS_BINDING = "ml.result.#"
_TOPOLOGY = Topology()
EVENTS_EXCHANGE = _TOPOLOGY.events_exchange

# --- the hand-written SQL and Lua: the same statements mlpipe sends -----------------------------

#: SET NX PX, then the fencing token max(counter + 1, Redis TIME in µs), then the peek at the
#: parked-result key: as mlpipe's lock script, one round trip.
_ACQUIRE = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return false end
local t = redis.call('time')
local fence = math.max(tonumber(t[1]) * 1000000 + tonumber(t[2]),
                       tonumber(redis.call('get', KEYS[2]) or '0') + 1)
redis.call('set', KEYS[2], string.format('%.0f', fence))
return {fence, redis.call('get', KEYS[3])}
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_STORED = ("SELECT share_id, task_type, input_hash, result_data, model_version, processing_ms "
           "FROM ml_results WHERE share_id = $1 AND task_type = $2")
_OUTBOX_COLUMNS = "id, exchange, routing_key, message_id, body, headers, kind"
#: The result under its fence, its outbox row, and every row still pending for the share and
#: task type, in one statement.
_UPSERT_WITH_EVENT = f"""
WITH result AS (
    INSERT INTO ml_results (share_id, task_type, input_hash, result_data, model_version,
                            processing_ms, cost_usd, fence)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT (share_id, task_type) DO UPDATE SET
        input_hash = EXCLUDED.input_hash, result_data = EXCLUDED.result_data,
        model_version = EXCLUDED.model_version, processing_ms = EXCLUDED.processing_ms,
        cost_usd = EXCLUDED.cost_usd, fence = EXCLUDED.fence, updated_at = now()
    WHERE ml_results.fence < EXCLUDED.fence
    RETURNING 1),
new AS (
    INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, message_id, body,
                           headers)
    SELECT $1, $2, 'event', $9, $10, $11, $12, '{{}}'::jsonb FROM result
    RETURNING {_OUTBOX_COLUMNS})
SELECT {_OUTBOX_COLUMNS} FROM ml_outbox WHERE share_id = $1 AND task_type = $2
    AND published_at IS NULL AND EXISTS (SELECT FROM new)
UNION ALL SELECT * FROM new ORDER BY id
"""
_MARK_PUBLISHED = "UPDATE ml_outbox SET published_at = now() WHERE id = ANY($1)"
_PENDING = (f"SELECT {_OUTBOX_COLUMNS} FROM ml_outbox WHERE share_id = $1 AND task_type = $2 "
            "AND published_at IS NULL ORDER BY id")
#: The issue-7 loop's upsert: no fence, no outbox.
_UPSERT_NO_EVENT = """
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


async def empty_tables(stores: Stores) -> None:
    conn = await asyncpg.connect(stores.dsn)
    try:
        await conn.execute(f'TRUNCATE "{stores.schema}".ml_results, "{stores.schema}".ml_outbox')
    finally:
        await conn.close()


async def prepare_events_queue(url: str) -> None:
    """The events exchange as mlpipe declares it, and a quorum queue bound to every result
    event, emptied: what a downstream service listening for results would have."""
    async with broker.connection(url) as conn, conn.channel() as ch:
        exchange = await ch.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC,
                                             durable=True)
        queue = await ch.declare_queue(EVENTS_QUEUE, durable=True,
                                       arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, EVENTS_BINDING)
        await queue.purge()


# --- checks -------------------------------------------------------------------------------------


async def _table_counts(stores: Stores) -> tuple[int, int, int, int]:
    """Results stored, of them written under a fencing token, outbox rows, outbox rows still
    unpublished."""
    conn = await asyncpg.connect(stores.dsn)
    try:
        row = await conn.fetchrow(
            f'SELECT (SELECT count(*) FROM "{stores.schema}".ml_results) AS results, '
            f'(SELECT count(*) FROM "{stores.schema}".ml_results WHERE fence > 0) AS fenced, '
            f'(SELECT count(*) FROM "{stores.schema}".ml_outbox) AS outbox, '
            f'(SELECT count(*) FROM "{stores.schema}".ml_outbox WHERE published_at IS NULL) '
            "AS pending")
    finally:
        await conn.close()
    assert row is not None
    return int(row["results"]), int(row["fenced"]), int(row["outbox"]), int(row["pending"])


async def drain_events(url: str, n: int, timeout: float = 30.0) -> set[str]:
    """Take every event off the bound queue (acking), check each is a contract-valid
    ``completed`` event, and return their share ids; fails on a duplicate or a stray."""
    shares: set[str] = set()
    seen = 0
    deadline = time.monotonic() + timeout
    async with broker.connection(url, "bench-events-check") as conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue(EVENTS_QUEUE, ensure=False)
        with contextlib.suppress(TimeoutError):  # nothing more arrived within 2 s
            async with queue.iterator(timeout=2.0) as messages:
                async for message in messages:
                    event = ResultEvent.model_validate_json(message.body)
                    if event.status != "completed":
                        raise RuntimeError(f"{event.status} event for {event.share_id}")
                    seen += 1
                    shares.add(event.share_id)
                    await message.ack()
                    if seen >= n or time.monotonic() > deadline:
                        break
    # a new connection: whatever the first one had prefetched unacked is back in the queue
    left = await broker.queue_depth(url, EVENTS_QUEUE)
    if seen != len(shares):
        raise RuntimeError(f"{seen - len(shares)} duplicate events")
    if left:
        raise RuntimeError(f"{left} events more than the {n} results")
    return shares


async def verify(url: str, queue: str, stores: Stores, n: int, *, events: bool,
                 outbox: bool) -> None:
    """A contender really did the work: its work queue is empty, every result is stored,
    and (where the contender announces results) every event arrived on the bound queue; with
    ``outbox``, every result carries its fencing token and every outbox row is marked
    published. Raises (failing the round) otherwise."""
    left = await broker.queue_depth(url, queue)
    stored, fenced, rows, pending = await _table_counts(stores)
    problems = []
    if left:
        problems.append(f"{left} messages left on {queue}")
    if stored != n:
        problems.append(f"{stored} of {n} results stored")
    if outbox and (rows != n or pending or fenced != n):
        problems.append(f"{rows} outbox rows for {n} results, {pending} unpublished, "
                        f"{fenced} results fenced")
    if events:
        got = await drain_events(url, n)
        if len(got) != n:
            problems.append(f"{len(got)} of {n} events received on {EVENTS_QUEUE}")
    if problems:
        raise RuntimeError(f"full path on {queue}: " + "; ".join(problems))
    await broker.delete_queue(url, queue)


# --- mlpipe -------------------------------------------------------------------------------------


def _registry(handled: Completion) -> Registry:
    registry = Registry()

    async def handle(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        handled.started()
        handled.finished()
        return HandlerResult(dict(RESULT), model_version=MODEL_VERSION)

    registry.register(TaskType.EMBED_VECTORS, handle)
    return registry


async def mlpipe_full(url: str, n: int, stores: Stores) -> Run:
    await empty_tables(stores)
    queue = await prepare_mlpipe_queue(url, n)
    await prepare_events_queue(url)
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
    await verify(url, queue, stores, n, events=True, outbox=True)
    return run


# --- hand-written -------------------------------------------------------------------------------


async def _reset(conn: asyncpg.Connection) -> None:
    """Nothing is left on a connection by this loop but, after an error, an open transaction."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _input_hash(doc: dict[str, Any]) -> str:
    payload = doc["payload"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()[:32]


def _event(doc: dict[str, Any], message_id: str | None) -> dict[str, Any]:
    """The ``completed`` event of contract v1, built by hand (field for field what mlpipe
    sends; ``drain_events`` validates every one against the contract)."""
    share, task_type = doc["shareId"], doc["taskType"]
    return {"version": "1.0", "shareId": share, "taskType": task_type, "status": "completed",
            "resultRef": {"table": "ml_results", "shareId": share, "taskType": task_type},
            "summary": dict(RESULT), "costUsd": 0.0,
            "correlationId": doc["metadata"].get("correlationId"), "messageId": message_id,
            "occurredAt": time.time()}


async def hand_written_full(url: str, n: int, stores: Stores) -> Run:
    """The same work as mlpipe, written by hand (see the module docstring)."""
    await empty_tables(stores)
    queue = "bench.hand_full"
    await broker.declare_queue(url, queue)
    await broker.prefill(url, queue, n)
    await prepare_events_queue(url)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    pool = await asyncpg.create_pool(
        stores.dsn, min_size=1, max_size=POOL_SIZE, init=_init, reset=_reset,
        server_settings={"search_path": f"{stores.schema}, public"})
    assert pool is not None
    redis = aioredis.Redis.from_url(stores.redis_url, socket_timeout=2.0,
                                    socket_connect_timeout=2.0)
    acquire, release = redis.register_script(_ACQUIRE), redis.register_script(_RELEASE)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    done = Completion(n)
    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-hand-full"})
    try:
        events = await (await conn.channel(publisher_confirms=True)).get_exchange(
            EVENTS_EXCHANGE, ensure=False)

        async def publish(pending: list[asyncpg.Record]) -> None:
            """Each pending event, confirmed, in order; then their outbox rows marked."""
            for row in pending:
                body = row["body"]
                await events.publish(aio_pika.Message(
                    _dumps(body).encode(), content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=row["message_id"], correlation_id=body["correlationId"],
                    type="ml.result"), row["routing_key"])
            if pending:
                await pool.execute(_MARK_PUBLISHED, [row["id"] for row in pending])

        async def handle(message: AbstractIncomingMessage) -> None:
            doc = json.loads(message.body)
            share, task_type = doc["shareId"], doc["taskType"]
            digest = _input_hash(doc)
            key = f"{prefix}lock:{task_type}:{share}"
            token = f"{owner}:{uuid.uuid4().hex}:{digest}/{message.message_id}"
            got = await acquire(keys=[key, f"{prefix}fence", f"{prefix}parked:{task_type}:"
                                      f"{share}"], args=[token, LOCK_TTL_MS])
            if not got:
                raise RuntimeError(f"lock {key} unexpectedly held")
            try:
                stored = await pool.fetchrow(_STORED, share, task_type)
                if stored is not None and stored["input_hash"] == digest:
                    # a redelivery after a failure: the events the first attempt left behind
                    await publish(await pool.fetch(_PENDING, share, task_type))
                    return
                await publish(await pool.fetch(
                    _UPSERT_WITH_EVENT, share, task_type, digest, RESULT, MODEL_VERSION, 0, 0,
                    int(got[0]), EVENTS_EXCHANGE, f"ml.result.{task_type}", uuid.uuid4().hex,
                    _event(doc, message.message_id)))
            finally:
                await release(keys=[key], args=[token])

        async def on_message(message: AbstractIncomingMessage) -> None:
            done.started()
            try:
                await handle(message)
            except Exception:
                await _requeue(message)
                return
            await message.ack()
            done.finished()

        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue, ensure=False)
        quiesce()
        tag = await q.consume(on_message, no_ack=False)
        run = await done.wait(deadline_for(n, slowest_rate=50.0))
        await q.cancel(tag)
    finally:
        await conn.close()
        await pool.close()
        await redis.aclose()
    await verify(url, queue, stores, n, events=True, outbox=True)
    return run


async def _requeue(message: AbstractIncomingMessage) -> None:
    """What any consumer does with a failed message: back to the queue, to be tried again (a
    2 s Redis timeout on a loaded machine must cost a retry, not a lost message and a
    timed-out round; mlpipe retries such failures too)."""
    with contextlib.suppress(Exception):  # the channel is gone: the broker requeues it anyway
        await message.nack(requeue=True)


async def raw_no_events_full(url: str, n: int, stores: Stores) -> Run:
    """Issue 7's hand-written loop: lock, stored-result check, upsert, release, ack; no
    outbox row, no event, no fence."""
    await empty_tables(stores)
    queue = "bench.raw_full"
    await broker.declare_queue(url, queue)
    await broker.prefill(url, queue, n)
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    pool = await asyncpg.create_pool(stores.dsn, min_size=1, max_size=POOL_SIZE,
                                     server_settings={"search_path": f"{stores.schema}, public"})
    assert pool is not None
    redis = aioredis.Redis.from_url(stores.redis_url, socket_timeout=2.0,
                                    socket_connect_timeout=2.0)
    release = redis.register_script(_RELEASE)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    done = Completion(n)

    async def on_message(message: AbstractIncomingMessage) -> None:
        done.started()
        try:
            await handle(message)
        except Exception:
            await _requeue(message)
            return
        await message.ack()
        done.finished()

    async def handle(message: AbstractIncomingMessage) -> None:
        doc = json.loads(message.body)
        share, task_type = doc["shareId"], doc["taskType"]
        digest = _input_hash(doc)
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
                    await conn.execute(_UPSERT_NO_EVENT, share, task_type, digest,
                                       json.dumps(RESULT), MODEL_VERSION, 0, 0)
        finally:
            await release(keys=[key], args=[token])

    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-raw-full"})
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue, ensure=False)
        quiesce()
        tag = await q.consume(on_message, no_ack=False)
        run = await done.wait(deadline_for(n, slowest_rate=50.0))
        await q.cancel(tag)
    finally:
        await conn.close()
        await pool.close()
        await redis.aclose()
    await verify(url, queue, stores, n, events=False, outbox=False)
    return run
