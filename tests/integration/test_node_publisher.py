"""Cross-language proof: a Node.js (amqplib) publisher's messages are valid contract v1 and the
Python daemon processes them.

Needs ``node`` on PATH and ``npm ci --prefix contracts/node`` (``make setup`` does it). Neither
is skipped when missing: the tests fail saying what to run, so CI cannot pass without them.

``publish.mjs --task-type all --count N`` publishes N messages of *each* of the four task types
(4*N in all): N land on ``ml.transcribe``, 2*N on ``ml.summarize`` (summarize_llm and
summarize_video_combined share it) and N on ``ml.embed``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from pathlib import Path

import aio_pika
import pytest

from mlpipe.broker.topology import QUEUES_BY_NAME, Topology, WorkQueue, declare
from mlpipe.contract.codec import decode
from mlpipe.contract.models import TaskType
from mlpipe.settings import Settings
from mlpipe.testing import running_daemon, wait_for
from tests.integration.test_daemon import Recorder

NODE_DIR = Path(__file__).resolve().parents[2] / "contracts" / "node"
PUBLISH_MJS = NODE_DIR / "publish.mjs"
NPM_CI = "run `npm ci --prefix contracts/node` (make setup does)"
PUBLISH_TIMEOUT_S = 60.0

#: Work queue each task type is routed to (no ``options.backend``: the default, non-local ones).
QUEUE_OF = {
    TaskType.TRANSCRIBE_WHISPER: "transcribe",
    TaskType.SUMMARIZE_LLM: "summarize",
    TaskType.SUMMARIZE_VIDEO_COMBINED: "summarize",
    TaskType.EMBED_VECTORS: "embed",
}


def node_executable() -> str:
    """``node``, with amqplib installed next to publish.mjs; fails (never skips) otherwise."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"`node` is not on PATH: install Node.js >= 18, then {NPM_CI}")
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        pytest.fail(f"{NODE_DIR / 'node_modules'} has no amqplib: {NPM_CI}")
    return node


async def run_publish_mjs(*args: str, timeout: float = PUBLISH_TIMEOUT_S) -> tuple[int, str, str]:
    """Run ``node publish.mjs ARGS``; return its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        node_executable(), str(PUBLISH_MJS), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        pytest.fail(f"publish.mjs {' '.join(args)} did not finish within {timeout} s")
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_node_publisher(broker_url: str, count: int, task_type: str = "all") -> dict:
    """Publish with publish.mjs into the topology already declared at ``broker_url``; return its
    summary, ``{"published": n, "confirmed": n}`` (n = count, or 4 * count for ``all``)."""
    rc, out, err = await run_publish_mjs(
        "--url", broker_url, "--count", str(count), "--task-type", task_type)
    assert rc == 0, f"publish.mjs exited {rc}: {err.strip()}"
    summary: dict = json.loads(out.strip().splitlines()[-1])
    return summary


async def declare_topology(broker_url: str, topo: Topology,
                           queues: list[WorkQueue] | None = None) -> None:
    """What the daemon or ``mlpipe topology`` does before any producer publishes."""
    conn = await aio_pika.connect(broker_url)
    try:
        await declare(await conn.channel(), topo, queues)
    finally:
        await conn.close()


async def test_node_messages_follow_the_contract(broker_url: str) -> None:
    topo = Topology()
    await declare_topology(broker_url, topo)

    summary = await run_node_publisher(broker_url, 5, "all")

    assert summary == {"published": 20, "confirmed": 20}
    per_queue: Counter[str] = Counter()
    per_type: Counter[TaskType] = Counter()
    message_ids: set[str] = set()
    conn = await aio_pika.connect(broker_url)
    try:
        ch = await conn.channel()
        for short in ("transcribe", "summarize", "embed"):
            queue = await ch.get_queue(topo.queue_name(short))
            while (m := await queue.get(fail=False, timeout=5)) is not None:
                task = decode(m.body)
                assert QUEUE_OF[task.task_type] == short
                assert m.routing_key == task.task_type.value
                assert m.content_type == "application/json"
                assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                assert m.message_id
                message_ids.add(m.message_id)
                assert m.correlation_id == task.metadata.correlation_id
                assert m.headers["traceparent"] == task.metadata.traceparent
                assert task.metadata.traceparent is not None
                assert task.metadata.traceparent.startswith("00-")
                assert task.metadata.traceparent.endswith("-01")
                assert task.metadata.retry_count == 0
                assert task.share_id.startswith("node-")
                per_queue[short] += 1
                per_type[task.task_type] += 1
                await m.ack()
        for short in ("transcribe_local", "summarize_local", "embed_local"):
            local = await ch.declare_queue(topo.queue_name(short), passive=True)
            assert local.declaration_result.message_count == 0, short
    finally:
        await conn.close()
    assert per_queue == {"transcribe": 5, "summarize": 10, "embed": 5}
    assert per_type == dict.fromkeys(TaskType, 5)
    assert len(message_ids) == 20


async def test_daemon_processes_node_messages(broker_url: str) -> None:
    rec = Recorder()
    settings = Settings(broker_url=broker_url)
    async with running_daemon(settings, rec.registry, "transcribe,summarize,embed"):
        await run_node_publisher(broker_url, 3)
        await wait_for(lambda: len(rec.calls) == 12, timeout=20, message="12 handled")
    assert {c[0] for c in rec.calls} == {t.value for t in TaskType}
    assert all(c[1].startswith("node-") for c in rec.calls)


async def test_missing_exchange_fails_loudly(broker_url: str) -> None:
    # nothing declared in this vhost: publishing to the missing exchange closes the channel
    rc, out, err = await run_publish_mjs(
        "--url", broker_url, "--count", "1", "--task-type", "embed_vectors")
    assert rc == 1, err
    assert "publish failed" in err
    assert "mlpipe.tasks" in err
    assert out == ""


async def test_unroutable_message_returned_fails_loudly(broker_url: str) -> None:
    # the exchange exists but only ml.transcribe is bound: mandatory embed_vectors comes back
    topo = Topology()
    await declare_topology(broker_url, topo, [QUEUES_BY_NAME["transcribe"]])
    rc, out, err = await run_publish_mjs(
        "--url", broker_url, "--count", "2", "--task-type", "embed_vectors")
    assert rc == 1, err
    assert "publish failed: 2 message(s) returned as unroutable" in err
    assert "embed_vectors" in err
    assert out == ""


@pytest.mark.parametrize("args", [
    ("--count", "0"),
    ("--count", "x"),
    ("--task-type", "nope"),
    ("--share-prefix", "bad prefix/"),
    ("--no-such-flag",),
])
async def test_bad_arguments_exit_2(args: tuple[str, ...]) -> None:
    # argument errors are reported before any connection is attempted
    rc, out, err = await run_publish_mjs("--url", "amqp://127.0.0.1:1/", *args)
    assert rc == 2, err
    assert "usage: node publish.mjs" in err
    assert out == ""
