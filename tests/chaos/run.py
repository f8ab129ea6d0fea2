"""``make chaos``: load, faults and hostile input against real daemons; prints a verdict.

Everything faulted is the scenario's own: a private RabbitMQ node, a throwaway Redis and a
throwaway pgvector Postgres, each on its own loopback port, and daemon processes it started.

    python -m tests.chaos.run              # 10,000 tasks, 3+3+3+1+1 faults, 1,000 hostile
    python -m tests.chaos.run --small      # 1,000 tasks, one fault of each kind, 200 hostile

Verdict (all must hold): every confirmed task has exactly one result row or a dead letter with
a reason; none lost; every hostile message dead-lettered with a reason and no media fetched;
every publish confirmed or raised; no daemon exited on its own. A side effect that ran twice
is listed with its cause: the first run's daemon was SIGKILLed before committing (the worker
died between the effect and its record), or the first run's lock lapsed unrenewed (its daemon
logged ``lock.lost``: an event loop starved or cut off for longer than the lock TTL, the
known limit of lease locks). Any other duplicate is a defect and fails the verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.errors import PublishError
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.store.migrate import migrate
from tests.chaos.handlers import EFFECTS_DDL
from tests.chaos.hostile import generate
from tests.services import PrivateRabbit, ThrowawayPostgres, ThrowawayRedis

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = "chaos"
TASK_TYPES = (TaskType.TRANSCRIBE_WHISPER, TaskType.SUMMARIZE_LLM, TaskType.EMBED_VECTORS)


@dataclass
class Scale:
    tasks: int
    hostile: int
    faults: list[str]


FULL = Scale(10_000, 1_000, ["broker_restart", "connection_close", "sigkill", "redis_restart",
                             "broker_restart", "connection_close", "sigkill", "pg_restart",
                             "broker_restart", "connection_close", "sigkill"])
SMALL = Scale(1_000, 200, ["broker_restart", "connection_close", "sigkill", "redis_restart",
                           "pg_restart"])


@dataclass
class Report:
    published: int = 0
    confirmed: int = 0
    publish_raised: int = 0
    results: int = 0
    dead_lettered: int = 0
    lost: list[str] = field(default_factory=list)
    double_results: list[str] = field(default_factory=list)
    duplicate_effects_explained: list[str] = field(default_factory=list)
    duplicate_effects_lease_lost: list[str] = field(default_factory=list)
    duplicate_effects_failed_run: list[str] = field(default_factory=list)
    #: Per re-run share worth a look: what each execution was.
    details: dict[str, str] = field(default_factory=dict)
    duplicate_effects_unexplained: list[str] = field(default_factory=list)
    hostile_sent: int = 0
    hostile_dead_lettered: int = 0
    hostile_missing: list[str] = field(default_factory=list)
    media_fetched: int = 0
    daemon_crashes: int = 0
    recovery_s: list[tuple[str, float]] = field(default_factory=list)
    dead_reasons: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return (not self.lost and not self.double_results
                and not self.duplicate_effects_unexplained
                and self.confirmed + self.publish_raised == self.published
                and self.hostile_dead_lettered == self.hostile_sent and self.media_fetched == 0
                and self.daemon_crashes == 0)

    def render(self) -> str:
        lines = [
            f"tasks published          {self.published}",
            f"  confirmed              {self.confirmed}",
            f"  raised to the caller   {self.publish_raised}",
            f"results                  {self.results}",
            f"dead-lettered (tasks)    {self.dead_lettered}  {self.dead_reasons}",
            f"lost                     {len(self.lost)}  (must be 0) {self.lost[:10]}",
            f"double results           {len(self.double_results)}  (must be 0)",
            f"duplicate effects        {len(self.duplicate_effects_unexplained)}  (must be 0) "
            f"{self.duplicate_effects_unexplained[:10]}",
            f"  re-runs after SIGKILL  {len(self.duplicate_effects_explained)}  (worker died "
            "between effect and commit: at-least-once)",
            f"  re-runs after a lease  {len(self.duplicate_effects_lease_lost)}  (the first "
            "run's lock expired unrenewed: the daemon logged lock.lost; CPU starvation or a "
            "partition longer than the TTL)",
            f"  re-runs after failure {len(self.duplicate_effects_failed_run)}  (the handler "
            "raised after its effect, e.g. its own write's commit was lost in the Postgres "
            "restart: retried by design)",
            *(f"    {share}: {why}" for share, why in sorted(self.details.items())),
            f"hostile inputs           {self.hostile_sent}, dead-lettered "
            f"{self.hostile_dead_lettered} (must be all) {self.hostile_missing[:10]}",
            f"media fetched (hostile)  {self.media_fetched}  (must be 0)",
            f"daemon crashes on input  {self.daemon_crashes}  (must be 0)",
            "recovery after faults    " + ", ".join(f"{k} {v:.1f}s" for k, v in self.recovery_s),
            f"elapsed                  {self.elapsed_s:.0f}s",
            f"VERDICT                  {'PASS' if self.passed else 'FAIL'}",
        ]
        return "\n".join(lines)


class Daemons:
    """The scenario's daemon processes; SIGKILLed ones are replaced."""

    def __init__(self, env: dict[str, str], count: int, log_dir: Path) -> None:
        self._env = env
        self._log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []
        self.killed: dict[int, float] = {}
        self._count = count

    async def start_one(self) -> None:
        log = open(self._log_dir / f"daemon-{len(self.procs)}.log", "wb")  # noqa: SIM115, ASYNC230
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlpipe.cli", "--log-json", "--log-level", "INFO",
            "consume", "--queues", "transcribe,summarize,embed",
            "--handlers", "tests.chaos.handlers:build_registry",
            cwd=ROOT, env=self._env, stdout=asyncio.subprocess.DEVNULL, stderr=log)
        log.close()
        self.procs.append(proc)

    async def start(self) -> None:
        for _ in range(self._count):
            await self.start_one()

    async def kill_one(self, index: int) -> None:
        alive = [p for p in self.procs if p.returncode is None]
        victim = alive[index % len(alive)]
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        self.killed[victim.pid] = time.time()
        await self.start_one()

    def exited_on_their_own(self) -> int:
        return sum(1 for p in self.procs
                   if p.returncode is not None and p.pid not in self.killed)

    async def stop(self) -> int:
        """SIGTERM the live daemons; return how many failed to exit cleanly (code != 0)."""
        live = [p for p in self.procs if p.returncode is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        bad = 0
        for p in live:
            try:
                bad += await asyncio.wait_for(p.wait(), timeout=60) != 0
            except TimeoutError:
                p.kill()
                bad += 1
        return bad


async def run(scale: Scale, *, seed: int = 1) -> Report:
    started = time.monotonic()
    # Locks live in a Redis that keeps its keys across a restart (AOF), as they must in
    # production: one that restarts empty forgets the locks of runs still in flight.
    rabbit, redis, pg = PrivateRabbit(), ThrowawayRedis(persistent=True), ThrowawayPostgres()
    log_dir = Path(os.environ.get("CHAOS_LOG_DIR", "/tmp")) / f"mlpipe-chaos-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.gather(asyncio.to_thread(rabbit.start), asyncio.to_thread(redis.start),
                         asyncio.to_thread(pg.start))
    try:
        return await _scenario(scale, rabbit, redis, pg, log_dir, seed, started)
    finally:
        for service in (rabbit, redis, pg):
            try:
                await asyncio.to_thread(service.cleanup)
            except Exception as exc:
                print(f"cleanup of {type(service).__name__} failed: {exc}", file=sys.stderr)


