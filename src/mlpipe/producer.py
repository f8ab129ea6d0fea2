"""The async producer: publish contract-v1 tasks so that each one is confirmed or raised.

Guarantees, in the order a publish meets them:

* **circuit breaker**: after ``circuit_failure_threshold`` consecutive failed connection
  attempts, ``publish`` raises ``CircuitOpen`` at once instead of queueing behind a dead broker;
  the first successful reconnect closes the circuit again;
* **bounded retry buffer**: while the connection is down a publish waits (in FIFO order) for
  the reconnect; at most ``publish_buffer_size`` may wait, one more raises ``BufferFull``;
* **confirms**: a publish returns only after the broker's ack; a nack raises
  ``PublishNacked`` (and the next publishes go out on a fresh connection, see
  ``NACK_RESET_INTERVAL_S``), a return of a ``mandatory`` message (no queue bound) raises
  ``Unroutable``, no confirm within ``confirm_timeout_s`` raises ``PublishTimeout``;
* **connection loss mid-publish**: the message is published again after the reconnect (the
  broker may then hold it twice; consumers are idempotent by ``(shareId, taskType)``).

Nothing is ever dropped silently: the caller gets a receipt or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from mlpipe.broker.connection import Backoff, BrokerConnection
from mlpipe.broker.topology import Topology, declare, delay_tiers, routing_key_for
from mlpipe.contract.codec import encode
from mlpipe.contract.models import Task
from mlpipe.errors import (
    BufferFull,
    CircuitOpen,
    PublishError,
    PublishNacked,
    PublishTimeout,
    Unroutable,
)
from mlpipe.settings import Settings

log = structlog.get_logger(__name__)

#: After a nack, the publish connection is replaced, at most this often. A nack is the
#: broker refusing to take the message (a full queue with ``reject-publish``, a queue without a
#: reachable leader). RabbitMQ 3.10 also leaves a channel opened while a quorum queue's new
#: leader is being elected nacking every later publish to that queue, for good
#: (``tests/integration/test_cluster.py``, ``all_on_the_leader``: without the reset 2 runs in 3
#: saw no publish confirmed for 90 s; with it, flowing again within a second): a caller who
#: publishes again must get a fresh channel, not the same refusal. Often enough that such a
#: channel is gone before a caller's few retries are; rare enough that a producer hammering a
#: full queue reconnects four times a second at most.
NACK_RESET_INTERVAL_S = 0.25

_CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    OSError,
)


@dataclass(frozen=True)
class PublishReceipt:
    message_id: str
    routing_key: str
    exchange: str
    #: Seconds from the call to the broker's confirm, outage included.
    latency_s: float
    #: How many times the message was written to the broker (>1 after a connection loss).
    attempts: int


@dataclass(frozen=True)
class ProducerStatus:
    state: str
    circuit: str
    reconnect_attempts: int
    reconnects: int
    buffered: int
    pending_confirms: int
    confirm_timeouts: int
    last_error: str | None
    #: ``host:port`` of the broker node the producer is connected to (None while down).
    host: str | None = None


def topology_from(settings: Settings) -> Topology:
    retry = settings.retry
    tiers = set(delay_tiers(retry.base_delay_s, retry.max_delay_s, retry.max_retries))
    tiers.add(round(settings.workflow_timeout_s * 1000))
    return Topology(
        namespace=settings.namespace,
        delivery_limit=settings.delivery_limit,
        delay_tiers_ms=tuple(sorted(tiers)),
    )


def task_message(task: Task, *, message_id: str | None = None,
                 headers: dict[str, Any] | None = None) -> aio_pika.Message:
    """The AMQP message for a task, with the properties the contract requires."""
    hdrs: dict[str, Any] = dict(headers or {})
    if task.metadata.traceparent:
        hdrs.setdefault("traceparent", task.metadata.traceparent)
    return aio_pika.Message(
        body=encode(task),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id or uuid.uuid4().hex,
        correlation_id=task.metadata.correlation_id,
        timestamp=int(task.metadata.timestamp),
        headers=hdrs,
    )


class Producer:
    """Publishes tasks (and, for the daemon, retries and dead-letters) with confirms.

    Use ``async with Producer(settings) as p: await p.publish(task)``, or ``start()`` and
    ``close()`` explicitly. ``declare_topology`` makes the producer declare the exchanges and
    queues on each connect, so a first publish cannot be unroutable just because no daemon
    ran yet.
    """

    def __init__(self, settings: Settings | None = None, *, name: str = "mlpipe-producer",
                 declare_topology: bool = True, topology: Topology | None = None) -> None:
        self._settings = settings or Settings()
        self.topology = topology or topology_from(self._settings)
        self._declare_topology = declare_topology
        self._conn = BrokerConnection(
            self._settings.broker_url,
            name=name,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            backoff=Backoff(self._settings.reconnect_base_s, self._settings.reconnect_max_s),
        )
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[tuple[int, str], AbstractExchange] = {}
        self._ready = asyncio.Event()
        self._closed = False
        self._buffered = 0
        self._pending = 0
        self.confirm_timeouts = 0
        #: Connections replaced after a nack (``NACK_RESET_INTERVAL_S``).
        self.nack_resets = 0
        self._nack_reset_at = -NACK_RESET_INTERVAL_S

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self, *, timeout: float | None = 30.0) -> Self:
        """Connect (waiting up to ``timeout``) and declare the topology."""
        await self._conn.start(wait=True, timeout=timeout)
        return self

    async def close(self) -> None:
        self._closed = True
        self._ready.set()  # wake buffered publishes so they raise instead of hanging
        await self._conn.close()
        self._channel = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _on_connect(self, conn: AbstractConnection) -> None:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        if self._declare_topology:
            await declare(channel, self.topology, adopt=self._settings.adopt_existing_queues)
        self._channel = channel
        self._exchanges = {}
        channel.close_callbacks.add(self._on_channel_close)
        self._ready.set()

    def _on_disconnect(self, _exc: BaseException | None) -> None:
        self._ready.clear()
        self._channel = None

    def _on_channel_close(self, ch: Any, exc: BaseException | None = None) -> None:
        if ch is not self._channel:
            return  # an old channel, already given up on (see _wait_channel)
        self._ready.clear()
        self._channel = None
        if not self._closed:
            self._conn.request_reconnect(f"publisher channel closed: {exc}")

    def _after_nack(self, channel: AbstractChannel) -> None:
        """Replace the publish connection after a nack (see ``NACK_RESET_INTERVAL_S``)."""
        now = time.monotonic()
        if channel is not self._channel or now - self._nack_reset_at < NACK_RESET_INTERVAL_S:
            return
        self._nack_reset_at = now
        self.nack_resets += 1
        log.warning("producer.nacked_reconnecting", host=self._conn.host)
        self._ready.clear()
        self._channel = None
        self._conn.request_reconnect("publish nacked: a fresh channel for the next publishes")

    # --- status -----------------------------------------------------------------------------

    @property
    def circuit_open(self) -> bool:
        return self._conn.failed_attempts >= self._settings.circuit_failure_threshold

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Until the publish connection is up; ``TimeoutError`` after ``timeout``."""
        await self._conn.wait_connected(timeout)

    def status(self) -> ProducerStatus:
        return ProducerStatus(
            state=str(self._conn.state),
            circuit="open" if self.circuit_open else "closed",
            reconnect_attempts=self._conn.failed_attempts,
            reconnects=self._conn.reconnects,
            buffered=self._buffered,
            pending_confirms=self._pending,
            confirm_timeouts=self.confirm_timeouts,
            last_error=self._conn.last_error,
            host=self._conn.host,
        )

    # --- publishing -------------------------------------------------------------------------

    async def publish(self, task: Task, *, message_id: str | None = None,
                      headers: dict[str, Any] | None = None) -> PublishReceipt:
        """Publish a task to the tasks exchange, routed by its task type and backend."""
        message = task_message(task, message_id=message_id, headers=headers)
        return await self.publish_message(self.topology.tasks_exchange, routing_key_for(task),
                                          message)

    async def publish_message(self, exchange: str, routing_key: str,
                              message: aio_pika.Message, *,
                              mandatory: bool = True) -> PublishReceipt:
        """Publish any message with the producer's guarantees (used for retries, dead-letters
        and events as well as tasks). ``mandatory=False`` is for events, which nobody may be
        listening to: the broker still confirms them."""
        started = time.monotonic()
        deadline = started + self._settings.publish_timeout_s
        attempts = 0
        slot = _Slot(self)  # left in ``finally``: a plain try costs less than a context manager
        try:
            while True:
                channel = self._channel
                if (channel is None or self._closed or not self._ready.is_set()
                        or channel.is_closed):  # else what _wait_channel would return at once
                    channel = await self._wait_channel(deadline, slot)
                attempts += 1
                self._pending += 1
                try:
                    ex = (self._exchanges.get((id(channel), exchange))
                          or await self._exchange(channel, exchange))
                    remaining = max(0.001, deadline - time.monotonic())
                    await ex.publish(message, routing_key, mandatory=mandatory,
                                     timeout=min(self._settings.confirm_timeout_s, remaining))
                except TimeoutError:
                    self.confirm_timeouts += 1
                    raise PublishTimeout(
                        f"no confirm for {message.message_id} within "
                        f"{self._settings.confirm_timeout_s}s"
                    ) from None
                except aiormq.exceptions.PublishError as exc:
                    raise Unroutable(
                        f"no queue bound to {exchange!r} for routing key {routing_key!r}"
                    ) from exc
                except aiormq.exceptions.DeliveryError as exc:
                    self._after_nack(channel)
                    raise PublishNacked(f"broker refused {message.message_id}: {exc}") from exc
                except _CONNECTION_ERRORS as exc:
                    log.info("producer.publish_interrupted", error=repr(exc),
                             message_id=message.message_id)
                    if self._channel is channel:
                        self._ready.clear()
                        self._conn.request_reconnect("publish failed on a broken connection")
                    continue
                finally:
                    self._pending -= 1
                return PublishReceipt(
                    message_id=str(message.message_id), routing_key=routing_key,
                    exchange=exchange, latency_s=time.monotonic() - started, attempts=attempts,
                )
        finally:
            slot.leave()

    async def _wait_channel(self, deadline: float, slot: _Slot) -> AbstractChannel:
        while True:
            if self._closed:
                raise PublishError("producer is closed")
            channel = self._channel
            if channel is not None and self._ready.is_set() and not channel.is_closed:
                slot.leave()
                return channel
            if self.circuit_open:
                raise CircuitOpen(
                    f"broker unreachable after {self._conn.failed_attempts} attempts: "
                    f"{self._conn.last_error}"
                )
            slot.enter()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PublishTimeout("broker unreachable for the whole publish timeout")
            if self._ready.is_set() and not self._closed:
                # "Ready" on a channel that is already closed: the connection died and its close
                # callbacks have not run yet. ``_ready.wait()`` would return at once and this
                # loop would spin without ever yielding, starving those very callbacks (and
                # every other task: lock renewals, heartbeats) until the publish deadline.
                self._ready.clear()
                self._channel = None
                self._conn.request_reconnect("publisher channel found closed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self._ready.wait()

    async def _exchange(self, channel: AbstractChannel, name: str) -> AbstractExchange:
        key = (id(channel), name)
        ex = self._exchanges.get(key)
        if ex is None:
            ex = (await channel.get_exchange(name, ensure=False) if name
                  else channel.default_exchange)
            self._exchanges[key] = ex
        return ex


class _Slot:
    """A publish's place in the retry buffer while it waits for a connection."""

    def __init__(self, producer: Producer) -> None:
        self._p = producer
        self._in = False

    def enter(self) -> None:
        if self._in:
            return
        if self._p._buffered >= self._p._settings.publish_buffer_size:
            raise BufferFull(
                f"retry buffer full ({self._p._buffered} publishes waiting for the broker)"
            )
        self._p._buffered += 1
        self._in = True

    def leave(self) -> None:
        if self._in:
            self._p._buffered -= 1
            self._in = False
