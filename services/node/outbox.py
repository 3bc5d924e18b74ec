"""Publish the journal's outbox to JetStream; a row leaves only after JetStream acked it.

Each message carries `Nats-Msg-Id` = the event's `event_id`, so a row
published again after a crash (acked but not yet deleted) is stored once.
Publishes are pipelined in windows (every message of a window goes out at
once, each with its own reply subject, and the acks are awaited together with a
timeout); a failure keeps the rows and retries with backoff, across
NATS outages and agent restarts. Rows are read in journal order, so a retry
re-sends the oldest first. Only committed rows are read (the journal's group
commit wakes the outbox); the deletes of acked rows go into the journal's next
commit.
"""

from __future__ import annotations

import asyncio
import secrets

import msgspec
import structlog
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from runtime.aio import drain_forever
from runtime.nats_queue import take_next
from services.node.journal import Journal, OutboxRow

log = structlog.get_logger(__name__)


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: `{"stream": ..., "seq": ...}` when stored, `{"error": {...}}` if not."""

    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode


class _Where(msgspec.Struct):
    """What an event is about, for the log line of a refused row (task, step and artifact events carry both)."""

    run_id: str | None = None
    device_serial: str | None = None


_decode_where = msgspec.json.Decoder(_Where).decode

#: JetStream's error code for a message over the stream's max_msg_size: that message is never stored.
MESSAGE_TOO_LARGE = 10054
#: The header block around the `Nats-Msg-Id` value ("NATS/1.0\r\nNats-Msg-Id: …\r\n\r\n" is 27 bytes), rounded up.
HEADER_OVERHEAD = 64


class Outbox:
    def __init__(self, journal: Journal, js: JetStreamContext, *, window: int = 256,
                 publish_timeout_s: float = 5.0, linger_s: float = 0.005) -> None:
        self._journal = journal
        self._nc = js._nc  # publishes with our own reply subjects (see `_publish_window`)
        self._window = window
        self._timeout = publish_timeout_s
        self._linger_s = linger_s
        self._behind = False  # the last window was full: more is waiting, no linger
        self._wake = asyncio.Event()
        self.published = 0
        self.refused = 0  # rows NATS refused for good, moved to the journal's `outbox_refused`
        self._acks: Subscription | None = None
        self._inbox = ""
        journal.on_commit = self.wake  # only committed rows are published: each commit wakes the outbox

    def wake(self) -> None:
        self._wake.set()

    async def _ack_inbox(self) -> Subscription:
        """This outbox's ack subscription (`<inbox prefix>.<nuid>.>`), made on first use.

        Inside the connection's own inbox prefix, so a node's NATS user (which may subscribe to nothing
        else) receives its acks; nats-py resubscribes it after a reconnect.
        """
        if self._acks is None:
            self._inbox = self._nc.new_inbox()
            self._acks = await self._nc.subscribe(f"{self._inbox}.>")
        return self._acks

    async def publish_once(self) -> int:
        """Publish one window of rows; return how many were acked (and removed). See `_publish_window`."""
        acked, _ = await self._publish_window()
        return acked

    async def _publish_window(self) -> tuple[int, int]:
        """Publish one window of rows; return how many were acked and how many set aside (both left the outbox).

        The window is pipelined: every message goes out at once, each with its own reply subject
        (`<inbox>.<window token>.<row index>`), and the acks are awaited together, at most `publish_timeout_s`.
        The window token is random: the tap sees every reply subject on `doai.evt.>`, and with a predictable
        one, another node could queue JetStream's own answer to its publish (an oversized message: error
        10054) on this node's ack subject of the next window before that window is sent.
        A row leaves only on an ack that names the stream and sequence that stored it; an error ack
        (a full stream, no stream for the subject), no ack in time, or an ack of an earlier window
        keeps it, and it is published again with the same `Nats-Msg-Id`. A row NATS will never take
        (over the server's max_payload or the stream's max_msg_size) is moved to the journal's
        `outbox_refused` and logged, so that it does not hold up every row behind it.

        This is what nats-py's `publish_async` does, without its per-message future, done-callback,
        permit and random token, and with the acks decoded by msgspec rather than `json` into a
        dataclass: that machinery was half of the node's NATS cost per event.
        """
        rows = self._journal.outbox_batch(self._window)
        if not rows:
            return 0, 0
        acks = await self._ack_inbox()
        token = secrets.token_hex(8)
        reply = f"{self._inbox}.{token}."
        publish = self._nc.publish
        error: BaseException | None = None
        refused: dict[int, str] = {}  # row index -> why NATS will never take it
        sent = 0
        answered = [True] * len(rows)  # True: no answer to wait for (a row not sent in this window)
        max_payload = self._nc.max_payload
        for i, r in enumerate(rows):
            # The server counts the headers too, and closes the connection on a message over its limit
            # (nats-py checks the payload alone): such a row is refused here, before it is sent.
            if len(r.payload) + len(r.event_id) + HEADER_OVERHEAD > max_payload:
                refused[i] = f"{len(r.payload)} bytes: over the server's max_payload ({max_payload})"
                continue
            try:
                await publish(r.subject, r.payload, reply=reply + str(i), headers={"Nats-Msg-Id": r.event_id})
            except Exception as exc:  # disconnected with a full buffer, closed: retry later
                error = exc
                break
            sent += 1
            answered[i] = False
        acked = [False] * len(rows)
        if sent:
            problem = await self._collect(acks, token, acked, answered, refused, sent)
            if error is None:
                error = problem
        done = [r.id for r, ok in zip(rows, acked, strict=True) if ok]
        if refused:
            self._refuse(rows, refused)
        if len(done) == len(rows):
            self._journal.outbox_delete_through(rows[0].id, rows[-1].id)
        else:
            self._journal.outbox_delete(done)
        self.published += len(done)
        failed = len(rows) - len(done) - len(refused)
        if failed:
            raise RuntimeError(f"{failed} of {len(rows)} events not acked: {error!r}")
        return len(done), len(refused)

    def _refuse(self, rows: list[OutboxRow], refused: dict[int, str]) -> None:
        """Move the rows NATS will never take out of the outbox (into the journal's `outbox_refused`)."""
        self._journal.outbox_refuse({rows[i].id: reason for i, reason in refused.items()})
        self.refused += len(refused)
        for i, reason in refused.items():
            row = rows[i]
            tokens = row.subject.split(".")  # doai.evt.<node_id>.<kind>[.<run_id>]
            try:
                where = _decode_where(row.payload)
            except msgspec.DecodeError:
                where = _Where()
            log.error("event refused by NATS for good: kept in the journal's outbox_refused, not sent",
                      node_id=tokens[2] if len(tokens) > 2 else None,
                      run_id=where.run_id or (tokens[4] if len(tokens) > 4 else None),
                      device_serial=where.device_serial,
                      subject=row.subject, event_id=row.event_id, size=len(row.payload), reason=reason)

    async def _collect(self, acks: Subscription, token: str, acked: list[bool], answered: list[bool],
                       refused: dict[int, str], sent: int) -> BaseException | None:
        """Read acks of window `token` until all `sent` answered or `publish_timeout_s` passed; mark the
        stored rows in `acked` and those the stream refuses for good (over its max_msg_size) in `refused`.
        `answered` is True for the rows not sent (set aside before, or after a failed publish): an answer on
        their subject can only be forged, and is ignored; the first answer of a sent row counts.
        Returns the first problem seen (an error ack, or no ack in time)."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        problem: BaseException | None = None
        missing = sent
        while missing:
            try:  # off the queue itself (usually already there: one read brings many acks), not `next_msg`
                msg = await take_next(acks, deadline)
            except TimeoutError:
                return problem or TimeoutError(f"{missing} acks missing after {self._timeout:g} s")
            window, _, index = msg.subject[len(self._inbox) + 1:].partition(".")
            if window != token or not index.isdigit() or int(index) >= len(acked):
                continue  # a late ack of an earlier window: that row was kept and is in this window again
            i = int(index)
            if answered[i]:
                continue
            answered[i] = True
            missing -= 1
            try:
                ack = _decode_ack(msg.data)
            except msgspec.DecodeError:
                status = (msg.headers or {}).get("Status", "")
                problem = problem or RuntimeError(f"no JetStream ack (status {status or 'none'}): {msg.data[:200]!r}")
                continue
            if ack.error is not None:
                if ack.error.get("err_code") == MESSAGE_TOO_LARGE:
                    refused[i] = f"the stream refused it: {ack.error.get('description', 'too large')}"
                else:
                    problem = problem or RuntimeError(f"JetStream refused the event: {ack.error}")
            elif ack.stream is None or ack.seq is None:
                problem = problem or RuntimeError(f"JetStream refused the event: {msg.data[:200]!r}")
            else:
                acked[i] = True
        return problem

    async def _publish_lingering(self) -> int:
        """`publish_once`, but after a window that was not full first wait `linger_s` (5 ms), so that the
        events of the next few loop turns go out together: fewer writes, ack rounds and journal reads."""
        if self._linger_s and not self._behind:
            await asyncio.sleep(self._linger_s)
        self._behind = False
        acked, set_aside = await self._publish_window()
        done = acked + set_aside  # rows set aside left the outbox too: a full window means more may wait
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
                if await self._publish_window() == (0, 0):  # empty (a window all set aside was not)
                    return True
            except Exception:
                await asyncio.sleep(0.2)
        return self._journal.outbox_size() == 0
