"""The node end to end against a simulator in each deviation mode the tolerant decoding claims to handle.

A real node agent (real nats-server, the simulator over a real WebSocket) runs
a workflow with every kind of vendor request doai sends (list, adb_shell with
and without output, pushEvent, startApk, screen + pickup, upload) on three
phones, one of them on Wi-Fi (`IP:PORT`), while the simulator answers in the
deviating way. Every device must succeed, and the driver must have recorded
the variant it tolerated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from contracts.events import ArtifactEvent, DeviceInventoryEvent
from contracts.local_names import local_path
from contracts.vendor import Variant
from doai.embedded import EmbeddedNats
from services.node.vendor_client import VendorClient
from services.simulator import Simulator, SimulatorConfig
from tests.node_support import assert_complete_and_exact, broadcast, connect, read_events, recipe, send
from tests.test_node_agent import NODE, agent_running, wait_terminal

STEPS: list[dict[str, Any]] = [
    {"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
    {"id": "has_model", "action": "assert", "source": "model", "pattern": "[A-Za-z0-9]"},
    {"id": "quiet", "action": "tap", "x": 10, "y": 20},
    {"id": "home", "action": "keyevent", "key": "home"},
    {"id": "launch", "action": "launch_app", "package": "com.android.settings"},
    {"id": "shot", "action": "screenshot"},
    {"id": "upload", "action": "upload", "source": "shot"},
    {"id": "report", "action": "report"},
]

# What the driver should have recorded (as "<action>:<variant>") in each mode.
RESPONSE_MODES = {
    Variant.SHELL_STRING: "adb_shell:shell_string",
    Variant.SHELL_NULL: "adb_shell:shell_null",
    Variant.DATA_RESULT: "list:data_result",
    Variant.LIST_KEYED: "list:list_keyed",
    Variant.MSG_FIELD: "adb_shell:msg_field",
    Variant.CODE_STRING: "screen:code_string",
    Variant.NO_CODE: "pushEvent:no_code",
    Variant.CODE_ZERO: "startApk:code_zero",
}
BEHAVIOUR_MODES = ["screen_subfolder", "screen_late", "screen_needs_savepath", "concurrent"]


async def run_once(nats_server: EmbeddedNats, tmp_path: Path, deviations: frozenset[str],
                   **options: Any) -> tuple[VendorClient, Simulator]:
    config = SimulatorConfig(devices=3, wifi_devices=1, seed=4, default_latency_ms=2.0, latency_ms={},
                             deviations=deviations, screen_late_ms=400.0)
    async with Simulator(config) as sim, agent_running(nats_server.url, sim, tmp_path, **options) as agent:
        devices = list(sim.devices)
        assert any(":" in d for d in devices)  # a Wi-Fi phone, addressed by IP:PORT
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, recipe(STEPS), devices)
            await send(js, b)
            f = await wait_terminal(js, b.run_id, devices, 60)
            events = await read_events(js)
        finally:
            await nc.close()
        assert_complete_and_exact(f, b.run_id, devices)
        states = {d: (f.final[(b.run_id, d)].state, f.final[(b.run_id, d)].error) for d in devices}
        assert states == dict.fromkeys(devices, ("succeeded", None))
        artifacts = [e for e in events if isinstance(e, ArtifactEvent)]
        assert sorted(a.device_serial for a in artifacts) == sorted(devices)
        for a in artifacts:
            stored = tmp_path / "artifacts" / local_path(a.key)  # Wi-Fi serials: ":" is %3A on disk
            assert stored.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and stored.stat().st_size == a.bytes
        listed = [e for e in events if isinstance(e, DeviceInventoryEvent) and e.vendor_available]
        assert listed and sorted(d.serial for d in listed[-1].devices) == sorted(devices)
        assert {d.mode for d in listed[-1].devices} == {0, 1}
        assert all(sim.devices[d].foreground == "com.android.settings" for d in devices)
        driver = agent.driver
        assert isinstance(driver, VendorClient)
        return driver, sim


@pytest.mark.parametrize("variant", list(RESPONSE_MODES), ids=str)
async def test_node_runs_against_a_program_answering_in_a_variant(
    nats_server: EmbeddedNats, tmp_path: Path, variant: Variant
) -> None:
    driver, _ = await run_once(nats_server, tmp_path, frozenset({variant.value}))
    assert driver.seen[RESPONSE_MODES[variant]] > 0, dict(driver.seen)


@pytest.mark.parametrize("deviation", BEHAVIOUR_MODES)
async def test_node_runs_against_a_program_behaving_differently(
    nats_server: EmbeddedNats, tmp_path: Path, deviation: str
) -> None:
    driver, sim = await run_once(nats_server, tmp_path, frozenset({deviation}))
    assert driver.seen == {}
    if deviation == "screen_subfolder":
        shots = list((tmp_path / "state").rglob("*/Screenshot_*.png"))
        assert shots == []  # picked up from the subfolder, uploaded, and the spool copy removed


async def test_node_runs_with_one_connection_when_the_program_accepts_only_one(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """What the probe recommends for such a program (`--vendor-connections 1`) works."""
    driver, sim = await run_once(nats_server, tmp_path, frozenset({"single_connection"}), vendor_pool_size=1)
    assert sim.refused_connections == 0 and driver.connections_opened == 1


async def test_all_response_variants_at_once(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    # (shell_null and shell_string, no_code and code_zero exclude each other)
    everything = frozenset(v.value for v in RESPONSE_MODES) - {Variant.SHELL_STRING.value, Variant.NO_CODE.value}
    driver, _ = await run_once(nats_server, tmp_path, everything)
    assert {k.split(":")[1] for k in driver.seen} == everything


async def test_a_failure_with_another_code_fails_the_step_with_that_code(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    config = SimulatorConfig(devices=1, seed=4, default_latency_ms=2.0, latency_ms={},
                             deviations=frozenset({"code_other", "msg_field"}))
    async with Simulator(config) as sim, agent_running(nats_server.url, sim, tmp_path):
        nc, js = await connect(nats_server.url)
        try:
            b = broadcast(NODE, recipe([{"id": "launch", "action": "launch_app", "package": "com.example.absent"}]),
                          list(sim.devices))
            await send(js, b)
            f = await wait_terminal(js, b.run_id, list(sim.devices), 30)
        finally:
            await nc.close()
    task = f.final[(b.run_id, "SIM0001")]
    assert task.state == "failed" and task.failed_step == "launch"
    assert task.error == "vendor_10002: com.example.absent is not installed on SIM0001"
