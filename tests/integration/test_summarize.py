"""The summarisation handlers end to end: a daemon with the effects executor in-process, the
real broker, Redis and Postgres, and the fake OpenAI server for the API backend."""

from __future__ import annotations

import random
import re
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import pytest

from consumers.summarize import register
from mlpipe.backends import token_cost
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.handlers import Registry
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL
from tests.fake_openai import FakeOpenAI

QUEUES = "summarize,summarize_local"

ARTICLE = """\
The city council of Riverton voted on Tuesday to convert the old freight yard on the east bank \
into a public park, ending a dispute that has run for almost a decade. The plan passed by seven \
votes to two after a four-hour session in which more than sixty residents spoke. Mayor Elena \
Duarte called the decision a gift to the next generation. The freight yard has been empty since \
the rail company moved its depot to the industrial zone in 2014.

The park will cost an estimated 18 million dollars, most of it covered by a state grant for \
brownfield redevelopment. Engineers must first remove contaminated soil from the former fuel \
depot, a job the city expects to take eighteen months. Opponents on the council argued that the \
money would be better spent on housing, since the east bank has one of the lowest vacancy rates \
in the region. Supporters replied that the grant can only be used for public open space and \
would otherwise go to another city.

Construction of the park is scheduled to begin next spring, once the soil clean-up has been \
approved by the state environment agency. The design includes a riverside promenade, two \
playgrounds, a skate park and a community garden run by local schools. Residents who spoke at \
the meeting said they hoped the park would finally reconnect the east bank with the river after \
decades behind a fence.
"""

TRANSCRIPT = (
    "Today I want to show you how I get an open crumb in my sourdough without any fancy "
    "equipment. The most important thing is a strong starter, so feed it twice the day before "
    "you bake. I mix the flour and water first and let it rest for an hour before adding the "
    "starter and the salt. Over the next four hours I do four sets of stretch and folds, one "
    "every thirty minutes, and then I leave the dough alone. When it has grown by about half, "
    "I shape it tightly and put it in the fridge overnight. The cold proof is what gives the "
    "crust those blisters and makes the loaf easy to score. In the morning I bake it in a "
    "preheated cast iron pot, twenty minutes with the lid on and twenty-five with it off."
)
CAPTION = "My no-fuss method for an open crumb sourdough, tested over thirty bakes."
HASHTAGS = ["#sourdough", "#BreadBaking", "homebaker"]


@pytest.fixture
def service_settings(broker_url: str, pg_dsn: str, pg_schema: str,
                     lock_prefix: str) -> dict[str, Any]:
    return {"broker_url": broker_url, "database_url": pg_dsn, "database_schema": pg_schema,
            "redis_url": REDIS_URL, "lock_prefix": lock_prefix,
            "retry": RetryPolicy(max_retries=3, base_delay_s=0.2, max_delay_s=1.0)}


@pytest.fixture
def settings(service_settings: dict[str, Any]) -> Settings:
    """Offline: no API key, so every task runs on the extractive backend."""
    return Settings(**service_settings)


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as api:
        api.chat_reply = ("Riverton will turn its disused east-bank freight yard into an "
                          "18-million-dollar park after a 7-2 council vote.")
        yield api


@pytest.fixture
def api_settings(service_settings: dict[str, Any], fake_api: FakeOpenAI) -> Settings:
    return Settings(**service_settings, openai_api_key="test-key",
                    openai_base_url=fake_api.base_url)


def make_registry(settings: Settings) -> Registry:
    registry = Registry()
    register(registry, settings)
    return registry


def article_task(share: str, text: str = ARTICLE, **options: Any) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": text, "type": "article"}, "options": options})


def video_task(share: str, **options: Any) -> Task:
    return build_task(TaskType.SUMMARIZE_VIDEO_COMBINED, share,
                      {"transcript": {"text": TRANSCRIPT, "type": "transcript"},
                       "caption": CAPTION, "hashtags": HASHTAGS, "options": options})


