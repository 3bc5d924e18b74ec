"""Attacks on the event path, replayed against a real nats-server and PostgreSQL.

Each test performs one attack from issue 9 on a running aggregator and shows it
refused (a dead letter with its reason, or a publish the stream refuses) AND
that nothing else changed in PostgreSQL (every table the fold writes is
compared before and after). Future timestamps are clamped rather than refused:
there the tests show that no row is left in the future and that the next real
report still applies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy
from nats.js.errors import BadRequestError, NotFoundError

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
from contracts.subjects import AGGREGATOR_DURABLE, CMD_STREAM, EVT_STREAM, cmd_subject, node_durable
from doai.embedded import EmbeddedNats
from doai.up import DEMO_PARAMS
from runtime import db, jetstream
from runtime.config import ConfigError, load_settings
from runtime.jetstream import DEFAULT_LIMITS, StreamLimits
from runtime.pull_consumer import PullConsumer
from services.aggregator.consumer import Aggregator
from services.aggregator.validate import DEAD_LETTER_KEEP_BYTES, DEFAULT_MAX_SKEW_S
from services.backend.keeper import StreamKeeper
from services.backend.settings import BackendSettings
from services.node.journal import Journal
from services.node.outbox import Outbox
from tests.aggregator_support import aggregator_over, consumer_settled, migrate, poll, publish, seed_run, snapshot
from tests.conftest import creds_file, nats_options
from tests.signing_support import TEST_SIGNING_SEED
from tests.test_e2e import wait_completed

N1, N2 = "node-1", "node-2"
FUTURE = datetime(2099, 1, 1, tzinfo=UTC)


@dataclass
class Scene:
    """A dispatched run with tasks on two nodes, folded real events, and a running aggregator."""

    run_id: str
    js: JetStreamContext
    agg: Aggregator
    conn: asyncpg.Connection
    url: str

    async def settle(self) -> None:
        await poll(lambda: consumer_settled(self.js), what="aggregator settled", timeout_s=30)

    async def send(self, events: list[Event]) -> None:
        await publish(self.js, events)
        await self.settle()

    async def send_raw(self, subject: str, payload: bytes) -> None:
        await self.js.publish(subject, payload)
        await self.settle()

    async def dead(self) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(
            "SELECT subject, raw, raw_size, raw_sha256, error, event_id, reason FROM dead_letters ORDER BY id"))

    def task(self, node: str, serial: str, seq: int, state: str, ts: datetime | None = None,
             run_id: str | None = None, **extra: Any) -> TaskEvent:
        return TaskEvent(event_id=new_id(), ts=ts or datetime.now(UTC), node_id=node,
                         run_id=run_id or self.run_id, device_serial=serial, seq=seq,
                         state=state, **extra)  # type: ignore[arg-type]


def without_dead_letters(snap: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    return {k: v for k, v in snap.items() if k != "dead_letters"}


def beat(node: str, ts: datetime, slots: int = 20) -> NodeHeartbeat:
    return NodeHeartbeat(event_id=new_id(), ts=ts, node_id=node, slots=slots, running=1, queued=0,
                         vendor_connected=True, version="t")


def listing(node: str, ts: datetime, serials: list[str]) -> DeviceInventoryEvent:
    return DeviceInventoryEvent(event_id=new_id(), ts=ts, node_id=node, vendor_available=True,
                                devices=[DeviceInfo(serial=s, status="online", model="Pixel 7") for s in serials])


@pytest.fixture
async def scene(nats_server: EmbeddedNats, database_url: str) -> AsyncIterator[Scene]:
    run_id = str(uuid.uuid4())
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await seed_run(conn, run_id, [(N1, "S1"), (N1, "S2"), (N2, "T1")], created_at=datetime.now(UTC))
        async with aggregator_over(nats_server.url, database_url, []) as running:
            s = Scene(run_id, running.js, running.agg, conn, database_url)
            now = datetime.now(UTC)
            await s.send([
                beat(N1, now), beat(N2, now),
                listing(N1, now, ["S1", "S2"]), listing(N2, now, ["T1"]),
                s.task(N1, "S1", 1, "running", now), s.task(N2, "T1", 1, "running", now),
            ])
            running_tasks = await conn.fetchval("SELECT count(*) FROM run_tasks WHERE state = 'running'")
            assert running_tasks == 2, (s.agg.folded, s.agg.dead, s.agg.batches, s.agg.consumer.errors,
                                        await s.js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE))
            yield s
    finally:
        await conn.close()


async def test_an_event_claiming_another_node_than_its_subject_is_refused(scene: Scene) -> None:
    before = await snapshot(scene.url)
    forged = [
        # Published on node-1's subject, claiming to be node-2 (whose task T1 exists): the issue's attack.
        ("doai.evt.node-1.task", scene.task(N2, "T1", 2**62, "succeeded")),
        ("doai.evt.node-1.node", beat(N2, datetime.now(UTC), slots=1)),
        ("doai.evt.node-1.device", listing(N2, datetime.now(UTC), ["PHANTOM"])),
        # The right node, the wrong kind: a task event on the heartbeat subject.
        ("doai.evt.node-1.node", scene.task(N1, "S2", 5, "failed", error="forged")),
        # Extra tokens, or no kind at all.
        ("doai.evt.node-1.task.extra", scene.task(N1, "S2", 5, "failed", error="forged")),
        ("doai.evt.node-1", scene.task(N1, "S2", 5, "failed", error="forged")),
        # The right node and kind on another run's subject (a tap filtering by run would miss it).
        (f"doai.evt.node-1.task.{uuid.uuid4()}", scene.task(N1, "S2", 5, "failed", error="forged")),
        # A heartbeat with a run token (node events belong to no run).
        (f"doai.evt.node-1.node.{scene.run_id}", beat(N1, datetime.now(UTC), slots=1)),
    ]
    for subject, event in forged:
        await scene.js.publish(subject, msgspec.json.encode(event))
    await scene.settle()

    dead = await scene.dead()
    assert [(r["subject"], r["event_id"], r["reason"]) for r in dead] == [
        (subject, event.event_id, "subject_mismatch") for subject, event in forged]
    assert "claims node_id 'node-2'" in dead[0]["error"]
    assert "is a 'task' event" in dead[3]["error"]
    assert "but the event claims run_id" in dead[6]["error"]
    assert without_dead_letters(await snapshot(scene.url)) == without_dead_letters(before)
    assert scene.agg.dead == len(forged)


async def test_events_for_a_task_of_another_node_or_a_task_never_created_are_refused(scene: Scene) -> None:
    before = await snapshot(scene.url)
    now = datetime.now(UTC)
    base = {"node_id": N1, "run_id": scene.run_id, "ts": now}
    forged: list[Event] = [
        # node-1 reports on T1, which the backend gave to node-2.
        scene.task(N1, "T1", 9, "failed", error="forged"),
        StepEvent(event_id=new_id(), device_serial="T1", seq=3, step_id="a", index=0, action="wait",
                  state="failed", error="forged", **base),  # type: ignore[arg-type]
        ArtifactEvent(event_id=new_id(), device_serial="T1", seq=4, step_id="shot", store="local", key="x/y.png",
                      uri="file:///x/y.png", bytes=1, sha256="00", **base),  # type: ignore[arg-type]
        # Devices the run never targeted (the issue: a 10-device run that ended with 15 tasks).
        *(scene.task(N1, f"EXTRA{i}", 1, "succeeded") for i in range(5)),
    ]
    await scene.send(forged)

    dead = await scene.dead()
    assert sorted((r["event_id"], r["reason"]) for r in dead) == sorted((e.event_id, "unknown_task") for e in forged)
    assert all("has no task for device" in r["error"] for r in dead)
    assert without_dead_letters(await snapshot(scene.url)) == without_dead_letters(before)
    assert await scene.conn.fetchval("SELECT count(*) FROM run_tasks") == 3


async def test_events_for_a_run_that_does_not_exist_are_refused(scene: Scene) -> None:
    before = await snapshot(scene.url)
    forged = [
        scene.task(N1, "S1", 1, "succeeded", run_id=str(uuid.uuid4())),
        scene.task(N1, "S1", 1, "succeeded", run_id="/tmp/x/victim"),
        scene.task(N1, "S1", 1, "succeeded", run_id="not-a-uuid"),
    ]
    await scene.send(forged)  # type: ignore[arg-type]

    dead = await scene.dead()
    assert sorted((r["event_id"], r["reason"]) for r in dead) == sorted((e.event_id, "unknown_run") for e in forged)
    assert without_dead_letters(await snapshot(scene.url)) == without_dead_letters(before)


async def _latest_stored_timestamp(conn: asyncpg.Connection) -> datetime:
    latest: datetime = await conn.fetchval("""
        SELECT max(t) FROM (
            SELECT max(last_seen) AS t FROM nodes UNION ALL SELECT max(last_seen) FROM devices
            UNION ALL SELECT max(taken_at) FROM node_inventories
            UNION ALL SELECT max(greatest(started_at, finished_at)) FROM run_tasks
            UNION ALL SELECT max(greatest(started_at, finished_at)) FROM step_results
            UNION ALL SELECT max(finished_at) FROM runs) x""")
    return latest


async def test_future_timestamps_are_clamped_so_the_next_real_report_still_applies(scene: Scene) -> None:
    conn = scene.conn
    # A forged heartbeat, inventory and task event of node-1 dated 2099 (the attack): the
    # inventory lists a phantom device and none of the real ones.
    await scene.send([beat(N1, FUTURE, slots=1), listing(N1, FUTURE, ["PHANTOM"]),
                      scene.task(N1, "S2", 1, "running", FUTURE)])
    assert scene.agg.clamped == 3
    limit = datetime.now(UTC) + timedelta(seconds=DEFAULT_MAX_SKEW_S)
    assert await _latest_stored_timestamp(conn) < limit  # nothing was stored in the future
    assert await conn.fetchval("SELECT status FROM devices WHERE serial = 'PHANTOM'") == "online"
    assert await conn.fetchval("SELECT started_at FROM run_tasks WHERE device_serial = 'S2'") < limit

    # node-1's next real reports (its own clock, now) apply: real devices back, phantom gone, real heartbeat.
    now = datetime.now(UTC)
    await scene.send([beat(N1, now, slots=20), listing(N1, now, ["S1", "S2"]),
                      scene.task(N1, "S2", 2, "succeeded", now), scene.task(N1, "S1", 2, "succeeded", now),
                      scene.task(N2, "T1", 2, "succeeded", now)])
    devices = {r["serial"]: r["status"] for r in await conn.fetch("SELECT serial, status FROM devices")}
    assert devices == {"S1": "online", "S2": "online", "T1": "online", "PHANTOM": "gone"}
    assert await conn.fetchval("SELECT slots FROM nodes WHERE node_id = $1", N1) == 20
    assert await conn.fetchval("SELECT last_seen FROM nodes WHERE node_id = $1", N1) == now
    assert await conn.fetchval("SELECT taken_at FROM node_inventories WHERE node_id = $1", N1) == now
    run = await conn.fetchrow("SELECT status, finished_at FROM runs WHERE run_id = $1", uuid.UUID(scene.run_id))
    assert run["status"] == "completed" and run["finished_at"] == now
    assert await _latest_stored_timestamp(conn) < datetime.now(UTC) + timedelta(seconds=DEFAULT_MAX_SKEW_S)
    assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0

    # A timestamp within the allowed skew is a node's clock, not an attack: kept as sent.
    ahead = datetime.now(UTC) + timedelta(seconds=DEFAULT_MAX_SKEW_S / 3)
    await scene.send([beat(N1, ahead, slots=7)])
    assert await conn.fetchval("SELECT last_seen FROM nodes WHERE node_id = $1", N1) == ahead
    assert scene.agg.clamped == 3


async def test_a_heartbeat_with_an_impossible_count_of_set_aside_events_is_refused(scene: Scene) -> None:
    """`refused_events` (events the node set aside as too large) is a count: a negative one or one past a
    PostgreSQL integer is dead-lettered and the node's row keeps its count; a real count reaches it."""
    before = await snapshot(scene.url)
    now = datetime.now(UTC)
    for bad in (-1, 2**31, 2**40):
        forged = msgspec.structs.replace(beat(N1, now + timedelta(seconds=1)), refused_events=bad)
        await scene.send_raw("doai.evt.node-1.node", msgspec.json.encode(forged))
    assert [r["reason"] for r in await scene.dead()] == ["undecodable"] * 3
    assert all("refused_events" in r["error"] for r in await scene.dead())
    assert without_dead_letters(await snapshot(scene.url)) == without_dead_letters(before)
    await scene.send([msgspec.structs.replace(beat(N1, now + timedelta(seconds=2)), refused_events=3)])
    assert await scene.conn.fetchval("SELECT refused_events FROM nodes WHERE node_id = $1", N1) == 3
    assert await scene.conn.fetchval("SELECT refused_events FROM node_liveness WHERE node_id = $1", N1) == 3


