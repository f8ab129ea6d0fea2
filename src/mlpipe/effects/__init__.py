"""Locks, stored results and budgets around handler runs: the exactly-once layer.

``Effects`` owns the Postgres pool and the Redis client this layer needs; open it before the
daemon starts and close it after the daemon stopped::

    async with Effects(settings) as effects:
        daemon = Daemon(settings, registry, queues, executor=effects.executor)
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import asyncpg
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from mlpipe.idempotency.lock import LockManager
from mlpipe.settings import Settings
from mlpipe.store.migrate import MigrationError, inspect_schema
from mlpipe.store.pool import UNAVAILABLE, create_pool

from .budget import BudgetGuard
from .executor import EffectsExecutor
from .parking import ResultParking

log = structlog.get_logger(__name__)


class Effects:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.pool: asyncpg.Pool | None = None
        self.redis: aioredis.Redis | None = None
        self._executor: EffectsExecutor | None = None

    @property
    def executor(self) -> EffectsExecutor:
        if self._executor is None:
            raise RuntimeError("Effects not started")
        return self._executor

    async def start(self) -> Self:
        s = self._settings
        # No client-side retries: redis-py 8 retries with backoff by default, which made one
        # lock renewal hang ~15 s across a 4 s Redis restart and let the lease lapse. mlpipe's
        # own policy owns retrying (a renewal retries at its next tick; an acquire becomes a
        # TransientError and a delayed redelivery).
        self.redis = aioredis.Redis.from_url(s.redis_url, socket_timeout=2.0,
                                             socket_connect_timeout=2.0,
                                             retry=Retry(NoBackoff(), 0))
        try:
            self.pool = await self._connect_postgres()
        except BaseException:
            await self.redis.aclose()
            raise
        try:
            await self._check_schema()
        except BaseException:
            await self.close()
            raise
        locks = LockManager(self.redis, prefix=s.lock_prefix)
        parking = ResultParking(self.redis, prefix=s.lock_prefix, ttl_s=s.parked_result_ttl_s)
        self._executor = EffectsExecutor(s, self.pool, locks, BudgetGuard(s, self.pool),
                                         parking=parking)
        return self

    async def _connect_postgres(self) -> asyncpg.Pool:
        """The pool, once Postgres accepts connections (within ``startup_wait_s``)."""
        s = self._settings
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(UNAVAILABLE),
                wait=wait_exponential(multiplier=0.2, max=2.0),
                stop=stop_after_delay(s.startup_wait_s), reraise=True,
                before_sleep=lambda state: log.warning(
                    "effects.postgres_unavailable", attempt=state.attempt_number,
                    error=repr(state.outcome.exception() if state.outcome else None))):
            with attempt:
                return await create_pool(s.database_url, schema=s.database_schema,
                                         size=s.database_pool_size)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _check_schema(self) -> None:
        """Fail at start-up, not on the first delivery that needs a missing table or column,
        when the schema lacks a migration or one changed since it was applied."""
        assert self.pool is not None
        status = await inspect_schema(self.pool, self._settings.database_schema)
        if not status.ok:
            raise MigrationError(status.problem())
        if status.unknown:
            log.warning("effects.schema_newer_than_release", schema=status.schema,
                        migrations=status.unknown)

    async def check_redis(self) -> None:
        """Readiness: Redis answers."""
        assert self.redis is not None
        await self.redis.ping()

    async def check_postgres(self) -> None:
        """Readiness: Postgres answers."""
        assert self.pool is not None
        await self.pool.fetchval("SELECT 1")

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
