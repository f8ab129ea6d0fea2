"""Search from Python with nothing but settings: the connection and the query embedder of the
stored vectors' model, wired up the way ``mlpipe search`` does it.

    async with Searcher(Settings()) as searcher:
        for hit in await searcher.search("how do rockets reach orbit", limit=5):
            print(hit.share_id, hit.start_s, hit.end_s, hit.similarity, hit.chunk_text)
        related = await searcher.similar("share-123")

``mlpipe.search.search`` / ``similar_to_share`` are the lower layer (any pool, any embedder);
this picks the backend like the handler does: the API model when ``MLPIPE_OPENAI_API_KEY`` or
``MLPIPE_OPENAI_BASE_URL`` is set, else the local MiniLM (``backend=``/``model=`` override), so
queries are embedded with the model the vectors were stored with.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Self

from mlpipe.search import Hit, VectorLike, search, similar_to_share
from mlpipe.settings import Settings

if TYPE_CHECKING:
    import asyncpg

    from .backend import EmbedBackend


class Searcher:
    def __init__(self, settings: Settings | None = None, *, backend: str | None = None,
                 model: str | None = None, pool_size: int = 2) -> None:
        if backend not in (None, "api", "local"):
            raise ValueError(f"backend must be 'api' or 'local', not {backend!r}")
        self.settings = settings or Settings()
        self._embedder = query_backend(self.settings, backend)
        #: Name of the stored vectors' model that searches compare against.
        self.model = model or self._embedder.default_model
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> Self:
        from mlpipe.store.pool import create_pool

        self._pool = await create_pool(
            self.settings.database_url, schema=self.settings.database_schema,
            size=self._pool_size, vectors=True, name="mlpipe-search")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        try:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
        finally:
            await self._embedder.aclose()

    async def embed(self, texts: list[str]) -> Sequence[VectorLike]:
        """Query vectors of ``self.model``."""
        return (await self._embedder(texts, self.model)).vectors

    async def search(self, query: str, *, limit: int = 10, share_id: str | None = None,
                     platform: str | None = None, content_type: str | None = None,
                     embedding_type: str | None = None, since: dt.datetime | None = None,
                     until: dt.datetime | None = None) -> list[Hit]:
        """Chunks nearest to ``query``, best first (share ids, chunk text, timestamps,
        similarity); ``since``/``until``: only chunks embedded in ``[since, until)``."""
        return await search(self._require_pool(), query, embedder=self.embed, limit=limit,
                            share_id=share_id, platform=platform, content_type=content_type,
                            embedding_type=embedding_type, model=self.model, since=since,
                            until=until)

    async def similar(self, share_id: str, *, limit: int = 10,
                      embedding_type: str = "content", platform: str | None = None,
                      content_type: str | None = None, since: dt.datetime | None = None,
                      until: dt.datetime | None = None) -> list[Hit]:
        """Other shares nearest to this one, the best chunk of each (``ShareNotEmbedded`` when
        the share has no vectors of this model)."""
        return await similar_to_share(self._require_pool(), share_id, limit=limit,
                                      model=self.model, embedding_type=embedding_type,
                                      platform=platform, content_type=content_type,
                                      since=since, until=until)

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("use Searcher as `async with Searcher(...) as searcher`")
        return self._pool


def query_backend(settings: Settings, wanted: str | None = None) -> EmbedBackend:
    """The backend that embeds queries: ``wanted``, else the API when one is configured (a
    key, or a self-hosted server's base URL), else the local model (as
    ``mlpipe.backends.backend_for`` decides for tasks)."""
    from mlpipe.backends import api_available
    from mlpipe.contract.models import TaskType

    from .local import LocalEmbedder
    from .remote import ApiEmbedder

    use_api = wanted == "api" or (wanted is None
                                  and api_available(settings, TaskType.EMBED_VECTORS))
    if use_api:
        return ApiEmbedder(settings)
    return LocalEmbedder(settings.embedding_model_dir, device=settings.embedding_device)
