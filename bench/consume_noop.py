"""Workload 1, no-op consume: pre-fill a quorum queue, then time consume + ack until empty.

Contenders (Celery lives in ``bench.celery_bench``):

* **mlpipe**: the real ``Daemon`` in-process with ``DirectExecutor`` and a handler that returns
  at once; every message is decoded and validated against contract v1 on the way, as always;
* **raw aio-pika**: ``queue.consume`` with a callback that acks (no decoding): the practical
  limit of any Python consumer built on aio-pika;
* **FastStream**: ``RabbitBroker`` with one subscriber, ``AckPolicy.ACK`` (ack after the
  handler) and its default JSON decoding of the body; per-message logging off, as in mlpipe.

All three consume the same kind of queue (quorum, mlpipe's work-queue arguments) with the same
prefetch, pre-filled with the same messages, on the bench process's uvloop event loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench import broker
from bench.measure import Completion, Run, cpu_seconds, deadline_for, quiesce
from mlpipe.broker.topology import QUEUES_BY_NAME, Topology, declare
from mlpipe.contract.models import EmbedTask, TaskType
from mlpipe.execution import DirectExecutor
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.settings import QueueTuning, Settings
from mlpipe.testing import wait_for
from mlpipe.worker.daemon import Daemon

#: Deliveries the broker may push ahead of acks, for every contender. Measured on the 2-core
#: reference machine: 64-256 are within noise of each other for raw aio-pika and mlpipe, and
#: 1000 is slower (bigger bursts, more scheduling); 128 keeps a deep pipe without bursts.
PREFETCH = 128
#: mlpipe's handler slots: as many as the prefetch, so no delivered message waits for a slot
#: (the same as raw aio-pika, which starts one task per delivery).
CONCURRENCY = PREFETCH
EMBED = QUEUES_BY_NAME["embed"]
_OK = HandlerResult({})


#: The daemon's /metrics server runs as in production, on a free loopback port (several
#: daemons run in this process, and the default port may be taken on a shared machine).
HTTP: dict[str, Any] = {"http_port": 0, "http_host": "127.0.0.1"}


def mlpipe_settings(url: str, *, prefetch: int = PREFETCH, concurrency: int = CONCURRENCY,
                    **extra: Any) -> Settings:
    return Settings(broker_url=url,
                    queues={"embed": QueueTuning(prefetch=prefetch, concurrency=concurrency)},
                    **HTTP, **extra)


def noop_registry(completion: Completion | None = None) -> Registry:
    registry = Registry()

    async def handle(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        if completion is not None:
            completion.started()
            completion.finished()
        return _OK

    registry.register(TaskType.EMBED_VECTORS, handle)
    return registry


async def prepare_mlpipe_queue(url: str, n: int) -> str:
    """Declare mlpipe's topology (as the daemon would) and pre-fill ``ml.embed``."""
    topo = Topology()
    async with broker.connection(url) as conn, conn.channel() as ch:
        await declare(ch, topo)
    name = topo.queue_name(EMBED)
    await broker.prefill(url, name, n)
    return name


async def mlpipe_noop(url: str, n: int) -> Run:
    queue = await prepare_mlpipe_queue(url, n)
    handled = Completion(n)
    settings = mlpipe_settings(url)
    daemon = Daemon(settings, noop_registry(handled), [EMBED],
                    executor=DirectExecutor(settings), name="bench-mlpipe")
    quiesce()
    await daemon.start()
    try:
        run = await settled(daemon, handled)
    finally:
        await daemon.stop()
    await _assert_drained(url, queue)
    await broker.delete_queue(url, queue)
    return run


async def settled(daemon: Daemon, handled: Completion) -> Run:
    """Wait until the n-th handler returned, then until the daemon settled (acked) all n:
    the window ends at the n-th ack, as for the other contenders, and the bench adds no work
    to the daemon's path (the status poll starts only after the last handler)."""
    await handled.wait(deadline_for(handled.n))
    await wait_for(lambda: daemon.status().tasks_done >= handled.n, interval=0.0005,
                   timeout=30, message="all messages settled")
    assert handled.first is not None
    assert handled.cpu_first is not None
    return Run(handled.n, time.perf_counter() - handled.first,
               cpu_seconds() - handled.cpu_first)


async def raw_noop(url: str, n: int) -> Run:
    queue = "bench.raw"
    await broker.declare_queue(url, queue)
    await broker.prefill(url, queue, n)
    done = Completion(n)
    quiesce()
    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-raw"})
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        q = await channel.get_queue(queue, ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            done.started()
            await message.ack()
            done.finished()

        tag = await q.consume(on_message, no_ack=False)
        run = await done.wait(deadline_for(n))
        await q.cancel(tag)
    finally:
        await conn.close()
    await _assert_drained(url, queue)
    await broker.delete_queue(url, queue)
    return run


async def faststream_noop(url: str, n: int) -> Run:
    from faststream import AckPolicy
    from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

    queue = "bench.faststream"
    await broker.declare_queue(url, queue)
    await broker.prefill(url, queue, n)
    done = Completion(n)
    fs = RabbitBroker(url, logger=None, log_level=logging.WARNING)

    @fs.subscriber(
        RabbitQueue(queue, queue_type=QueueType.QUORUM,  # type: ignore[call-overload]
                    durable=True, arguments=broker.work_queue_arguments()),
        channel=Channel(prefetch_count=PREFETCH),
        ack_policy=AckPolicy.ACK,
    )
    async def handle(body: dict[str, Any]) -> None:
        # FastStream acks right after this returns (AckPolicy.ACK); the n-th ack follows the
        # n-th return within microseconds, and the drained-queue check below proves it was sent.
        done.started()
        done.finished()

    quiesce()
    await fs.start()
    try:
        run = await done.wait(deadline_for(n))
    finally:
        await fs.stop()
    await _assert_drained(url, queue)
    await broker.delete_queue(url, queue)
    return run


async def _assert_drained(url: str, queue: str) -> None:
    """After the consumer closed (unacked messages would be back in the queue now), nothing
    may be left: a contender that skipped acks must not look fast."""
    left = await broker.queue_depth(url, queue)
    if left:
        raise RuntimeError(f"{queue}: {left} messages left after the run; acks were lost")
