"""Tolerant decoding, case by case from raw answer fixtures (tests/fixtures/vendor/*.json).

Each raw frame is served by a real WebSocket server on 127.0.0.1 and read by
the real `VendorClient`, so the whole path (frame -> envelope -> action data
-> doai's types or one clear error) is what is tested.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from websockets.asyncio.server import ServerConnection, serve

from services.node.vendor_client import VendorClient, VendorFailure, VendorProtocolError

FIXTURES = Path(__file__).parent / "fixtures" / "vendor"


def cases(name: str) -> list[Any]:
    doc = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return [pytest.param(case, id=case["name"]) for case in doc["cases"]]


class ScriptedVendor:
    """Answers every request with the next queued raw frame; records the requests."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    def queue(self, case: dict[str, Any]) -> None:
        self.answers.append(case["raw_text"] if "raw_text" in case else json.dumps(case["raw"], ensure_ascii=False))

    async def handler(self, ws: ServerConnection) -> None:
        async for message in ws:
            self.requests.append(json.loads(message))
            await ws.send(self.answers.pop(0))


@pytest_asyncio.fixture
async def vendor() -> AsyncIterator[ScriptedVendor]:
    scripted = ScriptedVendor()
    async with serve(scripted.handler, "127.0.0.1", 0) as server:
        scripted.url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}/"
        yield scripted


def seen(client: VendorClient, action: str) -> set[str]:
    return {key.split(":", 1)[1] for key in client.seen if key.startswith(f"{action}:")}


def check_error(exc: VendorProtocolError, action: str, case: dict[str, Any]) -> None:
    assert case["expect"]["protocol_error"] in exc.message
    assert f"'{action}'" in exc.message and exc.action == action and exc.code == "vendor_protocol_error"
    assert exc.raw and exc.raw in exc.message  # the payload it could not read, in the error
    if "raw_text" in case:
        assert exc.raw == case["raw_text"]


@pytest.mark.parametrize("case", cases("envelope"))
async def test_envelope(vendor: ScriptedVendor, case: dict[str, Any]) -> None:
    vendor.queue(case)
    expect = case["expect"]
    async with VendorClient(vendor.url) as client:
        if "protocol_error" in expect:
            with pytest.raises(VendorProtocolError) as err:
                await client.start_apk("ea85356a", "com.example.app")
            check_error(err.value, "startApk", case)
            return
        if "failure" in expect:
            with pytest.raises(VendorFailure) as info:
                await client.start_apk("ea85356a", "com.example.app")
            f = info.value
            assert (f.licence, f.vendor_code, f.message) == (
                expect["failure"]["licence"], expect["failure"]["vendor_code"], expect["failure"]["message"])
            assert not f.retryable
            assert f.code == ("vendor_10001" if f.vendor_code in (None, 10001) else f"vendor_{f.vendor_code}")
        else:
            await client.start_apk("ea85356a", "com.example.app")
        assert seen(client, "startApk") == set(expect.get("variants", []))
        assert client.connected
    assert vendor.requests == [{"action": "startApk", "devices": "ea85356a", "data": {"apk": "com.example.app"}}]


@pytest.mark.parametrize("case", cases("adb_shell"))
async def test_adb_shell(vendor: ScriptedVendor, case: dict[str, Any]) -> None:
    vendor.queue(case)
    async with VendorClient(vendor.url) as client:
        if "protocol_error" in case["expect"]:
            with pytest.raises(VendorProtocolError) as err:
                await client.shell(case["serial"], "getprop ro.product.model")
            check_error(err.value, "adb_shell", case)
            return
        assert await client.shell(case["serial"], "getprop ro.product.model") == case["expect"]["output"]
        assert seen(client, "adb_shell") == set(case["expect"]["variants"])


@pytest.mark.parametrize("case", cases("list"))
async def test_list(vendor: ScriptedVendor, case: dict[str, Any]) -> None:
    vendor.queue(case)
    async with VendorClient(vendor.url) as client:
        if "protocol_error" in case["expect"]:
            with pytest.raises(VendorProtocolError) as err:
                await client.list_devices()
            check_error(err.value, "list", case)
            return
        devices = await client.list_devices()
        assert [d.serial for d in devices] == case["expect"]["serials"]
        assert seen(client, "list") == set(case["expect"]["variants"])


async def test_an_unknown_shape_is_logged_once_per_shape_not_per_device(vendor: ScriptedVendor) -> None:
    odd = {"code": 10000, "message": "SUCCESS", "data": {"x": 1, "y": 2}}
    long_odd = {"code": 10000, "message": "SUCCESS", "data": {"z": "A" * 5000, "w": 1}}
    async with VendorClient(vendor.url) as client:
        with structlog.testing.capture_logs() as logs:
            for serial in ("d1", "d2", "d3"):
                vendor.queue({"raw": odd})
                with pytest.raises(VendorProtocolError):
                    await client.shell(serial, "echo")
            vendor.queue({"raw": long_odd})
            with pytest.raises(VendorProtocolError) as err:
                await client.shell("d4", "echo")
            vendor.queue({"raw": {"code": 10000, "message": "SUCCESS", "data": 7}})
            with pytest.raises(VendorProtocolError):
                await client.shell("d5", "echo")
    warnings = [e for e in logs if e["event"] == "vendor answer has an unknown shape"]
    assert [w["reason"] for w in warnings] == ["adb_shell data has no entry for the device", "adb_shell data is a int"]
    assert warnings[0]["device_serial"] == "d1"
    assert len(err.value.raw) <= 301 and err.value.raw.endswith("…")  # the raw payload, truncated
    assert len(err.value.message) < 500


async def test_tolerated_variants_are_logged_once_and_counted(vendor: ScriptedVendor) -> None:
    async with VendorClient(vendor.url) as client:
        with structlog.testing.capture_logs() as logs:
            for serial in ("d1", "d2", "d3"):
                vendor.queue({"raw": {"code": 10000, "msg": "SUCCESS", "data": f"{serial}\n"}})
                assert await client.shell(serial, "echo") == f"{serial}\n"
        assert client.seen == {"adb_shell:msg_field": 3, "adb_shell:shell_string": 3}
    tolerated = [e for e in logs if e["event"] == "vendor answer differs from the documented shape; tolerated"]
    assert sorted(e["variant"] for e in tolerated) == ["msg_field", "shell_string"]
