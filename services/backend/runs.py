"""Runs: creation (rows + outbox in one transaction, idempotent by key), cancellation and reads."""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import asyncpg
import msgspec

from contracts.api import (
    ArtifactLink,
    DeviceView,
    FailingStep,
    NodeCounts,
    NodeView,
    Rejection,
    RunCancelled,
    RunCreate,
    RunCreated,
    RunOutcome,
    RunPage,
    RunStatus,
    RunSummary,
    RunTimings,
    RunView,
    StepView,
    TaskDetail,
    TaskPage,
    TaskRow,
)
from contracts.artifact_path import DEFAULT_PATH_TEMPLATE
from contracts.artifact_path import check_params as check_path_params
from contracts.commands import RunBroadcast, RunCancel
from contracts.events import RecordedTaskState
from contracts.recipe_check import (
    Fault,
    RecipeInvalid,
    check_assert_patterns,
    check_int_params,
    resolve_step_timeouts,
    validate_params,
)
from contracts.recipe_model import Recipe, Upload
from contracts.subjects import cmd_subject
from contracts.text import clip
from services.backend import targets as targeting
from services.backend import workflows
from services.backend.errors import ApiError, invalid
from services.backend.settings import IDEMPOTENCY_TTL_S


class ArtifactLinks(Protocol):
    """What makes download links for artifact rows (services/backend/artifact_links.py)."""

    async def links(self, rows: Sequence[asyncpg.Record], base_url: str | None = None) -> list[ArtifactLink]: ...


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def broadcast_msg_id(run_id: str, node_id: str) -> str:
    return f"run-{run_id}-{node_id}"


def cancel_msg_id(run_id: str, node_id: str) -> str:
    return f"cancel-{run_id}-{node_id}"


def request_digest(body: RunCreate) -> str:
    """Digest of the decoded request (key order and whitespace do not matter)."""
    return hashlib.sha256(msgspec.json.encode(msgspec.to_builtins(body), order="sorted")).hexdigest()


class _KeyTaken(Exception):
    """Another request committed the same idempotency key while this one was being made."""


@dataclass
class Created:
    response: RunCreated
    replayed: bool  # an earlier request with the same Idempotency-Key made this run


async def _replay(pool: asyncpg.Pool, key: str, digest: str, ttl_s: float) -> Created | None:
    row = await pool.fetchrow("SELECT request_digest, response::text AS response FROM idempotency_keys"
                              " WHERE key = $1 AND created_at >= now() - make_interval(secs => $2)", key, ttl_s)
    if row is None:
        return None
    if row["request_digest"] != digest:
        raise ApiError(409, "idempotency_key_reused",
                       "this Idempotency-Key was used with a different request body")
    return Created(msgspec.json.decode(row["response"], type=RunCreated), replayed=True)


def check_run_params(recipe: Recipe, params: dict[str, str], path_template: str) -> None:
    """What the nodes would only find out after a device did its work: bad artifact path segments, assert
    patterns the params make invalid. `RecipeInvalid` with each fault at `$.params.<name>`."""
    faults = check_assert_patterns(recipe, params) + check_int_params(recipe, params)
    if any(isinstance(step, Upload) for step in recipe.steps):
        faults += [Fault(f"$.params.{name}", problem) for name, problem in check_path_params(path_template, params)]
    if faults:
        raise RecipeInvalid(faults)


