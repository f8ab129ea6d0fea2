"""Workload 4, latency: publish-to-handler-done at a fixed offered rate.

Each contender consumes ``ml.embed`` in the bench process while its own kind of publisher
(``bench.latency_publisher`` in a separate process: mlpipe's ``Producer`` for mlpipe, a raw
aio-pika confirming publisher for raw) offers ``rate`` messages a second, open loop. The
latency of a message is the system-wide monotonic clock when its handler finished minus the
stamp the publisher took just before the publish call, so it includes the publisher's
client, the broker (quorum write, confirm, delivery) and the consumer up to the handler's end.
The first 10 % of messages (connection warm-up) are left out of the percentiles.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench import broker
from bench.consume_noop import EMBED, PREFETCH, mlpipe_settings
from bench.latency_publisher import sent_ns
from bench.measure import Completion, quiesce
from bench.report import percentile
from mlpipe.broker.topology import Topology, declare
from mlpipe.contract.models import EmbedTask, TaskType
from mlpipe.execution import DirectExecutor
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.worker.daemon import Daemon

ROOT = Path(__file__).resolve().parents[1]
WARMUP_FRACTION = 0.1
_OK = HandlerResult({})


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    samples: int
    achieved_rate: float


def summarise(latencies_ms: list[float], achieved_rate: float) -> Latency:
    kept = latencies_ms[int(len(latencies_ms) * WARMUP_FRACTION):]
    return Latency(percentile(kept, 50), percentile(kept, 99), len(kept), achieved_rate)


async def _publish(url: str, mode: str, rate: float, seconds: float) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.latency_publisher", url, "--mode", mode,
        "--rate", str(rate), "--seconds", str(seconds), cwd=str(ROOT), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"latency publisher ({mode}) failed: {err.decode()[-2000:]}")
    return float(json.loads(out.decode().strip().splitlines()[-1])["achieved_rate"])


async def _topology(url: str) -> None:
    async with broker.connection(url) as conn, conn.channel() as ch:
        await declare(ch, Topology())


async def mlpipe_latency(url: str, rate: float, seconds: float) -> Latency:
    await _topology(url)
    total = int(rate * seconds)
    done = Completion(total)
    latencies: list[float] = []
    registry = Registry()

    async def handle(task: EmbedTask, ctx: TaskContext) -> HandlerResult:
        latencies.append((time.monotonic_ns() - sent_ns(ctx.message_id)) / 1e6)
        done.started()
        done.finished()
        return _OK

    registry.register(TaskType.EMBED_VECTORS, handle)
    settings = mlpipe_settings(url)
    daemon = Daemon(settings, registry, [EMBED], executor=DirectExecutor(settings),
                    name="bench-mlpipe-latency")
    quiesce()
    await daemon.start()
    try:
        achieved = await _publish(url, "mlpipe", rate, seconds)
        await done.wait(timeout=60)
    finally:
        await daemon.stop()
    return summarise(latencies, achieved)


async def raw_latency(url: str, rate: float, seconds: float) -> Latency:
    await _topology(url)
    total = int(rate * seconds)
    done = Completion(total)
    latencies: list[float] = []
    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-raw-lat"})
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(Topology().queue_name(EMBED), ensure=False)

        async def on_message(message: AbstractIncomingMessage) -> None:
            latencies.append((time.monotonic_ns() - sent_ns(message.message_id)) / 1e6)
            done.started()
            await message.ack()
            done.finished()

        quiesce()
        tag = await queue.consume(on_message, no_ack=False)
        achieved = await _publish(url, "raw", rate, seconds)
        await done.wait(timeout=60)
        await queue.cancel(tag)
    finally:
        await conn.close()
    return summarise(latencies, achieved)
