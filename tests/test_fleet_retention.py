"""Lost tasks in the fold's ordering, and retention of every growing server table (real PostgreSQL).

* `lost` is written by the aggregator's housekeeping, keeps the task's seq and is
  not terminal for the fold's ranking: a later node report replaces it, a replay
  of an event it already had does not, and nothing resurrects it once a real
  outcome is in.
* Each pruned table is driven past a small limit: what is past it goes, what is
  not (and an unsent outbox row, whatever its age) stays.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from nats.aio.msg import Msg

from contracts.events import Event, NodeHeartbeat, TaskEvent
from contracts.ids import new_id
from doai.embedded import EmbeddedNats
from runtime import db
from runtime.config import ConfigError
from runtime.jetstream import STREAM_MAX_AGE_S
from services.aggregator.consumer import decode_batch
from services.aggregator.fold import Batch, Incoming, fold
from services.aggregator.housekeeping import Housekeeping, SweepResult
from services.aggregator.main import PROCESSED_KEEP_S, AggregatorSettings
from services.aggregator.validate import UNDECODABLE
from services.backend.retention import Retention
from tests.backend_support import PARAMS, fetchval, fleet_of, publish_recipe, run_body, running_backend, seed_fleet


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(database_url)
    await db.migrate(p)
    yield p
    await p.close()


async def make_run(pool: asyncpg.Pool, node: str, serials: list[str]) -> uuid.UUID:
    rid = uuid.uuid4()
    await pool.execute("INSERT INTO workflows (workflow_id, version, recipe, digest) VALUES ('w', 1, '{}', 'd')"
                       " ON CONFLICT DO NOTHING")
    await pool.execute("INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms, status)"
                       " VALUES ($1, 'w', 1, '{}', '{}', 'dispatched')", rid)
    await pool.executemany("INSERT INTO run_tasks (run_id, node_id, device_serial) VALUES ($1, $2, $3)",
                           [(rid, node, s) for s in serials])
    return rid


async def fold_events(pool: asyncpg.Pool, events: list[Event]) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await fold(conn, Batch(items=[Incoming(e, "doai.evt.x", None, b"") for e in events]))


def beat(node: str, ts: datetime) -> NodeHeartbeat:
    return NodeHeartbeat(event_id=new_id(), ts=ts, node_id=node, slots=4, running=1, queued=0,
                         vendor_connected=True, version="t")


def task(rid: uuid.UUID, node: str, serial: str, seq: int, state: str, ts: datetime, attempt: int = 1) -> TaskEvent:
    return TaskEvent(event_id=new_id(), ts=ts, node_id=node, run_id=str(rid), device_serial=serial, seq=seq,
                     state=state, attempt=attempt)  # type: ignore[arg-type]


async def states(pool: asyncpg.Pool, rid: uuid.UUID) -> dict[str, str]:
    return {r["device_serial"]: r["state"] for r in await pool.fetch(
        "SELECT device_serial, state FROM run_tasks WHERE run_id = $1", rid)}


def housekeeping(pool: asyncpg.Pool, **kw: float) -> Housekeeping:
    args: dict[str, float] = {"lost_after_s": 5.0, "processed_keep_s": PROCESSED_KEEP_S,
                              "dead_keep_s": 86_400.0, "dead_max_rows": 1000}
    args.update(kw)
    return Housekeeping(pool, lost_after_s=args["lost_after_s"], processed_keep_s=args["processed_keep_s"],
                        dead_keep_s=args["dead_keep_s"], dead_max_rows=int(args["dead_max_rows"]), batch=1)


async def test_lost_never_outranks_a_node_report_and_a_replay_does_not_resurrect_it(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    rid = await make_run(pool, "n-lost", ["A", "B", "C"])
    await make_run(pool, "n-live", ["L"])
    old = now - timedelta(seconds=30)
    first: list[Event] = [beat("n-lost", old), task(rid, "n-lost", "A", 1, "running", old),
             task(rid, "n-lost", "B", 1, "running", old)]  # C stays queued
    await fold_events(pool, first)
    await fold_events(pool, [beat("n-live", now)])
    # A task reported on within the grace is not lost, whatever the heartbeat says.
    assert await housekeeping(pool).sweep_lost() == SweepResult()
    await pool.execute("UPDATE run_tasks SET updated_at = now() - interval '30 seconds'")

    swept = await housekeeping(pool).sweep_lost()
    assert swept.lost == 3 and swept.cancelled == 0
    assert await states(pool, rid) == {"A": "lost", "B": "lost", "C": "lost"}
    row = await pool.fetchrow("SELECT * FROM run_summary WHERE run_id = $1", rid)
    assert row["lost"] == 3 and row["running"] == 0 and row["done"] == 3
    assert await pool.fetchval("SELECT status FROM runs WHERE run_id = $1", rid) == "completed"
    # The live node's open task is untouched.
    assert await pool.fetchval("SELECT state FROM run_tasks WHERE node_id = 'n-live'") == "queued"
    assert await housekeeping(pool).sweep_lost() == SweepResult()  # nothing more to do: idempotent

    # The same reports again (a replay with new event ids, same seq): lost stays.
    await fold_events(pool, [task(rid, "n-lost", "A", 1, "running", old), task(rid, "n-lost", "B", 1, "running", old)])
    assert await states(pool, rid) == {"A": "lost", "B": "lost", "C": "lost"}

    # The node comes back and reports, in any order: the real outcomes replace lost.
    back = now + timedelta(seconds=1)
    later: list[Event] = [beat("n-lost", back), task(rid, "n-lost", "A", 2, "interrupted", back),
             task(rid, "n-lost", "A", 3, "queued", back, attempt=2), task(rid, "n-lost", "A", 4, "running", back, 2),
             task(rid, "n-lost", "A", 5, "succeeded", back, 2), task(rid, "n-lost", "B", 2, "failed", back),
             task(rid, "n-lost", "C", 1, "running", back), task(rid, "n-lost", "C", 2, "succeeded", back)]
    random.Random(3).shuffle(later)
    await fold_events(pool, later[:4])
    await fold_events(pool, later[4:])
    assert await states(pool, rid) == {"A": "succeeded", "B": "failed", "C": "succeeded"}
    assert await pool.fetchval("SELECT count(*) FROM run_tasks WHERE run_id = $1 AND lost_at IS NOT NULL", rid) == 0

    # Everything replayed, and the node silent again: nothing brings lost back.
    await fold_events(pool, first + later)
    await pool.execute("UPDATE nodes SET last_seen = now() - interval '1 hour' WHERE node_id = 'n-lost'")
    await pool.execute("UPDATE run_tasks SET updated_at = now() - interval '1 hour'")
    await housekeeping(pool).sweep_lost()
    assert await states(pool, rid) == {"A": "succeeded", "B": "failed", "C": "succeeded"}
    row = await pool.fetchrow("SELECT * FROM run_summary WHERE run_id = $1", rid)
    assert row["lost"] == 0 and row["succeeded"] == 2 and row["failed"] == 1


async def test_a_cancelled_run_on_a_lost_node_ends_cancelled(pool: asyncpg.Pool) -> None:
    old = datetime.now(UTC) - timedelta(seconds=30)
    rid = await make_run(pool, "n-gone", ["A", "B", "D"])
    await fold_events(pool, [beat("n-gone", old), task(rid, "n-gone", "A", 1, "running", old),
                             task(rid, "n-gone", "B", 1, "running", old),
                             task(rid, "n-gone", "B", 2, "succeeded", old)])
    await pool.execute("UPDATE run_tasks SET updated_at = now() - interval '30 seconds'")
    await housekeeping(pool).sweep_lost()
    assert await states(pool, rid) == {"A": "lost", "B": "succeeded", "D": "lost"}
    await pool.execute("UPDATE runs SET status = 'cancelled', cancelled_at = now() WHERE run_id = $1", rid)
    swept = await housekeeping(pool).sweep_lost()
    assert swept.cancelled == 2
    assert await states(pool, rid) == {"A": "cancelled", "B": "succeeded", "D": "cancelled"}
    assert await pool.fetchval("SELECT status FROM runs WHERE run_id = $1", rid) == "cancelled"
    # The node's late "interrupted" (not terminal) cannot reopen a cancelled task.
    await fold_events(pool, [task(rid, "n-gone", "A", 2, "interrupted", old)])
    assert (await states(pool, rid))["A"] == "cancelled"


async def test_unsent_outbox_rows_are_never_pruned_sent_ones_after_their_age(pool: asyncpg.Pool) -> None:
    rid = await make_run(pool, "n-o", ["A"])
    rows = [  # (msg_id, created, sent)
        ("sent-old", "2 hours", "2 hours"), ("sent-new", "2 hours", "10 seconds"),
        ("unsent-old", "30 days", None), ("unsent-new", "1 second", None),
    ]
    for msg_id, created, sent in rows:
        await pool.execute(
            "INSERT INTO outbox (run_id, node_id, subject, msg_id, payload, created_at, sent_at)"
            " VALUES ($1, 'n-o', 'doai.cmd.n-o', $2, '\\x00', now() - $3::text::interval,"
            " now() - $4::text::interval)", rid, msg_id, created, sent)
    retention = Retention(pool, outbox_keep_s=3600.0, idempotency_ttl_s=86_400.0, batch=1)
    pruned = await retention.prune()
    assert pruned["outbox"] == 1
    left = {r["msg_id"] for r in await pool.fetch("SELECT msg_id FROM outbox")}
    assert left == {"sent-new", "unsent-old", "unsent-new"}
    # Even with a zero-length keep, an unsent row stays.
    await Retention(pool, outbox_keep_s=0.001, idempotency_ttl_s=86_400.0).prune()
    assert {r["msg_id"] for r in await pool.fetch("SELECT msg_id FROM outbox")} == {"unsent-old", "unsent-new"}


async def test_processed_events_and_dead_letters_are_pruned_by_age_and_count(pool: asyncpg.Pool) -> None:
    await pool.executemany("INSERT INTO processed_events (event_id, processed_at)"
                           " VALUES ($1, now() - $2::text::interval)", [("ev-old", "3 hours"), ("ev-new", "1 minute")])
    for i, age in enumerate(["5 days", "3 hours", "5 minutes", "4 minutes", "3 minutes", "2 minutes"]):
        await pool.execute(
            "INSERT INTO dead_letters (subject, stream_seq, raw, raw_size, raw_sha256, error, reason, received_at)"
            " VALUES ('doai.evt.x', $1, '\\x00', 1, 'h', 'e', 'undecodable', now() - $2::text::interval)", i, age)
    hk = housekeeping(pool, processed_keep_s=3600.0, dead_keep_s=86_400.0, dead_max_rows=3)
    pruned = await hk.prune()
    assert pruned == {"processed_events": 1, "dead_letters": 3}
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM processed_events")] == ["ev-new"]
    # Older than a day: gone; then only the newest 3 are kept.
    assert [r["stream_seq"] for r in await pool.fetch("SELECT stream_seq FROM dead_letters ORDER BY id")] == [3, 4, 5]
    assert await hk.prune() == {"processed_events": 0, "dead_letters": 0}


def test_processed_events_outlive_the_event_stream() -> None:
    """A message JetStream can still redeliver must still be recognised: the setting refuses less."""
    assert PROCESSED_KEEP_S > STREAM_MAX_AGE_S
    base = {"DATABASE_URL": "postgresql://x", "NATS_URL": "nats://127.0.0.1:1", "DOAI_NATS_CREDS": "/x/agg.creds"}
    settings = AggregatorSettings(database_url=base["DATABASE_URL"], nats_url=base["NATS_URL"],
                                  nats_creds=base["DOAI_NATS_CREDS"])
    assert settings.processed_keep_s == PROCESSED_KEEP_S
    with pytest.raises(ConfigError, match="DOAI_PROCESSED_EVENTS_KEEP_S"):
        AggregatorSettings(database_url=base["DATABASE_URL"], nats_url=base["NATS_URL"],
                           nats_creds=base["DOAI_NATS_CREDS"], processed_keep_s=STREAM_MAX_AGE_S)


async def test_an_idempotency_key_expires_after_its_stated_period(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await seed_fleet(database_url, fleet_of(1, 2))
        await publish_recipe(client)
        doc = (await client.get("/openapi.json")).json()
        [header] = [p for p in doc["paths"]["/v1/runs"]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
        assert "7 days" in header["description"] and "DOAI_IDEMPOTENCY_TTL_S" in header["description"]

        first = await client.post("/v1/runs", json=run_body(), headers={"Idempotency-Key": "key-old"})
        fresh = await client.post("/v1/runs", json=run_body(), headers={"Idempotency-Key": "key-fresh"})
        assert first.status_code == fresh.status_code == 201
        # Within the period: a different body is refused and changes nothing.
        runs_before = await fetchval(database_url, "SELECT count(*) FROM runs")
        reused = await client.post("/v1/runs", json=run_body(params={**PARAMS, "url": "https://example.org/2"}),
                                   headers={"Idempotency-Key": "key-old"})
        assert reused.status_code == 409
        assert await fetchval(database_url, "SELECT count(*) FROM runs") == runs_before

        # Past the period (8 days old), not pruned yet: the key is forgotten, the same key makes a new run.
        await fetchval(database_url, "UPDATE idempotency_keys SET created_at = now() - interval '8 days'"
                                     " WHERE key = 'key-old'")
        again = await client.post("/v1/runs", json=run_body(), headers={"Idempotency-Key": "key-old"})
        assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
        assert again.json()["run_id"] != first.json()["run_id"]
        assert await fetchval(database_url, "SELECT run_id::text FROM idempotency_keys WHERE key = 'key-old'") == \
            again.json()["run_id"]

        # The retention loop removes expired keys only.
        await fetchval(database_url, "UPDATE idempotency_keys SET created_at = now() - interval '8 days'"
                                     " WHERE key = 'key-old'")
        pool = await db.create_pool(database_url)
        try:
            pruned = await Retention(pool, outbox_keep_s=86_400.0, idempotency_ttl_s=7 * 86_400.0).prune()
        finally:
            await pool.close()
        assert pruned["idempotency_keys"] == 1
        assert await fetchval(database_url, "SELECT array_agg(key) FROM idempotency_keys") == ["key-fresh"]
        replay = await client.post("/v1/runs", json=run_body(), headers={"Idempotency-Key": "key-fresh"})
        assert replay.status_code == 201 and replay.headers.get("Idempotent-Replayed") == "true"
        assert replay.json()["run_id"] == fresh.json()["run_id"]


async def test_a_node_cannot_claim_lost(pool: asyncpg.Pool) -> None:
    """`lost` is the aggregator's word: an event claiming it is dead-lettered and changes no task."""
    now = datetime.now(UTC)
    rid = await make_run(pool, "n-liar", ["A"])
    await fold_events(pool, [beat("n-liar", now), task(rid, "n-liar", "A", 1, "running", now)])
    before = await pool.fetch("SELECT * FROM run_tasks ORDER BY run_id, device_serial")
    raw = msgspec.json.encode(task(rid, "n-liar", "A", 2, "running", now)).replace(b'"running"', b'"lost"')
    batch = decode_batch([Msg(_client=None, subject="doai.evt.n-liar.task", data=raw)])  # type: ignore[arg-type]
    assert not batch.items and [d.reason for d in batch.dead] == [UNDECODABLE]
    async with pool.acquire() as conn, conn.transaction():
        result = await fold(conn, batch)
    assert result.applied == 0 and result.dead == 1
    assert await pool.fetch("SELECT * FROM run_tasks ORDER BY run_id, device_serial") == before
    assert await pool.fetchval("SELECT reason FROM dead_letters WHERE subject = 'doai.evt.n-liar.task'") == UNDECODABLE


