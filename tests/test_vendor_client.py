"""VendorClient against the simulator over real WebSockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from websockets.asyncio.server import ServerConnection, serve

from contracts.events import DeviceInfo
from runtime.config import ConfigError, load_settings
from services.node.driver import Key
from services.node.errors import InvalidRequest
from services.node.factory import build_driver
from services.node.settings import NodeSettings
from services.node.vendor_client import (
    VendorClient,
    VendorError,
    VendorFailure,
    VendorProtocolError,
    VendorTimeout,
    VendorUnavailable,
    png_files,
)
from services.simulator import LICENCE_MESSAGE, Simulator, SimulatorConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def until(predicate: object, timeout_s: float = 5.0) -> None:
    """Poll ``predicate()`` (sync callable) until true, failing after ``timeout_s``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(devices=6, seed=3, default_latency_ms=2)) as s:
        yield s


@pytest_asyncio.fixture
async def client(sim: Simulator) -> AsyncIterator[VendorClient]:
    async with VendorClient(sim.url, pool_size=4, request_timeout_s=2.0) as c:
        yield c


async def test_list_shell_and_helpers(sim: Simulator, client: VendorClient) -> None:
    devices = await client.list_devices()
    assert [d.serial for d in devices] == list(sim.devices)
    dev = sim.devices["SIM0002"]
    assert devices[1] == DeviceInfo(serial="SIM0002", status="online", model=dev.model, name=dev.name, mode=0,
                                    width=dev.width, height=dev.height)
    assert await client.shell("SIM0002", "getprop ro.product.model") == f"{dev.model}\n"
    assert client.connected

    await client.start_apk("SIM0002", "com.google.android.youtube")
    assert dev.foreground == "com.google.android.youtube"
    await client.press_key("SIM0002", Key.RECENTS)
    assert dev.foreground == "com.android.systemui"
    await client.press_key("SIM0002", Key.BACK)
    assert dev.foreground == "com.google.android.youtube"
    await client.press_key("SIM0002", Key.HOME)
    assert dev.foreground == "com.android.launcher3"
    await client.stop_apk("SIM0002", "com.android.launcher3")
    # Anything else goes through `request` as is.
    with pytest.raises(VendorFailure):
        await client.request("inputText", "SIM0002", {"text": "hi"})
    await client.request("selectIme", "SIM0002")
    await client.request("inputText", "SIM0002", {"text": "hi"})
    assert dev.typed_text == "hi"
    assert (await client.request("adb", None, {"command": "version"})).data
    assert {d for a, d in sim.calls if a not in ("list", "adb")} == {"SIM0002"}
    assert ("adb", None) in sim.calls
    assert [a for a, _ in sim.calls if a == "pushevent"] == ["pushevent"] * 3


async def test_screenshot_returns_the_new_png(
    sim: Simulator, client: VendorClient, tmp_path: Path
) -> None:
    folder = tmp_path / "shots" / "SIM0001"
    first = await client.screenshot("SIM0001", folder)
    second = await client.screenshot("SIM0001", folder)
    assert first != second and first.parent == folder == second.parent
    for path in (first, second):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(folder.iterdir()) == sorted([first, second])


async def test_failure_is_vendor_failure_with_message(sim: Simulator, client: VendorClient) -> None:
    with pytest.raises(VendorFailure) as info:
        await client.shell("NOPE9", "echo")
    assert "NOPE9" in info.value.message and info.value.code == "vendor_10001"
    assert not info.value.licence and isinstance(info.value, VendorError)

    sim.config.failure_rate = 1.0
    with pytest.raises(VendorFailure, match="simulated failure"):
        await client.list_devices()
    sim.config.failure_rate = 0.0
    assert client.connected  # the vendor answered: it is reachable
    assert len(await client.list_devices()) == 6