async def test_oversized_junk_is_refused_by_the_stream_or_kept_truncated(scene: Scene) -> None:
    before = await snapshot(scene.url)
    limit = DEFAULT_LIMITS[EVT_STREAM].max_msg_size
    # Over the stream's message size: refused at publish, nothing is stored anywhere.
    with pytest.raises(BadRequestError) as refused:
        await scene.js.publish("doai.evt.node-1.task", b"J" * (limit + 1))
    assert refused.value.err_code == 10054  # "message size exceeds maximum allowed"
    with pytest.raises(MaxPayloadError):  # beyond the server's max_payload the client refuses it first
        await scene.js.publish("doai.evt.node-1.task", b"J" * (5 * 1024 * 1024))
    stream = await scene.js.stream_info(EVT_STREAM)
    assert stream.config.max_msg_size == limit and stream.config.max_bytes == DEFAULT_LIMITS[EVT_STREAM].max_bytes

    # Under it: five almost-1 MiB junk messages (the 5 × 4 MB) are dead-lettered with only their
    # head kept, plus size and SHA-256; and a junk subject thousands of characters long is clipped.
    junk = [bytes([65 + i]) * (limit - 1024) for i in range(5)]
    for payload in junk:
        await scene.js.publish("doai.evt.node-1.task", payload)
    long_subject = "doai.evt.node-1.task." + "x" * 3000
    valid = scene.task(N1, "S2", 7, "failed", error="forged")
    await scene.js.publish(long_subject, msgspec.json.encode(valid))
    # A valid event whose id PostgreSQL cannot store (NUL): refused by the database, dead-lettered.
    nul = scene.task(N1, "S2", 8, "failed", error="x")
    nul_payload = msgspec.json.encode(msgspec.structs.replace(nul, event_id="e\x00vil"))
    await scene.js.publish("doai.evt.node-1.task", nul_payload)
    await scene.settle()

    dead = await scene.dead()
    assert [r["reason"] for r in dead] == ["undecodable"] * 5 + ["subject_mismatch", "refused_by_database"]
    for row, payload in zip(dead[:5], junk, strict=True):
        assert bytes(row["raw"]) == payload[:DEAD_LETTER_KEEP_BYTES]
        assert row["raw_size"] == len(payload)
        assert row["raw_sha256"] == hashlib.sha256(payload).hexdigest()
    assert len(dead[5]["subject"]) <= 260 and dead[5]["subject"].startswith("doai.evt.node-1.task.xxx")
    assert dead[6]["event_id"] == "e\\x00vil"
    stored = await scene.conn.fetchval("SELECT sum(length(raw)) FROM dead_letters")
    assert stored <= 7 * DEAD_LETTER_KEEP_BYTES
    assert without_dead_letters(await snapshot(scene.url)) == without_dead_letters(before)


