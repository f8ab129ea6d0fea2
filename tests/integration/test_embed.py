"""Embeddings end to end: chunk, embed (local MiniLM on onnxruntime, or the OpenAI-compatible
API against tests/fake_openai.py), store in pgvector, search in Postgres; micro-batching across
concurrent deliveries through the real daemon with the effects executor."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import numpy as np
import pytest
from pydantic import SecretStr

from consumers.embed import LOCAL_BATCHER, register
from consumers.embed.chunking import Chunk
from consumers.embed.handler import api_model
from consumers.embed.store import ChunkStore
from mlpipe.backends import token_cost
from mlpipe.broker.topology import Topology
from mlpipe.cli.search import build_parser, run_search
from mlpipe.contract.models import EmbeddingType, EmbedOptions, Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.embedding.backend import BatchOutput, Vector
from mlpipe.embedding.batcher import Batcher
from mlpipe.embedding.local import MODEL_NAME, LocalEmbedder
from mlpipe.embedding.searcher import Searcher
from mlpipe.errors import PermanentError, TransientError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.search import search, search_sql, similar_to_share
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.store.pool import create_pool
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL
from tests.fake_openai import FakeOpenAI


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str,
             model_dir: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix, embedding_model_dir=model_dir,
                    retry=RetryPolicy(max_retries=3, base_delay_s=0.2, max_delay_s=1.0),
                    shutdown_grace_s=10)


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """The effects layer's kind of pool: no vector codec, which search must not need."""
    p = await create_pool(settings.database_url, schema=settings.database_schema, size=2)
    yield p
    await p.close()


def embed_task(share: str, text: str, *, backend: str | None = "local",
               segments: list[dict[str, Any]] | None = None, **content: Any) -> Task:
    options: dict[str, Any] = {"backend": backend} if backend else {}
    options.update(content.pop("options", {}))
    return build_task(TaskType.EMBED_VECTORS, share, {
        "content": {"text": text, **({"segments": segments} if segments else {}), **content},
        "options": options})


@asynccontextmanager
async def pipeline(settings: Settings, queue: str,
                   registry: Registry | None = None) -> AsyncIterator[tuple[Any, Producer]]:
    if registry is None:
        registry = Registry()
        register(registry, settings)
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, queue, executor=effects.executor) as daemon, \
            Producer(settings) as producer:
        yield daemon, producer
    leaked = [t for t in asyncio.all_tasks() if t.get_name().startswith("mlpipe.embed")]
    assert leaked == [], "batcher tasks outlived the daemon"


async def run_tasks(settings: Settings, queue: str, tasks: Sequence[Task]) -> None:
    async with pipeline(settings, queue) as (daemon, producer):
        for task in tasks:
            await producer.publish(task)
        await wait_for(lambda: daemon.status().tasks_done >= len(tasks), timeout=60,
                       message=f"{len(tasks)} embed tasks done")
    assert await list_dead(settings) == []


async def local_embed(model_dir: str, texts: list[str]) -> list[Vector]:
    return (await LocalEmbedder(model_dir)(texts, MODEL_NAME)).vectors