async def test_licence_not_activated(sim: Simulator, client: VendorClient) -> None:
    sim.set_licence(False)
    with pytest.raises(VendorFailure) as info:
        await client.list_devices()
    assert info.value.licence and info.value.message == LICENCE_MESSAGE
    sim.set_licence(True)
    assert len(await client.list_devices()) == 6


async def test_never_two_requests_in_flight_on_one_connection(
    sim: Simulator, client: VendorClient
) -> None:
    serials = list(sim.devices)

    async def one(i: int) -> tuple[int, str]:
        return i, await client.shell(serials[i % len(serials)], f"echo token-{i}")

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert all(out == f"token-{i}\n" for i, out in results)
    assert sim.requests_total == 50
    assert sim.max_in_flight_per_connection == 1
    assert 1 <= sim.connections_total <= 4 and client.connections_opened <= 4


async def test_hang_times_out_then_recovers_on_a_new_connection(
    sim: Simulator, client: VendorClient
) -> None:
    assert await client.shell("SIM0001", "echo warm") == "warm\n"
    opened = client.connections_opened
    sim.hang_device("SIM0001", True)
    client.drains.grace_s = 0.5
    started = time.monotonic()
    with pytest.raises(VendorTimeout) as info:
        await client.shell("SIM0001", "echo never", timeout_s=0.2)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.5 and info.value.code == "vendor_timeout"
    assert not client.connected
    # The device drains: the hung connection stays open for the grace period (the phone may still be
    # executing the command), then it is closed.
    assert client.drains.is_draining("SIM0001") and sim.open_connections == 1
    await until(lambda: sim.open_connections == 0)  # the hung connection was closed
    assert not client.drains.is_draining("SIM0001") and client.drains.outcomes["grace_passed"] == 1

    sim.hang_device("SIM0001", False)
    assert await client.shell("SIM0001", "echo back") == "back\n"
    assert client.connections_opened == opened + 1 and client.connected
    assert sim.max_in_flight_per_connection == 1


async def test_dropped_connection_is_unavailable_then_recovers(
    sim: Simulator, client: VendorClient
) -> None:
    assert len(await client.list_devices()) == 6
    sim.config.drop_rate = 1.0
    with pytest.raises(VendorUnavailable, match="dropped") as info:
        await client.list_devices()
    assert info.value.code == "vendor_unavailable" and not client.connected
    sim.config.drop_rate = 0.0
    assert len(await client.list_devices()) == 6
    assert sim.dropped_total == 1 and client.connected


async def test_vendor_down_is_a_clear_unavailable_error() -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    async with VendorClient(url, connect_timeout_s=1.0) as client:
        with pytest.raises(VendorUnavailable) as info:
            await client.list_devices()
        assert url in info.value.message and "WebSocket API" in info.value.message
        assert info.value.retryable and not client.connected
        async with Simulator(SimulatorConfig(devices=2, port=port)) as sim:
            assert [d.serial for d in await client.list_devices()] == list(sim.devices)
            assert client.connected


async def test_refuses_anything_but_one_serial(sim: Simulator, client: VendorClient) -> None:
    for bad in ("all", "ALL", " All ", "SIM0001,SIM0002", "a,b", "", "  "):
        with pytest.raises(InvalidRequest):
            await client.shell(bad, "echo")
        with pytest.raises(InvalidRequest):
            await client.request("pushEvent", bad, {"type": "2"})
    with pytest.raises(InvalidRequest):
        await client.screenshot("all", Path("/nonexistent"))
    assert sim.requests_total == 0 and sim.calls == []


async def test_restart_gives_unavailable_then_empty_list_then_devices(
    sim: Simulator, client: VendorClient
) -> None:
    assert len(await client.list_devices()) == 6
    restart = asyncio.create_task(sim.restart(0.3, empty_list_s=1.0))
    await until(lambda: not sim.running)
    with pytest.raises(VendorUnavailable):
        await client.list_devices()
    await asyncio.wait_for(restart, 5)
    assert await client.list_devices() == []  # restarting: not "every device went offline"
    lists: list[int] = []

    async def poll() -> None:
        deadline = time.monotonic() + 5
        while not lists or lists[-1] == 0:
            assert time.monotonic() < deadline
            lists.append(len(await client.list_devices()))
            await asyncio.sleep(0.02)

    await poll()
    assert lists[-1] == 6 and lists[0] == 0