def logged(log_file: Path, event: str, **fields: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    return [d for d in lines if d.get("event") == event and all(d.get(k) == v for k, v in fields.items())]


async def test_a_deleted_aggregator_consumer_is_recreated_and_folding_goes_on(scene: Scene, log_file: Path) -> None:
    await scene.js.delete_consumer(EVT_STREAM, AGGREGATOR_DURABLE)
    started = time.monotonic()
    await poll(lambda: consumer_exists(scene.js, EVT_STREAM, AGGREGATOR_DURABLE), what="consumer recreated",
               timeout_s=15)
    healed_s = time.monotonic() - started
    now = datetime.now(UTC)
    await scene.send([scene.task(N1, "S1", 2, "succeeded", now), scene.task(N1, "S2", 2, "succeeded", now),
                      scene.task(N2, "T1", 2, "succeeded", now)])
    assert await scene.conn.fetchval("SELECT status FROM runs WHERE run_id = $1",
                                     uuid.UUID(scene.run_id)) == "completed"
    assert scene.agg.consumer.recreated >= 1 and healed_s < 10
    assert logged(log_file, "consumer recreated", durable=AGGREGATOR_DURABLE, stream=EVT_STREAM)
    # The recreated consumer delivered the stream again from its start: the fold skipped what it had applied.
    assert scene.agg.skipped >= 6
    assert await scene.conn.fetchval("SELECT count(*) FROM dead_letters") == 0


async def consumer_exists(js: JetStreamContext, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        return False
    return True


async def stream_exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def test_the_keeper_recreates_deleted_streams_and_node_consumers(scene: Scene, log_file: Path) -> None:
    pool = await db.create_pool(scene.url, max_size=2)
    try:
        keeper = StreamKeeper(pool, scene.js, every_s=0.2)
        # node-1 and node-2 are known (heartbeats, inventories): each gets its consumer.
        assert await keeper.ensure_once() == ([], [N1, N2])
        assert await keeper.ensure_once() == ([], [])  # nothing missing: nothing done
        await scene.js.delete_consumer(CMD_STREAM, node_durable(N2))
        await scene.js.delete_stream(EVT_STREAM)
        stop = asyncio.Event()
        task = asyncio.create_task(keeper.run(stop))
        try:
            await poll(lambda: stream_exists(scene.js, EVT_STREAM), what="DOAI_EVT recreated", timeout_s=10)
            await poll(lambda: consumer_exists(scene.js, CMD_STREAM, node_durable(N2)), what="node-2's consumer",
                       timeout_s=10)
            await scene.js.delete_stream(CMD_STREAM)
            await poll(lambda: consumer_exists(scene.js, CMD_STREAM, node_durable(N1)), what="DOAI_CMD recreated",
                       timeout_s=10)
            await poll(lambda: consumer_exists(scene.js, CMD_STREAM, node_durable(N2)), what="node-2's consumer",
                       timeout_s=10)
            # The aggregator finds its consumer gone with the stream and recreates it.
            await poll(lambda: consumer_exists(scene.js, EVT_STREAM, AGGREGATOR_DURABLE),
                       what="aggregator consumer", timeout_s=20)
        finally:
            stop.set()
            await task
        for name in (CMD_STREAM, EVT_STREAM):
            info = await scene.js.stream_info(name)
            limits = DEFAULT_LIMITS[name]
            assert (info.config.max_bytes, info.config.max_msgs, info.config.max_msg_size) == (
                limits.max_bytes, limits.max_msgs, limits.max_msg_size)
            assert info.config.discard == DiscardPolicy.NEW
        assert keeper.streams_recreated == 2 and keeper.consumers_recreated >= 5
        assert logged(log_file, "stream was missing; recreated", stream=EVT_STREAM)
        assert logged(log_file, "node command consumer was missing; recreated", node_id=N2)
        # Folding goes on in the new stream.
        now = datetime.now(UTC)
        await scene.send([scene.task(N1, "S1", 2, "succeeded", now)])
        assert await scene.conn.fetchval("SELECT state FROM run_tasks WHERE device_serial = 'S1'") == "succeeded"
    finally:
        await pool.close()


async def test_deleted_consumers_and_streams_heal_and_later_runs_complete(
    start_system: Any, nats_server: EmbeddedNats, log_file: Path
) -> None:
    system = await start_system(nodes=1, devices=2)
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        js = nc.jetstream()
        async with system.client() as client:
            async def one_run() -> None:
                r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": DEMO_PARAMS,
                                                        "targets": {"all_online": True}})
                assert r.status_code == 201, r.text
                run = await wait_completed(client, r.json()["run_id"], timeout_s=60)
                assert run["status"] == "completed" and run["counts"] == {"succeeded": 2}

            async def all_there() -> bool:
                return (await consumer_exists(js, EVT_STREAM, AGGREGATOR_DURABLE)
                        and await consumer_exists(js, CMD_STREAM, node_durable(N1)))

            await one_run()
            # An attacker (or a mistake) deletes both consumers, then both streams.
            await js.delete_consumer(EVT_STREAM, AGGREGATOR_DURABLE)
            await js.delete_consumer(CMD_STREAM, node_durable(N1))
            await poll(all_there, what="consumers recreated", timeout_s=15)
            await one_run()
            await js.delete_stream(CMD_STREAM)
            await js.delete_stream(EVT_STREAM)
            await poll(all_there, what="streams and consumers recreated", timeout_s=30)
            await one_run()
        assert not system.failures()
    finally:
        await nc.close()
    assert logged(log_file, "consumer recreated", durable=AGGREGATOR_DURABLE)
    assert logged(log_file, "stream was missing; recreated", stream=CMD_STREAM)
    assert logged(log_file, "stream was missing; recreated", stream=EVT_STREAM)


