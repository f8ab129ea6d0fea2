"""``mlpipe check`` as an operator runs it, against the real services: all green on a ready
deployment, and a failing exit naming the problem (and its fix) for each way it is not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from mlpipe.store.migrate import Migration, default_sql_dir, load, migrate
from tests.conftest import REDIS_URL
from tests.media_fixtures import whisper_model_dir

MLPIPE = [sys.executable, "-m", "mlpipe.cli"]
QUEUES = "transcribe_local,embed_local,summarize"


def check(env: dict[str, str], queues: str = QUEUES) -> tuple[int, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MLPIPE_")}
    full.update(env, MLPIPE_HTTP_PORT="0")
    out = subprocess.run([*MLPIPE, "check", "--queues", queues], env=full,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def declare_topology(broker_url: str) -> None:
    subprocess.run([*MLPIPE, "topology"], env={**os.environ, "MLPIPE_BROKER_URL": broker_url},
                   check=True, capture_output=True, timeout=60)


def ready_env(broker_url: str, pg_dsn: str, pg_schema: str, model_dir: str) -> dict[str, str]:
    return {"MLPIPE_BROKER_URL": broker_url, "MLPIPE_DATABASE_URL": pg_dsn,
            "MLPIPE_DATABASE_SCHEMA": pg_schema, "MLPIPE_REDIS_URL": REDIS_URL,
            "MLPIPE_WHISPER_MODEL_DIR": str(whisper_model_dir()),
            "MLPIPE_EMBEDDING_MODEL_DIR": model_dir}


def test_a_ready_deployment_passes(broker_url: str, pg_dsn: str, pg_schema: str,
                                   model_dir: str) -> None:
    declare_topology(broker_url)
    code, out = check(ready_env(broker_url, pg_dsn, pg_schema, model_dir))
    assert code == 0, out
    assert "FAIL" not in out
    for name in ("broker", "topology", "redis", "pgvector", "migrations", "models", "ffmpeg"):
        assert f"ok    {name}" in out, (name, out)


def test_missing_topology_and_model_dir_fail_with_the_fix(broker_url: str, pg_dsn: str,
                                                           pg_schema: str, model_dir: str,
                                                           tmp_path: Path) -> None:
    env = ready_env(broker_url, pg_dsn, pg_schema, model_dir)
    code, out = check({**env, "MLPIPE_EMBEDDING_MODEL_DIR": str(tmp_path / "absent")})
    assert code == 1
    assert "FAIL  topology   missing exchange mlpipe.tasks" in out
    assert "run `mlpipe topology`" in out
    assert "MLPIPE_EMBEDDING_MODEL_DIR=" in out
    assert "lacks model.onnx, tokenizer.json" in out
    env.pop("MLPIPE_WHISPER_MODEL_DIR")
    declare_topology(broker_url)
    code, out = check(env)
    assert code == 1
    assert "FAIL  models     transcribe_local needs MLPIPE_WHISPER_MODEL_DIR" in out
    assert "ok    topology" in out


def test_redis_unreachable_fails(broker_url: str, pg_dsn: str, pg_schema: str,
                                 model_dir: str) -> None:
    declare_topology(broker_url)
    env = ready_env(broker_url, pg_dsn, pg_schema, model_dir)
    code, out = check({**env, "MLPIPE_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert code == 1
    assert "FAIL  redis      unreachable" in out
    assert "MLPIPE_REDIS_URL" in out


def test_partially_migrated_schema_fails_naming_the_missing_migrations(
        broker_url: str, pg_dsn: str, model_dir: str, tmp_path: Path) -> None:
    declare_topology(broker_url)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    first_two: list[Migration] = load(default_sql_dir())[:2]
    for m in first_two:
        (tmp_path / f"{m.name}.sql").write_text(m.sql, encoding="utf-8")
    asyncio.run(migrate(pg_dsn, tmp_path, schema=schema))
    try:
        code, out = check(ready_env(broker_url, pg_dsn, schema, model_dir))
    finally:
        asyncio.run(_drop(pg_dsn, schema))
    assert code == 1
    missing = [m.name for m in load(default_sql_dir())[2:]]
    assert f"FAIL  migrations schema {schema!r} lacks migration(s) {', '.join(missing)}" in out


def test_postgres_without_pgvector_fails(broker_url: str, model_dir: str) -> None:
    """The machine's own PostgreSQL 15 (port 5432) has no pgvector."""
    declare_topology(broker_url)
    env = ready_env(broker_url, "postgresql://postgres@127.0.0.1:5432/postgres", "public",
                    model_dir)
    code, out = check(env)
    assert code == 1
    assert "FAIL  pgvector   this server has no pgvector extension" in out


async def _drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


