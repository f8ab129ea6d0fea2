"""The video workflow with stand-in handlers: states in order, each paid step once, the
caption-only fallback, and duplicate submissions absorbed."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from mlpipe.contract.models import ContentType, EmbedTask, Segment, Task, TaskType
from mlpipe.effects import Effects
from mlpipe.errors import PermanentError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from mlpipe.worker.daemon import Daemon
from mlpipe.workflow import video
from mlpipe.workflow.submit import submit_video
from mlpipe.workflow.video import VideoWorkflow
from tests.conftest import REDIS_URL

QUEUES = "transcribe,summarize,embed"


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix,
                    retry=RetryPolicy(max_retries=1, base_delay_s=0.1, max_delay_s=0.2))


class StandIns:
    def __init__(self, workflow_timeout_s: float = 1800.0) -> None:
        self.runs: Counter[str] = Counter()
        self.embedded: list[tuple[str, str]] = []
        self.embed_tasks: list[EmbedTask] = []
        self.release_transcription = asyncio.Event()
        self.registry = Registry()
        self.registry.register(TaskType.TRANSCRIBE_WHISPER, self.transcribe)
        self.registry.register(TaskType.SUMMARIZE_VIDEO_COMBINED, self.summarize)
        self.registry.register(TaskType.EMBED_VECTORS, self.embed)
        self.registry.add_workflow(VideoWorkflow(workflow_timeout_s))

    async def transcribe(self, task: Task, ctx: TaskContext) -> HandlerResult:
        self.runs["transcribe"] += 1
        await self.release_transcription.wait()
        if "broken" in task.payload.media_url:  # type: ignore[union-attr]
            raise PermanentError("not a media file", reason="unsupported_media")
        if "silent" in task.payload.media_url:  # type: ignore[union-attr]
            return HandlerResult({"status": "silent", "text": "", "segments": []})
        return HandlerResult({"text": "we bake sourdough bread", "segments": [
            {"start": 0.0, "end": 2.0, "text": "we bake sourdough bread"}]})

    async def summarize(self, task: Task, ctx: TaskContext) -> HandlerResult:
        self.runs["summarize"] += 1
        return HandlerResult({"summary": "A sourdough baking video."})

    async def embed(self, task: Task, ctx: TaskContext) -> HandlerResult:
        assert isinstance(task, EmbedTask)
        kind = task.payload.content.type.value if task.payload.content.type else "none"
        self.runs[f"embed:{kind}"] += 1
        self.embedded.append((task.share_id, kind))
        self.embed_tasks.append(task)
        return HandlerResult({"chunks": 1})


Env = tuple[StandIns, Effects, Producer, Daemon]


@pytest.fixture
async def env(settings: Settings) -> AsyncIterator[Env]:
    stand = StandIns()
    async with Effects(settings) as effects, \
            running_daemon(settings, stand.registry, QUEUES, executor=effects.executor) as d, \
            Producer(settings) as producer:
        yield stand, effects, producer, d


def acked(daemon: Daemon, task_type: TaskType) -> float:
    """Deliveries of ``task_type`` the daemon acked (ran, or found done and skipped)."""
    return sum(sample.value for metric in daemon.metrics.tasks.collect()
               for sample in metric.samples
               if sample.name == "mlpipe_tasks_total"
               and sample.labels["task_type"] == task_type.value
               and sample.labels["outcome"] == "ack")


async def state(effects: Effects, share: str) -> str | None:
    assert effects.pool is not None
    st = await video.status(effects.pool, share)
    return st.state if st else None


async def test_video_goes_through_every_state_once(env: Env) -> None:
    stand, effects, producer, daemon = env
    await submit_video(producer, "vid-1", "s3://media/vid-1.mp4", caption="Sourdough in 7 days",
                       hashtags=["sourdough", "baking"])
    await wait_for(lambda: ("vid-1", "caption") in stand.embedded, message="caption embedded")

    async def transcribing() -> bool:  # its delivery may start after the caption's finished
        return await state(effects, "vid-1") == "video_transcribing"

    await wait_for(transcribing, message="transcription under way")  # caption first, in seconds
    stand.release_transcription.set()

    async def completed() -> bool:
        return await state(effects, "vid-1") == "completed"

    await wait_for(completed, timeout=20, message="workflow completed")
    assert effects.pool is not None
    st = await video.status(effects.pool, "vid-1")
    assert st is not None
    assert [h["state"] for h in st.history] == [
        "video_pending", "video_transcribing", "video_summarizing", "completed"]
    assert stand.runs == Counter({"transcribe": 1, "summarize": 1, "embed:caption": 1,
                                  "embed:transcript": 1})
    # the rich embedding: the transcript with its timed segments, the rest as an untimed lead
    [rich] = [t for t in stand.embed_tasks if t.payload.content.type is ContentType.TRANSCRIPT]
    content = rich.payload.content
    assert content.text == "we bake sourdough bread"
    assert content.segments == [Segment(start=0.0, end=2.0, text="we bake sourdough bread")]
    assert content.lead == "A sourdough baking video.\n\nSourdough in 7 days\n\n" \
                           "#sourdough #baking"

    # the same share submitted again, once the first round is settled (its locks released):
    # nothing paid runs again, the rich embedding stays
    await wait_for(lambda: acked(daemon, TaskType.TRANSCRIBE_WHISPER) == 1
                   and acked(daemon, TaskType.EMBED_VECTORS) == 2,
                   message="the first round acked")
    await submit_video(producer, "vid-1", "s3://media/vid-1.mp4", caption="Sourdough in 7 days",
                       hashtags=["sourdough", "baking"])
    await wait_for(lambda: acked(daemon, TaskType.TRANSCRIBE_WHISPER) == 2
                   and acked(daemon, TaskType.EMBED_VECTORS) == 3,
                   message="both resubmitted tasks acked")
    assert stand.runs == Counter({"transcribe": 1, "summarize": 1, "embed:caption": 1,
                                  "embed:transcript": 1})
    assert await state(effects, "vid-1") == "completed"


async def test_failed_transcription_falls_back_to_caption_only(env: Env) -> None:
    stand, effects, producer, _ = env
    stand.release_transcription.set()
    await submit_video(producer, "vid-2", "s3://media/broken.txt", caption="Not really a video")

    async def failed() -> bool:
        return await state(effects, "vid-2") == "failed_transcription"

    await wait_for(failed, timeout=20, message="failed_transcription")
    await wait_for(lambda: ("vid-2", "caption") in stand.embedded, message="caption kept")
    assert stand.runs["summarize"] == 0
    assert stand.runs["embed:transcript"] == 0


async def test_a_silent_video_is_embedded_as_one_untimed_text(env: Env) -> None:
    """No timed segments: the rich embedding is summary, caption and hashtags as one text,
    with no lead (the caption stands in for the missing transcript, and is not repeated)."""
    stand, effects, producer, _ = env
    stand.release_transcription.set()
    await submit_video(producer, "vid-4", "s3://media/silent.mp4", caption="Quiet sunset",
                       hashtags=["sunset"])

    async def completed() -> bool:
        return await state(effects, "vid-4") == "completed"

    await wait_for(completed, timeout=20, message="workflow completed")
    [rich] = [t for t in stand.embed_tasks if t.payload.content.type is ContentType.TRANSCRIPT]
    content = rich.payload.content
    assert (content.segments, content.lead) == (None, None)
    assert content.text == "A sourdough baking video.\n\nQuiet sunset\n\n#sunset"


async def test_workflow_status_command(env: Env, settings: Settings) -> None:
    import json
    import os
    import sys

    stand, effects, producer, _ = env
    stand.release_transcription.set()
    await submit_video(producer, "vid-3", "s3://media/vid-3.mp4", caption="Cats")

    async def completed() -> bool:
        return await state(effects, "vid-3") == "completed"

    await wait_for(completed, timeout=20)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "workflow", "status", "vid-3", "--json",
        env={**os.environ, "MLPIPE_DATABASE_URL": settings.database_url,
             "MLPIPE_DATABASE_SCHEMA": settings.database_schema},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    doc = json.loads(out)
    assert doc["state"] == "completed"
    assert len(doc["history"]) == 4


async def test_transcription_timeout_falls_back_without_polling(
        broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> None:
    settings = Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                        redis_url=REDIS_URL, lock_prefix=lock_prefix, workflow_timeout_s=2.0)
    stand = StandIns(settings.workflow_timeout_s)  # transcription blocks until released
    async with Effects(settings) as effects, \
            running_daemon(settings, stand.registry, QUEUES, executor=effects.executor) as d, \
            Producer(settings) as producer:
        await submit_video(producer, "slow", "s3://media/slow.mp4", caption="A slow upload")

        async def failed() -> bool:
            return await state(effects, "slow") == "failed_transcription"

        await wait_for(failed, timeout=15, message="deadline fired")
        assert effects.pool is not None
        st = await video.status(effects.pool, "slow")
        assert st is not None
        assert "no transcript within 2s" in st.history[-1]["detail"]
        stand.release_transcription.set()  # the transcript finally lands: too late
        # the late result is stored, and the workflow's step taken or not, before its ack
        await wait_for(lambda: acked(d, TaskType.TRANSCRIBE_WHISPER) == 1,
                       message="the late transcript acked")
        assert stand.runs["transcribe"] == 1
        assert await state(effects, "slow") == "failed_transcription"
        assert stand.runs["summarize"] == 0
        assert ("slow", "caption") in stand.embedded


async def test_workflow_gauges_follow_the_states(settings: Settings) -> None:
    from tests.integration.test_observability import scrape

    def gauge(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
              state: str) -> float:
        return samples[("mlpipe_workflow_shares", (("state", state),))]

    stand = StandIns()
    async with Effects(settings) as effects, \
            running_daemon(settings, stand.registry, QUEUES, executor=effects.executor) as d, \
            Producer(settings) as producer:
        assert d.http is not None
        assert d.http.port is not None
        port = d.http.port
        await submit_video(producer, "vid-g", "s3://media/vid-g.mp4", caption="Gauges")
        await wait_for(lambda: ("vid-g", "caption") in stand.embedded, message="caption")

        async def a_second_old() -> bool:  # the gauges are read from the database per scrape
            return (await scrape(port))[("mlpipe_workflow_oldest_age_seconds", ())] >= 1.0

        await wait_for(a_second_old, interval=0.1, message="oldest workflow a second old")
        during = await scrape(port)
        assert gauge(during, "video_transcribing") == 1
        assert gauge(during, "completed") == 0
        assert during[("mlpipe_workflow_oldest_age_seconds", ())] >= 1.0
        stand.release_transcription.set()

        async def completed() -> bool:
            return await state(effects, "vid-g") == "completed"

        await wait_for(completed, timeout=20, message="workflow completed")
        after = await scrape(port)
        assert gauge(after, "completed") == 1
        assert gauge(after, "video_transcribing") == 0
        assert after[("mlpipe_workflow_oldest_age_seconds", ())] == 0
