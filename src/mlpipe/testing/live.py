"""Helpers for testing handlers and pipelines against a real broker.

Shipped with the package so users can test their own handlers the way mlpipe tests itself:
start the daemon in-process on a throwaway vhost or namespace, publish, and wait on a
condition with a deadline (never a bare sleep)::

    async with running_daemon(settings, registry, "embed") as daemon:
        await producer.publish(task)
        await wait_for(lambda: len(calls) == 1)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from mlpipe.broker.topology import WorkQueue, parse_queue_names
from mlpipe.execution import Executor
from mlpipe.handlers import Registry
from mlpipe.settings import Settings
from mlpipe.worker.daemon import Daemon


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0,
                   interval: float = 0.02, message: str = "condition") -> None:
    """Poll ``condition`` until it is true; raise ``TimeoutError`` naming it otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not met within {timeout}s")
        await asyncio.sleep(interval)


@asynccontextmanager
async def running_daemon(settings: Settings, registry: Registry,
                         queues: str | Sequence[WorkQueue], *,
                         executor: Executor | None = None,
                         resources: dict[str, Any] | None = None) -> AsyncIterator[Daemon]:
    """A started daemon, stopped (drained) on exit."""
    wq = parse_queue_names(queues) if isinstance(queues, str) else list(queues)
    daemon = Daemon(settings, registry, wq, executor=executor, resources=resources)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()
