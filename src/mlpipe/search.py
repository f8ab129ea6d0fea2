"""Similarity search over the chunk vectors in ``ml_embeddings``.

Similarity is computed by Postgres (pgvector's cosine distance ``<=>``, similarity =
1 - distance), never in Python: only the top rows leave the database. Every query compares
vectors of one model and one dimension, through the same expression the HNSW index is built
on, ``embedding::vector(<dims>)`` with ``WHERE dims = <dims>``, so the partial index
``ml_embeddings_minilm_hnsw`` (384 dims) serves it; other dimensions work without an index
until a migration adds one for them.

Filters (model, share, platform, content type, embedding type, and the time bounds ``since``
/ ``until`` on when a chunk was embedded) are applied while the index is walked, with
pgvector's iterative scan (``hnsw.iterative_scan = strict_order``, pgvector 0.8+) so a
selective filter still returns ``limit`` hits instead of whatever survived the first
``ef_search`` candidates. The walk gives up after ``hnsw.max_scan_tuples`` index tuples
(pgvector's default, 20,000): a filter that only a handful of chunks past that many closer ones
pass returns fewer hits than asked for.

::

    hits = await search(pool, "how do rockets reach orbit", embedder=batcher.embed)
    hits = await search(pool, vector, platform="youtube", limit=5)
    week = await search(pool, vector, since=now - timedelta(days=7))
    related = await similar_to_share(pool, "share-123")

``pool`` is any asyncpg pool or connection whose ``search_path`` reaches mlpipe's schema and
``public`` (no vector codec needed: vectors travel as text).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

#: The local model (all-MiniLM-L6-v2, 384 dims) that the shipped HNSW index serves.
DEFAULT_MODEL = "all-MiniLM-L6-v2"
MAX_LIMIT = 1000
#: ``similar_to_share`` keeps the best chunk per share from this many nearest chunks per hit.
_CANDIDATES_PER_HIT = 10



class VectorLike(Protocol):
    """A list of floats or a 1-D numpy array."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Any]: ...


#: Turns query texts into vectors of the searched model (``Batcher.embed`` fits).
Embedder = Callable[[list[str]], Awaitable[Sequence[VectorLike]]]
DB = asyncpg.Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


@dataclass(frozen=True)
class Hit:
    share_id: str
    chunk_index: int
    chunk_text: str
    start_s: float | None
    end_s: float | None
    #: 1 - cosine distance, as computed by Postgres.
    similarity: float
    metadata: dict[str, Any]
    embedding_type: str
    model: str
    #: When the chunk was (last) embedded: what ``since``/``until`` compare.
    indexed_at: dt.datetime


class ShareNotEmbedded(LookupError):
    """``similar_to_share`` was given a share with no vectors for the model."""


async def search(pool: DB, query: str | VectorLike, *, embedder: Embedder | None = None,
                 limit: int = 10, share_id: str | None = None, platform: str | None = None,
                 content_type: str | None = None, embedding_type: str | None = None,
                 model: str = DEFAULT_MODEL, exclude_share_id: str | None = None,
                 since: dt.datetime | None = None,
                 until: dt.datetime | None = None) -> list[Hit]:
    """The chunks nearest to ``query`` (a text, embedded with ``embedder``, or a vector of
    ``model``), best first; with ``since``/``until``, only chunks embedded in
    ``[since, until)``."""
    if isinstance(query, str):
        if embedder is None:
            raise ValueError("a text query needs an embedder of the searched model")
        [vector] = await embedder([query])
    else:
        vector = query
    return await _nearest(pool, _literal(vector), len(vector), limit=limit, model=model,
                          share_id=share_id, platform=platform, content_type=content_type,
                          embedding_type=embedding_type, exclude_share_id=exclude_share_id,
                          since=since, until=until)


