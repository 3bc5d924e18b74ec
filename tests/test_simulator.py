"""The vendor-protocol simulator, exercised over real WebSockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from services.simulator import (
    LICENCE_MESSAGE,
    Simulator,
    SimulatorConfig,
    make_png,
    run_simulator,
)

LIST_FIELDS = {
    "serial",
    "onlySerial",
    "model",
    "name",
    "status",
    "mode",
    "intranetIp",
    "width",
    "height",
    "sourceWidth",
    "sourceHeight",
    "connectTime",
    "sort",
    "hide",
}
SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def decode_png(blob: bytes) -> tuple[int, int, bytes]:
    """Validate a PNG (signature, chunk CRCs, IHDR, IDAT) and return (w, h, raw scanlines)."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    pos = 8
    chunks: list[tuple[bytes, bytes]] = []
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind = blob[pos + 4 : pos + 8]
        payload = blob[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        chunks.append((kind, payload))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


async def call(
    ws: ClientConnection, action: str, devices: str | None = None, data: Any = None
) -> dict[str, Any]:
    msg: dict[str, Any] = {"action": action}
    if devices is not None:
        msg["devices"] = devices
    if data is not None:
        msg["data"] = data
    await ws.send(json.dumps(msg))
    reply: dict[str, Any] = json.loads(await ws.recv())
    return reply


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(devices=5, seed=7, default_latency_ms=1)) as s:
        yield s


@pytest_asyncio.fixture
async def ws(sim: Simulator) -> AsyncIterator[ClientConnection]:
    async with connect(sim.url) as c:
        yield c


def test_make_png_is_valid_and_deterministic() -> None:
    a = make_png(30, 20, seed=1)
    assert a == make_png(30, 20, seed=1)
    assert a != make_png(30, 20, seed=2)
    w, h, raw = decode_png(a)
    assert (w, h) == (30, 20)
    assert all(raw[y * (1 + 3 * w)] == 0 for y in range(h))
    assert decode_png(make_png(0, 0, seed=3))[:2] == (1, 1)


async def test_list_has_every_documented_field(sim: Simulator, ws: ClientConnection) -> None:
    assert sim.url == f"ws://127.0.0.1:{sim.port}/" and sim.port > 0
    reply = await call(ws, "list")
    assert reply["code"] == 10000 and reply["message"] == "SUCCESS"
    devices = reply["data"]
    assert [d["onlySerial"] for d in devices] == [f"SIM{i:04d}" for i in range(1, 6)]
    for d in devices:
        assert set(d) == LIST_FIELDS
        assert SERIAL_RE.match(d["onlySerial"])
        assert d["status"] == "online"
        assert d["width"] > 0 and d["height"] > 0 and d["connectTime"] > 1_600_000_000_000
    assert sim.calls == [("list", None)]


async def test_actions_are_case_insensitive(ws: ClientConnection) -> None:
    assert (await call(ws, "LIST"))["code"] == 10000
    reply = await call(ws, "Adb_Shell", "SIM0001", {"command": "echo hi there"})
    assert reply == {"code": 10000, "message": "SUCCESS", "data": {"SIM0001": "hi there\n"}}


