"""Inventory bytes per node per day, before and after "inventory on change" (issue 10 item 5).

Drives the node's real `Inventory` (real simulator over WebSocket, real
journal) for one simulated hour on a test clock, polling every `--interval`
seconds with a heartbeat each time, and counts what lands in the outbox, i.e.
what the node publishes: subject + JSON payload + the `Nats-Msg-Id` header
(NATS protocol framing not counted). "before" sends the full device list at
every poll (snapshot interval 0, the old behaviour); "after" sends it on change
and as a snapshot every `--snapshot` seconds. One device changes status every
`--change-every` seconds in both. The hour is scaled to a day.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402

from contracts.events import DeviceInventoryEvent, Event  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from services.node.inventory import Inventory  # noqa: E402
from services.node.journal import Journal  # noqa: E402
from services.node.scheduler import Scheduler  # noqa: E402
from services.node.vendor_client import VendorClient  # noqa: E402
from services.simulator import Simulator, SimulatorConfig  # noqa: E402

HOUR_S = 3600.0
_decoder = msgspec.json.Decoder(Event)


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def one_hour(sim: Simulator, tmp: Path, name: str, interval_s: float, snapshot_s: float,
                   change_every_s: float) -> dict[str, int]:
    now = [0.0]
    journal = Journal(tmp / f"{name}.sqlite")
    async with VendorClient(sim.url, pool_size=1) as vendor:
        inv = Inventory(node_id="bench-node", driver=vendor, scheduler=Scheduler(20), journal=journal,
                        on_event=lambda: None, on_change=lambda: None, snapshot_s=snapshot_s, clock=lambda: now[0])
        serials = sorted(sim.devices)
        next_change, flip = change_every_s, 0
        while now[0] < HOUR_S:
            if now[0] >= next_change:
                serial = serials[flip % len(serials)]
                sim.set_device_status(serial, "offline" if sim.devices[serial].status == "online" else "online")
                flip += 1
                next_change += change_every_s
            await inv.poll()
            inv.heartbeat()
            now[0] += interval_s
    sizes = {"inventory": 0, "heartbeat": 0, "inventory_msgs": 0, "heartbeat_msgs": 0}
    for row in journal.outbox_batch(10_000_000):
        size = len(row.subject) + len(row.payload) + len("Nats-Msg-Id") + len(row.event_id)
        kind = "inventory" if isinstance(_decoder.decode(row.payload), DeviceInventoryEvent) else "heartbeat"
        sizes[kind] += size
        sizes[f"{kind}_msgs"] += 1
    journal.close()
    return sizes


async def main(devices: int, interval_s: float, snapshot_s: float, change_every_s: float) -> None:
    configure_logging(level="warning")
    with tempfile.TemporaryDirectory() as tmp:
        async with Simulator(SimulatorConfig(devices=devices, seed=1, default_latency_ms=0.0)) as sim:
            before = await one_hour(sim, Path(tmp), "before", interval_s, 0.0, change_every_s)
            for serial in sim.devices:
                sim.set_device_status(serial, "online")
            after = await one_hour(sim, Path(tmp), "after", interval_s, snapshot_s, change_every_s)
    out(f"inventory bytes per node per day: {devices} devices, poll + heartbeat every {interval_s:g} s, "
        f"one status change every {change_every_s:g} s, snapshot every {snapshot_s:g} s (after)")
    out("| | inventory msgs/day | inventory MB/day | heartbeat MB/day | total MB/day |")
    out("|---|---|---|---|---|")
    for name, s in (("before (list every poll)", before), ("after (on change + snapshot)", after)):
        inv_mb, hb_mb = s["inventory"] * 24 / 1e6, s["heartbeat"] * 24 / 1e6
        out(f"| {name} | {s['inventory_msgs'] * 24:,} | {inv_mb:,.1f} | {hb_mb:,.1f} | {inv_mb + hb_mb:,.1f} |")
    total_b = (before["inventory"] + before["heartbeat"]) * 24
    total_a = (after["inventory"] + after["heartbeat"]) * 24
    out(f"reduction: {total_b / total_a:.1f}x ({total_b / 1e6:,.1f} MB -> {total_a / 1e6:,.1f} MB per node per day)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--interval", type=float, default=5.0, help="DOAI_INVENTORY_INTERVAL_S")
    p.add_argument("--snapshot", type=float, default=30.0, help="DOAI_INVENTORY_SNAPSHOT_S")
    p.add_argument("--change-every", type=float, default=600.0)
    a = p.parse_args()
    asyncio.run(main(a.devices, a.interval, a.snapshot, a.change_every))
