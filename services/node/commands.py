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
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.commands import Command, RunBroadcast, RunCancel
from contracts.subjects import CMD_STREAM, node_durable
from runtime.aio import pause

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Command)


class CommandConsumer:
    def __init__(self, js: JetStreamContext, node_id: str, *,
                 on_broadcast: Callable[[RunBroadcast], None],
                 on_cancel: Callable[[RunCancel], None]) -> None:
        self._js = js
        self._node_id = node_id
        self._on_broadcast = on_broadcast
        self._on_cancel = on_cancel

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

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._js.pull_subscribe_bind(durable=node_durable(self._node_id), stream=CMD_STREAM)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(16, timeout=1.0)
            except TimeoutError:
                continue
            except Exception as exc:
                log.warning("command fetch failed; retrying", error=repr(exc))
                await pause(stop, 1.0)
                continue
            for msg in msgs:
                try:
                    await self.handle(msg)
                except Exception:
                    log.exception("command not handled; JetStream will redeliver it", subject=msg.subject)
