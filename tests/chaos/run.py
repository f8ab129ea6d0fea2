"""``make chaos``: load, hard faults and hostile input against real daemons; prints a verdict.

Everything faulted is the scenario's own: a private RabbitMQ node, a private three-node
RabbitMQ cluster, a throwaway Redis (AOF, ``appendfsync everysec`` as production runs it) and a
throwaway pgvector Postgres (``synchronous_commit = on``), each on its own loopback ports, a
canary HTTP server on loopback, and daemon processes it started.

    python -m tests.chaos.run              # 10,000 + 2,000 tasks, 15 faults, 1,000 hostile
    python -m tests.chaos.run --small      # 1,000 + 400 tasks, one fault of each kind, 200

Two phases run one after the other against the same Redis and Postgres: the **node phase**
(single node: graceful broker restarts, forced connection closes, broker/Redis/Postgres kills
and restarts, daemon SIGKILLs, hostile messages incl. the network set aimed at the canary),
then the **cluster phase** (daemons and producers connected through all three nodes' addresses:
SIGKILL of the node leading the work queues, then of a follower). The verdict and its rules
are in ``verdict.py``; the faults in ``faults.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.errors import PublishError
from mlpipe.logs import configure
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.store.migrate import migrate
from tests.chaos import canary as canary_mod
from tests.chaos.daemons import ROOT, Daemons
from tests.chaos.evidence import (
    SCHEMA,
    EventTap,
    connect,
    dead_letters,
    store_rows,
    wait_settled,
)
from tests.chaos.faults import Pacer, Rig, run_schedule
from tests.chaos.handlers import EFFECTS_DDL
from tests.chaos.hostile import Hostile, generate
from tests.chaos.verdict import Evidence, Report, judge
from tests.services import PrivateRabbit, ThrowawayPostgres, ThrowawayRedis

TASK_TYPES = (TaskType.TRANSCRIBE_WHISPER, TaskType.SUMMARIZE_LLM, TaskType.EMBED_VECTORS)
#: Times the harness re-publishes a task whose publish raised, a second apart.
REPUBLISH_ATTEMPTS = 20
#: Settings a deployment might export that would open the guard: never passed to the daemons.
OPT_INS = ("MLPIPE_MEDIA_ALLOW_PRIVATE_NETWORKS", "MLPIPE_MEDIA_ALLOWED_HOSTS")


@dataclass
class Scale:
    tasks: int
    hostile: int
    faults: list[str]
    cluster_tasks: int = 0
    cluster_faults: list[str] = field(default_factory=list)


FULL = Scale(10_000, 1_000,
             ["broker_restart", "connection_close", "sigkill", "redis_restart", "broker_kill",
              "connection_close", "sigkill", "pg_restart", "redis_kill", "broker_restart",
              "sigkill", "pg_kill", "broker_kill"],
             2_000, ["cluster_leader_kill", "cluster_follower_kill"])
SMALL = Scale(1_000, 200,
              ["broker_restart", "connection_close", "sigkill", "redis_restart", "pg_restart",
               "broker_kill", "redis_kill", "pg_kill"],
              400, ["cluster_leader_kill"])


@dataclass
class Shared:
    """What both phases use: Redis, Postgres, the canary, the logs, the evidence."""

    redis: ThrowawayRedis
    pg: ThrowawayPostgres
    canary: canary_mod.Canary
    log_dir: Path
    ev: Evidence = field(default_factory=Evidence)
    #: Every daemon group started, for a last kill if the run is interrupted.
    daemons: list[Daemons] = field(default_factory=list)


async def run(scale: Scale, *, seed: int = 1, cluster: bool = True) -> Report:
    """Run the scenario; ``cluster=False`` skips the cluster phase (for a partial run by
    hand: the full and small scenarios plan it, and a planned fault that did not run fails
    the verdict)."""
    started = time.time()  # wall clock: what the figure means to a reader
    canary = canary_mod.Canary()
    await canary.start()
    # the daemons' media settings: nothing opted in but the placeholder bucket
    guard_settings = Settings(media_s3_buckets=["chaos"], media_allowed_hosts=[],
                              media_allow_private_networks=[])
    all_targets = canary_mod.targets(canary)
    preflight = await canary_mod.preflight(all_targets, guard_settings)
    rabbit = PrivateRabbit()
    redis, pg = ThrowawayRedis(persistent=True, appendfsync="everysec"), ThrowawayPostgres()
    log_dir = Path(os.environ.get("CHAOS_LOG_DIR", "/tmp")) / f"mlpipe-chaos-{uuid.uuid4().hex[:6]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    shared = Shared(redis, pg, canary, log_dir)
    shared.ev.planned_faults = scale.faults + (scale.cluster_faults if cluster else [])
    shared.ev.withheld_targets = preflight.withheld(all_targets)
    rabbit_cluster = _new_cluster() if cluster and scale.cluster_faults else None
    booting: asyncio.Task[None] | None = None
    try:
        await asyncio.gather(asyncio.to_thread(rabbit.start), asyncio.to_thread(redis.start),
                             asyncio.to_thread(pg.start))
        if rabbit_cluster is not None:  # boots while the node phase runs
            booting = asyncio.create_task(asyncio.to_thread(rabbit_cluster.start))
        await _prepare_db(pg.dsn)
        await _phase("node", shared, rabbit.url, {"rabbit": rabbit}, scale.tasks,
                     scale.faults, hostile=generate(
                         scale.hostile, seed=seed,
                         network=[(t.label, t.url) for t in preflight.usable(all_targets)]))
        if booting is not None and rabbit_cluster is not None:
            await booting
            await _phase("cluster", shared, rabbit_cluster.url, {"cluster": rabbit_cluster},
                         scale.cluster_tasks, scale.cluster_faults, hostile=[])
        shared.ev.canary_hits = canary.hits.total
        shared.ev.canary_requests = list(canary.hits.requests)
        await store_rows(shared.ev, pg.dsn)
        shared.ev.elapsed_s = time.time() - started
        report = judge(shared.ev)
        text = report.render()
        text += "".join(f"\n  {f.name}: {f.note}" for f in report.faults)
        text += "".join(f"\n  preflight {k}: {v}" for k, v in preflight.notes.items())
        (log_dir / "report.txt").write_text(text + "\n")
        print(f"chaos logs and report: {log_dir}", file=sys.stderr)
        return report
    finally:
        if booting is not None and not booting.done():
            with contextlib.suppress(Exception):
                await booting
        await canary.close()
        for group in shared.daemons:
            group.kill_all()
        for service in (rabbit, redis, pg, rabbit_cluster):
            if service is None:
                continue
            try:
                await asyncio.to_thread(service.cleanup)
            except Exception as exc:
                print(f"cleanup of {type(service).__name__} failed: {exc}", file=sys.stderr)


def _new_cluster() -> Any:
    from tests.rabbit_cluster import RabbitCluster

    return RabbitCluster()


async def _prepare_db(dsn: str) -> None:
    """Production Postgres commits synchronously: with the test server's
    ``synchronous_commit = off`` a postmaster kill would lose acknowledged commits."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER DATABASE mlpipe SET synchronous_commit = on")
    finally:
        await conn.close()
    await migrate(dsn, schema=SCHEMA)
    conn = await connect(dsn)
    try:
        await conn.execute(EFFECTS_DDL)
    finally:
        await conn.close()


