"""Exactly-once under concurrency, crashes and outages, with daemons as separate processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import structlog
from structlog.testing import LogCapture

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.store.migrate import migrate
from mlpipe.testing import running_daemon, wait_for
from mlpipe.worker.daemon import Daemon
from tests.integration.test_daemon import queue_depths
from tests.integration.test_shutdown import lines
from tests.services import ThrowawayPostgres, ThrowawayRedis

ROOT = Path(__file__).resolve().parents[2]


async def start_daemon(env: dict[str, str], log: Path, **extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "--log-json", "consume", "--queues", "summarize",
        "--handlers", "tests.integration.slow_handlers:build_registry",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env, "TEST_HANDLER_LOG": str(log),
             "MLPIPE_QUEUES__SUMMARIZE": '{"prefetch": 8, "concurrency": 2}',
             "MLPIPE_RETRY": '{"max_retries": 3, "base_delay_s": 0.5, "max_delay_s": 4}',
             **extra},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return err


def task(share: str, text: str = "The same article, shared twice by an eager thumb. " * 2) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share, {"content": {"text": text}})


async def result_rows(dsn: str, schema: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch(
            "SELECT share_id, result_data::text AS result_json FROM ml_results ORDER BY share_id")
    finally:
        await conn.close()


async def consumer_count(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    try:
        q = await (await conn.channel()).declare_queue(queue, passive=True)
        return q.declaration_result.consumer_count or 0
    except aio_pika.exceptions.ChannelClosed:  # not declared yet
        return 0
    finally:
        await conn.close()


async def test_200_concurrent_copies_run_the_handler_once(
        effects_env: dict[str, str], pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    daemons = [await start_daemon(effects_env, log, TEST_HANDLER_SLEEP_S="0.5")
               for _ in range(2)]
    settings = Settings(broker_url=effects_env["MLPIPE_BROKER_URL"])
    try:
        async with Producer(settings) as p:
            topo = p.topology

            async def both_consuming() -> bool:  # or one would drain the queue alone
                return await consumer_count(settings.broker_url,
                                            topo.queue_name("summarize")) == 2

            await wait_for(both_consuming, timeout=60, interval=0.2,
                           message="both daemons consuming")
            await asyncio.gather(*(p.publish(task("hot-share")) for _ in range(200)))

        async def drained() -> bool:
            depths = await queue_depths(settings.broker_url, [topo.queue_name("summarize")])
            return set(depths.values()) == {0} and len(lines(log, "done")) >= 1

        await wait_for(drained, timeout=60, message="all 200 acked")
    finally:
        errs = [await stop(d) for d in daemons]
    assert [d.returncode for d in daemons] == [0, 0], [e.decode()[-1500:] for e in errs]
    assert lines(log, "start") == ["hot-share"]
    assert lines(log, "done") == ["hot-share"]
    assert len(await result_rows(pg_dsn, pg_schema)) == 1
    assert await list_dead(settings) == []
    # both daemons took part: the duplicates were spread and acked, not left waiting
    assert b"task.duplicate_in_flight" in b"".join(errs)


async def test_sigkill_mid_handler_is_redelivered_and_handled_once(
        effects_env: dict[str, str], pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    env = {**effects_env, "TEST_EXPECTED_RUNTIME_S": "2"}  # lock TTL 3 s
    settings = Settings(broker_url=effects_env["MLPIPE_BROKER_URL"])
    first = await start_daemon(env, log, TEST_HANDLER_SLEEP_S="30")
    async with Producer(settings) as p:
        await p.publish(task("crash-share"))
    await wait_for(lambda: len(lines(log, "start")) == 1, timeout=30, message="handler started")
    first.kill()  # SIGKILL: no drain, no ack, no lock release
    await first.wait()
    second = await start_daemon(env, log, TEST_HANDLER_SLEEP_S="0.2")
    try:
        await wait_for(lambda: len(lines(log, "done")) == 1, timeout=60,
                       message="handled by the second daemon")
    finally:
        err = await stop(second)
    assert second.returncode == 0, err.decode()[-1500:]
    assert lines(log, "start") == ["crash-share", "crash-share"]
    assert lines(log, "done") == ["crash-share"]
    [row] = await result_rows(pg_dsn, pg_schema)
    assert json.loads(row["result_json"])["pid"] == second.pid
    assert await list_dead(settings) == []


# --- outages of Redis and Postgres ----------------------------------------------------------


@pytest.fixture
def redis_instance() -> Iterator[ThrowawayRedis]:
    r = ThrowawayRedis()
    r.start()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture
async def pg_instance() -> AsyncIterator[ThrowawayPostgres]:
    pg = ThrowawayPostgres()
    await asyncio.to_thread(pg.start)
    try:
        await migrate(pg.dsn)
        yield pg
    finally:
        await asyncio.to_thread(pg.cleanup)


def stream_registry(runs: list[str]) -> Registry:
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM, expected_runtime_s=5)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        runs.append(task.share_id)
        await asyncio.sleep(0.005)
        return HandlerResult({"n": task.share_id})

    return registry


async def run_stream_with_outage(settings: Settings, outage_down: object, outage_up: object,
                                 dsn: str, schema: str) -> tuple[list[str], int]:
    runs: list[str] = []
    total = 500
    async with Effects(settings) as effects, \
            running_daemon(settings, stream_registry(runs), "summarize",
                           executor=effects.executor) as daemon, \
            Producer(settings) as p:

        async def stream() -> None:
            for i in range(total):
                await p.publish(task(f"s{i:03d}", text=f"Document number {i} for the stream."))
                await asyncio.sleep(0.01)

        async def outage() -> None:
            await wait_for(lambda: len(runs) >= 100, timeout=30, message="100 handled")
            await asyncio.to_thread(outage_down)  # type: ignore[arg-type]
            await asyncio.sleep(10)
            await asyncio.to_thread(outage_up)  # type: ignore[arg-type]

        await asyncio.gather(stream(), outage())

        async def all_stored() -> bool:
            return len(await result_rows(dsn, schema)) == total

        await wait_for(all_stored, timeout=120, interval=0.5, message="all 500 results")
        assert await list_dead(settings) == []
        deliveries = daemon.status().tasks_done
    return runs, deliveries


def retries(daemon: Daemon) -> float:
    """Retries the daemon scheduled (deferrals included), whatever the reason."""
    return sum(sample.value for metric in daemon.metrics.retries.collect()
               for sample in metric.samples if sample.name == "mlpipe_retries_total")


def assert_each_ran_once(runs: list[str], total: int) -> None:
    """No paid work done twice: every share's handler ran exactly once."""
    twice = sorted({s for s in runs if runs.count(s) > 1})
    assert not twice, f"handler ran more than once for {twice}"
    assert len(runs) == total


