"""The node's local journal (SQLite, WAL): broadcasts, device jobs and the event outbox.

A broadcast is acked on JetStream only after `add_broadcast` committed every
device job of it; an event is written to the outbox in the same transaction
that advances its job's `seq`, so after a crash the journal says exactly what
was started and what still has to be published.

Group commit: `record` and `add_event` stage their rows in memory; every row
staged during one turn of the event loop is written in one transaction, at the
start of the next turn (`flush`). A caller whose next action depends on an event
(the executor before a step reaches the phone) awaits `durable()`, which returns
once that commit is done; every other write of the journal (a broadcast, a
cancel, a read of the outbox or of unfinished jobs) commits the staged rows
first, so the file always holds events in the order they were recorded. The
outbox only ever reads committed rows and is woken by each commit (`on_commit`).
Called with no event loop running, `record` and `add_event` commit at once.

Durability: WAL with `synchronous=NORMAL`. A commit is in the WAL file (the
OS's page cache) when it returns, so a crash of the process (kill -9) loses
nothing committed; a power loss or OS crash may lose the last commits (the WAL
is fsynced at checkpoints, not at each commit). Rows staged but not yet
committed are lost with the process, and nothing that depends on them has
happened yet (docs/node.md, "Journal").
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, get_args

import msgspec
import structlog

from contracts.commands import RunBroadcast
from contracts.events import Event, TaskState
from contracts.subjects import evt_subject

log = structlog.get_logger(__name__)

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
    state    TEXT NOT NULL CHECK (state IN ({states})),
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
-- Outbox rows NATS refused for good (over the size limit): kept here, out of the way of the rows behind.
CREATE TABLE IF NOT EXISTS outbox_refused (
    id          INTEGER PRIMARY KEY,
    subject     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    payload     BLOB NOT NULL,
    reason      TEXT NOT NULL,
    refused_at  REAL NOT NULL
);
""".format(states=", ".join(f"'{s}'" for s in get_args(TaskState)))  # older journals: without the CHECK

_encoder = msgspec.json.Encoder()
# What `unfinished_jobs` reads back (its query selects only these), as `TaskState` values.
_UNFINISHED: dict[str, TaskState] = {"queued": "queued", "running": "running", "interrupted": "interrupted"}


@dataclass
class Job:
    """One workflow on one device: the unit the scheduler queues."""

    run_id: str
    serial: str
    ord: int
    state: TaskState = "queued"
    attempt: int = 1
    seq: int = 0
    cancel_requested: bool = field(default=False, compare=False)
    queued_at: float = field(default=0.0, compare=False)  # scheduler clock, set when queued


class OutboxRow(NamedTuple):  # a tuple: built for every event published, so cheap to make
    id: int
    subject: str
    event_id: str
    payload: bytes


class RefusedRow(NamedTuple):
    """An outbox row NATS refused for good, and why."""

    id: int
    subject: str
    event_id: str
    payload: bytes
    reason: str