async def test_adb_shell_outputs_and_state_changes(sim: Simulator, ws: ClientConnection) -> None:
    async def sh(cmd: str) -> str:
        reply = await call(ws, "adb_shell", "SIM0002", {"command": cmd})
        assert reply["code"] == 10000, reply
        out: str = reply["data"]["SIM0002"]
        return out

    dev = sim.devices["SIM0002"]
    assert await sh("getprop ro.product.model") == f"{dev.model}\n"
    assert await sh("getprop ro.build.version.release") == f"{dev.android_release}\n"
    assert f"level: {dev.battery_level}\n" in await sh("dumpsys battery")
    assert await sh("dumpsys battery | grep level") == f"  level: {dev.battery_level}\n"
    assert await sh("wm size") == f"Physical size: {dev.width}x{dev.height}\n"
    assert await sh("frobnicate --now") == "/system/bin/sh: frobnicate: not found\n"

    url = "https://example.com/a?b=1&c=2"
    assert "Starting: Intent" in await sh(f"am start -a android.intent.action.VIEW -d '{url}'")
    assert (dev.foreground, dev.current_url) == ("com.android.chrome", url)
    assert "com.android.chrome/" in await sh("dumpsys window | grep mCurrentFocus")
    await sh("input keyevent KEYCODE_HOME")
    assert dev.foreground == "com.android.launcher3" and dev.current_url is None

    assert "Events injected" in await sh("monkey -p com.google.android.youtube 1")
    assert dev.foreground == "com.google.android.youtube"
    await sh("am force-stop com.google.android.youtube")
    assert dev.foreground == "com.android.launcher3"
    assert "aborted" in await sh("monkey -p not.installed 1")

    await sh("input tap 100 200")
    await sh("input swipe 1 2 3 4 300")
    await sh("input text 'hello%sworld'")
    assert dev.taps == [(100, 200)] and dev.swipes == [(1, 2, 3, 4, 300)]
    assert dev.typed_text == "hello world"

    await sh("screencap -p /sdcard/s.png")
    assert decode_png(dev.files["/sdcard/s.png"])[:2] == (dev.width // 4, dev.height // 4)


async def test_screen_writes_a_real_png(
    sim: Simulator, ws: ClientConnection, tmp_path: Path
) -> None:
    folder = tmp_path / "not" / "there" / "yet"
    reply = await call(ws, "screen", "SIM0001", {"savePath": str(folder)})
    assert reply["code"] == 10000
    reply = await call(ws, "screen", "SIM0001", {"savePath": str(folder)})
    assert reply["code"] == 10000
    files = sorted(folder.iterdir())
    assert len(files) == 2 and all(f.name.startswith("Screenshot_SIM0001_") for f in files)
    dev = sim.devices["SIM0001"]
    for f in files:
        assert f.suffix == ".png"
        assert decode_png(f.read_bytes())[:2] == (dev.width // 4, dev.height // 4)
    # No savePath: the program's default folder. A .png savePath: exactly that file.
    sim.config.screen_default_dir = tmp_path / "default"
    assert (await call(ws, "screen", "SIM0001", {}))["code"] == 10000
    assert [f.name[:19] for f in (tmp_path / "default").iterdir()] == ["Screenshot_SIM0001_"]
    target = tmp_path / "named" / "shot.png"
    assert (await call(ws, "screen", "SIM0001", {"savePath": str(target)}))["code"] == 10000
    assert list(target.parent.iterdir()) == [target] and decode_png(target.read_bytes())
    sim.config.deviations = frozenset({"screen_needs_savepath"})
    assert (await call(ws, "screen", "SIM0001", {}))["code"] == 10001


async def test_screencap_then_pull_file(ws: ClientConnection, tmp_path: Path) -> None:
    await call(ws, "adb_shell", "SIM0003", {"command": "screencap -p /sdcard/x.png"})
    reply = await call(
        ws, "pullFile", "SIM0003", {"remotePath": "/sdcard/x.png", "localPath": str(tmp_path)}
    )
    assert reply["code"] == 10000
    decode_png((tmp_path / "x.png").read_bytes())
    reply = await call(
        ws, "pullFile", "SIM0003", {"remotePath": "/sdcard/nope", "localPath": str(tmp_path)}
    )
    assert reply["code"] == 10001 and "not found" in reply["message"]


async def test_pointer_and_push_events(sim: Simulator, ws: ClientConnection) -> None:
    dev = sim.devices["SIM0004"]
    bad = await call(ws, "pointerEvent", "SIM0004", {"type": "0", "y": "5"})
    assert bad["code"] == 10001
    assert (await call(ws, "pointerEvent", "SIM0004", {"type": "12"}))["code"] == 10001
    for kind in ("0", "1"):
        reply = await call(ws, "pointerEvent", "SIM0004", {"type": kind, "x": "10", "y": "20"})
        assert reply["code"] == 10000
    assert (await call(ws, "pointerEvent", "SIM0004", {"type": "6"}))["code"] == 10000
    assert dev.taps == [(10, 20)]
    assert [e[0] for e in dev.pointer_events] == ["0", "1", "6"]

    assert (await call(ws, "startApk", "SIM0004", {"apk": "com.android.settings"}))["code"] == 10000
    assert dev.foreground == "com.android.settings"
    await call(ws, "pushEvent", "SIM0004", {"type": "1"})
    assert dev.foreground == "com.android.systemui"
    await call(ws, "pushEvent", "SIM0004", {"type": "3"})
    assert dev.foreground == "com.android.settings"
    await call(ws, "pushEvent", "SIM0004", {"type": "2"})
    assert dev.foreground == "com.android.launcher3"
    assert (await call(ws, "pushEvent", "SIM0004", {"type": "9"}))["code"] == 10001
    missing = await call(ws, "startApk", "SIM0004", {"apk": "no.such.app"})
    assert missing["code"] == 10001 and "not installed" in missing["message"]


async def test_input_text_needs_select_ime(sim: Simulator, ws: ClientConnection) -> None:
    reply = await call(ws, "inputText", "SIM0005", {"text": "abc"})
    assert reply["code"] == 10001 and "selectIme" in reply["message"]
    assert (await call(ws, "selectIme", "SIM0005"))["code"] == 10000
    assert (await call(ws, "inputText", "SIM0005", {"text": "abc"}))["code"] == 10000
    assert sim.devices["SIM0005"].typed_text == "abc"
    # As documented: an escaped \n is a line break; no text is a failure.
    assert (await call(ws, "inputText", "SIM0005", {"text": "x\\ny"}))["code"] == 10000
    assert sim.devices["SIM0005"].typed_text == "abcx\ny"
    assert (await call(ws, "inputText", "SIM0005", {}))["code"] == 10001


async def test_install_apk_needs_a_real_file(
    sim: Simulator, ws: ClientConnection, tmp_path: Path
) -> None:
    missing = await call(ws, "installApk", "SIM0001", {"path": str(tmp_path / "x.apk")})
    assert missing["code"] == 10001
    apk = tmp_path / "com.example.demo.apk"
    apk.write_bytes(b"PK")
    assert (await call(ws, "installApk", "SIM0001", {"path": str(apk)}))["code"] == 10000
    assert (await call(ws, "startApk", "SIM0001", {"apk": "com.example.demo"}))["code"] == 10000


async def test_errors_answer_10001(sim: Simulator, ws: ClientConnection) -> None:
    await ws.send("{not json")
    assert json.loads(await ws.recv())["code"] == 10001
    unknown = await call(ws, "teleport", "SIM0001")
    assert unknown["code"] == 10001 and "teleport" in unknown["message"]
    assert (await call(ws, "adb_shell", None, {"command": "echo"}))["code"] == 10001
    assert (await call(ws, "adb_shell", "", {"command": "echo"}))["code"] == 10001
    nope = await call(ws, "adb_shell", "NOPE1", {"command": "echo"})
    assert nope["code"] == 10001 and "NOPE1" in nope["message"]
    sim.set_device_status("SIM0002", "offline")
    off = await call(ws, "adb_shell", "SIM0002", {"command": "echo"})
    assert off["code"] == 10001 and "offline" in off["message"]
    listed = {d["onlySerial"]: d["status"] for d in (await call(ws, "list"))["data"]}
    assert listed["SIM0002"] == "offline"
    sim.set_device_status("SIM0002", "online")
    assert (await call(ws, "adb_shell", "SIM0002", {"command": "echo"}))["code"] == 10000


async def test_all_and_lists_of_serials_are_applied_and_recorded(
    sim: Simulator, ws: ClientConnection
) -> None:
    everyone = await call(ws, "adb_shell", "all", {"command": "echo x"})
    assert everyone["data"] == {s: "x\n" for s in sim.devices}
    some = await call(ws, "adb_shell", "SIM0001,SIM0003", {"command": "echo y"})
    assert some["data"] == {"SIM0001": "y\n", "SIM0003": "y\n"}
    assert ("adb_shell", "all") in sim.calls and ("adb_shell", "SIM0001,SIM0003") in sim.calls


async def test_adb_host_side(ws: ClientConnection) -> None:
    reply = await call(ws, "adb", None, {"command": "devices"})
    assert reply["code"] == 10000 and "SIM0001\tdevice" in reply["data"]
    reply = await call(ws, "adb", None, {"command": "-s SIM0001 shell echo ok"})
    assert reply["data"] == "ok\n"


async def test_licence_mode(sim: Simulator, ws: ClientConnection) -> None:
    sim.set_licence(False)
    for action, devices in (("list", None), ("adb_shell", "SIM0001"), ("screen", "SIM0001")):
        reply = await call(ws, action, devices, {"command": "echo"})
        assert reply["code"] == 10001 and reply["message"] == LICENCE_MESSAGE
    sim.set_licence(True)
    assert (await call(ws, "list"))["code"] == 10000


async def test_failure_rate_and_counters(sim: Simulator, ws: ClientConnection) -> None:
    sim.config.failure_rate = 1.0
    reply = await call(ws, "adb_shell", "SIM0001", {"command": "echo"})
    assert reply["code"] == 10001 and reply["message"]
    sim.config.failure_rate = 0.0
    await call(ws, "list")
    assert sim.requests_total == 2 and sim.action_counts == {"adb_shell": 1, "list": 1}


async def test_pipelining_is_detected(sim: Simulator, ws: ClientConnection) -> None:
    for i in range(3):
        req = {"action": "adb_shell", "devices": "SIM0001", "data": {"command": f"echo {i}"}}
        await ws.send(json.dumps(req))
    replies = [json.loads(await ws.recv())["data"]["SIM0001"] for _ in range(3)]
    assert replies == ["0\n", "1\n", "2\n"]  # sequential, in arrival order
    assert sim.max_in_flight_per_connection >= 2


async def test_run_simulator_serves_until_stop() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = asyncio.Event()
    task = asyncio.create_task(run_simulator(SimulatorConfig(devices=2, port=port), stop))
    url = f"ws://127.0.0.1:{port}/"
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            async with connect(url) as c:
                reply = await call(c, "list")
            break
        except OSError:
            assert asyncio.get_running_loop().time() < deadline, "simulator never came up"
            await asyncio.sleep(0.02)
    assert [d["onlySerial"] for d in reply["data"]] == ["SIM0001", "SIM0002"]
    stop.set()
    await asyncio.wait_for(task, 5)
    with pytest.raises(OSError):
        async with connect(url, open_timeout=2):
            pass


async def test_wifi_devices_are_listed_and_addressed_by_ip_and_port() -> None:
    async with Simulator(SimulatorConfig(devices=3, wifi_devices=1, default_latency_ms=0)) as sim, \
            connect(sim.url) as ws:
        listed = (await call(ws, "list"))["data"]
        wifi = listed[-1]
        assert wifi["serial"] == wifi["onlySerial"] == f"{wifi['intranetIp']}:5555" and wifi["mode"] == 1
        assert [d["mode"] for d in listed[:-1]] == [0, 0]
        reply = await call(ws, "adb_shell", wifi["serial"], {"command": "echo hi"})
        assert reply["data"] == {wifi["serial"]: "hi\n"}
        # A USB phone is also reachable by its intranet IP:PORT, as the program documents.
        usb_ip = f"{listed[0]['intranetIp']}:5555"
        assert (await call(ws, "pushEvent", usb_ip, {"type": "2"}))["code"] == 10000
        assert (await call(ws, "adb_shell", "10.9.9.9:5555", {"command": "echo"}))["code"] == 10001


async def test_actions_doai_does_not_send(sim: Simulator, ws: ClientConnection, tmp_path: Path) -> None:
    dev = sim.devices["SIM0001"]
    apks = (await call(ws, "apkList", "SIM0001", {}))["data"]
    assert list(apks) == ["SIM0001"] and "com.android.settings" in apks["SIM0001"]
    assert (await call(ws, "uninstallApk", "SIM0001", {"apk": "com.android.settings"}))["code"] == 10000
    assert "com.android.settings" not in dev.installed
    assert (await call(ws, "uninstallApk", "SIM0001", {}))["code"] == 10000  # as seen live: success, no change
    imes = (await call(ws, "imeList", "SIM0001", {}))["data"]["SIM0001"]
    assert imes[-1].startswith("com.vendor.ime")
    assert (await call(ws, "writeClipBoard", "SIM0001", {"text": "hello"}))["code"] == 10000
    assert dev.clipboard == "hello"
    assert (await call(ws, "writeClipBoard", "SIM0001", {}))["code"] == 10001
    assert (await call(ws, "updateDevices", "SIM0001", {"name": "Shelf 3"}))["code"] == 10000
    assert (await call(ws, "list"))["data"][0]["name"] == "Shelf 3"
    assert (await call(ws, "updateDevices", "SIM0001", {}))["code"] == 10001
    # actionCreate / autojsCreate take an array of task objects, as the earlier client sends.
    assert (await call(ws, "actionCreate", "SIM0001", [{"actionName": "watch", "count": 1}]))["code"] == 10000
    assert sim.action_tasks == [{"name": "watch", "devices": ["SIM0001"]}]
    assert (await call(ws, "actionCreate", "SIM0001", {}))["code"] == 10001
    missing = await call(ws, "autojsCreate", "SIM0001,SIM0002", [{"path": str(tmp_path / "nope.js")}])
    assert missing["code"] == 10001 and "not found" in missing["message"]
    script = tmp_path / "task.js"
    script.write_text("toast('hi')")
    assert (await call(ws, "autojsCreate", "SIM0001,SIM0002", [{"path": str(script)}]))["code"] == 10000
    tasks = (await call(ws, "autojsTasks"))["data"]
    assert tasks == [{"name": "task.js", "path": str(script), "devices": ["SIM0001", "SIM0002"]}]
    assert (await call(ws, "autojsRemove", "SIM0001", {"name": "task.js"}))["code"] == 10000
    assert (await call(ws, "autojsTasks"))["data"][0]["devices"] == ["SIM0002"]
    assert (await call(ws, "autojsRemove", "SIM0002", {"name": "task.js"}))["code"] == 10000
    assert (await call(ws, "autojsTasks"))["data"] == []
    # The earlier client's name for host-side adb: the program's own unknown-action failure.
    unknown = await call(ws, "xiaowei.adb", "SIM0001", {"command": "devices"})
    assert unknown == {"code": 10001, "message": "invalid action: xiaowei.adb", "data": None}


async def test_hang_blocks_the_connection_unless_switched_off() -> None:
    for blocks in (True, False):
        async with Simulator(SimulatorConfig(devices=2, default_latency_ms=0, hang_blocks_connection=blocks)) as sim, \
                connect(sim.url) as ws:
            sim.hang_device("SIM0001")
            await ws.send(json.dumps({"action": "adb_shell", "devices": "SIM0001", "data": {"command": "echo a"}}))
            await ws.send(json.dumps({"action": "adb_shell", "devices": "SIM0002", "data": {"command": "echo b"}}))
            if blocks:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 0.5)
            else:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["data"] == {"SIM0002": "b\n"}
            # Blocked: the second request is never even handled.
            assert sim.hung_total == 1 and sim.action_counts["adb_shell"] == (1 if blocks else 2)


@pytest.mark.parametrize(("deviations", "expected"), [
    ({"shell_string"}, {"code": 10000, "message": "SUCCESS", "data": "x\n"}),
    ({"data_result"}, {"code": 10000, "message": "SUCCESS", "data": {"result": {"SIM0001": "x\n"}}}),
    ({"msg_field", "code_string"}, {"code": "10000", "msg": "SUCCESS", "data": {"SIM0001": "x\n"}}),
    ({"no_code"}, {"message": "SUCCESS", "data": {"SIM0001": "x\n"}}),
    ({"code_zero"}, {"code": 0, "message": "SUCCESS", "data": {"SIM0001": "x\n"}}),
])
async def test_response_deviations(deviations: set[str], expected: dict[str, Any]) -> None:
    config = SimulatorConfig(devices=2, default_latency_ms=0, deviations=frozenset(deviations))
    async with Simulator(config) as sim, connect(sim.url) as ws:
        assert await call(ws, "adb_shell", "SIM0001", {"command": "echo x"}) == expected
        if deviations == {"shell_string"}:
            sim.config.deviations = frozenset({"shell_null", "list_keyed", "code_other"})
            assert (await call(ws, "adb_shell", "SIM0001", {"command": "true"}))["data"] is None
            assert set((await call(ws, "list"))["data"]) == {"SIM0001", "SIM0002"}
            assert (await call(ws, "teleport", "SIM0001"))["code"] == 10002
            sim.set_licence(False)  # the licence failure keeps its documented code
            assert (await call(ws, "list"))["code"] == 10001


def test_unknown_deviation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown deviation"):
        SimulatorConfig(deviations=frozenset({"teleport"}))


def test_shell_tokens_are_cached_for_short_commands_only_and_errors_never() -> None:
    """The tokenizer cache is bounded in entries and in size: a client cannot make it hold megabytes.

    A long command (each `input text` different, up to the WebSocket's 16 MiB) is tokenized without it
    and still typed in full; an unterminated quote answers the shell's error every time and caches nothing.
    """
    from services.simulator import device

    dev = device.SimDevice(serial="cache-test", only_serial="cache-test")
    device._shell_tokens.cache_clear()
    assert dev.run_shell("input text 'hello world'") == ""
    assert dev.run_shell("input text 'hello world'") == ""
    info = device._shell_tokens.cache_info()
    assert (info.hits, info.currsize) == (1, 1)
    long_text = "x" * (4 * device.CACHED_COMMAND_MAX)
    assert dev.run_shell(f"input text {long_text}") == ""
    assert dev.typed_text == "hello worldhello world" + long_text
    assert device._shell_tokens.cache_info().currsize == 1, "a long command was kept in the cache"
    for _ in range(2):
        assert dev.run_shell("echo 'unterminated") == "/system/bin/sh: syntax error: unterminated quoted string\n"
    assert device._shell_tokens.cache_info().currsize == 1