async def test_the_backend_runs_its_retention_loop(database_url: str, nats_server: EmbeddedNats) -> None:
    """Wired under the backend's supervisor: a sent broadcast's row goes once past its (small) age."""
    async with running_backend(database_url, nats_server.url, outbox_keep_s=0.5, retention_every_s=0.2) as backend, \
            backend.client() as client:
        await seed_fleet(database_url, fleet_of(2, 1))
        await publish_recipe(client)
        created = await client.post("/v1/runs", json=run_body())
        assert created.status_code == 201
        rid = uuid.UUID(created.json()["run_id"])
        deadline = asyncio.get_running_loop().time() + 30
        while await fetchval(database_url, "SELECT count(*) FROM outbox WHERE run_id = $1", rid):
            assert asyncio.get_running_loop().time() < deadline, "sent outbox rows not pruned"
            await asyncio.sleep(0.1)
        assert await fetchval(database_url, "SELECT status FROM runs WHERE run_id = $1", rid) == "dispatched"


async def test_liveness_views_need_a_live_node(pool: asyncpg.Pool) -> None:
    """A device freshly listed online on a node whose heartbeat is past the window is not online, and a
    silent node is not `vendor_connected` (the rule REST and run creation share with Grafana)."""
    now = datetime.now(UTC)
    await pool.execute("INSERT INTO nodes VALUES ('alive', 4, 1, 0, true, 'v', $1), ('silent', 4, 2, 0, true, 'v', $2)",
                       now, now - timedelta(seconds=90))
    await pool.execute("INSERT INTO devices VALUES ('alive', 'A', 'online', '', '', $1),"
                       " ('silent', 'S', 'online', '', '', $1), ('orphan', 'O', 'online', '', '', $1)", now)
    devices = {r["serial"]: (r["online"], r["liveness"]) for r in await pool.fetch("SELECT * FROM device_liveness")}
    assert devices == {"A": (True, "online"), "S": (False, "stale"), "O": (False, "stale")}
    nodes = {r["node_id"]: (r["online"], r["vendor_connected"], r["busy_slots"], r["devices_online"])
             for r in await pool.fetch("SELECT * FROM node_liveness")}
    assert nodes == {"alive": (True, True, 1, 1), "silent": (False, False, 0, 0)}
