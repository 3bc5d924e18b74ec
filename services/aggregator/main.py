"""`doai aggregator`: migrate, declare the stream and consumer, fold until stopped.

Configuration: `AggregatorSettings` (one typed object from the environment,
built by `runtime.config.load_settings`).

| variable | default | |
|---|---|---|
| `DATABASE_URL`, `NATS_URL` | required | |
| `DOAI_AGG_BATCH` | 500 | messages fetched and folded per transaction |
| `DOAI_AGG_ACK_WAIT_S` | 30 | JetStream AckWait: an unacked message (crashed aggregator) is redelivered after it |
| `DOAI_LIVENESS_WINDOW_S` | unset: keep the database's (60 s at first) | older reports are stale |
| `DOAI_NATS_CREDS` | (required) | the aggregator's NATS credentials (`aggregator.creds` of `doai nats-auth init`) |
| `DOAI_NATS_CA` | unset | CA file that signed nats-server's certificate (with a `tls://` NATS_URL) |
| `DOAI_AGG_MAX_SKEW_S` | 30 | a node timestamp later than the message's arrival + this is clamped to the arrival |
| `DOAI_LOST_AFTER_S` | 60 | an open task whose node sent no heartbeat for this long becomes `lost` |
| `DOAI_HOUSEKEEPING_S` | 5 | how often the housekeeping loop looks for lost tasks and prunes |
| `DOAI_PROCESSED_EVENTS_KEEP_S` | 8 days | `processed_events` kept; must exceed the event stream's max_age (7 days) |
| `DOAI_DEAD_LETTERS_KEEP_S` | 2592000 (30 days) | dead letters kept at most this long |
| `DOAI_DEAD_LETTERS_MAX_ROWS` | 100000 | and at most this many (the newest) |
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from msgspec import field

from contracts.subjects import EVT_STREAM, role_inbox_prefix
from runtime import db, jetstream
from runtime.config import ConfigError, Settings
from runtime.supervisor import Supervisor
from services.aggregator.consumer import Aggregator
from services.aggregator.housekeeping import Housekeeping
from services.aggregator.validate import DEFAULT_MAX_SKEW_S

log = structlog.get_logger(__name__)

EVENT_MAX_AGE_S = float(jetstream.STREAM_MAX_AGE_S)
PROCESSED_KEEP_S = EVENT_MAX_AGE_S + 86_400.0  # a day longer than the event stream keeps a message


class AggregatorSettings(Settings, kw_only=True):
    database_url: str = field(name="DATABASE_URL")
    nats_url: str = field(name="NATS_URL")
    batch_size: int = field(default=500, name="DOAI_AGG_BATCH")
    ack_wait_s: float = field(default=30.0, name="DOAI_AGG_ACK_WAIT_S")
    liveness_window_s: float | None = field(default=None, name="DOAI_LIVENESS_WINDOW_S")
    # The aggregator's NATS identity (`aggregator.creds` of `doai nats-auth init`) and the CA that
    # signed nats-server's TLS certificate (with a tls:// NATS_URL).
    nats_creds: str | None = field(default=None, name="DOAI_NATS_CREDS")
    nats_ca: str | None = field(default=None, name="DOAI_NATS_CA")
    max_skew_s: float = field(default=DEFAULT_MAX_SKEW_S, name="DOAI_AGG_MAX_SKEW_S")
    lost_after_s: float = field(default=60.0, name="DOAI_LOST_AFTER_S")
    housekeeping_s: float = field(default=5.0, name="DOAI_HOUSEKEEPING_S")
    processed_keep_s: float = field(default=PROCESSED_KEEP_S, name="DOAI_PROCESSED_EVENTS_KEEP_S")
    dead_keep_s: float = field(default=30 * 86_400.0, name="DOAI_DEAD_LETTERS_KEEP_S")
    dead_max_rows: int = field(default=100_000, name="DOAI_DEAD_LETTERS_MAX_ROWS")

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError(f"DOAI_AGG_BATCH must be between 1 and 10000, got {self.batch_size}")
        if not 1.0 <= self.ack_wait_s <= 3600.0:
            raise ConfigError(f"DOAI_AGG_ACK_WAIT_S must be between 1 and 3600, got {self.ack_wait_s}")
        if not 0.0 <= self.max_skew_s <= 3600.0:
            raise ConfigError(f"DOAI_AGG_MAX_SKEW_S must be between 0 and 3600, got {self.max_skew_s}")
        if self.liveness_window_s is not None and not self.liveness_window_s > 0:
            raise ConfigError(f"DOAI_LIVENESS_WINDOW_S must be > 0, got {self.liveness_window_s}")
        if not self.nats_creds:
            raise ConfigError("set DOAI_NATS_CREDS to the aggregator's NATS credentials file (`aggregator.creds` of "
                              "`doai nats-auth init`)")
        if not 1.0 <= self.lost_after_s <= 86_400.0:
            raise ConfigError(f"DOAI_LOST_AFTER_S must be between 1 and 86400, got {self.lost_after_s}")
        if not 0.1 <= self.housekeeping_s <= 3600.0:
            raise ConfigError(f"DOAI_HOUSEKEEPING_S must be between 0.1 and 3600, got {self.housekeeping_s}")
        # A message JetStream may still redeliver must still be recognised as folded.
        if not self.processed_keep_s > EVENT_MAX_AGE_S:
            raise ConfigError(f"DOAI_PROCESSED_EVENTS_KEEP_S must exceed the event stream's max_age"
                              f" ({EVENT_MAX_AGE_S:.0f} s), got {self.processed_keep_s}")
        if not self.dead_keep_s > 0:
            raise ConfigError(f"DOAI_DEAD_LETTERS_KEEP_S must be > 0, got {self.dead_keep_s}")
        if self.dead_max_rows < 1:
            raise ConfigError(f"DOAI_DEAD_LETTERS_MAX_ROWS must be at least 1, got {self.dead_max_rows}")


async def set_liveness_window(pool: asyncpg.Pool, seconds: float) -> None:
    """What the `device_liveness` / `node_liveness` views (REST and Grafana) count as fresh."""
    await pool.execute(
        "INSERT INTO fleet_settings (name, value) VALUES ('liveness_window_s', $1)"
        " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value", repr(float(seconds)))


async def run_aggregator(settings: AggregatorSettings, stop: asyncio.Event) -> None:
    pool = await db.create_pool(settings.database_url)
    try:
        await db.migrate(pool)
        if settings.liveness_window_s is not None:
            await set_liveness_window(pool, settings.liveness_window_s)
            log.info("liveness window set", seconds=settings.liveness_window_s)
        nc = await jetstream.connect(settings.nats_url, name="doai-aggregator", stop=stop, creds=settings.nats_creds,
                                     inbox_prefix=role_inbox_prefix("aggregator"), ca_file=settings.nats_ca)
        try:
            js = nc.jetstream()
            # Only the backend may declare streams (least privilege): wait for DOAI_EVT.
            await jetstream.wait_for_stream(js, EVT_STREAM, stop)
            await jetstream.ensure_aggregator_consumer(js, ack_wait_s=settings.ack_wait_s)
            # A batch waiting for PostgreSQL is kept in progress at least three times per AckWait.
            aggregator = Aggregator(pool, js, batch_size=settings.batch_size,
                                    max_backoff_s=min(10.0, settings.ack_wait_s / 3), max_skew_s=settings.max_skew_s,
                                    ack_wait_s=settings.ack_wait_s, nc=nc)
            housekeeping = Housekeeping(pool, lost_after_s=settings.lost_after_s,
                                        processed_keep_s=settings.processed_keep_s,
                                        dead_keep_s=settings.dead_keep_s, dead_max_rows=settings.dead_max_rows,
                                        every_s=settings.housekeeping_s)
            async with Supervisor(stop, "aggregator") as loops:
                loops.start("fold", lambda: aggregator.run(stop))
                loops.start("housekeeping", lambda: housekeeping.run(stop))
        finally:
            await jetstream.close(nc)
    finally:
        await db.close_pool(pool)
