"""A device driver over plain adb, for labs without the vendor program.

Talks to an adb server (default 127.0.0.1:5037) through `adbutils`, which is
synchronous: every call runs in a worker thread, bounded by a semaphore so a
node never floods the adb server. Errors become the same `VendorError`
subclasses the vendor client raises, so steps report them alike.

Mapping to the DeviceDriver interface:

* `list_devices` → `host:devices-l` as `DeviceInfo`; state `device` is reported as `online`,
  an `IP:PORT` serial as Wi-Fi (mode 1).
* `shell` → `shell:<command>` (the caller has already quoted every argument).
* `screenshot` → `screencap -p` streamed back over the shell (exec-out), written
  to a new file in `save_dir`.
* `press_key` → `input keyevent` (KEYCODE_HOME, KEYCODE_BACK, KEYCODE_APP_SWITCH).
* `start_apk` / `stop_apk` → `monkey -p PKG -c android.intent.category.LAUNCHER 1` / `am force-stop PKG`.

adbutils starts a local adb server by itself when none answers; `start_server=False`
(the default here) turns that into a clear `VendorUnavailable` instead.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import adbutils
import structlog
from adbutils.errors import AdbError, AdbTimeout

from contracts.events import DeviceInfo
from contracts.ids import is_serial
from contracts.vendor import DeviceMode, is_wifi_serial
from services.node.driver import DEFAULT_DRAIN_GRACE_S, DeviceBusy, Drains, Key, one_serial
from services.node.vendor_client import (
    VendorFailure,
    VendorProtocolError,
    VendorTimeout,
    VendorUnavailable,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

_KEYCODES = {Key.RECENTS: "KEYCODE_APP_SWITCH", Key.HOME: "KEYCODE_HOME", Key.BACK: "KEYCODE_BACK"}
_PNG = b"\x89PNG\r\n\x1a\n"


class AdbDriver:
    def __init__(self, host: str = "127.0.0.1", port: int = 5037, *, max_concurrency: int = 20,
                 request_timeout_s: float = 30.0, start_server: bool = False,
                 drain_grace_s: float = DEFAULT_DRAIN_GRACE_S) -> None:
        self.host = host
        self.port = port
        self.url = f"adb://{host}:{port}"
        self._client = adbutils.AdbClient(host=host, port=port, socket_timeout=request_timeout_s)
        self._limit = asyncio.Semaphore(max_concurrency)
        self._timeout = request_timeout_s
        self._start_server = start_server
        self._connected = False
        self._shots = 0
        # A device whose adb call was abandoned (timeout, cancel) stays busy while its worker thread still runs.
        self.drains = Drains(drain_grace_s)

    @property
    def connected(self) -> bool:
        return self._connected

    async def close(self) -> None:
        """Nothing is held open between calls (drains are given up)."""
        await self.drains.close()

    async def _call(self, what: str, fn: Callable[[], T], timeout_s: float | None, serial: str | None = None) -> T:
        limit = timeout_s or self._timeout
        if serial is not None and self.drains.is_draining(serial):
            try:
                limit -= await self.drains.wait(serial, limit)
            except DeviceBusy as exc:
                raise VendorTimeout(f"adb {what}: {exc}") from None
        if not self._start_server:
            await self._check_server()
        async with self._limit:
            worker = asyncio.ensure_future(asyncio.to_thread(fn))
            try:
                try:
                    result = await asyncio.wait_for(asyncio.shield(worker), limit)
                except BaseException:
                    if not worker.done() and serial is not None:
                        self.drains.start(serial, worker, lambda: None)  # the thread still works on the phone
                    raise
            except (TimeoutError, AdbTimeout):
                raise VendorTimeout(f"adb {what}: no answer within {limit:g} s") from None
            except AdbError as exc:
                self._connected = True  # the server answered, the request failed
                raise VendorFailure(f"adb {what}: {exc}", action=what) from None
            except (OSError, EOFError) as exc:
                self._connected = False
                where = f"{self.host}:{self.port}"
                raise VendorUnavailable(f"adb server at {where} dropped the connection: {exc}") from None
        self._connected = True
        return result

    async def _check_server(self) -> None:
        """Fail clearly instead of letting adbutils spawn an adb server of its own."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 3.0)
        except (OSError, TimeoutError) as exc:
            self._connected = False
            raise VendorUnavailable(
                f"cannot reach the adb server at {self.host}:{self.port} ({exc}); start it with `adb start-server`"
            ) from None
        writer.close()

    async def list_devices(self, *, timeout_s: float | None = None) -> list[DeviceInfo]:
        infos = await self._call("devices", lambda: self._client.list(extended=True), timeout_s)
        devices = []
        for info in infos:
            if not is_serial(info.serial):
                log.warning("adb listed a device with an unusable serial", serial=f"{info.serial!r:.80}")
                continue
            mode = DeviceMode.WIFI if is_wifi_serial(info.serial) else DeviceMode.USB
            devices.append(DeviceInfo(
                serial=info.serial, status="online" if info.state == "device" else info.state,
                model=info.tags.get("model", ""), name=info.tags.get("device", ""), mode=int(mode),
            ))
        return devices

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str:
        one_serial(serial)
        device = self._client.device(serial)
        limit = timeout_s or self._timeout
        output: str = await self._call("shell", lambda: device.shell(command, timeout=limit), timeout_s,
                                         serial)
        return output

    async def screenshot(self, serial: str, save_dir: Path, *, timeout_s: float | None = None) -> Path:
        one_serial(serial)
        device = self._client.device(serial)
        limit = timeout_s or self._timeout
        data: bytes = await self._call(
            "screencap", lambda: device.shell("screencap -p", timeout=limit, encoding=None), timeout_s, serial)
        if not data.startswith(_PNG):
            raise VendorProtocolError(f"adb screencap on {serial} returned {len(data)} bytes that are not a PNG")
        self._shots += 1
        path = save_dir / f"adb_{serial.replace(':', '_')}_{int(time.time() * 1000)}_{self._shots}.png"
        await asyncio.to_thread(_write, path, data)
        return path

    async def press_key(self, serial: str, key: Key) -> None:
        await self.shell(serial, f"input keyevent {_KEYCODES[key]}")

    async def start_apk(self, serial: str, package: str) -> None:
        out = await self.shell(serial, f"monkey -p {shlex.quote(package)} -c android.intent.category.LAUNCHER 1")
        if "No activities found" in out or "Error" in out:
            raise VendorFailure(f"cannot start {package}: {out.strip()}", action="startApk")

    async def stop_apk(self, serial: str, package: str) -> None:
        await self.shell(serial, f"am force-stop {shlex.quote(package)}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