async def create_run(
    pool: asyncpg.Pool, body: RunCreate, idempotency_ttl_s: float = IDEMPOTENCY_TTL_S,
    idempotency_key: str | None = None, path_template: str = DEFAULT_PATH_TEMPLATE, *,
    parent_run_id: str | None = None, digest: str | None = None,
) -> Created:
    """Validate, resolve targets and store a run with its broadcasts.

    An `Idempotency-Key` is remembered for `idempotency_ttl_s` (7 days by default): within it the same
    key replays the first response (or is refused with another body); after it the key is new again.
    A retry (`services.backend.retry`) passes the run it retries and the digest of its own request.
    """
    digest = digest or request_digest(body)
    if idempotency_key is not None and (
            done := await _replay(pool, idempotency_key, digest, idempotency_ttl_s)) is not None:
        return done
    chosen = body.targets.chosen()
    if len(chosen) != 1:
        raise ApiError(422, "invalid", "targets must name exactly one of: devices, nodes, all_online",
                       [{"path": "$.targets", "message": f"got {chosen or 'none'}"}])
    stored = await workflows.get(pool, body.workflow_id, body.workflow_version)
    if stored is None:
        what = clip(body.workflow_id) + (f" version {body.workflow_version}" if body.workflow_version else "")
        raise ApiError(404, "workflow_not_found", f"unknown workflow {what}")
    try:
        params = validate_params(stored.recipe, body.params)
        timeouts = resolve_step_timeouts(stored.recipe, body.step_timeouts_ms)
        check_run_params(stored.recipe, params, path_template)
    except RecipeInvalid as err:
        raise invalid("run does not fit the workflow", err.faults) from None
    run_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    try:
        async with pool.acquire() as conn, conn.transaction():
            if idempotency_key is not None:
                # An expired key (not pruned yet) is forgotten first.
                await conn.execute("DELETE FROM idempotency_keys WHERE key = $1"
                                   " AND created_at < now() - make_interval(secs => $2)",
                                   idempotency_key, idempotency_ttl_s)
                # Taken first: a concurrent request with the same key waits here, then replays.
                claimed = await conn.fetchval(
                    "INSERT INTO idempotency_keys (key, request_digest, run_id) VALUES ($1, $2, $3)"
                    " ON CONFLICT (key) DO NOTHING RETURNING key", idempotency_key, digest, run_id)
                if claimed is None:
                    raise _KeyTaken
            resolution = await targeting.resolve(conn, body.targets)
            if resolution.count == 0:
                raise ApiError(422, "no_targets", "the targets resolve to no online device",
                               resolution.rejected)
            await conn.execute(
                "INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms,"
                " status, created_at, parent_run_id) VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, 'pending', $6, $7)",
                run_id, stored.workflow_id, stored.version,
                msgspec.json.encode(params).decode(), msgspec.json.encode(timeouts).decode(), now,
                None if parent_run_id is None else uuid.UUID(parent_run_id),
            )
            nodes = sorted(resolution.by_node)
            await conn.copy_records_to_table(
                "run_tasks", columns=["run_id", "node_id", "device_serial"],
                records=[(uuid.UUID(run_id), n, s) for n in nodes for s in resolution.by_node[n]],
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
            response = RunCreated(run_id=run_id, status="pending", targets=resolution.count,
                                  rejected=[Rejection(**r) for r in resolution.rejected])
            if idempotency_key is not None:
                await conn.execute("UPDATE idempotency_keys SET response = $2::jsonb WHERE key = $1",
                                   idempotency_key, msgspec.json.encode(response).decode())
    except _KeyTaken:
        assert idempotency_key is not None
        done = await _replay(pool, idempotency_key, digest, idempotency_ttl_s)
        assert done is not None
        return done
    return Created(response, replayed=False)


def parse_run_id(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)!r}") from None


