"""Migration off Celery: the original producers' messages, sent with the real ``celery``
package and the original configuration, are processed by mlpipe unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from celery import Celery
from kombu import Queue

from mlpipe.broker.topology import parse_queue_names
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.errors import TopologyMismatch
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.testing import running_daemon, wait_for
from mlpipe.worker.daemon import Daemon
from tests.conftest import REDIS_URL

QUEUES = ("ml.summarize", "ml.transcribe", "ml.embed")
ARTICLE = {"text": "The council approved the housing plan on Tuesday after a long debate.",
           "title": "Housing plan", "type": "article"}


@pytest.fixture
def celery_app(broker_url: str) -> Iterator[Celery]:
    """The original system's Celery configuration."""
    app = Celery("original", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_backend=None,
        broker_transport_options={"confirm_publish": True},
        task_queues=[Queue(q, routing_key=q, queue_arguments={"x-queue-type": "quorum"})
                     for q in QUEUES],
        task_routes={"llm_service.tasks.*": {"queue": "ml.summarize"},
                     "whisper.tasks.*": {"queue": "ml.transcribe"},
                     "vector_service.tasks.*": {"queue": "ml.embed"},
                     "unknown.*": {"queue": "ml.summarize"}},
        task_acks_late=True, worker_prefetch_multiplier=8, worker_detect_quorum_queues=True,
    )
    try:
        yield app
    finally:
        app.close()


def send(app: Celery, name: str, *args: Any, **kwargs: Any) -> str:
    result = app.send_task(name, args=list(args), kwargs=kwargs.pop("kwargs", None), **kwargs)
    return str(result.id)


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix, adopt_existing_queues=True)


def recording_registry(seen: list[Task]) -> Registry:
    registry = Registry()

    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        seen.append(task)
        return HandlerResult({"ok": True, "shareId": task.share_id})

    for tt in TaskType:
        registry.register(tt, handle)
    return registry


async def test_celery_tasks_are_processed_like_contract_v1(
        celery_app: Celery, settings: Settings, pg_dsn: str, pg_schema: str) -> None:
    ids = await asyncio.to_thread(lambda: [
        send(celery_app, "llm_service.tasks.summarize_content", "cel-sum", ARTICLE,
             {"maxLength": 120}),
        send(celery_app, "whisper.tasks.transcribe_api", "cel-tr", "s3://media/clip.wav",
             {"language": "en"}),
        send(celery_app, "vector_service.tasks.generate_embeddings",
             kwargs={"share_id": "cel-emb", "content": "a caption about bread",
                     "options": {"embeddingType": "content"}}),
    ])
    seen: list[Task] = []
    async with Effects(settings) as effects, \
            running_daemon(settings, recording_registry(seen), "summarize,transcribe,embed",
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await wait_for(lambda: len(seen) == 3, timeout=20, message="3 Celery tasks handled")
        # the same work as contract v1, for comparison
        await p.publish(build_task(TaskType.SUMMARIZE_LLM, "v1-sum",
                                   {"content": ARTICLE, "options": {"maxLength": 120}}))
        await wait_for(lambda: len(seen) == 4)
        await wait_for(lambda: daemon.status().tasks_done == 4)
    by_share = {t.share_id: t for t in seen}
    assert by_share["cel-sum"].payload == by_share["v1-sum"].payload
    assert by_share["cel-tr"].payload.media_url == "s3://media/clip.wav"  # type: ignore[union-attr]
    assert by_share["cel-tr"].payload.language == "en"  # type: ignore[union-attr]
    assert by_share["cel-emb"].payload.content.text == "a caption about bread"  # type: ignore[union-attr]
    assert by_share["cel-sum"].metadata.correlation_id in ids
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        rows = {r["share_id"]: r for r in await conn.fetch(
            "SELECT share_id, task_type, input_hash FROM ml_results")}
    finally:
        await conn.close()
    assert set(rows) == {"cel-sum", "cel-tr", "cel-emb", "v1-sum"}
    assert rows["cel-sum"]["input_hash"] == rows["v1-sum"]["input_hash"]
    assert await list_dead(settings) == []


async def test_bad_celery_messages_are_dead_lettered(
        celery_app: Celery, settings: Settings) -> None:
    await asyncio.to_thread(lambda: [
        send(celery_app, "unknown.tasks.translate", "x1", "hola"),
        send(celery_app, "llm_service.tasks.summarize_content", "x2", ARTICLE,
             serializer="pickle"),
    ])
    seen: list[Task] = []
    async with Effects(settings) as effects, \
            running_daemon(settings, recording_registry(seen), "summarize",
                           executor=effects.executor) as daemon:
        conn = await aio_pika.connect(settings.broker_url)
        async with conn:
            ch = await conn.channel()
            await ch.default_exchange.publish(aio_pika.Message(
                b"this is not [args, kwargs, embed]", content_type="application/json",
                headers={"task": "llm_service.tasks.summarize_content", "id": "bad-body"}),
                routing_key="ml.summarize")

        async def three_dead() -> bool:
            return len(await list_dead(settings)) == 3

        await wait_for(three_dead, timeout=20, message="3 dead letters")
        reasons = sorted(e.reason for e in await list_dead(settings))
        assert reasons == ["celery_malformed", "content_type", "unknown_celery_task"]
        assert daemon.status().consuming["ml.summarize"] is True
        # still working after the junk
        await asyncio.to_thread(send, celery_app, "llm_service.tasks.summarize_content",
                                "after", ARTICLE)
        await wait_for(lambda: [t.share_id for t in seen] == ["after"], timeout=20)


async def test_existing_queue_with_other_arguments_is_reported_at_start(
        celery_app: Celery, broker_url: str) -> None:
    await asyncio.to_thread(send, celery_app, "llm_service.tasks.summarize_content", "s",
                            ARTICLE)  # Celery declares ml.summarize its own way
    settings = Settings(broker_url=broker_url)  # adopt_existing_queues is off
    daemon = Daemon(settings, Registry(), parse_queue_names("summarize"))
    with pytest.raises(TopologyMismatch, match="MLPIPE_ADOPT_EXISTING_QUEUES"):
        await asyncio.wait_for(daemon.start(timeout=30), timeout=20)
    await daemon.stop()
