"""The broker drops every connection mid-stream; nothing confirmed may be lost."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import structlog.testing
from aio_pika.abc import AbstractConnection

from mlpipe.broker.connection import Backoff, BrokerConnection
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


async def test_a_nack_raises_and_the_next_publishes_go_out_on_a_fresh_connection(
        broker_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue that is full (``reject-publish``) nacks: the publish raises ``PublishNacked``
    and the producer replaces its connection (a channel RabbitMQ keeps refusing on must not
    be the one the caller's retry meets), at most every ``NACK_RESET_INTERVAL_S``."""
    import aio_pika

    import mlpipe.producer
    from mlpipe.errors import PublishNacked

    # an interval no loaded machine outlasts, so "within the interval" below is certain
    monkeypatch.setattr(mlpipe.producer, "NACK_RESET_INTERVAL_S", 60.0)
    settings = Settings(broker_url=broker_url, reconnect_base_s=0.01, reconnect_max_s=0.05)
    async with Producer(settings, declare_topology=False) as producer:
        conn = await aio_pika.connect(broker_url)
        try:
            ch = await conn.channel()
            queue = await ch.declare_queue("", exclusive=True, arguments={
                "x-max-length": 1, "x-overflow": "reject-publish"})

            def message(i: int) -> aio_pika.Message:
                return aio_pika.Message(f"m{i}".encode(), message_id=f"m{i}")

            await producer.publish_message("", queue.name, message(0))
            reconnects = producer.status().reconnects
            with pytest.raises(PublishNacked, match="broker refused m1"):
                await producer.publish_message("", queue.name, message(1))
            assert producer.nack_resets == 1
            await wait_for(lambda: producer.status().reconnects == reconnects + 1
                           and producer.status().state == "connected", timeout=10,
                           message="the publish connection replaced")
            # within the interval a second nack keeps the (fresh) connection
            with pytest.raises(PublishNacked):
                await producer.publish_message("", queue.name, message(2))
            assert producer.nack_resets == 1
            await queue.purge()
            receipt = await producer.publish_message("", queue.name, message(3))
            assert receipt.attempts == 1
            assert (await queue.get(timeout=5)).body == b"m3"
        finally:
            await conn.close()


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


class FreezingProxy:
    """A TCP proxy in front of the shared broker. ``freeze()`` makes every connection open at
    that moment half-open: bytes in either direction are swallowed, nothing is closed, no RST
    (a node that hangs, or a machine gone without a word). Later connections pass normally;
    ``cut()`` closes everything, as a node that dies on this machine does."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        for _, _, frozen in self._links:
            frozen[0] = True

    def cut(self) -> None:
        for client, upstream, _ in self._links:
            client.close()
            upstream.close()
        self._links.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        frozen = [False]
        self._links.append((writer, up_writer, frozen))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, frozen))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    frozen: list[bool]) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if not frozen[0]:
                    dst.write(data)
                    await dst.drain()
        dst.close()


@pytest.fixture
async def proxied(broker_url: str) -> AsyncIterator[tuple[FreezingProxy, str]]:
    """A proxy to the shared broker, and this test's broker URL through it."""
    parts = urlsplit(broker_url)
    proxy = FreezingProxy(parts.port or 5672)
    await proxy.start()
    try:
        yield proxy, broker_url.replace(f"@{parts.hostname}:{parts.port}",
                                        f"@127.0.0.1:{proxy.port}", 1)
    finally:
        await proxy.close()


async def test_a_setup_hook_stuck_on_a_half_open_connection_is_given_up(
        proxied: tuple[FreezingProxy, str]) -> None:
    """Regression (b74f110): the set-up hook's declare went out on a connection that then
    hung (no reply, no close; the heartbeat would notice after a minute or more). The
    supervisor awaited the hook for as long, and never reconnected. Now the hook may take
    ``setup_timeout_s``; then the connection is dropped and a fresh one set up."""
    proxy, url = proxied
    calls = 0

    async def hook(conn: AbstractConnection) -> None:
        nonlocal calls
        calls += 1
        channel = await conn.channel()
        if calls == 1:
            proxy.freeze()
        await channel.declare_queue("", exclusive=True)

    supervisor = BrokerConnection(url, name="test-setup-timeout", on_connect=hook,
                                  backoff=Backoff(0.05, 0.2), setup_timeout_s=1.0)
    try:
        # dropping the frozen connection waits 5 s for a close that never comes
        await supervisor.start(wait=True, timeout=20)
        assert calls == 2
        assert proxy.connections == 2
        assert supervisor.is_connected
    finally:
        await supervisor.close()


async def test_a_setup_hook_stuck_when_the_connection_is_given_up_is_abandoned(
        proxied: tuple[FreezingProxy, str]) -> None:
    """The other half of b74f110: the owner gives the connection up while its set-up is stuck
    (the daemon does when the broker closes a consumer channel it already subscribed). The
    supervisor acts on the loss at once instead of waiting out the hook or its timeout."""
    proxy, url = proxied
    calls = 0
    stuck = asyncio.Event()

    async def hook(conn: AbstractConnection) -> None:
        nonlocal calls
        calls += 1
        channel = await conn.channel()
        if calls == 1:
            proxy.freeze()
            stuck.set()
        await channel.declare_queue("", exclusive=True)

    supervisor = BrokerConnection(url, name="test-setup-lost", on_connect=hook,
                                  backoff=Backoff(0.05, 0.2), setup_timeout_s=120.0)
    try:
        await supervisor.start(wait=False)
        await asyncio.wait_for(stuck.wait(), timeout=10)
        supervisor.request_reconnect("a channel of this connection was closed")
        await supervisor.wait_connected(timeout=20)
        assert calls == 2
        assert supervisor.is_connected
    finally:
        await supervisor.close()



async def test_the_supervisor_fails_over_to_the_next_host(vhost: str) -> None:
    """Three hosts in the URL: one never listens, two are proxies to the broker. The first
    connection lands on a live one (the dead one costs a refused connect, not a backoff step);
    when that node dies, the next connection goes to the other, and the log says where."""
    live = [FreezingProxy(5672), FreezingProxy(5672)]
    for proxy in live:
        await proxy.start()
    hosts = ["127.0.0.1:1", *(f"127.0.0.1:{p.port}" for p in live)]
    supervisor = BrokerConnection(f"amqp://guest:guest@{','.join(hosts)}/{vhost}",
                                  name="test-failover", backoff=Backoff(0.05, 0.2))
    try:
        with structlog.testing.capture_logs() as logs:
            await supervisor.start(wait=True, timeout=10)
            first = supervisor.host
            assert first in hosts[1:]
            assert supervisor.failed_attempts == 0
            dying = live[hosts.index(first) - 1]
            await dying.close()  # connections cut, the port refuses from now on
            await wait_for(lambda: supervisor.is_connected and supervisor.host != first,
                           timeout=15, message="reconnected to another host")
        assert supervisor.host == ({*hosts[1:]} - {first}).pop()
        assert supervisor.reconnects == 1
        connected = [e["host"] for e in logs if e["event"] == "amqp.connected"]
        assert connected == [first, supervisor.host]
        lost = [e["host"] for e in logs if e["event"] == "amqp.connection_lost"]
        assert lost == [first]
    finally:
        await supervisor.close()
        for proxy in live:
            await proxy.close()
