"""Postgres fixtures for tests that drive migrations themselves.

Import them into a test module (``from tests.integration.pgfixtures import pg_dsn, pg_schema``);
they then take precedence over the same-named fixtures of ``tests/conftest.py`` in that module
only. The difference that matters: ``pg_schema`` here is a fresh *name* (the schema does not
exist yet and nothing is migrated), because the tests using it are about what ``migrate`` does
to an empty schema; conftest's ``pg_schema`` hands out an already migrated one.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pgvector-server"


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The pgvector Postgres of ``scripts/pgvector-server``, started once per session if it is
    not running (``start`` is idempotent and returns once connections are accepted)."""
    subprocess.run(["bash", str(SCRIPT), "start"], check=True, capture_output=True, timeout=180)
    out = subprocess.run(["bash", str(SCRIPT), "url"], check=True, capture_output=True,
                         text=True, timeout=30)
    return out.stdout.strip()


@pytest.fixture
async def pg_schema(pg_dsn: str) -> AsyncIterator[str]:
    """A schema name of this test's own, not yet created; dropped (if it was) afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield schema
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def pg_fresh_db(pg_dsn: str) -> AsyncIterator[str]:
    """DSN of a new, empty database (no ``vector`` extension yet), dropped afterwards. Advisory
    locks are per database, so a test here sees only its own lock holders and waiters."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    base, _, _ = pg_dsn.rpartition("/")
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield f"{base}/{name}"
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()