async def test_a_full_event_stream_refuses_publishes_and_the_node_outbox_keeps_them(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """Discard policy NEW: what a full stream refuses stays in the sender's outbox; nothing is dropped."""
    small = {**DEFAULT_LIMITS, EVT_STREAM: StreamLimits(max_bytes=DEFAULT_LIMITS[EVT_STREAM].max_bytes, max_msgs=50,
                                                        max_msg_size=64 * 1024)}
    nc = await jetstream.connect(nats_server.url, "flood", creds=creds_file("admin"))
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, small)
        sent = [beat(N1, datetime.now(UTC)) for _ in range(80)]
        for event in sent:
            journal.add_event(event)
        outbox = Outbox(journal, js, publish_timeout_s=5.0)
        # The full stream answers each refused publish with an error ack ("maximum messages exceeded") at
        # once: the outbox keeps those rows.
        with pytest.raises(RuntimeError, match="30 of 80 events not acked"):
            await outbox.publish_once()
        assert outbox.published == 50 and journal.outbox_size() == 30
        info = await js.stream_info(EVT_STREAM)
        assert info.state.messages == 50 and info.state.first_seq == 1  # the oldest were not discarded
        # The operator raises the limit (the backend applies DOAI_EVT_MAX_MSGS at start-up): the rest goes out.
        await jetstream.ensure_streams(js, DEFAULT_LIMITS)
        assert await outbox.publish_once() == 30 and journal.outbox_size() == 0
        info = await js.stream_info(EVT_STREAM)
        assert info.state.messages == 80
        stored = {msgspec.json.decode((await js.get_msg(EVT_STREAM, seq)).data, type=NodeHeartbeat).event_id
                  for seq in range(1, 81)}
        assert stored == {e.event_id for e in sent}
    finally:
        journal.close()
        await jetstream.close(nc)


