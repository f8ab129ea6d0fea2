"""The read API (``mlpipe serve``) against real Postgres data: every endpoint, tokens (401/403),
cursors, start-up refusals, the checked-in OpenAPI document, and schemathesis fuzzing the
running server from that document."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.error import HTTPError
from urllib.parse import unquote, urlencode
from urllib.request import Request, urlopen

import aiohttp
import asyncpg
import hypothesis
import numpy as np
import pytest
import schemathesis
from pgvector.asyncpg import register_vector

from mlpipe.api import ApiConfig, ApiConfigError, ApiServer
from mlpipe.api import cursor as api_cursor
from mlpipe.api.models import CostsQuery, SearchQuery, SharePath, SimilarQuery
from mlpipe.embedding.local import MODEL_NAME, LocalEmbedder
from mlpipe.search import MAX_LIMIT, VectorLike, search
from mlpipe.settings import Budget
from mlpipe.store.migrate import migrate
from mlpipe.testing import wait_for

ROOT = Path(__file__).resolve().parents[2]
OPENAPI_FILE = ROOT / "contracts" / "openapi.json"
READER = "reader-token-4f9c2a7e1b"
ADMIN = "admin-token-8d3e6b0c5a"
BUDGETS = {
    "transcribe_whisper": Budget(hourly_usd=1.0, daily_usd=10.0),
    # spent past the hourly ceiling by the seed below
    "summarize_llm": Budget(hourly_usd=0.001, daily_usd=0.0),
    "embed_vectors": Budget(hourly_usd=0.0, daily_usd=0.0),
}
T = TypeVar("T")


# --- data -----------------------------------------------------------------------------------------

def days(n: float) -> dt.timedelta:
    return dt.timedelta(days=n)


def hours(n: float) -> dt.timedelta:
    return dt.timedelta(hours=n)


@dataclass(frozen=True)
class Doc:
    share: str
    platform: str
    content_type: str
    title: str
    chunks: tuple[str, ...]
    #: Embedded this long before the seed.
    age: dt.timedelta
    embedding_type: str = "content"


DOCS = (
    Doc("yt-rocket-1", "youtube", "transcript", "How rockets reach orbit", (
        "A launch vehicle burns liquid fuel and oxidizer to climb out of the thick lower "
        "atmosphere.",
        "To stay in orbit the payload must move sideways so fast that it keeps falling around "
        "the Earth instead of back down to it.",
        "Staging drops empty tanks so the remaining engines push less dead weight."),
        days(3)),
    Doc("yt-rocket-1", "youtube", "transcript", "How rockets reach orbit", (
        "Rockets reach orbit by going sideways very fast; stages drop off on the way up.",),
        days(3), embedding_type="summary"),
    Doc("yt-station-2", "youtube", "transcript", "Life on the space station", (
        "Astronauts aboard the International Space Station circle the planet every ninety "
        "minutes.",
        "They run experiments in microgravity and exercise two hours a day."),
        days(1)),
    Doc("tt-pasta-3", "tiktok", "caption", "Pasta in ten minutes", (
        "Boil salted water, cook the spaghetti, toss it with tomato sauce and fresh basil.",),
        hours(2)),
    Doc("web-bread-4", "web", "article", "Sourdough at home", (
        "Feed the starter with flour and water and let the dough ferment overnight.",
        "Bake the loaf in a hot Dutch oven for a crisp crust."),
        days(5)),
    Doc("tw-football-5", "twitter", "tweet", "Derby day", (
        "What a derby: a late header in stoppage time won the match for the home side.",),
        hours(1)),
)


@dataclass(frozen=True)
class Seed:
    #: When the rows were written; their times are relative to it (the budget windows are
    #: relative to the database's now, so they must be made when the test runs).
    now: dt.datetime
    cost_ids: list[int]

    def ago(self, **delta: float) -> dt.datetime:
        return self.now - dt.timedelta(**delta)


async def seed(conn: asyncpg.Connection, embed: Callable[[list[str]], Awaitable[Any]]) -> Seed:
    """Rows the way the daemon writes them, with times spread over the last days."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def ago(**delta: float) -> dt.datetime:
        return now - dt.timedelta(**delta)

    await register_vector(conn, schema="public")
    for doc in DOCS:
        vectors = await embed(list(doc.chunks))
        for index, (text, vector) in enumerate(zip(doc.chunks, vectors, strict=True)):
            await conn.execute(
                "INSERT INTO ml_embeddings (share_id, embedding_type, chunk_index, chunk_text, "
                "start_s, end_s, content_hash, model, dims, embedding, metadata, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::text::jsonb, $12)",
                doc.share, doc.embedding_type, index, text,
                index * 30.0 if doc.content_type == "transcript" else None,
                index * 30.0 + 30 if doc.content_type == "transcript" else None,
                uuid.uuid4().hex, MODEL_NAME, len(vector), vector,
                json.dumps({"platform": doc.platform, "content_type": doc.content_type,
                            "title": doc.title, "url": f"https://example.org/{doc.share}",
                            "chunk_strategy": "paragraph", "tokens": len(text.split())}),
                now - doc.age)
    results = [
        ("yt-rocket-1", "transcribe_whisper", {"status": "ok", "text": "A launch vehicle...",
                                               "language": "en", "duration": 95.5},
         "whisper-1", 5200, Decimal("0.009550"), ago(hours=5)),
        ("yt-rocket-1", "summarize_video_combined", {"summary": "Rockets go sideways fast.",
                                                     "truncated": False},
         "gpt-4o-mini", 2100, Decimal("0.001800"), ago(hours=4)),
        ("yt-rocket-1", "embed_vectors", {"chunks": 3, "model": MODEL_NAME, "dims": 384},
         MODEL_NAME, 40, Decimal(0), ago(hours=4)),
        ("tt-pasta-3", "transcribe_whisper", {"status": "silent", "text": "", "segments": []},
         "whisper-1", 300, Decimal(0), ago(hours=2)),
        ("web-bread-4", "summarize_llm", {"summary": "Sourdough basics.", "truncated": True},
         "gpt-4o-mini", 1500, Decimal("0.000900"), ago(days=5)),
    ]
    for share, task_type, data, model, ms, usd, at in results:
        await conn.execute(
            "INSERT INTO ml_results (share_id, task_type, input_hash, result_data, "
            "model_version, processing_ms, cost_usd, created_at, updated_at) "
            "VALUES ($1, $2, $3, $4::text::jsonb, $5, $6, $7, $8, $8)",
            share, task_type, uuid.uuid4().hex[:32], json.dumps(data), model, ms, usd, at)
    costs = [
        ("transcribe_whisper", "whisper-1", Decimal("95.5"), "audio_seconds",
         Decimal("0.009550"), "yt-rocket-1", ago(hours=5)),
        ("summarize_video_combined", "gpt-4o-mini", Decimal(12000), "tokens",
         Decimal("0.001800"), "yt-rocket-1", ago(hours=4)),
        ("summarize_llm", "gpt-4o-mini", Decimal(6000), "tokens", Decimal("0.000900"),
         "web-bread-4", ago(days=5)),
        ("summarize_llm", "gpt-4o-mini", Decimal(8000), "tokens", Decimal("0.001200"),
         "news-6", ago(minutes=30)),
        ("embed_vectors", "text-embedding-3-small", Decimal(900), "tokens",
         Decimal("0.000018"), "news-6", ago(minutes=20)),
    ]
    ids = []
    for task_type, model, units, kind, usd, share, at in costs:
        ids.append(await conn.fetchval(
            "INSERT INTO ml_costs (task_type, model, units, unit_kind, usd, share_id, "
            "correlation_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            task_type, model, units, kind, usd, share, f"corr-{share}", at))
    await conn.execute(
        "INSERT INTO ml_cost_reservations (task_type, share_id, usd, created_at) "
        "VALUES ('transcribe_whisper', 'yt-new-7', 0.020000, $1)", ago(minutes=2))
    history = [{"state": "video_pending", "at": ago(hours=6).timestamp(), "detail": "submitted"},
               {"state": "video_transcribing", "at": ago(hours=6).timestamp(),
                "detail": "transcription started"},
               {"state": "video_summarizing", "at": ago(hours=5).timestamp(),
                "detail": "transcript stored"},
               {"state": "completed", "at": ago(hours=4).timestamp(),
                "detail": "rich embedding stored"}]
    await conn.execute(
        "INSERT INTO ml_workflows (share_id, state, history, created_at, updated_at) "
        "VALUES ('yt-rocket-1', 'completed', $1::text::jsonb, $2, $3), "
        "('yt-new-7', 'video_transcribing', $4::text::jsonb, $5, $5)",
        json.dumps(history), ago(hours=6), ago(hours=4), json.dumps(history[:2]),
        ago(minutes=2))
    return Seed(now=now, cost_ids=ids)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def local_model(model_dir: str) -> LocalEmbedder:
    """One loaded model for the whole session; it runs inference in worker threads, so any
    event loop can use it."""
    return LocalEmbedder(model_dir)


def embedder_of(model: LocalEmbedder) -> Callable[[list[str]], Awaitable[Sequence[VectorLike]]]:
    async def embed(texts: list[str]) -> Sequence[VectorLike]:
        return (await model(texts, MODEL_NAME)).vectors

    return embed


def config(pg_dsn: str, schema: str, **overrides: Any) -> ApiConfig:
    base: dict[str, Any] = {"database_url": pg_dsn, "database_schema": schema,
                            "host": "127.0.0.1", "port": 0, "tokens": (READER,),
                            "admin_tokens": (ADMIN,), "budgets": BUDGETS}
    return ApiConfig(**{**base, **overrides})


@pytest.fixture
async def seeded(pg_dsn: str, pg_schema: str, local_model: LocalEmbedder) -> Seed:
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": f"{pg_schema}, public"})
    try:
        return await seed(conn, embedder_of(local_model))
    finally:
        await conn.close()


@pytest.fixture
async def api(pg_dsn: str, pg_schema: str, seeded: Seed,
              local_model: LocalEmbedder) -> AsyncIterator[Client]:
    server = ApiServer(config(pg_dsn, pg_schema), embedder=embedder_of(local_model))
    async with server, aiohttp.ClientSession(server.url) as session:
        yield Client(session)
    assert server.pool is None


class Client:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def get(self, path: str, token: str | None = READER, **params: Any
                  ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        query = {k.rstrip("_"): str(v) for k, v in params.items() if v is not None}
        async with self.session.get(path, params=query, headers=headers) as response:
            assert response.content_type == "application/json", await response.text()
            return response.status, await response.json()

    async def ok(self, path: str, token: str | None = READER, **params: Any) -> Any:
        status, body = await self.get(path, token, **params)
        assert status == 200, body
        return body


# --- search ---------------------------------------------------------------------------------------


async def test_search_by_text_ranks_and_filters(api: Client, seeded: Seed) -> None:
    page = await api.ok("/v1/search", q="what does a spacecraft need to get into orbit")
    assert page["model"] == MODEL_NAME
    first = page["items"][0]
    assert first["shareId"] == "yt-rocket-1"
    assert first["chunkText"].startswith("To stay in orbit")
    assert (first["startS"], first["endS"]) == (30.0, 60.0)
    assert (first["platform"], first["contentType"]) == ("youtube", "transcript")
    assert first["title"] == "How rockets reach orbit"
    assert first["url"] == "https://example.org/yt-rocket-1"
    assert first["metadata"]["chunk_strategy"] == "paragraph"
    assert dt.datetime.fromisoformat(first["indexedAt"]) == seeded.ago(days=3)
    similarities = [h["similarity"] for h in page["items"]]
    assert similarities == sorted(similarities, reverse=True)
    assert 0 < similarities[0] <= 1.0001

    bread = await api.ok("/v1/search", q="baking bread with a wild yeast starter", limit=1)
    assert [h["shareId"] for h in bread["items"]] == ["web-bread-4"]

    tiktok = await api.ok("/v1/search", q="getting into orbit", platform="tiktok")
    assert {h["shareId"] for h in tiktok["items"]} == {"tt-pasta-3"}
    articles = await api.ok("/v1/search", q="orbit", contentType="article")
    assert {h["contentType"] for h in articles["items"]} == {"article"}
    summaries = await api.ok("/v1/search", q="orbit", embeddingType="summary")
    assert [(h["shareId"], h["embeddingType"]) for h in summaries["items"]] == [
        ("yt-rocket-1", "summary")]
    inside = await api.ok("/v1/search", q="orbit", shareId="yt-station-2")
    assert {h["shareId"] for h in inside["items"]} == {"yt-station-2"}


async def test_search_date_range_is_on_indexing_time(api: Client, seeded: Seed) -> None:
    recent = await api.ok("/v1/search", q="orbit", limit=100,
                          from_=seeded.ago(days=2).isoformat())
    assert {h["shareId"] for h in recent["items"]} == {"yt-station-2", "tt-pasta-3",
                                                       "tw-football-5"}
    older = await api.ok("/v1/search", q="orbit", limit=100, from_=seeded.ago(days=4).isoformat(),
                         to=seeded.ago(days=1).isoformat())  # `to` is exclusive
    assert {h["shareId"] for h in older["items"]} == {"yt-rocket-1"}
    assert all(seeded.ago(days=4) <= dt.datetime.fromisoformat(h["indexedAt"]) < seeded.ago(days=1)
               for h in older["items"])
    # an empty or inverted range is an empty listing, not an error
    empty = await api.ok("/v1/search", q="orbit", from_=seeded.now.isoformat(),
                         to=seeded.ago(days=1).isoformat())
    assert empty == {"model": MODEL_NAME, "items": [], "nextCursor": None}
    status, problem = await api.get("/v1/search", q="orbit", from_="1700000000")
    assert status == 400
    assert problem["error"] == "invalid_request"
    assert problem["details"][0]["loc"] == "query.from"


async def test_search_date_range_reaches_below_the_top_1000(
        api: Client, seeded: Seed, pg_dsn: str, pg_schema: str, local_model: LocalEmbedder
) -> None:
    """1,100 old chunks nearer to the query than anything seeded fill the whole ranking a
    search can return (1,000 hits); the date range is applied inside the search, so the
    recent documents below them are still found, and paged through."""
    [target] = await embedder_of(local_model)(["orbit"])
    rng = np.random.default_rng(3)
    crowd = [np.asarray(target, dtype=np.float32) + rng.normal(scale=0.01, size=len(target))
             .astype(np.float32) for _ in range(1100)]
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": f"{pg_schema}, public"})
    try:
        await register_vector(conn, schema="public")
        await conn.executemany(
            "INSERT INTO ml_embeddings (share_id, chunk_index, chunk_text, content_hash, model, "
            "dims, embedding, metadata, created_at) "
            "VALUES ($1, 0, 'orbit', 'h', $2, $3, $4, '{\"platform\": \"crowd\"}', $5)",
            [(f"crowd-{i}", MODEL_NAME, len(v), v, seeded.ago(days=30))
             for i, v in enumerate(crowd)])
        top = await search(conn, target, limit=MAX_LIMIT, model=MODEL_NAME)
        assert {h.metadata["platform"] for h in top} == {"crowd"}  # nothing seeded in reach
    finally:
        await conn.close()

    since = seeded.ago(days=2).isoformat()
    recent = await api.ok("/v1/search", q="orbit", limit=100, from_=since)
    assert {h["shareId"] for h in recent["items"]} == {"yt-station-2", "tt-pasta-3",
                                                       "tw-football-5"}
    assert len(recent["items"]) == 4  # yt-station-2 has two chunks
    assert recent["nextCursor"] is None
    walked: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await api.ok("/v1/search", q="orbit", limit=1, from_=since, cursor=cursor)
        walked += page["items"]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert [(h["shareId"], h["chunkIndex"]) for h in walked] == [
        (h["shareId"], h["chunkIndex"]) for h in recent["items"]]

    # a range only the crowd falls in, and one both do: the page is full
    crowd_only = await api.ok("/v1/search", q="orbit", limit=5, from_=seeded.ago(days=31)
                              .isoformat(), to=seeded.ago(days=29).isoformat())
    assert [h["platform"] for h in crowd_only["items"]] == ["crowd"] * 5
    assert crowd_only["nextCursor"] is not None

    # similar shares: the crowd is closest to a rocket video too, but older than the range
    nearest = await api.ok("/v1/shares/yt-rocket-1/similar", limit=100)
    assert {h["platform"] for h in nearest["items"]} == {"crowd"}
    similar = await api.ok("/v1/shares/yt-rocket-1/similar", limit=100, from_=since)
    assert {h["shareId"] for h in similar["items"]} == {"yt-station-2", "tt-pasta-3",
                                                        "tw-football-5"}


async def test_search_pages_with_a_cursor(api: Client, seeded: Seed) -> None:
    everything = await api.ok("/v1/search", q="orbit", limit=100)
    total = sum(len(d.chunks) for d in DOCS)
    assert len(everything["items"]) == total
    assert everything["nextCursor"] is None

    seen: list[tuple[str, str, int]] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await api.ok("/v1/search", q="orbit", limit=3, cursor=cursor)
        pages += 1
        seen += [(h["shareId"], h["embeddingType"], h["chunkIndex"]) for h in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert pages == -(-total // 3)
    assert seen == [(h["shareId"], h["embeddingType"], h["chunkIndex"])
                    for h in everything["items"]]

    # a filtered walk: cursors of a time-filtered listing stay within it
    first = await api.ok("/v1/search", q="orbit", limit=1, from_=seeded.ago(days=2).isoformat())
    second = await api.ok("/v1/search", q="orbit", limit=1, from_=seeded.ago(days=2).isoformat(),
                          cursor=first["nextCursor"])
    assert second["items"][0]["shareId"] != first["items"][0]["shareId"] or \
        second["items"][0]["chunkIndex"] != first["items"][0]["chunkIndex"]

    # a cursor belongs to its filters; garbage is not a cursor
    status, problem = await api.get("/v1/search", q="bread", limit=3,
                                    cursor=first["nextCursor"])
    assert (status, problem["error"]) == (400, "invalid_cursor")
    status, problem = await api.get("/v1/search", q="orbit", cursor="bm90LWEtY3Vyc29y")
    assert (status, problem["error"]) == (400, "invalid_cursor")


async def test_similar_to_a_share(api: Client, seeded: Seed) -> None:
    page = await api.ok("/v1/shares/yt-rocket-1/similar")
    shares = [h["shareId"] for h in page["items"]]
    assert shares[0] == "yt-station-2"
    assert "yt-rocket-1" not in shares
    assert len(set(shares)) == len(shares) == len({d.share for d in DOCS}) - 1

    walked: list[str] = []
    cursor = None
    while True:
        part = await api.ok("/v1/shares/yt-rocket-1/similar", limit=2, cursor=cursor)
        walked += [h["shareId"] for h in part["items"]]
        cursor = part["nextCursor"]
        if cursor is None:
            break
    assert walked == shares

    youtube = await api.ok("/v1/shares/tt-pasta-3/similar", platform="youtube")
    assert {h["platform"] for h in youtube["items"]} == {"youtube"}
    recent = await api.ok("/v1/shares/yt-rocket-1/similar", from_=seeded.ago(days=2).isoformat())
    assert {h["shareId"] for h in recent["items"]} == {"yt-station-2", "tt-pasta-3",
                                                       "tw-football-5"}

    status, problem = await api.get("/v1/shares/nobody-8/similar")
    assert (status, problem["error"]) == (404, "not_found")
    status, problem = await api.get("/v1/shares/tt-pasta-3/similar", embeddingType="summary")
    assert status == 404
    status, problem = await api.get("/v1/shares/yt-rocket-1/similar", cursor=cursor or
                                    (await api.ok("/v1/shares/tt-pasta-3/similar", limit=1))
                                    ["nextCursor"])
    assert (status, problem["error"]) == (400, "invalid_cursor")  # another share's cursor


# --- a share's results and workflow ---------------------------------------------------------------


async def test_share_results(api: Client, seeded: Seed) -> None:
    body = await api.ok("/v1/shares/yt-rocket-1/results")
    assert body["shareId"] == "yt-rocket-1"
    by_type = {r["taskType"]: r for r in body["results"]}
    assert list(by_type) == ["embed_vectors", "summarize_video_combined", "transcribe_whisper"]
    whisper = by_type["transcribe_whisper"]
    assert whisper["resultData"] == {"status": "ok", "text": "A launch vehicle...",
                                     "language": "en", "duration": 95.5}
    assert whisper["costUsd"] == "0.009550"
    assert (whisper["processingMs"], whisper["modelVersion"]) == (5200, "whisper-1")
    assert len(whisper["inputHash"]) == 32
    assert dt.datetime.fromisoformat(whisper["updatedAt"]) == seeded.ago(hours=5)

    only = await api.ok("/v1/shares/yt-rocket-1/results", taskType="embed_vectors")
    assert [r["taskType"] for r in only["results"]] == ["embed_vectors"]
    assert (await api.ok("/v1/shares/unknown-9/results"))["results"] == []
    status, problem = await api.get("/v1/shares/yt-rocket-1/results", taskType="bogus")
    assert (status, problem["error"]) == (400, "invalid_request")
    status, _ = await api.get("/v1/shares/yt-rocket-1/results", taskTyp="embed_vectors")
    assert status == 400  # a misspelt filter is an error, not "no filter"
    status, _ = await api.get("/v1/shares/yt-rocket-1/results?taskType=embed_vectors",
                              taskType="transcribe_whisper")
    assert status == 400  # given twice


async def test_share_workflow(api: Client, seeded: Seed) -> None:
    body = await api.ok("/v1/shares/yt-rocket-1/workflow")
    assert (body["state"], body["final"]) == ("completed", True)
    assert [h["state"] for h in body["history"]] == [
        "video_pending", "video_transcribing", "video_summarizing", "completed"]
    assert dt.datetime.fromisoformat(body["history"][-1]["at"]) == seeded.ago(hours=4)
    assert body["history"][-1]["detail"] == "rich embedding stored"
    assert dt.datetime.fromisoformat(body["createdAt"]) == seeded.ago(hours=6)
    running = await api.ok("/v1/shares/yt-new-7/workflow")
    assert (running["state"], running["final"]) == ("video_transcribing", False)
    status, problem = await api.get("/v1/shares/web-bread-4/workflow")
    assert (status, problem["error"]) == (404, "not_found")


# --- analytics ------------------------------------------------------------------------------------


async def test_cost_summary(api: Client, seeded: Seed) -> None:
    day = await api.ok("/v1/costs/summary", ADMIN)
    assert day["totalUsd"] == "0.012568"  # the last 24 hours by default
    assert dt.datetime.fromisoformat(day["to"]) - dt.datetime.fromisoformat(day["from"]) == \
        dt.timedelta(hours=24)
    assert day["byTaskType"] == [
        {"taskType": "embed_vectors", "calls": 1, "usd": "0.000018"},
        {"taskType": "summarize_llm", "calls": 1, "usd": "0.001200"},
        {"taskType": "summarize_video_combined", "calls": 1, "usd": "0.001800"},
        {"taskType": "transcribe_whisper", "calls": 1, "usd": "0.009550"}]
    assert day["rows"][-1] == {"taskType": "transcribe_whisper", "model": "whisper-1",
                               "unitKind": "audio_seconds", "calls": 1, "units": "95.500",
                               "usd": "0.009550"}
    week = await api.ok("/v1/costs/summary", ADMIN, from_=seeded.ago(days=7).isoformat(),
                        to=seeded.now.isoformat())
    assert week["totalUsd"] == "0.013468"
    assert {"taskType": "summarize_llm", "calls": 2, "usd": "0.002100"} in week["byTaskType"]


async def test_cost_entries_page_newest_first(api: Client, seeded: Seed) -> None:
    newest_first = sorted(seeded.cost_ids, reverse=True)
    walked: list[int] = []
    cursor = None
    while True:
        page = await api.ok("/v1/costs", ADMIN, limit=2, cursor=cursor)
        walked += [e["id"] for e in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert walked == newest_first
    [entry] = (await api.ok("/v1/costs", ADMIN, limit=1))["items"]
    assert entry == {"id": newest_first[0], "taskType": "embed_vectors",
                     "model": "text-embedding-3-small", "units": "900.000",
                     "unitKind": "tokens", "usd": "0.000018", "shareId": "news-6",
                     "correlationId": "corr-news-6",
                     "createdAt": seeded.ago(minutes=20).isoformat().replace("+00:00", "Z")}
    llm = await api.ok("/v1/costs", ADMIN, taskType="summarize_llm")
    assert [e["shareId"] for e in llm["items"]] == ["news-6", "web-bread-4"]
    old = await api.ok("/v1/costs", ADMIN, to=seeded.ago(days=1).isoformat())
    assert [e["shareId"] for e in old["items"]] == ["web-bread-4"]
    by_share = await api.ok("/v1/costs", ADMIN, shareId="yt-rocket-1", model="whisper-1")
    assert [e["taskType"] for e in by_share["items"]] == ["transcribe_whisper"]
    first = await api.ok("/v1/costs", ADMIN, limit=1, taskType="summarize_llm")
    status, problem = await api.get("/v1/costs", ADMIN, limit=1, cursor=first["nextCursor"])
    assert (status, problem["error"]) == (400, "invalid_cursor")


async def test_task_summary(api: Client, seeded: Seed) -> None:
    body = await api.ok("/v1/tasks/summary", ADMIN)
    outcomes = {(r["taskType"], r["outcome"]): r for r in body["results"]}
    assert set(outcomes) == {("transcribe_whisper", "ok"), ("transcribe_whisper", "silent"),
                             ("summarize_video_combined", "ok"), ("embed_vectors", "ok")}
    ok = outcomes[("transcribe_whisper", "ok")]
    assert (ok["count"], ok["avgProcessingMs"], ok["p95ProcessingMs"], ok["costUsd"]) == \
        (1, 5200.0, 5200.0, "0.009550")
    assert outcomes[("transcribe_whisper", "silent")]["costUsd"] == "0.000000"
    assert body["inFlight"] == [{"taskType": "transcribe_whisper", "reservations": 1,
                                 "usd": "0.020000"}]
    assert body["workflows"] == [{"state": "completed", "count": 1},
                                 {"state": "video_transcribing", "count": 1}]
    week = await api.ok("/v1/tasks/summary", ADMIN, from_=seeded.ago(days=7).isoformat())
    assert ("summarize_llm", "ok") in {(r["taskType"], r["outcome"]) for r in week["results"]}


async def test_budget_status(api: Client) -> None:
    body = await api.ok("/v1/budgets", ADMIN)
    assert body["action"] == "dead_letter"
    status = {b["taskType"]: b for b in body["budgets"]}
    assert list(status) == sorted(BUDGETS)
    whisper = status["transcribe_whisper"]
    # the reservation made two minutes ago counts; the charge from five hours ago only daily
    assert (whisper["hourUsd"], whisper["dayUsd"]) == ("0.020000", "0.029550")
    assert (whisper["hourlyLimitUsd"], whisper["dailyLimitUsd"]) == ("1.0", "10.0")
    assert (whisper["hourUsedPct"], whisper["dayUsedPct"]) == (2.0, 0.3)
    assert whisper["exhausted"] is False
    llm = status["summarize_llm"]
    assert (llm["hourUsd"], llm["dailyLimitUsd"], llm["dayUsedPct"]) == ("0.001200", None,
                                                                        None)
    assert (llm["exhausted"], llm["hourUsedPct"]) == (True, 120.0)
    assert status["embed_vectors"]["exhausted"] is False


# --- authentication -------------------------------------------------------------------------------

READ_PATHS = ["/v1/search?q=orbit", "/v1/shares/yt-rocket-1/similar",
              "/v1/shares/yt-rocket-1/results", "/v1/shares/yt-rocket-1/workflow"]
ADMIN_PATHS = ["/v1/costs/summary", "/v1/costs", "/v1/tasks/summary", "/v1/budgets"]


async def test_tokens(api: Client) -> None:
    for path in READ_PATHS + ADMIN_PATHS:
        for header in (None, "Bearer wrong-token-000000000", f"Basic {ADMIN}", "Bearer",
                       f"Bearer {READER}x"):
            headers = {"Authorization": header} if header else {}
            async with api.session.get(path, headers=headers) as response:
                assert response.status == 401, (path, header)
                assert response.headers["WWW-Authenticate"].startswith('Bearer realm="mlpipe"')
                assert (await response.json())["error"] == "unauthorized"
        assert (await api.get(path, ADMIN))[0] == 200, path
    for path in READ_PATHS:
        assert (await api.get(path, READER))[0] == 200, path
    for path in ADMIN_PATHS:
        status, problem = await api.get(path, READER)
        assert (status, problem["error"]) == (403, "forbidden"), path
    # auth comes before validation: an anonymous caller learns nothing about parameters
    assert (await api.get("/v1/search", None, limit=0))[0] == 401
    for public in ("/healthz", "/openapi.json"):
        assert (await api.get(public, None))[0] == 200
    status, problem = await api.get("/v1/nothing-here", None)
    assert (status, problem["error"]) == (404, "not_found")
    async with api.session.post("/v1/search", headers={"Authorization": f"Bearer {READER}"}
                                ) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"


async def status_of(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status


async def test_without_tokens_only_loopback(pg_dsn: str, pg_schema: str,
                                            local_model: LocalEmbedder) -> None:
    open_config = config(pg_dsn, pg_schema, tokens=(), admin_tokens=())
    for host in ("0.0.0.0", "::", ""):
        server = ApiServer(ApiConfig(**{**open_config.__dict__, "host": host}),
                           embedder=embedder_of(local_model))
        with pytest.raises(ApiConfigError, match=r"refusing to serve the API on .* without "
                                                 r"tokens.*MLPIPE_API_TOKENS"):
            await server.start()
        assert server.pool is None
    # loopback without tokens: the read endpoints are open, the admin ones closed to everyone
    async with ApiServer(open_config, embedder=embedder_of(local_model)) as server:
        assert await status_of(f"{server.url}/v1/shares/x/results") == 200
        assert await status_of(f"{server.url}/v1/budgets") == 403
    # every interface with tokens: fine
    async with ApiServer(config(pg_dsn, pg_schema, host="0.0.0.0"),
                         embedder=embedder_of(local_model)) as server:
        url = f"http://127.0.0.1:{server.port}/v1/budgets"
        assert await status_of(url) == 401
        assert await status_of(url, ADMIN) == 200
    with pytest.raises(ApiConfigError, match="shorter than 16"):
        ApiServer(config(pg_dsn, pg_schema, tokens=("short",)), embedder=embedder_of(local_model))


async def test_without_tokens_admin_endpoints_are_forbidden(
        pg_dsn: str, pg_schema: str, seeded: Seed, local_model: LocalEmbedder) -> None:
    """Loopback without any token: every read endpoint answers anyone (with or without an
    Authorization header, which nothing checks), every admin endpoint answers 403 with the
    usual problem body, whatever the caller presents, before its parameters are looked at."""
    open_config = config(pg_dsn, pg_schema, tokens=(), admin_tokens=())
    async with ApiServer(open_config, embedder=embedder_of(local_model)) as server, \
            aiohttp.ClientSession(server.url) as session:
        api = Client(session)
        for path in READ_PATHS:
            for token in (None, ADMIN, READER):
                status, body = await api.get(path, token)
                assert status == 200, (path, token, body)
        rocket = await api.ok("/v1/search", None, q="getting a payload into orbit")
        assert rocket["items"][0]["shareId"] == "yt-rocket-1"
        results = await api.ok("/v1/shares/yt-rocket-1/results", None)
        assert len(results["results"]) == 3
        for path in ADMIN_PATHS:
            for token in (None, ADMIN, READER):
                status, problem = await api.get(path, token)
                assert status == 403, (path, token, problem)
                assert problem["error"] == "forbidden"
                assert "MLPIPE_API_ADMIN_TOKENS" in problem["message"]
                assert problem["details"] == []
        status, problem = await api.get("/v1/costs", None, limit=0, cursor="garbage")
        assert (status, problem["error"]) == (403, "forbidden")  # not 400: auth comes first
        for public in ("/healthz", "/openapi.json"):
            assert (await api.get(public, None))[0] == 200


async def test_refuses_an_unmigrated_schema(pg_dsn: str, local_model: LocalEmbedder) -> None:
    server = ApiServer(config(pg_dsn, f"t_missing_{uuid.uuid4().hex[:8]}"),
                       embedder=embedder_of(local_model))
    with pytest.raises(ApiConfigError, match="run `mlpipe migrate` first"):
        await server.start()
    assert server.pool is None


class CuttableProxy:
    """A TCP relay to Postgres that the test can cut and restore: "the database went away"
    without touching the shared server."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


async def test_database_outage_is_503(pg_dsn: str, pg_schema: str,
                                      local_model: LocalEmbedder) -> None:
    """Postgres unreachable under a running server: requests get a 503 problem, not a 500,
    and the pool recovers by itself once the database is back."""
    from urllib.parse import urlsplit

    target = urlsplit(pg_dsn)
    proxy = CuttableProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = pg_dsn.replace(f"{target.hostname}:{target.port}", f"127.0.0.1:{proxy.port}")
    async with ApiServer(config(proxied, pg_schema), embedder=embedder_of(local_model)) \
            as server, aiohttp.ClientSession(server.url) as session:
        async with session.get("/healthz") as response:
            assert response.status == 200
        await proxy.cut()
        for path in ("/healthz", "/v1/shares/x/results"):
            async with session.get(path, headers={"Authorization": f"Bearer {READER}"}
                                   ) as response:
                assert response.status == 503, path
                assert (await response.json())["error"] == "unavailable"
        await proxy.start()  # same port

        async def healthy() -> bool:
            async with session.get("/healthz") as response:
                return response.status == 200

        await wait_for(healthy, timeout=10, message="/healthz 200 again")
    await proxy.cut()


# --- the OpenAPI document -------------------------------------------------------------------------


async def test_served_openapi_is_the_checked_in_one(api: Client) -> None:
    assert await api.ok("/openapi.json", None) == json.loads(OPENAPI_FILE.read_text())


def test_serve_command(pg_dsn: str, pg_schema: str, model_dir: str, seeded: Seed,
                       tmp_path: Path) -> None:
    """``mlpipe serve``: listens, answers with the local model, exits 0 on SIGTERM; refuses a
    public address without tokens and a missing model (exit 1)."""
    env = {**os.environ, "MLPIPE_DATABASE_URL": pg_dsn, "MLPIPE_DATABASE_SCHEMA": pg_schema,
           "MLPIPE_EMBEDDING_MODEL_DIR": model_dir, "MLPIPE_API_TOKENS": json.dumps([READER])}
    env.pop("MLPIPE_OPENAI_API_KEY", None)
    command = [sys.executable, "-m", "mlpipe.cli", "--log-json", "serve"]
    log = tmp_path / "serve.log"
    with log.open("w") as stderr, subprocess.Popen(
            [*command, "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=stderr,
            text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, log.read_text()
            started = json.loads(line)
            assert started["model"] == MODEL_NAME
            url = f"{started['listening']}/v1/search?" + urlencode({"q": "bread starter",
                                                                     "limit": 1})
            with pytest.raises(HTTPError) as refused_anonymous:
                urlopen(url, timeout=30)
            refused_anonymous.value.close()
            assert refused_anonymous.value.code == 401
            request = Request(url, headers={"Authorization": f"Bearer {READER}"})
            with urlopen(request, timeout=30) as response:
                assert response.status == 200
                assert json.load(response)["items"][0]["shareId"] == "web-bread-4"
            proc.terminate()
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    without_tokens = {k: v for k, v in env.items() if k != "MLPIPE_API_TOKENS"}
    refused = subprocess.run([*command, "--host", "0.0.0.0"], env=without_tokens,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "refusing to serve the API on 0.0.0.0 without tokens" in refused.stderr
    no_model = subprocess.run(command, env={**env, "MLPIPE_EMBEDDING_MODEL_DIR": str(tmp_path)},
                              capture_output=True, text=True, timeout=60)
    assert no_model.returncode == 1
    assert "lacks model.onnx, tokenizer.json" in no_model.stderr


# --- schemathesis against the running server ----------------------------------------------------


class LoopThread:
    """An event loop in a thread, for a server that synchronous schemathesis calls into."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="api-under-test",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def live_api(pg_dsn: str, local_model: LocalEmbedder) -> Iterator[str]:
    """A seeded schema of its own and the server on 127.0.0.1, for the whole module."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    thread = LoopThread()

    async def prepare() -> ApiServer:
        await migrate(pg_dsn, schema=schema)
        conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": f"{schema}, public"})
        try:
            await seed(conn, embedder_of(local_model))
        finally:
            await conn.close()
        server = ApiServer(config(pg_dsn, schema), embedder=embedder_of(local_model))
        await server.start()
        return server

    async def drop() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    try:
        server = thread.run(prepare())
        try:
            yield server.url
        finally:
            thread.run(server.close())
    finally:
        thread.run(drop())
        thread.close()


#: What a real client sends as ``cursor``: one the server issued for the same filters.
_CURSOR_KINDS: dict[str, tuple[str, Any, int]] = {
    "/v1/search": ("search", SearchQuery, 1),
    "/v1/shares/{shareId}/similar": ("similar", SimilarQuery, 1),
    "/v1/costs": ("costs", CostsQuery, 10**6),
}


def real_cursor(case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    """In positive cases, replace a generated cursor (random text the server never issued,
    rightly refused with 400) with one minted for the case's own filters. Negative cases keep
    theirs: they must be refused anyway."""
    kind = _CURSOR_KINDS.get(case.operation.path)
    meta = case.meta
    if kind is None or not case.query or "cursor" not in case.query or meta is None \
            or not meta.generation.mode.is_positive:
        return case
    name, model, position = kind
    try:
        # schemathesis percent-encodes path parameters; the server sees them decoded
        params = [SharePath.model_validate({k: unquote(str(v)) for k, v
                                            in case.path_parameters.items()})
                  ] if case.path_parameters else []
        query = model.model_validate({k: str(v) for k, v in case.query.items()
                                      if k != "cursor"})
    except ValueError:  # refused before the cursor is looked at
        return case
    case.query["cursor"] = api_cursor.encode(api_cursor.fingerprint(name, *params, query),
                                             position)
    return case


#: The checked-in document, which ``test_served_openapi_is_the_checked_in_one`` proves is the
#: one the server serves. (Loaded at import rather than from the live server through
#: ``schemathesis.pytest.from_fixture``, whose lazy loader does not run under pytest 9.2.)
#: Every operation but ``/v1/events``: an event stream never ends, so there is no response to
#: validate; tests/integration/test_api_events.py tests it on a real broker.
api_schema = schemathesis.openapi.from_path(OPENAPI_FILE).exclude(path="/v1/events")


@api_schema.hook
def map_case(_context: schemathesis.HookContext,
             case: schemathesis.Case[Any]) -> schemathesis.Case[Any]:
    return real_cursor(case)


@api_schema.parametrize()
@hypothesis.settings(max_examples=50, derandomize=True, database=None, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow,
                                            hypothesis.HealthCheck.filter_too_much])
def test_schemathesis(case: schemathesis.Case[Any], live_api: str) -> None:
    """Every operation of the document, positive and negative data, with an admin token: no
    5xx, every response as documented (status, content type, headers, schema)."""
    case.call_and_validate(base_url=live_api, headers={"Authorization": f"Bearer {ADMIN}"},
                           timeout=30)
