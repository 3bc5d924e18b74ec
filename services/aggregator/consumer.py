"""The aggregator's durable pull consumer: fetch a batch, fold it, commit, then ack.

* One transaction per batch; acks (and terms) only after the commit. Fetching
  never waits for the fold (`PullConsumer.run_pipelined`): while one batch is
  folded the next fetches pile up, and the next fold takes all of them (up to
  `max_fold` messages), so NATS and PostgreSQL work at the same time and a
  busy aggregator pays its per-transaction cost (round trips, commit) for
  more events at once.
* PostgreSQL unreachable (or any error that is not the data's fault): nothing
  is acked; the batch is retried with backoff up to `max_backoff_s`, and its
  messages are kept in progress so JetStream does not redeliver them meanwhile.
  Nothing is lost: at worst a message is redelivered, and the fold skips
  events it already applied (`processed_events`).
* A message that cannot be decoded, arrived on a subject that does not match
  it (`validate.py`), names a run or a task the backend did not create on that
  node, or whose values PostgreSQL refuses (SQLSTATE classes 22/23, found by
  folding the batch's events one by one), is stored in `dead_letters` with a
  reason, the head of its bytes, their size and SHA-256, and the error;
  it is terminated on JetStream and logged; the rest is folded.
* Node timestamps too far in the future are clamped to the message's arrival.
* Several instances may bind the same durable consumer: JetStream shares the
  messages out, and the fold is idempotent and order-independent.
* The consumer loop is `runtime.pull_consumer.PullConsumer`: it re-binds after
  reconnects, backs off on errors, and recreates the `aggregator` consumer
  when it finds it missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import structlog
from asyncpg.exceptions import _base as asyncpg_base
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.events import Event
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM
from runtime import jetstream
from runtime.aio import pause
from runtime.pull_consumer import PullConsumer, delivery, settle
from services.aggregator.fold import Batch, DeadLetter, FoldResult, Incoming, fold
from services.aggregator.validate import (
    DEFAULT_MAX_SKEW_S,
    REFUSED_BY_DATABASE,
    SUBJECT_MISMATCH,
    UNDECODABLE,
    SubjectCheck,
    clamp_future,
    subject_problem,
)

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Event)

_LOGGED_DEAD_PER_BATCH = 10  # dead letters logged one by one per batch; the rest in one summary line


def decode_batch(msgs: list[Msg], max_skew: timedelta = timedelta(seconds=DEFAULT_MAX_SKEW_S),
                 check: Callable[[str, Event], str | None] = subject_problem) -> Batch:
    """Decode and check fetched messages: foldable events, and dead letters (to be terminated).

    An event whose subject does not match it is a dead letter; a node timestamp
    more than `max_skew` after the message's arrival in JetStream is clamped to it.
    """
    batch = Batch()
    skew_s = max_skew.total_seconds()
    decode = _decoder.decode
    for msg in msgs:
        seq: int | None
        if msg.reply:
            seq, arrived_ns = delivery(msg)
            arrived_s: float = arrived_ns / 1_000_000_000
        else:
            seq, arrived_s = None, time.time()
        batch.seqs.append(seq)
        try:
            event = decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            batch.dead.append(DeadLetter(msg.subject, seq, msg.data, str(err), reason=UNDECODABLE))
            continue
        problem = check(msg.subject, event)
        if problem is not None:
            batch.dead.append(DeadLetter(msg.subject, seq, msg.data, problem, event.event_id, SUBJECT_MISMATCH))
            continue
        if event.ts.timestamp() > arrived_s + skew_s:  # the clamp (validate.clamp_future), without datetimes
            received_at = datetime.fromtimestamp(arrived_s, UTC)
            clamped = clamp_future(event, received_at, max_skew)
            if clamped is not event:
                batch.clamped.append((event.node_id, event.ts, received_at))
                event = clamped
        batch.items.append(Incoming(event, msg.subject, seq, msg.data))
    return batch


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
                 max_skew_s: float = DEFAULT_MAX_SKEW_S, ack_wait_s: float = 30.0, nc: NATS | None = None,
                 check_every_s: float = 5.0, max_fold: int | None = None) -> None:
        self._pool = pool
        self._js = js
        self._batch_size = batch_size
        # Messages folded in one transaction at most: what several fetches gathered while the last fold ran.
        self._max_fold = max_fold if max_fold is not None else min(10_000, 4 * batch_size)
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_skew = timedelta(seconds=max_skew_s)
        self._ack_wait_s = ack_wait_s
        # The aggregator may (re)create its own consumer, and only that (not the stream: the backend's).
        self._check = SubjectCheck()
        self.consumer = PullConsumer(js, EVT_STREAM, AGGREGATOR_DURABLE, nc=nc, ensure=self._ensure_consumer,
                                     batch=batch_size, fetch_timeout_s=fetch_timeout_s,
                                     first_backoff_s=first_backoff_s, max_backoff_s=max(1.0, max_backoff_s),
                                     check_every_s=check_every_s, quick_next=True)
        self.folded = 0  # events applied
        self.skipped = 0  # events seen again (already applied)
        self.dead = 0  # messages dead-lettered
        self.clamped = 0  # events whose future node timestamp was clamped
        self.batches = 0
        self.retries = 0  # failed commits retried (PostgreSQL unreachable, ...)

    async def _ensure_consumer(self) -> None:
        await jetstream.ensure_aggregator_consumer(self._js, ack_wait_s=self._ack_wait_s)

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
                                       f"refused by PostgreSQL: {type(exc).__name__}: {exc}", e.event_id,
                                       REFUSED_BY_DATABASE))
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
            attempt = Batch(items=list(batch.items), dead=list(batch.dead), clamped=batch.clamped)
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

    # -- NATS ---------------------------------------------------------------

    async def handle(self, msgs: list[Msg], stop: asyncio.Event,
                     hold: Callable[[], list[Msg]] = list) -> bool:
        """Fold, commit, then ack/term `msgs`; False if stopped before the commit (nothing acked)."""
        batch = decode_batch(msgs, self._max_skew, self._check)
        done = await self.commit(batch, stop, lambda: msgs + hold())
        if done is None:
            return False
        result, dead = done
        dead_seqs = {d.stream_seq for d in dead if d.stream_seq is not None}
        for d in dead[:_LOGGED_DEAD_PER_BATCH]:
            log.error("event dead-lettered", reason=d.reason, subject=d.subject[:200], stream_seq=d.stream_seq,
                      event_id=d.event_id, error=d.error[:500], size=len(d.raw))
        if len(dead) > _LOGGED_DEAD_PER_BATCH:  # a flood of junk gives one line per batch, not one per message
            rest = dead[_LOGGED_DEAD_PER_BATCH:]
            log.error("more events dead-lettered in this batch", count=len(rest),
                      reasons=dict(Counter(d.reason for d in rest)),
                      subjects=sorted({d.subject[:80] for d in rest})[:10])
        if batch.clamped:
            nodes = sorted({node for node, _, _ in batch.clamped})
            latest = max(sent for _, sent, _ in batch.clamped)
            log.warning("future node timestamps clamped to their arrival", events=len(batch.clamped),
                        node_ids=nodes[:20], latest_ts=latest.isoformat(), max_skew_s=self._max_skew.total_seconds())
        # Every message acked (or termed) after the commit, one ack per message, in one write.
        await settle(msgs, {i for i, seq in enumerate(batch.seqs) if seq in dead_seqs} if dead_seqs else ())
        self.folded += result.applied
        self.skipped += result.skipped
        self.dead += len(dead)
        self.clamped += len(batch.clamped)
        self.batches += 1
        return True

    async def run(self, stop: asyncio.Event) -> None:
        log.info("aggregator consuming", stream=EVT_STREAM, durable=AGGREGATOR_DURABLE, batch_size=self._batch_size,
                 max_fold=self._max_fold)

        async def handle(msgs: list[Msg]) -> bool:
            return await self.handle(msgs, stop, self.consumer.prefetched)

        # Fetching goes on while a batch is folded; the next fold takes everything fetched meanwhile.
        await self.consumer.run_pipelined(stop, handle, max_batch=self._max_fold)
