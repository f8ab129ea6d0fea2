"""Micro-batching of embeddings: throughput with batches shared across deliveries versus one
backend call per message, both with the local MiniLM model through the real daemon (effects
executor: Redis locks, Postgres results and vectors) in the same run.

``measure(settings, n)`` runs the same ``n`` single-chunk messages twice on the ``embed_local``
queue: once with ``settings.embed_batch_size``/``embed_batch_wait_ms``, once with a batch size
of 1 (every request flushed alone). Each run first handles one warm-up message so model
loading is not timed, then publishes ``n`` messages and times until all are done. Only the
ratio of the two is meant to be compared.

``settings`` must point at a throwaway vhost, a Postgres schema (migrated here if needed) and
a lock prefix of the benchmark's own.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from consumers.embed import LOCAL_BATCHER, register
from consumers.embed.models import install
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.effects import Effects
from mlpipe.handlers import Registry
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.store.migrate import migrate
from mlpipe.testing import running_daemon, wait_for

QUEUE = "embed_local"
#: Unconfirmed publishes at once (the same for both modes).
PUBLISH_IN_FLIGHT = 64
_WORDS = (
    "orbit", "rocket", "fuel", "launch", "bread", "starter", "dough", "oven", "marathon",
    "training", "mileage", "race", "taxes", "receipts", "expenses", "office", "cats", "purr",
    "larynx", "python", "asyncio", "coroutine", "network", "weather", "rain", "storm", "football",
    "goal", "striker", "final", "recipe", "pasta", "sauce", "basil", "music", "guitar", "concert",
    "review", "camera", "lens", "photo", "travel", "train", "city", "museum",
)


def _text(rng: random.Random) -> str:
    """A tweet- or caption-sized post (8-30 words), the bulk of what gets shared: one chunk,
    embedded whole."""
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))) + "."


def _task(share: str, text: str) -> Task:
    return build_task(TaskType.EMBED_VECTORS, share,
                      {"content": {"text": text, "type": "caption"},
                       "options": {"backend": "local"}})


async def _run(settings: Settings, label: str, texts: list[str]) -> dict[str, Any]:
    registry = Registry()
    register(registry, settings)
    run_id = uuid.uuid4().hex[:8]
    n = len(texts)
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, QUEUE, executor=effects.executor) as daemon, \
            Producer(settings) as producer:
        await producer.publish(_task(f"warmup-{label}-{run_id}", "Loading the model."))
        await wait_for(lambda: daemon.status().tasks_done >= 1, timeout=120,
                       message="warm-up message done")
        batcher = daemon.resources[LOCAL_BATCHER]
        before = batcher.stats()
        in_flight = asyncio.Semaphore(PUBLISH_IN_FLIGHT)

        async def publish(i: int, text: str) -> None:
            async with in_flight:
                await producer.publish(_task(f"{label}-{run_id}-{i}", text))

        started = time.perf_counter()
        await asyncio.gather(*(publish(i, text) for i, text in enumerate(texts)))
        await wait_for(lambda: daemon.status().tasks_done >= n + 1, timeout=max(120.0, n),
                       interval=0.005, message=f"{n} {label} messages done")
        elapsed = time.perf_counter() - started
        after = batcher.stats()
    calls = after.batches - before.batches
    return {"seconds": round(elapsed, 3), "messages_per_s": round(n / elapsed, 1),
            "backend_calls": calls, "texts": after.texts - before.texts,
            "texts_per_call": round((after.texts - before.texts) / max(1, calls), 2),
            "largest_batch": after.largest_batch,
            "batch_size": settings.embed_batch_size,
            "batch_wait_ms": settings.embed_batch_wait_ms}


async def measure(settings: Settings, n_messages: int, *, rounds: int = 3) -> dict[str, Any]:
    """Batched versus one call per message, alternating ``rounds`` times so that load from
    elsewhere on the machine hits both alike; each mode reports its best round, and
    ``speedup`` is the ratio of the two best throughputs."""
    await migrate(settings.database_url, schema=settings.database_schema)
    rng = random.Random(20240601)
    texts = [_text(rng) for _ in range(n_messages)]
    samples: dict[str, list[dict[str, Any]]] = {"batched": [], "one_call_per_message": []}
    with tempfile.TemporaryDirectory(prefix="mlpipe-minilm-") as tmp:
        model_dir = settings.embedding_model_dir or str(install(Path(tmp) / "model"))
        batched = settings.model_copy(update={"embedding_model_dir": model_dir})
        single = batched.model_copy(update={"embed_batch_size": 1, "embed_batch_wait_ms": 0.0})
        for _ in range(rounds):
            samples["batched"].append(await _run(batched, "batched", texts))
            samples["one_call_per_message"].append(await _run(single, "single", texts))
    best = {mode: max(runs, key=lambda r: r["messages_per_s"]) for mode, runs in samples.items()}
    return {"workload": "embed_batching", "n_messages": n_messages, "rounds": rounds,
            **best,
            "speedup": round(best["batched"]["messages_per_s"]
                             / best["one_call_per_message"]["messages_per_s"], 2),
            "samples_messages_per_s": {mode: [r["messages_per_s"] for r in runs]
                                       for mode, runs in samples.items()}}