async def _scenario(scale: Scale, rabbit: PrivateRabbit, redis: ThrowawayRedis,
                    pg: ThrowawayPostgres, log_dir: Path, seed: int,
                    started: float) -> Report:
    await migrate(pg.dsn, schema=SCHEMA)
    conn = await asyncpg.connect(pg.dsn, server_settings={"search_path": SCHEMA})
    await conn.execute(EFFECTS_DDL)
    await conn.close()
    retry = RetryPolicy(max_retries=12, base_delay_s=0.2, max_delay_s=4.0, jitter=0.2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLPIPE_BROKER_URL": rabbit.url,
           "MLPIPE_REDIS_URL": redis.url, "MLPIPE_DATABASE_URL": pg.dsn,
           "MLPIPE_DATABASE_SCHEMA": SCHEMA, "MLPIPE_HTTP_PORT": "0",
           "MLPIPE_RETRY": retry.model_dump_json(), "MLPIPE_RECONNECT_BASE_S": "0.2",
           "MLPIPE_RECONNECT_MAX_S": "2", "MLPIPE_PERSIST_RETRY_S": "60",
           "MLPIPE_QUEUES__TRANSCRIBE": '{"prefetch": 16, "concurrency": 8}'}
    settings = Settings(broker_url=rabbit.url, retry=retry, reconnect_base_s=0.2,
                        reconnect_max_s=2.0, publish_timeout_s=120)
    async with Producer(settings, name="chaos-setup"):
        pass  # topology, before the daemons start
    daemons = Daemons(env, 3, log_dir)
    await daemons.start()
    report = Report()
    shares: dict[str, bool] = {}

    async def results_count() -> int:
        c = await _connect(pg.dsn)
        try:
            return int(await c.fetchval("SELECT count(*) FROM ml_results"))
        finally:
            await c.close()

    async def producer_task(index: int, tasks: list[Task]) -> None:
        async with Producer(settings, name=f"chaos-producer-{index}") as producer:
            slots = asyncio.Semaphore(32)

            async def one(task: Task) -> None:
                async with slots:
                    try:
                        await producer.publish(task)
                        shares[task.share_id] = True
                    except PublishError:
                        shares[task.share_id] = False

            await asyncio.gather(*(one(t) for t in tasks))

    tasks = [build_task(TASK_TYPES[i % 3], f"chaos-{i}", _payload(TASK_TYPES[i % 3], i))
             for i in range(scale.tasks)]
    report.published = len(tasks)
    publishing = asyncio.gather(producer_task(0, tasks[0::2]), producer_task(1, tasks[1::2]))
    hostile = generate(scale.hostile, seed=seed)
    faults = asyncio.create_task(_faults(scale, rabbit, redis, pg, daemons, report,
                                         results_count))
    await asyncio.sleep(1.0)
    await _send_hostile(settings, hostile)
    report.hostile_sent = len(hostile)
    await publishing
    await faults
    report.confirmed = sum(shares.values())
    report.publish_raised = sum(1 for ok in shares.values() if not ok)
    confirmed = {s for s, ok in shares.items() if ok}
    await _wait_settled(settings, pg.dsn, confirmed, len(hostile))
    crashed = daemons.exited_on_their_own()
    report.daemon_crashes = crashed + await daemons.stop()
    await _verdict(report, settings, pg.dsn, confirmed, hostile, daemons.killed,
                   _read_logs(log_dir))
    report.elapsed_s = time.monotonic() - started
    (log_dir / "report.txt").write_text(report.render() + "\n")
    return report