async def test_garbage_answer_is_protocol_error() -> None:
    async def handler(ws: ServerConnection) -> None:
        async for _ in ws:
            await ws.send("this is not json")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with VendorClient(f"ws://127.0.0.1:{port}/") as client:
            with pytest.raises(VendorProtocolError):
                await client.list_devices()


async def test_connect_retry_waits_for_the_vendor_with_backoff_within_the_request_timeout() -> None:
    port = free_port()
    async with VendorClient(f"ws://127.0.0.1:{port}/", connect_retry=True, backoff_base_s=0.05,
                            backoff_max_s=0.2, request_timeout_s=5.0) as client:
        with structlog.testing.capture_logs() as logs:
            request = asyncio.create_task(client.list_devices())
            await until(lambda: client.consecutive_failures >= 3)
            async with Simulator(SimulatorConfig(devices=2, port=port)):
                assert len(await asyncio.wait_for(request, 5)) == 2
        delays = [e["retry_in_s"] for e in logs if e["event"] == "vendor unavailable, retrying"]
        assert delays[:3] == [0.05, 0.1, 0.2] and set(delays[3:]) <= {0.2}
        # Back to the base delay after a success; and a short timeout still fails clearly.
        started = time.monotonic()
        with pytest.raises(VendorUnavailable):
            await client.list_devices(timeout_s=0.3)
        assert time.monotonic() - started < 1.5


async def test_a_request_dropped_after_sending_is_never_retried(sim: Simulator) -> None:
    async with VendorClient(sim.url, connect_retry=True, backoff_base_s=0.05, request_timeout_s=2.0) as client:
        await client.shell("SIM0001", "echo warm")
        before = sim.requests_total
        sim.config.drop_rate = 1.0
        with pytest.raises(VendorUnavailable, match="dropped"):
            await client.shell("SIM0001", "input tap 1 1")
        assert sim.requests_total == before + 1  # sent once; its fate is unknown, so it is not sent again


async def test_screenshot_written_late_and_slowly_into_a_subfolder_is_picked_up_complete(tmp_path: Path) -> None:
    config = SimulatorConfig(devices=1, default_latency_ms=0, screen_late_ms=600.0,
                             deviations=frozenset({"screen_late", "screen_subfolder"}))
    async with Simulator(config) as sim, VendorClient(sim.url, screenshot_wait_s=5.0) as client:
        folder = tmp_path / "shot"
        started = time.monotonic()
        path = await client.screenshot("SIM0001", folder)
        assert time.monotonic() - started >= 0.5  # it waited for the second half
        assert path.parent.parent == folder and path.parent.name == time.strftime("%Y-%m-%d")
        content = path.read_bytes()
        assert content[:8] == b"\x89PNG\r\n\x1a\n" and content.endswith(b"IEND\xaeB`\x82")
        assert len(content) == len(sim.devices["SIM0001"].render_screen())


async def test_screenshot_wait_is_configurable_and_its_failure_names_the_folder(tmp_path: Path) -> None:
    config = SimulatorConfig(devices=1, default_latency_ms=0, screen_late_ms=3000.0,
                             deviations=frozenset({"screen_late"}))
    async with Simulator(config) as sim, VendorClient(sim.url, screenshot_wait_s=0.3) as client:
        started = time.monotonic()
        with pytest.raises(VendorProtocolError) as info:
            await client.screenshot("SIM0001", tmp_path / "slow")
        assert time.monotonic() - started < 2.0
        assert str(tmp_path / "slow") in info.value.message and "0.3 s" in info.value.message


