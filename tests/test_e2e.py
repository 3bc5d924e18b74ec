"""End to end: REST → JetStream → node agents → simulated phones → JetStream → PostgreSQL.

Real nats-server, real PostgreSQL, the vendor simulator over real WebSockets.
Two runs are queued back to back on 2 nodes × 10 devices with 3 slots per
node, so every device has two jobs and every node more work than slots: the
checks in PostgreSQL then prove the device lock and the slot limit held.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.backend_support import all_tasks
from tests.conftest import TEST_TOKEN

SLOTS = 3
NODES = 2
DEVICES = 10
PARAMS = {"url": "https://example.org/e2e?a=1&b=2", "youtubeVideoId": "vid_E2E-01"}


async def wait_completed(client: httpx.AsyncClient, run_id: str, timeout_s: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        run: dict[str, Any] = (await client.get(f"/v1/runs/{run_id}")).json()
        if run["status"] in ("completed", "cancelled"):
            # The summary does not carry tasks: the test reads them from their own endpoints.
            run["task_rows"] = await all_tasks(client, run_id, page=7)
            run["artifacts"] = (await client.get(f"/v1/runs/{run_id}/artifacts")).json()["artifacts"]
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}: {run['counts']}"
        await asyncio.sleep(0.1)


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """Largest number of intervals open at one instant (an end before a start at equal times)."""
    points = [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals]
    points.sort(key=lambda p: (p[0], p[1]))
    open_now = peak = 0
    for _, delta in points:
        open_now += delta
        peak = max(peak, open_now)
    return peak


async def test_two_runs_on_two_nodes_complete_within_device_lock_and_slots(
    start_system: Any, database_url: str, log_file: Path
) -> None:
    system = await start_system(nodes=NODES, devices=DEVICES, slots=SLOTS, screen_latency_ms=40.0)
    async with system.client() as client:
        first = await client.post("/v1/runs", json={
            "workflow_id": "device-smoke", "params": PARAMS, "targets": {"all_online": True},
        })
        second = await client.post("/v1/runs", json={
            "workflow_id": "device-smoke", "workflow_version": 1, "params": PARAMS,
            "targets": {"nodes": ["node-1", "node-2"]}, "step_timeouts_ms": {"open": 20_000},
        })
        assert first.status_code == 201, first.text
        assert second.status_code == 201, second.text
        assert first.json()["targets"] == second.json()["targets"] == NODES * DEVICES
        run_ids = [first.json()["run_id"], second.json()["run_id"]]
        runs = [await wait_completed(client, rid) for rid in run_ids]

    # The REST view of each run.
    for run in runs:
        assert run["status"] == "completed"
        assert run["workflow_id"] == "device-smoke" and run["workflow_version"] == 1
        assert run["counts"] == {"succeeded": NODES * DEVICES}
        assert run["outcome"] == "succeeded" and run["targets"] == run["succeeded"] == NODES * DEVICES
        assert run["failing_steps"] == [] and run["timings"]["measured_tasks"] == NODES * DEVICES
        tasks = run["task_rows"]
        assert len(tasks) == NODES * DEVICES
        keys = [(t["node_id"], t["device_serial"]) for t in tasks]
        assert keys == sorted(keys)  # the pages follow each other in one stable order
        arts = run["artifacts"]
        for task in tasks:
            assert task["state"] == "succeeded" and task["attempt"] == 1 and task["error"] is None
            assert task["started_at"].endswith("Z") and task["finished_at"].endswith("Z")
            assert task["started_at"] < task["finished_at"]
            [artifact] = [a for a in arts if (a["node_id"], a["device_serial"]) == (task["node_id"],
                                                                                    task["device_serial"])]
            key_parts = artifact["key"].split("/")
            assert key_parts[:4] == ["vid_E2E-01", task["node_id"], task["device_serial"], run["run_id"]]
            assert key_parts[4].removesuffix(".png").isdigit()

    # PostgreSQL: every task succeeded, the device lock and the slot limit held.
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT node_id, device_serial, state, started_at, finished_at FROM run_tasks")
        artifacts = await conn.fetch("SELECT key, uri, bytes, sha256 FROM artifacts")
        steps = await conn.fetchval("SELECT count(*) FROM step_results WHERE state = 'ok'")
        dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
        undispatched = await conn.fetchval("SELECT count(*) FROM runs WHERE dispatched_at IS NULL")
    finally:
        await conn.close()
    assert len(rows) == 2 * NODES * DEVICES
    assert {r["state"] for r in rows} == {"succeeded"}
    by_device: dict[tuple[str, str], list[tuple[datetime, datetime]]] = {}
    by_node: dict[str, list[tuple[datetime, datetime]]] = {}
    for r in rows:
        span = (r["started_at"], r["finished_at"])
        by_device.setdefault((r["node_id"], r["device_serial"]), []).append(span)
        by_node.setdefault(r["node_id"], []).append(span)
    assert len(by_device) == NODES * DEVICES
    for device, spans in by_device.items():
        assert len(spans) == 2
        assert max_overlap(spans) == 1, f"{device} ran two tasks at once: {spans}"
    for node, spans in by_node.items():
        # Never more than the slots; and with 20 jobs waiting, all slots were used.
        assert max_overlap(spans) == SLOTS, f"{node} ran {max_overlap(spans)} tasks at once"
    assert steps == 2 * NODES * DEVICES * 10
    assert dead == 0
    assert undispatched == 0  # stamped even when a node's first event was folded before the relay committed

    # Screenshots: real PNG files at the path convention's place.
    assert len(artifacts) == 2 * NODES * DEVICES
    for a in artifacts:
        path = system.artifact_dir / a["key"]
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) == a["bytes"]

    # Logs: every line about a device task carries the three context fields.
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    task_lines = [x for x in lines if x.get("event") in {"Task started", "Step started", "Step ok", "Task finished"}]
    mine = [x for x in task_lines if x.get("run_id") in run_ids]
    assert len([x for x in mine if x["event"] == "Task started"]) == 2 * NODES * DEVICES
    for line in task_lines:
        assert line.get("run_id") and line.get("node_id") and line.get("device_serial"), line
    assert TEST_TOKEN not in log_file.read_text()
