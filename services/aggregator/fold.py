"""Fold a batch of decoded events into PostgreSQL in one transaction.

Order-independent: a task or step row only takes the state of an event whose
per-(run, device) `seq` is higher than the one it already holds, so
duplicates and late arrivals change nothing. Timestamps are the node's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import asyncpg

from contracts.events import (
    TERMINAL_TASK_STATES,
    ArtifactEvent,
    DeviceInventoryEvent,
    Event,
    NodeHeartbeat,
    StepEvent,
    TaskEvent,
)

TERMINAL = sorted(TERMINAL_TASK_STATES)
TERMINAL_STEP = ["ok", "failed", "timed_out", "skipped"]


@dataclass
class DeadLetter:
    subject: str
    stream_seq: int | None
    raw: bytes
    error: str


@dataclass
class Incoming:
    event: Event
    subject: str
    stream_seq: int | None
    raw: bytes


@dataclass
class Batch:
    items: list[Incoming] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


_UPSERT_TASK = """
INSERT INTO run_tasks AS t (run_id, node_id, device_serial, state, attempt, seq,
                           started_at, finished_at, error, failed_step, updated_at)
VALUES ($1, $2, $3, $4, $5, $6,
        CASE WHEN $4 = 'running' THEN $7::timestamptz END,
        CASE WHEN $4 = ANY($10::text[]) THEN $7::timestamptz END,
        $8, $9, now())
ON CONFLICT (run_id, node_id, device_serial) DO UPDATE SET
    state       = CASE WHEN EXCLUDED.seq > t.seq THEN EXCLUDED.state ELSE t.state END,
    attempt     = CASE WHEN EXCLUDED.seq > t.seq THEN EXCLUDED.attempt ELSE t.attempt END,
    error       = CASE WHEN EXCLUDED.seq > t.seq THEN EXCLUDED.error ELSE t.error END,
    failed_step = CASE WHEN EXCLUDED.seq > t.seq THEN EXCLUDED.failed_step ELSE t.failed_step END,
    started_at  = GREATEST(t.started_at, EXCLUDED.started_at),
    finished_at = GREATEST(t.finished_at, EXCLUDED.finished_at),
    seq         = GREATEST(t.seq, EXCLUDED.seq),
    updated_at  = now()
"""

_UPSERT_STEP = """
INSERT INTO step_results AS s (run_id, node_id, device_serial, step_id, idx, action, state, seq,
                              started_at, finished_at, output, error)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
        CASE WHEN $7 = 'started' THEN $9::timestamptz END,
        CASE WHEN $7 = ANY($12::text[]) THEN $9::timestamptz END,
        $10, $11)
ON CONFLICT (run_id, node_id, device_serial, step_id) DO UPDATE SET
    state       = CASE WHEN EXCLUDED.seq > s.seq THEN EXCLUDED.state ELSE s.state END,
    output      = CASE WHEN EXCLUDED.seq > s.seq THEN EXCLUDED.output ELSE s.output END,
    error       = CASE WHEN EXCLUDED.seq > s.seq THEN EXCLUDED.error ELSE s.error END,
    started_at  = GREATEST(s.started_at, EXCLUDED.started_at),
    finished_at = GREATEST(s.finished_at, EXCLUDED.finished_at),
    seq         = GREATEST(s.seq, EXCLUDED.seq)
