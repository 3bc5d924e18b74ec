"""The aggregator's pipelined consumer (`PullConsumer.run_pipelined`): fetching goes on while a fold waits,
the next fold takes everything fetched meanwhile, and a crash with fetched batches waiting loses nothing and
applies nothing twice (real nats-server and PostgreSQL; the fold is held up by a lock on the run's row)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from doai.embedded import EmbeddedNats
from runtime import db, jetstream
from runtime.pull_consumer import quick_next_msg, settle
from services.aggregator.consumer import Aggregator
from tests.aggregator_support import FleetRecording, check_truth, consumer_settled, migrate, poll, publish, seed_run
from tests.conftest import nats_options

BATCH = 5  # messages per fetch; a fold takes at most 4 fetches' worth (20)


async def _hold_run(url: str, run_id: str) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """Lock the run's row as another transaction would: the fold waits at its first statement."""
    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", uuid.UUID(run_id))
    return conn, tx


async def _published(rec: FleetRecording, server: EmbeddedNats, database_url: str,
                     ack_wait_s: float = 30.0) -> NATS:
    """The recording's run seeded in PostgreSQL and its events in DOAI_EVT, the aggregator's consumer declared
    (with `ack_wait_s`); returns the admin connection that published them (the caller closes it)."""
    await migrate(database_url)
    seed = await asyncpg.connect(database_url)
    await seed_run(seed, rec.run_id, rec.pairs())
    await seed.close()
    nc = await nats.connect(server.url, **nats_options(server.url))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    await jetstream.ensure_aggregator_consumer(js, ack_wait_s=ack_wait_s)
    await publish(js, rec.events)
    return nc