async def cancel_run(pool: asyncpg.Pool, run_id: str) -> RunCancelled:
    """Mark the run cancelled and queue a `RunCancel` for each of its nodes (same outbox as broadcasts).

    Tasks that finished keep their state; tasks no node has reported on yet, and `lost` tasks, become
    `cancelled` here; the nodes report the rest (queued jobs dropped, running ones stopped); the
    aggregator's housekeeping cancels those of a node that stays silent past the grace. A completed run
    is refused (409) unless some of its tasks are `lost`. Cancelling twice is harmless.
    """
    rid = parse_run_id(run_id)
    async with pool.acquire() as conn, conn.transaction():
        run = await conn.fetchrow("SELECT status FROM runs WHERE run_id = $1 FOR UPDATE", rid)
        if run is None:
            raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)}")
        # A run whose open tasks are all `lost` reads `completed` but may still be cancelled: its lost
        # tasks then end `cancelled` (their node cannot answer now).
        if run["status"] == "completed" and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM run_tasks WHERE run_id = $1 AND state = 'lost')", rid):
            raise ApiError(409, "run_finished", f"run {clip(run_id)} has already completed")
        nodes = [r["node_id"] for r in await conn.fetch(
            "SELECT DISTINCT node_id FROM run_tasks WHERE run_id = $1 ORDER BY node_id", rid)]
        if run["status"] != "cancelled":
            await conn.execute(
                "UPDATE runs SET status = 'cancelled', cancelled_at = now(),"
                " finished_at = COALESCE(finished_at, now()) WHERE run_id = $1", rid)
            await conn.execute(
                "UPDATE run_tasks SET state = 'cancelled', error = 'run cancelled', updated_at = now()"
                " WHERE run_id = $1 AND state = 'queued' AND seq = 0", rid)
            # A lost task's node cannot answer the cancel now: the run's cancel decides. Should the node
            # return and report a finished outcome for it, that report (a higher seq) replaces this.
            await conn.execute(
                "UPDATE run_tasks SET state = 'cancelled', error = 'run cancelled while node ' || node_id"
                " || ' was lost', lost_at = NULL, updated_at = now() WHERE run_id = $1 AND state = 'lost'", rid)
        await conn.executemany(
            "INSERT INTO outbox (run_id, node_id, subject, msg_id, payload) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (msg_id) DO NOTHING",
            [(rid, n, cmd_subject(n), cancel_msg_id(str(rid), n),
              msgspec.json.encode(RunCancel(run_id=str(rid), node_id=n))) for n in nodes],
        )
    return RunCancelled(run_id=str(rid), status="cancelled", nodes=len(nodes))


TASK_COLUMNS = ("t.run_id, t.node_id, t.device_serial, t.state, t.attempt, t.started_at, t.finished_at,"
                " t.error, t.failed_step")
TOP_FAILING_STEPS = 10
# The summary's statements (bench/bench_run_summary.py times the same ones bare): each an index range scan of
# the run's rows in run_tasks (primary key prefix run_id).
SUMMARY_PER_NODE_SQL = ("SELECT node_id, state, count(*) AS n FROM run_tasks WHERE run_id = $1"
                        " GROUP BY node_id, state ORDER BY node_id, state")
SUMMARY_FAILING_SQL = (
    "SELECT failed_step, NULLIF(split_part(error, ':', 1), '') AS code, count(*) AS n, min(error) AS example"
    " FROM run_tasks WHERE run_id = $1 AND failed_step IS NOT NULL"
    " GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT $2")
# Durations of tasks that ran to a final state; cancelled tasks are left out of the percentiles.
SUMMARY_TIMINGS_SQL = (
    "SELECT min(started_at) AS first_started, max(finished_at) AS last_finished,"
    " percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FILTER (WHERE measured) AS p50,"
    " percentile_cont(0.95) WITHIN GROUP (ORDER BY d) FILTER (WHERE measured) AS p95,"
    " count(*) FILTER (WHERE measured) AS measured"
    " FROM (SELECT started_at, finished_at,"
    "        extract(epoch FROM finished_at - started_at) * 1000 AS d,"
    "        (started_at IS NOT NULL AND finished_at IS NOT NULL"
    "         AND state IN ('succeeded', 'failed', 'timed_out', 'skipped', 'interrupted', 'lost')) AS measured"
    "       FROM run_tasks WHERE run_id = $1) t")


def outcome_of(status: RunStatus, succeeded: int, targets: int) -> RunOutcome | None:
    """`succeeded` when a completed run's every targeted device succeeded, `failed` when one did not,
    `cancelled` for a cancelled run, None while the run is not finished."""
    if status == "cancelled":
        return "cancelled"
    if status != "completed":
        return None
    return "succeeded" if succeeded == targets else "failed"


def _ms(value: float | None) -> int | None:
    return None if value is None else round(value)


