"""PostgreSQL stopped for 30 s while events keep coming, then restarted: no event is lost.

Runs its own PostgreSQL (the session's server is shared by every test and must
not be stopped), stopped and started with `pg_ctl` on the same data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import nats
import pytest

from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM
from doai.embedded import EmbeddedNats, ensure_runtime_dir
from runtime import db, jetstream
from services.aggregator.consumer import Aggregator
from tests.aggregator_support import FleetRecording, check_truth, consumer_settled, poll, publish, seed_run
from tests.conftest import nats_options

OUTAGE_S = 30.0


class PrivatePostgres:
    def __init__(self, data_dir: Path) -> None:
        ensure_runtime_dir()
        import pgserver

        self.server: Any = pgserver.get_server(data_dir, cleanup_mode="stop")
        self.uri: str = self.server.get_uri()
        self.socket_dir = parse_qs(urlsplit(self.uri).query)["host"][0]

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        # The options pgserver itself starts the server with: no TCP, a Unix socket in `socket_dir`.
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start"])

    def close(self) -> None:
        self.server.cleanup()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    folder = Path(tempfile.mkdtemp(prefix="doai-outage-"))
    folder.chmod(0o755)
    pg = PrivatePostgres(folder / "pg")
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.start()  # pgserver's cleanup expects a running server
        pg.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_postgres_down_for_30_s_loses_no_event(nats_server: EmbeddedNats, private_pg: PrivatePostgres) -> None:
    rec = FleetRecording(str(uuid.uuid4()), nodes=2, devices=15, seed=21)
    thirds = [rec.events[i::3] for i in range(3)]
    pool = await db.create_pool(private_pg.uri, max_size=3)
    await db.migrate(pool)
    async with pool.acquire() as conn:
        await seed_run(conn, rec.run_id, rec.pairs())
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    await jetstream.ensure_aggregator_consumer(js)
    agg = Aggregator(pool, js, batch_size=100, max_backoff_s=5.0)
    stop = asyncio.Event()
    worker = asyncio.create_task(agg.run(stop))
    try:
        await publish(js, thirds[0])
        await poll(lambda: consumer_settled(js), what="first third folded")
        folded_before = agg.folded

        await asyncio.to_thread(private_pg.stop)
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await asyncpg.connect(private_pg.uri)
        down_at = time.monotonic()
        await publish(js, thirds[1])
        while time.monotonic() - down_at < OUTAGE_S:  # the outage itself, not a synchronisation
            info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
            assert info.num_redelivered == 0 or info.num_ack_pending > 0  # kept in progress, never dropped
            await asyncio.sleep(1.0)
        info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
        assert agg.folded == folded_before, "nothing can be folded while PostgreSQL is down"
        assert agg.retries >= 4, "the batch was retried with backoff"
        assert info.num_ack_pending + info.num_pending == len(thirds[1]), "nothing acked during the outage"

        await asyncio.to_thread(private_pg.start)
        await publish(js, thirds[2])
        await poll(lambda: consumer_settled(js), timeout_s=90, what="everything folded after the restart")
        await check_truth(private_pg.uri, rec)
        assert agg.folded == len(rec.events)
    finally:
        stop.set()
        await worker
        await nc.close()
        await pool.close()
