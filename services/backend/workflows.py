"""Versioned workflow recipes in the `workflows` table; a published version never changes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import msgspec

from contracts.api import WorkflowSummary
from contracts.recipe_model import Recipe
from contracts.text import clip
from services.backend.errors import ApiError


@dataclass(frozen=True)
class StoredWorkflow:
    workflow_id: str
    version: int
    recipe: Recipe
    created_at: datetime


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(msgspec.json.encode(recipe)).hexdigest()


def _row(row: asyncpg.Record) -> StoredWorkflow:
    try:
        recipe = msgspec.json.decode(row["recipe"], type=Recipe)
    except msgspec.ValidationError as err:  # stored under older, looser rules (e.g. a control character)
        raise ApiError(409, "workflow_outdated",
                       f"version {row['version']} of {row['workflow_id']} no longer passes the recipe rules"
                       f" ({clip(str(err), 200)}); publish a new version") from None
    return StoredWorkflow(
        workflow_id=row["workflow_id"],
        version=row["version"],
        recipe=recipe,
        created_at=row["created_at"],
    )


async def publish(pool: asyncpg.Pool, recipe: Recipe) -> tuple[StoredWorkflow, bool]:
    """Store `recipe` as the next version; return (stored, created). Equal to latest: not created."""
    digest = recipe_digest(recipe)
    async with pool.acquire() as conn, conn.transaction():
        # Serialise publishers of one workflow id so versions stay dense.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", recipe.workflow_id)
        latest = await conn.fetchrow(
            "SELECT workflow_id, version, recipe::text AS recipe, digest, created_at FROM workflows"
            " WHERE workflow_id = $1 ORDER BY version DESC LIMIT 1",
            recipe.workflow_id,
        )
        if latest is not None and latest["digest"] == digest:
            return _row(latest), False
        version = 1 if latest is None else latest["version"] + 1
        row = await conn.fetchrow(
            "INSERT INTO workflows (workflow_id, version, recipe, digest) VALUES ($1, $2, $3::jsonb, $4)"
            " RETURNING workflow_id, version, recipe::text AS recipe, created_at",
            recipe.workflow_id,
            version,
            msgspec.json.encode(recipe).decode(),
            digest,
        )
        assert row is not None
        return _row(row), True


async def get(pool: asyncpg.Pool, workflow_id: str, version: int | None = None) -> StoredWorkflow | None:
    """The given version, or the latest when `version` is None."""
    row = await pool.fetchrow(
        "SELECT workflow_id, version, recipe::text AS recipe, created_at FROM workflows"
        " WHERE workflow_id = $1 AND ($2::int IS NULL OR version = $2)"
        " ORDER BY version DESC LIMIT 1",
        workflow_id,
        version,
    )
    return None if row is None else _row(row)


async def list_latest(pool: asyncpg.Pool) -> list[WorkflowSummary]:
    """Every workflow with its latest version."""
    rows = await pool.fetch(
        "SELECT DISTINCT ON (workflow_id) workflow_id, version, recipe->>'title' AS title, created_at"
        " FROM workflows ORDER BY workflow_id, version DESC"
    )
    return [WorkflowSummary(workflow_id=r["workflow_id"], latest_version=r["version"], title=r["title"] or "",
                            created_at=r["created_at"].astimezone(UTC).isoformat().replace("+00:00", "Z"))
            for r in rows]