async def get_run(pool: asyncpg.Pool, run_id: str) -> RunView:
    """The run's summary, computed in PostgreSQL over `run_tasks` (one index range scan per query): counts per
    state and node, the top failing steps, timings. Nothing per task leaves the database."""
    rid = parse_run_id(run_id)
    async with pool.acquire() as conn:
        run = await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", rid)
        if run is None:
            raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)}")
        per_node = await conn.fetch(SUMMARY_PER_NODE_SQL, rid)
        failing = await conn.fetch(SUMMARY_FAILING_SQL, rid, TOP_FAILING_STEPS)
        timing = await conn.fetchrow(SUMMARY_TIMINGS_SQL, rid)
    counts: dict[RecordedTaskState, int] = {}
    nodes: dict[str, dict[RecordedTaskState, int]] = {}
    for row in per_node:
        counts[row["state"]] = counts.get(row["state"], 0) + row["n"]
        nodes.setdefault(row["node_id"], {})[row["state"]] = row["n"]
    targets = sum(counts.values())
    succeeded = counts.get("succeeded", 0)
    final_not_ok = sum(n for state, n in counts.items() if state not in ("queued", "running", "succeeded"))
    return RunView(
        run_id=str(run["run_id"]), workflow_id=run["workflow_id"],
        workflow_version=run["workflow_version"], status=run["status"],
        outcome=outcome_of(run["status"], succeeded, targets),
        created_at=iso(run["created_at"]) or "", dispatched_at=iso(run["dispatched_at"]),
        finished_at=iso(run["finished_at"]), params=msgspec.json.decode(run["params"]),
        step_timeouts_ms=msgspec.json.decode(run["step_timeouts_ms"]),
        targets=targets, succeeded=succeeded, not_succeeded=final_not_ok, counts=counts,
        nodes=[NodeCounts(node_id=n, tasks=sum(c.values()), counts=c) for n, c in nodes.items()],
        failing_steps=[FailingStep(step_id=f["failed_step"], error_code=f["code"], tasks=f["n"],
                                   example=clip(f["example"]) if f["example"] else None) for f in failing],
        timings=RunTimings(
            first_started_at=iso(timing["first_started"]), last_finished_at=iso(timing["last_finished"]),
            p50_task_ms=_ms(timing["p50"]), p95_task_ms=_ms(timing["p95"]), measured_tasks=timing["measured"]),
        parent_run_id=None if run["parent_run_id"] is None else str(run["parent_run_id"]),
        retry_run_ids=await retry_run_ids(pool, rid),
    )


async def retry_run_ids(pool: asyncpg.Pool, rid: uuid.UUID) -> list[str]:
    """The runs made by retrying this one, oldest first."""
    return [str(r["run_id"]) for r in await pool.fetch(
        "SELECT run_id FROM runs WHERE parent_run_id = $1 ORDER BY created_at, run_id", rid)]


def task_row(t: asyncpg.Record, history: bool = False) -> TaskRow:
    started, finished = t["started_at"], t["finished_at"]
    duration = (round((finished - started).total_seconds() * 1000)
                if started is not None and finished is not None else None)
    return TaskRow(
        run_id=str(t["run_id"]), node_id=t["node_id"], device_serial=t["device_serial"], state=t["state"],
        attempt=t["attempt"], started_at=iso(started), finished_at=iso(finished), duration_ms=duration,
        error=t["error"], failed_step=t["failed_step"],
        workflow_id=t["workflow_id"] if history else None,
        workflow_version=t["workflow_version"] if history else None,
    )


def _encode(parts: list[str]) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(parts)).decode().rstrip("=")


def _decode(cursor: str, size: int) -> list[str]:
    try:
        parts = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), type=list[str])
        if len(parts) != size:
            raise ValueError("size")
        return parts
    except (ValueError, binascii.Error, msgspec.DecodeError, UnicodeDecodeError):
        raise ApiError(422, "invalid", "cursor is not one this API returned",
                       [{"path": "$.query.cursor", "message": "pass next_cursor from the previous page"}]) from None


async def _run_exists(conn: asyncpg.Connection, rid: uuid.UUID, run_id: str) -> None:
    if await conn.fetchval("SELECT 1 FROM runs WHERE run_id = $1", rid) is None:
        raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)}")


