"""The broker side of every workload: a throwaway vhost, quorum queues, pre-filling.

Each workload runs in a vhost of its own (``rabbitmqctl add_vhost``), deleted afterwards with
everything in it, so a crashed run leaves nothing behind in the vhosts other people use and
no workload sees another's queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bench import messages
from mlpipe.broker.topology import Topology

BROKER_HOST = os.environ.get("BENCH_BROKER_HOST", "127.0.0.1:5672")
#: Unconfirmed publishes at once while pre-filling (not measured, only needs to be quick).
PREFILL_IN_FLIGHT = 512


def rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    done = subprocess.run([exe, "-q", *args], check=True, capture_output=True, text=True,
                          timeout=120)
    return done.stdout


@contextlib.contextmanager
def vhost(workload: str) -> Iterator[str]:
    """A fresh vhost for one workload; yields its AMQP URL and deletes it afterwards."""
    name = f"bench-{workload}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{BROKER_HOST}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


def work_queue_arguments() -> dict[str, Any]:
    """The arguments of mlpipe's work queues; baselines consume from queues declared with the
    same ones so that the broker does the same work for every contender."""
    return Topology().work_queue_arguments()


@contextlib.asynccontextmanager
async def connection(url: str, name: str = "bench") -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(url, client_properties={"connection_name": name})
    try:
        yield conn
    finally:
        await conn.close()


async def declare_queue(url: str, name: str, arguments: dict[str, Any] | None = None) -> None:
    async with connection(url) as conn, conn.channel() as ch:
        await ch.declare_queue(name, durable=True,
                               arguments=work_queue_arguments() if arguments is None
                               else arguments)


async def delete_queue(url: str, name: str) -> None:
    async with connection(url) as conn, conn.channel() as ch:
        await ch.queue_delete(name)


async def depth(channel: AbstractChannel, queue: str) -> int:
    """Messages ready in ``queue`` (not counting delivered-but-unacked ones)."""
    q = await channel.declare_queue(queue, passive=True)
    count = q.declaration_result.message_count
    return int(count or 0)


async def queue_depth(url: str, queue: str) -> int:
    async with connection(url) as conn, conn.channel() as ch:
        return await depth(ch, queue)


async def prefill(url: str, queue: str, n: int, *, start: int = 0,
                  make: Callable[[int], aio_pika.Message] | None = None,
                  check: bool = True) -> None:
    """Publish ``n`` persistent contract messages straight into ``queue`` with confirms, many
    in flight. ``make(i)`` may build a different message (Celery's protocol) per index;
    ``check`` verifies that all ``n`` are ready (off when a consumer is already running)."""
    build = make or messages.amqp_message
    async with connection(url, "bench-prefill") as conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        slots = asyncio.Semaphore(PREFILL_IN_FLIGHT)

        async def one(i: int) -> None:
            async with slots:
                await exchange.publish(build(i), routing_key=queue, mandatory=True)

        await asyncio.gather(*(one(i) for i in range(start, start + n)))
        ready = await depth(channel, queue) if check else n
    if ready < n:
        raise RuntimeError(f"pre-fill of {queue}: {ready} messages ready, expected {n}")
