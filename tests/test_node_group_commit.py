"""The node journal's group commit stays durable.

Events recorded in one turn of the event loop share one SQLite transaction;
an event is committed before anything that depends on it happens (the next
step on the phone, the ack of a command, the publish). Checked from outside
the agent: a second SQLite connection on the journal file, the requests that
reach the real simulator, and a `kill -9` of a node process while its events
are committed but unpublished, folded into PostgreSQL afterwards.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest

from contracts.events import Event, NodeHeartbeat, StepEvent
from contracts.ids import new_id, utcnow
from doai.embedded import EmbeddedNats
from services.node.artifacts import LocalArtifactStore
from services.node.executor import Executor
from services.node.factory import build_driver
from services.node.journal import Journal
from services.node.settings import NodeSettings
from services.simulator import Simulator, SimulatorConfig
from tests.aggregator_support import aggregator_over, consumer_settled, migrate, poll, seed_run
from tests.node_support import (
    NodeProcess,
    assert_complete_and_exact,
    broadcast,
    connect,
    fold,
    provision_node,
    read_events,
    recipe,
    send,
    until,
)
from tests.test_node_agent import wait_terminal

NODE = "node-gc"


def heartbeat() -> NodeHeartbeat:
    return NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id=NODE, slots=1, running=0, queued=0,
                         vendor_connected=True, version="t")


def committed_outbox(path: Path) -> list[str]:
    """The event ids committed to the journal's outbox, read by a second connection (as after a crash)."""
    db = sqlite3.connect(path)
    try:
        return [r[0] for r in db.execute("SELECT event_id FROM outbox ORDER BY id")]
    finally:
        db.close()


