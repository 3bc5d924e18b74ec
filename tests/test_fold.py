"""The fold is idempotent and order-independent (real PostgreSQL)."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest

from contracts.events import (
    ArtifactEvent,
    DeviceInfo,
    DeviceInventoryEvent,
    Event,
    NodeHeartbeat,
    StepEvent,
    TaskEvent,
)
from contracts.ids import new_id
from runtime import db
from services.aggregator.fold import Batch, Incoming, fold

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    pool = await db.create_pool(database_url)
    await db.migrate(pool)
    await pool.close()
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


async def make_run(conn: asyncpg.Connection, serials: list[str]) -> str:
    run_id = str(uuid.uuid4())
    await conn.execute("INSERT INTO workflows (workflow_id, version, recipe, digest) VALUES ('w', 1, '{}', 'd')"
                       " ON CONFLICT DO NOTHING")
    await conn.execute("INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms)"
                       " VALUES ($1, 'w', 1, '{}', '{}')", uuid.UUID(run_id))
    await conn.executemany("INSERT INTO run_tasks (run_id, node_id, device_serial) VALUES ($1, 'n1', $2)",
                           [(uuid.UUID(run_id), s) for s in serials])
    return run_id


def device_events(run_id: str, serial: str, final: str) -> list[Event]:
    seq = iter(range(1, 100))
    base = {"node_id": "n1", "run_id": run_id, "device_serial": serial}
    events: list[Event] = [TaskEvent(event_id=new_id(), ts=T0, seq=next(seq), state="running", **base)]
    for i, step in enumerate(["a", "b"]):
        at = T0 + timedelta(seconds=i + 1)
        events.append(StepEvent(event_id=new_id(), ts=at, seq=next(seq), step_id=step, index=i, action="wait",
                                state="started", **base))
        events.append(StepEvent(event_id=new_id(), ts=at + timedelta(milliseconds=500), seq=next(seq),
                                step_id=step, index=i, action="wait", state="ok", output=f"out-{step}", **base))
    events.append(ArtifactEvent(event_id=new_id(), ts=T0 + timedelta(seconds=3), seq=next(seq), step_id="b",
                                store="local", key=f"{run_id}/{serial}.png", uri="file:///k", bytes=5,
                                sha256="x", **base))
    events.append(TaskEvent(event_id=new_id(), ts=T0 + timedelta(seconds=4), seq=next(seq),
                            state=final, error=None if final == "succeeded" else "boom", **base))  # type: ignore[arg-type]
    return events


async def apply(conn: asyncpg.Connection, events: list[Event]) -> None:
    async with conn.transaction():
        await fold(conn, Batch(items=[Incoming(e, "s", None, msgspec.json.encode(e)) for e in events]))


async def snapshot(conn: asyncpg.Connection, run_id: str) -> list[list[tuple[object, ...]]]:
    rid = uuid.UUID(run_id)
    return [
        [tuple(r) for r in await conn.fetch(
            "SELECT device_serial, state, attempt, seq, started_at, finished_at, error FROM run_tasks"
            " WHERE run_id = $1 ORDER BY device_serial", rid)],
        [tuple(r) for r in await conn.fetch(
            "SELECT device_serial, step_id, state, seq, started_at, finished_at, output FROM step_results"
            " WHERE run_id = $1 ORDER BY device_serial, step_id", rid)],
        [tuple(r) for r in await conn.fetch(
            "SELECT device_serial, split_part(key, '/', 2) FROM artifacts WHERE run_id = $1 ORDER BY key", rid)],
        [tuple(r) for r in await conn.fetch("SELECT status FROM runs WHERE run_id = $1", rid)],
    ]


async def test_shuffled_and_duplicated_events_fold_to_the_same_state(conn: asyncpg.Connection) -> None:
    serials = ["D1", "D2", "D3"]
    in_order = await make_run(conn, serials)
    shuffled = await make_run(conn, serials)
    finals = {"D1": "succeeded", "D2": "failed", "D3": "timed_out"}
    events = {rid: [e for s in serials for e in device_events(rid, s, finals[s])] for rid in (in_order, shuffled)}

    for e in events[in_order]:
        await apply(conn, [e])
    rng = random.Random(7)
    noisy = events[shuffled] + rng.sample(events[shuffled], k=len(events[shuffled]) // 2)
    rng.shuffle(noisy)
    for i in range(0, len(noisy), 4):
        await apply(conn, noisy[i:i + 4])

    expected = await snapshot(conn, in_order)
    got = await snapshot(conn, shuffled)
    assert got == expected
    tasks = expected[0]
    assert [t[1] for t in tasks] == ["succeeded", "failed", "timed_out"]
    assert all(t[4] == T0 and t[5] == T0 + timedelta(seconds=4) for t in tasks)
    assert expected[3] == [("completed",)]


async def test_a_late_running_event_does_not_reopen_a_finished_task(conn: asyncpg.Connection) -> None:
    run_id = await make_run(conn, ["D1"])
    running, *_, done = device_events(run_id, "D1", "succeeded")
    await apply(conn, [done])
    await apply(conn, [running])
    state, started, finished = await conn.fetchrow(
        "SELECT state, started_at, finished_at FROM run_tasks WHERE run_id = $1", uuid.UUID(run_id))
    assert (state, started, finished) == ("succeeded", T0, T0 + timedelta(seconds=4))


async def test_a_replayed_event_changes_nothing_and_is_counted_as_skipped(conn: asyncpg.Connection) -> None:
    run_id = await make_run(conn, ["D1"])
    events = device_events(run_id, "D1", "failed")
    await apply(conn, events)
    before = await snapshot(conn, run_id)
    async with conn.transaction():
        result = await fold(conn, Batch(items=[Incoming(e, "s", None, b"") for e in events + events]))
    assert (result.applied, result.skipped) == (0, 2 * len(events))
    assert await snapshot(conn, run_id) == before
    assert await conn.fetchval("SELECT count(*) FROM processed_events") == len(events)


async def test_a_higher_seq_non_terminal_event_never_reopens_a_terminal_task_in_any_order(
    conn: asyncpg.Connection,
) -> None:
    base = {"node_id": "n1", "device_serial": "D1"}
    finals = []
    for order in ([0, 1], [1, 0]):
        run_id = await make_run(conn, ["D1"])
        done = TaskEvent(event_id=new_id(), ts=T0, seq=5, state="succeeded", run_id=run_id, **base)
        stray = TaskEvent(event_id=new_id(), ts=T0 + timedelta(seconds=9), seq=6, state="running", run_id=run_id,
                          **base)
        for i in order:
            await apply(conn, [[done, stray][i]])
        finals.append(tuple(await conn.fetchrow("SELECT state, seq FROM run_tasks WHERE run_id = $1",
                                                uuid.UUID(run_id))))
    assert finals == [("succeeded", 5), ("succeeded", 5)]


async def test_run_status_and_finish_time_are_derived_from_the_tasks(conn: asyncpg.Connection) -> None:
    run_id = await make_run(conn, ["D1", "D2"])
    d1 = device_events(run_id, "D1", "succeeded")
    d2 = device_events(run_id, "D2", "failed")
    await apply(conn, d1)
    assert await conn.fetchval("SELECT status FROM runs WHERE run_id = $1", uuid.UUID(run_id)) == "running"
    await apply(conn, d2[:-1])
    await apply(conn, d2[-1:])
    row = await conn.fetchrow("SELECT * FROM run_summary WHERE run_id = $1", uuid.UUID(run_id))
    assert (row["status"], row["finished_at"]) == ("completed", T0 + timedelta(seconds=4))
    assert (row["tasks"], row["succeeded"], row["failed"], row["done"], row["success_rate"]) == (2, 1, 1, 2, 0.5)


def inventory(node: str, at: datetime, serials: list[str], status: str = "online") -> DeviceInventoryEvent:
    return DeviceInventoryEvent(event_id=new_id(), ts=at, node_id=node, vendor_available=True,
                                devices=[DeviceInfo(serial=s, status=status, model="m") for s in serials])


async def test_device_inventory_folds_to_the_same_state_in_any_order(
    conn: asyncpg.Connection, database_url: str
) -> None:
    node = f"n-{uuid.uuid4().hex[:6]}"
    events: list[Event] = [
        inventory(node, T0, ["A", "B", "C"]),
        inventory(node, T0 + timedelta(seconds=1), ["A", "B"], status="offline"),
        inventory(node, T0 + timedelta(seconds=2), ["A", "C"]),  # B left; C came back
        DeviceInventoryEvent(event_id=new_id(), ts=T0 + timedelta(seconds=3), node_id=node, vendor_available=False,
                             devices=[]),  # vendor down: says nothing
        NodeHeartbeat(event_id=new_id(), ts=T0, node_id=node, slots=20, running=3, queued=1, vendor_connected=True,
                      version="1"),
        NodeHeartbeat(event_id=new_id(), ts=T0 + timedelta(seconds=2), node_id=node, slots=20, running=1,
                      queued=0, vendor_connected=True, version="1"),
    ]
    states = []
    for seed in range(6):
        await conn.execute("DELETE FROM devices WHERE node_id = $1", node)
        await conn.execute("DELETE FROM nodes WHERE node_id = $1", node)
        await conn.execute("DELETE FROM node_inventories WHERE node_id = $1", node)
        await conn.execute("DELETE FROM processed_events")
        shuffled = list(events)
        random.Random(seed).shuffle(shuffled)
        size = 1 + seed % 3
        for i in range(0, len(shuffled), size):
            await apply(conn, shuffled[i:i + size])
        states.append((
            [tuple(r) for r in await conn.fetch(
                "SELECT serial, status, last_seen FROM devices WHERE node_id = $1 ORDER BY serial", node)],
            tuple(await conn.fetchrow("SELECT running, last_seen FROM nodes WHERE node_id = $1", node)),
        ))
    assert all(s == states[0] for s in states)
    assert states[0] == (
        [("A", "online", T0 + timedelta(seconds=2)), ("B", "gone", T0 + timedelta(seconds=1)),
         ("C", "online", T0 + timedelta(seconds=2))],
        (1, T0 + timedelta(seconds=2)),
    )
