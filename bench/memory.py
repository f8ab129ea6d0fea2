"""Workload 6, memory: resident set size of a real ``mlpipe consume`` process.

The daemon is the production command line, ``python -m mlpipe.cli consume --queues embed``,
with the no-op registry of ``bench.noop_handlers`` (no model, no API client), so every task
goes through what production runs: decode and validate, the effects layer (Redis lock, stored
result check, Postgres upsert), settle, JSON logging at INFO. Its RSS (``VmRSS`` in
``/proc/<pid>/status``) is read once it has started and sat idle for a second, then after the
first and the second batch of tasks (10,000 and 20,000 by default); progress is the number of
rows in ``ml_results`` of its throwaway schema, so the count is of tasks really finished.

Then, "with the offline models loaded": a second ``mlpipe consume --queues
transcribe_local,embed_local`` with the shipped handlers (``consumers:build_registry``), whose
models load lazily, is given one local embedding task and one local transcription of a short
spoken clip (espeak-ng, as ``make demo``); its RSS is read once both results are stored, so
MiniLM (onnxruntime) and Whisper base (CTranslate2) are both resident.

And "shipped handlers with API backends": ``mlpipe consume --queues transcribe,summarize,embed``
with the shipped handlers and an API key set (the production set-up of an API worker), its RSS
read once it has started and sat idle; nothing is called, so it is what such a pod costs
before its first task.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
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
from mlpipe.contract.models import TaskType, build_task
from mlpipe.producer import Producer
from mlpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
IDLE_SETTLE_S = 1.0
#: Where ``make setup`` assembles the offline models (the Makefile exports these variables;
#: ``python -m bench.run`` without make falls back to the same places).
MODEL_DIRS = {
    "MLPIPE_WHISPER_MODEL_DIR": ROOT / ".data" / "models" / "whisper-base",
    "MLPIPE_EMBEDDING_MODEL_DIR": ROOT / ".data" / "models" / "all-MiniLM-L6-v2-int8",
}
SPOKEN = "The quick brown fox jumps over the lazy dog. Benchmarks keep us honest."


@dataclass(frozen=True)
class Memory:
    idle_mb: float
    after_a_mb: float
    after_b_mb: float
    counts: tuple[int, int]


@dataclass(frozen=True)
class ModelMemory:
    """The shipped handlers' daemon: idle (nothing loaded yet) and with both models loaded."""

    idle_mb: float
    loaded_mb: float


def rss_mb(pid: int) -> float:
    """``VmRSS`` of ``pid`` in MB (10^6 bytes: the stricter reading of "under 80 MB")."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6  # the kernel's "kB" are KiB
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _env(url: str, stores: Stores) -> dict[str, str]:
    keep = set(MODEL_DIRS)
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("MLPIPE_") or k in keep}
    for name, default in MODEL_DIRS.items():
        env.setdefault(name, str(default))
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


async def _results(dsn: str, schema: str, prefix: str = "") -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".ml_results WHERE share_id LIKE $1 || \'%\'',
            prefix))
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
                        timeout: float, prefix: str = "") -> None:
    deadline = time.monotonic() + timeout
    while (done := await _results(stores.dsn, stores.schema, prefix)) < n:
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
                idle = rss_mb(proc.pid)
                await broker.prefill(url, queue, a, check=False)
                await _wait_results(proc, stores, a, timeout=max(120.0, a / 50))
                after_a = rss_mb(proc.pid)
                await broker.prefill(url, queue, b - a, start=a, check=False)
                await _wait_results(proc, stores, b, timeout=max(120.0, b / 50))
                after_b = rss_mb(proc.pid)
            finally:
                await _stop(proc)
    return Memory(idle, after_a, after_b, counts)


async def measure_api_memory(url: str, stores: Stores) -> float:
    """Idle RSS (MB) of the shipped handlers' daemon on the API queues."""
    async with broker.connection(url) as conn, conn.channel() as ch:
        await declare(ch, Topology())
    env = {**_env(url, stores), "MLPIPE_OPENAI_API_KEY": "bench",
           # never called: nothing is published to this daemon
           "MLPIPE_OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    with tempfile.TemporaryDirectory(prefix="bench-api-memory-") as tmp:
        log_path = Path(tmp, "daemon.log")
        with _log_file(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mlpipe.cli", "--log-json", "consume",
                "--queues", "transcribe,summarize,embed",
                cwd=str(ROOT), env=env, stdout=log, stderr=log)
            try:
                await _wait_log(proc, log_path, "daemon.started", timeout=60)
                await asyncio.sleep(IDLE_SETTLE_S)
                return rss_mb(proc.pid)
            finally:
                await _stop(proc)


async def measure_model_memory(url: str, stores: Stores) -> ModelMemory:
    """RSS of the shipped handlers' daemon once both offline models served a task."""
    async with broker.connection(url) as conn, conn.channel() as ch:
        await declare(ch, Topology())
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        raise RuntimeError("espeak-ng and ffmpeg are needed (as for make demo): "
                           "apt-get install -y espeak-ng ffmpeg")
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        clip = Path(tmp, "clip.wav")
        speak = await asyncio.create_subprocess_exec(
            "espeak-ng", "-v", "en-us", "-s", "150", "-w", str(clip), SPOKEN,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await speak.communicate()
        if speak.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {err.decode()[-500:]}")
        env = {**_env(url, stores), "MLPIPE_MEDIA_ROOTS": json.dumps([tmp])}
        prefix = f"bench-model-{uuid.uuid4().hex[:6]}-"
        log_path = Path(tmp, "daemon.log")
        with _log_file(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mlpipe.cli", "--log-json", "consume",
                "--queues", "transcribe_local,embed_local",
                cwd=str(ROOT), env=env, stdout=log, stderr=log)
            try:
                await _wait_log(proc, log_path, "daemon.started", timeout=60)
                await asyncio.sleep(IDLE_SETTLE_S)
                idle = rss_mb(proc.pid)
                async with Producer(Settings(broker_url=url), name="bench-models") as producer:
                    await producer.publish(build_task(
                        TaskType.EMBED_VECTORS, f"{prefix}embed",
                        {"content": {"text": SPOKEN, "type": "caption"},
                         "options": {"backend": "local"}}))
                    await producer.publish(build_task(
                        TaskType.TRANSCRIBE_WHISPER, f"{prefix}transcribe",
                        {"mediaUrl": f"file://{clip}", "options": {"backend": "local"}}))
                await _wait_results(proc, stores, 2, timeout=180, prefix=prefix)
                loaded = rss_mb(proc.pid)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n" + "\n".join(_text(log_path).splitlines()[-15:]))\
                    from None
            finally:
                await _stop(proc)
    return ModelMemory(idle, loaded)


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