def test_stream_limits_come_from_the_backend_settings_and_bad_values_are_refused() -> None:
    required = {"DATABASE_URL": "postgresql://x/y", "NATS_URL": "nats://127.0.0.1:1", "DOAI_API_TOKEN": "t",
                "NODE_AGENT_SHARED_SECRET": "s" * 32, "DOAI_COMMAND_SIGNING_KEY": TEST_SIGNING_SEED,
                "DOAI_NATS_AUTH_DIR": "/etc/doai/nats-auth"}
    limits = load_settings(BackendSettings, {**required, "DOAI_EVT_MAX_BYTES": "1073741824",
                                             "DOAI_CMD_MAX_MSGS": "5000"}).stream_limits()
    assert limits[EVT_STREAM] == StreamLimits(max_bytes=1 << 30, max_msgs=DEFAULT_LIMITS[EVT_STREAM].max_msgs,
                                              max_msg_size=DEFAULT_LIMITS[EVT_STREAM].max_msg_size)
    assert limits[CMD_STREAM].max_msgs == 5000
    assert load_settings(BackendSettings, required).stream_limits() == DEFAULT_LIMITS
    with pytest.raises(ConfigError, match="DOAI_EVT_MAX_BYTES"):
        load_settings(BackendSettings, {**required, "DOAI_EVT_MAX_BYTES": "4GB"})
    with pytest.raises(ConfigError, match="DOAI_CMD_MAX_MSG_SIZE must be at least 1"):
        load_settings(BackendSettings, {**required, "DOAI_CMD_MAX_MSG_SIZE": "0"})
    with pytest.raises(ConfigError, match="DOAI_EVT_MAX_MSG_SIZE must not exceed DOAI_EVT_MAX_BYTES"):
        load_settings(BackendSettings, {**required, "DOAI_EVT_MAX_BYTES": "1000", "DOAI_EVT_MAX_MSG_SIZE": "2000"})
    with pytest.raises(ConfigError, match="DOAI_NATS_KEEPER_S must be between 0.1 and 3600"):
        load_settings(BackendSettings, {**required, "DOAI_NATS_KEEPER_S": "0"})