async def result_of(effects: Effects, share: str, task_type: str = "summarize_llm"
                    ) -> asyncpg.Record | None:
    assert effects.pool is not None
    return await effects.pool.fetchrow(
        "SELECT result_data, model_version, cost_usd FROM ml_results "
        "WHERE share_id = $1 AND task_type = $2", share, task_type)


async def cost_rows(effects: Effects) -> list[asyncpg.Record]:
    assert effects.pool is not None
    return await effects.pool.fetch(
        "SELECT task_type, model, units, unit_kind, usd, share_id FROM ml_costs ORDER BY id")


def split_sentences(text: str) -> list[str]:
    """Independent of the handler's splitter: the fixtures have no abbreviations."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def assert_extract_of(summary: str, *sources: str) -> None:
    flat = [" ".join(s.split()) for s in sources]
    sentences = split_sentences(summary)
    assert sentences, "empty summary"
    for sentence in sentences:
        assert any(" ".join(sentence.split()) in s for s in flat), \
            f"{sentence!r} is not a sentence of the input"


async def test_offline_summary_is_shorter_and_made_of_the_articles_sentences(
        settings: Settings) -> None:
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(article_task("article-1"))
        await wait_for(lambda: daemon.status().tasks_done == 1, timeout=30)
        row = await result_of(effects, "article-1")
        assert row is not None, await list_dead(settings)
        data = row["result_data"]
        assert set(data) == {"summary", "model", "backend", "input_tokens", "output_tokens",
                             "truncated", "cost_usd"}
        assert data["backend"] == "local"
        assert data["model"] == "extractive-textrank"
        assert row["model_version"] == "extractive-textrank/1"
        assert data["truncated"] is False
        assert data["cost_usd"] == 0
        assert row["cost_usd"] == 0
        assert 0 < data["output_tokens"] < data["input_tokens"]
        summary = data["summary"]
        assert len(summary) < len(ARTICLE)
        assert len(split_sentences(summary)) < len(split_sentences(ARTICLE))
        assert_extract_of(summary, ARTICLE)
        assert await cost_rows(effects) == []


async def test_max_length_bounds_the_offline_summary(settings: Settings) -> None:
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(article_task("article-short", maxLength=40, backend="local"))
        await wait_for(lambda: daemon.status().tasks_done == 1, timeout=30)
        row = await result_of(effects, "article-short")
        assert row is not None, await list_dead(settings)
        assert 0 < row["result_data"]["output_tokens"] <= 40
        assert_extract_of(row["result_data"]["summary"], ARTICLE)


async def test_too_short_and_binary_content_are_dead_lettered(settings: Settings) -> None:
    junk = random.Random(7).randbytes(600).decode("utf-8", "replace")
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(article_task("too-short", text="Great video, thanks!"))
        await p.publish(article_task("nul-bytes", text="PK\x03\x04\x14\x00\x00\x00" + "x" * 80))
        await p.publish(article_task("junk", text=junk))
        await wait_for(lambda: daemon.status().tasks_done == 3, timeout=30)
        dead = {e.share_id: e for e in await list_dead(settings)}
        assert {k: e.reason for k, e in dead.items()} == {
            "too-short": "content_too_short", "nul-bytes": "binary_content",
            "junk": "binary_content"}
        assert "at least 50 characters and 10 words" in (dead["too-short"].error or "")
        assert dead["too-short"].attempts == 1  # refused at once, never retried
        for share in ("too-short", "nul-bytes", "junk"):
            assert await result_of(effects, share) is None


async def test_api_backend_request_shape_and_cost_from_usage(
        api_settings: Settings, fake_api: FakeOpenAI) -> None:
    settings = api_settings
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(article_task("paid-1", maxLength=120))
        await wait_for(lambda: daemon.status().tasks_done == 1, timeout=30)
        row = await result_of(effects, "paid-1")
        assert row is not None, await list_dead(settings)
        [request] = fake_api.requests
        assert request.path == "/v1/chat/completions"
        assert request.headers["Authorization"] == "Bearer test-key"
        body = request.json
        assert body is not None
        assert body["model"] == "gpt-4o-mini"
        assert body["max_tokens"] == 120
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert ARTICLE in body["messages"][1]["content"]
        assert "90 words" in body["messages"][0]["content"]  # 120 tokens ~ 90 words

        # what the fake server reported as usage, and so what must be billed
        prompt = sum(len(str(m["content"]).split()) for m in body["messages"])
        completion = len(fake_api.chat_reply.split())
        usd = token_cost("gpt-4o-mini", prompt, completion)
        data = row["result_data"]
        assert data == {"summary": fake_api.chat_reply, "model": "gpt-4o-mini",
                        "backend": "api", "input_tokens": prompt,
                        "output_tokens": completion, "truncated": False,
                        "cost_usd": float(usd)}
        [cost] = await cost_rows(effects)
        stored = usd.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
        assert dict(cost) == {"task_type": "summarize_llm", "model": "gpt-4o-mini",
                              "units": prompt + completion, "unit_kind": "tokens",
                              "usd": stored, "share_id": "paid-1"}
        assert row["cost_usd"] == stored
        assert effects.pool is not None
        assert await effects.pool.fetchval("SELECT count(*) FROM ml_cost_reservations") == 0


async def test_rate_limited_call_is_retried_then_succeeds(
        api_settings: Settings, fake_api: FakeOpenAI) -> None:
    settings = api_settings
    fake_api.fail_next = [429]
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor), Producer(settings) as p:
        await p.publish(article_task("limited"))

        async def stored() -> bool:
            return await result_of(effects, "limited") is not None

        await wait_for(stored, timeout=30, interval=0.1, message="result after the retry")
        assert len(fake_api.requests) == 2
        assert fake_api.requests[0].json == fake_api.requests[1].json
        row = await result_of(effects, "limited")
        assert row is not None
        assert row["result_data"]["summary"] == fake_api.chat_reply
        assert len(await cost_rows(effects)) == 1  # the refused call cost nothing
        assert await list_dead(settings) == []


async def test_video_combined_with_both_backends(
        api_settings: Settings, fake_api: FakeOpenAI) -> None:
    """One daemon with a key: ``backend: local`` goes to the offline summariser on the
    ``summarize_local`` queue, the rest to the API."""
    settings = api_settings
    fake_api.chat_reply = "A sourdough method: strong starter, stretch and folds, cold proof."
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(video_task("video-local", backend="local", maxLength=80))
        await p.publish(video_task("video-api", maxLength=80))
        await wait_for(lambda: daemon.status().tasks_done == 2, timeout=30)
        tt = "summarize_video_combined"
        offline = await result_of(effects, "video-local", tt)
        paid = await result_of(effects, "video-api", tt)
        assert offline is not None, await list_dead(settings)
        assert paid is not None, await list_dead(settings)

        data = offline["result_data"]
        assert data["backend"] == "local"
        assert data["cost_usd"] == 0
        assert 0 < data["output_tokens"] <= 80
        assert len(data["summary"]) < len(TRANSCRIPT) + len(CAPTION)
        assert_extract_of(data["summary"], CAPTION, TRANSCRIPT)

        [request] = fake_api.requests
        assert request.json is not None
        user = request.json["messages"][1]["content"]
        assert f"Caption:\n{CAPTION}" in user
        assert "Hashtags: #sourdough #BreadBaking #homebaker" in user
        assert f"Transcript:\n{TRANSCRIPT}" in user
        assert request.json["max_tokens"] == 80
        assert paid["result_data"]["backend"] == "api"
        assert paid["result_data"]["summary"] == fake_api.chat_reply
        [cost] = await cost_rows(effects)
        assert (cost["task_type"], cost["share_id"]) == (tt, "video-api")
        assert cost["units"] == (paid["result_data"]["input_tokens"]
                                 + paid["result_data"]["output_tokens"])