def _payload(task_type: TaskType, i: int) -> dict[str, Any]:
    if task_type is TaskType.TRANSCRIBE_WHISPER:
        return {"mediaUrl": f"s3://chaos/clip-{i}.wav"}
    return {"content": {"text": f"Chaos document number {i}, long enough to be a real task."}}


async def _connect(dsn: str) -> asyncpg.Connection:
    for _ in range(300):
        try:
            return await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA},
                                         timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            await asyncio.sleep(0.2)
    raise RuntimeError("chaos postgres unreachable")


async def _send_hostile(settings: Settings, hostile: list[Any]) -> None:
    async with Producer(settings, name="chaos-hostile") as producer:
        topo = producer.topology
        for h in hostile:
            await producer.publish_message(topo.tasks_exchange, h.routing_key, aio_pika.Message(
                h.body, content_type=h.content_type, message_id=h.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT))


async def _faults(scale: Scale, rabbit: PrivateRabbit, redis: ThrowawayRedis,
                  pg: ThrowawayPostgres, daemons: Daemons, report: Report,
                  results_count: Any) -> None:
    step = max(1, scale.tasks // (len(scale.faults) + 2))
    kills = 0
    for n, fault in enumerate(scale.faults, start=1):
        waited = time.monotonic()
        while await results_count() < step * n and time.monotonic() - waited < 300:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        before = await results_count()
        if fault == "broker_restart":
            await asyncio.to_thread(rabbit.restart_app, 2.0)
        elif fault == "connection_close":
            await asyncio.to_thread(rabbit.close_all_connections)
        elif fault == "sigkill":
            await daemons.kill_one(kills)
            kills += 1
        elif fault == "redis_restart":
            await asyncio.to_thread(redis.stop)
            await asyncio.sleep(3)
            await asyncio.to_thread(redis.start)
        elif fault == "pg_restart":
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(3)
            await asyncio.to_thread(pg.start)
        # recovered: the pipeline completes tasks at its pre-fault pace again (20 more results
        # after the fault ended; in-flight work finishing alone does not count)
        done = time.monotonic()
        after = await results_count()
        while await results_count() < after + 20 and time.monotonic() - done < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        report.recovery_s.append((fault, time.monotonic() - done))
        del before


async def _wait_settled(settings: Settings, dsn: str, confirmed: set[str],
                        hostile: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        c = await _connect(dsn)
        try:
            done = {r["share_id"] for r in await c.fetch("SELECT share_id FROM ml_results")}
        finally:
            await c.close()
        dead = await list_dead(settings, limit=100_000)
        dead_shares = {e.share_id for e in dead}
        if confirmed <= done | dead_shares and \
                sum(1 for e in dead if (e.message_id or "").startswith("hostile-")) >= hostile:
            return
        await asyncio.sleep(1.0)


@dataclass
class DaemonLogs:
    """What the daemons' JSON logs say about re-runs: shares whose lock a daemon reported lost,
    and the (share, attempt) pairs whose run failed, with the error."""

    lease_lost: set[str] = field(default_factory=set)
    failed: dict[tuple[str, int], str] = field(default_factory=dict)


def _read_logs(log_dir: Path) -> DaemonLogs:
    logs = DaemonLogs()
    for path in log_dir.glob("daemon-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"lock.lost"' not in line and '"task.failed"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            share = entry.get("share_id")
            if not share:
                continue
            if entry.get("event") == "lock.lost":
                logs.lease_lost.add(share)
            elif entry.get("event") == "task.failed" and isinstance(entry.get("attempt"), int):
                logs.failed[(share, entry["attempt"])] = str(entry.get("error", ""))[:200]
    return logs


async def _verdict(report: Report, settings: Settings, dsn: str, confirmed: set[str],
                   hostile: list[Any], killed: dict[int, float], logs: DaemonLogs) -> None:
    c = await _connect(dsn)
    try:
        rows = await c.fetch("SELECT share_id, result_data::text AS r FROM ml_results")
        effects = await c.fetch("SELECT share_id, kind, pid, attempt FROM chaos_effects "
                                "ORDER BY id")
    finally:
        await c.close()
    result_by_share: Counter[str] = Counter(r["share_id"] for r in rows)
    winner_pid = {r["share_id"]: json.loads(r["r"])["pid"] for r in rows}
    dead = await list_dead(settings, limit=100_000)
    dead_tasks = [e for e in dead if not (e.message_id or "").startswith("hostile-")]
    dead_shares = {e.share_id for e in dead_tasks if e.reason}
    report.results = len(result_by_share)
    report.dead_lettered = len(dead_tasks)
    report.dead_reasons = dict(Counter(e.reason for e in dead_tasks))
    report.lost = sorted(s for s in confirmed
                         if s not in result_by_share and s not in dead_shares)
    report.double_results = sorted(s for s, n in result_by_share.items() if n > 1)
    runs: dict[str, list[tuple[int, int]]] = {}
    for e in effects:
        if e["kind"] == "media_fetch":
            report.media_fetched += 1
        else:
            runs.setdefault(e["share_id"], []).append((e["pid"], e["attempt"]))
    for share, execs in runs.items():
        if len(execs) < 2:
            continue
        earlier = execs[:-1]
        if all(pid in killed and pid != winner_pid.get(share) for pid, _ in earlier):
            report.duplicate_effects_explained.append(share)
        elif all((share, attempt) in logs.failed for _, attempt in earlier):
            report.duplicate_effects_failed_run.append(share)
            report.details[share] = "; ".join(
                f"attempt {a} failed after its effect: {logs.failed[(share, a)]}"
                for _, a in earlier)
        elif share in logs.lease_lost:
            report.duplicate_effects_lease_lost.append(share)
        else:
            report.duplicate_effects_unexplained.append(share)
            report.details[share] = ", ".join(
                f"pid {pid} attempt {a}{' (killed)' if pid in killed else ''}"
                for pid, a in execs) + f"; result stored by pid {winner_pid.get(share)}"
    hostile_ids = {h.message_id for h in hostile}
    hostile_dead = {e.message_id for e in dead if e.message_id in hostile_ids and e.reason}
    report.hostile_dead_lettered = len(hostile_dead)
    report.hostile_missing = sorted(hostile_ids - hostile_dead)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="1,000 tasks, one fault of each")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = asyncio.run(run(SMALL if args.small else FULL, seed=args.seed))
    print(report.render())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
