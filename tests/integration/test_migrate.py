"""Migrations against the real pgvector Postgres: idempotence, concurrent runners in separate
processes (same schema, and several schemas of a database that has no ``vector`` yet), refusal
of an edited history, rollback of a failing file, that the vector column and its HNSW index
actually work, and that ``migrate --check`` and the daemon's start-up refuse a partly migrated
or edited schema."""

# The fixtures are imported by name so that they override conftest's; pyflakes then sees each
# test parameter as redefining the import.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from mlpipe.store.migrate import ADVISORY_KEY, MigrationError, migrate
from tests.integration.pgfixtures import pg_dsn, pg_fresh_db, pg_schema  # noqa: F401
from tests.integration.test_cli import mlpipe

ROOT = Path(__file__).resolve().parents[2]
ALL = sorted(p.stem for p in (ROOT / "sql").glob("*.sql"))
#: Every table the migrations create, plus the bookkeeping one.
TABLES = {name for p in (ROOT / "sql").glob("*.sql")
          for name in re.findall(r"(?im)^\s*CREATE TABLE\s+(\w+)", p.read_text())}
TABLES.add("mlpipe_migrations")

#: One migrator in its own interpreter; prints what it applied as JSON.
RUNNER = """
import asyncio, json, sys
from mlpipe.store.migrate import migrate
print(json.dumps(asyncio.run(migrate(sys.argv[1], schema=sys.argv[2]))))
"""


async def connect(dsn: str, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, server_settings={"search_path": f"{schema}, public"})


async def tables_in(dsn: str, schema: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)
        return {r["table_name"] for r in rows}
    finally:
        await conn.close()


async def test_applies_everything_once(pg_dsn: str, pg_schema: str) -> None:
    assert ALL, "no migrations found"
    assert await migrate(pg_dsn, schema=pg_schema) == ALL
    assert await migrate(pg_dsn, schema=pg_schema) == []
    assert await tables_in(pg_dsn, pg_schema) == TABLES
    conn = await connect(pg_dsn, pg_schema)
    try:
        recorded = await conn.fetch("SELECT name, checksum FROM mlpipe_migrations ORDER BY 1")
        assert [r["name"] for r in recorded] == ALL
        assert all(len(r["checksum"]) == 64 for r in recorded)
    finally:
        await conn.close()


