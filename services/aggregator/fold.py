"""Fold a batch of decoded events into PostgreSQL in one transaction, set-based.

The fold is a function of the *set* of events, not of their order or count:

* Idempotent by `event_id`: each event is claimed in `processed_events` in the
  same transaction as its effects; an event already claimed (redelivered,
  replayed, duplicated, or being folded right now by another aggregator) is
  skipped whole.
* Order-independent: a task or step row holds the event with the highest rank
  `(terminal, seq)`, so a later state never loses to an earlier one and a
  terminal state is never reopened; `started_at` / `finished_at` are the
  greatest node timestamps seen for them. Nodes and devices keep their newest
  report (by the node's `ts`); a device the node's newest inventory does not
  list is `gone`. Run status and counts are derived from the task rows.
* Set-based: every table is written with one `INSERT … SELECT FROM unnest(…)`
  per batch, after reducing the batch to one row per key (PostgreSQL refuses
  to update a row twice in one statement).
* Few round trips: a batch costs BEGIN, the run locks, one statement that
  checks task ownership and claims the events (answering with the exceptions
  only), one statement for the task, step, artifact and node upserts, the run
  status, COMMIT (plus the inventories and dead letters when the batch has
  any). Per round trip the client pays a socket write and a wake-up of the
  server, which on the aggregator's hot path cost as much as the rows.

Concurrency between aggregators: rows are locked in one global order (the
batch's runs first, then `processed_events`, then tasks, steps, artifacts and
nodes (one statement), then node inventories and devices) and in key order
inside each table, so folds of the same run or node serialise instead of
deadlocking, and the run status is derived after every other fold of that
run has committed.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg

from contracts.events import (
    DONE_TASK_STATES,
    TERMINAL_STEP_STATES,
    TERMINAL_TASK_STATES,
    ArtifactEvent,
    DeviceInventoryEvent,
    Event,
    NodeHeartbeat,
    RecordedTaskState,
    StepEvent,
    StepState,
    TaskEvent,
    TaskState,
)
from services.aggregator.validate import (
    DEAD_LETTER_ERROR_CHARS,
    DEAD_LETTER_SUBJECT_CHARS,
    UNDECODABLE,
    UNKNOWN_RUN,
    UNKNOWN_TASK,
    payload_digest,
    storable,
)

TERMINAL: list[TaskState] = sorted(TERMINAL_TASK_STATES)
# `lost` (written by `housekeeping.py`, never by a node event) is done for the run's status but
# not terminal for the ranking: it keeps the task's seq, so any later node report replaces it.
DONE: list[RecordedTaskState] = sorted(DONE_TASK_STATES)
TERMINAL_STEP: list[StepState] = sorted(TERMINAL_STEP_STATES)


@dataclass
class DeadLetter:
    subject: str
    stream_seq: int | None
    raw: bytes
    error: str
    event_id: str | None = None
    reason: str = UNDECODABLE  # one of `validate.REASONS`


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
    clamped: list[tuple[str, datetime, datetime]] = field(default_factory=list)  # (node_id, sent ts, used ts)
    seqs: list[int | None] = field(default_factory=list)  # the fetched messages' stream sequences, in order


@dataclass
class FoldResult:
    applied: int = 0  # events whose effects were written now
    skipped: int = 0  # events already folded before (by event_id)
    dead: int = 0  # dead letters written (or already there)


_LOCK_RUNS = "SELECT run_id FROM runs WHERE run_id = ANY($1::uuid[]) ORDER BY run_id FOR UPDATE"

# After the runs are locked, in one round trip: claim the batch's events that may change something (events
# of no run, and events naming a task the backend created on that node), and answer with the exceptions
# only: events naming no such task (`known` false: dead letters) and events claimed before (`known` true:
# skipped). Both are rare, so the answer is usually empty.
_CLAIM_KNOWN = """
WITH ev AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[])
        AS e(event_id, run_id, node_id, device_serial)
), ok AS MATERIALIZED (
    SELECT ev.event_id FROM ev
    WHERE ev.run_id IS NULL OR EXISTS (
        SELECT 1 FROM run_tasks t
        WHERE (t.run_id, t.node_id, t.device_serial) = (ev.run_id, ev.node_id, ev.device_serial))
), claimed AS (
    INSERT INTO processed_events (event_id)
    SELECT event_id FROM ok ORDER BY event_id
    ON CONFLICT DO NOTHING
    RETURNING event_id
)
SELECT ev.event_id, ok.event_id IS NOT NULL AS known
FROM ev LEFT JOIN ok ON ok.event_id = ev.event_id
WHERE ok.event_id IS NULL OR NOT EXISTS (SELECT 1 FROM claimed c WHERE c.event_id = ev.event_id)
"""

# (terminal, seq) ranks an event: the highest rank is the row's state.
_TASK_NEWER = "(EXCLUDED.state = ANY($11::text[]), EXCLUDED.seq) > (t.state = ANY($11::text[]), t.seq)"
_UPSERT_TASKS = f"""
INSERT INTO run_tasks AS t (run_id, node_id, device_serial, state, attempt, seq,
                           started_at, finished_at, error, failed_step, updated_at)
