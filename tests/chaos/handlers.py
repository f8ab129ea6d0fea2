"""Chaos handlers: fast and deterministic, each run recording its side effect in Postgres
(``chaos_effects``), so the verdict can count how often every task's effect happened.

The transcription handler sends every media URL that is not a chaos placeholder
(``s3://chaos/...``) through mlpipe's real media guard; hostile URLs (``file://``, traversal,
other schemes) must be refused there, before any I/O. A fetch that got through would be
recorded as a ``media_fetch`` effect, which the verdict requires to be zero.

Each row carries the moment the handler started (``started``, this process's clock) and the
moment of the effect (``at``): the verdict excuses a re-run only with evidence that predates
the later run's start (``verdict.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from consumers.media import fetch_media
from mlpipe.contract.models import Task, TaskType, TranscribeTask
from mlpipe.errors import TransientError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.settings import Settings
from mlpipe.store.pool import UNAVAILABLE

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS chaos_effects (
    id bigserial PRIMARY KEY, share_id text NOT NULL, task_type text NOT NULL,
    kind text NOT NULL, pid integer NOT NULL, attempt integer NOT NULL,
    message_id text, started timestamptz NOT NULL, at timestamptz NOT NULL DEFAULT now())
"""


def build_registry(settings: Settings) -> Registry:
    registry = Registry()

    @contextlib.asynccontextmanager
    async def effects_pool() -> AsyncIterator[asyncpg.Pool]:
        # Waits for Postgres as the daemon's own start-up does (``Effects``): a daemon that
        # replaces a killed one may start while Postgres is down for another fault.
        path = f"{settings.database_schema}, public"
        pool: asyncpg.Pool | None = None
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(UNAVAILABLE),
                wait=wait_exponential(multiplier=0.2, max=2.0),
                stop=stop_after_delay(settings.startup_wait_s), reraise=True):
            with attempt:
                pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4,
                                                 server_settings={"search_path": path})
        assert pool is not None
        try:
            yield pool
        finally:
            await pool.close()

    registry.add_resource("chaos.db", effects_pool)

    async def record(ctx: TaskContext, task: Task, kind: str, started: float) -> None:
        try:
            await ctx.resources["chaos.db"].execute(
                "INSERT INTO chaos_effects (share_id, task_type, kind, pid, attempt, message_id, "
                "started) VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7))", task.share_id,
                task.task_type.value, kind, os.getpid(), ctx.attempt, ctx.message_id, started)
        except UNAVAILABLE as exc:
            raise TransientError(f"effect not recorded: {exc}") from exc

    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        started = time.time()
        if isinstance(task, TranscribeTask) and not task.payload.media_url.startswith(
                "s3://chaos/"):
            with tempfile.TemporaryDirectory() as tmp:
                await fetch_media(task.payload.media_url, settings, Path(tmp))
                await record(ctx, task, "media_fetch", started)
        await asyncio.sleep(0.002)  # the "work"
        await record(ctx, task, "effect", started)
        return HandlerResult({"pid": os.getpid(), "attempt": ctx.attempt})

    for tt in TaskType:
        # lock TTL 15 s: longer than the scenario's outages, as production TTLs should be
        registry.register(tt, handle, expected_runtime_s=10.0, timeout_s=30)
    return registry
