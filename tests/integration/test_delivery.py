"""``Delivery`` reads what aio-pika's ``IncomingMessage`` would read from the same delivery,
and settles it on the channel it came on, once."""

from __future__ import annotations

import asyncio
import datetime
import functools

import aio_pika
import pytest
from aio_pika import IncomingMessage
from aiormq.abc import DeliveredMessage

from mlpipe.errors import AlreadySettled
from mlpipe.worker.daemon import Daemon
from mlpipe.worker.delivery import Delivery

FIELDS = ("body", "headers", "content_type", "content_encoding", "message_id",
          "correlation_id", "timestamp", "type", "app_id", "routing_key", "delivery_tag",
          "redelivered")


async def _deliveries(url: str, messages: list[aio_pika.Message], n: int,
                      queue: str = "t.delivery") -> tuple[aio_pika.abc.AbstractConnection,
                                                          asyncio.Queue[DeliveredMessage]]:
    conn = await aio_pika.connect(url)
    ch = await conn.channel()
    await ch.declare_queue(queue, durable=True)
    for m in messages:
        await ch.default_exchange.publish(m, routing_key=queue)
    got: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

    async def on_delivery(d: DeliveredMessage) -> None:
        await got.put(d)

    underlay = await ch.get_underlay_channel()
    await underlay.basic_qos(prefetch_count=n)
    await underlay.basic_consume(queue, on_delivery, no_ack=False)
    return conn, got


async def test_properties_read_as_incoming_message_reads_them(broker_url: str) -> None:
    stamp = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    full = aio_pika.Message(b'{"a":1}', headers={"x-mlpipe-retry-count": 2, "id": "c1"},
                            content_type="application/json", content_encoding="utf-8",
                            message_id="m-1", correlation_id="corr-1", timestamp=stamp,
                            type="t", app_id="app")
    bare = aio_pika.Message(b"", message_id="")
    conn, got = await _deliveries(broker_url, [full, bare], 2)
    try:
        for _ in range(2):
            delivered = await asyncio.wait_for(got.get(), 10)
            ours, theirs = Delivery(delivered), IncomingMessage(delivered, no_ack=False)
            for field in FIELDS:
                assert getattr(ours, field) == getattr(theirs, field), field
            await ours.ack()
    finally:
        await conn.close()


async def test_settles_once_and_nack_requeues(broker_url: str) -> None:
    conn, got = await _deliveries(broker_url, [aio_pika.Message(b"x", message_id="m")], 1)
    try:
        first = Delivery(await asyncio.wait_for(got.get(), 10))
        assert first.redelivered is False
        await first.nack(requeue=True)
        with pytest.raises(AlreadySettled):
            await first.ack()
        delivered = await asyncio.wait_for(got.get(), 10)
        again = Delivery(delivered)
        assert (again.redelivered, again.message_id, again.body) == (True, "m", b"x")
        await again.ack()
        with pytest.raises(AlreadySettled):
            await again.nack()
        # A marker published on the same channel after the settles: the broker handles them
        # first, so a copy they requeued would come before the marker, and one left unacked
        # would hold the marker back (prefetch 1).
        await delivered.channel.basic_publish(b"marker", routing_key="t.delivery")
        marker = Delivery(await asyncio.wait_for(got.get(), 10))
        assert (marker.redelivered, marker.body) == (False, b"marker")
        await marker.ack()
        assert got.empty()
        # an ack leaves without waiting for the writer: a round trip on the channel returns
        # once the broker has read it, before the connection closes
        await delivered.channel.basic_qos(prefetch_count=1)
    finally:
        await conn.close()
    async with await aio_pika.connect(broker_url) as check:
        queue = await (await check.channel()).declare_queue("t.delivery", durable=True)
        assert queue.declaration_result.message_count == 0


def _settled_at_least(daemon: Daemon, k: int) -> bool:
    return daemon.status().tasks_done >= k


async def test_every_ack_reaches_the_broker_before_the_daemon_stops(broker_url: str) -> None:
    """Acks are queued without waiting for the write; stopping right after the last delivery
    settled must still leave nothing to redeliver."""
    from mlpipe.contract.models import TaskType, build_task
    from mlpipe.handlers import HandlerResult, Registry
    from mlpipe.producer import Producer
    from mlpipe.settings import QueueTuning, Settings
    from mlpipe.testing import running_daemon, wait_for

    settings = Settings(broker_url=broker_url, http_port=0,
                        queues={"embed": QueueTuning(prefetch=128, concurrency=128)})
    registry = Registry()

    async def handle(task: object, ctx: object) -> HandlerResult:
        return HandlerResult({})

    registry.register(TaskType.EMBED_VECTORS, handle)
    n = 2000
    async with Producer(settings) as p:
        await asyncio.gather(*(p.publish(build_task(TaskType.EMBED_VECTORS, f"s-{i}",
                                                    {"content": {"text": "t"}}))
                               for i in range(n)))
    for _ in range(3):
        async with running_daemon(settings, registry, "embed") as daemon:
            await wait_for(lambda: daemon.status().tasks_done > 0, timeout=30,
                           interval=0.0005, message="consuming")
            await wait_for(functools.partial(_settled_at_least, daemon, n // 3), timeout=30,
                           interval=0.0005, message="a third settled")
        # stopped in the middle of a stream of acks: what settled was acked, the rest is back
        settled = daemon.status().tasks_done
        async with await aio_pika.connect(broker_url) as conn:
            queue = await (await conn.channel()).declare_queue("ml.embed", passive=True)
            left = queue.declaration_result.message_count
        assert left == n - settled, (left, n, settled)
        n = left
