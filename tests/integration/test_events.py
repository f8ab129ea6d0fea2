"""Result events: one per finished task, with the task's correlationId and traceparent; failed
events with the dead-letter reason; an event held back by a crash still goes out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aio_pika
import pytest

from mlpipe.contract.events import ResultEvent
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.effects import Effects
from mlpipe.errors import PermanentError
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix,
                    retry=RetryPolicy(max_retries=2, base_delay_s=0.2, max_delay_s=1.0))


@pytest.fixture
async def listener(settings: Settings) -> AsyncIterator[list[dict[str, Any]]]:
    """A test consumer bound to every result event, as another service would bind."""
    received: list[dict[str, Any]] = []
    async with Producer(settings) as p:
        topo = p.topology
    conn = await aio_pika.connect(settings.broker_url)
    ch = await conn.channel()
    queue = await ch.declare_queue("", exclusive=True)
    await queue.bind(topo.events_exchange, routing_key="ml.result.#")

    async def on_event(m: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(m.body)
        body["_headers"] = dict(m.headers or {})
        body["_routing_key"] = m.routing_key
        received.append(body)
        await m.ack()

    await queue.consume(on_event)
    try:
        yield received
    finally:
        await conn.close()


def registry(fail_shares: set[str]) -> Registry:
    reg = Registry()

    @reg.handler(TaskType.SUMMARIZE_LLM)
    async def summarize(task: Task, ctx: TaskContext) -> HandlerResult:
        if task.share_id in fail_shares:
            raise PermanentError("content is a shopping list", reason="content_too_short")
        return HandlerResult({"summary": "short " * 200, "segments": [1, 2, 3]},
                             costs=(Cost(100, "tokens", Decimal("0.001"), "m"),))

    return reg


def task(share: str) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": f"Text of {share} that is long enough to summarise."}},
                      correlation_id=f"corr-{share}", traceparent=TRACE)


async def test_one_event_per_finished_task_with_ids(
        settings: Settings, listener: list[dict[str, Any]]) -> None:
    async with Effects(settings) as effects, \
            running_daemon(settings, registry({"bad"}), "summarize",
                           executor=effects.executor) as daemon, Producer(settings) as p:
        for share in ("a", "b", "a", "bad"):  # "a" twice: the double-fire
            await p.publish(task(share))
        await wait_for(lambda: daemon.status().tasks_done == 4)
        await wait_for(lambda: len(listener) == 3, message="3 events")
        # No stray extra event for the duplicate: a delivery's events are confirmed before it
        # is acked and reach the listener in order, so once the event of a task published
        # after those four settled arrives, any event of theirs has arrived before it.
        await p.publish(task("marker"))
        await wait_for(lambda: any(e["shareId"] == "marker" for e in listener),
                       message="the marker's event")
    received = [e for e in listener if e["shareId"] != "marker"]
    events = {(e["shareId"], e["status"]): e for e in received}
    assert len(received) == 3
    assert set(events) == {("a", "completed"), ("b", "completed"), ("bad", "failed")}
    for (share, _), e in events.items():
        ResultEvent.model_validate_json(json.dumps({k: v for k, v in e.items()
                                                    if not k.startswith("_")}))
        assert e["correlationId"] == f"corr-{share}"
        assert e["traceparent"] == TRACE
        assert e["_headers"]["traceparent"] == TRACE
        assert e["_routing_key"] == "ml.result.summarize_llm"
    done = events[("a", "completed")]
    assert done["resultRef"] == {"table": "ml_results", "shareId": "a",
                                 "taskType": "summarize_llm"}
    assert len(done["summary"]["summary"]) == 500  # shortened; full text stays in ml_results
    assert done["summary"]["segmentsCount"] == 3
    assert done["costUsd"] == pytest.approx(0.001)
    failed = events[("bad", "failed")]
    assert failed["reason"] == "content_too_short"
    assert "shopping list" in failed["error"]


async def test_event_held_back_by_a_failed_publish_goes_out_on_redelivery(
        settings: Settings, listener: list[dict[str, Any]]) -> None:
    async with Effects(settings) as effects:
        calls = {"n": 0}
        async with running_daemon(settings, registry(set()), "summarize",
                                  executor=effects.executor) as daemon:
            relay = effects.executor._relay
            assert relay is not None
            relay_publish = relay.publish

            async def flaky_publish(pending: Any) -> int:
                calls["n"] += 1
                if calls["n"] == 1:  # the broker "fails" right after the commit
                    from mlpipe.errors import PublishError
                    raise PublishError("injected: confirm lost")
                return await relay_publish(pending)

            relay.publish = flaky_publish  # type: ignore[method-assign]
            async with Producer(settings) as p:
                await p.publish(task("crashy"))
            await wait_for(lambda: len(listener) == 1, timeout=10, message="event delivered")
            # the first try (result stored, event not confirmed) and its retry
            await wait_for(lambda: daemon.status().tasks_done == 2)
    assert listener[0]["shareId"] == "crashy"
    assert listener[0]["status"] == "completed"
    assert effects.pool is None  # closed
