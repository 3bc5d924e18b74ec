"""Helpers for the aggregator tests: a recorded multi-node run, its ground truth, table snapshots.

`FleetRecording` plays what node agents would publish for one run: per device
`running`, the device-smoke steps (`started` / `ok` or a failure), an
artifact, a terminal task event, all with a per-(run, device) `seq`; some
devices fail a step, time out, or are interrupted and retried (attempt 2);
plus inventories (one device leaves a node) and heartbeats. `truth()` is what
the nodes observed last, independent of any fold.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import nats
from nats.js import JetStreamContext

from contracts.events import (
    ArtifactEvent,
    DeviceInfo,
    DeviceInventoryEvent,
    Event,
    NodeHeartbeat,
    StepEvent,
    TaskEvent,
)
from contracts.events import event_kind as kind_of
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM, evt_subject
from runtime import db, jetstream
from services.aggregator.consumer import Aggregator
from tests.conftest import nats_options

STEPS = [("model", "adb_shell"), ("android", "adb_shell"), ("battery", "adb_shell"), ("home", "keyevent"),
         ("open", "open_url"), ("shot", "screenshot"), ("upload", "upload"), ("report", "report")]
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


async def migrate(url: str) -> None:
    pool = await db.create_pool(url, max_size=2)
    try:
        await db.migrate(pool)
    finally:
        await pool.close()


@dataclass
class Truth:
    """Per device task: what its node last reported."""

    tasks: dict[tuple[str, str], tuple[str, int, str | None, str | None]] = field(default_factory=dict)
    steps: dict[tuple[str, str, str], str] = field(default_factory=dict)
    artifacts: set[str] = field(default_factory=set)


class FleetRecording:
    def __init__(self, run_id: str, nodes: int = 3, devices: int = 8, seed: int = 1, start: datetime = T0) -> None:
        self.run_id = run_id
        self.start = start
        self.rng = random.Random(seed)
        self.nodes = [f"node-{i + 1}" for i in range(nodes)]
        self.devices = {n: [f"{n.upper()}-D{j:03d}" for j in range(devices)] for n in self.nodes}
        self.events: list[Event] = []
        self.truth = Truth()
        self._build()

    def pairs(self) -> list[tuple[str, str]]:
        return [(n, s) for n in self.nodes for s in self.devices[n]]

    def _id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _device(self, node: str, serial: str, start: datetime) -> list[Event]:
        rng, seq = self.rng, iter(range(1, 1000))
        base = {"node_id": node, "run_id": self.run_id, "device_serial": serial}
        out: list[Event] = []
        t = start
        fate = rng.choices(["succeeded", "failed", "timed_out", "interrupted", "skipped"], [6, 1, 1, 1, 0.5])[0]
        if fate == "skipped":
            out.append(TaskEvent(event_id=self._id(), ts=t, seq=next(seq), state="skipped",
                                 error="device_offline: not listed", **base))  # type: ignore[arg-type]
            self.truth.tasks[(node, serial)] = ("skipped", 1, "device_offline: not listed", None)
            return out
        attempts = 2 if fate == "interrupted" else 1
        for attempt in range(1, attempts + 1):
            out.append(TaskEvent(event_id=self._id(), ts=t, seq=next(seq), state="running", attempt=attempt,
                                 **base))  # type: ignore[arg-type]
            broken = STEPS[rng.randrange(len(STEPS))][0] if fate in ("failed", "timed_out") else None
            stop_at = rng.randrange(2, len(STEPS)) if (fate == "interrupted" and attempt == 1) else None
            for i, (step, action) in enumerate(STEPS):
                if stop_at is not None and i == stop_at:
                    break
                t += timedelta(milliseconds=rng.randint(50, 900))
                out.append(StepEvent(event_id=self._id(), ts=t, seq=next(seq), step_id=step, index=i, action=action,
                                     state="started", **base))  # type: ignore[arg-type]
                t += timedelta(milliseconds=rng.randint(50, 2000))
                if step == broken:
                    state = "failed" if fate == "failed" else "timed_out"
                    error = "assert_failed: battery low" if state == "failed" else "step_timeout: no result"
                    out.append(StepEvent(event_id=self._id(), ts=t, seq=next(seq), step_id=step, index=i,
                                         action=action, state=state, error=error, **base))  # type: ignore[arg-type]
                    self.truth.steps[(node, serial, step)] = state
                    for j, (later, later_action) in enumerate(STEPS[i + 1:], start=i + 1):
                        out.append(StepEvent(event_id=self._id(), ts=t, seq=next(seq), step_id=later, index=j,
                                             action=later_action, state="skipped", **base))  # type: ignore[arg-type]
                        self.truth.steps[(node, serial, later)] = "skipped"
                    t += timedelta(milliseconds=5)
                    out.append(TaskEvent(event_id=self._id(), ts=t, seq=next(seq), state=state, attempt=attempt,
                                         error=error, failed_step=step, **base))  # type: ignore[arg-type]
                    self.truth.tasks[(node, serial)] = (state, attempt, error, step)
                    return out
                if action == "screenshot":
                    key = f"vid/{node}/{serial}/{self.run_id}/{int(t.timestamp())}-{attempt}.png"
                    out.append(ArtifactEvent(event_id=self._id(), ts=t, seq=next(seq), step_id=step, store="local",
                                             key=key, uri=f"file:///a/{key}", bytes=rng.randint(100, 9999),
                                             sha256=f"{rng.getrandbits(64):016x}", **base))  # type: ignore[arg-type]
                    self.truth.artifacts.add(key)
                out.append(StepEvent(event_id=self._id(), ts=t, seq=next(seq), step_id=step, index=i, action=action,
                                     state="ok", output=f"{step}-out", **base))  # type: ignore[arg-type]
                self.truth.steps[(node, serial, step)] = "ok"
            if stop_at is not None:
                t += timedelta(seconds=3)
                out.append(TaskEvent(event_id=self._id(), ts=t, seq=next(seq), state="interrupted",
                                     attempt=attempt, **base))  # type: ignore[arg-type]
        t += timedelta(milliseconds=5)
        out.append(TaskEvent(event_id=self._id(), ts=t, seq=next(seq), state="succeeded", attempt=attempts,
                             **base))  # type: ignore[arg-type]
        self.truth.tasks[(node, serial)] = ("succeeded", attempts, None, None)
        return out

    def _build(self) -> None:
        streams: list[list[Event]] = []
        for node in self.nodes:
            for k, serial in enumerate(self.devices[node]):
                streams.append(self._device(node, serial, self.start + timedelta(seconds=k % 4)))
            listed = self.devices[node]
            for tick in range(4):
                at = self.start + timedelta(seconds=5 * tick)
                shown = listed[:-1] if tick == 3 else listed  # the last device leaves in the newest inventory
                streams.append([DeviceInventoryEvent(
                    event_id=self._id(), ts=at, node_id=node, vendor_available=True,
                    devices=[DeviceInfo(serial=s, status="online", model="Pixel 7", name=s.lower()) for s in shown])])
                streams.append([NodeHeartbeat(event_id=self._id(), ts=at, node_id=node, slots=20,
                                              running=len(listed) - tick, queued=0, vendor_connected=True,
                                              version="t")])
        # What a JetStream stream of several nodes looks like: each device's events in order, interleaved.
        cursors = [0] * len(streams)
        live = [i for i, s in enumerate(streams) if s]
        while live:
            i = self.rng.choice(live)
            self.events.append(streams[i][cursors[i]])
            cursors[i] += 1
            if cursors[i] == len(streams[i]):
                live.remove(i)


async def seed_run(conn: asyncpg.Connection, run_id: str, pairs: list[tuple[str, str]], created_at: datetime = T0,
                   workflow_id: str = "device-smoke") -> None:
    """What the backend writes when it creates a run: the run and one `queued` task per device."""
    await conn.execute("INSERT INTO workflows (workflow_id, version, recipe, digest) VALUES ($1, 1, '{}',"
                       " 'd') ON CONFLICT DO NOTHING", workflow_id)
    await conn.execute("INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms, status,"
                       " created_at, dispatched_at) VALUES ($1, $3, 1, '{}', '{}', 'dispatched', $2, $2)",
                       uuid.UUID(run_id), created_at - timedelta(seconds=1), workflow_id)
    await conn.executemany("INSERT INTO run_tasks (run_id, node_id, device_serial) VALUES ($1, $2, $3)",
                           [(uuid.UUID(run_id), n, s) for n, s in pairs])


# Every table the fold writes, with every column except ingestion bookkeeping
# (run_tasks.updated_at, processed_events.processed_at, dead_letters.id/received_at).
SNAPSHOT_QUERIES = {
    "runs": "SELECT run_id, status, finished_at FROM runs ORDER BY run_id",
    "run_tasks": "SELECT run_id, node_id, device_serial, state, attempt, seq, started_at, finished_at, error,"
                 " failed_step FROM run_tasks ORDER BY 1, 2, 3",
    "step_results": "SELECT * FROM step_results ORDER BY run_id, node_id, device_serial, step_id",
    "artifacts": "SELECT * FROM artifacts ORDER BY store, key",
    "nodes": "SELECT * FROM nodes ORDER BY node_id",
    "devices": "SELECT * FROM devices ORDER BY node_id, serial",
    "node_inventories": "SELECT * FROM node_inventories ORDER BY node_id",
    "processed_events": "SELECT event_id FROM processed_events ORDER BY 1",
    "dead_letters": "SELECT subject, raw, error, event_id FROM dead_letters ORDER BY event_id, raw",
    "run_summary": "SELECT * FROM run_summary ORDER BY run_id",
}


async def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(url)
    try:
        return {name: [tuple(r) for r in await conn.fetch(q)] for name, q in SNAPSHOT_QUERIES.items()}
    finally:
        await conn.close()


async def check_truth(url: str, rec: FleetRecording, processed_events: int | None = None) -> None:
    """The database says exactly what the nodes observed last (`processed_events`: all events folded so far)."""
    conn = await asyncpg.connect(url)
    try:
        tasks = {(r["node_id"], r["device_serial"]): (r["state"], r["attempt"], r["error"], r["failed_step"])
                 for r in await conn.fetch("SELECT * FROM run_tasks WHERE run_id = $1", uuid.UUID(rec.run_id))}
        steps = {(r["node_id"], r["device_serial"], r["step_id"]): r["state"]
                 for r in await conn.fetch("SELECT * FROM step_results WHERE run_id = $1", uuid.UUID(rec.run_id))}
        keys = {r["key"] for r in await conn.fetch("SELECT key FROM artifacts WHERE run_id = $1",
                                                   uuid.UUID(rec.run_id))}
        status = await conn.fetchval("SELECT status FROM runs WHERE run_id = $1", uuid.UUID(rec.run_id))
        gone = {(r["node_id"], r["serial"]) for r in await conn.fetch("SELECT * FROM devices WHERE status = 'gone'")}
        processed = await conn.fetchval("SELECT count(*) FROM processed_events")
    finally:
        await conn.close()
    assert tasks == rec.truth.tasks
    assert steps == rec.truth.steps
    assert keys == rec.truth.artifacts
    assert status == "completed"
    assert gone == {(n, rec.devices[n][-1]) for n in rec.nodes}
    assert processed == (len({e.event_id for e in rec.events}) if processed_events is None else processed_events)


def subject_of(e: Event) -> str:
    return evt_subject(e.node_id, kind_of(e), getattr(e, "run_id", None))


async def publish(js: JetStreamContext, events: list[Event], *, msg_id: bool = True, window: int = 256) -> None:
    """Publish like a node's outbox (Nats-Msg-Id = event_id), or without it so duplicates reach the stream."""
    for i in range(0, len(events), window):
        await asyncio.gather(*(
            js.publish(subject_of(e), msgspec.json.encode(e),
                       headers={"Nats-Msg-Id": e.event_id} if msg_id else None)
            for e in events[i:i + window]))


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float = 60.0, what: str = "condition",
               every_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s} s"
        await asyncio.sleep(every_s)


