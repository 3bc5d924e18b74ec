"""Attack: JetStream used as a reflector to get another node's legitimate event set aside.

No role may publish on a node's ack inbox, but a publisher chooses its reply subject freely and JetStream
answers there. The tap sees every event's reply subject on `doai.evt.>`; node n2 may publish oversized
messages on `doai.evt.n2.>` (under the server's max_payload of 4 MB, over DOAI_EVT's max_msg_size of 1 MiB).
With a window counter in the reply subject they could queue JetStream's own error 10054 on n1's ack subject
of the *next* window before n1 sends it. The window token is random, and a live reflection goes through the
same stream after n1's own message, so JetStream's real answer comes first.

Real nats-server, real roles (n1, n2, tap).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from contracts.events import NodeHeartbeat
from contracts.ids import new_id, utcnow
from contracts.subjects import EVT_STREAM, node_inbox_prefix
from doai.embedded import EmbeddedNats
from runtime import jetstream
from runtime.jetstream import DEFAULT_LIMITS, StreamLimits
from runtime.nats_auth import inbox_prefix
from services.node.journal import Journal
from services.node.outbox import MESSAGE_TOO_LARGE, Outbox
from tests.conftest import creds_file
from tests.node_support import probe_until_seen, until


def beat() -> NodeHeartbeat:
    return NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id="n1", slots=20, running=0, queued=0,
                         vendor_connected=True, version="t")


async def test_a_tap_and_another_node_cannot_get_a_nodes_event_set_aside(nats_server: EmbeddedNats,
                                                                         tmp_path: Path) -> None:
    """Attack: the tap reads n1's ack subjects; n2 publishes oversized messages (JetStream answers 10054)
    with those reply subjects: the next window guessed from a counter, the last window's subject replayed
    (both queued before n1 sends), and, live, each subject of the next window the moment the tap sees it.
    The stream is full, so n1's rows are not stored: a forged 10054 that counted would set aside legitimate
    events for good. None counts: the rows stay in the outbox, nothing is set aside, and they go out in order
    once the stream has room."""
    full = {**DEFAULT_LIMITS, EVT_STREAM: StreamLimits(max_bytes=DEFAULT_LIMITS[EVT_STREAM].max_bytes, max_msgs=2,
                                                       max_msg_size=DEFAULT_LIMITS[EVT_STREAM].max_msg_size)}
    admin = await jetstream.connect(nats_server.url, "admin", creds=creds_file("admin"))
    n1 = await jetstream.connect(nats_server.url, "n1", creds=creds_file("node", "n1"),
                                 inbox_prefix=node_inbox_prefix("n1"))
    n2 = await jetstream.connect(nats_server.url, "n2", creds=creds_file("node", "n2"),
                                 inbox_prefix=node_inbox_prefix("n2"))
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(repr(exc))

    tap = await nats.connect(nats_server.url, user_credentials=str(creds_file("tap")), inbox_prefix=inbox_prefix("tap"),
                             error_cb=on_error)
    journal = Journal(tmp_path / "journal.sqlite")
    big = b"x" * (2 * 1024 * 1024)  # over DOAI_EVT's max_msg_size, under the server's max_payload (4 MB)
    seen: list[str] = []
    live = asyncio.Event()
    reflected: list[str] = []

    probes: list[Msg] = []

    async def watch(msg: Msg) -> None:
        if not msg.reply:  # a probe of probe_until_seen
            probes.append(msg)
            return
        seen.append(msg.reply)
        if live.is_set():
            await n2.publish("doai.evt.n2.node", big, reply=msg.reply)
            reflected.append(msg.reply)

    try:
        js = admin.jetstream()
        await tap.subscribe("doai.evt.n1.>", cb=watch)
        await tap.flush()
        await probe_until_seen(nats_server.url, "doai.evt.n1.probe", lambda: bool(probes))  # before the stream
        await jetstream.ensure_streams(js, full)
        sent = [beat() for _ in range(5)]
        for event in sent:
            journal.add_event(event)
        outbox = Outbox(journal, n1.jetstream(), publish_timeout_s=2.0)
        with pytest.raises(RuntimeError, match="3 of 5 events not acked"):
            await outbox.publish_once()  # window 1: two stored, three refused (stream full), kept
        await until(lambda: len(seen) == 5, 5, f"the tap saw window 1 ({seen}, {errors})")
        inbox, window, _ = seen[-1].rsplit(".", 2)
        # Sanity: JetStream does answer on n1's inbox for n2's publish (the reflector works).
        probe = await n1.subscribe(f"{inbox}.probe")
        await n2.publish("doai.evt.n2.node", big, reply=f"{inbox}.probe")
        reflection = await probe.next_msg(timeout=5)
        assert msgspec.json.decode(reflection.data)["error"]["err_code"] == MESSAGE_TOO_LARGE
        await probe.unsubscribe()
        acks = outbox._acks
        assert acks is not None
        queued = acks.pending_msgs
        for i in range(3):
            for guess in ("2", window):
                await n2.publish("doai.evt.n2.node", big, reply=f"{inbox}.{guess}.{i}")
        await n2.flush()
        await until(lambda: acks.pending_msgs == queued + 6, 5, "the forged answers queued on n1's ack inbox")
        live.set()
        with pytest.raises(RuntimeError, match="3 of 3 events not acked.*maximum messages"):
            await outbox.publish_once()  # window 2: the stream is still full
        await until(lambda: len(reflected) == 3, 5, "n2 reflected every subject of window 2")
        live.clear()
        assert journal.outbox_refused() == [] and journal.outbox_size() == 3 and outbox.refused == 0
        full[EVT_STREAM] = StreamLimits(max_bytes=DEFAULT_LIMITS[EVT_STREAM].max_bytes, max_msgs=100,
                                        max_msg_size=DEFAULT_LIMITS[EVT_STREAM].max_msg_size)
        await jetstream.ensure_streams(js, full)
        assert await outbox.publish_once() == 3
        assert journal.outbox_size() == 0 and journal.outbox_refused() == []
        info = await js.stream_info(EVT_STREAM)
        assert info.state.messages == 5
        stored = [msgspec.json.decode((await js.get_msg(EVT_STREAM, q)).data or b"", type=NodeHeartbeat).event_id
                  for q in range(1, 6)]
        assert stored == [e.event_id for e in sent]
    finally:
        journal.close()
        await tap.close()
        await jetstream.close(n2)
        await jetstream.close(n1)
        await jetstream.close(admin)