async def run_concurrently(dsn: str, schemas: list[str]) -> list[list[str]]:
    """One migrator process per entry of ``schemas``, all started while this test holds the
    migration lock, released only once every one of them is queued on it: so they really
    race for it instead of merely starting close together. ``dsn`` must be a database of the
    test's own (advisory locks are per database), or other migrators would be counted."""
    holder = await asyncpg.connect(dsn)
    procs: list[asyncio.subprocess.Process] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", ADVISORY_KEY)
        procs = [await asyncio.create_subprocess_exec(
                     sys.executable, "-c", RUNNER, dsn, schema, cwd=ROOT,
                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                 for schema in schemas]
        for _ in range(300):
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
            if waiting == len(schemas):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"only {waiting} of {len(schemas)} migrators reached the lock")
        await holder.execute("SELECT pg_advisory_unlock($1)", ADVISORY_KEY)
        outputs = [await asyncio.wait_for(p.communicate(), timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await holder.close()
    failed = [err.decode()[-1500:] for p, (_, err) in zip(procs, outputs, strict=True)
              if p.returncode != 0]
    assert not failed, failed
    return [json.loads(out) for out, _ in outputs]


async def test_concurrent_processes_on_one_schema(pg_fresh_db: str) -> None:
    results = await run_concurrently(pg_fresh_db, ["one"] * 3)
    assert sorted(results, key=len) == [[], [], ALL]
    assert await tables_in(pg_fresh_db, "one") == TABLES
    assert await migrate(pg_fresh_db, schema="one") == []


async def test_concurrent_schemas_share_one_extension(pg_fresh_db: str) -> None:
    # A database without `vector`: the first migrator of either schema creates it, the
    # others must find it instead of tripping over pg_extension's unique index.
    results = await run_concurrently(pg_fresh_db, ["s_a", "s_b", "s_a"])
    assert sorted(results, key=len) == [[], ALL, ALL]
    conn = await asyncpg.connect(pg_fresh_db)
    try:
        ext = await conn.fetch(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'vector'")
        assert [r["nspname"] for r in ext] == ["public"]
    finally:
        await conn.close()
    for schema in ("s_a", "s_b"):
        assert await tables_in(pg_fresh_db, schema) == TABLES


def copy_sql(tmp_path: Path) -> Path:
    sql_dir = tmp_path / "sql"
    shutil.copytree(ROOT / "sql", sql_dir)
    return sql_dir


async def test_edited_migration_is_refused_before_anything_runs(
        pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    assert await migrate(pg_dsn, sql_dir, schema=pg_schema) == ALL
    edited = sql_dir / f"{ALL[0]}.sql"
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    (sql_dir / "9999_new.sql").write_text("CREATE TABLE must_not_exist (x int);\n")

    with pytest.raises(MigrationError, match=rf"{ALL[0]}.*changed after they were applied"):
        await migrate(pg_dsn, sql_dir, schema=pg_schema)
    assert "must_not_exist" not in await tables_in(pg_dsn, pg_schema)


async def test_failing_migration_rolls_back_and_can_be_fixed(
        pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    bad = sql_dir / "9999_bad.sql"
    bad.write_text("CREATE TABLE half_done (x int);\nSELECT 1 / 0;\n")

    with pytest.raises(MigrationError, match=r"9999_bad failed .* rolled back"):
        await migrate(pg_dsn, sql_dir, schema=pg_schema)
    assert await tables_in(pg_dsn, pg_schema) == TABLES  # the good ones stay, half_done not

    bad.write_text("CREATE TABLE half_done (x int);\n")  # never applied, so editing is fine
    assert await migrate(pg_dsn, sql_dir, schema=pg_schema) == ["9999_bad"]
    assert "half_done" in await tables_in(pg_dsn, pg_schema)


async def insert_vector(conn: asyncpg.Connection, share: str, vector: list[float]) -> None:
    await conn.execute(
        "INSERT INTO ml_embeddings (share_id, chunk_index, chunk_text, content_hash, model, "
        "dims, embedding, metadata) VALUES ($1, 0, $1, 'h', 'test-model', $2, $3::text::vector, "
        "$4::text::jsonb)",
        share, len(vector), json.dumps(vector), json.dumps({"platform": "test"}))


async def test_vectors_order_by_cosine_distance(pg_dsn: str, pg_schema: str) -> None:
    await migrate(pg_dsn, schema=pg_schema)
    conn = await connect(pg_dsn, pg_schema)
    try:
        await insert_vector(conn, "far", [0.0, 1.0, 0.0])
        await insert_vector(conn, "near", [0.9, 0.1, 0.0])
        rows = await conn.fetch(
            "SELECT share_id, embedding <=> $1::text::vector AS distance FROM ml_embeddings "
            "ORDER BY embedding <=> $1::text::vector", "[1, 0, 0]")
        assert [r["share_id"] for r in rows] == ["near", "far"]
        # vector stores float4: compare at single precision
        assert rows[0]["distance"] == pytest.approx(1 - 0.9 / (0.81 + 0.01) ** 0.5, rel=1e-4)
        assert rows[1]["distance"] == pytest.approx(1.0, rel=1e-6)

        with pytest.raises(asyncpg.CheckViolationError):  # dims must match the vector
            await conn.execute(
                "INSERT INTO ml_embeddings (share_id, chunk_index, chunk_text, content_hash, "
                "model, dims, embedding) VALUES ('x', 0, 'x', 'h', 'm', 2, '[1,2,3]')")
    finally:
        await conn.close()


async def test_hnsw_index_serves_384_dim_queries(pg_dsn: str, pg_schema: str) -> None:
    await migrate(pg_dsn, schema=pg_schema)
    conn = await connect(pg_dsn, pg_schema)
    try:
        for i in range(3):
            await insert_vector(conn, f"s{i}", [float(i + 1)] + [0.5] * 383)
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(r[0] for r in await conn.fetch(
            "EXPLAIN SELECT share_id FROM ml_embeddings WHERE dims = 384 "
            "ORDER BY embedding::vector(384) <=> $1::text::vector(384) LIMIT 2",
            json.dumps([1.0] * 384)))
        assert "ml_embeddings_minilm_hnsw" in plan, plan
    finally:
        await conn.close()


# --- partial and changed schemas: `migrate --check` and the daemon's start-up -----------------


def first_migrations(tmp_path: Path, count: int) -> Path:
    """A migrations directory holding only the first ``count`` files."""
    sql_dir = tmp_path / f"sql_{count}"
    sql_dir.mkdir()
    for name in ALL[:count]:
        shutil.copy(ROOT / "sql" / f"{name}.sql", sql_dir)
    return sql_dir


def schema_env(dsn: str, schema: str) -> dict[str, str]:
    # no broker: the schema check must come before anything needs one
    return {"MLPIPE_DATABASE_URL": dsn, "MLPIPE_DATABASE_SCHEMA": schema,
            "MLPIPE_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/unused"}


async def test_consume_refuses_a_partly_migrated_schema(
        pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    """Only ``ml_results`` and the cost tables exist: the daemon used to start and fail on the
    first embed task. Now it exits at once, naming what is missing."""
    assert await migrate(pg_dsn, first_migrations(tmp_path, 2), schema=pg_schema) == ALL[:2]
    started = time.monotonic()
    code, _, err = await mlpipe("consume", "--queues", "summarize,embed",
                                env=schema_env(pg_dsn, pg_schema))
    elapsed = time.monotonic() - started
    assert code == 1, err
    assert elapsed < 30
    assert f"lacks migration(s) {', '.join(ALL[2:])}" in err, err
    assert "run `mlpipe migrate`" in err


async def test_migrate_check_names_missing_and_changed_migrations(
        pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    env = schema_env(pg_dsn, pg_schema)

    async def check() -> tuple[int, dict[str, object], str]:
        code, out, err = await mlpipe("migrate", "--check", env=env)
        return code, json.loads(out), err

    code, report, err = await check()  # nothing applied yet, and --check applies nothing
    assert (code, report["missing"]) == (1, ALL), err
    assert "mlpipe_migrations" not in await tables_in(pg_dsn, pg_schema)

    await migrate(pg_dsn, first_migrations(tmp_path, 2), schema=pg_schema)
    code, report, err = await check()
    assert (code, report["ok"], report["missing"], report["changed"]) == (1, False, ALL[2:], [])
    assert ", ".join(ALL[2:]) in err

    await migrate(pg_dsn, schema=pg_schema)
    code, report, err = await check()
    assert (code, report) == (0, {"schema": pg_schema, "ok": True, "missing": [],
                                  "changed": [], "unknown": []}), err

    conn = await connect(pg_dsn, pg_schema)
    try:  # as if the file had been edited after it was applied
        await conn.execute("UPDATE mlpipe_migrations SET checksum = 'edited' WHERE name = $1",
                           ALL[0])
    finally:
        await conn.close()
    code, report, err = await check()
    assert (code, report["missing"], report["changed"]) == (1, [], [ALL[0]]), err
    assert f"{ALL[0]} in schema '{pg_schema}' changed after they were applied" in err


async def test_start_up_refuses_a_changed_migration_and_tolerates_a_newer_one(
        pg_dsn: str, pg_schema: str) -> None:
    from mlpipe.effects import Effects
    from mlpipe.settings import Settings
    from tests.conftest import REDIS_URL

    await migrate(pg_dsn, schema=pg_schema)
    settings = Settings(database_url=pg_dsn, database_schema=pg_schema, redis_url=REDIS_URL)
    conn = await connect(pg_dsn, pg_schema)
    try:
        # a newer release migrated first (a rolling deploy): reported, not refused
        await conn.execute("INSERT INTO mlpipe_migrations (version, name, checksum) "
                           "VALUES ('9999', '9999_from_a_newer_release', 'x')")
        effects = await Effects(settings).start()
        await effects.close()
        await conn.execute("UPDATE mlpipe_migrations SET checksum = 'edited' WHERE name = $1",
                           ALL[-1])
    finally:
        await conn.close()
    with pytest.raises(MigrationError, match=rf"{ALL[-1]} .*changed after they were applied"):
        await Effects(settings).start()


async def test_fencing_migration_gives_existing_results_token_0(
        pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    before = ALL.index("0006_fencing")
    await migrate(pg_dsn, first_migrations(tmp_path, before), schema=pg_schema)
    conn = await connect(pg_dsn, pg_schema)
    try:
        await conn.execute("INSERT INTO ml_results (share_id, task_type, result_data) "
                           "VALUES ('old', 'summarize_llm', '{}')")
        assert await migrate(pg_dsn, schema=pg_schema) == ALL[before:]
        assert await conn.fetchval("SELECT fence FROM ml_results WHERE share_id = 'old'") == 0
    finally:
        await conn.close()
