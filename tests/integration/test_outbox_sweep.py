"""An event whose delivery was lost after its result committed (no redelivery will flush it)
is published by the daemon's outbox sweep, once, under its own message id."""

from __future__ import annotations

import json
from typing import Any

import aio_pika

from mlpipe.effects import Effects
from mlpipe.handlers import Registry
from mlpipe.producer import topology_from
from mlpipe.settings import Settings
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL


async def test_owed_events_are_swept_out(broker_url: str, pg_dsn: str, pg_schema: str,
                                         lock_prefix: str) -> None:
    settings = Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                        redis_url=REDIS_URL, lock_prefix=lock_prefix, outbox_sweep_s=0.3)
    topo = topology_from(settings)
    received: list[dict[str, Any]] = []
    conn = await aio_pika.connect(broker_url)
    try:
        channel = await conn.channel()
        await channel.declare_exchange(topo.events_exchange, aio_pika.ExchangeType.TOPIC,
                                       durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(topo.events_exchange, routing_key="ml.result.#")

        async def on_event(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            received.append({"id": m.message_id, **json.loads(m.body)})
            await m.ack()

        await queue.consume(on_event)
        async with Effects(settings) as effects:
            assert effects.pool is not None
            pool = effects.pool
            # a result's event, written with it, whose delivery never came back to publish it
            await pool.execute(
                "INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, "
                "message_id, body, created_at) VALUES ('owed', 'summarize_llm', 'event', $1, "
                "'ml.result.summarize_llm', 'owed-event-1', $2, now() - interval '5 seconds')",
                topo.events_exchange, {"shareId": "owed", "status": "completed"})
            async with running_daemon(settings, Registry(), "summarize",
                                      executor=effects.executor):
                await wait_for(lambda: bool(received), timeout=10,
                               message="the owed event published")

                async def marked() -> bool:
                    return bool(await pool.fetchval(
                        "SELECT published_at IS NOT NULL FROM ml_outbox "
                        "WHERE message_id = 'owed-event-1'"))

                await wait_for(marked, timeout=10, message="the owed row marked published")
                # a later sweep (a second owed row is its marker) does not send the first again
                await pool.execute(
                    "INSERT INTO ml_outbox (share_id, task_type, kind, exchange, routing_key, "
                    "message_id, body, created_at) VALUES ('marker', 'summarize_llm', 'event', "
                    "$1, 'ml.result.summarize_llm', 'owed-event-2', $2, "
                    "now() - interval '5 seconds')",
                    topo.events_exchange, {"shareId": "marker", "status": "completed"})
                await wait_for(lambda: len(received) >= 2, timeout=10,
                               message="the marker swept out")
    finally:
        await conn.close()
    assert [(e["id"], e["shareId"]) for e in received] == [("owed-event-1", "owed"),
                                                           ("owed-event-2", "marker")]
