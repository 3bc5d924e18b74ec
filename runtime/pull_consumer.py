"""One durable pull-consumer loop for every part that consumes JetStream (node commands, aggregator).

What it takes care of, so the parts only handle messages:

* **Re-binding after a reconnect.** A nats-py pull subscription can go silent
  after a server restart (the outstanding pull request is not re-sent), so
  after every reconnect of the connection the subscription is thrown away and
  bound again.
* **Backing off on errors.** A failed fetch or bind is logged and retried
  after `first_backoff_s`, doubling up to `max_backoff_s`; a good fetch resets
  it. `fetch()` returning nothing is the normal "empty" case.
* **A missing consumer (or stream).** Before binding, and whenever a fetch
  fails or the consumer has been idle for `check_every_s`, the consumer is
  looked up. When JetStream says it does not exist, the `ensure` callback
  recreates it, with a warning in the log. The callback is the caller's because
  who may create what differs: the aggregator creates its own consumer; a
  node may not create its own (the backend re-declares every node's consumer,
  see `services/backend/keeper.py`), so it passes no callback and the loop
  waits for the consumer to appear (said once in the log, then quiet). When
  the stream itself is missing the callback fails; the loop keeps retrying with
  backoff until whoever owns the stream has recreated it.

The consumer's messages are handed out in batches (`fetch`), or by `run`,
which can fetch the next batch while the caller handles the current one, or
by `run_pipelined`, which keeps fetching while the caller works and hands it
everything that arrived meanwhile (the aggregator: under load its batches
grow, so it commits less often per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionDrainingError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from runtime.aio import pause, wait_for_wake
from runtime.nats_queue import take_waiting

log = structlog.get_logger(__name__)

EnsureConsumer = Callable[[], Awaitable[None]]
BatchHandler = Callable[[list[Msg]], Awaitable[bool]]


class ConsumerMissing(RuntimeError):
    """The consumer does not exist and this part may not (or did not) declare it."""


class PullConsumer:
    def __init__(self, js: JetStreamContext, stream: str, durable: str, *, nc: NATS | None = None,
                 ensure: EnsureConsumer | None = None, batch: int = 100, fetch_timeout_s: float = 1.0,
                 first_backoff_s: float = 0.25, max_backoff_s: float = 10.0, check_every_s: float = 5.0,
                 info_timeout_s: float = 2.0, log_fields: dict[str, Any] | None = None,
                 quick_next: bool = False) -> None:
        self._js = js
        self._nc: NATS | None = nc if nc is not None else getattr(js, "_nc", None)
        self.stream = stream
        self.durable = durable
        self._ensure = ensure
        self._batch = batch
        self._fetch_timeout_s = fetch_timeout_s
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._check_every_s = check_every_s
        self._info_timeout_s = info_timeout_s
        self._quick_next = quick_next
        self._fields = {"stream": stream, "durable": durable, **(log_fields or {})}
        self._sub: JetStreamContext.PullSubscription | None = None
        self._seen_reconnects = self._reconnects()
        self._backoff = first_backoff_s
        self._next_check = 0.0
        self._ahead: asyncio.Task[list[Msg]] | None = None
        self._queued: list[Msg] = []  # `run_pipelined`: fetched, not yet handed out
        self._waiting = False  # the consumer is missing and someone else must declare it
        self.subscriptions = 0  # how many times the pull subscription was (re)bound
        self.recreated = 0  # how many times the consumer was found missing and `ensure` succeeded
        self.errors = 0  # failed fetches and binds

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"]) if self._nc is not None else 0

    async def _exists(self) -> bool | None:
        """Whether the consumer exists; None when JetStream cannot say right now."""
        try:
            await self._js.consumer_info(self.stream, self.durable, timeout=self._info_timeout_s)
        except NotFoundError:
            return False
        except Exception as exc:
            log.debug("consumer lookup failed", error=repr(exc), **self._fields)
            return None
        return True

    async def _heal(self) -> None:
        """Recreate the consumer through `ensure` if JetStream says it is missing."""
        self._next_check = time.monotonic() + self._check_every_s
        exists = await self._exists()
        if exists is not False:
            if exists and self._waiting:
                log.info("consumer declared; binding it", **self._fields)
                self._waiting = False
            return
        if self._ensure is None:
            if not self._waiting:
                log.info("consumer missing; waiting for it to be declared", **self._fields)
                self._waiting = True
            raise ConsumerMissing(f"consumer {self.durable} on {self.stream} is missing")
        log.warning("consumer missing; recreating it", **self._fields)
        await self._ensure()
        if await self._exists() is False:
            raise ConsumerMissing(f"consumer {self.durable} on {self.stream} is still missing")
        self.recreated += 1
        log.warning("consumer recreated", **self._fields)
        await self._drop()  # a subscription bound to the old consumer gets nothing from the new one

    async def close(self) -> None:
        """Unsubscribe (for callers that loop over `fetch` themselves instead of `run`)."""
        await self._drop()

    async def _drop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _failed(self, stop: asyncio.Event, what: str, exc: BaseException) -> None:
        self.errors += 1
        if stop.is_set():
            return
        if isinstance(exc, ConsumerMissing) or (isinstance(exc, ServiceUnavailableError) and self._waiting):
            pass  # already said once (`_heal`)
        elif isinstance(exc, ServiceUnavailableError):  # no responders: the consumer (or stream) is gone
            log.info(f"{what}: no consumer answered; looking it up", retry_in_s=self._backoff, **self._fields)
        else:
            log.warning(f"{what} failed; retrying", error=repr(exc), retry_in_s=self._backoff, **self._fields)
        await self._drop()
        await pause(stop, self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff_s)

    async def pending(self) -> int | None:
        """Messages not yet acked by anyone (waiting, or delivered and unacked); None when JetStream cannot say."""
        try:
            info = await self._js.consumer_info(self.stream, self.durable, timeout=self._info_timeout_s)
        except Exception as exc:
            log.debug("consumer lookup failed", error=repr(exc), **self._fields)
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def exists(self) -> bool | None:
        """Whether the consumer exists; None when JetStream cannot say right now."""
        return await self._exists()

    def reconnects(self) -> int:
        """How many times the connection under this consumer has reconnected."""
        return self._reconnects()

    async def fetch(self, stop: asyncio.Event) -> list[Msg]:
        """The next batch; empty when there is none yet, or after an error (logged, backed off)."""
        if self._sub is not None and self._reconnects() != self._seen_reconnects:
            log.info("NATS reconnected: binding the subscription again", **self._fields)
            await self._drop()
        if self._sub is None:
            self._seen_reconnects = self._reconnects()
            try:
                await self._heal()
                self._sub = await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
                if self._quick_next:
                    quick_next_msg(self._sub)
            except Exception as exc:
                await self._failed(stop, "binding the consumer", exc)
                return []
            self.subscriptions += 1
        try:
            msgs = await self._sub.fetch(self._batch, timeout=self._fetch_timeout_s)
        except TimeoutError:  # nothing to do: the normal empty case
            self._backoff = self._first_backoff_s
            if time.monotonic() >= self._next_check:
                try:
                    await self._heal()
                except Exception as exc:
                    await self._failed(stop, "recreating the consumer", exc)
            return []
        except Exception as exc:  # NATS down or reconnecting, consumer or stream gone: bind again
            await self._failed(stop, "fetch", exc)
            return []
        self._backoff = self._first_backoff_s
        return msgs

    def prefetched(self) -> list[Msg]:
        """Messages already fetched for the next batch while `run`'s (or `run_pipelined`'s) handler works."""
        if self._queued:
            return list(self._queued)
        ahead = self._ahead
        if ahead is not None and ahead.done() and not ahead.cancelled() and ahead.exception() is None:
            return ahead.result()
        return []

    async def run(self, stop: asyncio.Event, handle: BatchHandler, *, prefetch: bool = False) -> None:
        """Hand every fetched batch to `handle` until `stop` is set or `handle` returns False.

        With `prefetch` the next batch is fetched while `handle` works on the
        current one. Messages fetched but not handled are given back (`nak`) on
        the way out, so another instance gets them at once instead of after AckWait.
        """
        try:
            while not stop.is_set():
                if self._ahead is None:
                    msgs = await self.fetch(stop)
                else:
                    msgs = await self._ahead
                    self._ahead = None
                if stop.is_set():
                    await release(msgs)
                    break
                if prefetch:
                    self._ahead = asyncio.create_task(self.fetch(stop))
                if msgs and not await handle(msgs):
                    await release(msgs)
                    break
        finally:
            ahead, self._ahead = self._ahead, None
            if ahead is not None:
                if not ahead.done():
                    ahead.cancel()
                with contextlib.suppress(BaseException):
                    await release(await ahead)
            await self._drop()


    async def run_pipelined(self, stop: asyncio.Event, handle: BatchHandler, *, max_batch: int,
                            ahead: int = 4) -> None:
        """Like `run`, but fetching never waits for `handle`, and `handle` gets everything fetched meanwhile.

        A fetcher task keeps up to `ahead` fetches' worth of messages waiting;
        each call of `handle` takes all that is waiting, up to `max_batch`
        messages. When the consumer is idle a fetch is handled as soon as it
        arrives; when `handle` is the slower side its batches grow, which is
        what makes a per-batch cost (a commit, round trips) cheaper per message.
        Messages fetched but not handled are given back (`nak`) on the way out.
        """
        waiting = self._queued
        arrived = asyncio.Event()
        room = asyncio.Event()
        room.set()
        limit = max(1, ahead) * self._batch

        async def fetcher() -> None:
            while not stop.is_set():
                if len(waiting) >= limit:
                    room.clear()
                    await wait_for_wake(room, stop, 1.0)
                    continue
                msgs = await self.fetch(stop)
                if msgs:
                    waiting.extend(msgs)
                    arrived.set()

        fetching = asyncio.create_task(fetcher())
        try:
            while not stop.is_set():
                if not waiting:
                    if fetching.done():
                        fetching.result()  # raise what stopped it (it only ends on `stop` otherwise)
                        break
                    arrived.clear()
                    await _first_of(arrived.wait(), stop.wait(), fetching)
                    continue
                msgs = waiting[:max_batch]
                del waiting[:max_batch]
                room.set()
                if not await handle(msgs):
                    await release(msgs)
                    break
        finally:
            fetching.cancel()
            with contextlib.suppress(BaseException):
                await fetching
            rest = list(waiting)
            waiting.clear()
            await release(rest)
            await self._drop()


async def _first_of(*waits: Awaitable[Any]) -> None:
    """Wait until the first of `waits` is done; cancel the others it created (a task passed in is left running)."""
    own = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(own, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut, w in zip(own, waits, strict=True):
            if fut is not w:
                fut.cancel()


def quick_next_msg(psub: JetStreamContext.PullSubscription) -> bool:
    """Let `psub.fetch` take messages already waiting in the subscription's queue without ceremony.

    nats-py's `fetch` asks the server for a batch, then awaits the batch's
    messages one by one through `Subscription.next_msg`, which for *every*
    message creates a task, a `wait_for` timer and a uuid4 name, even when the
    message is already queued (a fetch's messages usually arrive together).
    That is about a tenth of the aggregator's CPU. This replaces `next_msg` on
    this one subscription by a version that takes a queued message directly
    (`runtime.nats_queue.take_waiting`: the same bookkeeping) and falls back to the
    original when the queue is empty. The fetch protocol itself (pull
    requests, status messages, timeouts) stays nats-py's. Returns False, and
    changes nothing, when the subscription does not look like the nats-py
    this was written against.
    """
    sub = getattr(psub, "_sub", None)
    queue = getattr(sub, "_pending_queue", None)
    conn = getattr(sub, "_conn", None)
    if sub is None or not isinstance(queue, asyncio.Queue) or conn is None or not hasattr(sub, "_pending_size"):
        return False
    slow: Callable[[float | None], Awaitable[Msg]] = sub.next_msg

    async def next_msg(timeout: float | None = 1.0) -> Msg:  # noqa: ASYNC109 - nats-py's signature
        if not conn.is_closed and (msg := take_waiting(sub)) is not None:
            return msg
        return await slow(timeout)

    sub.next_msg = next_msg
    return True


_ACK_BODY = b" 0\r\n\r\n"  # `PUB <reply> 0`, empty payload: what `Msg.ack` sends
_TERM_BODY = b" 5\r\n+TERM\r\n"  # `PUB <reply> 5`, `+TERM`: what `Msg.term` sends


async def settle(msgs: Sequence[Msg], term: Container[int] = ()) -> None:
    """`ack` every message of `msgs`, except those whose index is in `term` (`term` them), in one write.

    The same protocol lines as `Msg.ack()` / `Msg.term()` one by one (`PUB <reply> 0` with an empty
    payload, `PUB <reply> 5` with `+TERM`), in the same order, but handed to the client's write buffer
    as one command: for a fold of thousands of messages, nats-py's per-publish work (subject checks,
    a command built and queued per message, a flusher writing thousands of small buffers) was about
    a tenth of the aggregator's CPU. Acks stay one per message (the consumer's `AckPolicy.EXPLICIT`):
    nothing is acknowledged that this call was not given. Each message is marked acknowledged as
    `Msg.ack` does (acking it again raises). Anything unusual (messages of several connections, one
    without a reply subject or already acknowledged, a client that does not look like the nats-py
    this was written against) goes through `Msg.ack` / `Msg.term` one by one, with their errors; a
    closed or draining connection raises as `Msg.ack` would, before anything is queued.
    """
    if not msgs:
        return
    client: Any = getattr(msgs[0], "_client", None)
    send = getattr(client, "_send_command", None)
    stats = getattr(client, "stats", None)
    if send is None or not isinstance(stats, dict) or not hasattr(client, "_flush_pending") or any(
            m._client is not client or not m.reply or " " in m.reply or getattr(m, "_ackd", True) for m in msgs):
        for i, m in enumerate(msgs):  # anything unusual: nats-py's own way, and its errors
            await (m.term() if i in term else m.ack())
        return
    if client.is_closed:
        raise ConnectionClosedError
    if client.is_draining_pubs:
        raise ConnectionDrainingError
    lines: list[bytes] = []
    terms = 0
    for i, m in enumerate(msgs):
        if i in term:
            lines.append(b"PUB " + m.reply.encode() + _TERM_BODY)
            terms += 1
        else:
            lines.append(b"PUB " + m.reply.encode() + _ACK_BODY)
    stats["out_msgs"] += len(msgs)
    stats["out_bytes"] += 5 * terms
    await send(b"".join(lines))
    for m in msgs:
        m._ackd = True
    flush_queue = getattr(client, "_flush_queue", None)
    if flush_queue is not None and flush_queue.empty():  # wake the flusher, as `publish` does
        await client._flush_pending()


def delivery(msg: Msg) -> tuple[int, int]:
    """A JetStream message's stream sequence and its time of arrival in the stream (ns since the epoch).

    Read straight from the reply subject (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.
    <ns>.<pending>`, or the form with domain and account hash): the same values as `msg.metadata`, for a
    fraction of its cost, which counts on the aggregator's hot path. Anything else goes through
    `msg.metadata` (which raises `NotJSMessageError` for a message that did not come from JetStream).
    """
    reply = msg.reply
    tokens: list[str] = reply.split(".") if reply else []
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[7])
    if len(tokens) >= 11 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[7]), int(tokens[9])
    meta = msg.metadata
    return meta.sequence.stream, int(meta.timestamp.timestamp() * 1_000_000_000)


async def release(msgs: list[Msg]) -> None:
    """Give unhandled messages back at once (instead of after AckWait)."""
    for m in msgs:
        with contextlib.suppress(Exception):
            await m.nak()
