"""Workload 1, Celery baseline: drain time of a pre-filled queue by a real Celery worker.

The queue is pre-filled with Celery protocol-2 messages whose one argument is the same
contract-v1 document the other contenders get, published straight into the queue with
confirms (as ``apply_async`` would, only faster: pre-filling is not measured). Then
``celery -A bench.celery_app worker`` runs as a subprocess (prefork, concurrency 2, as the
original system) and the drain is timed from the first task's start to the n-th task's end,
read from the pool processes' shared-memory records (see ``bench.celery_app``).
``run_worker`` is shared with the full-path Celery contender (``bench.celery_full``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import aio_pika

from bench import broker, messages
from bench.measure import Run, deadline_for

ROOT = Path(__file__).resolve().parents[1]
QUEUE = "bench.celery"
TASK_NAME = "bench.noop"
CONCURRENCY = 2
PREFETCH_MULTIPLIER = 8
_EMBED = b',{},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'


def celery_message(i: int, task: str = TASK_NAME) -> aio_pika.Message:
    """Task ``bench.noop(<contract document i>)`` (or ``task``) in Celery's message
    protocol 2."""
    tid = str(uuid.uuid4())
    headers: dict[str, object] = {
        "lang": "py", "task": task, "id": tid, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": tid, "parent_id": None,
        "argsrepr": f"({messages.share_id(i)!r},)", "kwargsrepr": "{}", "origin": "bench",
        "ignore_result": True,
    }
    return aio_pika.Message(
        body=b"[[" + messages.body(i) + b"]" + _EMBED,
        headers=headers,  # type: ignore[arg-type]
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=tid,
        priority=0,
    )


def read_records(folder: Path) -> list[tuple[int, float, float]]:
    from bench.celery_app import RECORD

    found = []
    for path in folder.iterdir():
        data = path.read_bytes()
        if len(data) == RECORD.size:
            found.append(RECORD.unpack(data))
    return found


async def celery_noop(url: str, n: int) -> Run:
    await broker.declare_queue(url, QUEUE, arguments={"x-queue-type": "quorum"})
    await broker.prefill(url, QUEUE, n, make=celery_message)
    run = await run_worker(url, QUEUE, n)
    left = await broker.queue_depth(url, QUEUE)
    if left:
        raise RuntimeError(f"{QUEUE}: {left} messages left after the Celery run")
    await broker.delete_queue(url, QUEUE)
    return run


async def run_worker(url: str, queue: str, n: int, *, env: dict[str, str] | None = None,
                     args: tuple[str, ...] = (), slowest_rate: float = 100.0) -> Run:
    """Start ``celery worker`` on ``queue`` (prefork, concurrency 2, prefetch multiplier 8,
    plus ``args``), time the drain of ``n`` tasks from the pool processes' records, stop it."""
    with tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp:
        stats, log_path = _workdir(Path(tmp))
        full_env = {**os.environ, "BENCH_CELERY_BROKER": url, "BENCH_CELERY_QUEUE": queue,
                    "BENCH_CELERY_STATS": str(stats),
                    "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    **(env or {})}
        with _log_file(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
                "-P", "prefork", "-c", str(CONCURRENCY),
                "--prefetch-multiplier", str(PREFETCH_MULTIPLIER), *args,
                "-Q", queue, "-l", "WARNING", "-n", f"bench-{uuid.uuid4().hex[:6]}@%h",
                cwd=str(ROOT), env=full_env, stdout=log, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True)
            try:
                return await _wait_drained(proc, stats, n, log_path, slowest_rate)
            finally:
                await _stop(proc)


async def _wait_drained(proc: asyncio.subprocess.Process, stats: Path, n: int,
                        log_path: Path, slowest_rate: float) -> Run:
    deadline = time.monotonic() + deadline_for(n, slowest_rate=slowest_rate)
    while True:
        records = read_records(stats)
        done = sum(r[0] for r in records)
        if done >= n:
            first = min(r[1] for r in records if r[0])
            last = max(r[2] for r in records if r[0])
            return Run(n, last - first)
        if proc.returncode is not None:
            raise RuntimeError(f"celery worker exited with {proc.returncode} after {done} tasks:"
                               f"\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"celery drained only {done} of {n}:\n{_tail(log_path)}")
        await asyncio.sleep(0.02)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Warm shutdown (SIGTERM), then SIGKILL to the worker's own process group (its pool
    processes) if it hangs."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout=20)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _workdir(tmp: Path) -> tuple[Path, Path]:
    stats = tmp / "stats"
    stats.mkdir()
    return stats, tmp / "worker.log"


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it (``with``)


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
