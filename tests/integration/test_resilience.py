"""The broker drops every connection mid-stream; nothing confirmed may be lost."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.errors import BufferFull, CircuitOpen, PublishError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.testing import running_daemon, wait_for


async def close_all_connections(vhost: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    proc = await asyncio.create_subprocess_exec(
        exe, "-q", "close_all_connections", "-p", vhost, "mlpipe test: forced close",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err


async def test_forced_connection_close_loses_no_confirmed_message(
        broker_url: str, vhost: str) -> None:
    settings = Settings(broker_url=broker_url, reconnect_base_s=0.1, reconnect_max_s=1.0,
                        publish_timeout_s=60)
    handled: set[str] = set()
    registry = Registry()

    @registry.handler(TaskType.EMBED_VECTORS)
    async def record(task: Task, ctx: TaskContext) -> HandlerResult:
        handled.add(task.share_id)
        await asyncio.sleep(0.001)
        return HandlerResult({})

    confirmed: set[str] = set()
    raised: dict[str, Exception] = {}
    total = 1000

    async with running_daemon(settings, registry, "embed") as daemon, \
            Producer(settings, name="test-producer") as producer:

        async def publish(i: int) -> None:
            share = f"share-{i}"
            try:
                await producer.publish(build_task(TaskType.EMBED_VECTORS, share,
                                                  {"content": {"text": f"text {i}"}}))
                confirmed.add(share)
            except PublishError as exc:
                raised[share] = exc

        async def publisher() -> None:
            slots = asyncio.Semaphore(50)

            async def one(i: int) -> None:
                async with slots:
                    await publish(i)

            await asyncio.gather(*(one(i) for i in range(total)))

        async def chaos() -> None:
            await wait_for(lambda: len(handled) >= 200, timeout=30, message="200 handled")
            await close_all_connections(vhost)
            await wait_for(lambda: len(confirmed) >= 600, timeout=30, message="600 confirmed")
            await close_all_connections(vhost)

        await asyncio.gather(publisher(), chaos())
        assert len(confirmed) + len(raised) == total
        await wait_for(lambda: confirmed <= handled, timeout=60,
                       message="every confirmed message handled")
        # consumers resumed on their own after both closes
        await wait_for(lambda: daemon.status().reconnects >= 2 and daemon.status().connected
                       and all(daemon.status().consuming.values()), timeout=30,
                       message="daemon reconnected and consuming")
        # the second close may land after the last publish: the producer reconnects on its own
        await wait_for(lambda: producer.status().reconnects >= 2, timeout=30,
                       message="producer reconnected twice")
    assert confirmed <= handled
    # raising is allowed by the contract; here the outage is short, so all should confirm
    assert not raised, {k: repr(v) for k, v in list(raised.items())[:5]}


async def test_publish_fails_loudly_when_buffer_is_full_or_circuit_open(broker_url: str) -> None:
    # a broker that is not there: nothing listens on port 1
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/", publish_buffer_size=2,
                        reconnect_base_s=0.05, reconnect_max_s=0.1,
                        circuit_failure_threshold=1000, publish_timeout_s=5)
    producer = Producer(settings)
    try:
        await producer._conn.start(wait=False)  # a producer started during an outage
        task = build_task(TaskType.EMBED_VECTORS, "s", {"content": {"text": "t"}})
        waiting = [asyncio.create_task(producer.publish(task)) for _ in range(2)]
        await wait_for(lambda: producer.status().buffered == 2, message="2 buffered")
        with pytest.raises(BufferFull):
            await producer.publish(task)
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert producer.status().buffered == 0
    finally:
        await producer.close()

    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/", reconnect_base_s=0.01,
                        reconnect_max_s=0.02, circuit_failure_threshold=3)
    producer = Producer(settings)
    try:
        await producer._conn.start(wait=False)
        await wait_for(lambda: producer.status().circuit == "open", message="circuit open")
        with pytest.raises(CircuitOpen, match="unreachable"):
            await producer.publish(task)
    finally:
        await producer.close()


async def test_publish_on_a_channel_closed_before_its_callbacks_ran_never_blocks_the_loop(
        broker_url: str) -> None:
    """Found by ``make chaos``: after a broker restart the publisher channel reports closed
    while the producer still holds it as ready (its close callbacks are queued behind the
    publishing task). A publish then spun without yielding for the whole publish timeout,
    freezing the daemon: no lock renewals, no reconnect. Now it gives the channel up,
    reconnects, and the loop keeps turning meanwhile."""
    settings = Settings(broker_url=broker_url, publish_timeout_s=10, reconnect_base_s=0.05)
    async with Producer(settings) as producer:
        channel = producer._channel
        assert channel is not None
        channel.close_callbacks.discard(producer._on_channel_close)  # "not run yet"
        await channel.close()
        assert producer._ready.is_set()
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(heartbeat())
        try:
            task = build_task(TaskType.EMBED_VECTORS, "dead-channel", {"content": {"text": "t"}})
            receipt = await asyncio.wait_for(producer.publish(task), timeout=10)
        finally:
            beat.cancel()
        assert receipt.attempts == 1
        assert producer._conn.reconnects == 1
        assert ticks >= 3, "the event loop stood still while the publish waited"
