"""Embeddings: chunk content, embed it in micro-batches shared across deliveries, store the
chunk vectors in ``ml_embeddings`` for similarity search (``mlpipe.search``).

``register(registry, settings)`` adds the ``embed_vectors`` handler and its resources:

* ``embed.batcher.local``: all-MiniLM-L6-v2 (ONNX, ``settings.embedding_model_dir``);
* ``embed.batcher.api``: the OpenAI-compatible ``/v1/embeddings`` (``settings.embed_api_model``);
* ``embed.store``: a small pgvector-aware asyncpg pool of its own.

Each is created lazily on first use and closed when the daemon stops.
"""

from __future__ import annotations

from mlpipe.handlers import Registry
from mlpipe.settings import Settings

from .names import API_BATCHER, LOCAL_BATCHER, STORE

__all__ = ["API_BATCHER", "LOCAL_BATCHER", "STORE", "register"]

#: Concurrent HTTP calls per API batcher; the local model runs one inference at a time.
API_CONCURRENT_CALLS = 4
#: A long transcript at the local model's speed (~5 ms a chunk on two cores) plus the wait
#: behind other batches; the lock lives 1.5x ``EXPECTED_RUNTIME_S`` and is renewed meanwhile.
TIMEOUT_S = 300.0
EXPECTED_RUNTIME_S = 30.0


def register(registry: Registry, settings: Settings, *,
             large_api_model: str | None = None) -> None:
    # Imported here: `mlpipe search --help`, and code that only needs the resource names,
    # should not pay for the API client and the handler's imports.
    from mlpipe.contract.models import EmbedTask, TaskType
    from mlpipe.embedding.batcher import Batcher
    from mlpipe.embedding.local import LocalEmbedder
    from mlpipe.embedding.remote import ApiEmbedder
    from mlpipe.handlers import HandlerResult, TaskContext

    from .handler import EmbedHandler
    from .store import ChunkStore

    wait_s = settings.embed_batch_wait_ms / 1000
    registry.add_resource(LOCAL_BATCHER, lambda: Batcher(
        LocalEmbedder(settings.embedding_model_dir, device=settings.embedding_device),
        max_batch=settings.embed_batch_size, max_wait_s=wait_s, max_concurrent_calls=1,
        name="embed.local"))
    registry.add_resource(API_BATCHER, lambda: Batcher(
        ApiEmbedder(settings), max_batch=settings.embed_batch_size, max_wait_s=wait_s,
        max_concurrent_calls=API_CONCURRENT_CALLS, name="embed.api"))
    registry.add_resource(STORE, lambda: ChunkStore(settings))
    embedder = EmbedHandler(settings, large_api_model)

    @registry.handler(TaskType.EMBED_VECTORS, timeout_s=TIMEOUT_S,
                      expected_runtime_s=EXPECTED_RUNTIME_S,
                      estimate_cost=embedder.estimate_cost)
    async def embed_vectors(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        return await embedder.handle(task, ctx)
