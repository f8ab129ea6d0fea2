"""The workflow hook interface is general, not video-shaped: a second workflow, "summarize an
article, then embed its summary", runs end to end on the real broker, Redis and Postgres
through the same hooks as the video workflow (before run, on result inside the result's
transaction, on dead letter, a delayed control message, skip)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from mlpipe.contract.models import (
    EmbeddingType,
    EmbedTask,
    SummarizeTask,
    Task,
    TaskType,
    build_task,
)
from mlpipe.effects import Effects
from mlpipe.effects.hooks import Workflow, WorkflowEnv
from mlpipe.errors import PermanentError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.store.pool import DB
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL

LOG_DDL = "CREATE TABLE IF NOT EXISTS summary_then_embed (share_id text, step text)"


class SummaryThenEmbed(Workflow):
    """After an article's summary is stored, embed the summary (a follow-up task queued in
    the summary's transaction); a reminder comes back on the control queue a moment
    after the summary started; a failed summary is logged; an embedding of a share whose summary
    embedding is already stored is skipped."""

    name = "summary_then_embed"

    def __init__(self) -> None:
        self.control = {"ste_reminder": self._reminder}

    def watches(self, task: Task) -> bool:
        return isinstance(task, SummarizeTask) or (
            isinstance(task, EmbedTask)
            and task.payload.options.embedding_type is EmbeddingType.SUMMARY)

    async def skip_reason(self, conn: DB, task: Task) -> str | None:
        if isinstance(task, EmbedTask) and await _steps(conn, task.share_id, "embedded"):
            return "summary already embedded"
        return None

    async def before_run(self, conn: DB, task: Task, env: WorkflowEnv) -> None:
        if isinstance(task, SummarizeTask):
            await _log(conn, task.share_id, "started")
            # 0.2 s: the delay tier of this test's retry policy (delays round up to a tier)
            await env.schedule(conn, task, "ste_reminder", {"shareId": task.share_id}, 0.2,
                               message_id=f"ste-reminder:{task.share_id}")

    async def on_result(self, conn: DB, task: Task, result: HandlerResult,
                        env: WorkflowEnv) -> None:
        if isinstance(task, SummarizeTask):
            await _log(conn, task.share_id, "summarized")
            await env.follow_up(conn, task, build_task(
                TaskType.EMBED_VECTORS, task.share_id,
                {"content": {"text": result.data["summary"]},
                 "options": {"embeddingType": "summary"}},
                correlation_id=task.metadata.correlation_id))
        else:
            await _log(conn, task.share_id, "embedded")

    async def on_dead_letter(self, conn: DB, task: Task, reason: str) -> None:
        await _log(conn, task.share_id, f"failed:{reason}")

    async def _reminder(self, conn: DB, doc: dict[str, Any]) -> None:
        await _log(conn, doc["shareId"], "reminded")


async def _log(conn: DB, share: str, step: str) -> None:
    await conn.execute("INSERT INTO summary_then_embed VALUES ($1, $2)", share, step)


async def _steps(conn: DB, share: str, step: str | None = None) -> list[str]:
    rows = await conn.fetch("SELECT step FROM summary_then_embed WHERE share_id = $1 "
                            "AND ($2::text IS NULL OR step = $2) ORDER BY ctid", share, step)
    return [r["step"] for r in rows]


@pytest.fixture
async def settings(broker_url: str, pg_dsn: str, pg_schema: str,
                   lock_prefix: str) -> Settings:
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        await conn.execute(LOG_DDL)
    finally:
        await conn.close()
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix,
                    retry=RetryPolicy(max_retries=1, base_delay_s=0.2, max_delay_s=0.5))


async def test_a_second_workflow_runs_through_the_same_hooks(settings: Settings) -> None:
    embedded: list[tuple[str, str, str]] = []
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM)
    async def summarize(task: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        if "shopping" in task.payload.content.text:
            raise PermanentError("a shopping list", reason="content_too_short")
        return HandlerResult({"summary": task.payload.content.text.split(".")[0] + "."})

    @registry.handler(TaskType.EMBED_VECTORS)
    async def embed(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        embedded.append((task.share_id, task.payload.options.embedding_type.value,
                         task.payload.content.text))
        return HandlerResult({"chunks": 1})

    registry.add_workflow(SummaryThenEmbed())
    article = build_task(TaskType.SUMMARIZE_LLM, "art-1", {"content": {
        "text": "Rockets reach orbit by going sideways very fast. Then they coast."}})
    shopping = build_task(TaskType.SUMMARIZE_LLM, "art-2",
                          {"content": {"text": "eggs, milk: a shopping list"}})
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, "summarize,embed",
                           executor=effects.executor) as daemon, \
            Producer(settings) as producer:
        pool = effects.pool
        assert pool is not None
        await producer.publish(article)
        await producer.publish(shopping)
        await wait_for(lambda: _has(pool, "art-1", "reminded"), timeout=30,
                       message="the summary's reminder came back")
        await wait_for(lambda: _has(pool, "art-1", "embedded"), timeout=30,
                       message="the summary embedded")
        await wait_for(lambda: _has(pool, "art-2", "failed:content_too_short"), timeout=30,
                       message="the failed summary reported")
        # the follow-up embedding again (a redelivery, a replay): covered, not run
        done = daemon.status().tasks_done
        follow_up = build_task(TaskType.EMBED_VECTORS, "art-1", {
            "content": {"text": "another text"}, "options": {"embeddingType": "summary"}})
        await producer.publish(follow_up)

        def skipped() -> float:
            return sum(s.value for m in daemon.metrics.skipped.collect() for s in m.samples
                       if s.name == "mlpipe_skipped_total"
                       and s.labels["reason"] == "summary already embedded")

        # its skip is counted when it settles (tasks_done also counts control messages)
        await wait_for(lambda: skipped() >= 1, timeout=30,
                       message="the repeated embedding skipped")
        await wait_for(lambda: daemon.status().tasks_done > done, timeout=30,
                       message="the repeated embedding settled")
        art1 = await _steps(pool, "art-1")
        art2 = await _steps(pool, "art-2")
    assert embedded == [("art-1", "summary", "Rockets reach orbit by going sideways very fast.")]
    assert sorted(art1) == ["embedded", "reminded", "started", "summarized"]
    assert art1.index("started") < art1.index("summarized") < art1.index("embedded")
    assert art2[0] == "started"
    assert "failed:content_too_short" in art2
    assert "summarized" not in art2
    assert skipped() == 1


async def _has(pool: asyncpg.Pool, share: str, step: str) -> bool:
    return bool(await _steps(pool, share, step))
