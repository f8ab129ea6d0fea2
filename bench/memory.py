"""Workload 6, memory: resident set size of a real ``mlpipe consume`` process.

The daemon is the production command line, ``python -m mlpipe.cli consume --queues embed``,
with the no-op registry of ``bench.noop_handlers`` (no model, no API client), so every task
goes through what production runs: decode and validate, the effects layer (Redis lock, stored
result check, Postgres upsert), settle, JSON logging at INFO. Its RSS (``VmRSS`` in
``/proc/<pid>/status``) is read once it has started and sat idle for a second, then after the
first and the second batch of tasks (10,000 and 20,000 by default); progress is the number of
rows in ``ml_results`` of its throwaway schema, so the count is of tasks really finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import asyncpg

from bench import broker
from bench.consume_noop import CONCURRENCY, EMBED, PREFETCH
from bench.full_path import Stores
from mlpipe.broker.topology import Topology, declare

ROOT = Path(__file__).resolve().parents[1]
IDLE_SETTLE_S = 1.0


@dataclass(frozen=True)
class Memory:
    idle_mib: float
    after_a_mib: float
    after_b_mib: float
    counts: tuple[int, int]


def rss_mib(pid: int) -> float:
    """``VmRSS`` of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _env(url: str, stores: Stores) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MLPIPE_")}
    env.update({
        "MLPIPE_BROKER_URL": url,
        "MLPIPE_DATABASE_URL": stores.dsn,
        "MLPIPE_DATABASE_SCHEMA": stores.schema,
        "MLPIPE_REDIS_URL": stores.redis_url,
        "MLPIPE_LOCK_PREFIX": f"bench:{uuid.uuid4().hex[:8]}:",
        "MLPIPE_QUEUES__EMBED": json.dumps({"prefetch": PREFETCH, "concurrency": CONCURRENCY}),
        "MLPIPE_HTTP_PORT": "0",
        "MLPIPE_HTTP_HOST": "127.0.0.1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    })
    return env


async def _results(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".ml_results'))
    finally:
        await conn.close()


async def _wait_log(proc: asyncio.subprocess.Process, log: Path, event: str,
                    timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while event not in _text(log):
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not log {event} (exit {proc.returncode}):\n"
                               + "\n".join(_text(log).splitlines()[-20:]))
        await asyncio.sleep(0.05)


async def _wait_results(proc: asyncio.subprocess.Process, stores: Stores, n: int,
                        timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (done := await _results(stores.dsn, stores.schema)) < n:
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon finished only {done} of {n} tasks "
                               f"(exit {proc.returncode})")
        await asyncio.sleep(0.25)


async def measure_memory(url: str, stores: Stores, counts: tuple[int, int]) -> Memory:
    a, b = counts
    async with broker.connection(url) as conn, conn.channel() as ch:
        await declare(ch, Topology())
    queue = Topology().queue_name(EMBED)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        log_path = Path(tmp, "daemon.log")
        with _log_file(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mlpipe.cli", "--log-json", "consume", "--queues", "embed",
                "--handlers", "bench.noop_handlers:build_registry",
                cwd=str(ROOT), env=_env(url, stores), stdout=log, stderr=log)
            try:
                await _wait_log(proc, log_path, "daemon.started", timeout=60)
                await asyncio.sleep(IDLE_SETTLE_S)  # measurement: RSS once start-up settled
                idle = rss_mib(proc.pid)
                await broker.prefill(url, queue, a, check=False)
                await _wait_results(proc, stores, a, timeout=max(120.0, a / 50))
                after_a = rss_mib(proc.pid)
                await broker.prefill(url, queue, b - a, start=a, check=False)
                await _wait_results(proc, stores, b, timeout=max(120.0, b / 50))
                after_b = rss_mib(proc.pid)
            finally:
                await _stop(proc)
    return Memory(idle, after_a, after_b, counts)


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it (``with``)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=40)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