async def list_tasks(pool: asyncpg.Pool, run_id: str, *, state: RecordedTaskState | None, node_id: str | None,
                     serial: str | None, cursor: str | None, limit: int) -> TaskPage:
    """A run's tasks ordered by (node_id, device_serial), keyset-paged on the primary key."""
    rid = parse_run_id(run_id)
    after = _decode(cursor, 2) if cursor else None
    async with pool.acquire() as conn:
        await _run_exists(conn, rid, run_id)
        rows = await conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM run_tasks t WHERE t.run_id = $1"
            " AND ($2::text IS NULL OR t.state = $2) AND ($3::text IS NULL OR t.node_id = $3)"
            " AND ($4::text IS NULL OR t.device_serial = $4)"
            " AND ($5::text IS NULL OR (t.node_id, t.device_serial) > ($5, $6::text))"
            " ORDER BY t.node_id, t.device_serial LIMIT $7",
            rid, state, node_id, serial, after[0] if after else None, after[1] if after else None, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = _encode([rows[-1]["node_id"], rows[-1]["device_serial"]]) if more and rows else None
    return TaskPage(tasks=[task_row(t) for t in rows], next_cursor=next_cursor)


async def get_task(pool: asyncpg.Pool, linker: ArtifactLinks, run_id: str, node_id: str,
                   serial: str, base_url: str | None = None) -> TaskDetail:
    rid = parse_run_id(run_id)
    async with pool.acquire() as conn:
        await _run_exists(conn, rid, run_id)
        task = await conn.fetchrow(
            f"SELECT {TASK_COLUMNS} FROM run_tasks t WHERE t.run_id = $1 AND t.node_id = $2"
            " AND t.device_serial = $3", rid, node_id, serial)
        if task is None:
            raise ApiError(404, "task_not_found",
                           f"run {clip(run_id)} has no task for device {clip(node_id)}/{clip(serial)}")
        step_rows = await conn.fetch(
            "SELECT * FROM step_results WHERE run_id = $1 AND node_id = $2 AND device_serial = $3 ORDER BY idx",
            rid, node_id, serial)
        arts = await conn.fetch(
            "SELECT * FROM artifacts WHERE run_id = $1 AND node_id = $2 AND device_serial = $3"
            " ORDER BY created_at, key", rid, node_id, serial)
    steps = [StepView(step_id=s["step_id"], index=s["idx"], action=s["action"], state=s["state"],
                      started_at=iso(s["started_at"]), finished_at=iso(s["finished_at"]), output=s["output"],
                      error=s["error"]) for s in step_rows]
    return TaskDetail(task=task_row(task), steps=steps, artifacts=await linker.links(arts, base_url))


