"""Collecting what the verdict judges: the events tap, result and effect rows, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict

import asyncpg
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, ExchangeType

from mlpipe.broker.connection import Backoff, BrokerConnection
from mlpipe.broker.topology import Topology
from mlpipe.dlq import list_dead
from mlpipe.settings import Settings
from tests.chaos.verdict import DeadLetter, Evidence, Execution

SCHEMA = "chaos"
#: The harness's own queue on the events exchange (quorum: it survives the broker kills).
TAP_QUEUE = "chaos.events-tap"


class EventTap:
    """Counts the ``completed`` events of the events exchange per share through a queue bound
    before the first task is published. The live count is also the scenario's clock of
    progress: a result counts once its event is out, which is when the pipeline finished it."""

    def __init__(self, url: str) -> None:
        self.ids: dict[str, set[str]] = defaultdict(set)
        #: Epoch second at which the n-th share got its first ``completed`` event.
        self.times: list[float] = []
        self.copies = 0
        self.failed: dict[str, int] = defaultdict(int)
        self._conn = BrokerConnection(url, name="chaos-events-tap", on_connect=self._setup,
                                      backoff=Backoff(base_s=0.2, max_s=1.0))
        self.changed = asyncio.Event()

    @property
    def count(self) -> int:
        """Shares with at least one ``completed`` event: results seen so far."""
        return len(self.ids)

    async def start(self) -> None:
        await self._conn.start(timeout=120)

    async def close(self) -> None:
        await self._conn.close()

    async def _setup(self, conn: AbstractConnection) -> None:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        exchange = await channel.declare_exchange(Topology().events_exchange,
                                                  ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(TAP_QUEUE, durable=True,
                                            arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key="ml.result.#")
        await queue.consume(self._on_message)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            doc = json.loads(message.body)
            share, status = str(doc.get("shareId")), doc.get("status")
        except (ValueError, AttributeError):
            share, status = "?", None
        if status == "completed":
            self.copies += 1
            if share not in self.ids:
                self.times.append(time.time())
            self.ids[share].add(message.message_id or f"no-id-{self.copies}")
            self.changed.set()
        elif status == "failed":
            self.failed[share] += 1
        with contextlib.suppress(Exception):  # a lost ack comes back as a copy: deduplicated
            await message.ack()

    async def wait_for(self, target: int, timeout: float) -> float | None:
        """Epoch second at which ``count`` reached ``target`` (at once if it already had), or
        None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.count < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 1.0))
        return self.times[target - 1] if target > 0 else time.time()


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection to the chaos schema, waiting out a Postgres restart."""
    for _ in range(300):
        try:
            return await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA},
                                         timeout=2)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            await asyncio.sleep(0.2)
    raise RuntimeError("chaos postgres unreachable")


async def store_rows(ev: Evidence, dsn: str, shares: set[str] | None = None) -> None:
    """Result rows (count and winning pid per share) and every recorded execution."""
    c = await connect(dsn)
    try:
        rows = await c.fetch("SELECT share_id, result_data::text AS r FROM ml_results")
        effects = await c.fetch(
            "SELECT share_id, kind, pid, attempt, extract(epoch FROM started)::float8 AS s, "
            "extract(epoch FROM at)::float8 AS a FROM chaos_effects ORDER BY id")
    finally:
        await c.close()
    for r in rows:
        if shares is None or r["share_id"] in shares:
            ev.results[r["share_id"]] += 1
            ev.winner_pid[r["share_id"]] = json.loads(r["r"]).get("pid", 0)
    ev.executions += [Execution(e["share_id"], e["pid"], e["attempt"], e["s"], e["a"], e["kind"])
                      for e in effects if shares is None or e["share_id"] in shares]


async def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter(e.message_id, e.share_id, e.reason, e.attempts)
            for e in await list_dead(settings, limit=100_000)]


#: ``wait_settled`` gives up once nothing moved for this long (the longest deferral of a
#: locked task is 15 s, the longest retry delay 4 s).
STALLED_S = 90.0


async def wait_settled(settings: Settings, tap: EventTap, dsn: str, confirmed: set[str],
                       hostile: set[str], timeout: float = 600) -> None:
    """Until every confirmed task has its result (or a dead letter) and its event, and every
    hostile message is dead-lettered; or nothing moved for ``STALLED_S``; or ``timeout``."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int, int] = (-1, -1, -1)
    moved = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - moved < STALLED_S:
        c = await connect(dsn)
        try:
            done = {r["share_id"] for r in await c.fetch("SELECT share_id FROM ml_results")}
        finally:
            await c.close()
        dead = await list_dead(settings, limit=100_000)
        dead_shares = {e.share_id for e in dead}
        dead_ids = {e.message_id for e in dead}
        events_out = all(s in tap.ids for s in confirmed & done)
        if confirmed <= done | dead_shares and hostile <= dead_ids and events_out:
            return
        now = (len(done), len(dead), tap.copies)
        if now != last:
            last, moved = now, time.monotonic()
        await asyncio.sleep(1.0)
