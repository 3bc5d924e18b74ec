"""nats-server restarted (same store) under a running aggregator: runs before and after fold exactly.

The aggregator's pull subscription is re-bound by `runtime.pull_consumer`
after the reconnect (a nats-py pull subscription can go silent after a server
restart); nothing is lost, nothing is folded twice.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import asyncpg
import nats

from doai.embedded import EmbeddedNats
from runtime import db, jetstream
from services.aggregator.consumer import Aggregator
from tests.aggregator_support import T0, FleetRecording, check_truth, consumer_settled, migrate, poll, publish, seed_run
from tests.conftest import creds_file, nats_options


async def test_a_nats_restart_under_a_running_aggregator_loses_and_duplicates_nothing(
    nats_server: EmbeddedNats, database_url: str
) -> None:
    before = FleetRecording(str(uuid.uuid4()), nodes=2, devices=10, seed=31)
    after = FleetRecording(str(uuid.uuid4()), nodes=2, devices=10, seed=32, start=T0 + timedelta(hours=1))
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await seed_run(conn, before.run_id, before.pairs())
        await seed_run(conn, after.run_id, after.pairs(), created_at=after.start)
    finally:
        await conn.close()
    stop = asyncio.Event()
    agg_nc = await jetstream.connect(nats_server.url, name="doai-aggregator", stop=stop, creds=creds_file("admin"))
    pub_nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                 **nats_options(nats_server.url))
    pool = await db.create_pool(database_url, max_size=3)
    worker: asyncio.Task[None] | None = None
    try:
        agg_js, js = agg_nc.jetstream(), pub_nc.jetstream()
        await jetstream.ensure_streams(agg_js)
        await jetstream.ensure_aggregator_consumer(agg_js)
        agg = Aggregator(pool, agg_js, batch_size=100, fetch_timeout_s=0.2, nc=agg_nc)
        worker = asyncio.create_task(agg.run(stop))
        await publish(js, before.events)
        await poll(lambda: consumer_settled(js), what="first run folded")
        await check_truth(database_url, before)
        bound = agg.consumer.subscriptions

        nats_server.stop()
        await poll(lambda: _false(agg_nc.is_connected), what="aggregator sees the server gone", timeout_s=10)
        nats_server.start()
        await poll(lambda: _true(pub_nc.is_connected and agg_nc.is_connected), what="both reconnected",
                   timeout_s=30)
        await publish(js, after.events)
        await poll(lambda: consumer_settled(js), timeout_s=60, what="second run folded after the restart")
        await check_truth(database_url, after, processed_events=len(before.events) + len(after.events))
        assert agg.consumer.subscriptions > bound, "the subscription was bound again after the reconnect"
        assert agg.folded == len(before.events) + len(after.events) and agg.dead == 0
        conn = await asyncpg.connect(database_url)
        try:
            counts = {(str(r["run_id"]), r["state"]): r["n"] for r in await conn.fetch(
                "SELECT run_id, state, count(*) AS n FROM run_tasks GROUP BY 1, 2")}
        finally:
            await conn.close()
        for rec in (before, after):
            expected: dict[tuple[str, str], int] = {}
            for state, *_ in rec.truth.tasks.values():
                expected[(rec.run_id, state)] = expected.get((rec.run_id, state), 0) + 1
            assert {k: v for k, v in counts.items() if k[0] == rec.run_id} == expected
    finally:
        stop.set()
        if worker is not None:
            await worker
        await pool.close()
        await pub_nc.close()
        await jetstream.close(agg_nc)


async def _true(value: bool) -> bool:
    return value


async def _false(value: bool) -> bool:
    return not value