SELECT u.run_id, u.node_id, u.device_serial, u.state, u.attempt, u.seq,
       u.started_at, u.finished_at, u.error, u.failed_step, now()
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[],
            $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[])
     AS u(run_id, node_id, device_serial, state, attempt, seq, started_at, finished_at, error, failed_step)
ORDER BY u.run_id, u.node_id, u.device_serial
ON CONFLICT (run_id, node_id, device_serial) DO UPDATE SET
    state       = CASE WHEN {_TASK_NEWER} THEN EXCLUDED.state ELSE t.state END,
    attempt     = CASE WHEN {_TASK_NEWER} THEN EXCLUDED.attempt ELSE t.attempt END,
    error       = CASE WHEN {_TASK_NEWER} THEN EXCLUDED.error ELSE t.error END,
    failed_step = CASE WHEN {_TASK_NEWER} THEN EXCLUDED.failed_step ELSE t.failed_step END,
    seq         = CASE WHEN {_TASK_NEWER} THEN EXCLUDED.seq ELSE t.seq END,
    lost_at     = CASE WHEN {_TASK_NEWER} THEN NULL ELSE t.lost_at END,
    started_at  = GREATEST(t.started_at, EXCLUDED.started_at),
    finished_at = GREATEST(t.finished_at, EXCLUDED.finished_at),
    updated_at  = now()
"""

_STEP_NEWER = "(EXCLUDED.state = ANY($13::text[]), EXCLUDED.seq) > (s.state = ANY($13::text[]), s.seq)"
_UPSERT_STEPS = f"""
INSERT INTO step_results AS s (run_id, node_id, device_serial, step_id, idx, action, state, seq,
                              started_at, finished_at, output, error)
SELECT u.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[],
                       $8::bigint[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[])
     AS u(run_id, node_id, device_serial, step_id, idx, action, state, seq, started_at, finished_at, output, error)
ORDER BY u.run_id, u.node_id, u.device_serial, u.step_id
ON CONFLICT (run_id, node_id, device_serial, step_id) DO UPDATE SET
    idx         = CASE WHEN {_STEP_NEWER} THEN EXCLUDED.idx ELSE s.idx END,
    action      = CASE WHEN {_STEP_NEWER} THEN EXCLUDED.action ELSE s.action END,
    state       = CASE WHEN {_STEP_NEWER} THEN EXCLUDED.state ELSE s.state END,
    output      = CASE WHEN {_STEP_NEWER} THEN EXCLUDED.output ELSE s.output END,
    error       = CASE WHEN {_STEP_NEWER} THEN EXCLUDED.error ELSE s.error END,
    seq         = CASE WHEN {_STEP_NEWER} THEN EXCLUDED.seq ELSE s.seq END,
    started_at  = GREATEST(s.started_at, EXCLUDED.started_at),
    finished_at = GREATEST(s.finished_at, EXCLUDED.finished_at)
"""

_UPSERT_ARTIFACTS = """
INSERT INTO artifacts AS a (run_id, node_id, device_serial, step_id, store, key, uri, bytes, sha256,
                            content_type, created_at, seq, kind)
SELECT u.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                       $8::bigint[], $9::text[], $10::text[], $11::timestamptz[], $12::bigint[], $13::text[])
     AS u(run_id, node_id, device_serial, step_id, store, key, uri, bytes, sha256, content_type, created_at, seq,
          kind)
ORDER BY u.store, u.key
ON CONFLICT (store, key) DO UPDATE SET
    run_id = EXCLUDED.run_id, node_id = EXCLUDED.node_id, device_serial = EXCLUDED.device_serial,
    step_id = EXCLUDED.step_id, uri = EXCLUDED.uri, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256,
    content_type = EXCLUDED.content_type, created_at = EXCLUDED.created_at, seq = EXCLUDED.seq,
    kind = EXCLUDED.kind
