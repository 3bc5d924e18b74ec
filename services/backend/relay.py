"""The broadcast outbox relay: publish unsent outbox rows to JetStream, then mark them sent.

Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several backends can relay
at once; each message carries `Nats-Msg-Id` = the row's `msg_id`, so a row
published twice (crash between the ack and the commit) is stored once.
A run moves from `pending` to `dispatched` when all its rows are sent.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from nats.js import JetStreamContext

from runtime.aio import drain_forever

log = structlog.get_logger(__name__)


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, poll_s: float = 1.0,
                 batch: int = 100) -> None:
        self._pool = pool
        self._js = js
        self._poll_s = poll_s
        self._batch = batch
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called after a run is committed, so its broadcasts leave at once."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows; return how many were sent."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, run_id, node_id, subject, msg_id, payload FROM outbox"
                " WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch,
            )
            if not rows:
                return 0
            acks = await asyncio.gather(*(
                self._js.publish(r["subject"], r["payload"], headers={"Nats-Msg-Id": r["msg_id"]})
                for r in rows
            ))
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
            )
            run_ids = list({r["run_id"] for r in rows})
            await conn.execute(
                "UPDATE runs SET status = 'dispatched', dispatched_at = now()"
                " WHERE run_id = ANY($1::uuid[]) AND status = 'pending'"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = runs.run_id AND o.sent_at IS NULL)",
                run_ids,
            )
        for r, ack in zip(rows, acks, strict=True):
            log.info("run broadcast published", run_id=str(r["run_id"]), node_id=r["node_id"],
                     stream_seq=ack.seq, duplicate=bool(ack.duplicate))
        return len(rows)

    async def run(self, stop: asyncio.Event) -> None:
        # PostgreSQL or NATS down: nothing is marked sent, the rows are retried.
        await drain_forever(self.relay_once, self._wake, stop, poll_s=self._poll_s, what="outbox relay",
                            first_backoff_s=0.5)
