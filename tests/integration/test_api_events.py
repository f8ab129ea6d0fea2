"""``GET /v1/events`` on the real broker, Postgres and a daemon running in-process: a client
streaming like ``curl -N`` hears its share's ``completed`` event within a second of the result
being stored; ``Last-Event-ID`` resumes; a client that stops reading is cut off."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aio_pika
import aiohttp
import asyncpg
import pytest

from mlpipe.api import ApiConfig, ApiServer
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.effects import Effects
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.search import VectorLike
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL

READER = "reader-token-events-0001"


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix,
                    retry=RetryPolicy(max_retries=2, base_delay_s=0.2, max_delay_s=1.0))


def registry() -> Registry:
    reg = Registry()

    @reg.handler(TaskType.SUMMARIZE_LLM)
    async def summarize(task: Task, ctx: TaskContext) -> HandlerResult:
        return HandlerResult({"summary": f"summary of {task.share_id}"},
                             costs=(Cost(10, "tokens", Decimal("0.0001"), "m"),))

    return reg


def task(share: str) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": f"Text of {share}, long enough to summarise."}})


async def no_embedder(texts: list[str]) -> list[VectorLike]:
    raise AssertionError("no search in these tests")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[ApiServer]:
    config = ApiConfig.from_settings(settings, host="127.0.0.1", port=0)
    config = ApiConfig(**{**config.__dict__, "tokens": (READER,), "events_buffer": 8})
    async with ApiServer(config, embedder=no_embedder) as server:
        yield server


class Stream:
    """An SSE client that records each event with the time it arrived."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[dict[str, Any]] = []
        self.ended = False
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, str] = {}
        async for raw in self.response.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    self.events.append({**fields, "at": time.time(),
                                        "body": json.loads(fields["data"])})
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        self.ended = True

    async def close(self) -> None:
        self._task.cancel()
        self.response.close()


async def open_stream(session: aiohttp.ClientSession, url: str,
                      last_event_id: str | None = None) -> Stream:
    headers = {"Authorization": f"Bearer {READER}"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    response = await session.get(url, headers=headers,
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    await response.content.readuntil(b"\n\n")  # retry + ": connected": subscribed
    return Stream(response)


async def test_completed_event_within_a_second_of_the_result(
        settings: Settings, api: ApiServer, pg_dsn: str, pg_schema: str) -> None:
    share, other = f"s-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}"
    async with Effects(settings) as effects, \
            running_daemon(settings, registry(), "summarize", executor=effects.executor), \
            aiohttp.ClientSession(api.url) as session, Producer(settings) as producer:
        stream = await open_stream(session, f"/v1/events?shareId={share}")
        try:
            await producer.publish(task(other))
            await producer.publish(task(share))
            await wait_for(lambda: bool(stream.events), timeout=15, message="an event")
            [event] = stream.events
            body = event["body"]
            assert (event["event"], body["status"], body["shareId"]) == (
                "completed", "completed", share)
            assert body["resultRef"] == {"table": "ml_results", "shareId": share,
                                         "taskType": "summarize_llm"}
            assert event["id"]
            conn = await asyncpg.connect(pg_dsn)
            try:
                stored = await conn.fetchval(
                    f'SELECT updated_at FROM "{pg_schema}".ml_results WHERE share_id = $1',
                    share)
            finally:
                await conn.close()
            lag = event["at"] - stored.timestamp()
            assert lag < 1.0, f"event arrived {lag:.3f}s after the result was stored"
        finally:
            await stream.close()
    assert all(e["body"]["shareId"] == share for e in stream.events)


async def test_task_type_filter_and_token(api: ApiServer) -> None:
    async with aiohttp.ClientSession(api.url) as session:
        async with session.get("/v1/events") as anonymous:
            assert anonymous.status == 401
            assert (await anonymous.json())["error"] == "unauthorized"
        async with session.get("/v1/events?taskType=bogus",
                               headers={"Authorization": f"Bearer {READER}"}) as bad:
            assert bad.status == 400
            assert (await bad.json())["details"][0]["loc"] == "query.taskType"


async def publish_event(channel: aio_pika.abc.AbstractChannel, exchange: str, share: str,
                        task_type: str = "summarize_llm", pad: int = 0) -> str:
    message_id = uuid.uuid4().hex
    body = {"version": "1.0", "shareId": share, "taskType": task_type, "status": "completed",
            "occurredAt": time.time(), "summary": {"pad": "x" * pad}}
    ex = await channel.get_exchange(exchange)
    await ex.publish(aio_pika.Message(json.dumps(body).encode(), message_id=message_id,
                                      content_type="application/json"),
                     routing_key=f"ml.result.{task_type}")
    return message_id


async def test_last_event_id_resumes_from_memory(settings: Settings, api: ApiServer) -> None:
    """Events published while a client was away are sent first on reconnect, in order and
    filtered, then live ones; an id the server never saw gives a ``gap`` event."""
    from mlpipe.producer import topology_from

    exchange = topology_from(settings).events_exchange
    url = "/v1/events?taskType=summarize_llm"
    async with aiohttp.ClientSession(api.url) as session, \
            await aio_pika.connect(settings.broker_url) as conn:
        channel = await conn.channel()
        first = await open_stream(session, url)
        seen = await publish_event(channel, exchange, "r-1")
        await wait_for(lambda: bool(first.events), message="first event")
        assert first.events[0]["id"] == seen
        await first.close()
        await wait_for(lambda: api.events is not None and api.events.subscribers == 0)

        missed = [await publish_event(channel, exchange, "r-2"),
                  await publish_event(channel, exchange, "r-x", task_type="embed_vectors"),
                  await publish_event(channel, exchange, "r-3")]
        assert api.events is not None
        await wait_for(lambda: missed[-1] in [e.id for e in api.events._memory],
                       message="the server remembers the missed events")
        resumed = await open_stream(session, url, last_event_id=seen)
        try:
            live = await publish_event(channel, exchange, "r-4")
            await wait_for(lambda: len(resumed.events) >= 3, message="missed + live")
            assert [e["id"] for e in resumed.events] == [missed[0], missed[2], live]
        finally:
            await resumed.close()

        unknown = await open_stream(session, url, last_event_id="never-issued")
        try:
            await publish_event(channel, exchange, "r-5")
            await wait_for(lambda: len(unknown.events) >= 2, message="gap + live")
            assert unknown.events[0]["event"] == "gap"
            assert unknown.events[1]["body"]["shareId"] == "r-5"
        finally:
            await unknown.close()


async def test_a_client_that_stops_reading_is_cut_off(settings: Settings,
                                                      api: ApiServer) -> None:
    """A client that never reads: once the socket and the 8-event buffer are full, the server
    drops its subscription (its queue and channel go) instead of buffering more."""
    from mlpipe.producer import topology_from

    exchange = topology_from(settings).events_exchange
    assert api.port is not None
    assert api.events is not None
    hub = api.events
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", api.port))
    await loop.sock_sendall(sock, (f"GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                   f"Bearer {READER}\r\n\r\n").encode())
    try:
        await wait_for(lambda: hub.subscribers == 1, message="subscribed")
        started = dt.datetime.now()
        async with await aio_pika.connect(settings.broker_url) as conn:
            channel = await conn.channel()
            for i in range(600):
                if hub.subscribers == 0:
                    break
                await publish_event(channel, exchange, f"f-{i}", pad=32_000)
            await wait_for(lambda: hub.subscribers == 0, timeout=30,
                           message="the slow client dropped")
        assert dt.datetime.now() - started < dt.timedelta(seconds=60)
    finally:
        sock.close()
