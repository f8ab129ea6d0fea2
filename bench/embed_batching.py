"""Micro-batching of embeddings: throughput with batches shared across deliveries versus one
backend call per message, both with the local MiniLM model through the real daemon (effects
executor: Redis locks, Postgres results and vectors) in the same run.

``measure(settings, n)`` runs the same ``n`` single-chunk messages in two modes on the
``embed_local`` queue: once with ``settings.embed_batch_size``/``embed_batch_wait_ms``, once
with a batch size of 1 (every request flushed alone). Same messages, model, daemon and storage;
only the batching differs. Each run first handles one warm-up message so model loading is not
timed, then publishes ``n`` messages and times until all are done.

Besides messages per second, each mode reports where the CPU went (``cpu_ms_per_msg``: the
whole process, daemon and publisher; ``backend_ms_per_text``: time inside model calls), and
``model_only`` measures the model alone on the same texts (one text per call versus calls of
``embed_batch_size``): the most batching can win on this machine, whatever the daemon does.
On a CPU the forward pass is compute-bound (its cost grows with the tokens, not the calls), so
that ceiling is small; batching pays most against per-call latency (a GPU, an HTTP API).

``measure_api(settings, n, latency_ms=50)`` is the same comparison where batching pays: the
API backend (queue ``embed``, the shipped queue tuning) against the OpenAI-compatible fake
server of the test suite (``tests/fake_openai.py``) answering every call after a fixed delay,
as a hosted embeddings API does (tens of milliseconds a call whatever its size). One call per
message is then bound by the batcher's concurrent calls over the per-call latency (4 / 50 ms:
80 messages a second); a batch carries as many texts as arrived within the wait. Its
messages are queued before the daemon starts, so only the consumer is timed.

``settings`` must point at a throwaway vhost, a Postgres schema (migrated here if needed) and
a lock prefix of the benchmark's own.
"""

from __future__ import annotations

import asyncio
import random
import resource
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from bench import broker
from consumers.embed import API_BATCHER, LOCAL_BATCHER, register
from consumers.embed.weights import install
from mlpipe.broker.topology import Topology, declare
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.effects import Effects
from mlpipe.embedding.local import LocalEmbedder
from mlpipe.handlers import Registry
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.store.migrate import migrate
from mlpipe.testing import running_daemon, wait_for

QUEUE = "embed_local"
API_QUEUE = "embed"
#: The fake API's delay per call when none is given (a hosted embeddings API's typical).
API_LATENCY_MS = 50.0
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


def _task(share: str, text: str, backend: str = "local") -> Task:
    return build_task(TaskType.EMBED_VECTORS, share,
                      {"content": {"text": text, "type": "caption"},
                       "options": {"backend": backend}})


async def _run(settings: Settings, label: str, texts: list[str], *, queue: str = QUEUE,
               backend: str = "local", batcher_name: str = LOCAL_BATCHER) -> dict[str, Any]:
    registry = Registry()
    register(registry, settings)
    run_id = uuid.uuid4().hex[:8]
    n = len(texts)
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, queue, executor=effects.executor) as daemon, \
            Producer(settings) as producer:
        await producer.publish(_task(f"warmup-{label}-{run_id}", "Loading the model.", backend))
        await wait_for(lambda: daemon.status().tasks_done >= 1, timeout=120,
                       message="warm-up message done")
        batcher = daemon.resources[batcher_name]
        before = batcher.stats()
        in_flight = asyncio.Semaphore(PUBLISH_IN_FLIGHT)

        async def publish(i: int, text: str) -> None:
            async with in_flight:
                await producer.publish(_task(f"{label}-{run_id}-{i}", text, backend))

        cpu_before = _cpu_s()
        started = time.perf_counter()
        await asyncio.gather(*(publish(i, text) for i, text in enumerate(texts)))
        await wait_for(lambda: daemon.status().tasks_done >= n + 1, timeout=max(120.0, n),
                       interval=0.005, message=f"{n} {label} messages done")
        elapsed = time.perf_counter() - started
        cpu = _cpu_s() - cpu_before
        after = batcher.stats()
    calls = after.batches - before.batches
    sent = after.texts - before.texts
    backend_s = after.backend_s - before.backend_s
    return {"seconds": round(elapsed, 3), "messages_per_s": round(n / elapsed, 1),
            "backend_calls": calls, "texts": sent,
            "texts_per_call": round(sent / max(1, calls), 2),
            "largest_batch": after.largest_batch,
            "cpu_ms_per_msg": round(cpu / n * 1000, 2),
            "backend_ms_per_text": round(backend_s / max(1, sent) * 1000, 2),
            "backend_busy": round(backend_s / elapsed, 2),
            "batch_size": settings.embed_batch_size,
            "batch_wait_ms": settings.embed_batch_wait_ms}