async def test_a_stable_file_without_the_png_trailer_counts_once_its_size_stops_changing(tmp_path: Path) -> None:
    """The size-stable rule alone (a writer whose file does not end like a PNG, e.g. a truncated one)."""
    folder = tmp_path / "odd"

    async def handler(ws: ServerConnection) -> None:
        async for _ in ws:
            (folder / "sub").mkdir(parents=True, exist_ok=True)
            (folder / "sub" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
            await ws.send('{"code": 10000, "message": "SUCCESS", "data": null}')

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with VendorClient(f"ws://127.0.0.1:{port}/", screenshot_wait_s=3.0) as client:
            started = time.monotonic()
            assert await client.screenshot("X1", folder) == folder / "sub" / "x.png"
            assert time.monotonic() - started >= 1.0  # STABLE_S


def test_vendor_connection_settings_come_from_the_environment_and_reach_the_client(tmp_path: Path) -> None:
    env = {"DOAI_NODE_ID": "node-1", "NATS_URL": "nats://127.0.0.1:4222", "DOAI_VENDOR_POOL_SIZE": "3",
           "DOAI_VENDOR_PING_INTERVAL_S": "0", "DOAI_VENDOR_SCREENSHOT_WAIT_S": "4.5"}
    settings = load_settings(NodeSettings, env, state_dir=tmp_path)
    assert (settings.vendor_pool_size, settings.vendor_ping_interval_s, settings.vendor_screenshot_wait_s) == (
        3, None, 4.5)
    client = build_driver(settings)
    assert isinstance(client, VendorClient)
    assert (client.pool_size, client.ping_interval_s, client.screenshot_wait_s) == (3, None, 4.5)
    # Flags win; defaults are one connection per slot and a 20 s ping.
    default = build_driver(load_settings(NodeSettings, env, vendor_pool_size=None, slots=7,
                                         vendor_ping_interval_s=20.0))
    assert isinstance(default, VendorClient) and default.pool_size == 3 and default.ping_interval_s == 20.0
    bare = build_driver(load_settings(NodeSettings, {k: env[k] for k in ("DOAI_NODE_ID", "NATS_URL")}, slots=7))
    assert isinstance(bare, VendorClient) and (bare.pool_size, bare.ping_interval_s, bare.screenshot_wait_s) == (
        7, 20.0, 10.0)
    for bad in ({"DOAI_VENDOR_POOL_SIZE": "0"}, {"DOAI_VENDOR_SCREENSHOT_WAIT_S": "0"},
                {"DOAI_VENDOR_POOL_SIZE": "many"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load_settings(NodeSettings, {**env, **bad})


def test_a_screenshot_folder_listing_finds_every_png_below_it_and_follows_no_folder_link(tmp_path: Path) -> None:
    """`png_files`: every `*.png` (any case) in the folder and its subfolders (a program may add dated ones),
    with its size; a symlinked folder is not entered (nor a loop), a symlinked file is listed (the step later
    refuses it if it resolves outside: `_saved_inside`); a file named just `.png` is not a PNG name; a missing
    folder lists nothing, and `create` makes it."""
    root, outside = tmp_path / "shots", tmp_path / "outside"
    for path, data in [(root / "a.png", b"a"), (root / "b.PNG", b"bb"), (root / "2026-11-30" / "c.Png", b"ccc"),
                       (root / "notes.txt", b"t"), (root / ".png", b"hidden"), (root / "dir.png" / "d.png", b"dddd"),
                       (outside / "secret.png", b"secret")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "out.png").symlink_to(outside / "secret.png")
    found = {str(p.relative_to(root)): size for p, size in png_files(root, False).items()}
    assert found == {"a.png": 1, "b.PNG": 2, "2026-11-30/c.Png": 3, "dir.png/d.png": 4, "out.png": 6}
    assert png_files(tmp_path / "missing", False) == {}
    assert png_files(tmp_path / "new" / "folder", True) == {} and (tmp_path / "new" / "folder").is_dir()

