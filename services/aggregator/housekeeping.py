"""The aggregator's housekeeping loop (supervised): lost tasks and retention of its own tables.

Every `every_s` seconds, each in its own transaction:

* **Lost tasks.** An open task (`queued`, `running`, `interrupted`) whose node
  has sent no heartbeat for `lost_after_s` becomes `lost`; its `seq` is kept,
  so the node's next report on it (finished, interrupted, running again)
  outranks `lost` in the fold, and a replayed old event does not (same seq,
  not terminal). A task of a *cancelled* run on such a node (open or already
  `lost`) becomes `cancelled` instead: the run was cancelled and its node
  cannot say otherwise. The run's status is then derived again (`lost` counts
  as done: a run whose open tasks are all lost reads `completed`).
  Locks follow the fold's global order (the runs first, by run_id), so a
  sweep and a fold of the same run serialise instead of deadlocking.
* **processed_events** older than `processed_keep_s` are deleted. That must
  be longer than the event stream's `max_age` (checked by the settings), so a
  message JetStream can still redeliver is still recognised.
* **dead_letters** older than `dead_keep_s` are deleted, and beyond the newest
  `dead_max_rows` rows too (a flood cannot fill the disk).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg
import structlog

from contracts.events import TaskState
from runtime import db
from runtime.aio import pause
from services.aggregator.fold import DONE, RUN_STATUS

log = structlog.get_logger(__name__)

OPEN_STATES: list[TaskState] = ["queued", "running", "interrupted"]

# The runs with a task to mark: open on a silent node, or (cancelled run) lost or open on a silent node.
_CANDIDATE_RUNS = """
SELECT DISTINCT t.run_id
FROM run_tasks t
JOIN runs r USING (run_id)
JOIN nodes n ON n.node_id = t.node_id
WHERE (t.state = ANY($2::text[]) AND n.last_seen < now() - make_interval(secs => $1)
       AND t.updated_at < now() - make_interval(secs => $1))
   OR (t.state = 'lost' AND r.status = 'cancelled')
ORDER BY t.run_id
"""

_LOCK_RUNS = "SELECT run_id, status FROM runs WHERE run_id = ANY($1::uuid[]) ORDER BY run_id FOR UPDATE"

_MARK_LOST = """
UPDATE run_tasks t SET state = 'lost', lost_at = now(), updated_at = now(),
       error = 'node_lost: no heartbeat from node ' || t.node_id || ' for '
               || round(extract(epoch FROM now() - n.last_seen)) || ' s'
FROM nodes n
WHERE t.run_id = ANY($1::uuid[]) AND n.node_id = t.node_id AND t.state = ANY($3::text[])
  AND n.last_seen < now() - make_interval(secs => $2) AND t.updated_at < now() - make_interval(secs => $2)
RETURNING t.run_id, t.node_id, t.device_serial
"""

_CANCEL_LOST = """
UPDATE run_tasks t SET state = 'cancelled', lost_at = NULL, updated_at = now(),
       error = 'run cancelled while node ' || t.node_id || ' was lost'
FROM nodes n
WHERE t.run_id = ANY($1::uuid[]) AND n.node_id = t.node_id
  AND (t.state = 'lost' OR (t.state = ANY($3::text[]) AND n.last_seen < now() - make_interval(secs => $2)))
RETURNING t.run_id, t.node_id, t.device_serial
"""

# Bounded statements (`$2` rows each), repeated until done: a large backlog is no long transaction.
_PRUNE_PROCESSED = """
DELETE FROM processed_events WHERE event_id IN (
    SELECT event_id FROM processed_events WHERE processed_at < now() - make_interval(secs => $1) LIMIT $2)
"""
_PRUNE_DEAD_AGE = """
DELETE FROM dead_letters WHERE id IN (
    SELECT id FROM dead_letters WHERE received_at < now() - make_interval(secs => $1) LIMIT $2)
"""
_PRUNE_DEAD_COUNT = """
DELETE FROM dead_letters WHERE id < (
    SELECT id FROM dead_letters ORDER BY id DESC OFFSET $1 - 1 LIMIT 1)
"""


@dataclass
class SweepResult:
    lost: int = 0
    cancelled: int = 0


class Housekeeping:
    def __init__(self, pool: asyncpg.Pool, *, lost_after_s: float, processed_keep_s: float, dead_keep_s: float,
                 dead_max_rows: int, every_s: float = 5.0, batch: int = 10_000) -> None:
        self._pool = pool
        self.lost_after_s = lost_after_s
        self.processed_keep_s = processed_keep_s
        self.dead_keep_s = dead_keep_s
        self.dead_max_rows = dead_max_rows
        self.every_s = every_s
        self.batch = batch

    async def sweep_lost(self) -> SweepResult:
        """Mark the open tasks of silent nodes `lost` (or `cancelled` in a cancelled run)."""
        result = SweepResult()
        async with self._pool.acquire() as conn, conn.transaction():
            runs = [r["run_id"] for r in await conn.fetch(_CANDIDATE_RUNS, self.lost_after_s, OPEN_STATES)]
            if not runs:
                return result
            locked = await conn.fetch(_LOCK_RUNS, runs)
            cancelled = [r["run_id"] for r in locked if r["status"] == "cancelled"]
            active = [r["run_id"] for r in locked if r["status"] != "cancelled"]
            if cancelled:
                rows = await conn.fetch(_CANCEL_LOST, cancelled, self.lost_after_s, OPEN_STATES)
                result.cancelled = len(rows)
                for r in rows:
                    log.warning("task cancelled: its run was cancelled while its node was lost",
                                run_id=str(r["run_id"]), node_id=r["node_id"], device_serial=r["device_serial"])
            if active:
                rows = await conn.fetch(_MARK_LOST, active, self.lost_after_s, OPEN_STATES)
                result.lost = len(rows)
                for r in rows:
                    log.warning("task lost: its node sent no heartbeat within the grace period",
                                run_id=str(r["run_id"]), node_id=r["node_id"], device_serial=r["device_serial"],
                                lost_after_s=self.lost_after_s)
                if rows:
                    await conn.execute(RUN_STATUS, sorted({r["run_id"] for r in rows}), DONE)
        return result

    async def _drain(self, sql: str, keep_s: float) -> int:
        return await db.delete_in_batches(self._pool, sql, keep_s, self.batch)

    async def prune(self) -> dict[str, int]:
        """Delete what is past its retention; returns rows deleted per table."""
        out: dict[str, int] = {}
        out["processed_events"] = await self._drain(_PRUNE_PROCESSED, self.processed_keep_s)
        dead = await self._drain(_PRUNE_DEAD_AGE, self.dead_keep_s)
        dead += db.rows_affected(await self._pool.execute(_PRUNE_DEAD_COUNT, self.dead_max_rows))
        out["dead_letters"] = dead
        return out

    async def run(self, stop: asyncio.Event) -> None:
        log.info("housekeeping started", lost_after_s=self.lost_after_s, every_s=self.every_s,
                 processed_keep_s=self.processed_keep_s, dead_keep_s=self.dead_keep_s,
                 dead_max_rows=self.dead_max_rows)
        while not stop.is_set():
            await self.sweep_lost()
            pruned = await self.prune()
            if any(pruned.values()):
                log.info("retention: rows pruned", **pruned)
            if await pause(stop, self.every_s):
                return
