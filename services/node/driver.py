"""The device-driver interface the workflow steps and the inventory use.

Two implementations: `VendorClient` (the vendor program's WebSocket API, the
default) and `AdbDriver` (plain adb, for labs without the vendor program).
Errors are `VendorError` subclasses in both, so steps report them the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class DeviceDriver(Protocol):
    url: str

    @property
    def connected(self) -> bool: ...

    async def close(self) -> None: ...

    async def list_devices(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]: ...

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str: ...

    async def screenshot(self, serial: str, save_dir: Path, *, timeout_s: float | None = None) -> Path: ...

    async def push_event(self, serial: str, type: int | str) -> None: ...

    async def start_apk(self, serial: str, package: str) -> None: ...

    async def stop_apk(self, serial: str, package: str) -> None: ...
