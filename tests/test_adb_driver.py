"""The plain-adb driver, through the real adbutils client.

Against (1) a scripted adb server speaking the adb host protocol (tests/adb_support.py),
which stands in for phones since none can be attached here, and (2) the real adb server
binary shipped in the adbutils wheel, started on a free port, with no phone attached.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import adbutils
import pytest

from doai.embedded import free_port
from services.node.adb_driver import AdbDriver
from services.node.driver import Key
from services.node.errors import InvalidRequest
from services.node.steps import shell_line
from services.node.vendor_client import VendorFailure, VendorTimeout, VendorUnavailable
from tests.adb_support import FakeAdbServer, FakePhone


async def test_lists_phones_and_runs_quoted_shell_commands(tmp_path: Path) -> None:
    phones = [FakePhone("R58M123"), FakePhone("192.168.0.7:5555", state="offline")]
    async with FakeAdbServer(phones) as server:
        driver = AdbDriver(port=server.port)
        devices = await driver.list_devices()
        assert [(d.serial, d.status, d.model, d.mode) for d in devices] == [
            ("R58M123", "online", "Pixel_7", 0), ("192.168.0.7:5555", "offline", "Pixel_7", 1)]
        assert driver.connected

        payload = "x'; reboot; echo 'pwned $(id)"
        line = shell_line(["echo", payload])
        assert await driver.shell("R58M123", line) == payload
        assert phones[0].commands[-1] == line and shlex.split(line)[1] == payload

        shot = await driver.screenshot("R58M123", tmp_path / "spool")
        assert shot.parent == tmp_path / "spool" and shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

        await driver.press_key("R58M123", Key.HOME)
        await driver.start_apk("R58M123", "com.example.app")
        await driver.stop_apk("R58M123", "com.example.app")
        assert phones[0].commands[-3:] == [
            "input keyevent KEYCODE_HOME",
            "monkey -p com.example.app -c android.intent.category.LAUNCHER 1",
            "am force-stop com.example.app",
        ]
        with pytest.raises(VendorFailure, match="cannot start missing.app"):
            await driver.start_apk("R58M123", "missing.app")


async def test_errors_are_the_vendor_errors_steps_already_report() -> None:
    phones = [FakePhone("HANGS", hang=True)]
    async with FakeAdbServer(phones) as server:
        driver = AdbDriver(port=server.port)
        with pytest.raises(VendorFailure, match="device 'GHOST' not found"):
            await driver.shell("GHOST", "echo hi")
        with pytest.raises(VendorTimeout):
            await driver.shell("HANGS", "echo hi", timeout_s=0.5)
        with pytest.raises(InvalidRequest):
            await driver.shell("all", "echo hi")
    down = AdbDriver(port=free_port())
    with pytest.raises(VendorUnavailable, match="adb start-server"):
        await down.list_devices()
    assert not down.connected


@pytest.fixture
def real_adb_server() -> Iterator[int]:
    """The adb binary from the adbutils wheel, on a private port."""
    adb = Path(adbutils.__file__).parent / "binaries" / "adb"
    port = free_port()
    env = {**os.environ, "ANDROID_ADB_SERVER_PORT": str(port), "HOME": os.environ.get("HOME", "/tmp")}
    subprocess.run([str(adb), "start-server"], env=env, check=True, capture_output=True, timeout=30)
    yield port
    subprocess.run([str(adb), "kill-server"], env=env, check=False, capture_output=True, timeout=30)


async def test_against_the_real_adb_server_with_no_phone(real_adb_server: int) -> None:
    driver = AdbDriver(port=real_adb_server)
    assert await driver.list_devices() == []
    with pytest.raises(VendorFailure, match="not found"):
        await driver.shell("NOPHONE1", "echo hi")
