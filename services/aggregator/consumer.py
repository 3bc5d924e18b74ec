"""The aggregator's durable pull consumer: fetch a batch, fold it, commit, then ack.

* One transaction per fetched batch; acks (and terms) only after the commit.
  The next batch is fetched while the current one is folded, so NATS and
  PostgreSQL work at the same time.
* PostgreSQL unreachable (or any error that is not the data's fault): nothing
  is acked; the batch is retried with backoff up to `max_backoff_s`, and its
  messages are kept in progress so JetStream does not redeliver them meanwhile.
  Nothing is lost: at worst a message is redelivered, and the fold skips
  events it already applied (`processed_events`).
* A message that cannot be decoded, or names a run PostgreSQL does not know,
  or whose values PostgreSQL refuses (SQLSTATE classes 22/23, found by folding
  the batch's events one by one), is stored in `dead_letters` with its raw
  bytes and the error, terminated on JetStream and logged; the rest is folded.
* Several instances may bind the same durable consumer: JetStream shares the
  messages out, and the fold is idempotent and order-independent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import asyncpg
import msgspec
import structlog
from asyncpg.exceptions import _base as asyncpg_base
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.events import Event
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM
from runtime.aio import pause
from services.aggregator.fold import Batch, DeadLetter, FoldResult, Incoming, fold

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Event)

PRUNE_AFTER_S = 8 * 86_400.0  # longer than the event stream keeps messages (7 days)


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


# SQLSTATE classes that say "try again later": connection (08), rollback / deadlock (40),
# insufficient resources (53), operator intervention such as a shutdown (57), system error (58).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def is_data_error(exc: BaseException) -> bool:
    """Whether the batch's values themselves are at fault, so retrying the same batch cannot help.

    Everything that is not a sign of PostgreSQL being unreachable or busy counts:
    refused values (22, 23), limits such as an index row too large (54), and
    errors raised while preparing the rows (TypeError, ValueError, ...). Such a
    batch is folded event by event and only the offending events are dead-lettered.
    """
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] not in _TRANSIENT_SQLSTATE_CLASSES
    if isinstance(exc, asyncpg_base.DataError):  # asyncpg could not encode a value (an InterfaceError too)
        return True
    if isinstance(exc, asyncpg.InterfaceError | OSError | TimeoutError | asyncio.CancelledError):
        return False
    return isinstance(exc, ArithmeticError | TypeError | ValueError | LookupError)


class Aggregator:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, batch_size: int = 500,
                 fetch_timeout_s: float = 1.0, first_backoff_s: float = 0.25, max_backoff_s: float = 10.0,
                 prune_every_s: float = 3600.0, prune_after_s: float = PRUNE_AFTER_S) -> None:
        self._pool = pool
        self._js = js
        self._batch_size = batch_size
        self._fetch_timeout_s = fetch_timeout_s
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._prune_every_s = prune_every_s
        self._prune_after_s = prune_after_s
        self.folded = 0  # events applied
        self.skipped = 0  # events seen again (already applied)
        self.dead = 0  # messages dead-lettered
        self.batches = 0
        self.retries = 0  # failed commits retried (PostgreSQL unreachable, ...)

    # -- PostgreSQL ---------------------------------------------------------

    async def _fold_tx(self, batch: Batch) -> FoldResult:
        async with self._pool.acquire() as conn, conn.transaction():
            return await fold(conn, batch)

    async def _fold_each(self, batch: Batch, cause: BaseException) -> tuple[FoldResult, list[DeadLetter]]:
        """The batch's values were refused: fold its events one by one and dead-letter the bad ones."""
        log.warning("batch refused by PostgreSQL; folding its events one by one", error=str(cause))
        total = FoldResult()
        dead = list(batch.dead)
        for item in batch.items:
            single = Batch(items=[item])
            try:
                r = await self._fold_tx(single)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                e = item.event
                dead.append(DeadLetter(item.subject, item.stream_seq, item.raw,
                                       f"refused by PostgreSQL: {type(exc).__name__}: {exc}", e.event_id))
                continue
            dead.extend(single.dead)
            total.applied += r.applied
            total.skipped += r.skipped
        final = Batch(dead=dead)
        await self._fold_tx(final)
        total.dead = len(dead)
        return total, dead

    async def commit(self, batch: Batch, stop: asyncio.Event,
                     hold: Callable[[], list[Msg]] = list) -> tuple[FoldResult, list[DeadLetter]] | None:
        """Fold `batch` until it commits; None when stopped first. `hold()` lists messages to keep alive."""
        backoff = self._first_backoff_s
        while True:
            attempt = Batch(items=list(batch.items), dead=list(batch.dead))
            try:
                try:
                    result = await self._fold_tx(attempt)
                    return result, attempt.dead
                except Exception as exc:
                    if not is_data_error(exc):
                        raise
                    return await self._fold_each(batch, exc)
            except Exception as exc:
                self.retries += 1
                log.warning("fold failed; the batch is kept and retried", error=str(exc) or repr(exc),
                            error_type=type(exc).__name__, retry_in_s=backoff, events=len(batch.items))
            for m in hold():
                with contextlib.suppress(Exception):  # NATS may be down too: then it redelivers later
                    await m.in_progress()
            if await pause(stop, backoff):
                return None
            backoff = min(backoff * 2, self._max_backoff_s)

    async def prune(self) -> int:
        status = await self._pool.execute(
            "DELETE FROM processed_events WHERE processed_at < now() - make_interval(secs => $1)",
            self._prune_after_s)
        return int(status.split()[-1])

    # -- NATS ---------------------------------------------------------------

    async def _fetch(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> list[Msg]:
        try:
            return await sub.fetch(self._batch_size, timeout=self._fetch_timeout_s)
        except TimeoutError:
            return []  # nothing to do: the normal empty case
        except Exception as exc:  # NATS down or reconnecting: fetch again
            if not stop.is_set():
                log.warning("fetch failed; retrying", error=repr(exc))
                await pause(stop, 1.0)
            return []

    async def handle(self, msgs: list[Msg], stop: asyncio.Event,
                     hold: Callable[[], list[Msg]] = list) -> bool:
        """Fold, commit, then ack/term `msgs`; False if stopped before the commit (nothing acked)."""
        batch, _ = decode_batch(msgs)
        done = await self.commit(batch, stop, lambda: msgs + hold())
        if done is None:
            return False
        result, dead = done
        dead_seqs = {d.stream_seq for d in dead if d.stream_seq is not None}
        for d in dead:
            log.error("event dead-lettered", subject=d.subject, stream_seq=d.stream_seq, event_id=d.event_id,
                      error=d.error)
        for m in msgs:
            if m.metadata.sequence.stream in dead_seqs:
                await m.term()
            else:
                await m.ack()
        self.folded += result.applied
        self.skipped += result.skipped
        self.dead += len(dead)
        self.batches += 1
        return True

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._js.pull_subscribe_bind(durable=AGGREGATOR_DURABLE, stream=EVT_STREAM)
        log.info("aggregator consuming", stream=EVT_STREAM, durable=AGGREGATOR_DURABLE, batch_size=self._batch_size)
        next_prune = time.monotonic() + self._prune_every_s
        ahead: asyncio.Task[list[Msg]] = asyncio.create_task(self._fetch(sub, stop))

        def prefetched() -> list[Msg]:
            return ahead.result() if ahead.done() and not ahead.cancelled() and ahead.exception() is None else []

        try:
            while not stop.is_set():
                msgs = await ahead
                if stop.is_set():
                    break  # `msgs` is still `ahead`'s result: released below
                ahead = asyncio.create_task(self._fetch(sub, stop))  # fetch the next batch while folding
                if msgs and not await self.handle(msgs, stop, prefetched):
                    await self._release(msgs)
                    break
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self._prune_every_s
                    try:
                        pruned = await self.prune()
                        log.info("processed events pruned", rows=pruned)
                    except Exception as exc:
                        log.warning("pruning processed events failed", error=repr(exc))
        finally:
            if not ahead.done():
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            await self._release(prefetched())

    @staticmethod
    async def _release(msgs: list[Msg]) -> None:
        """Give unfolded messages back at once (instead of after AckWait) when stopping."""
        for m in msgs:
            with contextlib.suppress(Exception):
                await m.nak()
