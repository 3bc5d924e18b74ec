"""WebSocket server speaking the vendor device-control protocol (see vendor-protocol.md).

Envelope: request ``{"action", "devices", "data"}`` (action case-insensitive, no
request id), response ``{"code": 10000|10001, "message": ..., "data": ...}``.

Behaviour worth knowing when writing tests against it:

* Requests on one connection are handled strictly one after another, in arrival
  order (like the real program). A reader task counts requests received while
  an earlier one on the same connection is still unanswered;
  ``max_in_flight_per_connection`` is the maximum seen, so a client that never
  pipelines keeps it at 1.
* Latency (``latency_ms[action]`` or ``default_latency_ms``) is slept before
  any fault injection or answer. Then, in order: ``drop_rate`` (the TCP
  connection is aborted, no answer), ``hang_rate`` and ``hang_device`` (never
  answered; because handling is sequential, later requests on that connection
  are never answered either), licence inactive (10001 ``请激活会员后使用``),
  ``failure_rate`` (10001 ``simulated failure``), then the action itself.
* ``restart(down_s)`` aborts every connection, closes the listening socket (so
  connects are refused) for ``down_s`` seconds, listens again on the same port,
  and then answers ``list`` with ``[]`` for ``empty_list_s`` seconds (default
  ``SimulatorConfig.restart_empty_list_s``); other actions work normally during
  that window. ``restart`` returns once the server listens again.
* ``calls`` records ``(action.lower(), devices)`` for every well-formed request
  as received (``devices`` as sent, e.g. ``"all"`` or ``"a,b"``; non-string
  values are recorded as their JSON text). Malformed requests are recorded as
  ``("<malformed>", None)``.
* ``devices`` may be one serial (``onlySerial`` or the ``serial`` field), a
  Wi-Fi phone's ``IP:PORT``, a comma-separated list, or ``"all"`` (every online
  device), as the real program accepts; an unknown or offline serial in it
  answers 10001. ``wifi_devices`` of the fleet are attached over Wi-Fi: their
  serial is ``IP:5555`` (mode 1).
* ``screen`` writes into ``savePath`` (a folder), or exactly the file when
  ``savePath`` ends in ``.png``, or into ``screen_default_dir`` without one.
* ``hang_blocks_connection`` (default True): a hung request blocks the rest of
  its connection, as a strictly sequential program would; False lets later
  requests on that connection be answered.
* ``deviations`` makes the simulator answer like a program that differs from
  the documentation: every ``contracts.vendor.Variant`` (response shapes) and
  the names in ``BEHAVIOUR_DEVIATIONS`` (docs/vendor.md lists them all).
* Actions doai does not send but the program offers (``uninstallApk``,
  ``apkList``, ``imeList``, ``writeClipBoard``, ``updateDevices``,
  ``actionCreate``, ``autojsCreate``, ``autojsTasks``, ``autojsRemove``) are
  answered plausibly; ``xiaowei.adb`` (and any other unknown name) gets the
  program's ``invalid action`` failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import random
import re
import shlex
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from contracts.ids import is_serial
from contracts.vendor import (
    FAILURE,
    LICENCE_MESSAGE,
    SUCCESS,
    UNKNOWN_ACTION_MESSAGE,
    WIFI_ADB_PORT,
    DeviceMode,
    Response,
    Variant,
)

from .device import MODELS, SimDevice

log = structlog.get_logger(__name__)

__all__ = ["FAILURE", "LICENCE_MESSAGE", "SUCCESS", "Simulator", "SimulatorConfig", "run_simulator"]

BEHAVIOUR_DEVIATIONS: dict[str, str] = {
    "single_connection": "a second connection is closed at once (only one client at a time)",
    "concurrent": "requests on one connection are handled at once and answered as each finishes",
    "screen_subfolder": "screenshots go into a dated subfolder of savePath",
    "screen_late": "the screenshot file is written after the answer, slowly",
    "screen_needs_savepath": "screen without savePath fails",
}
DEVIATIONS: frozenset[str] = frozenset({*(v.value for v in Variant), *BEHAVIOUR_DEVIATIONS})
OTHER_FAILURE_CODE = 10002
"""The failure code answered under the ``code_other`` deviation."""

DEFAULT_LATENCY_MS: dict[str, float] = {"screen": 20.0}
"""Per-action latency defaults (lowercase action names); the rest use ``default_latency_ms``.
Real screenshots take about a second; tests want them fast."""


@dataclass
class SimulatorConfig:
    devices: int = 10
    serial_prefix: str = "SIM"
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port (read it back from ``Simulator.port``)."""
    latency_ms: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LATENCY_MS))
    default_latency_ms: float = 5.0
    failure_rate: float = 0.0
    hang_rate: float = 0.0
    drop_rate: float = 0.0
    licence_active: bool = True
    seed: int | None = None
    restart_empty_list_s: float = 2.0
    """After ``restart``, ``list`` answers ``[]`` for this long."""
    wifi_devices: int = 0
    """How many of ``devices`` (the last ones) are attached over Wi-Fi (serial ``IP:5555``)."""
    screen_default_dir: Path | None = None
    """Where ``screen`` without ``savePath`` writes (the real program: ``D:\\Pictures``);
    None: ``doai-sim-pictures`` in the system temp folder."""
    hang_blocks_connection: bool = True
    deviations: frozenset[str] = frozenset()
    """Ways to differ from the documentation (``DEVIATIONS``)."""
    screen_late_ms: float = 300.0
    """Under ``screen_late``: how long after the answer the file is complete."""

    def __post_init__(self) -> None:
        unknown = set(self.deviations) - DEVIATIONS
        if unknown:
            raise ValueError(f"unknown deviation(s) {sorted(unknown)}; known: {sorted(DEVIATIONS)}")
        self.deviations = frozenset(self.deviations)
        if not 0 <= self.wifi_devices <= self.devices:
            raise ValueError(f"wifi_devices must be between 0 and devices ({self.devices})")


