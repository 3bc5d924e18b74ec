"""The device-driver interface the workflow steps and the inventory use, in doai's own types.

Two implementations: `VendorClient` (the vendor program's WebSocket API, the
default) and `AdbDriver` (plain adb, for labs without the vendor program).
Both list devices as `DeviceInfo` (contracts/events.py) and press keys by
`Key`; each maps those to its own wire format. Errors are `VendorError`
subclasses (under the node's `NodeError` root) in both, so steps report them
the same way.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Protocol

from contracts.events import DeviceInfo


class Key(enum.StrEnum):
    """The navigation keys a driver presses natively (other keys go through `input keyevent`)."""

    HOME = "home"
    BACK = "back"
    RECENTS = "recents"


class DeviceDriver(Protocol):
    url: str

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
