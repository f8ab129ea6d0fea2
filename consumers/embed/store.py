"""Writing chunk vectors to ``ml_embeddings``.

The handler needs its own small pool: the effects layer's pool is private to the daemon's
executor, and it has no pgvector codec. This one (``mlpipe.store.pool.create_pool`` with
``vectors=True``) is created on first use, so a daemon that never embeds opens no
connections, and closed with the daemon's resources.

A share's chunks for one (embedding type, model) are replaced as a whole by one statement:
upsert every chunk, then delete the chunks past the new count (the content got shorter), so a
search never sees a mix of old and new chunks. One statement is one round trip per delivery,
which matters when the embed queue handles hundreds of small deliveries a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import asyncpg

from mlpipe.embedding.backend import Vector
from mlpipe.settings import Settings
from mlpipe.store.pool import create_pool, unavailable_is_transient

from .chunking import Chunk

POOL_SIZE = 4

#: One statement, so one round trip and atomic without a transaction block: upsert every chunk
#: (arrays unnested), then delete the chunks past the new count. Both parts work on the same
#: snapshot and touch different rows (indexes below / from the new count).
_REPLACE = """
WITH new AS (
    SELECT * FROM unnest($4::int[], $5::text[], $6::float8[], $7::float8[], $8::text[],
                         $9::int[], $10::vector[], $11::jsonb[])
        AS n(chunk_index, chunk_text, start_s, end_s, content_hash, dims, embedding, metadata)
), upserted AS (
    INSERT INTO ml_embeddings (share_id, embedding_type, chunk_index, chunk_text, start_s, end_s,
                               content_hash, model, dims, embedding, metadata)
    SELECT $1, $2, chunk_index, chunk_text, start_s, end_s, content_hash, $3, dims, embedding,
           metadata FROM new
    ON CONFLICT (share_id, embedding_type, chunk_index, model) DO UPDATE SET
        chunk_text = EXCLUDED.chunk_text, start_s = EXCLUDED.start_s, end_s = EXCLUDED.end_s,
        content_hash = EXCLUDED.content_hash, dims = EXCLUDED.dims,
        embedding = EXCLUDED.embedding, metadata = EXCLUDED.metadata, created_at = now()
    RETURNING 1
)
DELETE FROM ml_embeddings
WHERE share_id = $1 AND embedding_type = $2 AND model = $3 AND chunk_index >= cardinality($4)
"""


class ChunkStore:
    """The handler's resource: a lazily opened pool plus the one write it does."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    async with unavailable_is_transient("opening the embeddings pool"):
                        self._pool = await create_pool(
                            self._settings.database_url, schema=self._settings.database_schema,
                            size=POOL_SIZE, vectors=True, name="mlpipe-embed")
        return self._pool

    async def replace_chunks(self, *, share_id: str, embedding_type: str, model: str,
                             chunks: Sequence[Chunk], vectors: Sequence[Vector],
                             content_hashes: Sequence[str],
                             metadata: Mapping[str, Any]) -> None:
        if not (len(chunks) == len(vectors) == len(content_hashes)) or not chunks:
            raise ValueError("need one vector and one hash per chunk, and at least one chunk")
        from pgvector import Vector as PgVector  # with numpy: only once something is embedded

        pool = await self.pool()
        async with unavailable_is_transient("storing embeddings"), pool.acquire() as conn:
            await conn.execute(
                _REPLACE, share_id, embedding_type, model, [c.index for c in chunks],
                [c.text for c in chunks], [c.start_s for c in chunks],
                [c.end_s for c in chunks], list(content_hashes), [len(v) for v in vectors],
                # Vector objects: asyncpg would take a bare ndarray for one more dimension
                [PgVector(v) for v in vectors], [{**metadata, "tokens": c.tokens} for c in chunks])

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