def outage_settings(broker_url: str, dsn: str, schema: str, redis_url: str,
                    lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=dsn, database_schema=schema,
                    redis_url=redis_url, lock_prefix=lock_prefix,
                    queues={"summarize": {"prefetch": 32, "concurrency": 16}},  # type: ignore[dict-item]
                    retry=RetryPolicy(max_retries=8, base_delay_s=0.5, max_delay_s=4.0))


async def test_redis_down_for_10s_loses_nothing(broker_url: str, pg_dsn: str, pg_schema: str,
                                                lock_prefix: str,
                                                redis_instance: ThrowawayRedis) -> None:
    settings = outage_settings(broker_url, pg_dsn, pg_schema, redis_instance.url, lock_prefix)
    runs, deliveries = await run_stream_with_outage(
        settings, redis_instance.stop, redis_instance.start, pg_dsn, pg_schema)
    assert_each_ran_once(runs, 500)
    assert deliveries > 500, "the outage should have forced retries"


async def test_postgres_down_for_10s_loses_nothing(broker_url: str, lock_prefix: str,
                                                   pg_instance: ThrowawayPostgres) -> None:
    from tests.conftest import REDIS_URL

    settings = outage_settings(broker_url, pg_instance.dsn, "public", REDIS_URL, lock_prefix)
    runs, deliveries = await run_stream_with_outage(
        settings, pg_instance.stop, pg_instance.start, pg_instance.dsn, "public")
    assert_each_ran_once(runs, 500)
    assert deliveries > 500, "the outage should have forced retries"


