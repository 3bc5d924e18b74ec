"""The node's durable pull consumer on `doai.cmd.<node_id>`.

A `RunBroadcast` is acked only after every device job of it is in the
journal. A message that is not a valid command for this node is logged with
a clear reason and terminated (it would fail the same way every time).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import ServiceUnavailableError

from contracts.commands import Command, RunBroadcast, RunCancel
from contracts.subjects import CMD_STREAM, node_durable
from runtime.aio import pause

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Command)


class CommandConsumer:
    def __init__(self, js: JetStreamContext, node_id: str, *,
                 on_broadcast: Callable[[RunBroadcast], None],
                 on_cancel: Callable[[RunCancel], None],
                 nc: NATS | None = None, fetch_timeout_s: float = 1.0) -> None:
        self._js = js
        self._node_id = node_id
        self._on_broadcast = on_broadcast
        self._on_cancel = on_cancel
        self._nc = nc
        self._fetch_timeout_s = fetch_timeout_s
        self.subscriptions = 0  # how many times the pull subscription was (re)created

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

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"]) if self._nc is not None else 0

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """Bind a fresh pull subscription to this node's durable consumer (the backend declares it)."""
        sub = await self._js.pull_subscribe_bind(durable=node_durable(self._node_id), stream=CMD_STREAM)
        self.subscriptions += 1
        return sub

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch commands until `stop`.

        A pull subscription can go silent after a server restart, so after
        every reconnect (and after any fetch error) the subscription is thrown
        away and bound again; every loop issues a new fetch (pull request).
        """
        sub: JetStreamContext.PullSubscription | None = None
        seen_reconnects = self._reconnects()
        waiting = False
        try:
            while not stop.is_set():
                if sub is None or self._reconnects() != seen_reconnects:
                    if sub is not None:
                        log.info("NATS reconnected: binding the command subscription again", node_id=self._node_id)
                        with contextlib.suppress(Exception):
                            await sub.unsubscribe()
                        sub = None
                    seen_reconnects = self._reconnects()
                    try:
                        sub = await self._subscribe()
                    except Exception as exc:
                        log.warning("command subscription failed; retrying", error=repr(exc))
                        await pause(stop, 1.0)
                        continue
                try:
                    msgs = await sub.fetch(16, timeout=self._fetch_timeout_s)
                except TimeoutError:
                    continue
                except ServiceUnavailableError:
                    # No consumer to answer: the backend has not declared this node's consumer yet
                    # (a pre-provisioned node before its first command), or it was deleted. Said once.
                    if not waiting:
                        log.info("waiting for the backend to declare this node's command consumer",
                                 node_id=self._node_id, consumer=node_durable(self._node_id))
                        waiting = True
                    await pause(stop, 1.0)
                    continue
                except Exception as exc:
                    log.warning("command fetch failed; subscribing again", error=repr(exc))
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = None
                    await pause(stop, 1.0)
                    continue
                waiting = False
                for msg in msgs:
                    try:
                        await self.handle(msg)
                    except Exception:
                        log.exception("command not handled; JetStream will redeliver it", subject=msg.subject)
        finally:
            # A killed or stopped loop must not leave its pull subscription behind: messages handed to
            # its inbox would wait out the AckWait before anyone else could take them.
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
