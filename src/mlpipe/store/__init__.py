"""Postgres: migrations, results, the cost ledger (asyncpg)."""
