"""The daemon against the real RabbitMQ: dispatch, dead-lettering, retries, replay."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from mlpipe.broker.topology import Topology
from mlpipe.contract.codec import decode
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead, make_filter, replay
from mlpipe.errors import PermanentError, TransientError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for

EXAMPLES = Path(__file__).resolve().parents[2] / "contracts" / "examples"
ALL_QUEUES = "transcribe,summarize,embed"


@pytest.fixture
def settings(broker_url: str) -> Settings:
    return Settings(broker_url=broker_url,
                    retry=RetryPolicy(max_retries=3, base_delay_s=0.2, max_delay_s=2.0,
                                      jitter=0.1),
                    shutdown_grace_s=5)


class Recorder:
    """A registry whose handlers record every call; ``behaviour`` can make them fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, float]] = []
        self.behaviour: dict[str, Any] = {}
        self.registry = Registry()
        for tt in TaskType:
            self.registry.register(tt, self._handle)

    async def _handle(self, task: Task, ctx: TaskContext) -> HandlerResult:
        self.calls.append((task.task_type.value, task.share_id, task.metadata.retry_count,
                           time.monotonic()))
        action = self.behaviour.get(task.share_id)
        if callable(action):
            action(task, ctx)
        return HandlerResult({"ok": True})

    def count(self, share_id: str) -> int:
        return sum(1 for c in self.calls if c[1] == share_id)


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


async def queue_depths(url: str, names: list[str]) -> dict[str, int]:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        out = {}
        for n in names:
            q = await ch.declare_queue(n, passive=True)
            out[n] = q.declaration_result.message_count or 0
        return out
    finally:
        await conn.close()


async def publish_raw(url: str, body: bytes, routing_key: str, **props: Any) -> None:
    topo = Topology()
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        ex = await ch.get_exchange(topo.tasks_exchange)
        await ex.publish(aio_pika.Message(body, message_id=props.pop("message_id", "raw"),
                                          **props), routing_key=routing_key)
    finally:
        await conn.close()


async def test_each_task_type_is_handled_and_acked(settings: Settings, rec: Recorder) -> None:
    topo = Topology()
    async with running_daemon(settings, rec.registry, ALL_QUEUES), Producer(settings) as p:
        for path in sorted(EXAMPLES.glob("*.json")):
            task = decode(path.read_bytes())
            # the embed example asks for the local backend: route it to ml.embed instead
            await p.publish_message(topo.tasks_exchange, task.task_type.value,
                                    aio_pika.Message(path.read_bytes(),
                                                     content_type="application/json"))
        await wait_for(lambda: len(rec.calls) == 4, message="4 handled")
        handled = {c[0] for c in rec.calls}
        assert handled == {t.value for t in TaskType}
        names = [topo.queue_name(q) for q in ("transcribe", "summarize", "embed")]
        await wait_for(lambda: _all_zero(settings.broker_url, names), message="queues empty")
    depths = await queue_depths(settings.broker_url, [*names, topo.dead_letter_queue])
    assert set(depths.values()) == {0}


async def _all_zero(url: str, names: list[str]) -> bool:
    return set((await queue_depths(url, names)).values()) == {0}


async def test_local_backend_routes_to_local_queue(settings: Settings, rec: Recorder) -> None:
    task = decode((EXAMPLES / "embed_vectors.json").read_bytes())  # backend: local
    async with running_daemon(settings, rec.registry, "embed_local"), Producer(settings) as p:
        receipt = await p.publish(task)
        assert receipt.routing_key == "embed_vectors.local"
        await wait_for(lambda: len(rec.calls) == 1)


BAD_INPUTS = [
    (b"this is not json", "not_json"),
    (json.dumps({"version": "1.0", "taskType": "embed_vectors", "shareId": "s",
                 "payload": {"content": {"text": 42}},
                 "metadata": {"correlationId": "c", "timestamp": 1}}).encode(),
     "schema_violation"),
    (json.dumps({"version": "2.0", "taskType": "embed_vectors", "shareId": "s",
                 "payload": {}, "metadata": {}}).encode(), "unsupported_version"),
    (json.dumps({"version": "1.0", "taskType": "translate_text", "shareId": "s",
                 "payload": {}, "metadata": {}}).encode(), "unknown_task_type"),
]


