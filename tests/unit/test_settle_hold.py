"""A delivery whose retry or dead-letter publish failed is held until the publisher is back
(and at least a moment), not requeued at once: after a broker restart the consume side can
be back before the publish side, and immediate requeues would use up the quorum queue's
delivery limit within seconds (found by ``make chaos``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika

from mlpipe.broker.topology import Topology
from mlpipe.errors import PublishError
from mlpipe.worker import settle
from mlpipe.worker.outcome import Retry
from mlpipe.worker.settle import Settler


class Publisher:
    """The producer's side of settling: publishes fail until ``back`` is set."""

    def __init__(self) -> None:
        self.back = asyncio.Event()
        self.attempts = 0

    async def publish_message(self, exchange: str, routing_key: str, message: aio_pika.Message,
                              **kwargs: Any) -> None:
        self.attempts += 1
        raise PublishError("broker unreachable")

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self.back.wait()


class Message:
    body = b'{"taskType": "summarize_llm", "shareId": "s", "metadata": {}}'
    headers: dict[str, Any] = {}
    content_type = "application/json"
    content_encoding = None
    message_id = "m-1"
    correlation_id = None
    timestamp = None
    type = None
    app_id = None
    routing_key = "summarize_llm"

    def __init__(self) -> None:
        self.nacked_at: float | None = None

    async def ack(self) -> None:
        raise AssertionError("a delivery whose retry was not published must not be acked")

    async def nack(self, *, requeue: bool = True) -> None:
        assert requeue
        self.nacked_at = time.monotonic()


async def test_a_failed_settle_waits_for_the_publisher_before_requeueing() -> None:
    publisher = Publisher()
    settler = Settler(publisher, Topology())  # type: ignore[arg-type]
    message = Message()
    started = time.monotonic()
    settling = asyncio.create_task(settler.settle(
        message, Retry(1.0, "redis_unavailable", "Redis unavailable"), "ml.summarize"))
    await asyncio.sleep(1.5)
    assert message.nacked_at is None  # held while the publisher is down
    publisher.back.set()
    await settling
    assert message.nacked_at is not None
    assert message.nacked_at - started >= 1.5
    assert publisher.attempts == 1


async def test_the_hold_has_a_floor_and_a_ceiling(monkeypatch: Any) -> None:
    monkeypatch.setattr(settle, "HOLD_FOR_PUBLISHER_S", 0.3)
    publisher = Publisher()
    settler = Settler(publisher, Topology())  # type: ignore[arg-type]
    still_down, back_at_once = Message(), Message()
    started = time.monotonic()
    await settler.settle(still_down, Retry(1.0, "x", "y"), "ml.summarize")  # never back
    assert still_down.nacked_at is not None
    assert still_down.nacked_at - started < settle.MIN_HOLD_S + 1.0
    publisher.back.set()
    started = time.monotonic()
    await settler.settle(back_at_once, Retry(1.0, "x", "y"), "ml.summarize")
    assert back_at_once.nacked_at is not None
    assert back_at_once.nacked_at - started >= settle.MIN_HOLD_S * 0.9
