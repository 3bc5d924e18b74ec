"""`doai aggregator`: migrate, declare the stream and consumer, fold until stopped."""

from __future__ import annotations

import asyncio

from runtime import db, jetstream
from services.aggregator.consumer import Aggregator


async def run_aggregator(database_url: str, nats_url: str, stop: asyncio.Event) -> None:
    pool = await db.create_pool(database_url)
    try:
        await db.migrate(pool)
        nc = await jetstream.connect(nats_url, name="doai-aggregator", stop=stop)
        try:
            js = nc.jetstream()
            await jetstream.ensure_streams(js)
            await jetstream.ensure_aggregator_consumer(js)
            await Aggregator(pool, js).run(stop)
        finally:
            await jetstream.close(nc)
    finally:
        await pool.close()