async def queue_depth(settings: Settings, short_name: str) -> int:
    conn = await aio_pika.connect(settings.broker_url)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(Topology().queue_name(short_name), passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await conn.close()


# --- search with the local model --------------------------------------------------------------

DOCS = {
    "rockets": ("youtube", "How rockets reach orbit: a launch vehicle burns liquid fuel and "
                "oxidizer, accelerating sideways so fast that the payload keeps falling around "
                "the Earth instead of back down to it."),
    "sourdough": ("blog", "Baking sourdough bread at home: feed the starter with flour and "
                  "water, let the dough ferment overnight, then bake it in a hot Dutch oven "
                  "for a crisp crust."),
    "marathon": ("blog", "Training for your first marathon: build up weekly mileage slowly, "
                 "do one long run every weekend and taper for two weeks before race day."),
    "taxes": ("news", "Filing income taxes as a freelancer: keep receipts for business "
              "expenses, pay estimated tax every quarter and deduct your home office."),
    "cats": ("tiktok", "Why cats purr: the vibration comes from muscles in the larynx and "
             "usually signals contentment, although cats also purr when stressed or hurt."),
    "asyncio": ("blog", "Python asyncio lets one thread serve thousands of network connections "
                "by switching between coroutines whenever one of them waits for I/O."),
    "station": ("youtube", "Astronauts aboard the International Space Station circle the "
                "planet every ninety minutes and run experiments in microgravity."),
}
QUERIES = {
    "what does a spacecraft need to get into orbit": "rockets",
    "how to make bread with a wild yeast starter": "sourdough",
    "preparing to run 42 kilometres": "marathon",
    "self-employed tax deductions and paperwork": "taxes",
    "the sound a kitten makes when it is happy": "cats",
    "concurrent programming with coroutines and an event loop": "asyncio",
}


async def test_search_returns_the_right_document_first(settings: Settings, pool: asyncpg.Pool,
                                                       model_dir: str) -> None:
    await run_tasks(settings, "embed_local", [
        embed_task(share, text, platform=platform, type="article", title=share.title())
        for share, (platform, text) in DOCS.items()])

    async def embed(texts: list[str]) -> list[Vector]:
        return await local_embed(model_dir, texts)

    for query, expected in QUERIES.items():
        hits = await search(pool, query, embedder=embed, limit=3)
        assert hits[0].share_id == expected, (query, hits)
        assert hits[0].similarity > hits[1].similarity
        assert 0 < hits[0].similarity <= 1.0001
        assert hits[0].metadata["title"] == expected.title()
        assert hits[0].chunk_text == DOCS[expected][1]

    # filters: the best orbit match on blogs cannot be the YouTube rocket video
    hits = await search(pool, "getting into orbit", embedder=embed, platform="blog")
    assert hits
    assert all(h.metadata["platform"] == "blog" for h in hits)
    assert await search(pool, "orbit", embedder=embed, content_type="transcript") == []
    [only] = await search(pool, "orbit", embedder=embed, share_id="cats")
    assert only.share_id == "cats"

    related = await similar_to_share(pool, "rockets", limit=3)
    assert related[0].share_id == "station"
    assert "rockets" not in {h.share_id for h in related}
    assert len({h.share_id for h in related}) == len(related)  # one hit per share

    # the settings-only Python API: same answers, plus the embedding-type filter
    async with Searcher(settings, backend="local") as searcher:
        assert searcher.model == MODEL_NAME
        [hit] = await searcher.search("how to make bread with a wild yeast starter", limit=1)
        assert (hit.share_id, hit.chunk_index) == ("sourdough", 0)
        assert await searcher.search("bread", embedding_type="summary") == []
        content = await searcher.search("bread", embedding_type="content", limit=3)
        assert [h.embedding_type for h in content] == ["content"] * 3
        assert (await searcher.similar("rockets", limit=1))[0].share_id == "station"

    [row] = await pool.fetch("SELECT result_data, model_version FROM ml_results "
                             "WHERE share_id = 'cats'")
    assert row["result_data"] == {"chunks": 1, "model": MODEL_NAME, "dims": 384,
                                  "embedding_type": "content", "backend": "local"}
    assert await pool.fetchval("SELECT count(*) FROM ml_costs") == 0  # local is free


#: A log line of structlog's console renderer: an unconfigured structlog in the test process
#: prints the local model's load line to stdout (the CLI itself sends logs to stderr).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def command_output(capsys: pytest.CaptureFixture[str]) -> str:
    """What the command printed, without the log lines."""
    return "\n".join(line for line in capsys.readouterr().out.splitlines()
                     if not LOG_LINE.match(line))


async def test_search_cli(settings: Settings, model_dir: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    await run_tasks(settings, "embed_local", [
        embed_task(share, text, platform=platform) for share, (platform, text) in DOCS.items()])
    capsys.readouterr()  # the daemon's logs
    parser = build_parser()
    args = parser.parse_args(["how to make bread with a wild yeast starter", "--limit", "2",
                              "--json", "--backend", "local"])
    assert await run_search(args, settings) == 0
    hits = json.loads(command_output(capsys))
    assert hits[0]["share_id"] == "sourdough"
    assert len(hits) == 2
    assert await run_search(parser.parse_args(["--share", "rockets", "--backend", "local"]),
                            settings) == 0
    out = command_output(capsys)
    assert out.splitlines()[0].split()[1].startswith("station#")
    assert await run_search(parser.parse_args(["--backend", "local"]), settings) == 2
    # time bounds: everything was embedded just now
    for bound, found in ((["--until", "2000-01-01"], False), (["--since", "2000-01-01"], True)):
        assert await run_search(parser.parse_args(["bread", "--json", "--backend", "local",
                                                   *bound]), settings) == 0
        hits = json.loads(command_output(capsys))
        assert bool(hits) is found, bound
    assert dt.datetime.fromisoformat(hits[0]["indexed_at"]) > dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    assert await run_search(parser.parse_args(["--share", "nope", "--backend", "local"]),
                            settings) == 1

    # the installed command, as a user runs it (settings from the environment)
    env = {**os.environ, "MLPIPE_DATABASE_URL": settings.database_url,
           "MLPIPE_DATABASE_SCHEMA": settings.database_schema,
           "MLPIPE_EMBEDDING_MODEL_DIR": model_dir}
    env.pop("MLPIPE_OPENAI_API_KEY", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "search", "the sound a kitten makes when it is happy",
        "--limit", "1", "--platform", "tiktok", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    [hit] = json.loads(out)
    assert (hit["share_id"], hit["metadata"]["platform"]) == ("cats", "tiktok")
    assert 0 < hit["similarity"] <= 1.0001


# --- transcripts ------------------------------------------------------------------------------

SEGMENTS = [
    (0, 10, "Welcome back to the channel, today we have three topics."),
    (10, 20, "First, let's cook pasta: boil salted water in a large pot."),
    (20, 30, "Add the spaghetti and stir so it does not stick together."),
    (30, 40, "Drain the pasta and toss it with tomato sauce and fresh basil."),
    (40, 50, "That is dinner done in fifteen minutes."),
    (50, 60, "Now, the weather for the weekend."),
    (60, 70, "Heavy rain and thunderstorms are expected on Saturday afternoon."),
    (70, 80, "Sunday will be cooler with strong winds from the north."),
    (80, 90, "Bring an umbrella if you go out."),
    (90, 100, "Finally, some football news."),
    (100, 110, "The home team won the cup final with a late penalty goal."),
    (110, 120, "Their striker scored twice and was named player of the match."),
    (120, 130, "That is all for today, see you next week."),
]


async def test_transcript_chunks_keep_timestamps_and_search_returns_them(
        settings: Settings, pool: asyncpg.Pool, model_dir: str) -> None:
    segments = [{"start": s, "end": e, "text": t} for s, e, t in SEGMENTS]
    text = " ".join(t for _, _, t in SEGMENTS)
    await run_tasks(settings, "embed_local", [
        embed_task("video-1", text, segments=segments, type="transcript", platform="youtube"),
        embed_task("other", "A recipe blog post about lasagne with spinach.")])

    rows = await pool.fetch("SELECT chunk_index, start_s, end_s, chunk_text, metadata "
                            "FROM ml_embeddings WHERE share_id = 'video-1' ORDER BY chunk_index")
    assert len(rows) >= 3
    for row in rows:
        assert row["metadata"]["chunk_strategy"] == "transcript"
        assert 30 <= row["end_s"] - row["start_s"] <= 60
        first = next(s for s in SEGMENTS if s[0] == row["start_s"])
        assert row["chunk_text"].startswith(first[2])
    assert rows[0]["start_s"] == 0
    assert rows[-1]["end_s"] == 130

    async def embed(texts: list[str]) -> list[Vector]:
        return await local_embed(model_dir, texts)

    for query, (start, end) in {"will it rain this weekend": (60, 70),
                                "who scored the winning goal in the final": (100, 110),
                                "how long to boil spaghetti": (20, 30)}.items():
        hit = (await search(pool, query, embedder=embed, content_type="transcript"))[0]
        assert hit.share_id == "video-1"
        assert hit.start_s is not None
        assert hit.end_s is not None
        assert hit.start_s <= start
        assert hit.end_s >= end, (query, hit)


async def test_a_lead_is_embedded_untimed_ahead_of_the_transcript_windows(
        settings: Settings, pool: asyncpg.Pool, model_dir: str) -> None:
    """A video's rich embedding: summary and caption as a lead with no time in the media, the
    transcript in timestamped windows after it."""
    segments = [{"start": s, "end": e, "text": t} for s, e, t in SEGMENTS]
    lead = ("A news roundup: a pasta recipe, the weekend weather and a cup final.\n\n"
            "Sunday evening news #weather #football")
    await run_tasks(settings, "embed_local", [
        embed_task("video-2", " ".join(t for _, _, t in SEGMENTS), segments=segments,
                   type="transcript", lead=lead)])

    rows = await pool.fetch("SELECT chunk_index, start_s, end_s, chunk_text, metadata "
                            "FROM ml_embeddings WHERE share_id = 'video-2' ORDER BY chunk_index")
    assert (rows[0]["chunk_text"], rows[0]["start_s"], rows[0]["end_s"]) == (lead, None, None)
    assert len(rows) >= 4
    assert rows[1]["start_s"] == 0
    assert rows[-1]["end_s"] == 130
    assert all(r["start_s"] is not None and 30 <= r["end_s"] - r["start_s"] <= 60
               for r in rows[1:])
    assert not any(lead in r["chunk_text"] for r in rows[1:])

    async def embed(texts: list[str]) -> list[Vector]:
        return await local_embed(model_dir, texts)

    [about] = await search(pool, "what topics does this news roundup cover", embedder=embed,
                           limit=1)
    assert (about.chunk_index, about.start_s) == (0, None)
    rain = (await search(pool, "will it rain this weekend", embedder=embed))[0]
    assert rain.start_s is not None
    assert rain.end_s is not None
    assert (rain.start_s <= 60, rain.end_s >= 70) == (True, True), rain


# --- the API backend --------------------------------------------------------------------------


async def test_api_backend_request_shape_and_cost_from_usage(settings: Settings,
                                                             pool: asyncpg.Pool) -> None:
    paragraphs = [" ".join(f"word{p}x{w}" for w in range(60)) for p in range(20)]
    long_text = "\n\n".join(paragraphs)
    async with FakeOpenAI() as api:
        s = settings.model_copy(update={"openai_api_key": SecretStr("test-key"),
                                        "openai_base_url": api.base_url})
        await run_tasks(s, "embed", [
            embed_task("long", long_text, backend=None),
            embed_task("big", "A short text for the large model.", backend=None,
                       options={"model": "text-embedding-3-large",
                                "embeddingType": "summary"})])
    by_model = {r.json["model"]: r for r in api.requests if r.json is not None}
    assert {r.path for r in api.requests} == {"/v1/embeddings"}
    small = by_model["text-embedding-3-small"].json
    assert small is not None
    assert isinstance(small["input"], list)
    assert len(small["input"]) > 1  # one request carries every chunk
    assert " ".join(small["input"]).split() == long_text.split()
    large = by_model["text-embedding-3-large"].json
    assert large is not None
    assert large["input"] == ["A short text for the large model."]

    usage_tokens = len(long_text.split())  # what the fake bills
    [cost] = await pool.fetch("SELECT model, units, unit_kind, usd FROM ml_costs "
                              "WHERE share_id = 'long'")
    assert cost["model"] == "text-embedding-3-small"
    assert cost["unit_kind"] == "tokens"
    assert cost["units"] == usage_tokens
    assert cost["usd"] == round(token_cost("text-embedding-3-small", usage_tokens), 6)
    assert cost["usd"] > 0
    [row] = await pool.fetch("SELECT result_data FROM ml_results WHERE share_id = 'long'")
    assert row["result_data"] == {"chunks": len(small["input"]),
                                  "model": "text-embedding-3-small", "dims": 8,
                                  "embedding_type": "content", "backend": "api"}
    dims = await pool.fetch("SELECT DISTINCT dims, model, embedding_type FROM ml_embeddings "
                            "WHERE share_id = 'big'")
    assert [tuple(d) for d in dims] == [(8, "text-embedding-3-large", "summary")]


# --- micro-batching ---------------------------------------------------------------------------


async def test_concurrent_deliveries_share_backend_calls(settings: Settings,
                                                         pool: asyncpg.Pool) -> None:
    n = 24
    s = settings.model_copy(update={"embed_batch_wait_ms": 200.0})
    async with pipeline(s, "embed_local") as (daemon, producer):
        await asyncio.gather(*(producer.publish(embed_task(f"b{i}", f"Message {i} about "
                                                            f"topic {i % 5}."))
                               for i in range(n)))
        await wait_for(lambda: daemon.status().tasks_done >= n, timeout=60,
                       message="all deliveries done")
        stats = daemon.resources[LOCAL_BATCHER].stats()
        histogram = {s.name: s.value for m in daemon.metrics.embedding_batch.collect()
                     for s in m.samples}
    assert stats.requests == n
    # the daemon's batch-size histogram saw every backend call
    assert histogram["mlpipe_embedding_batch_size_count"] == stats.batches
    assert histogram["mlpipe_embedding_batch_size_sum"] == n
    assert stats.texts == n
    assert stats.batches < n / 2, stats
    assert stats.largest_batch > 1
    # ... yet every delivery was acked and stored on its own
    assert await queue_depth(s, "embed_local") == 0
    assert await list_dead(s) == []
    stored = await pool.fetch("SELECT share_id FROM ml_results")
    assert sorted(r["share_id"] for r in stored) == sorted(f"b{i}" for i in range(n))
    assert await pool.fetchval("SELECT count(*) FROM ml_embeddings") == n


async def test_a_failing_batch_fails_every_caller_transiently_and_all_are_retried(
        settings: Settings, pool: asyncpg.Pool) -> None:
    n = 6
    attempts: list[tuple[str, int, str]] = []
    async with FakeOpenAI() as api:
        api.fail_next = [500]
        s = settings.model_copy(update={"openai_api_key": SecretStr("test-key"),
                                        "openai_base_url": api.base_url,
                                        # all n queued deliveries join one batch
                                        "embed_batch_wait_ms": 1000.0})
        inner = Registry()
        register(inner, s)
        spec = inner.get(TaskType.EMBED_VECTORS)
        registry = Registry()
        for name, factory in inner.resources.items():
            registry.add_resource(name, factory)

        async def recording(task: Task, ctx: TaskContext) -> HandlerResult:
            try:
                result = await spec.func(task, ctx)
            except TransientError as exc:
                attempts.append((task.share_id, ctx.attempt, exc.reason))
                raise
            attempts.append((task.share_id, ctx.attempt, "ok"))
            return result

        registry.register(TaskType.EMBED_VECTORS, recording, timeout_s=spec.timeout_s,
                          expected_runtime_s=spec.expected_runtime_s,
                          estimate_cost=spec.estimate_cost)
        async with Producer(s) as producer:  # queued before the daemon: one first batch
            for i in range(n):
                await producer.publish(embed_task(f"f{i}", f"Text number {i}.", backend=None))
        async with pipeline(s, "embed", registry) as _:
            await wait_for(lambda: sum(1 for a in attempts if a[2] == "ok") == n, timeout=30,
                           message="every task succeeded after its retry")
    first = api.requests[0].json
    assert first is not None
    assert len(first["input"]) == n
    for i in range(n):
        mine = [(attempt, outcome) for share, attempt, outcome in attempts if share == f"f{i}"]
        assert mine == [(1, "api_unavailable"), (2, "ok")], (i, mine)
    assert await list_dead(s) == []
    assert await pool.fetchval("SELECT count(*) FROM ml_results") == n


# --- the batcher on its own -------------------------------------------------------------------


class ScriptedBackend:
    """A backend whose vectors name their text, and that can be told to fail."""

    default_model = "scripted"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail_with: Exception | None = None
        self.reject: str | None = None

    async def __call__(self, texts: Sequence[str], model: str) -> BatchOutput:
        self.calls.append(list(texts))
        await asyncio.sleep(0)
        if self.fail_with is not None:
            raise self.fail_with
        if self.reject is not None and self.reject in texts:
            raise PermanentError("input rejected", reason="api_rejected")
        vectors = [np.array([float(t.split("-")[1])], dtype=np.float32) for t in texts]
        return BatchOutput(vectors, tokens=10 * len(texts))

    async def aclose(self) -> None:
        pass


async def test_batcher_slices_results_and_splits_tokens() -> None:
    backend = ScriptedBackend()
    async with Batcher(backend, max_batch=100, max_wait_s=0.05) as batcher:
        requests = [[f"t-{r * 10 + k}" for k in range(r + 1)] for r in range(8)]
        answers = await asyncio.gather(*(batcher.submit(texts) for texts in requests))
        assert len(backend.calls) == 1
        for texts, answer in zip(requests, answers, strict=True):
            assert [float(v[0]) for v in answer.vectors] == [float(t[2:]) for t in texts]
        assert sum(a.tokens or 0 for a in answers) == 10 * sum(len(r) for r in requests)
        assert batcher.stats().batches == 1
        # a full batch goes at once; the rest waits for the deadline
        backend.calls.clear()
        small = Batcher(backend, max_batch=4, max_wait_s=10)
        async with small:
            out = await asyncio.wait_for(small.embed([f"t-{k}" for k in range(4)]), 1)
            assert len(out) == 4
            big = await asyncio.wait_for(small.embed([f"t-{k}" for k in range(10)]), 1)
            assert [float(v[0]) for v in big] == [float(k) for k in range(10)]
            assert [len(c) for c in backend.calls] == [4, 4, 4, 2]


async def test_batcher_failure_reaches_every_caller_as_its_own_transient_error() -> None:
    backend = ScriptedBackend()
    backend.fail_with = RuntimeError("model exploded")
    async with Batcher(backend, max_batch=100, max_wait_s=0.05) as batcher:
        results = await asyncio.gather(*(batcher.embed([f"t-{i}"]) for i in range(5)),
                                       return_exceptions=True)
    assert len(backend.calls) == 1
    assert all(isinstance(r, TransientError) for r in results)
    errors = [r for r in results if isinstance(r, TransientError)]
    assert {e.reason for e in errors} == {"embed_batch_failed"}
    assert len({id(e) for e in errors}) == 5
    assert all(e.__cause__ is backend.fail_with for e in errors)
    assert batcher.stats().failed_batches == 1
    with pytest.raises(TransientError, match="not running"):
        await batcher.embed(["t-1"])


async def test_batcher_isolates_a_rejected_input_instead_of_failing_its_neighbours() -> None:
    backend = ScriptedBackend()
    backend.reject = "t-3"
    async with Batcher(backend, max_batch=100, max_wait_s=0.05) as batcher:
        results = await asyncio.gather(*(batcher.embed([f"t-{i}"]) for i in range(5)),
                                       return_exceptions=True)
    assert isinstance(results[3], PermanentError)
    assert [float(r[0][0]) for n, r in enumerate(results) if n != 3
            and isinstance(r, list)] == [0.0, 1.0, 2.0, 4.0]
    assert len(backend.calls) == 1 + 5


async def test_a_cancelled_caller_is_skipped() -> None:
    backend = ScriptedBackend()
    async with Batcher(backend, max_batch=100, max_wait_s=0.1) as batcher:
        doomed = asyncio.create_task(batcher.embed(["t-1"]))
        kept = asyncio.create_task(batcher.embed(["t-2"]))
        await wait_for(lambda: batcher.stats().requests == 2, message="both submitted")
        doomed.cancel()
        assert [float(v[0]) for v in await kept] == [2.0]
    assert backend.calls == [["t-2"]]


# --- storage and the index --------------------------------------------------------------------


async def test_reembedding_with_fewer_chunks_deletes_the_rest(settings: Settings,
                                                              pool: asyncpg.Pool) -> None:
    rng = np.random.default_rng(1)

    def vectors(n: int) -> list[Vector]:
        return [v / np.linalg.norm(v) for v in rng.standard_normal((n, 384)).astype(np.float32)]

    async with ChunkStore(settings) as store:
        for count in (4, 2):
            chunks = [Chunk(i, f"v{count} chunk {i}", 3) for i in range(count)]
            await store.replace_chunks(share_id="s", embedding_type="content", model="m",
                                       chunks=chunks, vectors=vectors(count),
                                       content_hashes=[f"h{i}" for i in range(count)],
                                       metadata={"platform": "x"})
        await store.replace_chunks(share_id="s", embedding_type="summary", model="m",
                                   chunks=[Chunk(0, "summary", 1)], vectors=vectors(1),
                                   content_hashes=["h"], metadata={})
    rows = await pool.fetch("SELECT embedding_type, chunk_index, chunk_text, metadata "
                            "FROM ml_embeddings ORDER BY embedding_type, chunk_index")
    assert [(r["embedding_type"], r["chunk_index"], r["chunk_text"]) for r in rows] == [
        ("content", 0, "v2 chunk 0"), ("content", 1, "v2 chunk 1"), ("summary", 0, "summary")]
    assert rows[0]["metadata"] == {"platform": "x", "tokens": 3}


async def test_searches_can_use_the_hnsw_partial_index(settings: Settings,
                                                       pool: asyncpg.Pool) -> None:
    rng = random.Random(7)
    async with ChunkStore(settings) as store:
        for share in range(50):
            vecs = [np.array([rng.gauss(0, 1) for _ in range(384)], dtype=np.float32)
                    for _ in range(4)]
            await store.replace_chunks(
                share_id=f"s{share}", embedding_type="content", model=MODEL_NAME,
                chunks=[Chunk(i, f"text {share}/{i}", 2) for i in range(4)], vectors=vecs,
                content_hashes=["h"] * 4, metadata={"platform": "p"})
    query = "[" + ",".join("0.05" for _ in range(384)) + "]"
    async with pool.acquire() as conn:
        await conn.execute("ANALYZE ml_embeddings")
        # 200 rows are cheaper to scan and sort than to walk a graph; at ~12k rows the planner
        # picks the HNSW index unprompted. Here it is nudged, to prove the queries *can* use it
        # (same expression and predicate as the partial index).
        for knob in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            await conn.execute(f"SET {knob} = off")
        for sql, args in ((search_sql(384, ["model = $3"]), [query, 10, MODEL_NAME]),
                          (search_sql(384, ["model = $3", "metadata->>'platform' = $4"]),
                           [query, 10, MODEL_NAME, "p"]),
                          (search_sql(384, ["model = $3", "share_id <> $4"],
                                      best_per_share=True), [query, 100, MODEL_NAME, "s1"])):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
            assert "ml_embeddings_minilm_hnsw" in plan, plan
    hits = await similar_to_share(pool, "s3", limit=5)
    assert len(hits) == 5
    assert "s3" not in {h.share_id for h in hits}
    assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)


async def test_time_bounds_find_recent_chunks_far_below_the_top_of_the_ranking(
        settings: Settings, pool: asyncpg.Pool) -> None:
    """1,200 old chunks sit right next to the query; the three recent ones are far away, so
    they are not among the top 1,000 hits (the most ``search`` returns). A time bound is
    applied while the index is walked, so it still finds them."""
    rng = np.random.default_rng(11)
    target = rng.normal(size=384).astype(np.float32)

    def near() -> np.ndarray:
        return (target + rng.normal(scale=0.05, size=384)).astype(np.float32)

    async with ChunkStore(settings) as store:
        for share in range(120):  # the crowd: 10 chunks per share, all close to the target
            await store.replace_chunks(
                share_id=f"old{share}", embedding_type="content", model=MODEL_NAME,
                chunks=[Chunk(i, f"old {share}/{i}", 2) for i in range(10)],
                vectors=[near() for _ in range(10)], content_hashes=["h"] * 10,
                metadata={"platform": "p"})
        await pool.execute("UPDATE ml_embeddings SET created_at = now() - interval '10 days'")
        for share in range(3):
            await store.replace_chunks(
                share_id=f"new{share}", embedding_type="content", model=MODEL_NAME,
                chunks=[Chunk(0, f"new {share}", 2)],
                vectors=[rng.normal(size=384).astype(np.float32)], content_hashes=["h"],
                metadata={"platform": "p"})
        await store.replace_chunks(  # a recent share whose own vector is the target
            share_id="anchor", embedding_type="content", model=MODEL_NAME,
            chunks=[Chunk(0, "anchor", 1)], vectors=[target], content_hashes=["h"],
            metadata={"platform": "p"})
    cut = await pool.fetchval("SELECT now() - interval '1 day'")
    recent = {"new0", "new1", "new2"}

    top = await search(pool, target, limit=1000)
    assert len(top) == 1000
    assert not recent & {h.share_id for h in top}, "the test needs them below the top 1000"

    async with pool.acquire() as conn:
        await conn.execute("ANALYZE ml_embeddings")
        plans = {}
        for forced in (False, True):
            if forced:  # walk the HNSW graph (ef_search 40), not an exact scan and sort
                for knob in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
                    await conn.execute(f"SET {knob} = off")
            hits = await search(conn, target, since=cut, limit=5, exclude_share_id="anchor")
            assert {h.share_id for h in hits} == recent, forced
            assert all(h.indexed_at >= cut for h in hits)
            assert [h.similarity for h in hits] == sorted((h.similarity for h in hits),
                                                          reverse=True)
            older = await search(conn, target, until=cut, limit=20)
            assert len(older) == 20
            assert all(h.share_id.startswith("old") and h.indexed_at < cut for h in older)
            assert await search(conn, target, since=cut, until=cut, limit=5) == []
            similar = await similar_to_share(conn, "anchor", since=cut, limit=5)
            assert {h.share_id for h in similar} == recent, forced
            sql = search_sql(384, ["model = $3", "created_at >= $4"])
            plans[forced] = "\n".join(r[0] for r in await conn.fetch(
                "EXPLAIN " + sql, str(target.tolist()), 5, MODEL_NAME, cut))
        assert "ml_embeddings_minilm_hnsw" in plans[True], plans[True]

    with pytest.raises(ValueError, match="time zone"):
        await search(pool, target, since=cut.replace(tzinfo=None))


async def test_missing_local_model_dead_letters_with_a_clear_reason(settings: Settings) -> None:
    s = settings.model_copy(update={"embedding_model_dir": str(Path("/nonexistent/model"))})
    async with pipeline(s, "embed_local") as (daemon, producer):
        await producer.publish(embed_task("x", "Some text."))
        await wait_for(lambda: daemon.status().tasks_done >= 1, timeout=30)
    [dead] = await list_dead(s)
    assert dead.reason == "model_unavailable"


def test_cost_estimate_is_zero_locally_and_priced_for_the_api() -> None:
    settings = Settings()
    registry = Registry()
    register(registry, settings)
    spec = registry.get(TaskType.EMBED_VECTORS)
    assert spec.estimate_cost is not None
    text = " ".join("word" for _ in range(300))
    assert spec.estimate_cost(embed_task("l", text)) == Decimal(0)
    api_settings = settings.model_copy(update={"openai_api_key": SecretStr("k")})
    registry = Registry()
    register(registry, api_settings)
    estimate = registry.get(TaskType.EMBED_VECTORS).estimate_cost
    assert estimate is not None
    assert estimate(embed_task("a", text, backend=None)) == token_cost(
        "text-embedding-3-small", 300)
    assert estimate(embed_task("a", " ", backend=None)) == Decimal(0)


def test_api_model_choice_by_size() -> None:
    settings = Settings()
    plain = EmbedOptions()
    assert api_model(settings, plain, 100) == "text-embedding-3-small"
    assert api_model(settings, plain, 10_000) == "text-embedding-3-small"  # large not configured
    large = "text-embedding-3-large"
    assert api_model(settings, plain, 10_000, large) == large
    assert api_model(settings, EmbedOptions(embedding_type=EmbeddingType.COMPOSITE), 10,
                     large) == large
    assert api_model(settings, plain, 100, large) == "text-embedding-3-small"
    assert api_model(settings, EmbedOptions(model="custom"), 10_000, large) == "custom"


def test_cli_arguments() -> None:
    args = build_parser().parse_args(["rockets", "--share", "S", "--limit", "3", "--platform",
                                      "youtube", "--type", "transcript", "--json"])
    assert isinstance(args, argparse.Namespace)
    assert (args.query, args.share, args.limit, args.platform, args.content_type, args.json) == (
        "rockets", "S", 3, "youtube", "transcript", True)
    assert (args.since, args.until) == (None, None)
    args = build_parser().parse_args(["x", "--since", "2024-05-01T12:00:00+02:00",
                                      "--until", "2024-05-08"])
    assert args.since == dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)
    assert args.until.utcoffset() is not None  # a bare date: local midnight
    assert args.until.replace(tzinfo=None) == dt.datetime(2024, 5, 8)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["x", "--since", "last week"])
