"""The backend's retention loop (supervised): what it wrote and no longer needs.

* **outbox**: a row whose broadcast or cancel JetStream acknowledged (`sent_at`
  set) more than `outbox_keep_s` ago. A row not yet sent is never deleted,
  whatever its age: the relay still has to deliver it.
* **idempotency_keys**: a key older than `idempotency_ttl_s` (7 days by
  default). `create_run` already treats such a key as unknown; this only
  reclaims the space.

Both deletes are bounded per statement (`batch` rows) and repeated until
nothing is left, so a large backlog does not hold one long transaction.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog

from runtime import db
from runtime.aio import pause

log = structlog.get_logger(__name__)

_PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox
    WHERE sent_at IS NOT NULL AND sent_at < now() - make_interval(secs => $1)
    LIMIT $2)
"""

_PRUNE_KEYS = """
DELETE FROM idempotency_keys WHERE key IN (
    SELECT key FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)
"""


class Retention:
    def __init__(self, pool: asyncpg.Pool, *, outbox_keep_s: float, idempotency_ttl_s: float,
                 every_s: float = 60.0, batch: int = 10_000) -> None:
        self._pool = pool
        self.outbox_keep_s = outbox_keep_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.every_s = every_s
        self.batch = batch

    async def _drain(self, sql: str, keep_s: float) -> int:
        return await db.delete_in_batches(self._pool, sql, keep_s, self.batch)

    async def prune(self) -> dict[str, int]:
        return {"outbox": await self._drain(_PRUNE_OUTBOX, self.outbox_keep_s),
                "idempotency_keys": await self._drain(_PRUNE_KEYS, self.idempotency_ttl_s)}

    async def run(self, stop: asyncio.Event) -> None:
        log.info("retention started", outbox_keep_s=self.outbox_keep_s, idempotency_ttl_s=self.idempotency_ttl_s,
                 every_s=self.every_s)
        while not stop.is_set():
            pruned = await self.prune()
            if any(pruned.values()):
                log.info("retention: rows pruned", **pruned)
            if await pause(stop, self.every_s):
                return
