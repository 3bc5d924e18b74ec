"""The device-driver interface the workflow steps and the inventory use, in doai's own types.

Two implementations: `VendorClient` (the vendor program's WebSocket API, the
default) and `AdbDriver` (plain adb, for labs without the vendor program).
Both list devices as `DeviceInfo` (contracts/events.py) and press keys by
`Key`; each maps those to its own wire format. Errors are `VendorError`
subclasses (under the node's `NodeError` root) in both, so steps report them
the same way.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import structlog

from contracts.events import DeviceInfo
from contracts.vendor import check_serial
from services.node.errors import InvalidRequest, NodeError

log = structlog.get_logger(__name__)

DEFAULT_DRAIN_GRACE_S = 60.0


class Key(enum.StrEnum):
    """The navigation keys a driver presses natively (other keys go through `input keyevent`)."""

    HOME = "home"
    BACK = "back"
    RECENTS = "recents"


def one_serial(serial: str) -> str:
    """`serial` if it names exactly one device (`contracts.vendor.check_serial`), else `InvalidRequest`."""
    try:
        return check_serial(serial)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class DeviceBusy(NodeError):
    """A request waited for the device's abandoned request to end and its own time ran out."""

    code = "device_draining"


class Drains:
    """Devices still busy with an abandoned request (a step that timed out or was cancelled).

    When a request to a device is abandoned, the vendor program (or an adb
    worker thread) may still be executing it on the phone. The device is then
    *draining* until that request answers or `grace_s` passes: the scheduler
    does not start the device's next job (`is_draining`), and a request to it
    (a retry of the same step, say) first waits for the drain (`wait`).
    `on_drained(serial)` is called when a drain ends, so queued work can start.
    """

    def __init__(self, grace_s: float = DEFAULT_DRAIN_GRACE_S) -> None:
        self.grace_s = grace_s
        self.on_drained: Callable[[str], None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.started = 0
        self.outcomes: dict[str, int] = {"answered": 0, "grace_passed": 0, "ended": 0}

    def is_draining(self, serial: str) -> bool:
        return serial in self._tasks

    def start(self, serial: str, pending: Awaitable[object], cleanup: Callable[[], None]) -> None:
        """Track `pending` (the abandoned request's answer) for `serial`; `cleanup` runs when the drain ends."""
        self.started += 1
        log.warning("device draining: an abandoned request may still run on it", device_serial=serial,
                    grace_s=self.grace_s)
        self._tasks[serial] = asyncio.get_running_loop().create_task(
            self._run(serial, pending, cleanup), name=f"drain-{serial}")

    async def _run(self, serial: str, pending: Awaitable[object], cleanup: Callable[[], None]) -> None:
        started = time.monotonic()
        outcome = "ended"
        try:
            async with asyncio.timeout(self.grace_s):
                await pending
            outcome = "answered"
        except TimeoutError:
            outcome = "grace_passed"
        except asyncio.CancelledError:
            outcome = "ended"
            raise
        except Exception:
            outcome = "ended"  # the connection or worker ended without an answer: the request is over
        finally:
            cleanup()
            if self._tasks.get(serial) is asyncio.current_task():
                del self._tasks[serial]
            self.outcomes[outcome] += 1
            log.info("device drained", device_serial=serial, outcome=outcome,
                     drained_s=round(time.monotonic() - started, 3))
            if self.on_drained is not None:
                self.on_drained(serial)

    async def wait(self, serial: str, timeout_s: float) -> float:
        """Wait until `serial` is not draining; return the time spent, or raise `DeviceBusy` after `timeout_s`."""
        task = self._tasks.get(serial)
        if task is None:
            return 0.0
        started = time.monotonic()
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if not done:
            raise DeviceBusy(f"device {serial} still busy with an abandoned request after {timeout_s:g} s")
        return time.monotonic() - started

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class DeviceDriver(Protocol):
    url: str
    drains: Drains

    @property
    def connected(self) -> bool: ...

    async def close(self) -> None: ...

    async def list_devices(self, *, timeout_s: float | None = None) -> list[DeviceInfo]:
        """The devices attached now; an empty list may mean the vendor program is restarting."""
        ...

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str: ...

    async def screenshot(self, serial: str, save_dir: Path, *, timeout_s: float | None = None) -> Path: ...

    async def press_key(self, serial: str, key: Key) -> None: ...

    async def start_apk(self, serial: str, package: str) -> None: ...

    async def stop_apk(self, serial: str, package: str) -> None: ...