async def test_events_of_one_loop_turn_share_one_commit_and_are_invisible_until_it(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    try:
        before = journal.commits
        events = [heartbeat() for _ in range(20)]
        for e in events:
            journal.add_event(e)
        assert journal.staged == 20
        assert committed_outbox(path) == []  # staged only: a crash now loses them, and nothing acted on them yet
        await journal.durable()
        assert committed_outbox(path) == [e.event_id for e in events]
        assert journal.commits == before + 1
        await journal.durable()  # nothing staged: returns at once, no empty commit
        assert journal.commits == before + 1
    finally:
        journal.close()


async def test_without_a_waiter_the_next_loop_turn_commits(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    try:
        e = heartbeat()
        journal.add_event(e)
        await until(lambda: committed_outbox(path) == [e.event_id], 5, "the staged event committed", 0.01)
        assert journal.staged == 0
    finally:
        journal.close()


async def test_a_failed_commit_reaches_its_waiters_and_keeps_the_rows_for_the_next(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    journal._db.execute("PRAGMA busy_timeout = 50")
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the journal's commit fails
        e = heartbeat()
        journal.add_event(e)
        cancelled = asyncio.create_task(journal.durable())
        await asyncio.sleep(0)
        cancelled.cancel()  # a waiter cancelled meanwhile must not disturb the others
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await journal.durable()
        assert journal.staged == 1 and committed_outbox(path) == []
        blocker.execute("ROLLBACK")
        journal.add_event(second := heartbeat())
        await journal.durable()
        assert committed_outbox(path) == [e.event_id, second.event_id]  # in the order recorded
    finally:
        blocker.close()
        journal.close()


def test_without_an_event_loop_each_event_is_committed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    try:
        e = heartbeat()
        journal.add_event(e)
        assert committed_outbox(path) == [e.event_id] and journal.staged == 0
    finally:
        journal.close()


def test_the_journal_file_refuses_a_task_state_the_node_never_writes(tmp_path: Path) -> None:
    """Job states are `TaskState` in the file too: a row with another state cannot be written."""
    path = tmp_path / "j.sqlite"
    journal = Journal(path)
    b = broadcast(NODE, recipe([{"id": "r", "action": "report"}]), ["A"])
    (job,) = journal.add_broadcast(b)
    journal.close()
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            db.execute("UPDATE jobs SET state = 'lost'")  # `lost` is the aggregator's, never a node's
        assert db.execute("SELECT state FROM jobs").fetchall() == [("queued",)]
    finally:
        db.close()
    assert job.state == "queued"


class SpyDriver:
    """The real vendor driver; before each request goes to the simulator, what the journal file holds."""

    def __init__(self, driver: Any, path: Path) -> None:
        self._driver = driver
        self._path = path
        # (serial, request, committed jobs.seq, the last event of the device in the outbox)
        self.seen: list[tuple[str, str, int, Event | None]] = []

    def _look(self, serial: str, request: str) -> None:
        db = sqlite3.connect(self._path)
        try:
            (seq,) = db.execute("SELECT seq FROM jobs WHERE serial = ?", (serial,)).fetchone()
            rows = db.execute("SELECT payload FROM outbox ORDER BY id").fetchall()
        finally:
            db.close()
        mine = [e for e in (msgspec.json.decode(r[0], type=Event) for r in rows)
                if getattr(e, "device_serial", None) == serial]
        self.seen.append((serial, request, seq, mine[-1] if mine else None))

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str:
        self._look(serial, "shell")
        result: str = await self._driver.shell(serial, command, timeout_s=timeout_s)
        return result

    async def press_key(self, serial: str, key: Any) -> None:
        self._look(serial, "press_key")
        await self._driver.press_key(serial, key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)


async def test_a_step_reaches_the_simulator_only_after_its_events_are_committed(tmp_path: Path) -> None:
    """Each request to the phone finds, in the journal file, the job's `seq` and its step's `started`
    event committed: everything the executor recorded before the step is durable before the step acts."""
    steps = [
        {"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
        {"id": "home", "action": "keyevent", "key": "home"},
        {"id": "battery", "action": "adb_shell", "command": ["dumpsys", "battery"]},
        {"id": "report", "action": "report"},
    ]
    async with Simulator(SimulatorConfig(devices=3, seed=3, default_latency_ms=1.0)) as sim:
        settings = NodeSettings(node_id=NODE, nats_url="nats://127.0.0.1:1", vendor_url=sim.url,
                                state_dir=tmp_path / "state", artifact_dir=tmp_path / "artifacts")
        journal = Journal(settings.journal_path)
        real = build_driver(settings)
        spy = SpyDriver(real, settings.journal_path)
        executor = Executor(node_id=NODE, journal=journal, driver=spy,  # type: ignore[arg-type]
                            store=LocalArtifactStore(settings.artifact_dir), spool_dir=settings.spool_dir,
                            path_template=settings.path_template)
        try:
            serials = sorted(sim.devices)
            b = broadcast(NODE, recipe(steps), serials)
            jobs = journal.add_broadcast(b)
            states = await asyncio.gather(*(executor.run(job, b) for job in jobs))  # three devices at once
        finally:
            await real.close()
            journal.close()
    assert states == ["succeeded"] * 3
    assert len(spy.seen) == 3 * 3  # three device requests per workflow
    for serial in serials:
        seen = [(req, seq, e) for s, req, seq, e in spy.seen if s == serial]
        assert [req for req, _, _ in seen] == ["shell", "press_key", "shell"]
        for index, (_, seq, last) in enumerate(seen):
            # seq 1 = running, then started/ok per step: step `index` starts with seq 2 + 2 * index.
            assert seq == 2 + 2 * index, (serial, index, seq)
            assert isinstance(last, StepEvent) and last.seq == seq
            assert (last.step_id, last.state) == (steps[index]["id"], "started")


async def test_kill_9_with_events_committed_but_unpublished_loses_and_duplicates_nothing_in_postgresql(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path
) -> None:
    """NATS goes away, so every event the node records stays in its journal; the node is killed with
    SIGKILL while tasks run; NATS and the node come back. JetStream then holds every task's events with
    `seq` 1..n (none lost, none twice) and PostgreSQL folded each event once: every task succeeded."""
    devices = 8
    steps = [
        {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
        {"id": "work", "action": "wait", "ms": 300},
        {"id": "home", "action": "keyevent", "key": "home"},
        {"id": "report", "action": "report"},
    ]
    async with Simulator(SimulatorConfig(devices=devices, seed=7, default_latency_ms=2.0)) as sim:
        serials = sorted(sim.devices)
        node = NodeProcess(node_id=NODE, nats_url=nats_server.url, vendor_url=sim.url, state_dir=tmp_path / "state",
                           artifact_dir=tmp_path / "artifacts", log_path=tmp_path / "node.jsonl", slots=3)
        journal_path = tmp_path / "state" / f"{NODE}.journal.sqlite"
        await migrate(database_url)
        conn = await asyncpg.connect(database_url)
        nc, js = await connect(nats_server.url)
        await provision_node(nats_server.url, NODE)
        b = broadcast(NODE, recipe(steps), serials)
        await seed_run(conn, b.run_id, [(NODE, s) for s in serials], workflow_id=b.workflow_id)
        try:
            node.start()
            await send(js, b)

            async def started() -> bool:
                f = fold(await read_events(js, "doai.evt.*.task.*"))
                return sum(1 for e in f.final.values() if e.state == "running") >= 2

            await until(started, 60, "tasks running", interval_s=0.05)
            await nc.close()
            nats_server.stop()
            # The node goes on without the broker: its events are committed to the journal, unpublished.
            await until(lambda: len(committed_outbox(journal_path)) >= 15, 30,
                        "events committed while NATS is down", interval_s=0.05)
            node.kill9()
            unpublished = committed_outbox(journal_path)
            assert len(unpublished) >= 15

            nats_server.start()
            nc, js = await connect(nats_server.url)
            node.start()
            f = await wait_terminal(js, b.run_id, serials, 90)
            await until(lambda: committed_outbox(journal_path) == [], 30, "outbox drained")
            f = fold(await read_events(js))
            stored = await read_events(js)
        finally:
            node.stop()
            await nc.close()

        assert_complete_and_exact(f, b.run_id, serials)
        assert f.counts(b.run_id) == {"succeeded": devices}
        assert set(unpublished) <= set(f.event_ids)  # every event committed before the kill got out

        async with aggregator_over(nats_server.url, database_url, []) as running:
            await poll(lambda: consumer_settled(running.js), 60, "the aggregator folded the stream")
        try:
            tasks = await conn.fetch("SELECT device_serial, state FROM run_tasks WHERE run_id = $1",
                                     uuid.UUID(b.run_id))
            processed = await conn.fetchval("SELECT count(*) FROM processed_events")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
            step_rows = await conn.fetch("SELECT device_serial, step_id, state FROM step_results"
                                         " WHERE run_id = $1", uuid.UUID(b.run_id))
        finally:
            await conn.close()
    assert sorted((r["device_serial"], r["state"]) for r in tasks) == [(s, "succeeded") for s in serials]
    assert dead == 0
    assert processed == len(stored) == len({e.event_id for e in stored})  # each stored once, folded once
    assert sorted((r["device_serial"], r["step_id"], r["state"]) for r in step_rows) == sorted(
        (s, st["id"], "ok") for s in serials for st in steps)
