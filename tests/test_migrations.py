"""Migrations: applied once each under an advisory lock, even when several processes start together;
the liveness views follow the configured window (real PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from runtime import db
from services.aggregator.main import set_liveness_window


async def test_concurrent_start_ups_apply_each_migration_exactly_once(database_url: str) -> None:
    pools = [await db.create_pool(database_url, max_size=1) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(db.migrate(p) for p in pools))
    finally:
        for p in pools:
            await p.close()
    numbers = [n for n, _ in db.migration_files()]
    assert sorted(n for a in applied for n in a) == numbers, "each migration applied by exactly one process"
    assert len(set(numbers)) == len(numbers)
    conn = await asyncpg.connect(database_url)
    try:
        assert [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")] == numbers
    finally:
        await conn.close()


async def test_liveness_views_use_the_configured_window(database_url: str) -> None:
    pool = await db.create_pool(database_url, max_size=2)
    try:
        await db.migrate(pool)
        now = datetime.now(UTC)
        await pool.execute("INSERT INTO nodes VALUES ('fresh', 20, 3, 0, true, 'v', $1),"
                           " ('old', 20, 5, 0, true, 'v', $2)", now, now - timedelta(seconds=120))
        await pool.execute("INSERT INTO devices VALUES ('fresh', 'A', 'online', '', '', $1),"
                           " ('fresh', 'B', 'online', '', '', $2), ('fresh', 'C', 'gone', '', '', $1)",
                           now, now - timedelta(seconds=120))

        async def view() -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
            devices = [tuple(r) for r in await pool.fetch(
                "SELECT serial, online, liveness FROM device_liveness ORDER BY serial")]
            nodes = [tuple(r) for r in await pool.fetch(
                "SELECT node_id, online, busy_slots, devices_online, devices_listed FROM node_liveness ORDER BY 1")]
            return devices, nodes

        assert await view() == (
            [("A", True, "online"), ("B", False, "stale"), ("C", False, "gone")],
            [("fresh", True, 3, 1, 2), ("old", False, 0, 0, 0)],
        )
        await set_liveness_window(pool, 300)
        assert await view() == (
            [("A", True, "online"), ("B", True, "online"), ("C", False, "gone")],
            [("fresh", True, 3, 2, 2), ("old", True, 5, 0, 0)],
        )
    finally:
        await pool.close()


def test_misnamed_or_duplicate_migrations_are_refused(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("")
    (tmp_path / "002_b.sql").write_text("")
    assert [n for n, _ in db.migration_files(tmp_path)] == [1, 2]
    (tmp_path / "002_c.sql").write_text("")
    with pytest.raises(RuntimeError, match="share the number 2"):
        db.migration_files(tmp_path)
    (tmp_path / "002_c.sql").unlink()
    (tmp_path / "later.sql").write_text("")
    with pytest.raises(RuntimeError, match="NNN_description.sql"):
        db.migration_files(tmp_path)
