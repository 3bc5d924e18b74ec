"""Device inventory and heartbeat: poll the vendor's `list`, tell the scheduler and the fleet.

An empty `list` is "vendor unavailable" (the program restarts), not "every
device left": the scheduler keeps its last view and the event says so.

What goes to the fleet (issue 10 item 5): the vendor is polled every
`inventory_interval_s`, and a small `NodeHeartbeat` is sent each time, but the
device list (`DeviceInventoryEvent`, about 120 bytes per device) only when it
changed (a device came, went or changed status/model/name/mode, or the vendor
became (un)available) and otherwise as a full snapshot every `snapshot_s`, so
a new aggregator converges and the devices' `last_seen` stays fresh. Keep
`snapshot_s` below the aggregator's liveness window (`DOAI_LIVENESS_WINDOW_S`,
60 s), which still reads a device's liveness from its last listing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable

import structlog

from contracts.events import DeviceInfo, DeviceInventoryEvent, NodeHeartbeat
from contracts.ids import new_id, utcnow
from runtime.aio import pause
from services.node.driver import DeviceDriver
from services.node.journal import Journal
from services.node.scheduler import Scheduler
from services.node.vendor_client import VendorError

log = structlog.get_logger(__name__)

VERSION = "0.1.0"


class Inventory:
    def __init__(self, *, node_id: str, driver: DeviceDriver, scheduler: Scheduler, journal: Journal,
                 on_event: Callable[[], None], on_change: Callable[[], None], list_timeout_s: float = 10.0,
                 snapshot_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_id = node_id
        self.driver = driver
        self.scheduler = scheduler
        self.journal = journal
        self._on_event = on_event
        self._on_change = on_change
        self.list_timeout_s = list_timeout_s
        self.vendor_available = False
        self.polls = 0
        self.snapshot_s = snapshot_s
        self._clock = clock
        self._sent: tuple[bool, list[DeviceInfo]] | None = None  # the last device list sent
        self._sent_at = 0.0
        self.sent = 0  # inventory events written to the outbox
        self._refused = 0  # events the journal set aside as too large for NATS, as last counted
        self.unchanged = 0  # polls whose unchanged list was not sent

    async def poll(self) -> None:
        devices: list[DeviceInfo]
        try:
            devices = await self.driver.list_devices(timeout_s=self.list_timeout_s)
        except VendorError as exc:
            devices = []
            if self.vendor_available or self.polls == 0:
                log.warning("vendor program unavailable", error=str(exc), url=self.driver.url)
        was_available = self.vendor_available
        self.vendor_available = bool(devices)
        if devices:
            self.journal.note_devices(d.serial for d in devices)
            if not was_available and self.polls:
                log.info("vendor program available again", devices=len(devices))
            self.scheduler.set_online(d.serial for d in devices if d.status == "online")
        elif was_available:
            log.warning("vendor listed no devices: treated as unavailable, queues paused", url=self.driver.url)
        # Empty or failed list: pause new starts, keep the last view of who is online.
        self.scheduler.set_vendor_available(self.vendor_available)
        self._on_change()
        self.polls += 1
        now = self._clock()
        listed = (self.vendor_available, sorted(devices, key=lambda d: d.serial))
        if listed == self._sent and now - self._sent_at < self.snapshot_s:
            self.unchanged += 1
            return
        self.journal.add_event(DeviceInventoryEvent(
            event_id=new_id(), ts=utcnow(), node_id=self.node_id,
            vendor_available=self.vendor_available, devices=devices,
        ))
        self._sent, self._sent_at = listed, now
        self.sent += 1
        self._on_event()

    def heartbeat(self) -> None:
        try:
            self._refused = self.journal.outbox_refused_count()
        except sqlite3.Error:  # a side figure: the heartbeat (the node's liveness) goes out with the last one
            log.warning("set-aside events not counted; the heartbeat says the last count", node_id=self.node_id,
                        refused_events=self._refused, exc_info=True)
        self.journal.add_event(NodeHeartbeat(
            event_id=new_id(), ts=utcnow(), node_id=self.node_id, slots=self.scheduler.slots,
            running=len(self.scheduler.running), queued=self.scheduler.queued,
            vendor_connected=self.vendor_available, version=VERSION, refused_events=self._refused,
        ))
        self._on_event()

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        while True:
            try:
                await self.poll()
                self.heartbeat()
            except Exception:  # e.g. the journal is locked: try again next interval
                log.exception("inventory poll failed")
            if await pause(stop, interval_s):
                return
