"""A producer-only install: the wheel with no extras, in a fresh virtual environment, imports
mlpipe and publishes a confirmed task to the real broker; numpy, onnxruntime, faster-whisper
and the provider SDKs are not there at all."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import aio_pika

from mlpipe.broker.topology import Topology
from tests.unit.test_deploy import HANDLER_ONLY, wheel_env

PUBLISH = """
import asyncio, importlib.util, json
from mlpipe import Producer, Settings, build_task

async def main():
    async with Producer(Settings()) as producer:
        task = build_task("summarize_llm", "light-1", {"content": {"text": "published light"}})
        receipt = await producer.publish(task)
    missing = [m for m in ("numpy", "onnxruntime", "faster_whisper", "openai", "aiobotocore")
               if importlib.util.find_spec(m) is None]
    print(json.dumps({"messageId": receipt.message_id, "absent": missing}))

asyncio.run(main())
"""


async def test_a_producer_only_install_publishes(tmp_path: Path, broker_url: str) -> None:
    env = wheel_env(tmp_path)
    assert not HANDLER_ONLY & env.lent
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MLPIPE_") and k not in ("PYTHONPATH", "PYTHONHOME")}
    out = await asyncio.to_thread(
        subprocess.run, [str(env.python), "-c", PUBLISH], cwd=tmp_path, capture_output=True,
        text=True, timeout=120, check=False,
        env={**clean, "MLPIPE_BROKER_URL": broker_url, "MLPIPE_HTTP_PORT": "0"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["absent"] == ["numpy", "onnxruntime", "faster_whisper", "openai",
                                "aiobotocore"]
    conn = await aio_pika.connect(broker_url)
    try:
        channel = await conn.channel()
        queue = await channel.get_queue(Topology().queue_name("summarize"), ensure=True)
        message = await queue.get(timeout=10)
        assert message is not None
        await message.ack()
    finally:
        await conn.close()
    assert message.message_id == report["messageId"]
    assert json.loads(message.body)["shareId"] == "light-1"
