"""Replay: a multi-node run's event stream folded once, then again shuffled with 20 % duplicates
by three aggregators on the same durable consumer, gives identical tables (real NATS + PostgreSQL)."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import nats

from doai.embedded import EmbeddedNats
from runtime import db, jetstream
from services.aggregator.consumer import Aggregator
from tests.aggregator_support import (
    FleetRecording,
    check_truth,
    consumer_settled,
    migrate,
    poll,
    publish,
    seed_run,
    snapshot,
)
from tests.conftest import fresh_database, nats_options


async def fold_through_stream(nats_url: str, database_url: str, rec: FleetRecording, events: list,
                              aggregators: int, batch_size: int, msg_id: bool) -> list[Aggregator]:
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        await seed_run(conn, rec.run_id, rec.pairs())
    finally:
        await conn.close()
    nc = await nats.connect(nats_url, **nats_options(nats_url))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    await jetstream.ensure_aggregator_consumer(js)
    stop = asyncio.Event()
    workers, tasks, closers = [], [], []
    for _ in range(aggregators):
        wnc = await nats.connect(nats_url, **nats_options(nats_url, "aggregator"))
        pool = await db.create_pool(database_url, max_size=2)
        workers.append(Aggregator(pool, wnc.jetstream(), batch_size=batch_size, fetch_timeout_s=0.2))
        closers.append((wnc, pool))
    # Every aggregator is connected and pulling before the first event lands, so all of them share the work
    # (published first, the one that connected first could fold most of it alone).
    tasks = [asyncio.create_task(agg.run(stop)) for agg in workers]
    await publish(js, events, msg_id=msg_id)
    try:
        await poll(lambda: consumer_settled(js), what="every message acked")
        assert sum(w.folded + w.skipped for w in workers) >= len(events)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for wnc, pool in closers:
            await jetstream.close(wnc)
            await pool.close()
        await nc.close()
    return workers


async def test_replay_shuffled_with_duplicates_by_three_aggregators_gives_identical_tables(
    nats_server: EmbeddedNats, pg_server: str, database_url: str, tmp_path: object
) -> None:
    rec = FleetRecording(str(uuid.uuid4()), nodes=3, devices=12, seed=11)
    assert len(rec.events) > 600

    # Folded once, in stream order, by one aggregator.
    await fold_through_stream(nats_server.url, database_url, rec, rec.events, aggregators=1, batch_size=500,
                              msg_id=True)
    once = await snapshot(database_url)
    await check_truth(database_url, rec)

    # A second stream (fresh server) holding the same events shuffled, 20 % of them twice. Published without
    # Nats-Msg-Id so JetStream keeps the duplicates and the fold has to skip them itself.
    rng = random.Random(5)
    noisy = rec.events + rng.sample(rec.events, k=len(rec.events) // 5)
    rng.shuffle(noisy)
    replay_server = EmbeddedNats(tmp_path / "replay-nats", nats_server.trust)
    replay_server.start()
    try:
        async with fresh_database(pg_server) as replay_url:
            workers = await fold_through_stream(replay_server.url, replay_url, rec, noisy, aggregators=3,
                                                batch_size=40, msg_id=False)
            again = await snapshot(replay_url)
    finally:
        replay_server.stop()

    assert [w.batches > 0 for w in workers] == [True, True, True], "every aggregator took part"
    assert sum(w.folded for w in workers) == len(rec.events)
    assert sum(w.skipped for w in workers) == len(noisy) - len(rec.events)
    for table in once:
        assert again[table] == once[table], f"{table} differs after the replay"
