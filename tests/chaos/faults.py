"""The faults the scenario injects, each against a service of its own, and how recovery is
timed.

A fault is a coroutine taking the ``Rig`` (what it may act on) that calls
``rig.service_back()`` the moment the service is back (a restarted Redis answers, a queue has a
new leader) and returns a note once its aftermath is over (a killed cluster node rejoined);
``run_schedule`` injects the faults of a phase one after another at even steps of progress and
times recovery: from the moment the fault began, and from the service's return, until
``RECOVERY_RESULTS`` more results came out (counted by the events tap, so work merely
finishing in flight does not count twice).

Production settings each one assumes are named where they matter: RabbitMQ quorum queues
(replicated on all three nodes of a cluster), Redis with AOF ``appendfsync everysec``,
Postgres with ``synchronous_commit = on``.

Adding a fault is one coroutine and one line in ``FAULTS``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mlpipe.broker.topology import Topology
from tests.chaos.daemons import Daemons
from tests.chaos.evidence import EventTap
from tests.chaos.verdict import RECOVERY_RESULTS, Fault
from tests.services import PrivateRabbit, ThrowawayPostgres, ThrowawayRedis

#: How long a killed or stopped service stays down before it is started again.
DOWN_S = 2.0
#: Longest wait for the pipeline to reach the next fault's step, and to recover after one.
STEP_TIMEOUT_S = 300.0
RECOVERY_TIMEOUT_S = 180.0
WORK_QUEUES = ("transcribe", "summarize", "embed")


class Pacer:
    """Releases a phase's tasks to the producers: two chunks at the start, one more as each
    fault begins, and when its service is back enough for its recovery to be timed
    (``2 * RECOVERY_RESULTS`` beyond what is done). That many tasks stay in reserve for every
    fault still to come, so however fast the pipeline drains what is released while a fault
    is being injected (a cluster fault first asks which node leads), each recovery still has
    work to be timed on; and a fast pipeline cannot finish everything before the last fault."""

    def __init__(self, tasks: int, faults: int) -> None:
        self.tasks = tasks
        self.faults_left = faults
        self.step = max(1, (tasks - 2 * RECOVERY_RESULTS * faults) // (faults + 2))
        self.released = min(2 * self.step, self._limit()) if faults else tasks
        self._changed = asyncio.Condition()

    def _limit(self) -> int:
        return self.tasks - 2 * RECOVERY_RESULTS * self.faults_left

    async def wait(self, index: int) -> None:
        """Until task number ``index`` may be published."""
        async with self._changed:
            await self._changed.wait_for(lambda: index < self.released)

    async def fault_began(self) -> None:
        await self._set(self.released + self.step)

    async def service_back(self, done: int) -> None:
        """The current fault's service is back with ``done`` results so far: its reserve."""
        self.faults_left = max(0, self.faults_left - 1)
        await self._set(done + 2 * RECOVERY_RESULTS)

    async def release_all(self) -> None:
        self.faults_left = 0
        await self._set(self.tasks)

    async def _set(self, wanted: int) -> None:
        async with self._changed:
            self.released = max(self.released, min(wanted, self._limit()))
            self._changed.notify_all()


@dataclass
class Rig:
    """What the faults of one phase act on: its daemons and broker (a single private node or a
    three-node cluster), the shared throwaway Redis and Postgres, the events tap."""

    daemons: Daemons
    tap: EventTap
    redis: ThrowawayRedis
    pg: ThrowawayPostgres
    rabbit: PrivateRabbit | None = None
    #: ``tests.rabbit_cluster.RabbitCluster`` (typed loosely: that module is optional).
    cluster: Any = None
    vhost: str = "/"
    sigkills: int = 0
    pacer: Pacer | None = None
    #: Epoch second the current fault struck, when the fault knows it better than its start
    #: (a cluster fault first asks which node leads).
    struck: float | None = None
    #: (epoch second, results so far) when the current fault's service was back.
    back: tuple[float, int] | None = None

    async def service_back(self) -> None:
        """Called by a fault the moment its service is back (once; later calls do nothing):
        recovery is timed from here, and enough work is released to time it on."""
        if self.back is not None:
            return
        self.back = (time.time(), self.tap.count)
        if self.pacer is not None:
            await self.pacer.service_back(self.tap.count)


FaultFn = Callable[[Rig], Awaitable[str]]


def _rabbit(rig: Rig) -> PrivateRabbit:
    if rig.rabbit is None:
        raise RuntimeError("this fault needs the single private RabbitMQ node")
    return rig.rabbit


async def broker_restart(rig: Rig) -> str:
    await asyncio.to_thread(_rabbit(rig).restart_app, DOWN_S)
    return "stop_app, start_app"


async def connection_close(rig: Rig) -> str:
    await asyncio.to_thread(_rabbit(rig).close_all_connections)
    return "close_all_connections"


async def broker_kill(rig: Rig) -> str:
    """SIGKILL of the node's beam under load (an OOM kill): quorum queues recover their
    confirmed messages from the WAL when it boots again."""
    rabbit = _rabbit(rig)
    await asyncio.to_thread(rabbit.kill)
    await asyncio.sleep(DOWN_S)
    await asyncio.to_thread(rabbit.start)
    return "beam SIGKILLed, booted again"