async def consumer_settled(js: JetStreamContext, durable: str = AGGREGATOR_DURABLE) -> bool:
    """Every message in the stream is acked (or terminated) on `durable`.

    The ack floor is compared with the stream's last sequence: right after a
    publish, the consumer's `num_pending` can still read 0 for a moment.
    """
    stream = await js.stream_info(EVT_STREAM)
    info = await js.consumer_info(EVT_STREAM, durable)
    return bool(info.num_ack_pending == 0 and info.num_pending == 0
                and info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= stream.state.last_seq)


@dataclass
class RunningAggregator:
    agg: Aggregator
    js: JetStreamContext


@asynccontextmanager
async def aggregator_over(nats_url: str, database_url: str, payloads: list[bytes],
                          subject: str = "doai.evt.n1.task") -> AsyncIterator[RunningAggregator]:
    """Publish raw `payloads` (all in the stream before it starts: one batch), then run one aggregator."""
    nc = await nats.connect(nats_url, **nats_options(nats_url))
    pool: asyncpg.Pool | None = None
    stop = asyncio.Event()
    worker: asyncio.Task[None] | None = None
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js)
        await jetstream.ensure_aggregator_consumer(js)
        for payload in payloads:
            await js.publish(subject, payload)
        pool = await db.create_pool(database_url, max_size=2)
        agg = Aggregator(pool, js, batch_size=100, fetch_timeout_s=0.2)
        worker = asyncio.create_task(agg.run(stop))
        yield RunningAggregator(agg, js)
    finally:
        stop.set()
        if worker is not None:
            await worker
        if pool is not None:
            await pool.close()
        await nc.close()
