"""Writing chunk vectors to ``ml_embeddings``.

The handler needs its own small pool: the effects layer's pool is private to the daemon's
executor, and it has no pgvector codec. This one is created on first use (a daemon that never
embeds opens no connections), with ``search_path = <schema>, public`` and pgvector's binary
codec, and closed with the daemon's resources.

A share's chunks for one (embedding type, model) are replaced as a whole in one transaction:
upsert every chunk, then delete the chunks past the new count (the content got shorter), so a
search never sees a mix of old and new chunks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import asyncpg
from pgvector.asyncpg import register_vector

from mlpipe.settings import Settings
from mlpipe.store.pool import unavailable_is_transient

from .backend import Vector
from .chunking import Chunk

POOL_SIZE = 4

_UPSERT = """
INSERT INTO ml_embeddings (share_id, embedding_type, chunk_index, chunk_text, start_s, end_s,
                           content_hash, model, dims, embedding, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (share_id, embedding_type, chunk_index, model) DO UPDATE SET
    chunk_text = EXCLUDED.chunk_text, start_s = EXCLUDED.start_s, end_s = EXCLUDED.end_s,
    content_hash = EXCLUDED.content_hash, dims = EXCLUDED.dims, embedding = EXCLUDED.embedding,
    metadata = EXCLUDED.metadata, created_at = now()
"""
_TRIM = """
DELETE FROM ml_embeddings
WHERE share_id = $1 AND embedding_type = $2 AND model = $3 AND chunk_index >= $4
"""


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb as dicts, vector as numpy arrays (the extension lives in ``public``)."""
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")
    await register_vector(conn, schema="public")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def create_vector_pool(settings: Settings, *, size: int = POOL_SIZE) -> asyncpg.Pool:
    schema = settings.database_schema
    search_path = schema if schema == "public" else f"{schema}, public"
    pool = await asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=size, init=init_connection,
        command_timeout=30,
        server_settings={"search_path": search_path, "application_name": "mlpipe-embed"})
    assert pool is not None
    return pool


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
                        self._pool = await create_vector_pool(self._settings)
        return self._pool

    async def replace_chunks(self, *, share_id: str, embedding_type: str, model: str,
                             chunks: Sequence[Chunk], vectors: Sequence[Vector],
                             content_hashes: Sequence[str],
                             metadata: Mapping[str, Any]) -> None:
        if not (len(chunks) == len(vectors) == len(content_hashes)) or not chunks:
            raise ValueError("need one vector and one hash per chunk, and at least one chunk")
        rows = [(share_id, embedding_type, c.index, c.text, c.start_s, c.end_s, h, model,
                 len(v), v, {**metadata, "tokens": c.tokens})
                for c, v, h in zip(chunks, vectors, content_hashes, strict=True)]
        pool = await self.pool()
        async with unavailable_is_transient("storing embeddings"), pool.acquire() as conn, \
                conn.transaction():
            await conn.executemany(_UPSERT, rows)
            await conn.execute(_TRIM, share_id, embedding_type, model, len(chunks))

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