async def test_malformed_messages_are_dead_lettered_with_reason(
        settings: Settings, rec: Recorder) -> None:
    async with running_daemon(settings, rec.registry, "embed") as daemon:
        for i, (body, _) in enumerate(BAD_INPUTS):
            await publish_raw(settings.broker_url, body, "embed_vectors", message_id=f"bad-{i}",
                              content_type="application/json")
        await publish_raw(settings.broker_url, b'{"pickled": true}', "embed_vectors",
                          message_id="bad-pickle", content_type="application/x-python-serialize")

        async def all_dead() -> bool:
            return len(await list_dead(settings)) == len(BAD_INPUTS) + 1

        await wait_for(all_dead, message="every bad input dead-lettered")
        dead = {e.message_id: e for e in await list_dead(settings)}
        for i, (_, reason) in enumerate(BAD_INPUTS):
            entry = dead[f"bad-{i}"]
            assert entry.reason == reason
            assert entry.error
            assert entry.error_class
            assert entry.origin_queue == "ml.embed"
        assert dead["bad-pickle"].reason == "content_type"
        # listing removed nothing, and the daemon still works
        assert len(await list_dead(settings)) == len(BAD_INPUTS) + 1
        async with Producer(settings) as p:
            await p.publish(build_task(TaskType.EMBED_VECTORS, "after-junk",
                                       {"content": {"text": "still alive"}}))
        await wait_for(lambda: rec.count("after-junk") == 1)
        assert daemon.status().consuming == {"ml.embed": True}
    assert rec.calls == [c for c in rec.calls if c[1] == "after-junk"]


async def test_dlq_replay_of_a_fixed_message(settings: Settings, rec: Recorder) -> None:
    broken = {"on": True}

    def maybe_fail(task: Task, ctx: TaskContext) -> None:
        if broken["on"]:
            raise PermanentError("handler bug: cannot parse this caption")

    rec.behaviour["replay-me"] = maybe_fail
    async with running_daemon(settings, rec.registry, "embed"), Producer(settings) as p:
        receipt = await p.publish(build_task(TaskType.EMBED_VECTORS, "replay-me",
                                             {"content": {"text": "a caption"}}))

        async def dead() -> bool:
            return any(e.message_id == receipt.message_id for e in await list_dead(settings))

        await wait_for(dead, message="dead-lettered")
        entry = (await list_dead(settings))[0]
        assert entry.reason == "permanent_error"
        assert "handler bug" in (entry.error or "")
        broken["on"] = False  # the fix is deployed
        replayed = await replay(settings, make_filter(message_id=receipt.message_id))
        assert [e.message_id for e in replayed] == [receipt.message_id]
        await wait_for(lambda: rec.count("replay-me") == 2, message="replayed copy handled")
        assert await list_dead(settings) == []


async def test_transient_twice_then_success_with_growing_backoff(
        settings: Settings, rec: Recorder) -> None:
    def flaky(task: Task, ctx: TaskContext) -> None:
        if ctx.attempt <= 2:
            raise TransientError(f"upstream 503 on attempt {ctx.attempt}")

    rec.behaviour["flaky"] = flaky
    async with running_daemon(settings, rec.registry, "summarize"), Producer(settings) as p:
        await p.publish(build_task(TaskType.SUMMARIZE_LLM, "flaky",
                                   {"content": {"text": "x" * 60}}))
        await wait_for(lambda: rec.count("flaky") == 3, message="3 attempts")
        calls = [c for c in rec.calls if c[1] == "flaky"]
        assert [c[2] for c in calls] == [0, 1, 2]  # retryCount in the body grows
        gaps = [b[3] - a[3] for a, b in itertools.pairwise(calls)]
        assert 0.15 < gaps[0] < gaps[1], gaps  # 0.2 s then 0.4 s, jittered by at most 10 %
        assert await list_dead(settings) == []
    assert rec.count("flaky") == 3


async def test_always_transient_is_dead_lettered_after_configured_attempts(
        settings: Settings, rec: Recorder) -> None:
    def always(task: Task, ctx: TaskContext) -> None:
        raise TransientError("still down")

    rec.behaviour["doomed"] = always
    async with running_daemon(settings, rec.registry, "summarize"), Producer(settings) as p:
        await p.publish(build_task(TaskType.SUMMARIZE_LLM, "doomed",
                                   {"content": {"text": "y" * 60}}))

        async def dead() -> bool:
            return len(await list_dead(settings)) == 1

        await wait_for(dead, timeout=15, message="dead-lettered")
        [entry] = await list_dead(settings)
    assert rec.count("doomed") == settings.retry.max_retries + 1
    assert entry.reason == "retries_exhausted"
    assert entry.attempts == settings.retry.max_retries + 1
    assert entry.origin_queue == "ml.summarize"
    assert entry.error_class == "TransientError"
