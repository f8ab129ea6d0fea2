"""The command line, run as a user would: separate processes, environment configuration."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg

from mlpipe.producer import Producer
from mlpipe.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


async def mlpipe(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mlpipe.cli", "--log-json", *args, cwd=ROOT,
        env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_topology_publish_file_and_dlq(broker_url: str, tmp_path: Path) -> None:
    env = {"MLPIPE_BROKER_URL": broker_url}
    code, out, err = await mlpipe("topology", env=env)
    assert code == 0, err
    topo = json.loads(out)
    assert "ml.transcribe_local" in topo["queues"]
    assert topo["deadLetterQueue"] == "mlpipe.dead"

    jsonl = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"taskType": "embed_vectors", "shareId": f"f{i}",
                         "payload": {"content": {"text": f"text {i}"}}}) for i in range(20)]
    jsonl.write_text("\n".join(lines) + "\n")
    code, out, err = await mlpipe("publish", "--file", str(jsonl), env=env)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1]) == {"published": 20, "failed": 0}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"taskType": "embed_vectors", "shareId": "x", "payload": {}}\n')
    code, _, err = await mlpipe("publish", "--file", str(bad), env=env)
    assert code == 2
    assert "bad.jsonl:1" in err

    code, out, _ = await mlpipe("dlq", "list", "--json", env=env)
    assert (code, out) == (0, "")
    code, _, err = await mlpipe("dlq", "replay", env=env)
    assert code == 2
    assert "say which" in err


async def test_unknown_queue_and_setting_are_usage_errors(broker_url: str) -> None:
    code, _, err = await mlpipe("consume", "--queues", "transcribe,nope",
                                env={"MLPIPE_BROKER_URL": broker_url})
    assert code == 2
    assert "unknown queue" in err
    code, _, err = await mlpipe("topology", env={"MLPIPE_BROKER_URL": broker_url,
                                                 "MLPIPE_MAX_TASK": "3"})
    assert code == 2
    assert "MLPIPE_MAX_TASK" in err


async def test_costs_report(pg_dsn: str, pg_schema: str) -> None:
    conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": pg_schema})
    try:
        await conn.executemany(
            "INSERT INTO ml_costs (task_type, model, units, unit_kind, usd) "
            "VALUES ($1, $2, $3, $4, $5)",
            [("transcribe_whisper", "whisper-1", 60, "audio_seconds", Decimal("0.006")),
             ("transcribe_whisper", "whisper-1", 120, "audio_seconds", Decimal("0.012")),
             ("summarize_llm", "gpt-4o-mini", 1500, "tokens", Decimal("0.0009"))])
    finally:
        await conn.close()
    env = {"MLPIPE_DATABASE_URL": pg_dsn, "MLPIPE_DATABASE_SCHEMA": pg_schema}
    code, out, err = await mlpipe("costs", "--json", env=env)
    assert code == 0, err
    report = json.loads(out)
    by_type = {r["task_type"]: r for r in report["spend"]}
    assert Decimal(by_type["transcribe_whisper"]["usd"]) == Decimal("0.018")
    assert by_type["transcribe_whisper"]["calls"] == 2
    budget = {b["taskType"]: b for b in report["budgets"]}["transcribe_whisper"]
    assert budget["hourlyLimitUsd"] == 1.0
    assert budget["hourUsedPct"] == 1.8
    code, out, _ = await mlpipe("costs", env=env)
    assert code == 0
    assert "whisper-1" in out


async def test_publish_one_task_from_flags(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url)
    async with Producer(settings):
        pass  # topology
    code, out, err = await mlpipe(
        "publish", "--task-type", "summarize_llm", "--share-id", "cli-1", "--payload",
        json.dumps({"content": {"text": "Published from the command line, long enough."}}),
        env={"MLPIPE_BROKER_URL": broker_url})
    assert code == 0, err
    assert json.loads(out)["routingKey"] == "summarize_llm"
