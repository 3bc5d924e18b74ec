"""A node configured for plain adb and Supabase Storage runs device-smoke end to end.

Backend, aggregator, nats-server and PostgreSQL are real; the node agent is
real and uses the real adbutils client and the real supabase client. What
stands in: the adb server with its phones (tests/adb_support.py, since no
phone can be attached here) and the Supabase Storage endpoint
(tests/supabase_support.py, since no Supabase project can run here).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.node.adb_driver import AdbDriver
from services.node.agent import run_node
from services.node.artifacts import LocalArtifactStore
from services.node.factory import build_driver, build_store
from services.node.settings import NodeSettings
from services.node.supabase_store import SupabaseArtifactStore
from services.node.vendor_client import VendorClient
from tests.adb_support import FakeAdbServer, FakePhone
from tests.conftest import creds_file
from tests.supabase_support import FakeStorage, serving
from tests.test_e2e import wait_completed

KEY = "service-role-key-for-tests"


def test_settings_choose_the_driver_and_the_store(tmp_path: Path) -> None:
    base = {"node_id": "n1", "nats_url": "nats://127.0.0.1:4222", "state_dir": tmp_path, "artifact_dir": tmp_path}
    assert isinstance(build_driver(NodeSettings(**base)), VendorClient)
    assert isinstance(build_store(NodeSettings(**base)), LocalArtifactStore)
    adb = build_driver(NodeSettings(**base, driver="adb", adb_port=5555))
    assert isinstance(adb, AdbDriver) and adb.url == "adb://127.0.0.1:5555"
    store = build_store(NodeSettings(**base, store="supabase", supabase_url="http://x", supabase_key=KEY))
    assert isinstance(store, SupabaseArtifactStore) and store.bucket == "artifacts"
    assert KEY not in repr(NodeSettings(**base, store="supabase", supabase_url="http://x", supabase_key=KEY))
    with pytest.raises(ValueError, match="DOAI_DRIVER \\(--driver\\) must be 'vendor' or 'adb'"):
        NodeSettings(**base, driver="usb")
    with pytest.raises(ValueError, match="SUPABASE_SERVICE_KEY"):
        NodeSettings(**base, store="supabase", supabase_url="http://x")


async def test_device_smoke_over_adb_into_supabase(start_system: Any, nats_server: Any, tmp_path: Path,
                                                    log_file: Path) -> None:
    system = await start_system(nodes=0)
    phones = [FakePhone("R58M0001"), FakePhone("R58M0002")]
    storage = FakeStorage(KEY)
    stop = asyncio.Event()
    async with FakeAdbServer(phones) as adb, serving(storage) as storage_url:
        settings = NodeSettings(
            node_id="node-adb", nats_url=nats_server.url, slots=2, state_dir=tmp_path / "state",
            creds_file=creds_file("node", "node-adb"),  # pre-provisioned: the relay declares its consumer
            artifact_dir=tmp_path / "unused", driver="adb", adb_port=adb.port, store="supabase",
            supabase_url=storage_url, supabase_key=KEY, supabase_bucket="shots", inventory_interval_s=0.5,
            command_public_key=system.command_public_key,
        )
        node = asyncio.create_task(run_node(settings, stop))
        try:
            async with system.client() as client:
                for _ in range(200):
                    devices = (await client.get("/v1/devices")).json()["devices"]
                    if len([d for d in devices if d["node_id"] == "node-adb" and d["status"] == "online"]) == 2:
                        break
                    await asyncio.sleep(0.05)
                r = await client.post("/v1/runs", json={
                    "workflow_id": "device-smoke", "targets": {"nodes": ["node-adb"]},
                    "params": {"url": "https://example.org/adb", "youtubeVideoId": "adbVideo01"},
                })
                assert r.status_code == 201, r.text
                run = await wait_completed(client, r.json()["run_id"])
        finally:
            stop.set()
            await node
    assert run["counts"] == {"succeeded": 2}, run
    run_id = run["run_id"]
    for artifact in run["artifacts"]:
        assert artifact["store"] == "supabase"
        assert artifact["key"].startswith(f"adbVideo01/node-adb/{artifact['device_serial']}/{run_id}/")
        data, content_type = storage.objects[f"shots/{artifact['key']}"]
        assert data.startswith(b"\x89PNG") and content_type == "image/png" and len(data) == artifact["bytes"]
    for phone in phones:
        assert "am start -a android.intent.action.VIEW -d https://example.org/adb" in phone.commands
        assert "screencap -p" in phone.commands
    assert KEY not in log_file.read_text()
