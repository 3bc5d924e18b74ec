"""`doai vendor probe`: a non-destructive conformance check of the vendor program.

A lab operator runs it once against the real program (nothing here can run
it). It checks what doai assumes (docs/vendor.md), records every frame, and
recommends the node settings that fit what it saw. It changes nothing on the
phones: it lists, runs `echo` and `sleep 1` in a shell, and takes three
screenshots into a temporary folder (one into the program's default folder).

Each check ends `ok` (as doai expects), `tolerated` (differs from the
documentation in a way doai accepts), `deviation` (differs; doai copes with
the recommended settings), `failed` (doai cannot work this way) or `skipped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from contracts.vendor import DEFAULT_SCREEN_FOLDER, Action, Request, check_serial
from services.node.vendor_client import png_files, wait_for_new_png
from services.node.vendor_decode import Reply, ShapeError, clip_raw, decode_reply, device_entries, shell_text

Status = Literal["ok", "tolerated", "deviation", "failed", "skipped"]
FRAME_LIMIT = 4000


class Frame(msgspec.Struct):
    t_ms: float
    conn: int
    direction: Literal["sent", "received", "closed", "error"]
    text: str


class Check(msgspec.Struct):
    name: str
    status: Status
    expected: str
    seen: str
    ms: float | None = None


class Recommendation(msgspec.Struct):
    setting: str
    flag: str
    value: str
    why: str


class ProbeReport(msgspec.Struct):
    url: str
    started_at: str
    device: str | None
    ok: bool
    checks: list[Check]
    recommendations: list[Recommendation]
    variants_seen: dict[str, int]
    transcript: list[Frame]


class _Stop(Exception):
    """Nothing further can be checked (no connection, licence not activated)."""


class _Probe:
    def __init__(self, url: str, timeout_s: float, workdir: Path) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.workdir = workdir
        self.t0 = time.monotonic()
        self.frames: list[Frame] = []
        self.checks: list[Check] = []
        self.variants: dict[str, int] = {}
        self._conns = 0
        self.connections_ok: int | None = None
        self.connections_tried = 0
        self.pong: bool | None = None
        self.shot_delay_ms: float | None = None

    # ------------------------------------------------------------ plumbing

    def _frame(self, conn: int, direction: Literal["sent", "received", "closed", "error"], text: str) -> None:
        if len(text) > FRAME_LIMIT:
            text = text[:FRAME_LIMIT] + "…"
        self.frames.append(Frame(round((time.monotonic() - self.t0) * 1000, 1), conn, direction, text))

    def check(self, name: str, status: Status, expected: str, seen: str, ms: float | None = None) -> Check:
        c = Check(name, status, expected, seen, None if ms is None else round(ms, 1))
        self.checks.append(c)
        return c

    async def open(self) -> tuple[int, ClientConnection]:
        self._conns += 1
        n = self._conns
        try:
            ws = await connect(self.url, open_timeout=self.timeout_s, ping_interval=None, close_timeout=1.0,
                               max_size=16 * 1024 * 1024, compression=None)
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._frame(n, "error", f"connect failed: {exc!r}")
            raise
        return n, ws

    async def send(self, conn: tuple[int, ClientConnection], action: str, serial: str | None = None,
                   data: Any = None) -> None:
        text = msgspec.json.encode(Request(action=action, devices=serial, data=data)).decode()
        self._frame(conn[0], "sent", text)
        await conn[1].send(text)

    async def recv(self, conn: tuple[int, ClientConnection], timeout_s: float | None = None) -> str | bytes:
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                raw = await conn[1].recv()
        except ConnectionClosed as exc:
            self._frame(conn[0], "closed", f"{exc}")
            raise
        self._frame(conn[0], "received", raw if isinstance(raw, str) else raw.decode("utf-8", "replace"))
        return raw

    def decode(self, action: str, raw: str | bytes) -> Reply:
        reply = decode_reply(raw)
        self.note(action, reply.variants)
        if reply.licence:
            self.check("licence", "failed", "the program's licence is activated",
                       f"{action} answered the licence message {reply.message!r}: activate the program")
            raise _Stop
        return reply

    def note(self, action: str, variants: frozenset[Any]) -> None:
        for v in variants:
            key = f"{action}:{v}"
            self.variants[key] = self.variants.get(key, 0) + 1

    async def call(self, conn: tuple[int, ClientConnection], action: str, serial: str | None = None,
                   data: Any = None) -> tuple[Reply, float]:
        started = time.monotonic()
        await self.send(conn, action, serial, data)
        raw = await self.recv(conn)
        return self.decode(action, raw), (time.monotonic() - started) * 1000

    # --------------------------------------------------------------- checks

    async def run(self, device: str | None, max_connections: int, default_folder: Path | None) -> str | None:
        started = time.monotonic()
        try:
            conn = await self.open()
        except (OSError, TimeoutError, WebSocketException) as exc:
            self.check("connect", "failed", f"a WebSocket server at {self.url}",
                       f"cannot connect ({exc}); is the program running with its WebSocket API enabled "
                       "in its config (off by default)?")
            raise _Stop from None
        self.check("connect", "ok", "a WebSocket server", "connected", (time.monotonic() - started) * 1000)
        try:
            serial = await self._list(conn, device)
            if serial is not None:
                await self._shell(conn, serial)
                await self._screens(conn, serial, default_folder)
            await self._ping(conn)
            if serial is not None:
                await self._in_order(conn, serial)  # last on this connection: it may leave it unusable
        finally:
            with contextlib.suppress(Exception):
                await conn[1].close()
        await self._connections(max_connections)  # with no other connection of the probe open
        return serial

    def _failed_reply(self, name: str, expected: str, reply: Reply, ms: float) -> None:
        self.check(name, "failed", expected, f"code {reply.code}: {reply.message!r}", ms)

    async def _list(self, conn: tuple[int, ClientConnection], device: str | None) -> str | None:
        expected = "code 10000 and an array of devices with onlySerial and status"
        try:
            reply, ms = await self.call(conn, Action.LIST)
        except (TimeoutError, ConnectionClosed) as exc:
            self.check("list", "failed", expected, f"no answer: {exc!r}")
            raise _Stop from None
        except ShapeError as exc:
            self.check("list", "failed", expected, f"unknown shape ({exc.reason}): {clip_raw(exc.raw)}")
            return None
        if not reply.ok:
            self._failed_reply("list", expected, reply, ms)
            return None
        try:
            entries, variants = device_entries(reply.data)
        except ShapeError as exc:
            self.check("list", "failed", expected, f"unknown shape ({exc.reason}): {clip_raw(exc.raw)}", ms)
            return None
        self.note(Action.LIST, variants)
        all_variants = sorted(str(v) for v in reply.variants | variants)
        online = [str(e.get("onlySerial") or e.get("serial")) for e in entries if e.get("status") == "online"]
        summary = f"{len(entries)} devices, {len(online)} online"
        if not entries:
            self.check("list", "deviation", expected, "an empty list: no phones attached, or the program is "
                       "restarting (doai pauses its queues while the list is empty)", ms)
        elif all_variants:
            self.check("list", "tolerated", expected, f"{summary}; differs: {', '.join(all_variants)}", ms)
        else:
            self.check("list", "ok", expected, summary, ms)
        if device is not None:
            return check_serial(device)
        if not online:
            self.check("device", "skipped", "an online device for the device checks", "none online; pass --device")
            return None
        return online[0]

    async def _shell(self, conn: tuple[int, ClientConnection], serial: str) -> None:
        marker = f"doai-probe-{secrets.token_hex(4)}"
        expected = f"code 10000 and data {{{serial!r}: '{marker}\\n'}}"
        reply, ms = await self.call(conn, Action.ADB_SHELL, serial, {"command": f"echo {marker}"})
        if not reply.ok:
            self._failed_reply("adb_shell echo", expected, reply, ms)
            return
        try:
            text, variants = shell_text(reply.data, serial)
        except ShapeError as exc:
            self.check("adb_shell echo", "failed", expected, f"unknown shape ({exc.reason}): {clip_raw(exc.raw)}", ms)
            return
        self.note(Action.ADB_SHELL, variants)
        differs = sorted(str(v) for v in reply.variants | variants)
        if text.strip() != marker:
            self.check("adb_shell echo", "failed", expected, f"output {text!r:.200}", ms)
        elif differs:
            self.check("adb_shell echo", "tolerated", expected, f"output ok; differs: {', '.join(differs)}", ms)
        else:
            self.check("adb_shell echo", "ok", expected, "output ok", ms)

        name = "adb_shell without output"
        expected = f"code 10000 and data {{{serial!r}: ''}}"
        reply, ms = await self.call(conn, Action.ADB_SHELL, serial, {"command": "true"})
        if not reply.ok:
            self._failed_reply(name, expected, reply, ms)
            return
        try:
            text, variants = shell_text(reply.data, serial)
        except ShapeError as exc:
            self.check(name, "failed", expected, f"unknown shape ({exc.reason}): {clip_raw(exc.raw)}", ms)
            return
        self.note(Action.ADB_SHELL, variants)
        differs = sorted(str(v) for v in reply.variants | variants)
        if text.strip():
            self.check(name, "failed", expected, f"output {text!r:.200}", ms)
        else:
            self.check(name, "tolerated" if differs else "ok", expected,
                       "no output" + (f"; differs: {', '.join(differs)}" if differs else ""), ms)

    async def _screen(self, conn: tuple[int, ClientConnection], serial: str, data: dict[str, Any],
                      folder: Path) -> tuple[Reply, float, Path | None, float]:
        before = await asyncio.to_thread(png_files, folder, False)
        reply, ms = await self.call(conn, Action.SCREEN, serial, data)
        answered = time.monotonic()
        found = await wait_for_new_png(folder, before, self.timeout_s) if reply.ok else None
        return reply, ms, found, (time.monotonic() - answered) * 1000

    async def _screens(self, conn: tuple[int, ClientConnection], serial: str, default_folder: Path | None) -> None:
        folder = self.workdir / "folder"
        folder.mkdir(parents=True, exist_ok=True)
        name = "screen savePath folder"
        expected = "code 10000 and a new PNG in savePath"
        reply, ms, found, after = await self._screen(conn, serial, {"savePath": str(folder)}, folder)
        if found is not None:
            self.shot_delay_ms = after
        if not reply.ok:
            self._failed_reply(name, expected, reply, ms)
        elif found is None:
            self.check(name, "failed", expected, f"answered {clip_raw(reply.data)} but no new PNG appeared under "
                       f"{folder} within {self.timeout_s:g} s", ms)
        else:
            where = found.relative_to(folder)
            notes = []
            if found.parent != folder:
                notes.append(f"written into a subfolder ({where.parent})")
            if after > 250:
                notes.append(f"complete {after:.0f} ms after the answer")
            self.check(name, "tolerated" if notes else "ok", expected,
                       f"{where}" + (f"; {'; '.join(notes)}" if notes else ""), ms)

        target = self.workdir / "file" / "probe.png"
        name = "screen savePath .png"
        expected = "information only (doai sends folders): where a .png savePath ends up"
        reply, ms, found, _ = await self._screen(conn, serial, {"savePath": str(target)}, target.parent)
        if not reply.ok:
            self.check(name, "deviation", expected, f"refused: code {reply.code} {reply.message!r}", ms)
        elif found is None:
            self.check(name, "deviation", expected, "answered, but no PNG appeared", ms)
        elif found == target:
            self.check(name, "ok", expected, "writes exactly that file", ms)
        else:
            self.check(name, "ok", expected, f"treated as a folder: wrote {found.relative_to(target.parent)}", ms)

        name = "screen without savePath"
        expected = f"code 10000; the file goes to the program's default folder ({DEFAULT_SCREEN_FOLDER})"
        before = await asyncio.to_thread(png_files, default_folder, False) if default_folder else {}
        reply, ms = await self.call(conn, Action.SCREEN, serial, {})
        if not reply.ok:
            self.check(name, "deviation", expected, f"refused: code {reply.code} {reply.message!r} "
                       "(doai always sends savePath)", ms)
            return
        seen = f"answered {clip_raw(reply.data)}"
        if default_folder is not None:
            new = await wait_for_new_png(default_folder, before, self.timeout_s)
            seen += f"; new file {new}" if new else f"; no new PNG in {default_folder}"
        self.check(name, "ok", expected, seen, ms)

    async def _in_order(self, conn: tuple[int, ClientConnection], serial: str) -> None:
        name = "two requests in flight on one connection"
        expected = "answered in the order sent (doai never sends them, so this is information)"
        tag = secrets.token_hex(3)
        try:
            started = time.monotonic()
            await self.send(conn, Action.ADB_SHELL, serial, {"command": f"sleep 1; echo first-{tag}"})
            await self.send(conn, Action.ADB_SHELL, serial, {"command": f"echo second-{tag}"})
            outputs = []
            for _ in range(2):
                reply = self.decode(Action.ADB_SHELL, await self.recv(conn, self.timeout_s + 1))
                text, variants = shell_text(reply.data, serial) if reply.ok else (reply.message, frozenset())
                self.note(Action.ADB_SHELL, variants)
                outputs.append(text.strip())
            ms = (time.monotonic() - started) * 1000
            if outputs == [f"first-{tag}", f"second-{tag}"]:
                self.check(name, "ok", expected, "in order", ms)
            else:
                self.check(name, "deviation", expected, f"out of order: {outputs} (a client must never send a "
                           "second request before the first is answered; doai does not)", ms)
        except (TimeoutError, ConnectionClosed, ShapeError) as exc:
            self.check(name, "deviation", expected, f"the second answer did not come: {exc!r:.200}")

    async def _ping(self, conn: tuple[int, ClientConnection]) -> None:
        name = "keep-alive ping"
        expected = "a WebSocket pong within 5 s"
        started = time.monotonic()
        try:
            waiter = await conn[1].ping()
            async with asyncio.timeout(5.0):
                await waiter
        except (TimeoutError, ConnectionClosed) as exc:
            self.pong = False
            self.check(name, "deviation", expected, f"no pong ({exc!r:.100})")
            return
        self.pong = True
        self.check(name, "ok", expected, "pong", (time.monotonic() - started) * 1000)

    async def _connections(self, wanted: int) -> None:
        name = "second connection"
        expected = f"several connections at once, each answering (tried {wanted})"
        conns: list[tuple[int, ClientConnection]] = []
        answered = 0
        refused = ""
        started = time.monotonic()
        try:
            for _ in range(wanted):
                try:
                    conns.append(await self.open())
                except (OSError, TimeoutError, WebSocketException) as exc:
                    refused = f"connection {len(conns) + 1} refused: {exc!r:.100}"
                    break

            async def one(c: tuple[int, ClientConnection]) -> bool:
                try:
                    reply, _ = await self.call(c, Action.LIST)
                except (TimeoutError, ConnectionClosed, ShapeError):
                    return False
                return reply.ok

            results = await asyncio.gather(*(one(c) for c in conns))
            answered = 0
            for ok in results:  # count the connections that answered before the first that did not
                if not ok:
                    break
                answered += 1
        finally:
            for c in conns:
                with contextlib.suppress(Exception):
                    await c[1].close()
        self.connections_ok = answered
        self.connections_tried = wanted
        ms = (time.monotonic() - started) * 1000
        if answered >= wanted:
            self.check(name, "ok", expected, f"{answered} connections answered", ms)
        else:
            self.check(name, "deviation", expected, f"{answered} of {wanted} connections answered"
                       + (f"; {refused}" if refused else ""), ms)

    # ------------------------------------------------------- recommendations

    def recommendations(self) -> list[Recommendation]:
        recs: list[Recommendation] = []
        if self.connections_ok is not None:
            if self.connections_ok >= self.connections_tried:
                recs.append(Recommendation("vendor_pool_size", "--vendor-connections", "(default: one per slot)",
                                           f"{self.connections_ok} connections at once were answered"))
            else:
                value = max(1, self.connections_ok)
                recs.append(Recommendation("vendor_pool_size", "--vendor-connections", str(value),
                                           f"only {self.connections_ok} of {self.connections_tried} connections "
                                           "were answered; devices then share them, one request at a time"))
        pong = self.pong
        if pong is not None:
            recs.append(Recommendation(
                "vendor_ping_interval_s", "--vendor-ping-interval", "20" if pong else "0",
                "the program answers pings" if pong else
                "the program does not answer pings: with pings on, every connection would be closed as dead"))
        delay = self.shot_delay_ms
        if delay is not None:
            wait = max(10, math.ceil(delay / 1000 * 3))
            recs.append(Recommendation("vendor_screenshot_wait_s", "--screenshot-wait", str(wait),
                                       f"the screenshot was complete {delay:.0f} ms after the answer"))
        return recs


async def run_probe(url: str, *, device: str | None = None, timeout_s: float = 10.0, max_connections: int = 20,
                    workdir: Path | None = None, default_folder: Path | None = None) -> ProbeReport:
    """Run every check against the program at `url`; never raises for what the program does."""
    started_at = datetime.now(UTC).isoformat()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="doai-probe-")))
        probe = _Probe(url, timeout_s, workdir)
        serial: str | None = None
        try:
            serial = await probe.run(device, max_connections, default_folder)
        except _Stop:
            pass
        except (TimeoutError, ConnectionClosed, ShapeError) as exc:
            probe.check("probe", "failed", "answers to every request", f"stopped: {exc!r:.300}")
        return ProbeReport(
            url=url, started_at=started_at, device=serial,
            ok=not any(c.status == "failed" for c in probe.checks), checks=probe.checks,
            recommendations=probe.recommendations(), variants_seen=probe.variants, transcript=probe.frames,
        )


_MARK = {"ok": "ok", "tolerated": "tolerated", "deviation": "DEVIATION", "failed": "FAILED", "skipped": "skipped"}


def render(report: ProbeReport, transcript_path: Path | None = None) -> str:
    """The report as an operator reads it."""
    lines = [f"doai vendor probe: {report.url}" + (f" (device {report.device})" if report.device else "")]
    width = max((len(c.name) for c in report.checks), default=10)
    for c in report.checks:
        ms = "" if c.ms is None else f"{c.ms:8.0f} ms"
        lines.append(f"  [{_MARK[c.status]:>9}] {c.name:<{width}} {ms:>11}  {c.seen}")
        if c.status in ("deviation", "failed"):
            lines.append(f"  {'':>11} {'':<{width}} {'':>11}  expected: {c.expected}")
    if report.variants_seen:
        lines.append("Answers that differ from the documentation (doai accepts them):")
        lines.extend(f"  {k}: {v}" for k, v in sorted(report.variants_seen.items()))
    if report.recommendations:
        lines.append("Node settings for this program (doai node flag = value):")
        lines.extend(f"  {r.flag} {r.value}    ({r.setting}: {r.why})" for r in report.recommendations)
    lines.append("Result: " + ("doai can work with this program." if report.ok else
                               "doai cannot work with this program as it is: see FAILED above."))
    if transcript_path is not None:
        lines.append(f"Full transcript: {transcript_path} (attach it to a bug report)")
    return "\n".join(lines) + "\n"
