"""The asyncpg pool and the translation of its failures.

Every connection gets ``search_path = <schema>, public`` (mlpipe's tables in their schema, the
pgvector extension in ``public``) and a jsonb codec, so the rest of the code passes dicts.
Connection-level failures become ``TransientError`` here; they are the "Postgres briefly
down" row of the failure table.
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import asyncpg

from mlpipe.errors import TransientError

#: Anything queries can be run on: a pool, a connection, or a pooled connection.
DB = asyncpg.Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

#: Failures that mean "the database is not reachable right now", not "the query is wrong".
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
)


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_dumps, decoder=json.loads, schema="pg_catalog")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


async def _init_vectors(conn: asyncpg.Connection) -> None:
    """Also pgvector's binary codec (vectors as numpy arrays; the extension is in ``public``).
    Imported here: pgvector brings numpy, which a producer or a summarize worker never needs."""
    from pgvector.asyncpg import register_vector

    await _init(conn)
    await register_vector(conn, schema="public")


async def create_pool(dsn: str, *, schema: str = "public", size: int = 10,
                      vectors: bool = False, name: str = "mlpipe") -> asyncpg.Pool:
    """The one way mlpipe opens Postgres: ``search_path``, the jsonb codec, the cheap reset;
    ``vectors`` adds pgvector's codec for the pools that read or write embeddings. ``name``
    is the ``application_name`` that ``pg_stat_activity`` shows."""
    search_path = schema if schema == "public" else f"{schema}, public"
    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=size, init=_init_vectors if vectors else _init,
        reset=_reset, command_timeout=30,
        server_settings={"search_path": search_path, "application_name": name},
    )
    assert pool is not None
    return pool


async def _reset(conn: asyncpg.Connection) -> None:
    """All a connection of this pool can be left with is an open transaction (a query cancelled
    mid-way): mlpipe takes only transaction-scoped advisory locks, sets nothing per session and
    never LISTENs. asyncpg's default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL)
    costs a round trip on every release: six per delivery on the effects path."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class _UnavailableIsTransient:
    """A class, not a generator-based context manager: it wraps several steps of every
    delivery, and a generator's set-up costs more than the step it guards (``make bench``)."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if e is not None and isinstance(e, UNAVAILABLE):
            raise TransientError(f"{self._what}: Postgres unavailable: {type(e).__name__}: {e}",
                                 reason="postgres_unavailable") from e


def unavailable_is_transient(what: str) -> _UnavailableIsTransient:
    """``async with``: turn "database unreachable" into ``TransientError`` for the outcome
    decision."""
    return _UnavailableIsTransient(what)
