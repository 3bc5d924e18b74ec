"""Cancelling a run end to end, and what the run view and artifact list show of a finished task.

Real backend, aggregator, node agent and simulated phones: one slot and slow
screenshots, so when the first device has finished the others are still
running or queued. The cancel reaches the node once; the run ends
`cancelled`; the finished task keeps its state and timestamps.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from tests.backend_support import PARAMS, all_tasks, stream_messages, task_detail

TERMINAL = {"succeeded", "failed", "timed_out", "cancelled", "skipped"}


async def poll_run(client: httpx.AsyncClient, run_id: str, done: Any, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        run: dict[str, Any] = (await client.get(f"/v1/runs/{run_id}")).json()
        if done(run):
            return run
        assert time.monotonic() < deadline, f"run {run_id}: {run['status']} {run['counts']}"
        await asyncio.sleep(0.05)


async def test_cancel_keeps_finished_tasks_and_stops_the_rest(start_system: Any, nats_server: Any) -> None:
    system = await start_system(nodes=1, devices=4, slots=1, screen_latency_ms=600.0)
    async with system.client() as client:
        r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                "targets": {"all_online": True}})
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        await poll_run(client, run_id, lambda run: run["counts"].get("succeeded", 0) >= 1)
        finished = {t["device_serial"]: t for t in await all_tasks(client, run_id) if t["state"] == "succeeded"}

        r = await client.post(f"/v1/runs/{run_id}/cancel")
        assert r.status_code == 202, r.text
        assert r.json() == {"run_id": run_id, "status": "cancelled", "nodes": 1}
        again = await client.post(f"/v1/runs/{run_id}/cancel")  # harmless, sends nothing new
        assert again.status_code == 202 and again.json()["status"] == "cancelled"

        run = await poll_run(client, run_id, lambda run: set(run["counts"]) <= TERMINAL)
        # The nodes' last events are folded and the run is still the backend's `cancelled`.
        assert run["status"] == "cancelled" and run["finished_at"] and run["outcome"] == "cancelled"
        for t in await all_tasks(client, run_id, page=1):
            if t["device_serial"] in finished:
                assert t == finished[t["device_serial"]]  # kept as it was
            else:
                assert t["state"] in ("cancelled", "succeeded"), t
        assert run["counts"].get("cancelled", 0) >= 1

        # The finished task: its steps in order, its screenshot as a local file.
        task = await task_detail(client, run_id, "node-1", next(iter(finished)))
        assert task["task"] == finished[task["task"]["device_serial"]]
        assert [s["index"] for s in task["steps"]] == list(range(len(task["steps"])))
        assert {s["state"] for s in task["steps"]} == {"ok"} and len(task["steps"]) == 10
        assert all(s["started_at"] <= s["finished_at"] for s in task["steps"])
        arts = (await client.get(f"/v1/runs/{run_id}/artifacts")).json()
        assert arts["run_id"] == run_id
        mine = [a for a in arts["artifacts"] if a["device_serial"] == task["task"]["device_serial"]]
        assert mine == task["artifacts"]
        assert len(mine) == 1 and mine[0]["store"] == "local" and mine[0]["error"] is None
        path = Path(mine[0]["path"])
        assert path.is_file() and path.stat().st_size == mine[0]["bytes"]
        assert path.read_bytes().startswith(b"\x89PNG") and mine[0]["kind"] == "screenshot"
        # The link downloads the file over HTTP, without the token (signed, expiring).
        assert mine[0]["url"].startswith(f"{system.api_url}/v1/artifacts/local/{mine[0]['key']}?expires=")
        async with httpx.AsyncClient() as anonymous:
            got = await anonymous.get(mine[0]["url"])
        assert got.status_code == 200 and got.content == path.read_bytes(), got.text
        assert got.headers["content-type"] == "image/png"

        # A finished run cannot be cancelled; an unknown one is 404.
        serial = task["task"]["device_serial"]
        r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                "targets": {"devices": [{"node_id": "node-1", "serial": serial}]}})
        done = await poll_run(client, r.json()["run_id"], lambda run: run["status"] == "completed")
        r = await client.post(f"/v1/runs/{done['run_id']}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "run_finished"
        r = await client.post("/v1/runs/6f1c7a3e-0000-4000-8000-000000000000/cancel")
        assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found"

    kinds = [(subject, data) for subject, data, _ in await stream_messages(nats_server.url)]
    cancels = [d for _, d in kinds if b'"type":"cancel"' in d and run_id.encode() in d]
    assert len(cancels) == 1
