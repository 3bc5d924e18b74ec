"""Inventory on change (issue 10 item 5): the device list is sent when it changes, and as a snapshot now and then.

A real simulator over WebSocket and a real journal; the clock is the test's, so
"30 s later" needs no waiting. Every poll writes a heartbeat; the device list
goes to the outbox only when it changed or the snapshot interval passed.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from contracts.events import DeviceInventoryEvent, Event, NodeHeartbeat
from contracts.ids import utcnow
from services.node.inventory import Inventory
from services.node.journal import Journal
from services.node.scheduler import Scheduler
from services.node.vendor_client import VendorClient
from services.simulator import Simulator, SimulatorConfig

_decoder = msgspec.json.Decoder(Event)


def outbox(journal: Journal) -> list[Event]:
    return [_decoder.decode(row.payload) for row in journal.outbox_batch(10_000)]


async def test_the_device_list_is_sent_on_change_and_as_a_slow_snapshot(tmp_path: Path) -> None:
    now = [1000.0]
    async with Simulator(SimulatorConfig(devices=3, seed=3)) as sim, \
            VendorClient(sim.url, pool_size=2, request_timeout_s=2.0) as vendor:
        journal = Journal(tmp_path / "j.sqlite")
        inv = Inventory(node_id="n1", driver=vendor, scheduler=Scheduler(4), journal=journal, on_event=lambda: None,
                        on_change=lambda: None, snapshot_s=30.0, clock=lambda: now[0])

        async def tick(seconds: float = 5.0) -> None:
            await inv.poll()
            inv.heartbeat()
            now[0] += seconds

        for _ in range(5):  # 25 s, nothing changes: one list, five heartbeats
            await tick()
        sent = outbox(journal)
        assert [type(e) for e in sent].count(NodeHeartbeat) == 5
        lists = [e for e in sent if isinstance(e, DeviceInventoryEvent)]
        assert len(lists) == 1 and len(lists[0].devices) == 3

        serial = sorted(sim.devices)[1]
        sim.set_device_status(serial, "offline")  # a change goes out at the next poll
        await tick()
        lists = [e for e in outbox(journal) if isinstance(e, DeviceInventoryEvent)]
        assert len(lists) == 2
        assert {d.serial: d.status for d in lists[-1].devices}[serial] == "offline"

        for _ in range(5):  # unchanged again until 30 s after the last list: then one full snapshot
            await tick()
        lists = [e for e in outbox(journal) if isinstance(e, DeviceInventoryEvent)]
        assert len(lists) == 2
        await tick()
        lists = [e for e in outbox(journal) if isinstance(e, DeviceInventoryEvent)]
        assert len(lists) == 3 and len(lists[-1].devices) == 3 and lists[-1].vendor_available

        sim.set_licence(False)  # the list now fails: "vendor unavailable" is a change, sent once
        await tick()
        await tick()
        lists = [e for e in outbox(journal) if isinstance(e, DeviceInventoryEvent)]
        assert len(lists) == 4 and not lists[-1].vendor_available and lists[-1].devices == []
        assert inv.sent == 4 and inv.unchanged == inv.polls - 4
        journal.close()


async def test_the_heartbeat_carries_the_set_aside_count_and_still_goes_out_when_it_cannot_be_read(
    tmp_path: Path, log_file: Path
) -> None:
    """The count of events set aside as too large is a side figure: a journal that cannot answer it (here its
    table gone) must not stop the heartbeat, the node's liveness; the last count goes out instead."""
    async with Simulator(SimulatorConfig(devices=1, seed=3)) as sim, \
            VendorClient(sim.url, pool_size=1, request_timeout_s=2.0) as vendor:
        journal = Journal(tmp_path / "j.sqlite")
        try:
            inv = Inventory(node_id="n1", driver=vendor, scheduler=Scheduler(4), journal=journal,
                            on_event=lambda: None, on_change=lambda: None)
            beat = NodeHeartbeat(event_id="e", ts=utcnow(), node_id="n1", slots=1, running=0, queued=0,
                                 vendor_connected=True, version="t")
            journal.add_event(beat)
            [row] = journal.outbox_batch(10)
            journal.outbox_refuse({row.id: "test"})
            inv.heartbeat()
            journal._db.execute("DROP TABLE outbox_refused")  # as a damaged page would make it unreadable
            inv.heartbeat()
            beats = [e for e in outbox(journal) if isinstance(e, NodeHeartbeat)]
            assert [b.refused_events for b in beats] == [1, 1]
        finally:
            journal.close()
    lines = [msgspec.json.decode(line) for line in log_file.read_text().splitlines()]
    assert any(x.get("event", "").startswith("set-aside events not counted") and x.get("node_id") == "n1"
               for x in lines)
