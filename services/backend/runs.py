"""Creating a run (rows + outbox in one transaction) and reading its state."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from contracts.api import ArtifactView, RunCreate, RunView, TaskView
from contracts.commands import RunBroadcast
from contracts.recipe import RecipeInvalid, resolve_step_timeouts, validate_params
from contracts.subjects import cmd_subject
from services.backend import targets as targeting
from services.backend import workflows
from services.backend.errors import ApiError, invalid


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def broadcast_msg_id(run_id: str, node_id: str) -> str:
    return f"run-{run_id}-{node_id}"


async def create_run(
    pool: asyncpg.Pool, body: RunCreate, stale_s: float = 60.0
) -> tuple[str, int, list[dict[str, str]]]:
    """Validate, resolve targets and store a run with its broadcasts; return (run_id, n, rejected)."""
    chosen = body.targets.chosen()
    if len(chosen) != 1:
        raise ApiError(422, "invalid", "targets must name exactly one of: devices, nodes, all_online",
                       [{"path": "$.targets", "message": f"got {chosen or 'none'}"}])
    stored = await workflows.get(pool, body.workflow_id, body.workflow_version)
    if stored is None:
        what = body.workflow_id + (f" version {body.workflow_version}" if body.workflow_version else "")
        raise ApiError(404, "workflow_not_found", f"unknown workflow {what}")
    try:
        params = validate_params(stored.recipe, body.params)
        timeouts = resolve_step_timeouts(stored.recipe, body.step_timeouts_ms)
    except RecipeInvalid as err:
        raise invalid("run does not fit the workflow", err.faults) from None
    run_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        resolution = await targeting.resolve(conn, body.targets, stale_s)
        if resolution.count == 0:
            raise ApiError(422, "no_targets", "the targets resolve to no online device",
                           resolution.rejected)
        await conn.execute(
            "INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms,"
            " status, created_at) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, 'pending', $6)",
            run_id, stored.workflow_id, stored.version,
            msgspec.json.encode(params).decode(), msgspec.json.encode(timeouts).decode(), now,
        )
        nodes = sorted(resolution.by_node)
        await conn.executemany(
            "INSERT INTO run_tasks (run_id, node_id, device_serial) VALUES ($1, $2, $3)",
            [(run_id, n, s) for n in nodes for s in resolution.by_node[n]],
        )
        outbox_rows = []
        for node_id in nodes:
            broadcast = RunBroadcast(
                run_id=run_id, node_id=node_id, workflow_id=stored.workflow_id,
                workflow_version=stored.version, recipe=stored.recipe, params=params,
                step_timeouts_ms=timeouts, devices=resolution.by_node[node_id], created_at=now,
            )
            outbox_rows.append((run_id, node_id, cmd_subject(node_id),
                                broadcast_msg_id(run_id, node_id), msgspec.json.encode(broadcast)))
        await conn.executemany(
            "INSERT INTO outbox (run_id, node_id, subject, msg_id, payload) VALUES ($1, $2, $3, $4, $5)",
            outbox_rows,
        )
    return run_id, resolution.count, resolution.rejected


def parse_run_id(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        raise ApiError(404, "run_not_found", f"unknown run {run_id!r}") from None


async def get_run(pool: asyncpg.Pool, run_id: str) -> RunView:
    rid = parse_run_id(run_id)
    async with pool.acquire() as conn:
        run = await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", rid)
        if run is None:
            raise ApiError(404, "run_not_found", f"unknown run {run_id}")
        tasks = await conn.fetch(
            "SELECT * FROM run_tasks WHERE run_id = $1 ORDER BY node_id, device_serial", rid
        )
        arts = await conn.fetch(
            "SELECT * FROM artifacts WHERE run_id = $1 ORDER BY created_at, key", rid
        )
    by_task: dict[tuple[str, str], list[ArtifactView]] = {}
    for a in arts:
        by_task.setdefault((a["node_id"], a["device_serial"]), []).append(
            ArtifactView(a["step_id"], a["store"], a["key"], a["uri"], a["bytes"])
        )
    counts: dict[str, int] = {}
    views = []
    for t in tasks:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
        views.append(TaskView(
            node_id=t["node_id"], device_serial=t["device_serial"], state=t["state"],
            attempt=t["attempt"], started_at=iso(t["started_at"]), finished_at=iso(t["finished_at"]),
            error=t["error"], artifacts=by_task.get((t["node_id"], t["device_serial"]), []),
        ))
    return RunView(
        run_id=str(run["run_id"]), workflow_id=run["workflow_id"],
        workflow_version=run["workflow_version"], status=run["status"],
        created_at=iso(run["created_at"]) or "", counts=counts, tasks=views,
    )


async def list_devices(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM devices ORDER BY node_id, serial")
    return [
        {"node_id": r["node_id"], "serial": r["serial"], "status": r["status"], "model": r["model"],
         "last_seen": iso(r["last_seen"])}
        for r in rows
    ]


async def list_nodes(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch("SELECT * FROM nodes ORDER BY node_id")
    return [
        {"node_id": r["node_id"], "slots": r["slots"], "running": r["running"],
         "queued": r["queued"], "vendor_connected": r["vendor_connected"],
         "version": r["version"], "last_seen": iso(r["last_seen"])}
        for r in rows
    ]
