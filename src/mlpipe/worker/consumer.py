"""Consuming one queue: flow control, in-flight bookkeeping and draining.

Each delivery runs in a task owned by this consumer (not by the AMQP channel), so that losing
the connection does not cancel a half-done handler: it finishes, stores its result, and the
redelivered copy is then short-circuited by the effects layer. ``prefetch`` bounds how many
deliveries the broker pushes ahead; ``concurrency`` bounds how many handlers run.

The per-delivery path is the daemon's hot path (``make bench``, workload 1). It subscribes
through aiormq's ``basic_consume`` so a delivery costs two tasks (aiormq's, which only wraps
the message, and ours) instead of three; it wraps a delivery in a ``Delivery``, which reads
message properties when asked, not in aio-pika's ``IncomingMessage``, which converts them all;
it settles without a shielding task (``drain`` never cancels a delivery that is settling);
and it uses metric children resolved once per label set instead of a ``labels()`` lookup per
delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiormq.abc
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.abc import DeliveredMessage
from prometheus_client import Counter, Histogram

from mlpipe.broker.topology import WorkQueue
from mlpipe.observability.metrics import Metrics
from mlpipe.settings import QueueTuning
from mlpipe.worker.delivery import Delivery, InboundMessage
from mlpipe.worker.outcome import (
    DeadLetter,
    DeliveryProcessor,
    Processed,
    Requeue,
    Retry,
    Skip,
)
from mlpipe.worker.settle import Settler

#: The outcome of a delivery handed back unsettled (shutdown).
REQUEUE = Requeue()

log = structlog.get_logger(__name__)


class QueueConsumer:
    def __init__(self, work_queue: WorkQueue, queue_name: str, tuning: QueueTuning,
                 processor: DeliveryProcessor, settler: Settler,
                 on_settled: Callable[[], None], metrics: Metrics) -> None:
        self.work_queue = work_queue
        self.queue_name = queue_name
        self._tuning = tuning
        self._processor = processor
        self._settler = settler
        self._on_settled = on_settled
        self._metrics = metrics
        self._slots = asyncio.Semaphore(tuning.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        #: Deliveries past their handler, being acked/retried/dead-lettered: never cancelled.
        self._settling: set[asyncio.Task[None]] = set()
        #: (task_type, outcome) -> (tasks counter, duration histogram) children.
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._queue: AbstractQueue | None = None
        #: aiormq's channel under ``_queue``, flushed by ``drain``.
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self._accepting = False
        #: Deliveries whose handler has started and not yet settled.
        self.running = 0
        #: Deliveries received since the current subscription started.
        self.received = 0

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def consuming(self) -> bool:
        return self._tag is not None and self._accepting

    async def subscribe(self, channel: AbstractChannel) -> None:
        """Start consuming on a fresh channel (called on every (re)connect)."""
        await channel.set_qos(prefetch_count=self._tuning.prefetch)
        self._queue = await channel.get_queue(self.queue_name, ensure=False)
        self._accepting = True
        underlay = self._channel = await channel.get_underlay_channel()
        ok = await underlay.basic_consume(self.queue_name, self._deliver, no_ack=False)
        self._tag = ok.consumer_tag
        log.info("consumer.subscribed", queue=self.queue_name, prefetch=self._tuning.prefetch,
                 concurrency=self._tuning.concurrency)

    def forget_subscription(self) -> None:
        """The channel is gone (connection lost); in-flight tasks carry on."""
        self._queue, self._tag, self._channel = None, None, None

    def halt(self) -> None:
        """Start no more handlers from now on (synchronous, so no waiting delivery can slip
        into a slot between the stop request and the drain)."""
        self._accepting = False

    async def stop_accepting(self) -> None:
        """Cancel the subscription so the broker sends nothing more; deliveries that still
        arrive, and those waiting for a handler slot, are requeued."""
        self.halt()
        queue, tag = self._queue, self._tag
        self._tag = None
        if queue is not None and tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(queue.cancel(tag), timeout=5)

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for in-flight deliveries; cancel the rest (their messages
        go back to the queue). Returns how many were cancelled. A delivery already settling
        is not cancelled (its ack, or its retry publish and ack, must not be cut in half): it
        gets the same 10 s as the cancelled ones to finish."""
        cancelled: list[asyncio.Task[None]] = []
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            cancelled = [task for task in pending if task not in self._settling]
            for task in cancelled:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        await self._flush_acks()
        return len(cancelled)

    async def _flush_acks(self) -> None:
        """Acks leave without waiting for the connection's writer (``Delivery.ack``): a round
        trip on the channel (``basic.qos`` with the same prefetch, which changes nothing) after
        the last of them returns only once the broker has read everything sent before it, so
        the connection can close next without dropping an ack still queued for the writer."""
        channel = self._channel
        if channel is None or channel.is_closed:
            return  # the broker requeues what was not acked on a closed channel
        with contextlib.suppress(Exception):
            await asyncio.wait_for(channel.basic_qos(prefetch_count=self._tuning.prefetch),
                                   timeout=5)

    # --- per delivery -----------------------------------------------------------------------

    async def _deliver(self, delivered: DeliveredMessage) -> None:
        """aiormq's consumer callback, run in a task the channel cancels when it closes: it
        only wraps the delivery (in a ``Delivery``, not aio-pika's costlier
        ``IncomingMessage``) and starts our task."""
        self._on_message(Delivery(delivered))

    def _on_message(self, message: InboundMessage) -> None:
        self.received += 1
        task = asyncio.create_task(self._run(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, message: InboundMessage) -> None:
        if not self._accepting:
            await self._settler.settle(message, REQUEUE, self.queue_name)
            return
        async with self._slots:
            if not self._accepting:
                await self._settler.settle(message, REQUEUE, self.queue_name)
                return
            self.running += 1  # the in-flight gauge reads this when scraped
            started = time.monotonic()
            try:
                done = await self._processor.process(message, self.queue_name)
            except asyncio.CancelledError:
                # Shutdown ran out of grace: hand the delivery back, shielded so the nack is
                # sent even though this task is being cancelled.
                await asyncio.shield(self._settler.settle(message, REQUEUE, self.queue_name))
                self._metrics.tasks.labels("unknown", self.queue_name, REQUEUE.label).inc()
                raise
            finally:
                self.running -= 1
            me = asyncio.current_task()
            assert me is not None
            self._settling.add(me)
            try:
                await self._settler.settle(message, done, self.queue_name)
            finally:
                self._settling.discard(me)
            self._record(done, time.monotonic() - started)
        self._on_settled()

    def _record(self, done: Processed, seconds: float) -> None:
        m, tt, outcome = self._metrics, done.task_type, done.outcome
        kind = outcome.label
        children = self._children.get((tt, kind))
        if children is None:
            children = (m.tasks.labels(tt, self.queue_name, kind),
                        m.duration.labels(tt, self.queue_name))
            self._children[(tt, kind)] = children
        children[0].inc()
        children[1].observe(seconds)
        if isinstance(outcome, Retry):
            m.retries.labels(tt, outcome.reason).inc()
        elif isinstance(outcome, DeadLetter):
            m.dead_letters.labels(tt, outcome.reason).inc()
        elif isinstance(outcome, Skip):
            m.skipped.labels(tt, outcome.reason).inc()
        if done.result is not None:
            for cost in done.result.costs:
                m.cost.labels(tt, cost.model).inc(float(cost.usd))
                m.units.labels(tt, cost.unit_kind).inc(cost.units)
