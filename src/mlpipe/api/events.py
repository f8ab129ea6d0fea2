"""Result events for HTTP clients: the ``mlpipe.events`` exchange, one exclusive queue per
client, a bounded buffer, and a short memory for ``Last-Event-ID``.

Each subscriber gets its own channel and a server-named, exclusive, auto-deleted queue bound
to ``ml.result.<taskType>`` (or ``ml.result.#``); the broker does the task-type filtering and
the share filter is applied here. The queue itself is capped (``x-max-length``, oldest
dropped) so a stalled client cannot grow the broker either. Deliveries are acked once they
are in the client's buffer (``buffer`` events, also the channel's prefetch); when the buffer
is full the client is too slow and is cut off (``Subscription.dropped``): it may reconnect
with ``Last-Event-ID``.

Event ids are the AMQP ``message_id`` of the event messages (the daemon sets one on every
event, and the outbox re-publishes a held event under the same id). The hub remembers the
last ``memory`` events of every type in one more queue of its own; a reconnecting client
whose ``Last-Event-ID`` is still remembered first gets the events after it (matching its
filters), then the live ones, without duplicates. An id no longer remembered (older, or
before this server started) cannot be honoured: the stream starts live with a ``gap``
event, so the client knows to re-read state (``/v1/shares/{shareId}/results``). An event
published in the few milliseconds between a client's queue binding and the memory's own
delivery can still be missed on a resumed stream; a fresh stream has no such window.

One broker connection serves every subscriber, opened on first use: a server whose broker is
down still answers everything else, and ``/v1/events`` answers 503 until it is back. When the
connection drops, every stream ends; clients reconnect (an EventSource does by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    ExchangeType,
)

from mlpipe.broker.connection import connect_any

log = structlog.get_logger("mlpipe.api.events")

#: Events held per client between the broker and its socket before it counts as too slow.
DEFAULT_BUFFER = 256
#: Events remembered for ``Last-Event-ID``.
DEFAULT_MEMORY = 1000
#: Cap of a client's broker queue (beyond the buffer), oldest dropped.
QUEUE_CAP = 1000


@dataclass(frozen=True)
class Event:
    id: str
    status: str
    task_type: str
    share_id: str
    data: str

    def frame(self) -> bytes:
        return (f"id: {self.id}\nevent: {self.status}\ndata: {self.data}\n\n").encode()


def decode(message: AbstractIncomingMessage) -> Event | None:
    """An event message as an SSE event; ``None`` for a body that is not an event."""
    try:
        body = json.loads(message.body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    status, task_type, share_id = (body.get(k) for k in ("status", "taskType", "shareId"))
    if not all(isinstance(v, str) for v in (status, task_type, share_id)):
        return None
    event_id = message.message_id or f"{share_id}:{task_type}:{body.get('occurredAt')}"
    return Event(event_id, str(status), str(task_type), str(share_id),
                 json.dumps(body, separators=(",", ":"), ensure_ascii=False))


@dataclass(eq=False)  # held in a set: identity, not value
class Subscription:
    share_id: str | None
    task_type: str | None
    buffer: asyncio.Queue[Event]
    #: Set when the client fell ``buffer`` events behind, or the broker connection dropped.
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""
    #: Events sent from the memory on resume, skipped when the live queue repeats them.
    replayed: set[str] = field(default_factory=set)
    #: The resumed-from id was not remembered.
    gap: bool = False

    def wants(self, event: Event) -> bool:
        return ((self.share_id is None or event.share_id == self.share_id)
                and (self.task_type is None or event.task_type == self.task_type))

    def offer(self, event: Event) -> None:
        if self.wants(event) and event.id not in self.replayed:
            self.push(event)

    def push(self, event: Event) -> None:
        try:
            self.buffer.put_nowait(event)
        except asyncio.QueueFull:
            self.drop("too slow: the event buffer is full")

    def drop(self, why: str) -> None:
        if not self.dropped.is_set():
            self.why = why
            self.dropped.set()


class EventHub:
    """Subscriptions to the events exchange ``exchange`` on the broker at ``broker_url``."""

    def __init__(self, broker_url: str, exchange: str, *, buffer: int = DEFAULT_BUFFER,
                 memory: int = DEFAULT_MEMORY) -> None:
        self._url = broker_url
        self._exchange = exchange
        self._buffer = buffer
        self._memory: deque[Event] = deque(maxlen=memory)
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._subscriptions: set[Subscription] = set()
        self._closed = False

    async def connection(self) -> AbstractConnection:
        """The shared connection, opened (with the memory's queue) when there is none."""
        async with self._lock:
            if self._closed:
                raise ConnectionError("the event hub is closed")
            if self._conn is None or self._conn.is_closed:
                conn = await connect_any(self._url, name="mlpipe-api-events")
                conn.close_callbacks.add(self._on_close)
                try:
                    await self._remember(await conn.channel())
                except BaseException:
                    await conn.close()
                    raise
                self._conn = conn
            return self._conn

    def remembered(self, share_id: str) -> list[dict[str, Any]]:
        """The remembered events of one share (a share's timeline), oldest first."""
        return [json.loads(e.data) for e in self._memory if e.share_id == share_id]

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    async def _remember(self, channel: AbstractChannel) -> None:
        # as ``mlpipe topology`` declares it (idempotent): the API may start before any daemon
        await channel.declare_exchange(self._exchange, ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True,
                                            arguments={"x-max-length": QUEUE_CAP})
        await queue.bind(self._exchange, routing_key="ml.result.#")

        async def keep(message: AbstractIncomingMessage) -> None:
            event = decode(message)
            if event is not None:
                self._memory.append(event)

        await queue.consume(keep, no_ack=True)

    def _on_close(self, *_args: Any) -> None:
        self._conn = None
        for sub in list(self._subscriptions):
            sub.drop("the broker connection closed")

    @contextlib.asynccontextmanager
    async def subscribe(self, *, share_id: str | None = None, task_type: str | None = None,
                        last_event_id: str | None = None) -> AsyncIterator[Subscription]:
        conn = await self.connection()
        sub = Subscription(share_id, task_type, asyncio.Queue(self._buffer))
        channel = await conn.channel()
        try:
            await channel.set_qos(prefetch_count=self._buffer)
            queue = await channel.declare_queue(
                "", exclusive=True, auto_delete=True,
                arguments={"x-max-length": QUEUE_CAP, "x-overflow": "drop-head"})
            await queue.bind(self._exchange, routing_key=f"ml.result.{task_type or '#'}")

            async def deliver(message: AbstractIncomingMessage) -> None:
                event = decode(message)
                if event is not None:
                    sub.offer(event)
                await message.ack()

            self._subscriptions.add(sub)
            await queue.consume(deliver)
            if last_event_id:
                self._resume(sub, last_event_id)
            yield sub
        finally:
            self._subscriptions.discard(sub)
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()

    def _resume(self, sub: Subscription, last_event_id: str) -> None:
        remembered = list(self._memory)
        ids = [e.id for e in remembered]
        if last_event_id not in ids:
            sub.gap = True
            return
        after = remembered[ids.index(last_event_id) + 1:]
        wanted = [e for e in after if sub.wants(e)]
        pending = [sub.buffer.get_nowait() for _ in range(sub.buffer.qsize())]
        for event in wanted:
            sub.replayed.add(event.id)
            sub.push(event)
        for event in pending:
            if event.id not in sub.replayed:
                sub.offer(event)

    async def close(self) -> None:
        """End every stream and close the connection."""
        async with self._lock:
            self._closed = True
            for sub in list(self._subscriptions):
                sub.drop("the server is stopping")
            conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed:
            await conn.close()
