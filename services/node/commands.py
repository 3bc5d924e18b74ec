"""The node's durable pull consumer on `doai.cmd.<node_id>`.

A `RunBroadcast` is acked only after every device job of it is in the
journal. A message that is not a valid command for this node is logged with
a clear reason and terminated (it would fail the same way every time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.commands import Command, RunBroadcast, RunCancel
from contracts.subjects import CMD_STREAM, node_durable
from runtime.pull_consumer import EnsureConsumer, PullConsumer

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Command)


class CommandConsumer:
    def __init__(self, js: JetStreamContext, node_id: str, *,
                 on_broadcast: Callable[[RunBroadcast], None],
                 on_cancel: Callable[[RunCancel], None],
                 nc: NATS | None = None, fetch_timeout_s: float = 1.0,
                 ensure_consumer: EnsureConsumer | None = None) -> None:
        self._js = js
        self._node_id = node_id
        self._on_broadcast = on_broadcast
        self._on_cancel = on_cancel
        # The backend declares node consumers (services/backend/keeper.py); a node that may not
        # passes no `ensure_consumer` and waits for it.
        self.consumer = PullConsumer(js, CMD_STREAM, node_durable(node_id), nc=nc, ensure=ensure_consumer,
                                     batch=16, fetch_timeout_s=fetch_timeout_s, first_backoff_s=0.5,
                                     max_backoff_s=5.0, log_fields={"node_id": node_id})

    @property
    def subscriptions(self) -> int:
        """How many times the pull subscription was (re)bound."""
        return self.consumer.subscriptions

    async def handle(self, msg: Msg) -> None:
        try:
            command = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            log.error("malformed command dropped", subject=msg.subject, error=str(err),
                      preview=msg.data[:200].decode(errors="replace"))
            await msg.term()
            return
        if command.node_id != self._node_id:
            log.error("command for another node dropped", subject=msg.subject, addressed_to=command.node_id)
            await msg.term()
            return
        if isinstance(command, RunBroadcast):
            self._on_broadcast(command)  # writes the journal; raises if it cannot
        else:
            self._on_cancel(command)
        await msg.ack_sync()

    async def _handle_batch(self, msgs: list[Msg]) -> bool:
        for msg in msgs:
            try:
                await self.handle(msg)
            except Exception:
                log.exception("command not handled; JetStream will redeliver it", subject=msg.subject)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch commands until `stop`, through the shared loop (`runtime.pull_consumer`).

        It binds again after every reconnect (a pull subscription can go silent
        after a server restart), backs off on errors, and when the consumer is
        missing calls `ensure_consumer`, or without one waits until the backend has declared it.
        """
        # On the way out (stopped or cancelled) the loop unsubscribes, so messages handed to its inbox
        # do not wait out the AckWait before anyone else can take them.
        await self.consumer.run(stop, self._handle_batch)
