"""`kill -9` of the aggregator process mid-batch, ten times while a run's events flow:
the final tables equal what the nodes observed (real `doai aggregator` process, NATS, PostgreSQL)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import nats

from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM
from doai.embedded import EmbeddedNats
from runtime import jetstream
from tests.aggregator_support import (
    FleetRecording,
    check_truth,
    consumer_settled,
    migrate,
    poll,
    publish,
    seed_run,
)
from tests.conftest import creds_file, nats_options

ROOT = Path(__file__).resolve().parent.parent


def start_aggregator(nats_url: str, database_url: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": nats_url, "DATABASE_URL": database_url, "DOAI_AGG_BATCH": "5",
           "DOAI_AGG_ACK_WAIT_S": "3", "DOAI_NATS_CREDS": str(creds_file("aggregator")),
           "DOAI_LOG_FORMAT": "json"}
    with log_path.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "doai.cli", "aggregator"], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)


async def test_aggregator_killed_ten_times_mid_batch_loses_and_corrupts_nothing(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path
) -> None:
    rec = FleetRecording(str(uuid.uuid4()), nodes=3, devices=60, seed=3)
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    await jetstream.ensure_aggregator_consumer(js)
    rng = random.Random(9)
    chunks = [rec.events[i::11] for i in range(11)]  # each chunk keeps every device's order; folded in any order
    log_path = tmp_path / "aggregator.log"
    kills, mid_flight = 0, 0
    proc: subprocess.Popen[bytes] | None = None
    try:
        await seed_run(conn, rec.run_id, rec.pairs())
        for chunk in chunks[:10]:
            await publish(js, chunk)
            before = await conn.fetchval("SELECT count(*) FROM processed_events")
            proc = start_aggregator(nats_server.url, database_url, log_path)

            async def progressed(before: int = before) -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM processed_events") > before)

            # Polled tightly: the pipelined fold takes a chunk in well under 100 ms, and the kill must land
            # while it is still at it.
            await poll(progressed, timeout_s=60, what="aggregator folding", every_s=0.005)
            info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
            mid_flight += info.num_ack_pending + info.num_pending > 0
            if rng.random() < 0.5:
                await poll(lambda: _sleep_tick(), timeout_s=1)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
            kills += 1
            proc = None

        await publish(js, chunks[10])
        proc = start_aggregator(nats_server.url, database_url, log_path)
        await poll(lambda: consumer_settled(js), timeout_s=90, what="every event acked after the last restart")
        await check_truth(database_url, rec)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log_path.read_text()[-3000:]
        proc = None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        await conn.close()
        await nc.close()
    assert kills == 10
    assert mid_flight >= 3, f"only {mid_flight} of 10 kills hit unacked messages"


async def _sleep_tick() -> bool:
    import asyncio

    await asyncio.sleep(0.05)
    return True