def _daemon_env(broker_url: str, shared: Shared, retry: RetryPolicy) -> dict[str, str]:
    """The daemons' settings. The media guard is left as production ships it: no private
    network or host is opted in (the canary is on loopback and must stay unreachable); only
    the ``chaos`` bucket of the placeholder URLs is listed, and S3 requests go to the canary
    with dummy credentials, so an unlisted bucket that got through would be counted there."""
    env = {k: v for k, v in os.environ.items() if k not in OPT_INS}
    env.update({
        "PYTHONPATH": str(ROOT), "MLPIPE_BROKER_URL": broker_url,
        "MLPIPE_REDIS_URL": shared.redis.url, "MLPIPE_DATABASE_URL": shared.pg.dsn,
        "MLPIPE_DATABASE_SCHEMA": SCHEMA, "MLPIPE_HTTP_PORT": "0",
        "MLPIPE_RETRY": retry.model_dump_json(), "MLPIPE_RECONNECT_BASE_S": "0.2",
        "MLPIPE_RECONNECT_MAX_S": "2", "MLPIPE_PERSIST_RETRY_S": "60",
        "MLPIPE_QUEUES__TRANSCRIBE": '{"prefetch": 16, "concurrency": 8}',
        "MLPIPE_MEDIA_S3_BUCKETS": '["chaos"]', "MLPIPE_S3_ENDPOINT_URL": shared.canary.url,
        "AWS_ACCESS_KEY_ID": "chaos", "AWS_SECRET_ACCESS_KEY": "chaos",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


async def _phase(name: str, shared: Shared, broker_url: str, rig_kw: dict[str, Any],
                 tasks_n: int, schedule: list[str], hostile: list[Hostile]) -> None:
    """Publish ``tasks_n`` tasks through two producers while ``schedule`` is injected, then
    wait for everything to settle and add this phase's evidence."""
    ev = shared.ev
    retry = RetryPolicy(max_retries=12, base_delay_s=0.2, max_delay_s=4.0, jitter=0.2)
    settings = Settings(broker_url=broker_url, retry=retry, reconnect_base_s=0.2,
                        reconnect_max_s=2.0, publish_timeout_s=120)
    async with Producer(settings, name=f"chaos-{name}-setup"):
        pass  # topology, before the daemons start
    tap = EventTap(broker_url)
    await tap.start()
    daemons = Daemons(_daemon_env(broker_url, shared, retry), 3, shared.log_dir, name)
    shared.daemons.append(daemons)
    await daemons.start()
    pacer = Pacer(tasks_n, len(schedule))
    rig = Rig(daemons, tap, shared.redis, shared.pg, pacer=pacer, **rig_kw)
    prefix = "chaos" if name == "node" else f"chaos-{name}"
    tasks = [build_task(TASK_TYPES[i % 3], f"{prefix}-{i}", _payload(TASK_TYPES[i % 3], i))
             for i in range(tasks_n)]
    ev.published += [t.share_id for t in tasks]
    try:
        publishing = asyncio.gather(_publish(settings, tasks, 0, pacer, ev),
                                    _publish(settings, tasks, 1, pacer, ev))
        faults = asyncio.create_task(run_schedule(schedule, rig))
        if hostile:
            await asyncio.sleep(1.0)
            await _send_hostile(settings, hostile)
            ev.hostile.update({h.message_id: h.kind for h in hostile})
        await publishing
        ev.faults += await faults
        print(f"chaos: {name} phase published; waiting for everything to settle",
              file=sys.stderr, flush=True)
        await wait_settled(settings, tap, shared.pg.dsn,
                           {t.share_id for t in tasks} & ev.confirmed,
                           {h.message_id for h in hostile})
        ev.daemon_crashes += daemons.exited_on_their_own() + await daemons.stop()
    finally:
        await daemons.stop()
        await tap.close()
    ev.kills.update(daemons.killed)
    ev.logs += daemons.evidence()
    ev.dead += await dead_letters(settings)
    for share, ids in tap.ids.items():
        ev.completed_ids.setdefault(share, set()).update(ids)
    ev.completed_copies += tap.copies


async def _publish(settings: Settings, tasks: list[Task], which: int, pacer: Pacer,
                   ev: Evidence) -> None:
    """Producer ``which`` of two publishes every other task, each once the pacer released it,
    until the broker confirms it: a publish that raised is counted and sent again, as a
    careful caller would (``REPUBLISH_ATTEMPTS``)."""
    async with Producer(settings, name=f"chaos-producer-{which}") as producer:
        slots = asyncio.Semaphore(32)

        async def one(index: int, task: Task) -> None:
            await pacer.wait(index)
            async with slots:
                for _ in range(REPUBLISH_ATTEMPTS):
                    try:
                        await producer.publish(task)
                    except PublishError:
                        ev.raised[task.share_id] += 1
                        await asyncio.sleep(1.0)
                        continue
                    ev.confirmed.add(task.share_id)
                    return

        await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks) if i % 2 == which))


