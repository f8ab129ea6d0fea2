"""Metrics match what ran; readiness follows the broker connection; logs are JSON with the
task's fields and traceparent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.errors import PermanentError, TransientError
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from tests.integration.test_resilience import close_all_connections

ROOT = Path(__file__).resolve().parents[2]
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def registry() -> Registry:
    reg = Registry()
    attempts: dict[str, int] = {}

    @reg.handler(TaskType.EMBED_VECTORS)
    async def handle(task: Task, ctx: TaskContext) -> HandlerResult:
        attempts[task.share_id] = attempts.get(task.share_id, 0) + 1
        if task.share_id == "perm":
            raise PermanentError("nope", reason="content_too_short")
        if task.share_id == "flaky" and attempts["flaky"] == 1:
            raise TransientError("blip", reason="api_unavailable")
        return HandlerResult({})

    return reg


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def get(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status


async def test_metrics_match_what_ran(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, http_port=0,
                        retry=RetryPolicy(max_retries=2, base_delay_s=0.1, max_delay_s=0.5))
    async with running_daemon(settings, registry(), "embed") as daemon, Producer(settings) as p:
        for share in ("ok1", "ok2", "ok3", "perm", "flaky"):
            await p.publish(build_task(TaskType.EMBED_VECTORS, share, {"content": {"text": "t"}}))
        await wait_for(lambda: daemon.status().tasks_done == 6, message="6 settled")
        assert daemon.http is not None
        assert daemon.http.port
        m = await scrape(daemon.http.port)
    q = (("queue", "ml.embed"), ("task_type", "embed_vectors"))

    def tasks(outcome: str) -> float:
        return m.get(("mlpipe_tasks_total", tuple(sorted((*q, ("outcome", outcome))))), 0)

    assert (tasks("ack"), tasks("retry"), tasks("dead_letter")) == (4, 1, 1)
    assert m[("mlpipe_task_duration_seconds_count", q)] == 6
    assert m[("mlpipe_retries_total", (("reason", "api_unavailable"),
                                       ("task_type", "embed_vectors")))] == 1
    assert m[("mlpipe_dead_letters_total", (("reason", "content_too_short"),
                                            ("task_type", "embed_vectors")))] == 1
    assert m[("mlpipe_tasks_in_flight", (("queue", "ml.embed"),))] == 0
    assert m[("mlpipe_consuming", (("queue", "ml.embed"),))] == 1
    assert m[("mlpipe_broker_connected", (("connection", "consume"),))] == 1


async def test_readyz_follows_the_broker_connection(broker_url: str, vhost: str) -> None:
    settings = Settings(broker_url=broker_url, http_port=0, reconnect_base_s=2.0,
                        reconnect_max_s=4.0)
    async with running_daemon(settings, registry(), "embed") as daemon:
        assert daemon.http is not None
        assert daemon.http.port
        port = daemon.http.port
        assert (await get(port, "/readyz"), await get(port, "/healthz")) == (200, 200)
        await close_all_connections(vhost)
        loop = asyncio.get_running_loop()
        closed_at = loop.time()
        await wait_for(lambda: _status_is(port, "/readyz", 503), timeout=5,
                       message="readyz 503 within 5 s")
        assert loop.time() - closed_at < 5
        assert await get(port, "/healthz") == 200
        await wait_for(lambda: _status_is(port, "/readyz", 200), timeout=30,
                       message="ready again after the reconnect")
        assert await get(port, "/healthz") == 200


async def _status_is(port: int, path: str, code: int) -> bool:
    return await get(port, path) == code


async def test_task_logs_are_json_with_bound_fields_and_traceparent(
        effects_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "runs.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "--log-json", "consume", "--queues", "summarize",
        "--handlers", "tests.integration.slow_handlers:build_registry", cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **effects_env,
             "TEST_HANDLER_LOG": str(log), "TEST_HANDLER_SLEEP_S": "0.05"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    err: list[bytes] = []

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            err.append(line)

    reader = asyncio.create_task(read_stderr())
    settings = Settings(broker_url=effects_env["MLPIPE_BROKER_URL"])
    async with Producer(settings) as p:
        await p.publish(build_task(TaskType.SUMMARIZE_LLM, "logged",
                                   {"content": {"text": "Some text that is long enough."}},
                                   correlation_id="corr-logged", traceparent=TRACE))
    await wait_for(lambda: log.exists() and "done logged" in log.read_text(), timeout=30)
    await wait_for(lambda: any(b'"task.done"' in line and b'"logged"' in line for line in err),
                   timeout=30, message="task.done logged")
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(reader, proc.wait()), timeout=30)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err if line.strip()]
    task_lines = [e for e in lines if e.get("share_id") == "logged"]
    assert {e["event"] for e in task_lines} >= {"task.done"}
    for e in task_lines:
        assert e["correlation_id"] == "corr-logged"
        assert e["task_type"] == "summarize_llm"
        assert e["attempt"] == 1
        assert e["queue"] == "ml.summarize"
        assert e["traceparent"] == TRACE