"""

_INSERT_ARTIFACT = """
INSERT INTO artifacts (run_id, node_id, device_serial, step_id, store, key, uri, bytes, sha256,
                       content_type, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (store, key) DO NOTHING
"""

_UPSERT_DEVICE = """
INSERT INTO devices AS d (node_id, serial, status, model, name, last_seen)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (node_id, serial) DO UPDATE SET
    status = EXCLUDED.status, model = EXCLUDED.model, name = EXCLUDED.name,
    last_seen = EXCLUDED.last_seen
WHERE EXCLUDED.last_seen >= d.last_seen
"""

# Devices a usable inventory no longer lists have left the node.
_DEVICES_GONE = """
UPDATE devices SET status = 'gone', last_seen = $3
WHERE node_id = $1 AND NOT (serial = ANY($2::text[])) AND last_seen < $3 AND status <> 'gone'
"""

_UPSERT_NODE = """
INSERT INTO nodes AS n (node_id, slots, running, queued, vendor_connected, version, last_seen)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (node_id) DO UPDATE SET
    slots = EXCLUDED.slots, running = EXCLUDED.running, queued = EXCLUDED.queued,
    vendor_connected = EXCLUDED.vendor_connected, version = EXCLUDED.version,
    last_seen = EXCLUDED.last_seen
WHERE EXCLUDED.last_seen >= n.last_seen
"""

# A run's status follows its tasks; `cancelled` is the backend's word and stays.
_RUN_STATUS = """
UPDATE runs r SET
    status = CASE WHEN c.open = 0 THEN 'completed' ELSE 'running' END,
    finished_at = CASE WHEN c.open = 0 THEN COALESCE(r.finished_at, now()) END
FROM (
    SELECT run_id, count(*) FILTER (WHERE NOT (state = ANY($2::text[]))) AS open,
           count(*) FILTER (WHERE state <> 'queued') AS touched
    FROM run_tasks WHERE run_id = ANY($1::uuid[]) GROUP BY run_id
) c
WHERE r.run_id = c.run_id AND r.status <> 'cancelled' AND c.touched > 0
"""


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def fold(conn: asyncpg.Connection, batch: Batch) -> None:
    """Apply `batch` inside the caller's transaction."""
    task_items = [i for i in batch.items if isinstance(i.event, TaskEvent | StepEvent | ArtifactEvent)]
    wanted = {u for i in task_items if (u := _uuid(i.event.run_id)) is not None}  # type: ignore[union-attr]
    known = {r["run_id"] for r in await conn.fetch(
        "SELECT run_id FROM runs WHERE run_id = ANY($1::uuid[])", list(wanted))}
    tasks, steps, artifacts = [], [], []
    for item in task_items:
        e = item.event
        assert isinstance(e, TaskEvent | StepEvent | ArtifactEvent)
        rid = _uuid(e.run_id)
        if rid is None or rid not in known:
            batch.dead.append(DeadLetter(item.subject, item.stream_seq, item.raw,
                                         f"event {e.event_id} names unknown run {e.run_id!r}"))
            continue
        if isinstance(e, TaskEvent):
            tasks.append((rid, e.node_id, e.device_serial, e.state, e.attempt, e.seq, e.ts,
                          e.error, e.failed_step, TERMINAL))
        elif isinstance(e, StepEvent):
            steps.append((rid, e.node_id, e.device_serial, e.step_id, e.index, e.action, e.state,
                          e.seq, e.ts, e.output, e.error, TERMINAL_STEP))
        else:
            artifacts.append((rid, e.node_id, e.device_serial, e.step_id, e.store, e.key, e.uri,
                              e.bytes, e.sha256, e.content_type, e.ts))
    if tasks:
        await conn.executemany(_UPSERT_TASK, tasks)
    if steps:
        await conn.executemany(_UPSERT_STEP, steps)
    if artifacts:
        await conn.executemany(_INSERT_ARTIFACT, artifacts)
    for item in batch.items:
        e = item.event
        if isinstance(e, DeviceInventoryEvent) and e.vendor_available and e.devices:
            await conn.executemany(_UPSERT_DEVICE, [
                (e.node_id, d.serial, d.status, d.model, d.name, e.ts) for d in e.devices
            ])
            await conn.execute(_DEVICES_GONE, e.node_id, [d.serial for d in e.devices], e.ts)
        elif isinstance(e, NodeHeartbeat):
            await conn.execute(_UPSERT_NODE, e.node_id, e.slots, e.running, e.queued,
                               e.vendor_connected, e.version, e.ts)
    if batch.dead:
        await conn.executemany(
            "INSERT INTO dead_letters (subject, stream_seq, raw, error) VALUES ($1, $2, $3, $4)",
            [(d.subject, d.stream_seq, d.raw, d.error) for d in batch.dead],
        )
    touched = list({t[0] for t in tasks})
    if touched:
        await conn.execute(_RUN_STATUS, touched, TERMINAL)
