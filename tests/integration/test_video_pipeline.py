"""The video workflow end to end with the shipped handlers and their offline backends: local
Whisper, the extractive summarizer and the local MiniLM embedder, on the real broker, Redis and
the pgvector Postgres.

Transcription runs in its own daemon (as it does in production: one Deployment per queue), which
the test starts only after checking the caption is searchable: that is how "searchable before
the transcription finishes" is shown without racing a timer.
"""

from __future__ import annotations

import wave
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from consumers import build_registry
from mlpipe.contract.models import EmbedTask, Task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.search import Hit, search
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from mlpipe.workflow import video
from mlpipe.workflow.submit import submit_video
from tests.conftest import REDIS_URL
from tests.media_fixtures import SENTENCE, speech_clip, text_renamed_mp4, whisper_model_dir

pytestmark = pytest.mark.timeout(300)

CAPTION = "Our weekly finance team reminder"
HASHTAGS = ["finance", "reports"]


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str, media_root: Path,
             model_dir: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix, media_roots=[str(media_root)],
                    whisper_model_dir=str(whisper_model_dir()),
                    embedding_model_dir=model_dir,
                    retry=RetryPolicy(max_retries=1, base_delay_s=0.2, max_delay_s=0.5))


def counting(settings: Settings, runs: Counter[str]) -> Registry:
    """The shipped registry, each handler counted (embeddings by content type)."""
    shipped = build_registry(settings)
    registry = Registry()
    for name, factory in shipped.resources.items():
        registry.add_resource(name, factory)
    for spec in shipped:
        async def counted(task: Task, ctx: TaskContext, _func: Any = spec.func) -> HandlerResult:
            key = task.task_type.value
            if isinstance(task, EmbedTask):
                key += f":{task.payload.content.type.value if task.payload.content.type else ''}"
            runs[key] += 1
            result: HandlerResult = await _func(task, ctx)
            return result

        registry.register(spec.task_type, counted, timeout_s=spec.timeout_s,
                          expected_runtime_s=spec.expected_runtime_s,
                          estimate_cost=spec.estimate_cost)
    for workflow in shipped.workflows:
        registry.add_workflow(workflow)
    return registry


class Stack:
    """Daemons started one by one, all closed at the end in reverse order."""

    def __init__(self, settings: Settings, stack: AsyncExitStack) -> None:
        self.settings = settings
        self.stack = stack
        self.runs: Counter[str] = Counter()
        self.registry = counting(settings, self.runs)
        self.effects: Effects
        self.producer: Producer

    async def daemon(self, queues: str) -> None:
        await self.stack.enter_async_context(running_daemon(
            self.settings, self.registry, queues, executor=self.effects.executor))

    async def state(self, share: str) -> video.WorkflowStatus | None:
        assert self.effects.pool is not None
        return await video.status(self.effects.pool, share)

    async def hits(self, query: str, share: str) -> list[Hit]:
        assert self.effects.pool is not None
        embed = self.embedder()
        return await search(self.effects.pool, query, embedder=embed, share_id=share, limit=20)

    def embedder(self) -> Any:
        from mlpipe.embedding.local import MODEL_NAME, LocalEmbedder

        local = LocalEmbedder(self.settings.embedding_model_dir)

        async def embed(texts: list[str]) -> Any:
            return (await local(texts, MODEL_NAME)).vectors

        return embed


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exits:
        s = Stack(settings, exits)
        s.effects = await exits.enter_async_context(Effects(settings))
        s.producer = await exits.enter_async_context(Producer(settings))
        yield s


async def test_video_share_end_to_end_with_offline_backends(stack: Stack,
                                                           media_root: Path) -> None:
    clip = speech_clip(media_root / "finance.wav", SENTENCE)
    await stack.daemon("summarize_local,embed_local")
    # a share-sheet double-fire: the same video submitted twice at once
    for _ in range(2):
        await submit_video(stack.producer, "vid-e2e", str(clip), caption=CAPTION,
                           hashtags=HASHTAGS, platform="tiktok", backend="local")

    async def caption_searchable() -> bool:
        hits = await stack.hits("finance team reminder", "vid-e2e")
        return any(h.chunk_text == CAPTION for h in hits)

    await wait_for(caption_searchable, timeout=60, message="caption searchable")
    assert stack.runs["transcribe_whisper"] == 0  # transcription has not even started
    st = await stack.state("vid-e2e")
    assert st is None or st.state in ("video_pending", "video_transcribing")

    await stack.daemon("transcribe_local")

    async def completed() -> bool:
        st = await stack.state("vid-e2e")
        return st is not None and st.state == "completed"

    await wait_for(completed, timeout=180, interval=0.5, message="workflow completed")
    st = await stack.state("vid-e2e")
    assert st is not None
    assert [h["state"] for h in st.history] == [
        "video_pending", "video_transcribing", "video_summarizing", "completed"]

    # the rich embedding replaced the caption-only one: search finds the spoken words, with
    # where they are in the clip; summary, caption and hashtags are a chunk of their own
    hits = await stack.hits("send the weekly report to finance before Friday", "vid-e2e")
    assert hits
    assert all(h.chunk_text != CAPTION for h in hits)
    spoken = hits[0]
    assert "friday" in spoken.chunk_text.lower()
    assert spoken.start_s is not None
    assert spoken.end_s is not None
    with wave.open(str(clip)) as wav:
        duration = wav.getnframes() / wav.getframerate()
    assert 0 <= spoken.start_s < spoken.end_s <= duration + 0.5, (spoken, duration)
    [lead] = [h for h in hits if h.start_s is None]
    assert lead.chunk_index == 0
    assert lead.end_s is None
    assert CAPTION in lead.chunk_text
    assert "#finance #reports" in lead.chunk_text
    assert stack.runs == Counter({"transcribe_whisper": 1, "summarize_video_combined": 1,
                                  "embed_vectors:caption": 1, "embed_vectors:transcript": 1})
    assert await list_dead(stack.settings) == []


async def test_failed_transcription_keeps_the_caption_searchable(stack: Stack,
                                                               media_root: Path) -> None:
    bogus = text_renamed_mp4(media_root / "not-a-video.mp4")
    await stack.daemon("transcribe_local,summarize_local,embed_local")
    await submit_video(stack.producer, "vid-bad", str(bogus), caption=CAPTION,
                       hashtags=HASHTAGS, backend="local")

    async def failed() -> bool:
        st = await stack.state("vid-bad")
        return st is not None and st.state == "failed_transcription"

    await wait_for(failed, timeout=60, interval=0.5, message="failed_transcription")

    async def caption_searchable() -> bool:
        hits = await stack.hits("finance team reminder", "vid-bad")
        return [h.chunk_text for h in hits] == [CAPTION]

    await wait_for(caption_searchable, timeout=30, message="caption still searchable")
    assert stack.runs["summarize_video_combined"] == 0
    assert stack.runs["embed_vectors:transcript"] == 0
    [dead] = await list_dead(stack.settings)
    assert dead.share_id == "vid-bad"
