"""SIGTERM drains: running handlers finish, unstarted deliveries go back, exit code 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from mlpipe.contract.models import TaskType, build_task
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.testing import wait_for

ROOT = Path(__file__).resolve().parents[2]


def lines(path: Path, kind: str) -> list[str]:
    if not path.exists():
        return []
    return [ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith(kind)]


async def start_daemon(effects_env: dict[str, str], log: Path, *extra: str,
                       env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "--log-json", "consume", "--queues", "summarize",
        "--handlers", "tests.integration.slow_handlers:build_registry", *extra,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **effects_env,
             "TEST_HANDLER_LOG": str(log), "TEST_HANDLER_SLEEP_S": "1.5",
             "MLPIPE_QUEUES__SUMMARIZE": '{"prefetch": 4, "concurrency": 2}',
             "MLPIPE_SHUTDOWN_GRACE_S": "20", **(env or {})},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


async def test_sigterm_finishes_in_flight_and_requeues_the_rest(
        effects_env: dict[str, str], tmp_path: Path) -> None:
    broker_url = effects_env["MLPIPE_BROKER_URL"]
    log = tmp_path / "handlers.log"
    settings = Settings(broker_url=broker_url)
    shares = [f"share-{i}" for i in range(8)]
    async with Producer(settings) as p:
        for s in shares:
            await p.publish(build_task(TaskType.SUMMARIZE_LLM, s, {"content": {"text": s * 10}}))

    first = await start_daemon(effects_env, log)
    await wait_for(lambda: len(lines(log, "start")) == 2, timeout=30, message="2 running")
    first.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(first.communicate(), timeout=30)
    assert first.returncode == 0, err.decode()[-2000:]
    started, done = lines(log, "start"), lines(log, "done")
    assert len(started) == 2
    assert sorted(done) == sorted(started), "in-flight handlers must finish before exit"

    second = await start_daemon(effects_env, log)
    try:
        await wait_for(lambda: len(lines(log, "done")) == len(shares), timeout=60,
                       message="second daemon handled the rest")
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.communicate(), timeout=30)
    assert second.returncode == 0
    assert sorted(lines(log, "done")) == sorted(shares)  # each exactly once


async def test_worker_recycles_after_max_tasks(effects_env: dict[str, str],
                                               tmp_path: Path) -> None:
    broker_url = effects_env["MLPIPE_BROKER_URL"]
    log = tmp_path / "handlers.log"
    settings = Settings(broker_url=broker_url)
    async with Producer(settings) as p:
        for i in range(6):
            await p.publish(build_task(TaskType.SUMMARIZE_LLM, f"r{i}",
                                       {"content": {"text": "z" * 60}}))
    proc = await start_daemon(effects_env, log, env={"MLPIPE_MAX_TASKS": "3",
                                                    "TEST_HANDLER_SLEEP_S": "0.05"})
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 3, err.decode()[-2000:]  # EXIT_RECYCLED
    assert b'"reason": "max_tasks"' in err or b"max_tasks" in err
    assert 3 <= len(lines(log, "done")) < 6
