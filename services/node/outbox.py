"""Publish the journal's outbox to JetStream; a row leaves only after JetStream acked it.

Each message carries `Nats-Msg-Id` = the event's `event_id`, so a row
published again after a crash (acked but not yet deleted) is stored once.
Publishes are pipelined in windows (`publish_async`, acks awaited together
with a timeout); a failure keeps the rows and retries with backoff, across
NATS outages and agent restarts. Rows are read in journal order, so a retry
re-sends the oldest first. Only committed rows are read (the journal's group
commit wakes the outbox); the deletes of acked rows go into the journal's next
commit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from nats.js import JetStreamContext

from runtime.aio import drain_forever
from services.node.journal import Journal

log = structlog.get_logger(__name__)


class Outbox:
    def __init__(self, journal: Journal, js: JetStreamContext, *, window: int = 256,
                 publish_timeout_s: float = 5.0, linger_s: float = 0.005) -> None:
        self._journal = journal
        self._js = js
        self._window = window
        self._timeout = publish_timeout_s
        self._linger_s = linger_s
        self._behind = False  # the last window was full: more is waiting, no linger
        self._wake = asyncio.Event()
        self.published = 0
        journal.on_commit = self.wake  # only committed rows are published: each commit wakes the outbox

    def wake(self) -> None:
        self._wake.set()

    async def publish_once(self) -> int:
        """Publish one window of rows; return how many were acked (and removed).

        The window is pipelined with `publish_async`: every message goes out at
        once and the acks are awaited together, at most `publish_timeout_s`; a
        message without an ack by then stays in the outbox (its future is
        cancelled) and is published again with the same `Nats-Msg-Id`.
        """
        rows = self._journal.outbox_batch(self._window)
        if not rows:
            return 0
        futures: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        for r in rows:
            try:
                futures.append(await self._js.publish_async(r.subject, r.payload,
                                                            headers={"Nats-Msg-Id": r.event_id}))
            except Exception as exc:  # disconnected with a full buffer, stalled, closed: retry later
                error = exc
                self._release_orphans(futures)
                break
        if futures:
            await self._settle(futures)
        acked = []
        for r, f in zip(rows, futures, strict=False):
            if not f.cancelled() and f.exception() is None:
                acked.append(r.id)
            elif error is None:
                error = TimeoutError("no ack") if f.cancelled() else f.exception()
        if len(acked) == len(rows):
            self._journal.outbox_delete_through(rows[0].id, rows[-1].id)
        else:
            self._journal.outbox_delete(acked)
        self.published += len(acked)
        failed = len(rows) - len(acked)
        if failed:
            raise RuntimeError(f"{failed} of {len(rows)} events not acked: {error!r}")
        return len(acked)

    async def _settle(self, futures: list[asyncio.Future[Any]]) -> None:
        """Wait until every ack future is done, at most `publish_timeout_s`; cancel those still pending.

        JetStream acks one connection's publishes in order, so the last future is usually the last to
        finish: waiting on it alone spares a done-callback per message (then the rest are checked).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        pending = futures[-1:]
        while pending:
            _, still = await asyncio.wait(pending, timeout=max(0.0, deadline - loop.time()))
            if still:
                break
            pending = [f for f in futures if not f.done()]
        for f in futures:
            if not f.done():
                f.cancel()

    def _release_orphans(self, ours: list[asyncio.Future[Any]]) -> None:
        """Cancel the ack future nats-py registered for a publish that then raised.

        nats-py 2.16's `publish_async` takes a permit (4,000 in all) and registers a
        future before it writes; when the write raises (e.g. the reconnect buffer is
        full during an outage) that future is never returned nor completed, so its
        permit would be lost for good and publishing would hang once all are gone.
        Cancelling it runs nats-py's own done-callback, which gives the permit back.
        Only this outbox publishes asynchronously on this context.
        """
        registered: dict[str, asyncio.Future[Any]] = getattr(self._js, "_publish_async_futures", {})
        mine = {id(f) for f in ours}
        for future in list(registered.values()):
            if id(future) not in mine and not future.done():
                future.cancel()

    async def _publish_lingering(self) -> int:
        """`publish_once`, but after a window that was not full first wait `linger_s` (5 ms), so that the
        events of the next few loop turns go out together: fewer writes, ack rounds and journal reads."""
        if self._linger_s and not self._behind:
            await asyncio.sleep(self._linger_s)
        self._behind = False
        done = await self.publish_once()
        self._behind = done >= self._window
        return done

    async def run(self, stop: asyncio.Event, max_backoff_s: float = 5.0) -> None:
        # A short backoff cap: after a NATS outage the outbox empties within seconds of the reconnect.
        # A window that was not full took every committed row: the next commit wakes the loop again.
        await drain_forever(self._publish_lingering, self._wake, stop, poll_s=1.0, what="event publish",
                            max_backoff_s=max_backoff_s, batch=self._window)

    async def drain(self, timeout_s: float) -> bool:
        """Try to publish everything left (at shutdown); return whether the outbox is empty."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                if not await self.publish_once():
                    return True
            except Exception:
                await asyncio.sleep(0.2)
        return self._journal.outbox_size() == 0
