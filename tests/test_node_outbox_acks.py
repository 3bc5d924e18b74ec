"""The outbox's own ack path: a row leaves the journal only on JetStream's ack of that row, in this window.

Real nats-server; the events' subjects have no stream until the test declares them, so every real
answer is "no responders" (status 503) until then.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.events import NodeHeartbeat
from contracts.ids import new_id, utcnow
from contracts.subjects import EVT_STREAM, node_inbox_prefix
from doai.embedded import EmbeddedNats
from runtime import jetstream
from runtime.nats_auth import inbox_prefix
from services.node.journal import Journal
from services.node.outbox import Outbox
from tests.conftest import creds_file
from tests.node_support import probe_until_seen, until


def beats(n: int) -> list[NodeHeartbeat]:
    return [NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id="n1", slots=20, running=0, queued=0,
                          vendor_connected=True, version="t") for _ in range(n)]


@contextlib.asynccontextmanager
async def journaled(server: EmbeddedNats, tmp_path: Path,
                    n: int = 5) -> AsyncIterator[tuple[NATS, JetStreamContext, Journal, list[NodeHeartbeat]]]:
    """An admin connection, and a journal holding `n` heartbeats not yet published (in journal order)."""
    nc = await jetstream.connect(server.url, "outbox-acks", creds=creds_file("admin"))
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        sent = beats(n)
        for event in sent:
            journal.add_event(event)
        yield nc, nc.jetstream(), journal, sent
    finally:
        journal.close()
        await jetstream.close(nc)


async def stored_ids(js: JetStreamContext, count: int) -> list[str]:
    ids = []
    for seq in range(1, count + 1):
        data = (await js.get_msg(EVT_STREAM, seq)).data
        assert data is not None
        ids.append(msgspec.json.decode(data, type=NodeHeartbeat).event_id)
    return ids


async def test_events_without_a_stream_stay_and_go_out_once_it_exists(nats_server: EmbeddedNats,
                                                                      tmp_path: Path) -> None:
    async with journaled(nats_server, tmp_path) as (nc, js, journal, sent):
        outbox = Outbox(journal, js, publish_timeout_s=2.0)
        with pytest.raises(RuntimeError, match=r"5 of 5 events not acked: .*status 503"):
            await outbox.publish_once()
        assert journal.outbox_size() == 5 and outbox.published == 0
        await jetstream.ensure_streams(js)
        assert await outbox.publish_once() == 5
        assert journal.outbox_size() == 0
        info = await js.stream_info(EVT_STREAM)
        assert info.state.messages == 5
        assert await stored_ids(js, 5) == [e.event_id for e in sent]  # journal order, each once


async def test_late_or_forged_acks_remove_nothing(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """Attack: "stored" acks on the outbox's inbox for an earlier window, an index past the window and a
    malformed index, sent before the window whose real answers all say no stream: no row leaves."""
    async with journaled(nats_server, tmp_path) as (nc, js, journal, sent):
        outbox = Outbox(journal, js, publish_timeout_s=2.0)
        with pytest.raises(RuntimeError, match="5 of 5 events not acked"):
            await outbox.publish_once()  # window 1: no stream
        stored = b'{"stream":"DOAI_EVT","seq":1}'
        inbox = outbox._inbox
        assert inbox.startswith(nc._inbox_prefix.decode())  # within the connection's own inbox prefix
        for reply in (f"{inbox}.1.0", f"{inbox}.1.4", f"{inbox}.2.5", f"{inbox}.2.x", f"{inbox}.2"):
            await nc.publish(reply, stored)
        await nc.flush()
        with pytest.raises(RuntimeError, match="5 of 5 events not acked"):
            await outbox.publish_once()  # window 2: the forged acks are queued before its real answers
        assert journal.outbox_size() == 5 and outbox.published == 0
        await jetstream.ensure_streams(js)
        assert await outbox.publish_once() == 5
        assert await stored_ids(js, 5) == [e.event_id for e in sent]


async def test_the_tap_cannot_answer_a_nodes_events_for_jetstream(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    """Attack: the read-only tap sees every event live on `doai.evt.>`, reply subject included, and answers
    each with a "stored" ack. The events have no stream yet, so JetStream stores nothing and sends no answer:
    a forged ack that counted would delete rows nobody stored. The server refuses the tap's replies; every
    row stays and goes out once, in order, when the stream exists."""
    node = await jetstream.connect(nats_server.url, "outbox-node", creds=creds_file("node", "n1"),
                                   inbox_prefix=node_inbox_prefix("n1"))
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    tap = await nats.connect(nats_server.url, user_credentials=str(creds_file("tap")),
                             inbox_prefix=inbox_prefix("tap"), error_cb=on_error)
    answered: list[str] = []
    probes: list[Msg] = []

    async def forge(msg: Msg) -> None:
        if not msg.reply:  # the probe below
            probes.append(msg)
            return
        answered.append(msg.reply)
        await tap.publish(msg.reply, b'{"stream":"DOAI_EVT","seq":1}')

    journal = Journal(tmp_path / "journal.sqlite")
    try:
        await tap.subscribe("doai.evt.>", cb=forge)
        await tap.flush()
        await probe_until_seen(nats_server.url, "doai.evt.probe", lambda: bool(probes))
        sent = beats(5)
        for event in sent:
            journal.add_event(event)
        outbox = Outbox(journal, node.jetstream(), publish_timeout_s=2.0)
        with pytest.raises(RuntimeError, match="5 of 5 events not acked"):
            await outbox.publish_once()
        assert len(answered) == 5 and all(r.startswith(f"{node_inbox_prefix('n1')}.") for r in answered)
        await until(lambda: any("permissions violation" in e for e in errors), 5, f"the tap refused ({errors})")
        assert journal.outbox_size() == 5 and outbox.published == 0
        admin = await nats.connect(nats_server.url, user_credentials=str(creds_file("admin")))
        try:
            await jetstream.ensure_streams(admin.jetstream())
            assert await outbox.publish_once() == 5
            assert journal.outbox_size() == 0
            assert await stored_ids(admin.jetstream(), 5) == [e.event_id for e in sent]
        finally:
            await admin.close()
    finally:
        journal.close()
        await tap.close()
        await jetstream.close(node)


async def test_rows_stored_before_a_crash_are_acked_as_duplicates_and_stored_once(nats_server: EmbeddedNats,
                                                                                  tmp_path: Path) -> None:
    """A node killed after JetStream stored a window but before the deletes were committed publishes those
    rows again on its next start (a new outbox, new ack inbox): JetStream answers `duplicate` (same
    `Nats-Msg-Id`), the rows leave, and the stream holds each event once, in journal order."""
    async with journaled(nats_server, tmp_path) as (nc, js, journal, sent):
        await jetstream.ensure_streams(js)
        for row in journal.outbox_batch(3):  # what the killed process got stored
            ack = await js.publish(row.subject, row.payload, headers={"Nats-Msg-Id": row.event_id})
            assert not ack.duplicate
        outbox = Outbox(journal, js, publish_timeout_s=2.0)
        assert await outbox.publish_once() == 5
        assert journal.outbox_size() == 0
        assert (await js.stream_info(EVT_STREAM)).state.messages == 5
        assert await stored_ids(js, 5) == [e.event_id for e in sent]


async def test_a_full_stream_refuses_and_the_refused_rows_stay_until_it_has_room(nats_server: EmbeddedNats,
                                                                                 tmp_path: Path) -> None:
    """JetStream's refusal of a full stream (discard new) is an error ack: those rows stay, and go out in
    order once the stream has room; nothing is stored twice."""
    async with journaled(nats_server, tmp_path) as (nc, js, journal, sent):
        config = next(c for c in jetstream.stream_configs() if c.name == EVT_STREAM)
        config.max_msgs = 2
        await js.add_stream(config)
        outbox = Outbox(journal, js, publish_timeout_s=2.0)
        with pytest.raises(RuntimeError, match=r"3 of 5 events not acked: .*maximum messages"):
            await outbox.publish_once()
        assert journal.outbox_size() == 3 and outbox.published == 2
        config.max_msgs = 100
        await js.update_stream(config)
        assert await outbox.publish_once() == 3
        assert journal.outbox_size() == 0
        assert await stored_ids(js, 5) == [e.event_id for e in sent]
        assert (await js.stream_info(EVT_STREAM)).state.messages == 5
