"""Per-device FIFO queues, a device lock and global slots, picked round-robin (rules 1–3).

`Scheduler` is plain bookkeeping with no I/O, so its invariants can be tested
directly: a device runs at most one job; at most `slots` jobs run; a slot is
never left idle while an eligible device waits; jobs of one device start in
arrival order; eligible devices take turns in a fixed rotation.

A device is eligible when it has queued work, is online, is not running and
is not draining (an abandoned request may still run on it: `driver.Drains`),
and the vendor program is available. Until the first inventory arrives every
device counts as online. While the vendor is unavailable (its `list` failed or
came back empty) nothing new starts, and nothing is expired either: the last
known view of the fleet stands.

Devices that stay offline: `expire_offline(grace_s)` takes out the queued jobs
whose device has been offline for `grace_s` of the time they waited; the agent
ends them `skipped` ("device not available").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from services.node.journal import Job


class Scheduler:
    def __init__(self, slots: int, *, clock: Callable[[], float] = time.monotonic,
                 is_draining: Callable[[str], bool] = lambda serial: False) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self._clock = clock
        self._is_draining = is_draining
        self._queues: dict[str, deque[Job]] = {}
        self._rotation: list[str] = []  # devices in order of first appearance
        self._cursor = 0  # where the next round-robin scan starts
        self.running: dict[str, Job] = {}
        self._online: set[str] | None = None
        self._offline_since: dict[str, float] = {}
        self.vendor_available = True

    # -- inputs ------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        queue = self._queues.get(job.serial)
        if queue is None:
            queue = self._queues[job.serial] = deque()
            self._rotation.append(job.serial)
        now = self._clock()
        job.queued_at = now
        if not self.is_online(job.serial):
            self._offline_since.setdefault(job.serial, now)
        queue.append(job)

    def finish(self, serial: str) -> Job:
        return self.running.pop(serial)

    def set_online(self, serials: Iterable[str]) -> None:
        """The devices the last usable inventory listed as online (all others are offline)."""
        self._online = set(serials)
        now = self._clock()
        for serial in self._queues:
            if serial in self._online:
                self._offline_since.pop(serial, None)
            else:
                self._offline_since.setdefault(serial, now)

    def set_vendor_available(self, available: bool) -> None:
        self.vendor_available = available

    def remove_queued(self, predicate: Callable[[Job], bool]) -> list[Job]:
        """Take queued jobs matching `predicate` out of their queues (e.g. a cancelled run)."""
        removed: list[Job] = []
        for queue in self._queues.values():
            keep = [j for j in queue if not predicate(j)]
            removed.extend(j for j in queue if predicate(j))
            queue.clear()
            queue.extend(keep)
        return removed

    def expire_offline(self, grace_s: float) -> list[Job]:
        """Take out queued jobs whose device has been offline for `grace_s` while they waited."""
        if not self.vendor_available or self._online is None:
            return []
        now = self._clock()

        def expired(job: Job) -> bool:
            since = self._offline_since.get(job.serial)
            return since is not None and now - max(since, job.queued_at) >= grace_s

        if not any(s in self._offline_since for s, q in self._queues.items() if q):
            return []
        return self.remove_queued(expired)

    # -- decisions ---------------------------------------------------------------

    def is_online(self, serial: str) -> bool:
        return self._online is None or serial in self._online

    def eligible(self, serial: str) -> bool:
        return (self.vendor_available and bool(self._queues.get(serial)) and serial not in self.running
                and self.is_online(serial) and not self._is_draining(serial))

    def next_job(self) -> Job | None:
        """Start the next job if a slot is free: the first eligible device after the cursor."""
        if len(self.running) >= self.slots or not self.vendor_available:
            return None
        n = len(self._rotation)
        for step in range(n):
            i = (self._cursor + step) % n
            serial = self._rotation[i]
            if self.eligible(serial):
                # Not wrapped: devices appended to the rotation later come right after this one.
                self._cursor = i + 1
                job = self._queues[serial].popleft()
                self.running[serial] = job
                return job
        return None

    def start_all(self) -> list[Job]:
        """Fill every free slot at once."""
        started = []
        while (job := self.next_job()) is not None:
            started.append(job)
        return started

    def queued_jobs(self) -> list[Job]:
        return [j for q in self._queues.values() for j in q]

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())
