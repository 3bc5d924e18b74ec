"""The node's durable pull consumer on `doai.cmd.<node_id>`.

Every message is checked before anything else happens, in this order, and a
message failing a check is logged once with the reason and terminated (it
would fail the same way every time; JetStream does not redeliver it):

1. its `Doai-Sig` header must verify, with the backend's command public key,
   over the subject and the exact payload bytes (`runtime.signing`): unsigned,
   wrongly signed, altered or re-addressed commands stop here, undecoded;
2. it must decode as a `RunBroadcast` or `RunCancel` addressed to this node;
3. it must pass `admission` (UUID run id, recipe re-validated, params,
   timeouts, device list).

Only then is a `RunBroadcast` written to the journal; it is acked after every
device job of it is there.

Cancel before restart: when the node starts, and again after every reconnect
to NATS, the consumer first *catches up*: it handles every command already
waiting for this node (JetStream's `num_pending` and `num_ack_pending` of the
consumer reach 0) before the agent starts any job (`behind` is true until
then, and `NodeAgent.dispatch` waits while it is). So a `RunCancel` that
arrived while the node was down or cut off always wins over the jobs of its
run, recovered or new. If the backlog cannot be read within `catch_up_s`
(NATS or the consumer unreachable), the node logs a warning and goes on; the
commands are then handled as they arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.commands import Command, RunBroadcast, RunCancel
from contracts.subjects import CMD_STREAM, cmd_subject, node_durable
from runtime.pull_consumer import EnsureConsumer, PullConsumer, release
from runtime.signing import BadSignature, Verifier
from services.node.admission import Refused, check_broadcast, check_cancel, shown

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Command)


class CommandConsumer:
    def __init__(self, js: JetStreamContext, node_id: str, *, verifier: Verifier,
                 on_broadcast: Callable[[RunBroadcast], None],
                 on_cancel: Callable[[RunCancel], None],
                 nc: NATS | None = None, fetch_timeout_s: float = 1.0,
                 ensure_consumer: EnsureConsumer | None = None,
                 on_caught_up: Callable[[], None] | None = None, catch_up_s: float = 30.0) -> None:
        self._js = js
        self._node_id = node_id
        self._verifier = verifier
        self._subject = cmd_subject(node_id)
        self._on_broadcast = on_broadcast
        self._on_cancel = on_cancel
        self.refused: Counter[str] = Counter()  # commands terminated, by reason code
        self._on_caught_up = on_caught_up
        self.catch_up_s = catch_up_s
        self.caught_up_at: int | None = None  # the connection's reconnect count when the backlog was last read
        # The backend declares node consumers (services/backend/keeper.py); a node that may not
        # passes no `ensure_consumer` and waits for it.
        self.consumer = PullConsumer(js, CMD_STREAM, node_durable(node_id), nc=nc, ensure=ensure_consumer,
                                     batch=16, fetch_timeout_s=fetch_timeout_s, first_backoff_s=0.5,
                                     max_backoff_s=5.0, log_fields={"node_id": node_id})

    @property
    def subscriptions(self) -> int:
        """How many times the pull subscription was (re)bound."""
        return self.consumer.subscriptions

    async def _refuse(self, msg: Msg, code: str, event: str, **fields: object) -> None:
        self.refused[code] += 1
        log.error(event, node_id=self._node_id, subject=msg.subject[:200], reason=code, **fields)
        await msg.term()

    async def handle(self, msg: Msg) -> None:
        try:
            self._verifier.verify_command(msg.subject, msg.data, msg.headers)
        except BadSignature as exc:
            await self._refuse(msg, exc.code, "command refused: signature", error=str(exc), bytes=len(msg.data))
            return
        if msg.subject != self._subject:  # signed, but for another node's subject
            await self._refuse(msg, "wrong_subject", "command refused: subject", expected=self._subject)
            return
        try:
            command = _decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            await self._refuse(msg, "malformed", "malformed command dropped", error=str(err),
                               preview=msg.data[:200].decode(errors="replace"))
            return
        if command.node_id != self._node_id:
            await self._refuse(msg, "wrong_node", "command for another node dropped",
                               addressed_to=shown(command.node_id))
            return
        try:
            if isinstance(command, RunBroadcast):
                check_broadcast(command, self._node_id)
            else:
                check_cancel(command, self._node_id)
        except Refused as exc:
            run = {"run_id": command.run_id} if exc.code != "bad_run_id" else {"run_id_given": shown(command.run_id)}
            await self._refuse(msg, exc.code, "command refused: invalid", command=type(command).__name__,
                               error=str(exc), **run)
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

    @property
    def behind(self) -> bool:
        """True until the commands waiting since the start, or since the last reconnect, have been handled."""
        return self.caught_up_at is None or self.caught_up_at != self.consumer.reconnects()

    async def catch_up(self, stop: asyncio.Event) -> bool:
        """Handle every command already waiting for this node; False if that took longer than `catch_up_s`."""
        reconnects = self.consumer.reconnects()
        deadline = time.monotonic() + self.catch_up_s
        handled = 0
        caught_up = False
        while not stop.is_set():
            msgs = await self.consumer.fetch(stop)
            if msgs:
                handled += len(msgs)
                await self._handle_batch(msgs)
                continue
            pending = await self.consumer.pending()
            if pending == 0:
                caught_up = True
                log.info("commands caught up", node_id=self._node_id, handled=handled)
                break
            if pending is None and await self.consumer.exists() is False:
                # Not declared yet (a new node): nothing waits for it; the backend declares it and the loop binds.
                caught_up = True
                log.info("commands caught up: consumer not declared yet", node_id=self._node_id)
                break
            if time.monotonic() >= deadline:
                log.warning("commands not caught up in time; going on", node_id=self._node_id, handled=handled,
                            catch_up_s=self.catch_up_s)
                break
        self.caught_up_at = reconnects
        if self._on_caught_up is not None and not stop.is_set():
            self._on_caught_up()
        return caught_up

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch commands until `stop`, through the shared consumer (`runtime.pull_consumer`).

        It binds again after every reconnect (a pull subscription can go silent
        after a server restart), backs off on errors, and when the consumer is
        missing calls `ensure_consumer`, or without one waits until the backend has declared it.
        After a reconnect it catches up (see the module docstring) before the agent starts jobs again.
        """
        try:
            while not stop.is_set():
                if self.behind:
                    await self.catch_up(stop)
                    continue
                msgs = await self.consumer.fetch(stop)
                if stop.is_set():
                    await release(msgs)
                    break
                if msgs:
                    await self._handle_batch(msgs)
        finally:
            # On the way out (stopped or cancelled) unsubscribe, so messages handed to the inbox
            # do not wait out the AckWait before anyone else can take them.
            await self.consumer.close()
