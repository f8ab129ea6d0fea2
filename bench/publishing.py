"""Workload 3, publishing with publisher confirms: one at a time, and many in flight.

* **mlpipe**: ``Producer.publish(task)`` for pre-built ``Task`` objects (the producer encodes
  each one, sets the contract's AMQP properties, publishes ``mandatory`` to ``mlpipe.tasks``
  and returns after the broker's confirm).
* **raw aio-pika**: a channel with ``publisher_confirms=True``; per message ``json.dumps`` of
  the same task as a plain dict, the same properties, ``exchange.publish(..., mandatory=True)``
  awaited for its confirm.

Both publish to the same exchange and routing key, into mlpipe's quorum ``ml.embed`` queue,
emptied before each run. "Many in flight" runs ``IN_FLIGHT`` publishes concurrently (a
semaphore), so that many confirms are outstanding at once. The window is from the first
publish call to the last confirm.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

from bench import broker, messages
from bench.measure import Run, quiesce
from mlpipe.broker.topology import QUEUES_BY_NAME, Topology, declare, routing_key_for
from mlpipe.contract.codec import decode
from mlpipe.contract.models import Task
from mlpipe.producer import Producer
from mlpipe.settings import Settings

IN_FLIGHT = 256
_TOPO = Topology()
_QUEUE = _TOPO.queue_name(QUEUES_BY_NAME["embed"])


async def _timed(n: int, in_flight: int, publish: Callable[[int], Awaitable[Any]]) -> Run:
    quiesce()
    started = time.perf_counter()
    if in_flight <= 1:
        for i in range(n):
            await publish(i)
    else:
        slots = asyncio.Semaphore(in_flight)

        async def one(i: int) -> None:
            async with slots:
                await publish(i)

        await asyncio.gather(*(one(i) for i in range(n)))
    return Run(n, time.perf_counter() - started)


async def _fresh_queue(url: str) -> None:
    async with broker.connection(url) as conn, conn.channel() as ch:
        await declare(ch, _TOPO)
        queue = await ch.get_queue(_QUEUE, ensure=False)
        await queue.purge()


async def _check_arrived(url: str, n: int) -> None:
    ready = await broker.queue_depth(url, _QUEUE)
    if ready != n:
        raise RuntimeError(f"{_QUEUE}: {ready} messages after publishing {n}")


async def mlpipe_publish(url: str, n: int, in_flight: int) -> Run:
    await _fresh_queue(url)
    tasks: list[Task] = [decode(b) for b in messages.bodies(n)]
    async with Producer(Settings(broker_url=url), name="bench-producer") as producer:
        run = await _timed(n, in_flight, lambda i: producer.publish(tasks[i]))
    await _check_arrived(url, n)
    return run


async def raw_publish(url: str, n: int, in_flight: int) -> Run:
    await _fresh_queue(url)
    docs: list[dict[str, Any]] = [json.loads(b) for b in messages.bodies(n)]
    key = routing_key_for(decode(messages.body(0)))
    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-raw-pub"})
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(_TOPO.tasks_exchange, ensure=False)

        async def publish(i: int) -> None:
            doc = docs[i]
            message = aio_pika.Message(
                body=json.dumps(doc, separators=(",", ":")).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=uuid.uuid4().hex,
                correlation_id=doc["metadata"]["correlationId"],
                timestamp=int(doc["metadata"]["timestamp"]),
            )
            await exchange.publish(message, key, mandatory=True)

        run = await _timed(n, in_flight, publish)
    finally:
        await conn.close()
    await _check_arrived(url, n)
    return run
