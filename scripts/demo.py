"""`make demo`: run the daemon in-process, publish one example task per task type from
contracts/examples, and print what became of each (handled, or dead-lettered and why).

It uses the shipped handlers (``consumers:build_registry``) on a throwaway namespace, so it
leaves the regular queues alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

from mlpipe.broker.topology import Topology, declare
from mlpipe.cli import load_registry
from mlpipe.contract.codec import decode
from mlpipe.dlq import list_dead
from mlpipe.logs import configure
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.testing import running_daemon, wait_for

EXAMPLES = Path(__file__).resolve().parents[1] / "contracts" / "examples"


async def main() -> None:
    configure(json=False, level=os.environ.get("DEMO_LOG_LEVEL", "WARNING"))
    namespace = f"demo-{uuid.uuid4().hex[:6]}"
    settings = Settings(namespace=namespace)
    registry = load_registry("consumers:build_registry", settings)
    topo = Producer(settings).topology
    tasks = [decode(p.read_bytes()) for p in sorted(EXAMPLES.glob("*.json"))]
    print(f"demo namespace {namespace}: {len(tasks)} tasks, handlers for "
          f"{sorted(s.task_type.value for s in registry) or 'no task type yet'}")
    queues = "transcribe,summarize,embed,transcribe_local,summarize_local,embed_local"
    async with running_daemon(settings, registry, queues) as daemon, Producer(settings) as p:
        started = time.monotonic()
        for task in tasks:
            receipt = await p.publish(task)
            print(f"published {task.task_type.value:<26} -> {receipt.routing_key:<28} "
                  f"confirmed in {receipt.latency_s * 1000:.1f} ms")
        await wait_for(lambda: daemon.status().tasks_done >= len(tasks), timeout=120,
                       message="every task settled")
        print(f"all {len(tasks)} settled in {time.monotonic() - started:.2f}s")
    for entry in await list_dead(settings):
        print(f"dead-lettered {entry.task_type}: {entry.reason} ({entry.error})")
    await _cleanup(settings, topo)


async def _cleanup(settings: Settings, topo: Topology) -> None:
    import aio_pika

    conn = await aio_pika.connect(settings.broker_url)
    async with conn:
        ch = await conn.channel()
        await declare(ch, topo)  # make sure every name exists before deleting
        for name in [topo.queue_name(q) for q in topo.queues] + [
                topo.delay_queue_name(t) for t in topo.delay_tiers_ms] + [topo.dead_letter_queue]:
            await ch.queue_delete(name)
        for ex in (topo.tasks_exchange, topo.retry_exchange, topo.delay_exchange,
                   topo.dead_letter_exchange):
            await ch.exchange_delete(ex)
    print(json.dumps({"cleaned": settings.namespace}))


if __name__ == "__main__":
    asyncio.run(main())