WHERE (EXCLUDED.seq, EXCLUDED.created_at) > (a.seq, a.created_at)
"""

# Taken before the node's devices are touched: it also serialises two folds of one node.
_UPSERT_INVENTORIES = """
INSERT INTO node_inventories AS i (node_id, taken_at, devices)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[]) AS u(node_id, taken_at, devices)
ORDER BY 1
ON CONFLICT (node_id) DO UPDATE SET taken_at = EXCLUDED.taken_at, devices = EXCLUDED.devices
WHERE EXCLUDED.taken_at > i.taken_at
"""

_UPSERT_DEVICES = """
INSERT INTO devices AS d (node_id, serial, status, model, name, last_seen)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
     AS u(node_id, serial, status, model, name, last_seen)
ORDER BY 1, 2
ON CONFLICT (node_id, serial) DO UPDATE SET
    status = EXCLUDED.status, model = EXCLUDED.model, name = EXCLUDED.name, last_seen = EXCLUDED.last_seen
WHERE EXCLUDED.last_seen > d.last_seen
"""

# `last_seen` stays the time the device was last listed.
_DEVICES_GONE = """
UPDATE devices d SET status = 'gone'
FROM node_inventories i
WHERE i.node_id = ANY($1::text[]) AND d.node_id = i.node_id
  AND d.last_seen < i.taken_at AND d.status <> 'gone'
"""

_UPSERT_NODES = """
INSERT INTO nodes AS n (node_id, slots, running, queued, vendor_connected, version, last_seen, refused_events)
SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::int[], $5::bool[], $6::text[], $7::timestamptz[],
                     $8::int[])
     AS u(node_id, slots, running, queued, vendor_connected, version, last_seen, refused_events)
ORDER BY 1
ON CONFLICT (node_id) DO UPDATE SET
    slots = EXCLUDED.slots, running = EXCLUDED.running, queued = EXCLUDED.queued,
    vendor_connected = EXCLUDED.vendor_connected, version = EXCLUDED.version, last_seen = EXCLUDED.last_seen,
    refused_events = EXCLUDED.refused_events
WHERE EXCLUDED.last_seen > n.last_seen
"""



def _shift(sql: str, by: int) -> str:
    """`sql` with its parameters `$1`, `$2`, ... renumbered from `$1 + by`."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + by}", sql)


# The four per-batch upserts in one statement (one round trip): run tasks ($1-$11), steps ($12-$24),
# artifacts ($25-$37), nodes ($38-$45); a table with no rows in the batch gets empty arrays. Inside one
# statement the order of the four is PostgreSQL's: task, step and artifact rows belong to runs this
# transaction has locked (so folds touching the same rows have already serialised on the run), and node
# rows are taken in key order by every fold.
_UPSERT_ROWS = (
    "WITH t AS (" + _UPSERT_TASKS + " RETURNING 1),\n"
    "s AS (" + _shift(_UPSERT_STEPS, 11) + " RETURNING 1),\n"
    "a AS (" + _shift(_UPSERT_ARTIFACTS, 24) + " RETURNING 1),\n"
    "n AS (" + _shift(_UPSERT_NODES, 37) + " RETURNING 1)\n"
    "SELECT 1"
)
_UPSERT_WIDTHS = (10, 12, 13, 8)

# `raw` is the payload's head only; `raw_size` and `raw_sha256` describe all of it.
_DEAD_LETTERS = """
INSERT INTO dead_letters (subject, stream_seq, raw, raw_size, raw_sha256, error, event_id, reason)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bigint[], $5::text[], $6::text[], $7::text[],
                     $8::text[])
ON CONFLICT DO NOTHING
"""