async def similar_to_share(pool: DB, share_id: str, *, limit: int = 10,
                           model: str = DEFAULT_MODEL, embedding_type: str = "content",
                           platform: str | None = None, content_type: str | None = None,
                           since: dt.datetime | None = None,
                           until: dt.datetime | None = None) -> list[Hit]:
    """Other shares nearest to this one's average chunk vector: the best chunk of each, best
    first, the share itself excluded. ``since``/``until`` bound the other shares' chunks (the
    best one embedded in ``[since, until)``); the share's own vector is always all of it."""
    async with _connection(pool) as conn:
        dims = await conn.fetchval(
            "SELECT max(dims) FROM ml_embeddings WHERE share_id = $1 AND model = $2 "
            "AND embedding_type = $3", share_id, model, embedding_type)
        if dims is None:
            raise ShareNotEmbedded(f"share {share_id!r} has no {embedding_type} embeddings "
                                   f"for model {model!r}")
        dims = _dims(int(dims))
        centroid = await conn.fetchval(
            f"SELECT avg(embedding::vector({dims}))::text FROM ml_embeddings "
            f"WHERE share_id = $1 AND model = $2 AND embedding_type = $3 AND dims = {dims}",
            share_id, model, embedding_type)
    return await _nearest(pool, centroid, dims, limit=limit, model=model, share_id=None,
                          platform=platform, content_type=content_type,
                          embedding_type=embedding_type, exclude_share_id=share_id,
                          since=since, until=until, best_per_share=True)


def search_sql(dims: int, filters: Sequence[str], *, best_per_share: bool = False) -> str:
    """The query text (exposed for EXPLAIN in tests). ``$1`` is the query vector as text,
    ``$2`` the row limit; filters use ``$3`` on."""
    dims = _dims(dims)
    distance = f"embedding::vector({dims}) <=> $1::text::vector({dims})"
    where = " AND ".join([f"dims = {dims}", *filters])
    nearest = (f"SELECT share_id, chunk_index, chunk_text, start_s, end_s, embedding_type, "
               f"model, metadata::text AS metadata, created_at, {distance} AS distance, "
               f"1 - ({distance}) AS similarity "
               f"FROM ml_embeddings WHERE {where} ORDER BY {distance} LIMIT $2")
    if not best_per_share:
        return nearest
    return (f"SELECT * FROM (SELECT DISTINCT ON (share_id) * FROM ({nearest}) AS nearest "
            f"ORDER BY share_id, distance) AS best ORDER BY distance")


async def _nearest(pool: DB, vector: str, dims: int, *, limit: int, model: str,
                   share_id: str | None, platform: str | None, content_type: str | None,
                   embedding_type: str | None, exclude_share_id: str | None,
                   since: dt.datetime | None, until: dt.datetime | None,
                   best_per_share: bool = False) -> list[Hit]:
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    for bound in (since, until):
        if bound is not None and bound.utcoffset() is None:
            raise ValueError("time bounds need a time zone (a naive datetime is ambiguous)")
    args: list[Any] = [vector, limit * _CANDIDATES_PER_HIT if best_per_share else limit]
    filters: list[str] = []
    for column, value, op in (("model", model, "="), ("share_id", share_id, "="),
                              ("metadata->>'platform'", platform, "="),
                              ("metadata->>'content_type'", content_type, "="),
                              ("embedding_type", embedding_type, "="),
                              ("share_id", exclude_share_id, "<>"),
                              ("created_at", since, ">="), ("created_at", until, "<")):
        if value is not None:
            args.append(value)
            filters.append(f"{column} {op} ${len(args)}")
    sql = search_sql(dims, filters, best_per_share=best_per_share)
    async with _connection(pool) as conn, conn.transaction():
        # Keep walking the index until enough rows pass the filters (pgvector 0.8+).
        await conn.execute("SET LOCAL hnsw.iterative_scan = strict_order; "
                           f"SET LOCAL hnsw.ef_search = {min(1000, max(40, 2 * args[1]))}")
        rows = await conn.fetch(sql, *args)
    hits = [Hit(share_id=r["share_id"], chunk_index=r["chunk_index"],
                chunk_text=r["chunk_text"], start_s=r["start_s"], end_s=r["end_s"],
                similarity=float(r["similarity"]), metadata=_json(r["metadata"]),
                embedding_type=r["embedding_type"], model=r["model"],
                indexed_at=r["created_at"]) for r in rows]
    return hits[:limit]


@asynccontextmanager
async def _connection(db: DB) -> AsyncIterator[asyncpg.Connection | Any]:
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            yield conn
    else:
        yield db


def _dims(dims: int) -> int:
    """Dimensions go into the SQL text (a type modifier cannot be a parameter): ints only."""
    if not isinstance(dims, int) or not 1 <= dims <= 16000:
        raise ValueError(f"invalid vector dimension {dims!r}")
    return dims


def _literal(vector: VectorLike) -> str:
    if len(vector) == 0:
        raise ValueError("empty query vector")
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


def _json(raw: Any) -> dict[str, Any]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    return dict(value or {})
