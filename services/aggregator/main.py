"""`doai aggregator`: migrate, declare the stream and consumer, fold until stopped.

Configuration (environment, read by `settings_from_env`):

| variable | default | |
|---|---|---|
| `DOAI_AGG_BATCH` | 500 | messages fetched and folded per transaction |
| `DOAI_AGG_ACK_WAIT_S` | 30 | JetStream AckWait: an unacked message (crashed aggregator) is redelivered after it |
| `DOAI_LIVENESS_WINDOW_S` | unset: keep the database's (60 s at first) | older reports are stale |
| `DOAI_AGG_MAX_SKEW_S` | 30 | a node timestamp later than the message's arrival + this is clamped to the arrival |
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import asyncpg
import structlog

from runtime import db, jetstream
from services.aggregator.consumer import Aggregator
from services.aggregator.validate import DEFAULT_MAX_SKEW_S

log = structlog.get_logger(__name__)


@dataclass
class AggregatorSettings:
    batch_size: int = 500
    ack_wait_s: float = 30.0
    liveness_window_s: float | None = None
    max_skew_s: float = DEFAULT_MAX_SKEW_S


def settings_from_env(env: dict[str, str] | None = None) -> AggregatorSettings:
    env = dict(os.environ) if env is None else env
    settings = AggregatorSettings()
    raw_batch = env.get("DOAI_AGG_BATCH")
    raw_window = env.get("DOAI_LIVENESS_WINDOW_S")
    raw_ack_wait = env.get("DOAI_AGG_ACK_WAIT_S")
    raw_skew = env.get("DOAI_AGG_MAX_SKEW_S")
    try:
        if raw_batch:
            settings.batch_size = int(raw_batch)
        if raw_window:
            settings.liveness_window_s = float(raw_window)
        if raw_ack_wait:
            settings.ack_wait_s = float(raw_ack_wait)
        if raw_skew:
            settings.max_skew_s = float(raw_skew)
    except ValueError as exc:
        raise RuntimeError(f"aggregator settings: not a number: {exc}") from None
    if not 1 <= settings.batch_size <= 10_000:
        raise RuntimeError(f"DOAI_AGG_BATCH must be between 1 and 10000, got {settings.batch_size}")
    if not 1.0 <= settings.ack_wait_s <= 3600.0:
        raise RuntimeError(f"DOAI_AGG_ACK_WAIT_S must be between 1 and 3600, got {settings.ack_wait_s}")
    if not 0.0 <= settings.max_skew_s <= 3600.0:
        raise RuntimeError(f"DOAI_AGG_MAX_SKEW_S must be between 0 and 3600, got {settings.max_skew_s}")
    if settings.liveness_window_s is not None and not settings.liveness_window_s > 0:
        raise RuntimeError(f"DOAI_LIVENESS_WINDOW_S must be > 0, got {settings.liveness_window_s}")
    return settings


async def set_liveness_window(pool: asyncpg.Pool, seconds: float) -> None:
    """What the `device_liveness` / `node_liveness` views (REST and Grafana) count as fresh."""
    await pool.execute(
        "INSERT INTO fleet_settings (name, value) VALUES ('liveness_window_s', $1)"
        " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", repr(float(seconds)))


async def run_aggregator(database_url: str, nats_url: str, stop: asyncio.Event,
                         settings: AggregatorSettings | None = None) -> None:
    settings = settings or settings_from_env()
    pool = await db.create_pool(database_url)
    try:
        await db.migrate(pool)
        if settings.liveness_window_s is not None:
            await set_liveness_window(pool, settings.liveness_window_s)
            log.info("liveness window set", seconds=settings.liveness_window_s)
        nc = await jetstream.connect(nats_url, name="doai-aggregator", stop=stop)
        try:
            js = nc.jetstream()
            await jetstream.ensure_streams(js, update=False)  # the backend owns their limits
            await jetstream.ensure_aggregator_consumer(js, ack_wait_s=settings.ack_wait_s)
            # A batch waiting for PostgreSQL is kept in progress at least three times per AckWait.
            await Aggregator(pool, js, batch_size=settings.batch_size,
                             max_backoff_s=min(10.0, settings.ack_wait_s / 3), max_skew_s=settings.max_skew_s,
                             ack_wait_s=settings.ack_wait_s, nc=nc).run(stop)
        finally:
            await jetstream.close(nc)
    finally:
        await pool.close()