async def sigkill(rig: Rig) -> str:
    pid = await rig.daemons.kill_one(rig.sigkills)
    rig.sigkills += 1
    return f"daemon pid {pid}, replaced"


async def redis_restart(rig: Rig) -> str:
    await asyncio.to_thread(rig.redis.stop)
    await asyncio.sleep(DOWN_S)
    await asyncio.to_thread(rig.redis.start)
    return "SHUTDOWN SAVE, start"


async def redis_kill(rig: Rig) -> str:
    """SIGKILL of Redis with ``appendfsync everysec``: up to about a second of writes (lock
    acquisitions, renewals, releases) is gone when it comes back."""
    await asyncio.to_thread(rig.redis.kill)
    await asyncio.sleep(DOWN_S)
    await asyncio.to_thread(rig.redis.start)
    return f"appendfsync {rig.redis.appendfsync}"


async def pg_restart(rig: Rig) -> str:
    await asyncio.to_thread(rig.pg.stop)
    await asyncio.sleep(DOWN_S)
    await asyncio.to_thread(rig.pg.start)
    return "fast shutdown, start"


async def pg_kill(rig: Rig) -> str:
    """SIGKILL of the postmaster: no shutdown checkpoint, crash recovery on the next start."""
    await asyncio.to_thread(rig.pg.kill)
    await asyncio.sleep(DOWN_S)
    await asyncio.to_thread(rig.pg.start)
    await rig.service_back()
    recovered = await asyncio.to_thread(rig.pg.crash_recovered)
    return "crash recovery ran" if recovered else "NO crash recovery in the log"


def _queue_names(rig: Rig) -> list[str]:
    topo = Topology()
    return [topo.queue_name(q) for q in WORK_QUEUES]


async def cluster_leader_kill(rig: Rig) -> str:
    """SIGKILL of the node leading (most of) the work queues while tasks flow; the service is
    back once every work queue has a leader elsewhere. The node then boots again and rejoins
    (its time is in the note)."""
    cluster = rig.cluster
    queues = _queue_names(rig)
    leaders = Counter([await asyncio.to_thread(cluster.leader_of, q, rig.vhost) for q in queues])
    node = leaders.most_common(1)[0][0]
    rig.struck = time.time()
    await asyncio.to_thread(cluster.kill, node)
    killed = time.time()
    for q in queues:
        await asyncio.to_thread(cluster.wait_leader_elected, q, rig.vhost, not_on=node)
    await rig.service_back()
    elected = time.time()
    await asyncio.to_thread(cluster.start, node)
    return (f"{node} led {leaders[node]}/{len(queues)} work queues; re-elected "
            f"{elected - killed:.1f}s after the kill, node rejoined {time.time() - elected:.1f}s "
            "later")


async def cluster_follower_kill(rig: Rig) -> str:
    """SIGKILL of a node that leads none of the work queues (if any): the majority keeps
    serving, so the service never leaves; the node boots again and rejoins."""
    cluster = rig.cluster
    queues = _queue_names(rig)
    leaders = {await asyncio.to_thread(cluster.leader_of, q, rig.vhost) for q in queues}
    followers = [n for n in cluster.nodes if n not in leaders] or list(cluster.nodes)
    node = followers[0]
    rig.struck = time.time()
    await asyncio.to_thread(cluster.kill, node)
    began = time.time()
    await rig.service_back()  # the majority never stopped serving
    await asyncio.sleep(DOWN_S)
    await asyncio.to_thread(cluster.start, node)
    return f"{node} killed, rejoined {time.time() - began:.1f}s later"


FAULTS: dict[str, FaultFn] = {
    "broker_restart": broker_restart, "connection_close": connection_close,
    "broker_kill": broker_kill, "sigkill": sigkill, "redis_restart": redis_restart,
    "redis_kill": redis_kill, "pg_restart": pg_restart, "pg_kill": pg_kill,
    "cluster_leader_kill": cluster_leader_kill, "cluster_follower_kill": cluster_follower_kill,
}


async def run_schedule(schedule: list[str], rig: Rig) -> list[Fault]:
    """Inject ``schedule`` at even steps of results; time each recovery."""
    assert rig.pacer is not None
    out: list[Fault] = []
    try:
        for n, name in enumerate(schedule, start=1):
            await rig.tap.wait_for(rig.pacer.step * n, STEP_TIMEOUT_S)
            await rig.pacer.fault_began()
            out.append(await _inject(name, rig))
    finally:
        await rig.pacer.release_all()
    return out


async def _inject(name: str, rig: Rig) -> Fault:
    """One fault, timed: recovered once ``RECOVERY_RESULTS`` more results came out after the
    service returned."""
    rig.back, rig.struck = None, None
    began, at = time.time(), rig.tap.count
    note = await FAULTS[name](rig)
    await rig.service_back()  # no-op if the fault said so earlier
    began = rig.struck or began
    assert rig.back is not None
    returned, done = rig.back
    recovered = await rig.tap.wait_for(done + RECOVERY_RESULTS, RECOVERY_TIMEOUT_S)
    print(f"chaos: {name} at {at} results: back after {returned - began:.1f}s, recovered "
          f"{(recovered or float('nan')) - began:.1f}s after it began; {note}",
          file=sys.stderr, flush=True)
    return Fault(name, began, max(began, returned), recovered, note)