class _Fail(Exception):
    """Abort the current action with a 10001 answer carrying ``message``."""


class _Hang:
    pass


class _Drop:
    pass


_HANG = _Hang()


@dataclass
class TimedCall:
    """One request as the simulator handled it: when it arrived and when it ended (answered, dropped, or
    given up because its connection went away while it hung or was still running)."""

    action: str
    devices: str | None
    started: float
    ended: float | None = None


_current_call: contextvars.ContextVar[TimedCall | None] = contextvars.ContextVar("_current_call", default=None)
_DROP = _Drop()

Outcome = Response | _Hang | _Drop
Handler = Callable[[Any, dict[str, Any]], Awaitable[Any]]


def _ok(data: Any = None) -> Response:
    return Response(code=SUCCESS, message="SUCCESS", data=data)


def _fail(message: str) -> Response:
    return Response(code=FAILURE, message=message, data=None)


_LIST_DATA = frozenset({"actioncreate", "autojscreate"})


@dataclass
class _ConnState:
    in_flight: int = 0


class Simulator:
    """The simulated vendor program and its fleet of phones."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._rng = random.Random(self.config.seed)
        self.devices: dict[str, SimDevice] = {}
        now_ms = int(time.time() * 1000)
        first_wifi = self.config.devices - self.config.wifi_devices + 1
        for i in range(1, self.config.devices + 1):
            ip = f"10.0.{i // 250}.{i % 250 + 1}"
            wifi = i >= first_wifi
            serial = f"{ip}:{WIFI_ADB_PORT}" if wifi else f"{self.config.serial_prefix}{i:04d}"
            if not is_serial(serial):
                raise ValueError(f"serial {serial!r} is not a valid device serial")
            model, name, width, height, release, sdk = MODELS[(i - 1) % len(MODELS)]
            self.devices[serial] = SimDevice(
                serial=serial,
                only_serial=serial,
                mode=int(DeviceMode.WIFI if wifi else DeviceMode.USB),
                model=model,
                name=f"{name} #{i}",
                width=width,
                height=height,
                android_release=release,
                sdk=sdk,
                intranet_ip=ip,
                connect_time=now_ms - self._rng.randint(60_000, 86_400_000),
                sort=i - 1,
                battery_level=self._rng.randint(20, 100),
            )
        # Other names a device answers to: its `serial` field and its intranet IP:PORT.
        self._aliases: dict[str, SimDevice] = {
            **{f"{d.intranet_ip}:{WIFI_ADB_PORT}": d for d in self.devices.values()},
            **{d.serial: d for d in self.devices.values()},
        }
        self._server: Server | None = None
        self._port = self.config.port
        self._connections: set[ServerConnection] = set()
        self._hung: set[str] = set()
        self._empty_list_until = 0.0
        self._screenshot_seq = 0
        self._late_writes: set[asyncio.Task[None]] = set()
        self.autojs_tasks: list[dict[str, Any]] = []
        self.action_tasks: list[dict[str, Any]] = []
        self.refused_connections = 0
        self._actions: dict[str, Handler] = {
            "list": self._a_list,
            "adb_shell": self._a_adb_shell,
            "adb": self._a_adb,
            "screen": self._a_screen,
            "pointerevent": self._a_pointer_event,
            "pushevent": self._a_push_event,
            "startapk": self._a_start_apk,
            "stopapk": self._a_stop_apk,
            "installapk": self._a_install_apk,
            "inputtext": self._a_input_text,
            "selectime": self._a_select_ime,
            "pullfile": self._a_pull_file,
            "uninstallapk": self._a_uninstall_apk,
            "apklist": self._a_apk_list,
            "imelist": self._a_ime_list,
            "writeclipboard": self._a_write_clipboard,
            "updatedevices": self._a_update_devices,
            "actioncreate": self._a_action_create,
            "autojscreate": self._a_autojs_create,
            "autojstasks": self._a_autojs_tasks,
            "autojsremove": self._a_autojs_remove,
        }
        # counters for tests
        self.requests_total = 0
        self.responses_total = 0
        self.action_counts: Counter[str] = Counter()
        self.max_in_flight_per_connection = 0
        self.calls: list[tuple[str, str | None]] = []
        self.timeline: list[TimedCall] = []  # every well-formed request with its start and end (time.monotonic)
        self.connections_total = 0
        self.dropped_total = 0
        self.hung_total = 0
        self.restarts = 0

    # -------------------------------------------------------------- lifecycle

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await serve(
            self._handle,
            self.config.host,
            self._port,
            close_timeout=1.0,
            max_size=16 * 1024 * 1024,
        )
        sock = next(iter(self._server.sockets))
        self._port = int(sock.getsockname()[1])
        log.debug("simulator listening", url=self.url)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close(close_connections=False)
        for ws in list(self._connections):
            ws.transport.abort()
        await server.wait_closed()

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------- fault toggles

    def set_device_status(self, serial: str, status: str) -> None:
        if status not in {"online", "offline"}:
            raise ValueError(f"status must be 'online' or 'offline', not {status!r}")
        self.devices[serial].status = status

    def hang_device(self, serial: str, on: bool = True) -> None:
        if serial not in self.devices:
            raise KeyError(serial)
        if on:
            self._hung.add(serial)
        else:
            self._hung.discard(serial)

    def set_licence(self, active: bool) -> None:
        self.config.licence_active = active

    async def restart(self, down_s: float, *, empty_list_s: float | None = None) -> None:
        """Simulate the vendor program restarting (see module docstring)."""
        self.restarts += 1
        log.info("simulator restarting", down_s=down_s)
        await self.close()
        await asyncio.sleep(down_s)
        window = self.config.restart_empty_list_s if empty_list_s is None else empty_list_s
        self._empty_list_until = asyncio.get_running_loop().time() + window
        await self.start()
        log.info("simulator back", url=self.url, empty_list_s=window)

    # ------------------------------------------------------------- connection

    async def _handle(self, ws: ServerConnection) -> None:
        if "single_connection" in self.config.deviations and self._connections:
            self.refused_connections += 1
            await ws.close(1013, "only one connection at a time")
            return
        self._connections.add(ws)
        self.connections_total += 1
        state = _ConnState()
        queue: asyncio.Queue[str | bytes] = asyncio.Queue()
        worker = asyncio.create_task(self._worker(ws, queue, state))
        try:
            async for message in ws:
                state.in_flight += 1
                if state.in_flight > self.max_in_flight_per_connection:
                    self.max_in_flight_per_connection = state.in_flight
                queue.put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            self._connections.discard(ws)

    async def _worker(
        self, ws: ServerConnection, queue: asyncio.Queue[str | bytes], state: _ConnState
    ) -> None:
        concurrent: set[asyncio.Task[bool]] = set()
        try:
            while True:
                raw = await queue.get()
                if "concurrent" in self.config.deviations:
                    task = asyncio.create_task(self._answer(ws, raw, state))
                    concurrent.add(task)
                    task.add_done_callback(concurrent.discard)
                elif not await self._answer(ws, raw, state):
                    return
        finally:
            for task in concurrent:
                task.cancel()

    async def _answer(self, ws: ServerConnection, raw: str | bytes, state: _ConnState) -> bool:
        """Handle one request; False when the connection is finished (dropped or blocked by a hang)."""
        _current_call.set(None)
        try:
            return await self._answer_timed(ws, raw, state)
        finally:
            timed = _current_call.get()
            if timed is not None and timed.ended is None:
                timed.ended = time.monotonic()

    async def _answer_timed(self, ws: ServerConnection, raw: str | bytes, state: _ConnState) -> bool:
        action, outcome = await self._process(raw)
        if isinstance(outcome, _Drop):
            self.dropped_total += 1
            log.debug("simulator dropping connection")
            ws.transport.abort()
            return False
        if isinstance(outcome, _Hang):
            self.hung_total += 1
            log.debug("simulator hanging request", blocks_connection=self.config.hang_blocks_connection)
            if self.config.hang_blocks_connection:
                await asyncio.Event().wait()  # until the connection goes away
            return False if self.config.hang_blocks_connection else True
        try:
            await ws.send(json.dumps(self._shape(action, outcome), ensure_ascii=False))
        except ConnectionClosed:
            return False
        self.responses_total += 1
        state.in_flight -= 1
        return True

    def _shape(self, action: str, resp: Response) -> dict[str, Any]:
        """The answer as sent: documented, or with the configured response ``deviations``."""
        dev = self.config.deviations
        if not dev:
            return {"code": resp.code, "message": resp.message, "data": resp.data}
        data = resp.data
        ok = resp.code == SUCCESS
        if ok and action == "adb_shell" and isinstance(data, dict) and len(data) == 1:
            (text,) = data.values()
            if Variant.SHELL_NULL in dev and text == "":
                data = None
            elif Variant.SHELL_STRING in dev:
                data = text
        if ok and action == "list" and Variant.LIST_KEYED in dev and isinstance(data, list):
            data = {entry["onlySerial"]: entry for entry in data}
        if ok and Variant.DATA_RESULT in dev:
            data = {"result": data}
        code: Any = resp.code
        if ok and Variant.CODE_ZERO in dev:
            code = 0
        if not ok and Variant.CODE_OTHER in dev and resp.message != LICENCE_MESSAGE:
            code = OTHER_FAILURE_CODE
        if Variant.CODE_STRING in dev:
            code = str(code)
        out: dict[str, Any] = {"code": code}
        if ok and Variant.NO_CODE in dev:
            del out["code"]
        out["msg" if Variant.MSG_FIELD in dev else "message"] = resp.message
        out["data"] = data
        return out

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    async def _process(self, raw: str | bytes) -> tuple[str, Outcome]:
        self.requests_total += 1
        try:
            req = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self.calls.append(("<malformed>", None))
            return "", _fail(f"invalid JSON: {exc}")
        if not isinstance(req, dict) or not isinstance(req.get("action"), str):
            self.calls.append(("<malformed>", None))
            return "", _fail("request must be an object with a string 'action'")
        action_raw: str = req["action"]
        action = action_raw.lower()
        devices = req.get("devices")
        recorded = devices if devices is None or isinstance(devices, str) else json.dumps(devices)
        self.calls.append((action, recorded))
        self.action_counts[action] += 1
        timed = TimedCall(action, recorded, time.monotonic())
        self.timeline.append(timed)
        _current_call.set(timed)

        cfg = self.config
        latency = cfg.latency_ms.get(action, cfg.default_latency_ms)
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        if self._roll(cfg.drop_rate):
            return action, _DROP
        if self._roll(cfg.hang_rate):
            return action, _HANG
        if self._hung and isinstance(devices, str):
            wanted = {s.strip() for s in devices.split(",")}
            if devices.strip().lower() == "all" or wanted & self._hung:
                return action, _HANG
        if not cfg.licence_active:
            return action, _fail(LICENCE_MESSAGE)
        if self._roll(cfg.failure_rate):
            return action, _fail("simulated failure")
        handler = self._actions.get(action)
        if handler is None:
            return action, _fail(f"{UNKNOWN_ACTION_MESSAGE}: {action_raw}")
        data = req.get("data")
        if isinstance(data, str):
            with contextlib.suppress(ValueError):
                data = json.loads(data)
        if data is None:
            data = {}
        if action in _LIST_DATA and isinstance(data, list):
            data = {"items": data}  # actionCreate / autojsCreate take an array of task objects
        if not isinstance(data, dict):
            return action, _fail("data must be an object")
        try:
            return action, _ok(await handler(devices, data))
        except _Fail as exc:
            return action, _fail(str(exc))

    # ---------------------------------------------------------------- helpers

    def _resolve(self, devices: Any) -> list[tuple[str, SimDevice]]:
        """Targets of a device action as (key as requested, device)."""
        if not isinstance(devices, str) or not devices.strip():
            raise _Fail("devices is required")
        if devices.strip().lower() == "all":
            targets = [(d.serial, d) for d in self.devices.values() if d.online]
            if not targets:
                raise _Fail("no online devices")
            return targets
        out: list[tuple[str, SimDevice]] = []
        for token in (t.strip() for t in devices.split(",")):
            if not token:
                continue
            dev = self.devices.get(token) or self._aliases.get(token)
            if dev is None:
                raise _Fail(f"device {token} not found")
            if not dev.online:
                raise _Fail(f"device {token} is offline")
            out.append((token, dev))
        if not out:
            raise _Fail("devices is required")
        return out

    @staticmethod
    def _str_field(data: dict[str, Any], *names: str) -> str:
        for name in names:
            value = data.get(name)
            if isinstance(value, str | int | float) and str(value) != "":
                return str(value)
        raise _Fail(f"{names[0]} is required")

    # ---------------------------------------------------------------- actions

    async def _a_list(self, devices: Any, data: dict[str, Any]) -> Any:
        if asyncio.get_running_loop().time() < self._empty_list_until:
            return []
        return [d.to_list_entry() for d in self.devices.values()]

    async def _a_adb_shell(self, devices: Any, data: dict[str, Any]) -> Any:
        command = self._str_field(data, "command")
        targets = self._resolve(devices)
        out = {key: dev.run_shell(command) for key, dev in targets}
        delay = max((dev.take_sleep() for _, dev in targets), default=0.0)
        if delay:
            await asyncio.sleep(delay)  # `sleep N` on the phone takes that long
        return out

    async def _a_adb(self, devices: Any, data: dict[str, Any]) -> Any:
        command = self._str_field(data, "command")
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise _Fail(f"bad command: {exc}") from exc
        if argv[:1] == ["adb"]:
            argv = argv[1:]
        if not argv:
            raise _Fail("command is required")
        if argv[0] == "-s" and len(argv) >= 4 and argv[2] == "shell":
            ((_, dev),) = self._resolve(argv[1])
            return dev.run_shell(shlex.join(argv[3:]))
        sub, rest = argv[0], argv[1:]
        if sub == "devices":
            lines = [f"{d.serial}\tdevice" for d in self.devices.values() if d.online]
            return "List of devices attached\n" + "".join(line + "\n" for line in lines) + "\n"
        if sub == "version":
            return "Android Debug Bridge version 1.0.41\nVersion 34.0.5-10900879\n"
        if sub in {"connect", "disconnect"} and rest:
            target = rest[0] if ":" in rest[0] else f"{rest[0]}:5555"
            known = {f"{d.intranet_ip}:5555" for d in self.devices.values()}
            if sub == "disconnect":
                return f"disconnected {target}\n"
            if target in known:
                return f"already connected to {target}\n"
            return f"failed to connect to '{target}': Connection refused\n"
        return f"adb: unknown command {sub}\n"

    async def _a_screen(self, devices: Any, data: dict[str, Any]) -> Any:
        dev_cfg = self.config.deviations
        raw_path = data.get("savePath")
        if raw_path in (None, ""):
            if "screen_needs_savepath" in dev_cfg:
                raise _Fail("savePath is required")
            folder = self.config.screen_default_dir or Path(tempfile.gettempdir()) / "doai-sim-pictures"
            file_path: Path | None = None
        else:
            target = Path(self._str_field(data, "savePath"))
            folder, file_path = (target.parent, target) if target.suffix.lower() == ".png" else (target, None)
        if "screen_subfolder" in dev_cfg:
            folder = folder / time.strftime("%Y-%m-%d")
            file_path = None if file_path is None else folder / file_path.name
        targets = self._resolve(devices)
        for _, dev in targets:
            self._screenshot_seq += 1
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", dev.only_serial)
            name = f"Screenshot_{safe}_{int(time.time() * 1000)}_{self._screenshot_seq}.png"
            path = file_path if file_path is not None and len(targets) == 1 else folder / name
            # Rendered and written off the event loop, in one thread hop (zlib lets go of the GIL): a simulator
            # hosted beside its node agent (doai up --workers) must not stall the node while hundreds of phones
            # take a screenshot at once.
            if "screen_late" in dev_cfg:
                self._write_late(path, await asyncio.to_thread(dev.render_screen))
            else:
                try:
                    await asyncio.to_thread(_render_to, dev, path)
                except OSError as exc:
                    raise _Fail(f"cannot write screenshot: {exc}") from exc
        return str(folder)

    def _write_late(self, path: Path, png: bytes) -> None:
        """Answer first, then write the file in two halves over ``screen_late_ms`` (as a slow program would)."""
        pause = self.config.screen_late_ms / 2000

        async def write() -> None:
            await asyncio.sleep(pause)
            half = len(png) // 2
            await asyncio.to_thread(_write_part, path, png[:half], "wb")
            await asyncio.sleep(pause)
            await asyncio.to_thread(_write_part, path, png[half:], "ab")

        task = asyncio.get_running_loop().create_task(write())
        self._late_writes.add(task)
        task.add_done_callback(self._late_writes.discard)

    async def _a_pointer_event(self, devices: Any, data: dict[str, Any]) -> Any:
        kind = str(data.get("type", ""))
        if kind not in {str(i) for i in range(10)}:
            raise _Fail(f"invalid pointer event type: {kind!r}")
        x = data.get("x")
        y = data.get("y")
        xs = None if x is None else str(x)
        ys = None if y is None else str(y)
        xi = yi = 0
        if kind in {"0", "1", "2", "3", "4", "5"}:
            try:
                xi, yi = int(float(xs or "")), int(float(ys or ""))
            except ValueError as exc:
                raise _Fail(f"pointer event type {kind} needs numeric x and y") from exc
        for _, dev in self._resolve(devices):
            dev.pointer_events.append((kind, xs, ys))
            if kind == "1":
                dev.taps.append((xi, yi))
                dev.screen_on = True
        return None

    async def _a_push_event(self, devices: Any, data: dict[str, Any]) -> Any:
        kind = str(data.get("type", ""))
        if kind not in {"1", "2", "3"}:
            raise _Fail(f"invalid push event type: {kind!r}")
        for _, dev in self._resolve(devices):
            if kind == "1":
                dev.show_recents()
            elif kind == "2":
                dev.go_home()
            else:
                dev.go_back()
        return None

    async def _a_start_apk(self, devices: Any, data: dict[str, Any]) -> Any:
        apk = self._str_field(data, "apk")
        targets = self._resolve(devices)
        for key, dev in targets:
            if apk not in dev.installed:
                raise _Fail(f"{apk} is not installed on {key}")
        for _, dev in targets:
            dev.open_app(apk)
        return None

    async def _a_stop_apk(self, devices: Any, data: dict[str, Any]) -> Any:
        apk = self._str_field(data, "apk")
        for _, dev in self._resolve(devices):
            dev.stop_app(apk)
        return None

    async def _a_install_apk(self, devices: Any, data: dict[str, Any]) -> Any:
        path = self._str_field(data, "path")
        targets = self._resolve(devices)
        if not await asyncio.to_thread(os.path.isfile, path):
            raise _Fail(f"file not found: {path}")
        package = str(data.get("package") or Path(path).stem)
        for _, dev in targets:
            dev.installed.add(package)
        return None

    async def _a_input_text(self, devices: Any, data: dict[str, Any]) -> Any:
        """Types through the program's input method (``selectIme`` first); ``\\n`` is a line break."""
        text = data.get("text")
        if not isinstance(text, str) or not text:
            raise _Fail("text is required")
        text = text.replace("\\n", "\n")
        targets = self._resolve(devices)
        for key, dev in targets:
            if not dev.ime_selected:
                raise _Fail(f"input method not selected on {key}: call selectIme first")
        for _, dev in targets:
            dev.typed_text += text
        return None

    async def _a_select_ime(self, devices: Any, data: dict[str, Any]) -> Any:
        for _, dev in self._resolve(devices):
            dev.ime_selected = True
        return None

    async def _a_pull_file(self, devices: Any, data: dict[str, Any]) -> Any:
        """``data``: ``remotePath`` (or ``remote``/``path``) and ``localPath``
        (or ``local``/``savePath``; an existing folder or a path ending in a separator
        receives the file under its base name). Pulls files made by ``screencap`` /
        ``uiautomator dump``."""
        remote = self._str_field(data, "remotePath", "remote", "path")
        local = self._str_field(data, "localPath", "local", "savePath")
        targets = self._resolve(devices)
        if len(targets) != 1:
            raise _Fail("pullFile needs exactly one device")
        key, dev = targets[0]
        content = dev.files.get(remote)
        if content is None:
            raise _Fail(f"remote file not found on {key}: {remote}")
        dest = Path(local)
        if local.endswith(("/", os.sep)) or await asyncio.to_thread(dest.is_dir):
            dest = dest / Path(remote).name
        try:
            await asyncio.to_thread(_write_atomic, dest, content)
        except OSError as exc:
            raise _Fail(f"cannot write {dest}: {exc}") from exc
        return str(dest)


    # ---------------------------------------------- actions doai does not send

    async def _a_uninstall_apk(self, devices: Any, data: dict[str, Any]) -> Any:
        """Without ``apk`` the program answers success and changes nothing (seen on the real one)."""
        apk = data.get("apk")
        targets = self._resolve(devices)
        if isinstance(apk, str) and apk:
            for _, dev in targets:
                dev.installed.discard(apk)
                dev.stop_app(apk)
        return None

    async def _a_apk_list(self, devices: Any, data: dict[str, Any]) -> Any:
        return {key: sorted(dev.installed) for key, dev in self._resolve(devices)}

    async def _a_ime_list(self, devices: Any, data: dict[str, Any]) -> Any:
        return {key: list(IMES) for key, _ in self._resolve(devices)}

    async def _a_write_clipboard(self, devices: Any, data: dict[str, Any]) -> Any:
        text = data.get("text", data.get("content"))
        if not isinstance(text, str):
            raise _Fail("text is required")
        for _, dev in self._resolve(devices):
            dev.clipboard = text
        return None

    async def _a_update_devices(self, devices: Any, data: dict[str, Any]) -> Any:
        """Renames / re-sorts / hides devices in the program's list (``name``, ``sort``, ``hide``)."""
        changes = {k: data[k] for k in ("name", "sort", "hide") if k in data}
        if not changes:
            raise _Fail("name, sort or hide is required")
        for _, dev in self._resolve(devices):
            if isinstance(changes.get("name"), str):
                dev.name = changes["name"]
            if isinstance(changes.get("sort"), int):
                dev.sort = changes["sort"]
            if isinstance(changes.get("hide"), bool):
                dev.hide = changes["hide"]
        return None

    def _tasks(self, data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        items = data.get("items", [data] if data else [])
        if not items or not all(isinstance(i, dict) and isinstance(i.get(key), str) and i[key] for i in items):
            raise _Fail(f"{key} is required")
        return list(items)

    async def _a_action_create(self, devices: Any, data: dict[str, Any]) -> Any:
        """Starts a recorded action on the devices (the simulator only records it)."""
        items = self._tasks(data, "actionName")
        keys = [key for key, _ in self._resolve(devices)]
        self.action_tasks.extend({"name": i["actionName"], "devices": keys} for i in items)
        return None

    async def _a_autojs_create(self, devices: Any, data: dict[str, Any]) -> Any:
        """Starts an AutoJS script (``path`` on the PC) on the devices (recorded, not run)."""
        items = self._tasks(data, "path")
        keys = [key for key, _ in self._resolve(devices)]
        for item in items:
            if not await asyncio.to_thread(os.path.isfile, item["path"]):
                raise _Fail(f"file not found: {item['path']}")
        self.autojs_tasks.extend({"name": Path(i["path"]).name, "path": i["path"], "devices": keys} for i in items)
        return None

    async def _a_autojs_tasks(self, devices: Any, data: dict[str, Any]) -> Any:
        return [dict(t) for t in self.autojs_tasks]

    async def _a_autojs_remove(self, devices: Any, data: dict[str, Any]) -> Any:
        name = self._str_field(data, "name")
        keys = {key for key, _ in self._resolve(devices)}
        for task in self.autojs_tasks:
            task["devices"] = [d for d in task["devices"] if d not in keys] if task["name"] == name else task["devices"]
        self.autojs_tasks = [t for t in self.autojs_tasks if t["devices"]]
        return None


IMES: tuple[str, ...] = (
    "com.android.inputmethod.latin/.LatinIME",
    "com.google.android.inputmethod.latin/com.android.inputmethod.latin.LatinIME",
    "com.vendor.ime/.VendorInputMethod",
)
"""What ``imeList`` reports (the last is the program's own input method that ``selectIme`` picks)."""


def _write_part(path: Path, content: bytes, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode) as f:
        f.write(content)


def _render_to(dev: SimDevice, path: Path) -> None:
    _write_atomic(path, dev.render_screen())


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


async def run_simulator(config: SimulatorConfig, stop: asyncio.Event) -> None:
    """Run a simulator until ``stop`` is set."""
    async with Simulator(config) as sim:
        log.info("simulator started", url=sim.url, devices=len(sim.devices))
        await stop.wait()
    log.info("simulator stopped")
