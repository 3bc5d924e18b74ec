"""`doai vendor probe` against the simulator: all green as documented, and each deviation reported.

The simulator runs over a real WebSocket on 127.0.0.1; the probe is the real
one (and once the real `doai vendor probe` command in a subprocess).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from contracts.vendor import Variant
from doai.embedded import free_port
from services.node.vendor_probe import ProbeReport, render, run_probe
from services.simulator import Simulator, SimulatorConfig

ROOT = Path(__file__).resolve().parent.parent


def config(tmp_path: Path, **kw: Any) -> SimulatorConfig:
    return SimulatorConfig(devices=3, wifi_devices=1, seed=2, default_latency_ms=1.0, latency_ms={},
                           screen_default_dir=tmp_path / "pictures", **kw)


async def probe(sim: Simulator, tmp_path: Path, device: str | None = None) -> ProbeReport:
    return await run_probe(sim.url, device=device, timeout_s=3.0, max_connections=5, workdir=tmp_path / "probe",
                           default_folder=tmp_path / "pictures")


def statuses(report: ProbeReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def recommended(report: ProbeReport) -> dict[str, str]:
    return {r.setting: r.value for r in report.recommendations}


ALL_CHECKS = {"connect", "list", "adb_shell echo", "adb_shell without output", "screen savePath folder",
              "screen savePath .png", "screen without savePath", "two requests in flight on one connection",
              "keep-alive ping", "second connection"}


async def test_documented_program_is_all_green(tmp_path: Path) -> None:
    async with Simulator(config(tmp_path)) as sim:
        report = await probe(sim, tmp_path)
        assert report.ok and report.device == "SIM0001"
        assert statuses(report) == dict.fromkeys(ALL_CHECKS, "ok"), render(report)
        assert report.variants_seen == {}
        # Non-destructive: only list, echo / sleep, and screenshots.
        assert {a for a, _ in sim.calls} == {"list", "adb_shell", "screen"}
        assert sim.devices["SIM0001"].shell_history[0].startswith("echo doai-probe-")
        assert sim.max_in_flight_per_connection == 2  # the one deliberate pipelining check
    assert recommended(report) == {"vendor_pool_size": "(default: one per slot)", "vendor_ping_interval_s": "20",
                                   "vendor_screenshot_wait_s": "10"}
    by_name = {c.name: c for c in report.checks}
    assert by_name["screen savePath .png"].seen == "writes exactly that file"
    assert "new file" in by_name["screen without savePath"].seen
    assert all(c.ms is not None and c.ms >= 0 for c in report.checks)  # timings
    # The transcript has every frame, in order, with its connection.
    sent = [f for f in report.transcript if f.direction == "sent"]
    received = [f for f in report.transcript if f.direction == "received"]
    assert len(sent) == len(received) == sim.requests_total
    assert json.loads(sent[0].text) == {"action": "list"}
    assert [f.t_ms for f in report.transcript] == sorted(f.t_ms for f in report.transcript)


async def test_a_wifi_device_is_probed_by_its_ip_and_port(tmp_path: Path) -> None:
    async with Simulator(config(tmp_path)) as sim:
        wifi = next(s for s in sim.devices if ":" in s)
        report = await probe(sim, tmp_path, device=wifi)
        assert report.ok and report.device == wifi, render(report)
        assert statuses(report)["adb_shell echo"] == "ok"
        assert (("adb_shell", wifi)) in sim.calls


@pytest.mark.parametrize("variant", [v.value for v in Variant if v is not Variant.CODE_OTHER])
async def test_each_tolerated_response_variant_is_reported(tmp_path: Path, variant: str) -> None:
    async with Simulator(config(tmp_path, deviations=frozenset({variant}))) as sim:
        report = await probe(sim, tmp_path)
    assert report.ok, render(report)
    assert any(k.endswith(f":{variant}") for k in report.variants_seen), report.variants_seen
    tolerated = [c for c in report.checks if c.status == "tolerated"]
    assert tolerated and all(variant in c.seen for c in tolerated), render(report)
    assert "differ from the documentation" in render(report)


@pytest.mark.parametrize(("deviation", "check", "status", "words"), [
    ("single_connection", "second connection", "deviation", "1 of 5 connections answered"),
    ("concurrent", "two requests in flight on one connection", "deviation", "out of order"),
    ("screen_subfolder", "screen savePath folder", "tolerated", "subfolder"),
    ("screen_late", "screen savePath folder", "tolerated", "after the answer"),
    ("screen_needs_savepath", "screen without savePath", "deviation", "refused"),
])
async def test_each_behaviour_deviation_is_reported(tmp_path: Path, deviation: str, check: str, status: str,
                                                    words: str) -> None:
    cfg = config(tmp_path, deviations=frozenset({deviation}), screen_late_ms=600.0)
    async with Simulator(cfg) as sim:
        report = await probe(sim, tmp_path)
    text = render(report)
    assert report.ok, text
    found = {c.name: c for c in report.checks}[check]
    assert found.status == status and words in found.seen, text
    assert {c.name for c in report.checks if c.status not in ("ok",)} == {check}, text
    if deviation == "single_connection":
        assert recommended(report)["vendor_pool_size"] == "1"
        assert "--vendor-connections 1" in text
    if deviation == "screen_late":
        assert int(recommended(report)["vendor_screenshot_wait_s"]) >= 10


async def test_licence_not_activated_is_a_clear_failure(tmp_path: Path) -> None:
    async with Simulator(config(tmp_path, licence_active=False)) as sim:
        report = await probe(sim, tmp_path)
    assert not report.ok
    assert statuses(report) == {"connect": "ok", "licence": "failed"}
    assert "activate the program" in render(report) and "FAILED" in render(report)


async def test_failing_and_hanging_programs_are_reported_without_crashing(tmp_path: Path) -> None:
    async with Simulator(config(tmp_path, failure_rate=1.0)) as sim:
        report = await probe(sim, tmp_path)
    assert not report.ok and statuses(report)["list"] == "failed"
    assert "simulated failure" in {c.name: c for c in report.checks}["list"].seen

    async with Simulator(config(tmp_path)) as sim:
        sim.hang_device("SIM0001")
        report = await probe(sim, tmp_path, device="SIM0001")
    assert not report.ok
    assert [c for c in report.checks if c.status == "failed"][0].seen.startswith("stopped: TimeoutError")

    report = await run_probe(f"ws://127.0.0.1:{free_port()}/", timeout_s=1.0, workdir=tmp_path / "p2")
    assert not report.ok and statuses(report) == {"connect": "failed"}
    assert "WebSocket API enabled" in render(report)


async def test_the_doai_vendor_probe_command(tmp_path: Path) -> None:
    out = tmp_path / "transcript.json"
    async with Simulator(config(tmp_path, deviations=frozenset({"msg_field", "single_connection"}))) as sim:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "doai", "vendor", "probe", "--url", sim.url, "--out", str(out),
            "--timeout", "3", "--connections", "3", "--default-folder", str(tmp_path / "pictures"),
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    text = stdout.decode()
    assert proc.returncode == 0, stderr.decode()
    assert "[DEVIATION] second connection" in text and "--vendor-connections 1" in text
    assert "list:msg_field" in text and f"Full transcript: {out}" in text
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["url"] == sim.url and doc["transcript"]
    assert {c["name"] for c in doc["checks"]} == ALL_CHECKS


async def test_no_phone_online_skips_the_device_checks(tmp_path: Path) -> None:
    async with Simulator(config(tmp_path)) as sim:
        for serial in sim.devices:
            sim.set_device_status(serial, "offline")
        report = await probe(sim, tmp_path)
        assert {a for a, _ in sim.calls} == {"list"}
    assert report.ok and report.device is None
    assert statuses(report) == {"connect": "ok", "list": "ok", "device": "skipped", "keep-alive ping": "ok",
                                "second connection": "ok"}
    assert "pass --device" in render(report)
