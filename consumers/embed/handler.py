"""The ``embed_vectors`` handler: chunk, embed through the shared batcher, store the chunks.

The result row (``ml_results``, written by the effects layer after this returns) says how many
chunks were stored for which model; the vectors themselves go to ``ml_embeddings`` here, in
their own transaction, before the result. A crash between the two leaves chunks whose task is
retried and rewrites them identically, so the order is safe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from mlpipe.backends import PriceList, backend_for, prices
from mlpipe.contract.models import (
    Backend,
    EmbeddingType,
    EmbedOptions,
    EmbedTask,
    Task,
)
from mlpipe.embedding.batcher import Batcher
from mlpipe.embedding.local import MODEL_NAME as LOCAL_MODEL
from mlpipe.errors import PermanentError
from mlpipe.handlers import METRICS_RESOURCE, Cost, HandlerResult, TaskContext
from mlpipe.settings import Settings

from .chunking import MINILM_LIMITS, Chunking, ChunkingError, ChunkLimits, chunk
from .names import API_BATCHER, LOCAL_BATCHER, STORE
from .store import ChunkStore

#: Content above this many (approximate) tokens counts as long for the model choice.
LONG_CONTENT_TOKENS = 4000


def api_model(settings: Settings, options: EmbedOptions, tokens: int,
              large_model: str | None = None) -> str:
    """Model choice by size: the task's ``options.model`` if it names one; else
    ``large_model`` (e.g. text-embedding-3-large) for composite or long content when one is
    configured; else ``settings.embed_api_model`` (text-embedding-3-small).

    ``large_model`` is off by default on purpose: vectors of different models cannot be
    compared, so a search over a mixed corpus has to query each model separately."""
    if options.model:
        return options.model
    if large_model and (options.embedding_type is EmbeddingType.COMPOSITE
                        or tokens > LONG_CONTENT_TOKENS):
        return large_model
    return settings.embed_api_model


@dataclass(frozen=True)
class _Plan:
    backend: Backend
    model: str
    chunking: Chunking


@dataclass(frozen=True)
class EmbedHandler:
    settings: Settings
    large_api_model: str | None = None

    @property
    def prices(self) -> PriceList:
        """The API's prices: OpenAI's, or only configured ones for a self-hosted server."""
        return prices(self.settings)

    def plan(self, task: EmbedTask) -> _Plan:
        """Backend, model and chunks of a task; the same for the estimate and the run."""
        backend = backend_for(task, self.settings)
        content, options = task.payload.content, task.payload.options
        limits = MINILM_LIMITS if backend is Backend.LOCAL else ChunkLimits()
        try:
            chunking = chunk(content.text, content.segments, options.chunk_strategy, limits,
                             lead=content.lead)
        except ChunkingError as exc:
            raise PermanentError(str(exc), reason=exc.reason) from exc
        if backend is Backend.LOCAL:
            model = LOCAL_MODEL
        else:
            tokens = sum(c.tokens for c in chunking.chunks)
            model = api_model(self.settings, options, tokens, self.large_api_model)
        return _Plan(backend, model, chunking)

    def estimate_cost(self, task: Task) -> Decimal:
        """API price of the chunks' estimated tokens; nothing for the local model. A task that
        cannot be chunked costs nothing here: the handler refuses it before any call."""
        if not isinstance(task, EmbedTask):
            return Decimal(0)
        try:
            plan = self.plan(task)
        except PermanentError:
            return Decimal(0)
        if plan.backend is Backend.LOCAL:
            return Decimal(0)
        return self.prices.token_cost(plan.model, sum(c.tokens for c in plan.chunking.chunks))

    async def handle(self, task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        plan = self.plan(task)
        chunks = plan.chunking.chunks
        name = LOCAL_BATCHER if plan.backend is Backend.LOCAL else API_BATCHER
        batcher: Batcher = ctx.resources[name]
        if batcher.on_batch is None and (metrics := ctx.resources.get(METRICS_RESOURCE)):
            batcher.on_batch = metrics.embedding_batch.observe
        store: ChunkStore = ctx.resources[STORE]
        embedded = await batcher.submit([c.text for c in chunks], model=plan.model)
        dims = len(embedded.vectors[0])
        options = task.payload.options
        await store.replace_chunks(
            share_id=task.share_id, embedding_type=options.embedding_type.value,
            model=plan.model, chunks=chunks, vectors=embedded.vectors,
            content_hashes=[_hash(c.text) for c in chunks],
            metadata=self._metadata(task, plan))
        costs: tuple[Cost, ...] = ()
        if plan.backend is Backend.API:
            # A server that reports no usage is charged the estimate, never nothing.
            tokens = embedded.tokens
            if tokens is None:
                tokens = sum(c.tokens for c in chunks)
            costs = (Cost(tokens, "tokens", self.prices.token_cost(plan.model, tokens),
                          plan.model),)
        ctx.log.info("embed.stored", chunks=len(chunks), model=plan.model, dims=dims,
                     strategy=plan.chunking.strategy.value, backend=plan.backend.value)
        return HandlerResult(
            {"chunks": len(chunks), "model": plan.model, "dims": dims,
             "embedding_type": options.embedding_type.value, "backend": plan.backend.value},
            model_version=plan.model, costs=costs)

    @staticmethod
    def _metadata(task: EmbedTask, plan: _Plan) -> dict[str, Any]:
        """What searches filter on (platform, content type) and show (title, url)."""
        content = task.payload.content
        found = {"platform": content.platform,
                 "content_type": content.type.value if content.type else None,
                 "title": content.title, "url": content.url,
                 "chunk_strategy": plan.chunking.strategy.value}
        return {k: v for k, v in found.items() if v is not None}


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