async def device_tasks(pool: asyncpg.Pool, node_id: str, serial: str, *, state: RecordedTaskState | None,
                       cursor: str | None, limit: int) -> TaskPage:
    """One device's tasks across runs, newest run first, keyset-paged on (run created_at, run_id)."""
    after = _decode(cursor, 2) if cursor else None
    after_ts: datetime | None = None
    after_id: uuid.UUID | None = None
    if after is not None:
        try:
            after_ts, after_id = datetime.fromisoformat(after[0]), uuid.UUID(after[1])
            if after_ts.tzinfo is None:
                raise ValueError("naive")
        except ValueError:
            _decode("!", 2)  # the same 422 as any other foreign cursor
    rows = await pool.fetch(
        f"SELECT {TASK_COLUMNS}, r.workflow_id, r.workflow_version, r.created_at AS run_created"
        " FROM run_tasks t JOIN runs r USING (run_id)"
        " WHERE t.node_id = $1 AND t.device_serial = $2 AND ($3::text IS NULL OR t.state = $3)"
        " AND ($4::timestamptz IS NULL OR (r.created_at, r.run_id) < ($4, $5::uuid))"
        " ORDER BY r.created_at DESC, r.run_id DESC LIMIT $6",
        node_id, serial, state, after_ts, after_id, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = (_encode([rows[-1]["run_created"].astimezone(UTC).isoformat(), str(rows[-1]["run_id"])])
                   if more and rows else None)
    return TaskPage(tasks=[task_row(t, history=True) for t in rows], next_cursor=next_cursor)


# -- listing -----------------------------------------------------------------------


def encode_cursor(created_at: datetime, run_id: uuid.UUID) -> str:
    raw = msgspec.json.encode([created_at.astimezone(UTC).isoformat(), str(run_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, rid = msgspec.json.decode(raw, type=tuple[str, str])
        ts = datetime.fromisoformat(created)
        if ts.tzinfo is None:
            raise ValueError("naive")
        return ts, uuid.UUID(rid)
    except (ValueError, binascii.Error, msgspec.DecodeError, UnicodeDecodeError):
        raise ApiError(422, "invalid", "cursor is not one this API returned",
                       [{"path": "$.query.cursor", "message": "pass next_cursor from the previous page"}]) from None


def _aware(ts: datetime | None) -> datetime | None:
    return ts.replace(tzinfo=UTC) if ts is not None and ts.tzinfo is None else ts


async def list_runs(
    pool: asyncpg.Pool, *, status: RunStatus | None, workflow_id: str | None, created_after: datetime | None,
    created_before: datetime | None, cursor: str | None, limit: int,
) -> RunPage:
    """Newest first; keyset pagination on (created_at, run_id), so pages never skip or repeat a run."""
    after = decode_cursor(cursor) if cursor else None
    rows = await pool.fetch(
        "SELECT run_id, workflow_id, workflow_version, status, created_at, dispatched_at, finished_at FROM runs"
        " WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR workflow_id = $2)"
        " AND ($3::timestamptz IS NULL OR created_at >= $3) AND ($4::timestamptz IS NULL OR created_at < $4)"
        " AND ($5::timestamptz IS NULL OR (created_at, run_id) < ($5, $6::uuid))"
        " ORDER BY created_at DESC, run_id DESC LIMIT $7",
        status, workflow_id, _aware(created_after), _aware(created_before),
        after[0] if after else None, after[1] if after else None, limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    counts: dict[uuid.UUID, dict[RecordedTaskState, int]] = defaultdict(dict)
    if rows:
        for c in await pool.fetch(
            "SELECT run_id, state, count(*) AS n FROM run_tasks WHERE run_id = ANY($1::uuid[])"
            " GROUP BY run_id, state", [r["run_id"] for r in rows]
        ):
            counts[c["run_id"]][c["state"]] = c["n"]
    runs = [RunSummary(
        run_id=str(r["run_id"]), workflow_id=r["workflow_id"], workflow_version=r["workflow_version"],
        status=r["status"], created_at=iso(r["created_at"]) or "", dispatched_at=iso(r["dispatched_at"]),
        finished_at=iso(r["finished_at"]), targets=sum(counts[r["run_id"]].values()),
        counts=counts[r["run_id"]],
    ) for r in rows]
    last = rows[-1] if rows else None
    next_cursor = encode_cursor(last["created_at"], last["run_id"]) if more and last is not None else None
    return RunPage(runs=runs, next_cursor=next_cursor)


async def list_devices(pool: asyncpg.Pool) -> list[DeviceView]:
    """The fleet's devices with the liveness Grafana shows (the `device_liveness` view)."""
    rows = await pool.fetch("SELECT * FROM device_liveness ORDER BY node_id, serial")
    return [DeviceView(node_id=r["node_id"], serial=r["serial"], status=r["status"], model=r["model"],
                       last_seen=iso(r["last_seen"]), online=r["online"], liveness=r["liveness"]) for r in rows]


async def list_nodes(pool: asyncpg.Pool) -> list[NodeView]:
    """The nodes with the liveness Grafana shows (the `node_liveness` view): `vendor_connected` only while alive."""
    rows = await pool.fetch("SELECT * FROM node_liveness ORDER BY node_id")
    return [NodeView(node_id=r["node_id"], slots=r["slots"], running=r["running"], queued=r["queued"],
                     vendor_connected=r["vendor_connected"], version=r["version"], last_seen=iso(r["last_seen"]),
                     online=r["online"], refused_events=r["refused_events"]) for r in rows]

