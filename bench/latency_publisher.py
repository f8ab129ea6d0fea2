"""The open-loop publisher of the latency workload, run as its own process.

``python -m bench.latency_publisher URL --mode mlpipe|raw --rate 500 --seconds 5`` publishes
message ``i`` at ``t0 + i / rate`` whatever the confirms are doing (open loop: a slow consumer
must show up as latency, not as a lower offered rate), stamping the system-wide monotonic clock
into the message id just before the publish call. Running it in a process of its own keeps
its work off the consumer's event loop. Prints one JSON line: how many it sent and the rate
it achieved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika

from bench import messages
from mlpipe.broker.topology import Topology, routing_key_for
from mlpipe.contract.codec import decode
from mlpipe.producer import Producer
from mlpipe.settings import Settings


def stamp(i: int) -> str:
    """Message id carrying its send time: ``<i>-<monotonic ns>``."""
    return f"{i}-{time.monotonic_ns()}"


def sent_ns(message_id: str | None) -> int:
    if not message_id or "-" not in message_id:
        raise ValueError(f"message id {message_id!r} carries no send time")
    return int(message_id.rpartition("-")[2])


async def _paced(total: int, rate: float, send: Callable[[int], Awaitable[object]]) -> float:
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[object]] = set()
    t0 = loop.time()
    for i in range(total):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task: asyncio.Task[object] = asyncio.ensure_future(send(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    elapsed = loop.time() - t0
    if pending:
        await asyncio.gather(*pending)
    return elapsed


async def publish_mlpipe(url: str, total: int, rate: float) -> float:
    tasks = [decode(b) for b in messages.bodies(total)]
    async with Producer(Settings(broker_url=url), name="bench-latency-pub") as producer:
        return await _paced(total, rate,
                            lambda i: producer.publish(tasks[i], message_id=stamp(i)))


async def publish_raw(url: str, total: int, rate: float) -> float:
    topo = Topology()
    bodies = list(messages.bodies(total))
    key = routing_key_for(decode(bodies[0]))
    conn = await aio_pika.connect(url, client_properties={"connection_name": "bench-lat-pub"})
    try:
        channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topo.tasks_exchange, ensure=False)

        async def send(i: int) -> object:
            message = aio_pika.Message(
                body=bodies[i], content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=stamp(i),
                correlation_id=uuid.uuid4().hex, timestamp=int(time.time()))
            return await exchange.publish(message, key, mandatory=True)

        return await _paced(total, rate, send)
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--mode", choices=("mlpipe", "raw"), required=True)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    total = int(args.rate * args.seconds)
    run = publish_mlpipe if args.mode == "mlpipe" else publish_raw
    import uvloop

    from mlpipe.logs import configure

    configure(json=True, level="WARNING")  # stdout carries the one result line
    elapsed = uvloop.run(run(args.url, total, args.rate))
    print(json.dumps({"sent": total, "offered_rate": args.rate,
                      "achieved_rate": total / (elapsed + 1 / args.rate)}), flush=True)


if __name__ == "__main__":
    main()