@dataclass(frozen=True)
class Pruned:
    """What one `Journal.prune` removed."""

    broadcasts: int  # payloads emptied (the run id is kept as "seen")
    jobs: int
    seen: int  # run ids forgotten
    refused: int = 0  # refused outbox rows dropped (kept as long as run ids)


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
        # Staged by `record`/`add_event`/`outbox_delete`, written by the next `flush`.
        self._staged_jobs: dict[tuple[str, str], tuple[str, int, int, str, str]] = {}
        self._staged_events: list[tuple[str, str, bytes]] = []
        self._staged_deletes: list[tuple[int, int]] = []  # id ranges, both ends included
        self._flush_handle: asyncio.Handle | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.on_commit: Callable[[], None] | None = None  # called after each commit that added events
        self.commits = 0  # group commits written (figures for benchmarks and tests)
        self._recorded = 0  # events staged since the journal was opened
        self._committed = 0  # how many of those are committed (they commit in the order staged)

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (`BEGIN IMMEDIATE`): committed when the block ends, rolled back if it raises."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT may have rolled back already
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush_handle = None
            self._db.close()

    # -- group commit --------------------------------------------------------------

    @property
    def staged(self) -> int:
        """Events recorded but not committed yet."""
        return len(self._staged_events)

    def _stage(self) -> None:
        """Have the staged rows committed at the start of the next loop turn (at once without a loop)."""
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_handle = loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        try:
            self.flush()
        except Exception:  # the waiters got the error; the rows stay staged for the next commit
            log.exception("journal commit failed", staged=len(self._staged_events))

    def flush(self) -> None:
        """Commit every staged row now, in one transaction; wake the callers awaiting `durable()`."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        jobs, events, deletes = self._staged_jobs, self._staged_events, self._staged_deletes
        if not (jobs or events or deletes):
            return
        waiters, self._waiters = self._waiters, []
        try:
            with self._immediate() as db:
                if jobs:
                    db.executemany(
                        "UPDATE jobs SET state = ?, attempt = ?, seq = ? WHERE run_id = ? AND serial = ?",
                        jobs.values())
                if events:
                    db.executemany("INSERT INTO outbox (subject, event_id, payload) VALUES (?, ?, ?)", events)
                if deletes:
                    db.executemany("DELETE FROM outbox WHERE id BETWEEN ? AND ?", deletes)
        except BaseException as exc:
            for w in waiters:
                if not w.done():
                    w.set_exception(exc)
            raise
        self._staged_jobs, self._staged_events, self._staged_deletes = {}, [], []
        self._committed = self._recorded
        self.commits += 1
        for w in waiters:
            if not w.done():  # a waiter cancelled meanwhile (its task was cancelled) needs nothing
                w.set_result(None)
        if events and self.on_commit is not None:
            self.on_commit()

    async def durable(self) -> None:
        """Return once every event recorded so far is committed (at once when none is staged).

        The commit of this loop turn's rows is already scheduled (`call_soon`), so yielding once lets it run
        first and resumes the caller right after it, in the same turn; only if that commit failed (or
        was not this turn's) does the caller wait for the next one, which raises what it raises.
        """
        mine = self._recorded
        if self._committed >= mine:
            return
        self._stage()
        await asyncio.sleep(0)
        while self._committed < mine:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._stage()
            await waiter

    # -- devices ------------------------------------------------------------------

    def note_devices(self, serials: Iterable[str]) -> None:
        """Remember serials the driver listed (kept across restarts, so a vendor outage at start-up
        does not make this node's own devices unknown)."""
        new = set(serials) - self._known
        if new:
            self.flush()
            self._db.executemany("INSERT OR IGNORE INTO known_devices (serial) VALUES (?)", [(s,) for s in new])
            self._known |= new

    def is_known_device(self, serial: str) -> bool:
        return serial in self._known

    # -- broadcasts and jobs -------------------------------------------------

    def add_broadcast(self, broadcast: RunBroadcast) -> list[Job]:
        """Store a broadcast and its device jobs; return the jobs that are new (redelivery: none)."""
        self.flush()
        with self._immediate() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO broadcasts (run_id, payload, received_at) VALUES (?, ?, ?)",
                (broadcast.run_id, _encoder.encode(broadcast), time.time()),
            )
            if cur.rowcount == 0:
                return []
            (base,) = db.execute("SELECT COALESCE(MAX(ord), 0) FROM jobs").fetchone()
            jobs = [Job(broadcast.run_id, serial, base + i + 1) for i, serial in enumerate(broadcast.devices)]
            db.executemany(
                "INSERT INTO jobs (run_id, serial, ord, state, attempt, seq) VALUES (?, ?, ?, ?, ?, ?)",
                [(j.run_id, j.serial, j.ord, j.state, j.attempt, j.seq) for j in jobs],
            )
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
        self.flush()
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
        (unsent events leave only when published). Rows NATS refused for good (`outbox_refused`) are
        dropped after `seen_max_age_s`.
        """
        now = time.time() if now is None else now
        self.flush()
        with self._immediate() as db:
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
            refused = db.execute("DELETE FROM outbox_refused WHERE refused_at < ?",
                                 (now - seen_max_age_s,)).rowcount
        for run_id in old:
            self._broadcasts.pop(run_id, None)
        return Pruned(broadcasts=len(old), jobs=jobs, seen=seen, refused=refused)

    def unfinished_jobs(self) -> list[Job]:
        """Jobs still `queued`, `running` or `interrupted`, in arrival order (for recovery after a restart)."""
        self.flush()
        rows = self._db.execute(
            "SELECT run_id, serial, ord, state, attempt, seq FROM jobs"
            " WHERE state IN ('queued', 'running', 'interrupted') ORDER BY ord"
        ).fetchall()
        return [Job(run_id, serial, ord_, _UNFINISHED[state], attempt, seq)
                for run_id, serial, ord_, state, attempt, seq in rows]

    def record(self, job: Job, state: TaskState | None, event: Event) -> None:
        """Advance `job` (seq, and state when given) and queue `event` for publishing, in one commit.

        The job's row and the event are committed together by the next `flush`
        (await `durable()` before acting on them).
        """
        if state is not None:
            job.state = state
        self._staged_jobs[(job.run_id, job.serial)] = (job.state, job.attempt, job.seq, job.run_id, job.serial)
        self._stage_event(event)

    # -- outbox ----------------------------------------------------------------

    def _stage_event(self, event: Event) -> None:
        kind = type(event).__struct_config__.tag
        self._recorded += 1
        self._staged_events.append(
            (evt_subject(event.node_id, kind, getattr(event, "run_id", None)),  # type: ignore[arg-type]
             event.event_id, _encoder.encode(event)))
        self._stage()

    def add_event(self, event: Event) -> None:
        """Queue an event that belongs to no job (inventory, heartbeat); committed like `record`."""
        self._stage_event(event)

    def outbox_batch(self, limit: int) -> list[OutboxRow]:
        """The oldest committed events (whatever is staged is committed first)."""
        self.flush()
        rows = self._db.execute(
            "SELECT id, subject, event_id, payload FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return list(map(OutboxRow._make, rows))

    def outbox_delete(self, ids: list[int]) -> None:
        """Remove published rows in the next commit (a row published twice is stored once: `Nats-Msg-Id`).

        No commit of its own is scheduled: the deletes go with the next events, the outbox's next read,
        or `close`. A crash before then re-publishes those rows, and JetStream drops the duplicates.
        """
        if ids:
            self._staged_deletes.extend((i, i) for i in ids)

    def outbox_delete_through(self, first: int, last: int) -> None:
        """Remove every row with `first <= id <= last`, in the next commit: all of one `outbox_batch`, published.

        No row outside that batch has an id in between: the batch held the lowest ids, and ids only grow
        (AUTOINCREMENT), so a row added since has a higher id than `last`.
        """
        self._staged_deletes.append((first, last))

    def outbox_refuse(self, refused: dict[int, str]) -> None:
        """Move rows NATS will never take (`{row id: reason}`) to `outbox_refused`, now, in one transaction.

        They stay in the journal (nothing is lost: an operator can read them there) but no longer hold up
        the rows behind them, which the outbox publishes in order.
        """
        if not refused:
            return
        self.flush()
        now = time.time()
        with self._immediate() as db:
            db.executemany(
                "INSERT INTO outbox_refused (id, subject, event_id, payload, reason, refused_at)"
                " SELECT id, subject, event_id, payload, ?, ? FROM outbox WHERE id = ?",
                [(reason, now, row_id) for row_id, reason in refused.items()])
            db.executemany("DELETE FROM outbox WHERE id = ?", [(row_id,) for row_id in refused])

    def outbox_requeue_refused(self, batch_bytes: int = 16 * 1024 * 1024,
                               moved_so_far: Callable[[int], None] | None = None) -> int:
        """Put every row set aside back at the end of the outbox, in their order; return how many
        (`doai node-refused --requeue`, once the limit that refused them is right).

        Safe while an agent runs on this journal (another process): the rows get new ids, above every row
        it has read, so no window it is deleting covers them, and its outbox reads them within its 1 s poll.
        Their place in the stream changes, which the fold does not depend on (each task's events carry `seq`).
        The rows move in transactions of about `batch_bytes` of payload (at least one row each; set-aside rows
        are large by nature), so the agent never waits long for the journal's write lock; a row is in exactly
        one of the two tables at every commit, so an interrupted requeue can simply be run again;
        `moved_so_far` hears the running total after each commit (what to report if a later batch fails).
        """
        self.flush()
        moved = 0
        while True:
            with self._immediate() as db:
                last, size = None, 0
                for row_id, length in db.execute("SELECT id, length(payload) FROM outbox_refused ORDER BY id"):
                    if last is not None and size + length > batch_bytes:
                        break
                    last, size = row_id, size + length
                if last is None:
                    return moved
                moved += db.execute("INSERT INTO outbox (subject, event_id, payload) SELECT subject, event_id,"
                                    " payload FROM outbox_refused WHERE id <= ? ORDER BY id", (last,)).rowcount
                db.execute("DELETE FROM outbox_refused WHERE id <= ?", (last,))
            if moved_so_far is not None:
                moved_so_far(moved)

    def outbox_refused_count(self) -> int:
        """How many rows are set aside (the node's heartbeat reports it)."""
        (n,) = self._db.execute("SELECT COUNT(*) FROM outbox_refused").fetchone()
        return int(n)

    def outbox_refused(self) -> list[RefusedRow]:
        """The rows NATS refused for good, oldest first."""
        rows = self._db.execute(
            "SELECT id, subject, event_id, payload, reason FROM outbox_refused ORDER BY id").fetchall()
        return list(map(RefusedRow._make, rows))

    def outbox_size(self) -> int:
        self.flush()
        (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)
