"""The node's local journal (SQLite, WAL): broadcasts, device jobs and the event outbox.

A broadcast is acked on JetStream only after `add_broadcast` committed every
device job of it; an event is written to the outbox in the same transaction
that advances its job's `seq`, so after a crash the journal says exactly what
was started and what still has to be published.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from contracts.commands import RunBroadcast
from contracts.events import Event
from contracts.subjects import evt_subject

_SCHEMA = """
CREATE TABLE IF NOT EXISTS broadcasts (
    run_id     TEXT PRIMARY KEY,
    payload    BLOB NOT NULL,
    cancelled  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    run_id   TEXT NOT NULL,
    serial   TEXT NOT NULL,
    ord      INTEGER NOT NULL,
    state    TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    seq      INTEGER NOT NULL,
    PRIMARY KEY (run_id, serial)
);
-- Every serial this node's driver has listed: a broadcast's device must be one of them.
CREATE TABLE IF NOT EXISTS known_devices (
    serial   TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS outbox (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    subject   TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    payload   BLOB NOT NULL
);
"""

_encoder = msgspec.json.Encoder()


@dataclass
class Job:
    """One workflow on one device: the unit the scheduler queues."""

    run_id: str
    serial: str
    ord: int
    state: str = "queued"
    attempt: int = 1
    seq: int = 0
    cancel_requested: bool = field(default=False, compare=False)
    queued_at: float = field(default=0.0, compare=False)  # scheduler clock, set when queued


@dataclass(frozen=True)
class OutboxRow:
    id: int
    subject: str
    event_id: str
    payload: bytes


@dataclass(frozen=True)
class Pruned:
    """What one `Journal.prune` removed."""

    broadcasts: int  # payloads emptied (the run id is kept as "seen")
    jobs: int
    seen: int  # run ids forgotten


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(broadcasts)")}
        if "received_at" not in columns:  # a journal from before pruning: its rows count as received now
            self._db.execute("ALTER TABLE broadcasts ADD COLUMN received_at REAL NOT NULL DEFAULT 0")
            self._db.execute("UPDATE broadcasts SET received_at = ?", (time.time(),))
        self._broadcasts: dict[str, RunBroadcast] = {}
        self._known: set[str] = {row[0] for row in self._db.execute("SELECT serial FROM known_devices")}

    def close(self) -> None:
        self._db.close()

    # -- devices ------------------------------------------------------------------

    def note_devices(self, serials: Iterable[str]) -> None:
        """Remember serials the driver listed (kept across restarts, so a vendor outage at start-up
        does not make this node's own devices unknown)."""
        new = set(serials) - self._known
        if new:
            self._db.executemany("INSERT OR IGNORE INTO known_devices (serial) VALUES (?)", [(s,) for s in new])
            self._known |= new

    def is_known_device(self, serial: str) -> bool:
        return serial in self._known

    # -- broadcasts and jobs -------------------------------------------------

    def add_broadcast(self, broadcast: RunBroadcast) -> list[Job]:
        """Store a broadcast and its device jobs; return the jobs that are new (redelivery: none)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute(
                "INSERT OR IGNORE INTO broadcasts (run_id, payload, received_at) VALUES (?, ?, ?)",
                (broadcast.run_id, _encoder.encode(broadcast), time.time()),
            )
            if cur.rowcount == 0:
                db.execute("COMMIT")
                return []
            (base,) = db.execute("SELECT COALESCE(MAX(ord), 0) FROM jobs").fetchone()
            jobs = [Job(broadcast.run_id, serial, base + i + 1) for i, serial in enumerate(broadcast.devices)]
            db.executemany(
                "INSERT INTO jobs (run_id, serial, ord, state, attempt, seq) VALUES (?, ?, ?, ?, ?, ?)",
                [(j.run_id, j.serial, j.ord, j.state, j.attempt, j.seq) for j in jobs],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._broadcasts[broadcast.run_id] = broadcast
        return jobs

    def broadcast(self, run_id: str) -> RunBroadcast:
        cached = self._broadcasts.get(run_id)
        if cached is None:
            row = self._db.execute("SELECT payload FROM broadcasts WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            cached = self._broadcasts[run_id] = msgspec.json.decode(row[0], type=RunBroadcast)
        return cached

    def mark_cancelled(self, run_id: str) -> bool:
        """Remember that `run_id` is cancelled; return whether its broadcast was known.

        A cancel for a run not seen yet leaves an empty, cancelled placeholder, so
        the broadcast, should it be delivered later, adds no job.
        """
        cur = self._db.execute("UPDATE broadcasts SET cancelled = 1 WHERE run_id = ?", (run_id,))
        if cur.rowcount:
            return True
        self._db.execute("INSERT OR IGNORE INTO broadcasts (run_id, payload, cancelled, received_at)"
                         " VALUES (?, x'', 1, ?)", (run_id, time.time()))
        return False

    def is_cancelled(self, run_id: str) -> bool:
        row = self._db.execute("SELECT cancelled FROM broadcasts WHERE run_id = ?", (run_id,)).fetchone()
        return bool(row and row[0])

    def prune(self, max_age_s: float, seen_max_age_s: float, now: float | None = None) -> Pruned:
        """Drop finished work older than `max_age_s`; forget run ids older than `seen_max_age_s`.

        A run received more than `max_age_s` ago whose jobs are all finished loses its jobs and its
        broadcast payload; its run id stays (a "seen" row of a few bytes), so a redelivered broadcast
        (a recreated consumer redelivers the whole DOAI_CMD stream, kept 7 days) adds nothing. The
        run id itself is forgotten after `seen_max_age_s`, which must be longer than the stream's
        max_age. A run with an unfinished job is never touched, and the outbox is never touched here
        (unsent events leave only when published).
        """
        now = time.time() if now is None else now
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            old = [r for (r,) in db.execute(
                "SELECT run_id FROM broadcasts b WHERE received_at < ? AND (length(payload) > 0 OR EXISTS ("
                "  SELECT 1 FROM jobs j WHERE j.run_id = b.run_id)) AND NOT EXISTS ("
                "  SELECT 1 FROM jobs j WHERE j.run_id = b.run_id"
                "  AND j.state IN ('queued', 'running', 'interrupted'))", (now - max_age_s,))]
            jobs = 0
            for run_id in old:
                jobs += db.execute("DELETE FROM jobs WHERE run_id = ?", (run_id,)).rowcount
                db.execute("UPDATE broadcasts SET payload = x'' WHERE run_id = ?", (run_id,))
            seen = db.execute(
                "DELETE FROM broadcasts WHERE received_at < ? AND length(payload) = 0 AND NOT EXISTS ("
                "  SELECT 1 FROM jobs j WHERE j.run_id = broadcasts.run_id)", (now - seen_max_age_s,)).rowcount
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for run_id in old:
            self._broadcasts.pop(run_id, None)
        return Pruned(broadcasts=len(old), jobs=jobs, seen=seen)

    def unfinished_jobs(self) -> list[Job]:
        """Jobs still `queued`, `running` or `interrupted`, in arrival order (for recovery after a restart)."""
        rows = self._db.execute(
            "SELECT run_id, serial, ord, state, attempt, seq FROM jobs"
            " WHERE state IN ('queued', 'running', 'interrupted') ORDER BY ord"
        ).fetchall()
        return [Job(*row) for row in rows]

    def record(self, job: Job, state: str | None, event: Event) -> None:
        """Advance `job` (seq, and state when given) and queue `event` for publishing, atomically."""
        if state is not None:
            job.state = state
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "UPDATE jobs SET state = ?, attempt = ?, seq = ? WHERE run_id = ? AND serial = ?",
                (job.state, job.attempt, job.seq, job.run_id, job.serial),
            )
            self._insert_event(event)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- outbox ----------------------------------------------------------------

    def _insert_event(self, event: Event) -> None:
        kind = type(event).__struct_config__.tag
        self._db.execute(
            "INSERT INTO outbox (subject, event_id, payload) VALUES (?, ?, ?)",
            (evt_subject(event.node_id, kind, getattr(event, "run_id", None)),  # type: ignore[arg-type]
             event.event_id, _encoder.encode(event)),
        )

    def add_event(self, event: Event) -> None:
        """Queue an event that belongs to no job (inventory, heartbeat)."""
        self._insert_event(event)

    def outbox_batch(self, limit: int) -> list[OutboxRow]:
        rows = self._db.execute(
            "SELECT id, subject, event_id, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxRow(*row) for row in rows]

    def outbox_delete(self, ids: list[int]) -> None:
        if ids:
            marks = ",".join("?" * len(ids))
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", ids)

    def outbox_size(self) -> int:
        (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)
