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
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.commands import Command, RunBroadcast, RunCancel
from contracts.subjects import CMD_STREAM, cmd_subject, node_durable
from runtime import jetstream
from runtime.aio import pause
from runtime.signing import BadSignature, Verifier
from services.node.admission import Refused, check_broadcast, check_cancel, shown

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(Command)


class CommandConsumer:
    def __init__(self, js: JetStreamContext, node_id: str, *, verifier: Verifier,
                 on_broadcast: Callable[[RunBroadcast], None],
                 on_cancel: Callable[[RunCancel], None],
                 nc: NATS | None = None, fetch_timeout_s: float = 1.0) -> None:
        self._js = js
        self._node_id = node_id
        self._verifier = verifier
        self._subject = cmd_subject(node_id)
        self._on_broadcast = on_broadcast
        self._on_cancel = on_cancel
        self._nc = nc
        self._fetch_timeout_s = fetch_timeout_s
        self.subscriptions = 0  # how many times the pull subscription was (re)created
        self.refused: Counter[str] = Counter()  # commands terminated, by reason code

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

    def _reconnects(self) -> int:
        return int(self._nc.stats["reconnects"]) if self._nc is not None else 0

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """(Re)create the durable consumer if needed and bind a fresh pull subscription to it."""
        await jetstream.ensure_node_consumer(self._js, self._node_id)
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
                except Exception as exc:
                    log.warning("command fetch failed; subscribing again", error=repr(exc))
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                    sub = None
                    await pause(stop, 1.0)
                    continue
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
