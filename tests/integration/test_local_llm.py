"""Local LLMs through an OpenAI-compatible server (Ollama, vLLM, llama.cpp's server): the fake
server of tests/fake_openai.py plays such an endpoint, reached with ``MLPIPE_OPENAI_BASE_URL``
and *no key*. Summaries and embeddings go to it, its tokens are recorded at zero cost unless
``MLPIPE_OPENAI_PRICES`` prices its model, and transcription stays on the local backend
(such servers have no audio endpoint)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import pytest

from mlpipe.backends import api_available, backend_for, prices, self_hosted
from mlpipe.contract.models import Backend, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.store.pool import create_pool
from mlpipe.testing import running_daemon, wait_for
from tests.fake_openai import FakeOpenAI
from tests.integration.test_embed import embed_task, run_tasks
from tests.integration.test_summarize import (
    ARTICLE,
    QUEUES,
    article_task,
    cost_rows,
    make_registry,
    result_of,
    service_settings,  # noqa: F401 - fixture
)

LOCAL_MODEL = "llama3.2:3b"


async def _summarize_once(settings: Settings, share: str) -> tuple[asyncpg.Record,
                                                                   list[asyncpg.Record]]:
    async with Effects(settings) as effects, \
            running_daemon(settings, make_registry(settings), QUEUES,
                           executor=effects.executor) as daemon, Producer(settings) as p:
        await p.publish(article_task(share, maxLength=120))
        await wait_for(lambda: daemon.status().tasks_done == 1, timeout=30)
        row = await result_of(effects, share)
        assert row is not None, await list_dead(settings)
        return row, await cost_rows(effects)


async def test_summary_from_a_keyless_server_costs_nothing(
        service_settings: dict[str, Any]) -> None:  # noqa: F811 - the imported fixture
    async with FakeOpenAI() as server:
        server.chat_reply = "Riverton turns its old freight yard into a park."
        settings = Settings(**service_settings, openai_base_url=server.base_url,
                            summarize_api_model=LOCAL_MODEL)
        assert settings.openai_api_key is None
        row, costs = await _summarize_once(settings, "ollama-1")

    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.json is not None
    assert request.json["model"] == LOCAL_MODEL
    assert ARTICLE in request.json["messages"][1]["content"]
    data = row["result_data"]
    assert data["summary"] == server.chat_reply
    assert data["backend"] == "api"
    assert data["model"] == LOCAL_MODEL
    assert data["cost_usd"] == 0
    assert row["cost_usd"] == 0
    # the tokens are still in the ledger, at zero cost
    [cost] = costs
    assert cost["model"] == LOCAL_MODEL
    assert cost["units"] == data["input_tokens"] + data["output_tokens"] > 0
    assert cost["usd"] == 0


async def test_a_configured_price_is_charged(
        service_settings: dict[str, Any]) -> None:  # noqa: F811 - the imported fixture
    async with FakeOpenAI() as server:
        settings = Settings(**service_settings, openai_base_url=server.base_url,
                            summarize_api_model=LOCAL_MODEL,
                            openai_prices={LOCAL_MODEL: (Decimal("1.5"), Decimal("4"))})
        row, [cost] = await _summarize_once(settings, "vllm-priced")
    data = row["result_data"]
    expected = (Decimal("1.5") * data["input_tokens"]
                + Decimal(4) * data["output_tokens"]) / Decimal(1_000_000)
    assert expected > 0
    assert cost["usd"] == expected.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    assert data["cost_usd"] == pytest.approx(float(expected))


async def test_embeddings_from_a_keyless_server_cost_nothing(
        broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str,
        model_dir: str) -> None:
    from tests.conftest import REDIS_URL

    async with FakeOpenAI() as server:
        settings = Settings(broker_url=broker_url, database_url=pg_dsn,
                            database_schema=pg_schema, redis_url=REDIS_URL,
                            lock_prefix=lock_prefix, embedding_model_dir=model_dir,
                            openai_base_url=server.base_url, embed_api_model="nomic-embed-text")
        await run_tasks(settings, "embed", [
            embed_task("ollama-embed", "Sourdough needs a strong starter.", backend=None)])
    [request] = server.requests
    assert request.path == "/v1/embeddings"
    assert request.json is not None
    assert request.json["model"] == "nomic-embed-text"
    pool = await create_pool(pg_dsn, schema=pg_schema, size=1)
    try:
        [cost] = await pool.fetch("SELECT model, units, usd FROM ml_costs "
                                  "WHERE share_id = 'ollama-embed'")
        dims = await pool.fetchval("SELECT DISTINCT dims FROM ml_embeddings "
                                   "WHERE share_id = 'ollama-embed'")
    finally:
        await pool.close()
    assert cost["model"] == "nomic-embed-text"
    assert cost["units"] > 0
    assert cost["usd"] == 0
    assert dims == server.embedding_dims


def test_backend_choice() -> None:
    keyless = Settings(openai_base_url="http://127.0.0.1:11434/v1")
    keyed = Settings(openai_api_key="k", openai_base_url="http://127.0.0.1:11434/v1")
    offline = Settings()
    summary = build_task(TaskType.SUMMARIZE_LLM, "s", {"content": {"text": "x"}})
    transcript = build_task(TaskType.TRANSCRIBE_WHISPER, "t", {"mediaUrl": "s3://b/a.wav"})
    local_summary = build_task(TaskType.SUMMARIZE_LLM, "s",
                               {"content": {"text": "x"}, "options": {"backend": "local"}})

    assert backend_for(summary, keyless) is Backend.API
    assert backend_for(local_summary, keyless) is Backend.LOCAL
    # Ollama and llama.cpp's server have no audio endpoint: transcription stays local
    assert backend_for(transcript, keyless) is Backend.LOCAL
    assert not api_available(keyless, TaskType.TRANSCRIBE_WHISPER)
    assert api_available(keyless, TaskType.EMBED_VECTORS)
    assert backend_for(transcript, keyed) is Backend.API
    assert backend_for(summary, offline) is Backend.LOCAL

    assert self_hosted(keyless)
    assert not self_hosted(keyed)
    assert not self_hosted(offline)
    # a keyed server bills OpenAI's list prices, a keyless one nothing unless priced
    assert prices(keyed).token_cost("gpt-4o-mini", 1_000_000, 0) == Decimal("0.15")
    assert prices(keyless).token_cost("gpt-4o-mini", 1_000_000, 1_000_000) == 0
    priced = keyless.model_copy(update={"openai_prices": {"m": (Decimal(2), Decimal(3))}})
    assert prices(priced).token_cost("m", 1_000_000, 1_000_000) == Decimal(5)
    assert prices(keyed.model_copy(update={"openai_prices": {"gpt-4o-mini": (
        Decimal(0), Decimal(0))}})).token_cost("gpt-4o-mini", 10**6, 10**6) == 0


def test_prices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_OPENAI_PRICES", '{"qwen2.5:7b": [0.05, 0.1]}')
    assert Settings().openai_prices == {"qwen2.5:7b": (Decimal("0.05"), Decimal("0.1"))}
    monkeypatch.setenv("MLPIPE_OPENAI_PRICES", '{"qwen2.5:7b": [-1, 0]}')
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Settings()