async def test_a_flood_of_junk_is_logged_once_per_batch_not_once_per_message(
    nats_server: EmbeddedNats, database_url: str, log_file: Path
) -> None:
    await migrate(database_url)
    junk = [b"junk %d" % i for i in range(60)]
    async with aggregator_over(nats_server.url, database_url, junk, subject="doai.evt.flooder.task") as running:
        await poll(lambda: consumer_settled(running.js), what="junk dead-lettered")
        assert running.agg.dead == 60
        batches = running.agg.batches  # usually 1 (all 60 were in the stream before it started)
    singles = logged(log_file, "event dead-lettered", subject="doai.evt.flooder.task")
    summaries = [d for d in logged(log_file, "more events dead-lettered in this batch")
                 if d.get("subjects") == ["doai.evt.flooder.task"]]
    assert len(singles) <= 10 * batches < 60 and len(summaries) <= batches
    assert len(singles) + sum(d["count"] for d in summaries) == 60
    assert all(set(d["reasons"]) == {"undecodable"} for d in summaries)


async def test_a_node_that_may_not_create_its_consumer_binds_again_once_the_backend_recreated_it(
    scene: Scene, log_file: Path
) -> None:
    """The node side of healing under least privilege: it has no `ensure` callback, so it waits."""
    pool = await db.create_pool(scene.url, max_size=2)
    keeper = StreamKeeper(pool, scene.js, every_s=0.5)
    await keeper.ensure_once()  # node-1's consumer exists
    got: list[bytes] = []

    async def handle(msgs: list[Msg]) -> bool:
        for m in msgs:
            got.append(m.data)
            await m.ack()
        return True

    durable = node_durable(N1)
    consumer = PullConsumer(scene.js, CMD_STREAM, durable, fetch_timeout_s=0.2, first_backoff_s=0.1,
                            max_backoff_s=0.3, check_every_s=0.5)
    stop = asyncio.Event()
    loop = asyncio.create_task(consumer.run(stop, handle))
    keeping: asyncio.Task[None] | None = None
    try:
        await scene.js.publish(cmd_subject(N1), b"first")
        await poll(lambda: _true(got == [b"first"]), what="first command")
        await scene.js.delete_consumer(CMD_STREAM, durable)
        await poll(lambda: _true(bool(logged(log_file, "consumer missing; waiting for it to be declared",
                                             durable=durable))), what="the node noticed its consumer missing")
        errors = consumer.errors
        await scene.js.publish(cmd_subject(N1), b"second")
        await poll(lambda: _true(consumer.errors >= errors + 3), what="a few more attempts")
        assert got == [b"first"] and consumer.recreated == 0  # it did not create it itself
        keeping = asyncio.create_task(keeper.run(stop))
        # The recreated consumer delivers the stream from its start: "first" again, then "second".
        await poll(lambda: _true(got[-1:] == [b"second"]), what="second command after the keeper", timeout_s=15)
        assert got == [b"first", b"first", b"second"]
        assert logged(log_file, "node command consumer was missing; recreated", node_id=N1)
        # Said once while it waited, however many attempts it made; and once when it came back. (Lines
        # with a node_id are a node agent's, from another test of this session.)
        for said in ("consumer missing; waiting for it to be declared", "consumer declared; binding it"):
            assert len([d for d in logged(log_file, said, durable=durable) if "node_id" not in d]) == 1
    finally:
        stop.set()
        await loop
        if keeping is not None:
            await keeping
        await pool.close()


