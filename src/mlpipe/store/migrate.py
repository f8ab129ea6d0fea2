"""Apply the numbered plain-SQL migrations in ``sql/``.

Each file runs in its own transaction and is recorded in ``mlpipe_migrations`` with a
checksum; everything happens under a database-wide advisory lock, so replicas that start
together apply each migration once and the others wait and then find nothing to do. An applied
file whose checksum changed is refused: migrations are append-only.

The lock key is the same for every schema on purpose: ``CREATE EXTENSION`` is database-wide,
and two sessions creating ``vector`` at once (say, two test schemas migrating side by side)
race on ``pg_extension``'s unique index even with ``IF NOT EXISTS``; serialising all migrators
of a database removes that race.

A file's SQL is sent in one simple-protocol round trip inside the transaction, so it may hold
several statements but not ``BEGIN``/``COMMIT`` or anything that refuses to run in a
transaction block (``CREATE INDEX CONCURRENTLY``, ``ALTER TYPE ... ADD VALUE`` before PG 12).

``inspect_schema`` compares a schema with the files without changing anything: what is
missing, and what changed since it was applied. The daemon refuses to start unless both are
empty (a half migrated schema would fail later, on the first task that needs a missing table
or column), and ``mlpipe migrate --check`` reports it. Migrations applied to the schema that
this release has no file for are a newer release's (a rolling deploy migrates before the old
replicas are gone): reported, not refused, since migrations only add.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg

from mlpipe.errors import MlpipeError
from mlpipe.store.pool import DB

#: Arbitrary but fixed: ``pg_advisory_lock`` key shared by every mlpipe migrator.
ADVISORY_KEY = 0x6D6C70697065  # "mlpipe"
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class MigrationError(MlpipeError):
    reason = "migration_failed"


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class SchemaStatus:
    """How a schema's applied migrations compare with the migration files (names)."""

    schema: str
    #: Files not applied to the schema yet.
    missing: list[str]
    #: Applied, but the file's checksum is not the one recorded then.
    changed: list[str]
    #: Applied, with no file here: a newer release's.
    unknown: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed)

    def problem(self) -> str:
        """What is wrong and what to do, one sentence per kind; empty when ``ok``."""
        parts = []
        if self.missing:
            parts.append(f"schema {self.schema!r} lacks migration(s) {', '.join(self.missing)}: "
                         "run `mlpipe migrate` first")
        if self.changed:
            parts.append(f"migration(s) {', '.join(self.changed)} in schema {self.schema!r} "
                         "changed after they were applied; add a new migration instead of "
                         "editing an applied one")
        return "; ".join(parts)


def default_sql_dir() -> Path:
    """Where the migrations are: the installed wheel's ``mlpipe/sql`` (hatch force-includes
    ``sql/`` there), else the checkout's ``sql/`` beside ``src/`` (an editable install).
    Anything else passes ``sql_dir``; there is deliberately no environment variable, since
    only ``Settings`` reads the environment. The checkout path is returned even when missing
    so that ``load`` names it in its error."""
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "sql"
    return packaged if packaged.is_dir() else here.parents[3] / "sql"


def load(sql_dir: Path) -> list[Migration]:
    if not sql_dir.is_dir():
        raise MigrationError(f"no migrations directory at {sql_dir}")
    found: list[Migration] = []
    for path in sorted(sql_dir.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        # utf-8 explicitly: the checksum must not depend on the locale of whoever runs it
        found.append(Migration(m.group(1), path.stem, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration numbers in {sql_dir}")
    return found


async def migrate(dsn: str, sql_dir: Path | None = None, *,
                  schema: str | None = None) -> list[str]:
    """Bring ``schema`` (``public`` when None) up to date; return the names of the migrations
    applied by this call, empty when another process got there first.

    A schema other than ``public`` is created if missing and the session's ``search_path`` is
    ``<schema>, public``: the tables land in the schema while the ``vector`` type, which lives
    in ``public``, still resolves. ``sql_dir`` defaults to ``default_sql_dir()``.
    """
    migrations = load(sql_dir or default_sql_dir())
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "mlpipe-migrate"})
    try:
        # Session-level, so it spans the per-file transactions; closing the connection
        # releases it even when an error or a cancellation skips the explicit unlock.
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_KEY)
        applied = await _apply(conn, migrations, schema or "public")
        await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_KEY)
        return applied
    finally:
        await conn.close()


async def check(dsn: str, sql_dir: Path | None = None, *,
                schema: str | None = None) -> SchemaStatus:
    """``inspect_schema`` on a connection of its own (``mlpipe migrate --check``)."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "mlpipe-migrate"})
    try:
        return await inspect_schema(conn, schema or "public", load(sql_dir or default_sql_dir()))
    finally:
        await conn.close()


async def inspect_schema(conn: DB, schema: str,
                         migrations: list[Migration] | None = None) -> SchemaStatus:
    """Compare ``schema`` with ``migrations`` (default: the files of ``default_sql_dir()``),
    read-only. A schema without the bookkeeping table lacks every migration."""
    if migrations is None:
        migrations = load(default_sql_dir())
    table = f"{_quote(schema)}.mlpipe_migrations"
    applied: dict[str, tuple[str, str]] = {}
    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        applied = {r["version"]: (r["name"], r["checksum"]) for r in await conn.fetch(
            f"SELECT version, name, checksum FROM {table}")}
    return _compare(schema, migrations, applied)


def _compare(schema: str, migrations: list[Migration],
             applied: dict[str, tuple[str, str]]) -> SchemaStatus:
    """``applied``: version -> (name, checksum) as recorded in ``mlpipe_migrations``."""
    known = {m.version for m in migrations}
    return SchemaStatus(
        schema,
        missing=[m.name for m in migrations if m.version not in applied],
        changed=[m.name for m in migrations
                 if m.version in applied and applied[m.version][1] != m.checksum],
        unknown=[name for version, (name, _) in sorted(applied.items())
                 if version not in known])


async def _apply(conn: asyncpg.Connection, migrations: list[Migration],
                 schema: str) -> list[str]:
    ident = _quote(schema)
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {ident}")
    path = ident if schema == "public" else f"{ident}, public"
    await conn.execute(f"SET search_path TO {path}")
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS mlpipe_migrations (
               version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())""")
    applied = {r["version"]: (r["name"], r["checksum"]) for r in await conn.fetch(
        "SELECT version, name, checksum FROM mlpipe_migrations")}
    # Check every applied file before running any pending one, so an edited history stops
    # the run with nothing changed rather than half-way.
    status = _compare(schema, migrations, applied)
    if status.changed:  # the missing ones are what this run is for, not a problem
        raise MigrationError(replace(status, missing=[]).problem())
    done: list[str] = []
    for m in migrations:
        if m.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO mlpipe_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)", m.version, m.name, m.checksum)
        except asyncpg.PostgresError as exc:
            raise MigrationError(
                f"migration {m.name} failed in schema {schema} and was rolled back "
                f"(applied before it: {done or 'none'}): {type(exc).__name__}: {exc}"
            ) from exc
        done.append(m.name)
    return done


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