async def _processed(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM processed_events"))
    finally:
        await conn.close()


async def test_fetches_pile_up_while_a_fold_waits_and_the_next_fold_takes_them_all(
    nats_server: EmbeddedNats, database_url: str
) -> None:
    rec = FleetRecording(str(uuid.uuid4()), nodes=2, devices=6, seed=5)
    nc = await _published(rec, nats_server, database_url)
    js = nc.jetstream()
    pool = await db.create_pool(database_url, max_size=2)
    agg = Aggregator(pool, js, batch_size=BATCH, fetch_timeout_s=0.2)
    holder, tx = await _hold_run(database_url, rec.run_id)
    stop = asyncio.Event()
    worker = asyncio.create_task(agg.run(stop))
    try:
        # The first fold is stuck on the lock; the fetcher goes on until 4 fetches' worth are waiting.
        await poll(lambda: _ready(len(agg.consumer.prefetched()) >= 4 * BATCH), timeout_s=30,
                   what="fetched messages waiting behind the blocked fold")
        assert agg.batches == 0 and await _processed(database_url) == 0
        await tx.rollback()
        await poll(lambda: consumer_settled(js), timeout_s=60, what="every event acked")
        await check_truth(database_url, rec)
        unique = len({e.event_id for e in rec.events})
        assert agg.folded == unique and agg.dead == 0 and agg.retries == 0
        # Folds were larger than one fetch (they took what piled up), and none larger than 4 fetches.
        assert agg.batches < unique / BATCH, (agg.batches, unique)
        assert agg.batches >= unique / (4 * BATCH)
    finally:
        stop.set()
        await worker
        await holder.close()
        await pool.close()
        await nc.close()


async def test_a_crash_with_fetched_batches_waiting_loses_nothing_and_applies_nothing_twice(
    nats_server: EmbeddedNats, database_url: str
) -> None:
    """The aggregator's NATS connection dies while one fold is in flight and more fetches wait behind it:
    the fold commits but cannot ack, the waiting messages are neither folded nor given back. After
    AckWait JetStream redelivers all of them to the next aggregator, which skips what was committed."""
    rec = FleetRecording(str(uuid.uuid4()), nodes=2, devices=6, seed=8)
    admin = await _published(rec, nats_server, database_url, ack_wait_s=2.0)
    ajs = admin.jetstream()
    pool = await db.create_pool(database_url, max_size=2)
    nc1 = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    first = Aggregator(pool, nc1.jetstream(), batch_size=BATCH, fetch_timeout_s=0.2, ack_wait_s=2.0)
    holder, tx = await _hold_run(database_url, rec.run_id)
    stop1 = asyncio.Event()
    worker1 = asyncio.create_task(first.run(stop1))
    second: Aggregator | None = None
    stop2 = asyncio.Event()
    worker2: asyncio.Task[None] | None = None
    try:
        await poll(lambda: _ready(len(first.consumer.prefetched()) >= 4 * BATCH), timeout_s=30,
                   what="fetched messages waiting behind the blocked fold")
        await nc1.close()  # the crash, as NATS sees it: nothing acked, nothing given back
        await tx.rollback()  # the stuck fold commits now; its acks fail
        await poll(lambda: _ready(worker1.done()), timeout_s=30, what="the first aggregator stopped by the failure")
        committed = await _processed(database_url)
        assert committed > 0 and first.batches == 0  # folded and committed, never acked
        second = Aggregator(pool, ajs, batch_size=BATCH, fetch_timeout_s=0.2, ack_wait_s=2.0)
        worker2 = asyncio.create_task(second.run(stop2))
        await poll(lambda: consumer_settled(ajs), timeout_s=60, what="every event acked after the crash")
        await check_truth(database_url, rec)  # includes: processed_events == the number of distinct events
        unique = len({e.event_id for e in rec.events})
        # The redelivered, already committed events were skipped whole, the rest applied once.
        assert second.skipped >= committed and second.folded == unique - committed, (second.skipped, committed)
        assert second.dead == 0
    finally:
        stop1.set()
        stop2.set()
        with contextlib.suppress(Exception):
            await worker1
        if worker2 is not None:
            await worker2
        await holder.close()
        await pool.close()
        await admin.close()


async def _stream_with_consumer(js: JetStreamContext, stream: str, count: int, durable: str) -> None:
    """Stream `stream` on `<stream lower>.>` holding `count` messages (b"0", b"1", … over three subjects), and an
    explicit-ack durable consumer `durable` that has not been given any yet."""
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
    for i in range(count):
        await js.publish(f"{stream.lower()}.{i % 3}", str(i).encode())
    await js.add_consumer(stream, ConsumerConfig(durable_name=durable, deliver_policy=DeliverPolicy.ALL,
                                                 ack_policy=AckPolicy.EXPLICIT, ack_wait=30))


async def test_quick_next_msg_hands_out_what_fetch_did_and_still_times_out_when_empty(
    nats_server: EmbeddedNats,
) -> None:
    """The shortcut the aggregator's fetch takes (`quick_next_msg`) changes the cost, not the result."""
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        js = nc.jetstream()
        await _stream_with_consumer(js, "QUICK", 60, "q")
        sub = await js.pull_subscribe_bind(durable="q", stream="QUICK")
        assert quick_next_msg(sub)
        got: list[bytes] = []
        while len(got) < 60:
            msgs = await sub.fetch(25, timeout=2.0)
            assert 0 < len(msgs) <= 25
            for m in msgs:
                got.append(m.data)
                await m.ack()
        assert got == [str(i).encode() for i in range(60)]  # each once, in stream order
        assert sub.pending_msgs == 0 and sub.pending_bytes == 0  # the queue's bookkeeping kept
        with pytest.raises(nats.errors.TimeoutError):  # nothing left: the normal empty case, as before
            await sub.fetch(10, timeout=0.3)
        await nc.flush()
        info = await js.consumer_info("QUICK", "q")
        assert info.num_ack_pending == 0 and info.num_pending == 0
        assert not quick_next_msg(object())  # type: ignore[arg-type]  # not nats-py's: left alone
    finally:
        await nc.close()


async def test_settle_acks_and_terms_exactly_the_messages_it_is_given_in_one_write(
    nats_server: EmbeddedNats,
) -> None:
    """The aggregator's batched acks (`settle`) send what `Msg.ack` / `Msg.term` send, one per message:
    the acked ones are done, the termed ones are terminated (JetStream's advisory names exactly them),
    a message not given is neither, and a message cannot be settled twice."""
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        js = nc.jetstream()
        await _stream_with_consumer(js, "SETTLE", 30, "s")
        terminated: list[int] = []

        async def on_term(msg: Msg) -> None:
            terminated.append(int(json.loads(msg.data)["stream_seq"]))

        await nc.subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.SETTLE.s", cb=on_term)
        sub = await js.pull_subscribe_bind(durable="s", stream="SETTLE")
        msgs: list[Msg] = []
        while len(msgs) < 30:
            msgs.extend(await sub.fetch(30 - len(msgs), timeout=2.0))
        kept = msgs.pop()  # fetched, not given to settle: stays pending
        await nc.flush()  # nothing left to write: what follows must send itself
        out_msgs = nc.stats["out_msgs"]
        await settle(msgs, {3, 7, 20})
        assert nc.stats["out_msgs"] == out_msgs + 29  # one ack (or term) per message, as Msg.ack counts them
        # The client's flusher was woken, as `publish` wakes it: the acks do not wait for the next publish or
        # for the server's next PING (which would also send them, seconds later).
        assert nc._flush_queue is not None
        assert nc._pending_data_size == 0 or not nc._flush_queue.empty()
        # On the wire without anything else sent on this connection (no flush, no request): watched from another.
        other = (await nats.connect(nats_server.url, **nats_options(nats_server.url))).jetstream()
        try:
            await poll(lambda: _ack_pending(other, "SETTLE", "s", 1), timeout_s=10, what="the acks on the wire")
        finally:
            await other._nc.close()
        await poll(lambda: _ready(len(terminated) == 3), timeout_s=10, what="the terminated advisories")
        assert sorted(terminated) == sorted(msgs[i].metadata.sequence.stream for i in (3, 7, 20))
        with pytest.raises(nats.errors.MsgAlreadyAckdError):
            await settle(msgs[:1])  # settled once only, like Msg.ack
        info = await js.consumer_info("SETTLE", "s")
        assert info.num_ack_pending == 1 and info.num_pending == 0  # only `kept` is still out
        await settle([kept])
        await nc.flush()
        await poll(lambda: _settled(js, "SETTLE", "s"), timeout_s=10, what="the last message acked")
        assert sorted(terminated) == sorted(msgs[i].metadata.sequence.stream for i in (3, 7, 20))  # no more terms
        await settle([])  # nothing to do
    finally:
        await nc.close()


async def test_settle_on_a_closed_connection_raises_and_marks_nothing(nats_server: EmbeddedNats) -> None:
    """As `Msg.ack` does: a closed connection is an error, and the messages stay unacknowledged."""
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    js = nc.jetstream()
    await js.add_stream(name="SETTLEC", subjects=["settlec.>"])
    for i in range(5):
        await js.publish("settlec.x", str(i).encode())
    await js.add_consumer("SETTLEC", ConsumerConfig(durable_name="c", deliver_policy=DeliverPolicy.ALL,
                                                    ack_policy=AckPolicy.EXPLICIT, ack_wait=30))
    sub = await js.pull_subscribe_bind(durable="c", stream="SETTLEC")
    msgs = await sub.fetch(5, timeout=2.0)
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await settle(msgs)
    assert not any(m._ackd for m in msgs)
    admin = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        info = await admin.jetstream().consumer_info("SETTLEC", "c")
        assert info.num_ack_pending == 5  # delivered, never acked: JetStream redelivers after AckWait
    finally:
        await admin.close()


async def _ack_pending(js: JetStreamContext, stream: str, durable: str, left: int) -> bool:
    info = await js.consumer_info(stream, durable)
    return bool(info.num_ack_pending == left and info.num_pending == 0)


async def _settled(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return bool(info.num_ack_pending == 0 and info.num_pending == 0)


async def _ready(value: bool) -> bool:
    return value
