"""Messages taken straight off a nats-py subscription's queue, with the bookkeeping `next_msg` does.

nats-py's `Subscription.next_msg` makes a task, a `wait_for` timer and a uuid4 name on every call, even
for a message that is already queued; on the hot paths (the aggregator's fetches, the node outbox's
acks) that was a tenth of the CPU. These take the message off `_pending_queue` themselves and keep the
subscription's pending size and the queue's `task_done` count as `next_msg` would. They touch nats-py's
private attributes: this module is the one place that does, so a nats-py upgrade is checked here.
"""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription


def _taken(sub: Subscription, msg: Msg) -> Msg:
    """Account for `msg`, just taken off `sub`'s queue, as `next_msg` does."""
    sub._pending_size -= len(msg.data)
    sub._pending_queue.task_done()
    return msg


def take_waiting(sub: Subscription) -> Msg | None:
    """The message waiting first in `sub`'s queue, or None when none is."""
    queue = sub._pending_queue
    if queue.empty():
        return None
    return _taken(sub, queue.get_nowait())


async def take_next(sub: Subscription, deadline: float) -> Msg:
    """`sub`'s next message, waited for until the loop time `deadline` (then TimeoutError)."""
    msg = take_waiting(sub)
    if msg is not None:
        return msg
    async with asyncio.timeout_at(deadline):
        msg = await sub._pending_queue.get()
    return _taken(sub, msg)
