"""PostgreSQL access shared by the backend and the aggregator: pool and migrations.

Migrations are the ordered `runtime/migrations/NNN_*.sql` files, applied once
each at start-up inside one transaction under an advisory lock, so several
processes starting together do not race.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from importlib.resources.abc import Traversable

import asyncpg
import structlog

from runtime.config import redact_url

log = structlog.get_logger(__name__)

MIGRATIONS: Traversable = files("runtime") / "migrations"  # package data: works from a wheel too
_LOCK_KEY = 0x646F6169  # "doai"


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    return redact_url(dsn)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    try:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(f"cannot reach PostgreSQL at {redact(dsn)}: {exc}") from exc
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, timeout_s: float = 2.0) -> None:
    """Close the pool gracefully, but not for longer than `timeout_s`: an unreachable (hung) server
    must not hold up a stop; then the connections are simply dropped (`terminate`)."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("database pool did not close in time; connections dropped", timeout_s=timeout_s)
        pool.terminate()


def migration_files(folder: Traversable = MIGRATIONS) -> list[tuple[int, Traversable]]:
    """The `NNN_name.sql` files in order; a misnamed file or a number used twice is an error."""
    found: dict[int, Traversable] = {}
    for path in sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name):
        head = path.name.split("_", 1)[0]
        if not head.isdigit() or "_" not in path.name:
            raise RuntimeError(f"migration {path.name}: the name must be NNN_description.sql")
        number = int(head)
        if number in found:
            raise RuntimeError(f"migrations {found[number].name} and {path.name} share the number {number}")
        found[number] = path
    return sorted(found.items())


async def migrate(pool: asyncpg.Pool) -> list[int]:
    """Apply the migrations this database lacks; return their numbers."""
    applied_now: list[int] = []
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for number, path in migration_files():
            if number in done:
                continue
            await conn.execute(path.read_text(encoding="utf-8"))
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
            applied_now.append(number)
    if applied_now:
        log.info("database migrated", applied=applied_now)
    return applied_now


def rows_affected(status: str) -> int:
    """The row count of a command status such as `DELETE 42`."""
    return int(status.split()[-1])


async def delete_in_batches(pool: asyncpg.Pool, sql: str, keep_s: float, batch: int) -> int:
    """Run a `DELETE ... LIMIT $2` statement (older than `$1` seconds) until a batch comes back short.

    Retention loops delete in bounded statements so no transaction holds many row locks
    or blocks the fold for long; returns the rows deleted in all.
    """
    total = 0
    while True:
        n = rows_affected(await pool.execute(sql, keep_s, batch))
        total += n
        if n < batch:
            return total
