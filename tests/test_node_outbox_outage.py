"""The outbox survives a NATS outage: 40 failed windows, then everything goes out once the server is back.

Found in review when the outbox used nats-py's `publish_async`: each window that failed during an
outage left one orphaned ack future (and one of its 4,000 publish permits taken), and after enough
outage time the outbox hung for good. The outbox now publishes with its own ack inbox (no permits);
this keeps proving that failed windows never stop it. Real nats-server, stopped and restarted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from contracts.events import NodeHeartbeat
from contracts.ids import new_id, utcnow
from doai.embedded import EmbeddedNats
from runtime import jetstream
from services.node.journal import Journal
from services.node.outbox import Outbox
from tests.conftest import creds_file


async def test_failed_windows_give_their_permits_back(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    nc = await jetstream.connect(nats_server.url, "outbox-outage", creds=creds_file("admin"))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    journal = Journal(tmp_path / "journal.sqlite")
    for _ in range(3000):  # ~1 KB each: enough to fill nats-py's 2 MiB reconnect buffer
        journal.add_event(NodeHeartbeat(event_id=new_id(), ts=utcnow(), node_id="n1", slots=20, running=0,
                                         queued=0, vendor_connected=True, version="x" * 800))
    outbox = Outbox(journal, js, publish_timeout_s=5.0)
    try:
        assert await outbox.publish_once() == 256
        outbox._timeout = 0.2  # forty windows that get no ack: each gives up quickly
        nats_server.stop()
        failures = 0
        for _ in range(40):
            try:
                await outbox.publish_once()
            except Exception:
                failures += 1
        assert failures == 40
        nats_server.start()
        outbox._timeout = 5.0
        deadline = time.monotonic() + 30
        while journal.outbox_size():
            assert time.monotonic() < deadline, f"{journal.outbox_size()} events still in the outbox"
            try:
                await outbox.publish_once()
            except Exception:
                await asyncio.sleep(0.1)
        assert outbox.published == 3000
    finally:
        journal.close()
        await nc.close()