def _payload(task_type: TaskType, i: int) -> dict[str, Any]:
    if task_type is TaskType.TRANSCRIBE_WHISPER:
        return {"mediaUrl": f"s3://chaos/clip-{i}.wav"}
    return {"content": {"text": f"Chaos document number {i}, long enough to be a real task."}}


async def _send_hostile(settings: Settings, hostile: list[Hostile]) -> None:
    async with Producer(settings, name="chaos-hostile") as producer:
        topo = producer.topology
        for h in hostile:
            await producer.publish_message(topo.tasks_exchange, h.routing_key, aio_pika.Message(
                h.body, content_type=h.content_type, message_id=h.message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one fault of each kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-cluster", action="store_true",
                        help="skip the cluster phase (a partial run: its faults are not planned)")
    args = parser.parse_args()
    # the harness's own clients reconnect through every fault: only errors are news here (the
    # daemons' logs are in the run's log folder)
    configure(json=False, level="ERROR")
    for noisy in ("aiormq", "aio_pika"):  # every broker fault is an "error" to them
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    scale = SMALL if args.small else FULL
    report = asyncio.run(run(scale, seed=args.seed, cluster=not args.no_cluster))
    print(report.render())
    for f in report.faults:
        print(f"  {f.name}: {f.note}")
    return 0 if report.passed else 1


__all__ = ["FULL", "SMALL", "Scale", "run"]


if __name__ == "__main__":
    sys.exit(main())