async def test_concurrent_migrate_processes(pg_dsn: str) -> None:
    schema = "t_migrate_" + os.urandom(4).hex()
    env = {**os.environ, "MLPIPE_DATABASE_URL": pg_dsn, "MLPIPE_DATABASE_SCHEMA": schema}

    async def run() -> tuple[int, bytes, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlpipe.cli", "migrate", env=env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, out, err

    try:
        results = await asyncio.gather(run(), run())
        assert [r[0] for r in results] == [0, 0], [r[2].decode()[-800:] for r in results]
        applied = sorted(len(json.loads(r[1])["applied"]) for r in results)
        assert applied == [0, len(list((ROOT / "sql").glob("*.sql")))]
        again = await run()
        assert again[0] == 0
        assert json.loads(again[1])["applied"] == []
        conn = await asyncpg.connect(pg_dsn)
        try:
            tables = {r["table_name"] for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                schema)}
            assert {"ml_results", "ml_costs", "ml_embeddings", "ml_workflows",
                    "mlpipe_migrations"} <= tables
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def test_result_that_cannot_be_stored_is_parked_not_paid_twice(
        broker_url: str, lock_prefix: str, pg_instance: ThrowawayPostgres) -> None:
    """The handler finishes, then Postgres goes away for longer than the in-process persist
    retries: the delivery is retried, and the retry stores the parked result instead of
    running the (paid) handler a second time."""
    from tests.conftest import REDIS_URL

    runs: list[str] = []
    registry = Registry()

    @registry.handler(TaskType.SUMMARIZE_LLM, expected_runtime_s=5)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        runs.append(task.share_id)
        if len(runs) == 1:
            await asyncio.to_thread(pg_instance.stop)  # the result has nowhere to go
        return HandlerResult({"summary": "paid for once"}, model_version="m1")

    settings = outage_settings(broker_url, pg_instance.dsn, "public", REDIS_URL, lock_prefix)
    settings = settings.model_copy(update={"persist_retry_s": 0.5})
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, "summarize",
                           executor=effects.executor) as daemon, \
            Producer(settings) as p:
        await p.publish(task("parked-share"))
        await wait_for(lambda: len(runs) == 1, timeout=30, message="handler ran")
        # a few retries meet the outage: the first delivery's, and two redelivered copies'
        await wait_for(lambda: retries(daemon) >= 3, timeout=30, message="3 retries")
        assert runs == ["parked-share"]
        await asyncio.to_thread(pg_instance.start)

        async def stored() -> bool:
            try:
                return len(await result_rows(pg_instance.dsn, "public")) == 1
            except (OSError, asyncpg.PostgresError):
                return False

        await wait_for(stored, timeout=60, interval=0.5, message="parked result stored")
        assert await list_dead(settings) == []
    assert runs == ["parked-share"]
    [row] = await result_rows(pg_instance.dsn, "public")
    assert json.loads(row["result_json"]) == {"summary": "paid for once"}
    from redis.asyncio import Redis
    client = Redis.from_url(REDIS_URL)
    try:  # stored, so no longer parked
        assert await client.exists(f"{lock_prefix}parked:summarize_llm:parked-share") == 0
    finally:
        await client.aclose()


async def test_start_up_waits_for_postgres_within_startup_wait(
        broker_url: str, lock_prefix: str, pg_instance: ThrowawayPostgres,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by make chaos: a replacement daemon started while Postgres restarted exited at
    once. Start-up now waits up to ``startup_wait_s`` for the database."""
    from tests.conftest import REDIS_URL

    settings = outage_settings(broker_url, pg_instance.dsn, "public", REDIS_URL, lock_prefix)
    await asyncio.to_thread(pg_instance.stop)
    short = settings.model_copy(update={"startup_wait_s": 0.5})
    with pytest.raises(ConnectionRefusedError):  # after the short wait
        await Effects(short).start()
    capture = LogCapture()
    monkeypatch.setattr("mlpipe.effects.log", structlog.wrap_logger(None, processors=[capture]))
    starting = asyncio.create_task(Effects(settings).start())

    def attempts_failed() -> int:
        return max((e["attempt"] for e in capture.entries
                    if e["event"] == "effects.postgres_unavailable"), default=0)

    # the third attempt fails past the short wait's 0.5 s (0.2 s + 0.4 s of backoff before it)
    await wait_for(lambda: attempts_failed() >= 3, timeout=30, message="3 attempts failed")
    assert not starting.done()
    await asyncio.to_thread(pg_instance.start)
    effects = await asyncio.wait_for(starting, timeout=60)
    try:
        await effects.check_postgres()
    finally:
        await effects.close()