# A run's status follows its tasks: `completed` when every task is terminal or
# `lost` (finished at the last task's node-observed end, or when it was found
# lost), else `running` once any task has moved. `pending` / `dispatched` are
# the backend's, as is `cancelled`, which stays. $2 is `DONE`.
RUN_STATUS = """
UPDATE runs r SET
    status = CASE WHEN c.open = 0 THEN 'completed' ELSE 'running' END,
    finished_at = CASE WHEN c.open = 0 THEN c.last_finish END
FROM (
    SELECT run_id, count(*) FILTER (WHERE NOT (state = ANY($2::text[]))) AS open,
           count(*) FILTER (WHERE state <> 'queued') AS touched,
           max(CASE WHEN state = 'lost' THEN lost_at ELSE finished_at END) AS last_finish
    FROM run_tasks WHERE run_id = ANY($1::uuid[]) GROUP BY run_id
) c
WHERE r.run_id = c.run_id AND r.status <> 'cancelled' AND c.touched > 0
  AND (r.status, r.finished_at) IS DISTINCT FROM
      (CASE WHEN c.open = 0 THEN 'completed' ELSE 'running' END, CASE WHEN c.open = 0 THEN c.last_finish END)
"""


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _columns(rows: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """`rows` (each `width` values) as `width` columns: the arrays of an `unnest` statement."""
    cols = [list(col) for col in zip(*rows, strict=True)]
    if not cols:
        return [[] for _ in range(width)]
    if len(cols) != width:
        raise ValueError(f"rows of {len(cols)} values where {width} were expected")
    return cols


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


E = TypeVar("E", TaskEvent, StepEvent)


def _reduce(events: list[E], key: Callable[[E], tuple[str, ...]], terminal_states: Collection[str],
            start_state: str) -> dict[tuple[str, ...], tuple[E, datetime | None, datetime | None]]:
    """Per key: the event of highest `(terminal, seq, event_id)`, and the latest start and end times seen."""
    out: dict[tuple[str, ...], tuple[E, datetime | None, datetime | None]] = {}
    for e in events:
        k = key(e)
        terminal = e.state in terminal_states
        cur = out.get(k)
        if cur is None:
            best, started, finished = e, None, None
        else:
            best, started, finished = cur
            if (terminal, e.seq, e.event_id) > (best.state in terminal_states, best.seq, best.event_id):
                best = e
        started = _later(started, e.ts if e.state == start_state else None)
        finished = _later(finished, e.ts if terminal else None)
        out[k] = (best, started, finished)
    return out


def _reduce_tasks(events: list[TaskEvent], run_ids: dict[str, uuid.UUID]) -> list[tuple[Any, ...]]:
    reduced = _reduce(events, lambda e: (e.run_id, e.node_id, e.device_serial), TERMINAL_TASK_STATES, "running")
    return [
        (run_ids[k[0]], k[1], k[2], e.state, e.attempt, e.seq, started, finished, e.error, e.failed_step)
        for k, (e, started, finished) in reduced.items()
    ]


def _reduce_steps(events: list[StepEvent], run_ids: dict[str, uuid.UUID]) -> list[tuple[Any, ...]]:
    reduced = _reduce(events, lambda e: (e.run_id, e.node_id, e.device_serial, e.step_id), TERMINAL_STEP_STATES,
                      "started")
    return [
        (run_ids[k[0]], k[1], k[2], k[3], e.index, e.action, e.state, e.seq, started, finished, e.output, e.error)
        for k, (e, started, finished) in reduced.items()
    ]


def _reduce_artifacts(events: list[ArtifactEvent], run_ids: dict[str, uuid.UUID]) -> list[tuple[Any, ...]]:
    best: dict[tuple[str, str], ArtifactEvent] = {}
    for e in events:
        key = (e.store, e.key)
        cur = best.get(key)
        if cur is None or (e.seq, e.ts) > (cur.seq, cur.ts):
            best[key] = e
    return [
        (run_ids[e.run_id], e.node_id, e.device_serial, e.step_id, e.store, e.key, e.uri, e.bytes, e.sha256,
         e.content_type, e.ts, e.seq, e.purpose)
        for e in best.values()
    ]


async def fold(conn: asyncpg.Connection, batch: Batch) -> FoldResult:
    """Apply `batch` inside the caller's transaction; dead letters found here join `batch.dead`."""
    result = FoldResult()
    unique: dict[str, Incoming] = {}
    for item in batch.items:
        unique.setdefault(item.event.event_id, item)
    result.skipped = len(batch.items) - len(unique)

    # 1. Lock the batch's runs (also: which runs exist). Events of unknown runs are dead letters.
    run_ids: dict[str, uuid.UUID] = {}
    for item in unique.values():
        e = item.event
        if isinstance(e, TaskEvent | StepEvent | ArtifactEvent) and e.run_id not in run_ids:
            rid = _uuid(e.run_id)
            if rid is not None:
                run_ids[e.run_id] = rid
    known: set[str] = set()  # the run ids (as the events spell them) of runs that exist
    if run_ids:
        # Keyed by value: asyncpg's own UUIDs (as PostgreSQL returned them) equal and hash as `uuid.UUID`s,
        # and asyncpg writes them into the statements' uuid arrays without a Python call per value.
        found = {r["run_id"]: r["run_id"] for r in await conn.fetch(_LOCK_RUNS, sorted(set(run_ids.values())))}
        known = {text for text, rid in run_ids.items() if rid in found}
        run_ids = {text: found[rid] for text, rid in run_ids.items() if rid in found}
    candidates: list[Incoming] = []
    asked: list[tuple[str, uuid.UUID | None, str | None, str | None]] = []
    for item in unique.values():
        e = item.event
        if isinstance(e, TaskEvent | StepEvent | ArtifactEvent):
            if e.run_id not in known:
                batch.dead.append(DeadLetter(item.subject, item.stream_seq, item.raw,
                                             f"event {e.event_id} names unknown run {e.run_id!r}", e.event_id,
                                             UNKNOWN_RUN))
                continue
            asked.append((e.event_id, run_ids[e.run_id], e.node_id, e.device_serial))
        else:
            asked.append((e.event_id, None, None, None))
        candidates.append(item)

    # 2. Claim the events that name a task the backend created on that node (or no task); the others
    #    are dead letters, and whatever another transaction already claimed is skipped.
    unknown_task: set[str] = set()
    seen: set[str] = set()
    if candidates:
        for r in await conn.fetch(_CLAIM_KNOWN, *_columns(asked, 4)):
            (seen if r["known"] else unknown_task).add(r["event_id"])
    foldable: list[Incoming] = []
    for item in candidates:
        e = item.event
        if e.event_id in unknown_task and isinstance(e, TaskEvent | StepEvent | ArtifactEvent):
            batch.dead.append(DeadLetter(
                item.subject, item.stream_seq, item.raw,
                f"event {e.event_id}: run {e.run_id} has no task for device {e.device_serial!r} on node"
                f" {e.node_id!r}", e.event_id, UNKNOWN_TASK))
            continue
        if e.event_id in seen:
            continue
        foldable.append(item)
    result.skipped += len(seen)
    result.applied = len(foldable)
    tasks: list[TaskEvent] = []
    steps: list[StepEvent] = []
    artifacts: list[ArtifactEvent] = []
    inventories: dict[str, DeviceInventoryEvent] = {}
    listings: list[DeviceInventoryEvent] = []
    beats: dict[str, NodeHeartbeat] = {}
    for item in foldable:
        e = item.event
        if isinstance(e, TaskEvent):
            tasks.append(e)
        elif isinstance(e, StepEvent):
            steps.append(e)
        elif isinstance(e, ArtifactEvent):
            artifacts.append(e)
        elif isinstance(e, DeviceInventoryEvent):
            # An unusable list (vendor down, or empty) says nothing about the devices.
            if e.vendor_available and e.devices:
                listings.append(e)
                cur_inv = inventories.get(e.node_id)
                if cur_inv is None or (e.ts, e.event_id) > (cur_inv.ts, cur_inv.event_id):
                    inventories[e.node_id] = e
        elif isinstance(e, NodeHeartbeat):
            cur_beat = beats.get(e.node_id)
            if cur_beat is None or (e.ts, e.event_id) > (cur_beat.ts, cur_beat.event_id):
                beats[e.node_id] = e

    # 3. Write: the run rows and the nodes in one statement, then the inventories, in the global lock order.
    if tasks or steps or artifacts or beats:
        await conn.execute(
            _UPSERT_ROWS,
            *_columns(_reduce_tasks(tasks, run_ids), 10), TERMINAL,
            *_columns(_reduce_steps(steps, run_ids), 12), TERMINAL_STEP,
            *_columns(_reduce_artifacts(artifacts, run_ids), 13),
            *_columns([(b.node_id, b.slots, b.running, b.queued, b.vendor_connected, b.version, b.ts,
                        b.refused_events) for b in beats.values()], 8))
    if listings:
        inv_rows = [(e.node_id, e.ts, len(e.devices)) for e in inventories.values()]
        await conn.execute(_UPSERT_INVENTORIES, *_columns(inv_rows, 3))
        newest: dict[tuple[str, str], tuple[tuple[datetime, str], tuple[Any, ...]]] = {}
        for e in listings:
            for d in e.devices:
                key = (e.node_id, d.serial)
                cur_row = newest.get(key)
                if cur_row is None or (e.ts, e.event_id) > cur_row[0]:
                    newest[key] = ((e.ts, e.event_id), (e.node_id, d.serial, d.status, d.model, d.name, e.ts))
        await conn.execute(_UPSERT_DEVICES, *_columns((row for _, row in newest.values()), 6))
        await conn.execute(_DEVICES_GONE, sorted(inventories))
    if batch.dead:
        await conn.execute(_DEAD_LETTERS, *_columns(
            [(storable(d.subject, DEAD_LETTER_SUBJECT_CHARS), d.stream_seq, *payload_digest(d.raw),
              storable(d.error, DEAD_LETTER_ERROR_CHARS),
              None if d.event_id is None else storable(d.event_id, DEAD_LETTER_SUBJECT_CHARS), d.reason)
             for d in batch.dead], 8))
        result.dead = len(batch.dead)
    touched = sorted({run_ids[r] for r in {e.run_id for e in tasks}})
    if touched:
        await conn.execute(RUN_STATUS, touched, DONE)
    return result