async def _run_prefilled(settings: Settings, label: str, texts: list[str], *, queue: str,
                         backend: str, batcher_name: str) -> dict[str, Any]:
    """Like ``_run``, but every message is queued before the daemon starts (as the other
    consuming workloads do), so the publisher does not share the event loop with the consumer
    being measured. The window runs from the first message done to the last (``n`` messages
    finish within it: the first one done is the window's start, not counted). Checks that
    every result was stored."""
    registry = Registry()
    register(registry, settings)
    run_id = uuid.uuid4().hex[:8]
    n = len(texts)
    async with broker.connection(settings.broker_url) as conn, conn.channel() as ch:
        await declare(ch, Topology())
    async with Producer(settings) as producer:
        in_flight = asyncio.Semaphore(PUBLISH_IN_FLIGHT)

        async def publish(share: str, text: str) -> None:
            async with in_flight:
                await producer.publish(_task(share, text, backend))

        await asyncio.gather(publish(f"{label}-{run_id}-first", "The first message."),
                             *(publish(f"{label}-{run_id}-{i}", text)
                               for i, text in enumerate(texts)))
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, queue, executor=effects.executor) as daemon:
        await wait_for(lambda: daemon.status().tasks_done >= 1, timeout=120, interval=0.001,
                       message="first message done")
        cpu_before, started = _cpu_s(), time.perf_counter()
        batcher = daemon.resources[batcher_name]
        before = batcher.stats()
        await wait_for(lambda: daemon.status().tasks_done >= n + 1, timeout=max(120.0, n),
                       interval=0.002, message=f"{n} {label} messages done")
        elapsed = time.perf_counter() - started
        cpu = _cpu_s() - cpu_before
        after = batcher.stats()
        assert effects.pool is not None
        stored = await effects.pool.fetchval(
            "SELECT count(*) FROM ml_results WHERE share_id LIKE $1", f"{label}-{run_id}-%")
    if stored != n + 1:
        raise RuntimeError(f"{label}: {stored} of {n + 1} results stored")
    calls = after.batches - before.batches
    sent = after.texts - before.texts
    return {"seconds": round(elapsed, 3), "messages_per_s": round(n / elapsed, 1),
            "backend_calls": calls, "texts": sent,
            "texts_per_call": round(sent / max(1, calls), 2),
            "largest_batch": after.largest_batch,
            "cpu_ms_per_msg": round(cpu / n * 1000, 2),
            "batch_size": settings.embed_batch_size,
            "batch_wait_ms": settings.embed_batch_wait_ms}


def _cpu_s() -> float:
    """CPU seconds of this process (every thread: event loop, model, publisher)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _model_only(model_dir: str, texts: list[str], batch: int) -> dict[str, Any]:
    """The model alone, no daemon: one text per call versus calls of ``batch`` texts over the
    same texts, best of three passes each (blocking; run in a thread)."""
    embedder = LocalEmbedder(model_dir)
    embedder.encode(texts[:batch])  # load and warm up
    result: dict[str, Any] = {}
    for key, size in (("one_per_call", 1), ("batched", batch)):
        best = (float("inf"), 0.0)
        for _ in range(3):
            cpu, wall = _cpu_s(), time.perf_counter()
            for at in range(0, len(texts), size):
                embedder.encode(texts[at:at + size])
            best = min(best, (time.perf_counter() - wall, _cpu_s() - cpu))
        wall_s, cpu_s = best
        result[key] = {"texts_per_s": round(len(texts) / wall_s, 1),
                       "cpu_ms_per_text": round(cpu_s / len(texts) * 1000, 2)}
    result["speedup"] = round(result["batched"]["texts_per_s"]
                              / result["one_per_call"]["texts_per_s"], 2)
    result["batch_size"] = batch
    return result


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
        model_only = await asyncio.to_thread(_model_only, model_dir, texts[:256],
                                             settings.embed_batch_size)
    best = {mode: max(runs, key=lambda r: r["messages_per_s"]) for mode, runs in samples.items()}
    return {"workload": "embed_batching", "n_messages": n_messages, "rounds": rounds,
            **best,
            "speedup": round(best["batched"]["messages_per_s"]
                             / best["one_call_per_message"]["messages_per_s"], 2),
            "cpu_speedup": round(best["one_call_per_message"]["cpu_ms_per_msg"]
                                 / best["batched"]["cpu_ms_per_msg"], 2),
            "model_only": model_only,
            "samples_messages_per_s": {mode: [r["messages_per_s"] for r in runs]
                                       for mode, runs in samples.items()}}


async def measure_api(settings: Settings, n_messages: int, *, latency_ms: float = API_LATENCY_MS,
                      rounds: int = 3) -> dict[str, Any]:
    """Batched versus one call per message through the daemon with the API backend, against
    the fake OpenAI-compatible server delaying each call by ``latency_ms``; alternating
    ``rounds`` times. Returns every round (``samples_messages_per_s``) and the last round's
    details per mode, with the latency used."""
    from tests.fake_openai import FakeOpenAI

    class SlowAPI(FakeOpenAI):
        """The test suite's fake, answering embeddings after a fixed per-call delay."""

        async def _embeddings(self, request: Any) -> Any:
            await asyncio.sleep(latency_ms / 1000)
            return await super()._embeddings(request)

    await migrate(settings.database_url, schema=settings.database_schema)
    rng = random.Random(20240602)
    texts = [_text(rng) for _ in range(n_messages)]
    samples: dict[str, list[dict[str, Any]]] = {"batched": [], "one_call_per_message": []}
    async with SlowAPI() as api:
        batched = settings.model_copy(update={"openai_api_key": SecretStr("bench"),
                                              "openai_base_url": api.base_url})
        single = batched.model_copy(update={"embed_batch_size": 1, "embed_batch_wait_ms": 0.0})
        for _ in range(rounds):
            for mode, s in (("batched", batched), ("one_call_per_message", single)):
                samples[mode].append(await _run_prefilled(
                    s, f"api-{mode}", texts, queue=API_QUEUE, backend="api",
                    batcher_name=API_BATCHER))
    return {"workload": "embed_api", "n_messages": n_messages, "rounds": rounds,
            "api_latency_ms": latency_ms,
            **{mode: runs[-1] for mode, runs in samples.items()},
            "samples_messages_per_s": {mode: [r["messages_per_s"] for r in runs]
                                       for mode, runs in samples.items()}}
