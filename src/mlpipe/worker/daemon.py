"""The daemon object: consumes the chosen queues until asked to stop, then drains.

It can be embedded and tested in-process: it installs no signal handlers and never exits the
process (``mlpipe.cli`` does both). Ownership, which is also the shutdown order:

1. the consumer ``BrokerConnection`` (its supervisor restores channels and subscriptions on
   every reconnect, so handlers never see one);
2. one channel per queue, each with its ``QueueConsumer`` and in-flight tasks;
3. the ``Producer`` (a separate connection: publishing retries and dead-letters must not be
   throttled together with consuming) used by the ``Settler``.

Stop: cancel subscriptions -> requeue deliveries not yet started -> wait for running handlers
up to ``shutdown_grace_s`` -> cancel the rest (requeued) -> close consumer connection -> close
the producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

import structlog
from aio_pika.abc import AbstractConnection

from mlpipe.broker.connection import Backoff, BrokerConnection
from mlpipe.broker.topology import WorkQueue, declare
from mlpipe.execution import DirectExecutor, Executor, Runtime
from mlpipe.handlers import METRICS_RESOURCE, Registry
from mlpipe.observability.http import HealthServer, ReadinessCheck
from mlpipe.observability.metrics import Metrics
from mlpipe.producer import Producer
from mlpipe.settings import QueueTuning, Settings
from mlpipe.worker.consumer import QueueConsumer
from mlpipe.worker.process import Processor
from mlpipe.worker.recycle import Recycler
from mlpipe.worker.settle import Settler

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DaemonStatus:
    connected: bool
    consuming: dict[str, bool]
    in_flight: dict[str, int]
    tasks_done: int
    reconnects: int
    stopping: bool


class Daemon:
    """Consume ``queues`` with handlers from ``registry``.

    :param settings: the one settings object.
    :param registry: task type -> handler.
    :param queues: work queues to consume (``topology.parse_queue_names``).
    :param executor: how a handler's effects are made durable; defaults to running the handler
        with no persistence (the effects executor adds locks, results and budgets).
    :param resources: shared objects handed to handlers through ``TaskContext.resources``.
    """

    def __init__(self, settings: Settings, registry: Registry, queues: Sequence[WorkQueue], *,
                 executor: Executor | None = None, resources: dict[str, Any] | None = None,
                 name: str | None = None,
                 readiness: dict[str, ReadinessCheck] | None = None) -> None:
        if not queues:
            raise ValueError("a daemon needs at least one queue")
        self.settings = settings
        ident = name or f"mlpipe-worker@{socket.gethostname()}:{os.getpid()}"
        self.producer = Producer(settings, name=f"{ident}/publish")
        self.topology = self.producer.topology
        self._registry = registry
        self.resources: dict[str, Any] = dict(resources or {})
        self._resource_stack = contextlib.AsyncExitStack()
        self.metrics = Metrics()
        self.resources.setdefault(METRICS_RESOURCE, self.metrics)
        executor = executor or DirectExecutor(settings)
        bindings = executor.bind(Runtime(self.producer, self.metrics, registry.workflows))
        self._settler = Settler(self.producer, self.topology, bindings.on_dead_letter)
        self._background_loops = bindings.background
        self._background: list[asyncio.Task[None]] = []
        self._processor = Processor(settings, registry, executor, self.resources)
        self._recycler = Recycler(settings.max_tasks, settings.max_rss_mb)
        self._queues = list(queues)
        self.consumers = [
            QueueConsumer(q, self.topology.queue_name(q), settings.tuning(q.short_name),
                          self._processor, self._settler, self._on_settled, self.metrics)
            for q in queues
        ]
        for name, processor in bindings.control_processors.items():
            self.consumers.append(QueueConsumer(
                WorkQueue(name, ()), name, QueueTuning(prefetch=16, concurrency=4),
                processor, self._settler, self._on_settled, self.metrics))
        self.http: HealthServer | None = None
        if settings.http_port >= 0:
            self.http = HealthServer(self.metrics, lambda: asdict(self.status()),
                                     host=settings.http_host, port=settings.http_port,
                                     checks=readiness, refresh=self._refresh_metrics,
                                     collect=bindings.collect_metrics)
        self._conn = BrokerConnection(
            settings.broker_url, name=f"{ident}/consume", on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            backoff=Backoff(settings.reconnect_base_s, settings.reconnect_max_s),
        )
        self._stop_requested = asyncio.Event()
        self.stop_reason: str | None = None
        self._stopped = False

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float | None = 60.0) -> Self:
        try:
            for name, factory in self._registry.resources.items():
                self.resources[name] = await self._resource_stack.enter_async_context(factory())
            if self.http is not None:
                await self.http.start()
            await self.producer.start(timeout=timeout)
            await self._conn.start(wait=True, timeout=timeout)
            self._background = [asyncio.create_task(loop()) for loop in self._background_loops]
        except BaseException:
            await self.producer.close()
            if self.http is not None:
                await self.http.close()
            await self._resource_stack.aclose()
            raise
        log.info("daemon.started", queues=[c.queue_name for c in self.consumers],
                 http_port=self.http.port if self.http else None)
        return self

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the daemon to drain and stop; safe to call from a signal handler."""
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("daemon.stop_requested", reason=reason)
        for consumer in self.consumers:
            consumer.halt()
        self._stop_requested.set()

    async def wait_stop_requested(self) -> str:
        await self._stop_requested.wait()
        return self.stop_reason or "requested"

    async def stop(self) -> None:
        """Drain within the grace period and close everything. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.request_stop(self.stop_reason or "stop")
        await asyncio.gather(*(c.stop_accepting() for c in self.consumers))
        grace = self.settings.shutdown_grace_s
        cancelled = sum(await asyncio.gather(*(c.drain(grace) for c in self.consumers)))
        if cancelled:
            log.warning("daemon.drain_cancelled", cancelled=cancelled, grace_s=grace)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._conn.close()
        await self.producer.close()
        if self.http is not None:
            await self.http.close()
        await self._resource_stack.aclose()
        log.info("daemon.stopped", reason=self.stop_reason, tasks_done=self._recycler.tasks_done)

    async def run(self) -> str:
        """Start, consume until a stop is requested, drain; return the stop reason."""
        await self.start()
        try:
            return await self.wait_stop_requested()
        finally:
            await asyncio.shield(self.stop())

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # --- status -----------------------------------------------------------------------------

    def status(self) -> DaemonStatus:
        return DaemonStatus(
            connected=self._conn.is_connected and self.producer.status().state == "connected",
            consuming={c.queue_name: c.consuming for c in self.consumers},
            in_flight={c.queue_name: c.in_flight for c in self.consumers},
            tasks_done=self._recycler.tasks_done,
            reconnects=self._conn.reconnects,
            stopping=self._stop_requested.is_set(),
        )

    def _refresh_metrics(self) -> None:
        """Gauges that mirror state are read when Prometheus scrapes, not kept in sync."""
        m, st, ps = self.metrics, self.status(), self.producer.status()
        m.connected.labels("consume").set(int(self._conn.is_connected))
        m.connected.labels("publish").set(int(ps.state == "connected"))
        m.reconnects.labels("consume").set(self._conn.reconnects)
        m.reconnects.labels("publish").set(ps.reconnects)
        for queue, consuming in st.consuming.items():
            m.consuming.labels(queue).set(int(consuming))
        for consumer in self.consumers:
            m.in_flight.labels(consumer.queue_name).set(consumer.running)
        m.publish_buffer.set(ps.buffered)
        m.pending_confirms.set(ps.pending_confirms)
        m.confirm_timeouts.set(ps.confirm_timeouts)
        m.circuit_open.set(int(ps.circuit == "open"))

    # --- connection hooks -------------------------------------------------------------------

    async def _on_connect(self, conn: AbstractConnection) -> None:
        async with conn.channel() as setup:
            await declare(setup, self.topology, adopt=self.settings.adopt_existing_queues)
        if self._stop_requested.is_set():
            return
        for consumer in self.consumers:
            channel = await conn.channel()
            channel.close_callbacks.add(self._on_channel_close)
            await consumer.subscribe(channel)

    def _on_channel_close(self, _ch: Any, exc: BaseException | None = None) -> None:
        if exc is not None and not self._stop_requested.is_set():
            self._conn.request_reconnect(f"consumer channel closed: {exc}")

    def _on_disconnect(self, _exc: BaseException | None) -> None:
        for consumer in self.consumers:
            consumer.forget_subscription()

    def _on_settled(self) -> None:
        reason = self._recycler.settled()
        if reason is not None and not self._stop_requested.is_set():
            log.info("daemon.recycling", reason=reason, tasks_done=self._recycler.tasks_done)
            self.request_stop(reason)
