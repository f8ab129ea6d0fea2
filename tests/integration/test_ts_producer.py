"""The TypeScript producer (contracts/node) end to end: its Node test runner suite publishes
tasks to the real broker while an in-process daemon consumes them, and the daemon's effects
layer stores a result in Postgres for every task the TypeScript side saw confirmed.

Also the generated TypeScript types: ``npm run gen-types -- --check`` fails on a stale
``src/contract.ts``, and on a changed JSON Schema.

Needs ``node`` and ``npm ci --prefix contracts/node`` (``make setup``); a missing one fails
the test, saying what to run, never skips it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from mlpipe.broker.topology import Topology
from mlpipe.contract.models import CONTRACT_VERSION, Task, TaskType
from mlpipe.effects import Effects
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL

NODE_DIR = Path(__file__).resolve().parents[2] / "contracts" / "node"
CONTRACTS = NODE_DIR.parent
SETUP = "run `make setup` (it runs `npm ci` in contracts/node)"
NPM_TIMEOUT_S = 240.0
ALL_QUEUES = "transcribe,summarize,embed,transcribe_local,summarize_local,embed_local"


def _npm() -> str:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail(f"node/npm not on PATH: install Node.js >= 18 (scripts/system-deps), {SETUP}")
    if not (NODE_DIR / "node_modules" / "typescript").is_dir():
        pytest.fail(f"{NODE_DIR / 'node_modules'} lacks the dev dependencies: {SETUP}")
    return npm


async def _run(*args: str, env: dict[str, str] | None = None,
               timeout: float = NPM_TIMEOUT_S) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=NODE_DIR, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"{' '.join(args)} did not finish within {timeout} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Stored:
    """Handlers for every task type that return what they were given; the effects executor
    stores it in ``ml_results`` like any handler's result."""

    def __init__(self) -> None:
        self.registry = Registry()
        for task_type in TaskType:
            self.registry.register(task_type, self._handle)

    async def _handle(self, task: Task, ctx: TaskContext) -> HandlerResult:
        return HandlerResult({"shareId": task.share_id, "taskType": task.task_type.value,
                              "correlationId": task.metadata.correlation_id,
                              "version": task.version, "queue": ctx.queue})


async def test_npm_test_publishes_and_the_daemon_stores_results(
        broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str,
        tmp_path: Path) -> None:
    npm = _npm()
    settings = Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                        redis_url=REDIS_URL, lock_prefix=lock_prefix,
                        retry=RetryPolicy(max_retries=2, base_delay_s=0.2, max_delay_s=1.0))
    published_file = tmp_path / "published.jsonl"
    handlers = Stored()
    async with Effects(settings) as effects, \
            running_daemon(settings, handlers.registry, ALL_QUEUES,
                           executor=effects.executor) as daemon:
        rc, out, err = await _run(npm, "test", env={
            "MLPIPE_TEST_BROKER_URL": broker_url,
            "MLPIPE_TEST_PUBLISHED": str(published_file)})
        assert rc == 0, f"npm test failed:\n{out[-6000:]}\n{err[-3000:]}"
        published = [json.loads(line) for line in published_file.read_text().splitlines()]
        await wait_for(lambda: daemon.status().tasks_done >= len(published), timeout=60,
                       message=f"{len(published)} TypeScript-published tasks handled")
        assert effects.pool is not None
        rows = await effects.pool.fetch(
            "SELECT share_id, task_type, result_data FROM ml_results WHERE share_id LIKE 'ts-%'")

    # every test of the node suite ran and passed (node --test prints a summary)
    assert re.search(r"\bpass 8\b", out), out[-3000:]
    assert re.search(r"\bfail 0\b", out), out[-3000:]
    # 5 of each kind + 20 concurrent + after-unroutable + after-close + the one-shot publish
    assert len(published) == 28
    stored = {(r["share_id"], r["task_type"]): r["result_data"] for r in rows}
    expected = {(p["shareId"], p["taskType"]): p for p in published}
    assert set(stored) == set(expected)
    for key, data in stored.items():
        assert data["correlationId"] == expected[key]["correlationId"]
        assert data["version"] == CONTRACT_VERSION
    queues = {data["queue"] for data in stored.values()}
    assert {"ml.transcribe", "ml.summarize", "ml.embed", "ml.summarize_local"} <= queues
    # the refused, unroutable and timed-out publishes reached no work queue
    assert not [s for s, _ in stored if s.endswith(("-lost", "-nowhere", "-refused", "-slow"))]
    assert daemon.status().tasks_done == 28


@pytest.fixture
def node_ready() -> str:
    return _npm()


@pytest.mark.usefixtures("node_ready")
async def test_generated_types_are_current() -> None:
    rc, _, err = await _run("node", "scripts/gen-types.mjs", "--check")
    assert rc == 0, f"src/contract.ts is stale: run `npm run gen-types` in contracts/node\n{err}"


@pytest.mark.usefixtures("node_ready")
async def test_a_changed_schema_is_type_drift(tmp_path: Path) -> None:
    for name in ("task.schema.json", "result_event.schema.json"):
        shutil.copy(CONTRACTS / name, tmp_path / name)
    out_file = tmp_path / "contract.ts"
    shutil.copy(NODE_DIR / "src" / "contract.ts", out_file)
    args = ("node", "scripts/gen-types.mjs", "--schemas", str(tmp_path), "--out", str(out_file))
    assert (await _run(*args, "--check"))[0] == 0  # the copies generate the committed file

    schema: dict[str, Any] = json.loads((tmp_path / "task.schema.json").read_text())
    schema["$defs"]["Metadata"]["properties"]["priority"] = {"type": "integer"}
    schema["$defs"]["Metadata"]["required"].append("priority")
    (tmp_path / "task.schema.json").write_text(json.dumps(schema))
    rc, _, err = await _run(*args, "--check")
    assert rc == 1
    assert "out of date" in err
    assert (await _run(*args))[0] == 0
    assert re.search(r"priority: number;", out_file.read_text())


def test_stamped_contract_version_matches_the_models() -> None:
    source = (NODE_DIR / "src" / "index.ts").read_text()
    assert f'export const CONTRACT_VERSION = "{CONTRACT_VERSION}";' in source
    assert 'DEFAULT_EXCHANGE = "' + Topology().tasks_exchange + '"' in source

