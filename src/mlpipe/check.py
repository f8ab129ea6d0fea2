"""``mlpipe check``: is this deployment able to run the queues it is meant to run?

Every probe answers in one line with the fix, so a failing migrate Job, a pod stuck in
``CrashLoopBackOff`` or a newcomer's laptop says what to do instead of failing on the first
task. ``FAIL`` lines make the command exit non-zero; ``WARN`` lines are risks that still
work (a Redis that forgets locks on restart, a paid API without a budget ceiling).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlpipe.broker.topology import Topology, WorkQueue
from mlpipe.settings import Settings

OK, WARN, FAIL = "ok", "WARN", "FAIL"
PROBE_TIMEOUT_S = 10.0

#: Files a local model directory must hold for the handlers of a ``*_local`` queue.
MODEL_FILES = {
    "transcribe_local": ("whisper_model_dir", ("model.bin", "config.json", "tokenizer.json")),
    "embed_local": ("embedding_model_dir", ("model.onnx", "tokenizer.json")),
}


@dataclass(frozen=True)
class Finding:
    status: str
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<10} {self.detail}" + (
            f"\n      fix: {self.fix}" if self.fix else "")


Probe = Callable[[], Awaitable[list[Finding]]]


async def run_checks(settings: Settings, queues: Sequence[WorkQueue]) -> list[Finding]:
    """Every probe, each bounded in time; a probe that hangs is a failure, not a hang."""
    probes: list[tuple[str, Probe]] = [
        ("broker", lambda: _broker(settings, queues)),
        ("redis", lambda: _redis(settings)),
        ("postgres", lambda: _postgres(settings)),
    ]
    found: list[Finding] = []
    for name, probe in probes:
        try:
            found += await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
        except Exception as exc:  # an unreachable service: the check's answer, not a crash
            found.append(Finding(FAIL, name, f"unreachable: {type(exc).__name__}: {exc}"[:300],
                                 f"start it, or point MLPIPE_{_url_var(name)} at it"))
    return [*found, *_models(settings, queues), *_tools(queues), *_backends(settings)]


def _url_var(name: str) -> str:
    return {"broker": "BROKER_URL", "redis": "REDIS_URL"}.get(name, "DATABASE_URL")


async def _broker(settings: Settings, queues: Sequence[WorkQueue]) -> list[Finding]:
    import aio_pika

    topo = Topology(namespace=settings.namespace)
    conn = await aio_pika.connect(settings.broker_url, timeout=PROBE_TIMEOUT_S)
    missing: list[str] = []
    try:
        for name in [topo.tasks_exchange, topo.events_exchange, topo.dead_letter_exchange]:
            channel = await conn.channel()  # a failed passive declare closes its channel
            try:
                await channel.get_exchange(name, ensure=True)
            except aio_pika.exceptions.ChannelClosed:
                missing.append(f"exchange {name}")
        for queue in [*(topo.queue_name(q) for q in queues), topo.dead_letter_queue]:
            channel = await conn.channel()
            try:
                await channel.get_queue(queue, ensure=True)
            except aio_pika.exceptions.ChannelClosed:
                missing.append(f"queue {queue}")
    finally:
        await conn.close()
    if missing:
        return [Finding(FAIL, "topology", "missing " + ", ".join(missing),
                        "run `mlpipe topology` (or start a daemon once: it declares them)")]
    return [Finding(OK, "broker", "connected"),
            Finding(OK, "topology", f"exchanges and {len(queues) + 1} queue(s) declared")]


async def _redis(settings: Settings) -> list[Finding]:
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=PROBE_TIMEOUT_S,
                                     socket_connect_timeout=PROBE_TIMEOUT_S)
    try:
        await client.ping()
        try:
            conf = await client.config_get("append*")
        except ResponseError:  # managed Redis often disables CONFIG
            return [Finding(OK, "redis", "answers"), Finding(
                WARN, "redis", "persistence unknown (CONFIG is disabled)",
                "make sure lock keys survive a restart (AOF or a replica)")]
    finally:
        await client.aclose()
    found = [Finding(OK, "redis", "answers")]
    if conf.get("appendonly") != "yes":
        found.append(Finding(WARN, "redis", "appendonly=no: lock state is lost on a restart, so "
                             "a redelivered task may run beside its first run",
                             "appendonly yes, appendfsync everysec"))
    else:
        found.append(Finding(OK, "redis", f"AOF on, appendfsync {conf.get('appendfsync')}"))
    return found


async def _postgres(settings: Settings) -> list[Finding]:
    import asyncpg

    from mlpipe.store.migrate import check as migrations

    conn = await asyncpg.connect(settings.database_url, timeout=PROBE_TIMEOUT_S)
    try:
        installed = await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        available = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
    finally:
        await conn.close()
    found = [Finding(OK, "postgres", "answers")]
    if installed:
        found.append(Finding(OK, "pgvector", f"extension vector {installed}"))
    elif available:
        found.append(Finding(OK, "pgvector", f"available ({available}); `mlpipe migrate` "
                             "creates the extension"))
    else:
        found.append(Finding(FAIL, "pgvector", "this server has no pgvector extension",
                             "use a Postgres with pgvector (the pgvector packages, the "
                             "pgvector/pgvector image, or `make services` for tests)"))
    status = await migrations(settings.database_url, schema=settings.database_schema)
    if status.ok:
        found.append(Finding(OK, "migrations", f"schema {settings.database_schema!r} is up "
                             "to date"))
    else:
        found.append(Finding(FAIL, "migrations", status.problem(),
                             "run `mlpipe migrate` (the Kubernetes migrate Job does)"))
    return found


def _models(settings: Settings, queues: Sequence[WorkQueue]) -> list[Finding]:
    found = []
    for queue in queues:
        if queue.short_name not in MODEL_FILES:
            continue
        field, files = MODEL_FILES[queue.short_name]
        raw = getattr(settings, field)
        var = f"MLPIPE_{field.upper()}"
        if not raw:
            found.append(Finding(FAIL, "models", f"{queue.short_name} needs {var}",
                                 f"set {var} to the model directory (`make setup` builds one)"))
            continue
        lacking = [f for f in files if not (Path(raw) / f).is_file()]
        if lacking:
            found.append(Finding(FAIL, "models", f"{var}={raw} lacks {', '.join(lacking)}",
                                 "assemble the model there (`make setup`), or fix the path"))
        else:
            found.append(Finding(OK, "models", f"{queue.short_name}: {raw}"))
    return found


def _tools(queues: Sequence[WorkQueue]) -> list[Finding]:
    if not any(q.short_name.startswith("transcribe") for q in queues):
        return []
    lacking = [t for t in ("ffmpeg", "ffprobe") if shutil.which(t) is None]
    if lacking:
        return [Finding(FAIL, "ffmpeg", f"{', '.join(lacking)} not on PATH",
                        "apt-get install ffmpeg (the Docker image has it)")]
    return [Finding(OK, "ffmpeg", shutil.which("ffmpeg") or "")]


def _backends(settings: Settings) -> list[Finding]:
    if settings.openai_api_key is None and settings.openai_base_url is None:
        return [Finding(OK, "backends", "offline backends only (no MLPIPE_OPENAI_API_KEY)")]
    where = settings.openai_base_url or "the OpenAI API"
    found = [Finding(OK, "backends", f"API backends at {where}")]
    open_ended = sorted(tt for tt, b in settings.budgets.items()
                        if not b.hourly_usd and not b.daily_usd)
    if open_ended:
        found.append(Finding(WARN, "budgets", f"no ceiling for {', '.join(open_ended)}",
                             "set MLPIPE_BUDGETS so a flood of tasks cannot run up the bill"))
    else:
        found.append(Finding(OK, "budgets", ", ".join(
            f"{tt} ${b.hourly_usd}/h ${b.daily_usd}/day"
            for tt, b in sorted(settings.budgets.items()))))
    return found
