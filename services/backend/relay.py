"""The broadcast outbox relay: publish unsent outbox rows to JetStream, then mark them sent.

Rows are claimed with `FOR UPDATE SKIP LOCKED`, so several backends can relay
at once without claiming the same row; each message carries `Nats-Msg-Id` =
the row's `msg_id`, so a row published twice (a crash between the ack and the
commit) is stored once by JetStream's duplicate window. A row waits while an
earlier row of the same (run, node) is unsent, so a node never gets a run's
`RunCancel` before its `RunBroadcast`. A run moves from `pending` to
`dispatched` when all its broadcasts are sent.

Every command is signed as it is published (`Doai-Sig`, over the subject and
the exact payload bytes, with the backend's command-signing key): nodes refuse
anything else. The outbox keeps the unsigned payload; signing is deterministic
(Ed25519), so a re-published row carries the same signature.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import structlog
from nats.js import JetStreamContext

from runtime import jetstream
from runtime.aio import drain_forever
from runtime.signing import Signer
from services.backend.runs import broadcast_msg_id

log = structlog.get_logger(__name__)

_CLAIM = """
SELECT o.id, o.run_id, o.node_id, o.subject, o.msg_id, o.payload,
       r.status AS run_status
FROM outbox o JOIN runs r ON r.run_id = o.run_id
WHERE o.sent_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.run_id = o.run_id AND e.node_id = o.node_id
                  AND e.id < o.id AND e.sent_at IS NULL)
ORDER BY o.id LIMIT $1 FOR UPDATE OF o SKIP LOCKED
"""


class OutboxRelay:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, signer: Signer, poll_s: float = 1.0,
                 batch: int = 100) -> None:
        self._pool = pool
        self._js = js
        self._signer = signer
        self._poll_s = poll_s
        self._batch = batch
        self._wake = asyncio.Event()
        self.published = 0  # rows this relay published and marked sent
        # Nodes whose durable consumer this relay has declared (nodes cannot create their own).
        self._consumers: set[str] = set()

    def wake(self) -> None:
        """Called after a run is committed, so its broadcasts leave at once."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Publish one batch of unsent rows; return how many were sent."""
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self._batch)
            if not rows:
                return 0
            # A broadcast of a run cancelled before it left is withdrawn: no node starts work the
            # operator already cancelled (its RunCancel still goes out, harmlessly).
            withdrawn = {r["id"] for r in rows if r["run_status"] == "cancelled"
                         and r["msg_id"] == broadcast_msg_id(str(r["run_id"]), r["node_id"])}
            sending = [r for r in rows if r["id"] not in withdrawn]
            for node_id in sorted({r["node_id"] for r in sending} - self._consumers):
                # A pre-provisioned node never enrolled here: its consumer must exist before it can fetch.
                await jetstream.ensure_node_consumer(self._js, node_id)
                self._consumers.add(node_id)
            acks = await asyncio.gather(*(
                self._js.publish(r["subject"], r["payload"], headers={
                    "Nats-Msg-Id": r["msg_id"], **self._signer.command_headers(r["subject"], r["payload"])})
                for r in sending
            ))
            await self._mark_sent(conn, rows)
        self.published += len(sending)
        for r, ack in zip(sending, acks, strict=True):
            log.info("command published", run_id=str(r["run_id"]), node_id=r["node_id"], msg_id=r["msg_id"],
                     stream_seq=ack.seq, duplicate=bool(ack.duplicate))
        for r in rows:
            if r["id"] in withdrawn:
                log.info("broadcast withdrawn: run cancelled before it was sent", run_id=str(r["run_id"]),
                         node_id=r["node_id"])
        return len(rows)

    async def _mark_sent(self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
        """After every ack: stamp the rows sent and dispatch runs with nothing left unsent.

        The runs are locked first (in key order, as the aggregator and cancel do): two relays that
        sent different rows of one run would otherwise each see the other's rows unsent in their
        snapshot, and the run would stay `pending` for ever.
        """
        run_ids = sorted({r["run_id"] for r in rows})
        await conn.execute("SELECT 1 FROM runs WHERE run_id = ANY($1::uuid[]) ORDER BY run_id FOR UPDATE", run_ids)
        await conn.execute(
            "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", [r["id"] for r in rows]
        )
        # `dispatched_at` is stamped even when the aggregator already moved the run on (a node's
        # first event can be folded before this commit); only `pending` becomes `dispatched`.
        await conn.execute(
            "UPDATE runs SET dispatched_at = now(),"
            " status = CASE WHEN status = 'pending' THEN 'dispatched' ELSE status END"
            " WHERE run_id = ANY($1::uuid[]) AND dispatched_at IS NULL"
            " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = runs.run_id AND o.sent_at IS NULL)",
            run_ids,
        )

    async def run(self, stop: asyncio.Event) -> None:
        # PostgreSQL or NATS down: nothing is marked sent, the rows are retried.
        await drain_forever(self.relay_once, self._wake, stop, poll_s=self._poll_s, what="outbox relay",
                            first_backoff_s=0.5)
