"""Workload 2, the original system's stack: Celery doing the full path.

A real ``celery worker`` (prefork, concurrency 2, quorum queue, ``acks_late``, prefetch
multiplier 8, ``--max-tasks-per-child 50``: the original configuration) runs ``bench.full``
(``bench.celery_app``): celery-singleton's Redis lock, the stored-result check and the upsert
with psycopg 3, the ``completed`` event published with confirms, release, ack. Its work is
checked as mlpipe's is (``bench.full_path.verify``): work queue empty, every result stored,
every event received on the queue bound to the events exchange. The drain is timed from the
first task's start to the n-th task's end (lock released), from the pool processes' records;
client CPU is not comparable (other processes) and not reported.
"""

from __future__ import annotations

import uuid

from bench import broker
from bench.celery_app import FULL_TASK_NAME
from bench.celery_bench import celery_message, run_worker
from bench.full_path import (
    EVENTS_EXCHANGE,
    Stores,
    empty_tables,
    prepare_events_queue,
    verify,
)
from bench.measure import Run

QUEUE = "bench.celery_full"
MAX_TASKS_PER_CHILD = 50


async def celery_full(url: str, n: int, stores: Stores) -> Run:
    await empty_tables(stores)
    await prepare_events_queue(url)
    await broker.declare_queue(url, QUEUE, arguments={"x-queue-type": "quorum"})
    await broker.prefill(url, QUEUE, n, make=lambda i: celery_message(i, FULL_TASK_NAME))
    run = await run_worker(url, QUEUE, n, env={
        "BENCH_CELERY_DSN": stores.dsn, "BENCH_CELERY_SCHEMA": stores.schema,
        "BENCH_CELERY_REDIS": stores.redis_url,
        "BENCH_CELERY_LOCK_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:singleton:",
        "BENCH_CELERY_EVENTS_EXCHANGE": EVENTS_EXCHANGE,
    }, args=("--max-tasks-per-child", str(MAX_TASKS_PER_CHILD)), slowest_rate=20.0)
    await verify(url, QUEUE, stores, n, events=True, outbox=False)
    return run
