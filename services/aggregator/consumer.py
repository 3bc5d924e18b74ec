"""The aggregator's durable pull consumer: fetch a batch, fold it, commit, then ack.

A message that cannot be decoded is stored in `dead_letters` with its bytes
and terminated on JetStream, so it is neither lost nor redelivered forever.
When PostgreSQL is down nothing is acked: the batch is retried with backoff
(and kept in progress so JetStream does not hand it to another instance).
"""

from __future__ import annotations

import asyncio

import asyncpg
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.events import Event
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM
from runtime.aio import pause
from services.aggregator.fold import Batch, DeadLetter, Incoming, fold

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Event)


def decode_batch(msgs: list[Msg]) -> tuple[Batch, list[Msg]]:
    """Split fetched messages into foldable events and dead letters (returned for `term`)."""
    batch = Batch()
    poison: list[Msg] = []
    for msg in msgs:
        seq = msg.metadata.sequence.stream if msg.reply else None
        try:
            event = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            batch.dead.append(DeadLetter(msg.subject, seq, msg.data, str(err)))
            poison.append(msg)
            continue
        batch.items.append(Incoming(event, msg.subject, seq, msg.data))
    return batch, poison


class Aggregator:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, batch_size: int = 500,
                 fetch_timeout_s: float = 1.0) -> None:
        self._pool = pool
        self._js = js
        self._batch_size = batch_size
        self._fetch_timeout_s = fetch_timeout_s
        self.folded = 0

    async def _commit(self, batch: Batch) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await fold(conn, batch)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._js.pull_subscribe_bind(durable=AGGREGATOR_DURABLE, stream=EVT_STREAM)
        log.info("aggregator consuming", stream=EVT_STREAM, durable=AGGREGATOR_DURABLE)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(self._batch_size, timeout=self._fetch_timeout_s)
            except TimeoutError:
                continue  # nothing to do: the normal empty case
            except Exception as exc:  # NATS down or reconnecting: fetch again
                log.warning("fetch failed; retrying", error=repr(exc))
                await pause(stop, 1.0)
                continue
            batch, poison = decode_batch(msgs)
            backoff = 0.5
            while True:
                try:
                    await self._commit(batch)
                    break
                except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                    log.warning("fold failed; retrying the batch", error=repr(exc), retry_in_s=backoff)
                    for m in msgs:
                        await m.in_progress()
                    await pause(stop, backoff)
                    if stop.is_set():
                        return  # not acked: JetStream redelivers to whoever runs next
                    backoff = min(backoff * 2, 30.0)
            for d in batch.dead:
                log.error("event dead-lettered", subject=d.subject, stream_seq=d.stream_seq,
                          error=d.error)
            poisoned = {id(m) for m in poison}
            for m in msgs:
                if id(m) in poisoned:
                    await m.term()
                else:
                    await m.ack()
            self.folded += len(batch.items)