async def _true(value: bool) -> bool:
    return value


async def test_migration_004_describes_old_dead_letters_and_unfreezes_rows_stored_in_the_future(
    database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # The schema before 004, with what the attacks left behind.
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for number, path in db.migration_files():
            if number < 4:
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", number)
        junk = b"J" * 10_000
        await conn.execute("INSERT INTO dead_letters (subject, stream_seq, raw, error) VALUES ('doai.evt.x.task', 1,"
                           " $1, 'junk')", junk)
        await conn.execute("INSERT INTO nodes VALUES ('node-1', 20, 0, 0, true, 't', $1)", FUTURE)
        await conn.execute("INSERT INTO devices VALUES ('node-1', 'PHANTOM', 'online', '', '', $1)", FUTURE)
        await conn.execute("INSERT INTO node_inventories VALUES ('node-1', $1, 1)", FUTURE)
        pool = await db.create_pool(database_url, max_size=1)
        try:
            # 004 and every later migration, once each.
            assert await db.migrate(pool) == [n for n, _ in db.migration_files() if n >= 4]
        finally:
            await pool.close()
        row = await conn.fetchrow("SELECT raw_size, raw_sha256, reason FROM dead_letters")
        assert tuple(row) == (len(junk), hashlib.sha256(junk).hexdigest(), "unclassified")
        assert await _latest_stored_timestamp(conn) <= datetime.now(UTC)
        assert await conn.fetchval("SELECT max(taken_at) FROM node_inventories") <= datetime.now(UTC)
    finally:
        await conn.close()
