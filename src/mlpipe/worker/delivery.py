"""One delivery as the worker reads it, without aio-pika's ``IncomingMessage``.

``IncomingMessage`` copies and converts all fourteen message properties on construction, each
through a ``__setattr__`` that checks a lock: ~11 µs per delivery, about a tenth of the whole
no-op consume path (``make bench``, workload 1). The worker reads five of them on the happy
path, so ``Delivery`` keeps aiormq's frame and reads a property when asked, with the same
values ``IncomingMessage`` would give (an empty string reads as None, headers as ``{}``).
Issue 16 re-measured it with ``python -m bench.micro_ab`` against aio-pika's ``queue.consume``
and ``IncomingMessage``: those cost +33 % instructions and +44 % client CPU per no-op message
(paired median), so it stays where the shared timer and the hand-made log renderer went.

The delivery path is typed against ``InboundMessage``, which aio-pika's messages satisfy
too (``dlq`` reuses the settle helpers on messages it fetched with aio-pika).
"""

from __future__ import annotations

import datetime
from typing import Any, Protocol

from aiormq.abc import AbstractChannel, DeliveredMessage

from mlpipe.errors import AlreadySettled


class InboundMessage(Protocol):
    """What the delivery path reads from a message and does with it."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, Any]: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime.datetime | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...

    async def ack(self) -> None: ...
    async def nack(self, *, requeue: bool = True) -> None: ...


class Delivery:
    """A message pushed by ``basic.consume``; ``ack``/``nack`` go to the channel it came on."""

    __slots__ = ("_delivered", "_settled")

    def __init__(self, delivered: DeliveredMessage) -> None:
        self._delivered = delivered
        self._settled = False

    @property
    def body(self) -> bytes:
        return self._delivered.body

    @property
    def headers(self) -> dict[str, Any]:
        return self._delivered.header.properties.headers or {}

    @property
    def content_type(self) -> str | None:
        return self._delivered.header.properties.content_type or None

    @property
    def content_encoding(self) -> str | None:
        return self._delivered.header.properties.content_encoding or None

    @property
    def message_id(self) -> str | None:
        return self._delivered.header.properties.message_id or None

    @property
    def correlation_id(self) -> str | None:
        return self._delivered.header.properties.correlation_id or None

    @property
    def timestamp(self) -> datetime.datetime | None:
        return self._delivered.header.properties.timestamp or None

    @property
    def type(self) -> str | None:
        return self._delivered.header.properties.message_type or None

    @property
    def app_id(self) -> str | None:
        return self._delivered.header.properties.app_id or None

    @property
    def routing_key(self) -> str | None:
        return self._delivered.routing_key

    @property
    def delivery_tag(self) -> int | None:
        return self._delivered.delivery_tag

    @property
    def redelivered(self) -> bool | None:
        return self._delivered.redelivered

    def _target(self) -> tuple[AbstractChannel, int]:
        """The channel and tag to settle with (the channel raises ``ChannelInvalidStateError``
        itself when it is closed)."""
        if self._settled:
            raise AlreadySettled(f"delivery {self.delivery_tag} was already settled")
        channel, tag = self._delivered.channel, self._delivered.delivery_tag
        assert tag is not None  # basic.consume without no_ack: every delivery has a tag
        return channel, tag

    async def ack(self) -> None:
        """Queue the ack for the connection's writer without waiting for it to be written: an
        ack has no reply anyway, and waiting cost a future and a task wake-up per delivery
        (~5 µs, ``make bench``). A closed channel still raises here; ``QueueConsumer.drain``
        flushes before the daemon closes the connection; and if the connection dies before
        the write, the broker redelivers, as for an ack lost on the wire."""
        channel, tag = self._target()
        await channel.basic_ack(tag, wait=False)
        self._settled = True

    async def nack(self, *, requeue: bool = True) -> None:
        channel, tag = self._target()
        await channel.basic_nack(tag, requeue=requeue)
        self._settled = True
