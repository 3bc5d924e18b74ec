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
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.protocol import State

log = structlog.get_logger(__name__)

SUCCESS = 10000
FAILURE = 10001
LICENCE_MESSAGE = "请激活会员后使用"


class VendorError(Exception):
    """Base class of vendor errors; ``code`` is a short machine-readable code."""

    code: str = "vendor_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class VendorFailure(VendorError):
    """The vendor answered 10001. ``licence`` is True when the program is not activated."""

    code = "vendor_10001"

    def __init__(self, message: str, *, action: str | None = None) -> None:
        super().__init__(message)
        self.action = action
        self.licence = message.strip() == LICENCE_MESSAGE


class VendorTimeout(VendorError):
    """No answer within the timeout (the connection was discarded)."""

    code = "vendor_timeout"


class VendorUnavailable(VendorError):
    """Cannot connect to the vendor program, or the connection dropped mid-request."""

    code = "vendor_unavailable"


class VendorProtocolError(VendorError):
    """The vendor answered something that does not follow the protocol."""

    code = "vendor_protocol_error"


def check_serial(serial: str) -> str:
    """Return ``serial`` if it names exactly one device, else raise ValueError.

    doai never addresses ``all`` devices or a comma-separated list.
    """
    if not isinstance(serial, str):
        raise ValueError(f"serial must be a string, not {type(serial).__name__}")
    if not serial.strip():
        raise ValueError("serial must not be empty")
    if serial.strip().lower() == "all":
        raise ValueError("refusing to address 'all' devices: send exactly one serial")
    if "," in serial:
        raise ValueError(f"refusing a list of serials {serial!r}: send exactly one serial")
    return serial


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
        screenshot_wait_s: float = 2.0,
        ping_interval_s: float | None = 20.0,
        connect_retry: bool = False,
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
        self._idle: list[ClientConnection] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._connected = False
        self.connections_opened = 0
        self.consecutive_failures = 0
        """Failed connects/requests since the last success (reset by any answer)."""

    # -------------------------------------------------------------- lifecycle

    @property
    def connected(self) -> bool:
        """True when the last connect or request got through to the vendor."""
        return self._connected

    async def close(self) -> None:
        self._closed = True
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

    async def wait_until_available(self, stop: asyncio.Event | None = None) -> bool:
        """Retry connecting with backoff until the vendor answers; True when it does.

        Returns False if ``stop`` gets set first. The successful connection is kept
        in the pool. Backoff starts at ``backoff_base_s`` and doubles up to
        ``backoff_max_s``; every failure is logged.
        """
        delay = self.backoff_base_s
        attempt = 0
        while stop is None or not stop.is_set():
            attempt += 1
            try:
                async with self._slots:
                    conn = await self._open()
                    self._release(conn)
            except VendorUnavailable as exc:
                log.warning(
                    "vendor unavailable, retrying",
                    url=self.url,
                    attempt=attempt,
                    retry_in_s=delay,
                    error=exc.message,
                )
            else:
                if attempt > 1:
                    log.info("vendor available", url=self.url, attempts=attempt)
                return True
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, self.backoff_max_s)
        return False

    # ---------------------------------------------------------------- request

    async def request(
        self,
        action: str,
        serial: str | None = None,
        data: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request and return the response's ``data`` (code 10000).

        Raises VendorFailure (10001), VendorTimeout, VendorUnavailable or
        VendorProtocolError; ValueError for a serial that is not exactly one device.
        """
        if not action:
            raise ValueError("action must not be empty")
        envelope: dict[str, Any] = {"action": action}
        if serial is not None:
            envelope["devices"] = check_serial(serial)
        if data is not None:
            envelope["data"] = data
        payload = msgspec.json.encode(envelope).decode()
        timeout = self.request_timeout_s if timeout_s is None else timeout_s

        async with self._slots:
            raw = await self._exchange(payload, action, timeout)
        return self._parse(raw, action)

    async def _exchange(self, payload: str, action: str, limit_s: float) -> str | bytes:
        started = time.monotonic()
        for attempt in (1, 2):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._open_retrying(action, started + limit_s)
            try:
                await conn.send(payload)
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
                # cannot be reused.
                self._discard(conn)
                raise
            self._release(conn)
            self._mark_success()
            log.debug(
                "vendor request",
                action=action,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
            return raw
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse(self, raw: str | bytes, action: str) -> Any:
        try:
            resp = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise VendorProtocolError(f"vendor answered non-JSON to {action!r}: {exc}") from exc
        if not isinstance(resp, dict) or "code" not in resp:
            raise VendorProtocolError(f"vendor answer to {action!r} has no code: {resp!r:.200}")
        code = resp["code"]
        try:
            code = int(code)
        except (TypeError, ValueError):
            raise VendorProtocolError(f"vendor answered bad code {code!r} to {action!r}") from None
        if code == SUCCESS:
            return resp.get("data")
        message = str(resp.get("message") or "")
        if code == FAILURE:
            err = VendorFailure(message or "vendor reported failure", action=action)
            if err.licence:
                log.error("vendor program licence not activated", action=action)
            else:
                log.info("vendor request failed", action=action, message=message)
            raise err
        raise VendorProtocolError(f"vendor answered unknown code {code} to {action!r}: {message}")

    # ---------------------------------------------------------------- helpers

    async def list_devices(self, *, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Devices as the vendor sees them. An empty list may mean the program is restarting."""
        data = await self.request("list", timeout_s=timeout_s)
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise VendorProtocolError(f"list answered {type(data).__name__}, not a device array")
        return data

    async def shell(self, serial: str, command: str, *, timeout_s: float | None = None) -> str:
        """Run ``adb shell command`` on one device and return its stdout.

        ``command`` goes to a shell as is: quote anything that came from outside
        (``shlex.quote``).
        """
        data = await self.request("adb_shell", serial, {"command": command}, timeout_s=timeout_s)
        if isinstance(data, dict):
            if serial in data:
                value = data[serial]
            elif len(data) == 1:
                value = next(iter(data.values()))
            else:
                raise VendorProtocolError(f"adb_shell answer has no entry for {serial}")
        else:
            raise VendorProtocolError(f"adb_shell answered {type(data).__name__}, not an object")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise VendorProtocolError(f"adb_shell output for {serial} is not text")
        return value

    async def adb(self, command: str, *, timeout_s: float | None = None) -> Any:
        """Host-side adb command (e.g. ``connect IP:5555``)."""
        return await self.request("adb", None, {"command": command}, timeout_s=timeout_s)

    async def screenshot(
        self, serial: str, save_dir: Path, *, timeout_s: float | None = None
    ) -> Path:
        """Take a screenshot into ``save_dir`` (dedicated to this device) and return the new file.

        The vendor's answer carries no reliable file name, so the new ``*.png`` in
        ``save_dir`` is found by comparing the folder before and after.
        """
        save_dir = Path(save_dir)
        check_serial(serial)
        before = await asyncio.to_thread(_png_names, save_dir, True)
        await self.request(
            "screen", serial, {"savePath": str(save_dir)}, timeout_s=timeout_s
        )
        deadline = time.monotonic() + self.screenshot_wait_s
        while True:
            after = await asyncio.to_thread(_png_names, save_dir, False)
            new = after - before
            if new:
                paths = [save_dir / n for n in new]
                return max(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))
            if time.monotonic() >= deadline:
                raise VendorProtocolError(
                    f"screen succeeded but no new PNG appeared in {save_dir} for {serial}"
                )
            await asyncio.sleep(0.05)

    async def push_event(self, serial: str, type: int | str) -> None:
        """1 recent apps, 2 home, 3 back."""
        await self.request("pushEvent", serial, {"type": str(type)})

    async def pointer_event(
        self,
        serial: str,
        type: int | str,
        x: int | float | str | None = None,
        y: int | float | str | None = None,
    ) -> None:
        """0 press, 1 release, 2 move, 4/5 wheel up/down (need x, y); 6-9 swipe
        up/down/left/right (no x, y). Sent as strings on the wire."""
        data: dict[str, Any] = {"type": str(type)}
        if x is not None:
            data["x"] = str(x)
        if y is not None:
            data["y"] = str(y)
        await self.request("pointerEvent", serial, data)

    async def start_apk(self, serial: str, package: str) -> None:
        await self.request("startApk", serial, {"apk": package})

    async def stop_apk(self, serial: str, package: str) -> None:
        await self.request("stopApk", serial, {"apk": package})

    async def install_apk(self, serial: str, path: str | Path) -> None:
        await self.request("installApk", serial, {"path": str(path)})

    async def select_ime(self, serial: str) -> None:
        await self.request("selectIme", serial)

    async def input_text(self, serial: str, text: str) -> None:
        """Type ``text`` through the vendor's input method (``select_ime`` first)."""
        await self.request("inputText", serial, {"text": text})


def _png_names(folder: Path, create: bool) -> set[str]:
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        return {p.name for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file()}
    except FileNotFoundError:
        return set()
