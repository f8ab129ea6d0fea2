"""The API server: its own asyncpg pool and the FastAPI app under uvicorn, started and closed
together, inside the caller's event loop (no signal handlers: those belong to the CLI).

The pool is the API's own (not the daemon's): ``search_path = <schema>, public`` so mlpipe's
tables and the pgvector type both resolve, the jsonb codec the rest of mlpipe uses, and
pgvector's codec registered so vector columns can be read. Start-up fails, with nothing left
open, when the address is unsafe without tokens, the schema is not migrated, or the port is
taken: the socket is bound here, before uvicorn sees it (uvicorn would ``sys.exit`` on a
taken port), which also gives the real port when ``port`` is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import asyncpg
import structlog
import uvicorn
from pgvector.asyncpg import register_vector
from pydantic import SecretStr

from mlpipe.search import DEFAULT_MODEL, Embedder
from mlpipe.settings import Budget, Settings

from .app import build_app
from .auth import ApiConfigError, TokenSet, ensure_safe_bind
from .context import ApiContext
from .events import DEFAULT_BUFFER, EventHub

log = structlog.get_logger("mlpipe.api")

#: Long enough for a 1000-character query of 4-byte characters, percent-encoded, plus filters.
MAX_REQUEST_LINE = 64 * 1024
#: How long a stopping server lets requests in flight finish.
SHUTDOWN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ApiConfig:
    database_url: str
    database_schema: str = "public"
    host: str = "127.0.0.1"
    port: int = 8080
    tokens: tuple[str, ...] = field(default=(), repr=False)
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    budget_action: str = "dead_letter"
    #: ``ml_embeddings.model`` of the vectors searched; must match the query embedder.
    search_model: str = DEFAULT_MODEL
    pool_size: int = 4
    #: The daemon's settings, for what lives on the broker (``/v1/events``, queue depths,
    #: dead letters). None: those parts answer 503.
    settings: Settings | None = field(default=None, repr=False)
    #: Events buffered per ``/v1/events`` client before it counts as too slow.
    events_buffer: int = DEFAULT_BUFFER

    @classmethod
    def from_settings(cls, settings: Settings, *, host: str | None = None,
                      port: int | None = None,
                      search_model: str = DEFAULT_MODEL) -> ApiConfig:
        """The ``api_*`` settings; ``host``/``port`` given on the command line win."""
        return cls(
            database_url=settings.database_url, database_schema=settings.database_schema,
            host=host if host is not None else settings.api_host,
            port=port if port is not None else settings.api_port,
            tokens=_plain(settings.api_tokens), admin_tokens=_plain(settings.api_admin_tokens),
            budgets=settings.budgets, budget_action=settings.budget_action,
            search_model=search_model, pool_size=settings.api_pool_size, settings=settings)


def _plain(tokens: Sequence[SecretStr]) -> tuple[str, ...]:
    return tuple(t.get_secret_value() for t in tokens)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")
    await register_vector(conn, schema="public")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


async def create_api_pool(config: ApiConfig) -> asyncpg.Pool:
    schema = config.database_schema
    search_path = schema if schema == "public" else f"{schema}, public"
    try:
        pool = await asyncpg.create_pool(
            config.database_url, min_size=1, max_size=config.pool_size,
            init=_init_connection, command_timeout=30,
            server_settings={"search_path": search_path, "application_name": "mlpipe-api"})
    except ValueError as exc:  # register_vector: no vector type in public
        raise ApiConfigError(f"the database has no pgvector extension in public ({exc}): "
                             "run `mlpipe migrate` first") from exc
    assert pool is not None
    return pool


class ApiServer:
    """``async with ApiServer(config, embedder=...) as server: ...``; ``server.url`` is where
    it listens (with the real port when ``config.port`` is 0)."""

    def __init__(self, config: ApiConfig, *, embedder: Embedder) -> None:
        self.config = config
        self._embedder = embedder
        self._tokens = TokenSet(config.tokens, config.admin_tokens)
        self.pool: asyncpg.Pool | None = None
        self._server: _EmbeddedServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self.events: EventHub | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        await ensure_safe_bind(self.config.host, self._tokens)
        if not self._tokens.enabled:
            log.warning("api.no_tokens", host=self.config.host,
                        effect="the read endpoints answer without a token; the admin "
                               "ones (costs, tasks, budgets) answer 403")
        try:
            self.pool = await create_api_pool(self.config)
            await self._check_schema(self.pool)
            ctx = ApiContext(pool=self.pool, embedder=self._embedder,
                             search_model=self.config.search_model,
                             budgets=self.config.budgets,
                             budget_action=self.config.budget_action)
            if self.config.settings is not None:
                from mlpipe.producer import topology_from

                self.events = EventHub(self.config.settings.broker_url,
                                       topology_from(self.config.settings).events_exchange,
                                       buffer=self.config.events_buffer)
            app = build_app(ctx, self._tokens, self.events, self.config.settings)
            sock = await _bind(self.config.host, self.config.port)
            self.port = int(sock.getsockname()[1])
            self._server = _EmbeddedServer(uvicorn.Config(
                app, lifespan="off", access_log=False, log_config=None, log_level="warning",
                server_header=False, proxy_headers=False,
                h11_max_incomplete_event_size=MAX_REQUEST_LINE,
                timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_S)))
            self._serving = asyncio.create_task(self._server.serve(sockets=[sock]),
                                                name="mlpipe-api")
            while not self._server.started:  # uvicorn offers a flag, not an event
                if self._serving.done():
                    self._serving.result()
                    raise ApiConfigError("the API server stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            await self.close()
            raise
        log.info("api.listening", url=self.url, auth=self._tokens.enabled)

    async def _check_schema(self, pool: asyncpg.Pool) -> None:
        found = await pool.fetchval(
            "SELECT to_regclass(quote_ident($1) || '.ml_embeddings') IS NOT NULL",
            self.config.database_schema)
        if not found:
            raise ApiConfigError(
                f"schema {self.config.database_schema!r} has no mlpipe tables: "
                "run `mlpipe migrate` first")

    async def close(self) -> None:
        """End the event streams, stop listening, let requests in flight finish, then close
        the pool."""
        if self.events is not None:
            events, self.events = self.events, None
            await events.close()
        if self._server is not None and self._serving is not None:
            server, serving, self._server, self._serving = (self._server, self._serving,
                                                            None, None)
            server.should_exit = True
            await serving
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: the process's signals are ``mlpipe serve``'s, and a
    server embedded in a test or another program must not take them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host`` (every interface when empty), or ``OSError``."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
