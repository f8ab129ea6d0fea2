"""The in-memory harness and the real daemon tell the same story: one scenario (a result, a
redelivered double-fire, a budget refusal, a handler's permanent error, a message that is
no task) through ``TaskHarness`` and through a daemon on the real broker, Redis and
Postgres; outcomes, stored results and events are compared."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import aio_pika

from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.testing import TaskHarness, running_daemon, wait_for
from tests.conftest import REDIS_URL
from tests.examples.test_handler_example import article, build_registry

BUDGETS = {"summarize_llm": {"hourly_usd": 1.0, "daily_usd": 5.0}}
SCENARIO: list[tuple[str, Any]] = [
    ("first", article("p1", "Rockets reach orbit. Then they coast.")),
    ("again", article("p1", "Rockets reach orbit. Then they coast.")),
    ("empty", article("p4", "   ")),
    ("second", article("p2", "Sourdough needs time. And warmth.")),
    ("over_budget", article("p3", "Budgets stop runaway costs.")),
    ("junk", b'{"taskType": "summarize_llm", "shareId": "p5"'),
]


async def through_harness() -> dict[str, Any]:
    async with TaskHarness(build_registry(), Settings(budgets=BUDGETS)) as harness:
        runs = {name: await harness.send(msg) for name, msg in SCENARIO}
    return {
        "dead": {name: run.reason for name, run in runs.items() if not run.acked},
        "stored": {share: s.data for (_, share), s in harness.effects.results.items()},
        "events": sorted((e["shareId"], e["status"]) for e in harness.effects.events),
        "spent": harness.effects.spent("summarize_llm", 3600),
    }


async def through_daemon(broker_url: str, pg_dsn: str, pg_schema: str,
                         lock_prefix: str) -> dict[str, Any]:
    settings = Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                        redis_url=REDIS_URL, lock_prefix=lock_prefix, budgets=BUDGETS)
    events: list[dict[str, Any]] = []
    async with Producer(settings) as producer:
        topo = producer.topology
        conn = await aio_pika.connect(broker_url)
        try:
            ch = await conn.channel()
            queue = await ch.declare_queue("", exclusive=True)
            await queue.bind(topo.events_exchange, routing_key="ml.result.#")

            async def on_event(m: aio_pika.abc.AbstractIncomingMessage) -> None:
                events.append(json.loads(m.body))
                await m.ack()

            await queue.consume(on_event)
            async with Effects(settings) as effects, \
                    running_daemon(settings, build_registry(), "summarize",
                                   executor=effects.executor) as daemon:
                for n, (_, msg) in enumerate(SCENARIO, 1):
                    if isinstance(msg, bytes):
                        await producer.publish_message(
                            topo.tasks_exchange, "summarize_llm",
                            aio_pika.Message(msg, content_type="application/json",
                                             message_id=f"junk-{n}"))
                    else:
                        await producer.publish(msg)
                    # one at a time, as the harness sends them
                    await wait_for(lambda n=n: daemon.status().tasks_done >= n,  # type: ignore[misc]
                                   timeout=30, message=f"message {n} settled")
                await wait_for(lambda: len(events) >= 4, timeout=10, message="4 events")
                assert effects.pool is not None
                rows = await effects.pool.fetch("SELECT share_id, result_data FROM ml_results")
                spent = await effects.pool.fetchval(
                    "SELECT coalesce(sum(usd), 0) FROM ml_costs WHERE task_type = 'summarize_llm'")
            dead = await list_dead(settings)
        finally:
            await conn.close()
    by_share = {"p1": "first", "p2": "second", "p3": "over_budget", "p4": "empty", "p5": "junk"}
    return {
        "dead": {by_share[e.share_id or "p5"]: e.reason for e in dead},
        "stored": {r["share_id"]: r["result_data"] for r in rows},
        "events": sorted((e["shareId"], e["status"]) for e in events),
        "spent": Decimal(spent),
    }


async def test_harness_and_daemon_report_the_same(broker_url: str, pg_dsn: str, pg_schema: str,
                                                  lock_prefix: str) -> None:
    memory = await through_harness()
    real = await through_daemon(broker_url, pg_dsn, pg_schema, lock_prefix)
    assert memory == real
    assert memory["dead"] == {"over_budget": "budget_exceeded", "empty": "empty_text",
                              "junk": "not_json"}
    assert set(memory["stored"]) == {"p1", "p2"}
    assert memory["events"] == [("p1", "completed"), ("p2", "completed"), ("p3", "failed"),
                                ("p4", "failed")]
    assert memory["spent"] == Decimal("0.80")

