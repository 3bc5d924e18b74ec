"""Client for the vendor program's local WebSocket device-control API.

The protocol has no request id, so responses cannot be matched to requests by
content. This client therefore keeps a bounded pool of connections and uses
each one for strictly one request -> response at a time. A connection whose
request timed out or failed is closed and discarded (a late answer on it could
otherwise be read as the answer to the next request). A request either returns
the vendor's real answer or raises; nothing is queued while disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

from contracts.events import DeviceInfo
from contracts.vendor import FAILURE, Action, PushEvent, Request
from services.node.driver import DEFAULT_DRAIN_GRACE_S, DeviceBusy, Drains, Key, one_serial
from services.node.errors import InvalidRequest, NodeError
from services.node.vendor_decode import (
    Reply,
    ShapeError,
    clip_raw,
    decode_reply,
    device_entries,
    device_info,
    shell_text,
)

log = structlog.get_logger(__name__)

__all__ = [
    "VendorClient", "VendorError", "VendorFailure", "VendorProtocolError", "VendorTimeout",
    "VendorUnavailable",
]

_PUSH_OF_KEY = {Key.HOME: PushEvent.HOME, Key.BACK: PushEvent.BACK, Key.RECENTS: PushEvent.RECENTS}


class VendorError(NodeError):
    """Base class of device-driver errors (vendor program or adb); ``code`` is machine-readable."""

    code: str = "vendor_error"


class VendorFailure(VendorError):
    """The vendor refused the request (10001, or another failure code in ``vendor_code``).

    ``licence`` is True when the program's licence is not activated.
    """

    code = "vendor_10001"

    def __init__(self, message: str, *, action: str | None = None, vendor_code: int | None = FAILURE,
                 licence: bool = False) -> None:
        super().__init__(message)
        self.action = action
        self.vendor_code = vendor_code
        self.licence = licence
        if vendor_code not in (None, FAILURE):
            self.code = f"vendor_{vendor_code}"


class VendorTimeout(VendorError):
    """No answer within the timeout (the connection was discarded)."""

    code = "vendor_timeout"
    retryable = True


class VendorUnavailable(VendorError):
    """Cannot connect to the vendor program, or the connection dropped mid-request."""

    code = "vendor_unavailable"
    retryable = True


class VendorProtocolError(VendorError):
    """The vendor answered something this client does not understand; ``raw`` is the answer (truncated)."""

    code = "vendor_protocol_error"

    def __init__(self, message: str, *, action: str | None = None, raw: str = "") -> None:
        super().__init__(message)
        self.action = action
        self.raw = raw


class VendorClient:
    """Pool of strictly sequential WebSocket connections to the vendor program."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 20,
        request_timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 30.0,
        screenshot_wait_s: float = 10.0,
        ping_interval_s: float | None = 20.0,
        connect_retry: bool = False,
        drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        self.url = url
        self.pool_size = pool_size
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.screenshot_wait_s = screenshot_wait_s
        self.ping_interval_s = ping_interval_s
        # When True, a request that cannot connect keeps retrying (backoff_base_s doubling to
        # backoff_max_s, shared by the whole pool) until its own timeout runs out. Nothing has
        # been sent when a connect fails, so retrying it is safe; a request whose connection
        # dropped after sending is never retried.
        self.connect_retry = connect_retry
        self._backoff_s = backoff_base_s
        self._slots = asyncio.Semaphore(pool_size)
        # A device whose request was abandoned (timeout, cancel) stays busy until the old request answers on
        # its connection, kept open for that, or the grace passes; the connection keeps its pool slot meanwhile.
        self.drains = Drains(drain_grace_s)
        self._idle: list[ClientConnection] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._connected = False
        self.connections_opened = 0
        self.consecutive_failures = 0
        """Failed connects/requests since the last success (reset by any answer)."""
        self.seen: Counter[str] = Counter()
        """What was tolerated, as ``"<action>:<variant>"`` -> answers (docs/vendor.md)."""
        self._logged: set[tuple[str, str]] = set()
        # Whether the per-request debug line is wanted, decided once (logging is configured before clients).
        enabled = getattr(log.bind(), "is_enabled_for", None)
        self._debug: bool = enabled is None or bool(enabled(logging.DEBUG))

    # -------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        """True when the last connect or request got through to the vendor."""
        return self._connected

    async def close(self) -> None:
        self._closed = True
        await self.drains.close()
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._connected = False

    async def __aenter__(self) -> VendorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------- pool

    def _unavailable_message(self, exc: BaseException) -> str:
        detail = str(exc) or type(exc).__name__
        return (
            f"cannot connect to the vendor program at {self.url} ({detail}); is it running, "
            "and is its WebSocket API enabled in its config (it is off by default)?"
        )

    def _mark_failure(self) -> None:
        self._connected = False
        self.consecutive_failures += 1

    def _mark_success(self) -> None:
        self._connected = True
        self.consecutive_failures = 0
        self._backoff_s = self.backoff_base_s

    async def _open_retrying(self, action: str, deadline: float) -> ClientConnection:
        """Open a connection; with `connect_retry`, back off and retry until `deadline` (monotonic)."""
        while True:
            try:
                return await self._open()
            except VendorUnavailable as exc:
                delay = self._backoff_s
                remaining = deadline - time.monotonic()
                if not self.connect_retry or delay >= remaining:
                    log.warning("vendor unavailable", action=action, error=exc.message)
                    raise
                self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
                log.warning("vendor unavailable, retrying", action=action, url=self.url,
                            retry_in_s=delay, error=exc.message)
                await asyncio.sleep(delay)

    async def _open(self) -> ClientConnection:
        if self._closed:
            raise VendorUnavailable("vendor client is closed")
        try:
            conn = await connect(
                self.url,
                open_timeout=self.connect_timeout_s,
                close_timeout=2.0,
                ping_interval=self.ping_interval_s,
                max_size=16 * 1024 * 1024,
                compression=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._mark_failure()
            raise VendorUnavailable(self._unavailable_message(exc)) from exc
        self.connections_opened += 1
        self._mark_success()
        return conn

    def _take_idle(self) -> ClientConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.state is State.OPEN:
                return conn
            self._discard(conn)
        return None

    def _release(self, conn: ClientConnection) -> None:
        if self._closed or conn.state is not State.OPEN:
            self._discard(conn)
        else:
            self._idle.append(conn)

    def _discard(self, conn: ClientConnection) -> None:
        """Close ``conn`` in the background (never reused)."""

        async def _close() -> None:
            with contextlib.suppress(Exception):
                await conn.close()

        task = asyncio.get_running_loop().create_task(_close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ---------------------------------------------------------------- request

    async def request(
        self,
        action: str,
        serial: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Reply:
        """Send one request and return the normalised successful answer.

        Raises VendorFailure (10001 or another failure code), VendorTimeout,
        VendorUnavailable or VendorProtocolError; InvalidRequest (a ValueError) for
        an empty action or a serial that is not exactly one device.
        """
        if not action:
            raise InvalidRequest("action must not be empty")
        devices = None if serial is None else one_serial(serial)
        payload = msgspec.json.encode(Request(action=action, devices=devices, data=data))  # UTF-8: a text frame
        timeout = self.request_timeout_s if timeout_s is None else timeout_s

        if devices is not None and self.drains.is_draining(devices):
            try:
                timeout -= await self.drains.wait(devices, timeout)
            except DeviceBusy as exc:
                raise VendorTimeout(f"vendor action {action!r}: {exc}") from None
        await self._slots.acquire()
        lease = [True]  # the slot is still this request's (a drain takes it over with the connection)
        try:
            raw = await self._exchange(payload, action, timeout, devices, lease)
        finally:
            if lease[0]:
                self._slots.release()
        return self._parse(raw, action)

    def _drain(self, conn: ClientConnection, serial: str, lease: list[bool]) -> None:
        """Keep `conn` (and its pool slot) until the abandoned request answers on it or the grace passes."""
        lease[0] = False

        def cleanup() -> None:
            self._discard(conn)
            self._slots.release()

        self.drains.start(serial, conn.recv(), cleanup)
    async def _exchange(self, payload: bytes, action: str, limit_s: float, serial: str | None = None,
                        lease: list[bool] | None = None) -> str | bytes:
        started = time.monotonic()
        for attempt in (1, 2):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._open_retrying(action, started + limit_s)
            try:
                await conn.send(payload, text=True)  # JSON text; sent as is, not decoded and encoded again
            except ConnectionClosed as exc:
                self._discard(conn)
                # Nothing reached the vendor: safe to retry once on a fresh connection
                # when a pooled connection turned out to be dead.
                if reused and attempt == 1:
                    continue
                self._mark_failure()
                raise VendorUnavailable(
                    f"connection to the vendor program at {self.url} closed: {exc}"
                ) from exc
            except BaseException:
                self._discard(conn)
                raise
            try:
                async with asyncio.timeout(max(0.0, started + limit_s - time.monotonic())):
                    raw = await conn.recv()
            except TimeoutError:
                if serial is not None and lease is not None:
                    self._drain(conn, serial, lease)  # the phone may still be executing it
                else:
                    self._discard(conn)
                self._mark_failure()
                log.warning("vendor request timed out", action=action, timeout_s=limit_s)
                raise VendorTimeout(
                    f"vendor action {action!r} got no answer within {limit_s:g} s"
                ) from None
            except ConnectionClosed as exc:
                self._discard(conn)
                self._mark_failure()
                log.warning("vendor connection dropped", action=action, url=self.url)
                raise VendorUnavailable(
                    f"connection to the vendor program at {self.url} dropped before it "
                    f"answered {action!r}: {exc}"
                ) from exc
            except BaseException:
                # Cancelled mid-request: the answer may still come, so the connection
                # cannot be reused, and the device is busy until it comes (or the grace passes).
                if serial is not None and lease is not None and not self._closed:
                    self._drain(conn, serial, lease)
                else:
                    self._discard(conn)
                raise
            self._release(conn)
            self._mark_success()
            if self._debug:  # per request: the module's lazy logger would bind a logger even to drop the line
                log.debug("vendor request", action=action, duration_ms=round((time.monotonic() - started) * 1000, 1))
            return raw
        raise AssertionError("unreachable")  # pragma: no cover

    def _tolerated(self, action: str, variants: frozenset[Any]) -> None:
        for variant in variants:
            self.seen[f"{action}:{variant}"] += 1
            if (action, str(variant)) not in self._logged:
                self._logged.add((action, str(variant)))
                log.info("vendor answer differs from the documented shape; tolerated",
                         action=action, variant=str(variant))

    def _protocol_error(self, action: str, exc: ShapeError, serial: str | None = None) -> VendorProtocolError:
        raw = clip_raw(exc.raw)
        if (action, exc.reason) not in self._logged:  # once per shape, not once per device or request
            self._logged.add((action, exc.reason))
            log.warning("vendor answer has an unknown shape", action=action, reason=exc.reason, raw=raw,
                        device_serial=serial)
        return VendorProtocolError(f"vendor answer to {action!r} has an unknown shape ({exc.reason}): {raw}",
                                   action=action, raw=raw)

    def _parse(self, raw: str | bytes, action: str) -> Reply:
        try:
            reply = decode_reply(raw)
        except ShapeError as exc:
            raise self._protocol_error(action, exc) from None
        self._tolerated(action, reply.variants)
        if reply.ok:
            return reply
        err = VendorFailure(reply.message or f"vendor reported failure (code {reply.code})", action=action,
                            vendor_code=reply.code, licence=reply.licence)
        if err.licence:
            log.error("vendor program licence not activated", action=action)
        else:
            log.info("vendor request failed", action=action, message=reply.message, vendor_code=reply.code)
        raise err

    # ---------------------------------------------------------------- helpers

    async def list_devices(self, *, timeout_s: float | None = None) -> list[DeviceInfo]:
        """Devices as doai sees them. An empty list may mean the program is restarting."""
        reply = await self.request(Action.LIST, timeout_s=timeout_s)
        try:
            entries, variants = device_entries(reply.data)
        except ShapeError as exc:
            raise self._protocol_error(Action.LIST, exc) from None
        self._tolerated(Action.LIST, variants)
        devices = []
        for entry in entries:
            info = device_info(entry)
            if info is None:
                self._protocol_error(Action.LIST, ShapeError("a listed device has no usable serial", entry))
                continue
            devices.append(info)
        return devices

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str:
        """Run ``adb shell command`` on one device and return its stdout.

        ``command`` goes to a shell as is: quote anything that came from outside
        (``shlex.quote``).
        """
        reply = await self.request(Action.ADB_SHELL, serial, {"command": command}, timeout_s=timeout_s)
        try:
            text, variants = shell_text(reply.data, serial)
        except ShapeError as exc:
            raise self._protocol_error(Action.ADB_SHELL, exc, serial) from None
        self._tolerated(Action.ADB_SHELL, variants)
        return text

    async def screenshot(
        self, serial: str, save_dir: Path, *, timeout_s: float | None = None
    ) -> Path:
        """Take a screenshot into ``save_dir`` (dedicated to this device) and return the new file.

        The answer carries no reliable file name, and the program may write the
        file after it answers, or into a subfolder. So every ``*.png`` under
        ``save_dir`` is noted before, and afterwards the first new one whose
        writing has finished is returned: it ends with the PNG trailer, or (for
        a file that never will) its size stayed the same for ``STABLE_S``. Gives up after ``screenshot_wait_s``.
        """
        save_dir = Path(save_dir)
        one_serial(serial)
        before = await asyncio.to_thread(png_files, save_dir, True)
        reply = await self.request(
            Action.SCREEN, serial, {"savePath": str(save_dir)}, timeout_s=timeout_s
        )
        named = reply.data if isinstance(reply.data, str) and reply.data.lower().endswith(".png") else None
        found = await wait_for_new_png(save_dir, before, self.screenshot_wait_s, named=named)
        if found is None:
            raise VendorProtocolError(
                f"screen succeeded but no new complete PNG appeared under {save_dir} for {serial} "
                f"within {self.screenshot_wait_s:g} s (answer: {clip_raw(reply.data)})",
                action=Action.SCREEN, raw=clip_raw(reply.data),
            )
        return found

    async def press_key(self, serial: str, key: Key) -> None:
        """Home, back or recent apps through the program's ``pushEvent``."""
        await self.request(Action.PUSH_EVENT, serial, {"type": str(int(_PUSH_OF_KEY[key]))})

    async def start_apk(self, serial: str, package: str) -> None:
        await self.request(Action.START_APK, serial, {"apk": package})

    async def stop_apk(self, serial: str, package: str) -> None:
        await self.request(Action.STOP_APK, serial, {"apk": package})


STABLE_S = 1.0
"""A new screenshot that does not end with the PNG trailer counts as written once its size has not
changed for this long (a PNG that ends with the trailer is complete at once)."""
_POLL_S = 0.05
_PNG_TRAILER = b"IEND\xaeB`\x82"


def png_files(folder: Path, create: bool) -> dict[Path, int]:
    """Every ``*.png`` under ``folder`` (subfolders too) with its size."""
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    found: dict[Path, int] = {}
    folders = [str(folder)]
    while folders:  # os.scandir, not Path.rglob: this runs for every screenshot, hundreds at once per node
        with contextlib.suppress(OSError), os.scandir(folders.pop()) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() == ".png" and entry.is_file():
                        # os.stat, not entry.stat(): on Windows the latter is the listing's cached size, which
                        # lags for a file still open for writing (wait_for_new_png judges completeness by it).
                        found[Path(entry.path)] = os.stat(entry.path).st_size
    return found


def _complete_png(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(-len(_PNG_TRAILER), 2)
            return f.read() == _PNG_TRAILER
    except OSError:
        return False


async def wait_for_new_png(folder: Path, before: dict[Path, int], wait_s: float, *,
                           named: str | None = None) -> Path | None:
    """The first new, completely written ``*.png`` under ``folder`` (or at ``named``), within ``wait_s``."""
    deadline = time.monotonic() + wait_s
    seen: dict[Path, tuple[int, float]] = {}  # path -> (size, since when that size)

    def scan() -> Path | None:
        files = png_files(folder, False)
        if named is not None:
            with contextlib.suppress(OSError):
                target = Path(named)
                if target.is_file():
                    files[target] = target.stat().st_size
        now = time.monotonic()
        new = sorted((p for p in files if p not in before), key=lambda p: p.name)
        for path in new:
            size = files[path]
            if size > 0 and _complete_png(path):
                return path
            last = seen.get(path)
            if last is None or last[0] != size:
                seen[path] = (size, now)
            elif size > 0 and now - last[1] >= STABLE_S:
                return path
        return None

    while True:
        found = await asyncio.to_thread(scan)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(_POLL_S)
