"""A run's summary, its paged tasks, one task and a device's history, against the real backend.

The backend alone on real PostgreSQL and nats-server: runs are created through
the API on a seeded fleet, then their tasks are given the states, timestamps
and steps the aggregator would fold (no node agents: what is tested is what the
API reads). Each figure of the summary is checked against a count made here
from the seeded truth.
"""

from __future__ import annotations

import statistics
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from doai.embedded import EmbeddedNats
from tests.backend_support import all_tasks, fleet_of, publish_recipe, run_body, running_backend, seed_fleet

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


async def create_run(client: httpx.AsyncClient, **fields: Any) -> str:
    r = await client.post("/v1/runs", json=run_body(**fields))
    assert r.status_code == 201, r.text
    run_id: str = r.json()["run_id"]
    return run_id


async def set_task(conn: asyncpg.Connection, run_id: str, node: str, serial: str, state: str,
                   duration_s: float | None = None, error: str | None = None, failed_step: str | None = None,
                   start_offset_s: float = 0.0) -> None:
    started = T0 + timedelta(seconds=start_offset_s) if duration_s is not None else None
    finished = started + timedelta(seconds=duration_s) if started is not None and duration_s is not None else None
    await conn.execute(
        "UPDATE run_tasks SET state = $4, attempt = 1, seq = 5, started_at = $5, finished_at = $6, error = $7,"
        " failed_step = $8 WHERE run_id = $1 AND node_id = $2 AND device_serial = $3",
        uuid.UUID(run_id), node, serial, state, started, finished, error, failed_step)


async def test_summary_outcome_counts_failing_steps_and_timings(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    fleet = fleet_of(2, 5)
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet)
        run_id = await create_run(client, step_timeouts_ms={"open": 20_000})
        fresh = (await client.get(f"/v1/runs/{run_id}")).json()
        assert fresh["status"] == "pending" and fresh["outcome"] is None
        assert fresh["counts"] == {"queued": 10} and fresh["targets"] == 10 and fresh["succeeded"] == 0
        assert fresh["step_timeouts_ms"]["open"] == 20_000 and fresh["params"] == run_body()["params"]
        assert fresh["timings"] == {"first_started_at": None, "last_finished_at": None, "p50_task_ms": None,
                                    "p95_task_ms": None, "measured_tasks": 0}
        assert "tasks" not in fresh

        conn = await asyncpg.connect(database_url)
        try:
            n1, n2 = fleet["node-1"], fleet["node-2"]
            for i, serial in enumerate(n1):  # 1..5 s
                await set_task(conn, run_id, "node-1", serial, "succeeded", duration_s=1.0 + i, start_offset_s=i)
            for serial in n2[:3]:
                await set_task(conn, run_id, "node-2", serial, "timed_out", duration_s=30.0,
                               error="step_timeout: no result within 20 s", failed_step="shot")
            await set_task(conn, run_id, "node-2", n2[3], "failed", duration_s=2.0,
                           error="assert_failed: title did not match", failed_step="open")
            await set_task(conn, run_id, "node-2", n2[4], "cancelled", duration_s=500.0, start_offset_s=-60,
                           error="run cancelled")
            await conn.execute("UPDATE runs SET status = 'running' WHERE run_id = $1", uuid.UUID(run_id))
            running = (await client.get(f"/v1/runs/{run_id}")).json()
            assert running["status"] == "running" and running["outcome"] is None

            await conn.execute("UPDATE runs SET status = 'completed', finished_at = now() WHERE run_id = $1",
                               uuid.UUID(run_id))
            run = (await client.get(f"/v1/runs/{run_id}")).json()
            assert run["status"] == "completed" and run["outcome"] == "failed"
            assert run["counts"] == {"succeeded": 5, "timed_out": 3, "failed": 1, "cancelled": 1}
            assert (run["targets"], run["succeeded"], run["not_succeeded"]) == (10, 5, 5)
            assert run["nodes"] == [
                {"node_id": "node-1", "tasks": 5, "counts": {"succeeded": 5}},
                {"node_id": "node-2", "tasks": 5, "counts": {"cancelled": 1, "failed": 1, "timed_out": 3}},
            ]
            assert run["failing_steps"] == [
                {"step_id": "shot", "error_code": "step_timeout", "tasks": 3,
                 "example": "step_timeout: no result within 20 s"},
                {"step_id": "open", "error_code": "assert_failed", "tasks": 1,
                 "example": "assert_failed: title did not match"},
            ]
            # Percentiles without the cancelled task (500 s would move both); PostgreSQL's percentile_cont
            # interpolates like statistics.quantiles(method="inclusive").
            durations = [1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 30000.0, 30000.0, 30000.0, 2000.0]
            q = statistics.quantiles(durations, n=100, method="inclusive")
            timings = run["timings"]
            assert timings["measured_tasks"] == 9
            assert timings["p50_task_ms"] == round(statistics.median(durations))
            assert timings["p95_task_ms"] == round(q[94])
            assert timings["first_started_at"] == "2026-01-02T03:03:05Z"  # the cancelled task started first
            assert timings["last_finished_at"] == "2026-01-02T03:11:25Z"  # ... and finished last

            # Every device succeeded: outcome succeeded. Cancelled: outcome cancelled whatever the tasks.
            ok_run = await create_run(client, targets={"nodes": ["node-1"]})
            for serial in n1:
                await set_task(conn, ok_run, "node-1", serial, "succeeded", duration_s=1.0)
            await conn.execute("UPDATE runs SET status = 'completed' WHERE run_id = $1", uuid.UUID(ok_run))
            ok = (await client.get(f"/v1/runs/{ok_run}")).json()
            assert ok["outcome"] == "succeeded" and ok["failing_steps"] == [] and ok["not_succeeded"] == 0
            # One device `lost` (or any state but succeeded) in a completed run: failed.
            await set_task(conn, ok_run, "node-1", n1[0], "lost")
            assert (await client.get(f"/v1/runs/{ok_run}")).json()["outcome"] == "failed"
            gone = await create_run(client, targets={"nodes": ["node-2"]})
            assert (await client.post(f"/v1/runs/{gone}/cancel")).status_code == 202
            cancelled = (await client.get(f"/v1/runs/{gone}")).json()
            assert cancelled["outcome"] == "cancelled" and cancelled["counts"] == {"cancelled": 5}
        finally:
            await conn.close()


async def test_tasks_paged_filtered_one_task_and_device_history(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    fleet = fleet_of(3, 4)
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet)
        first = await create_run(client)
        second = await create_run(client)
        conn = await asyncpg.connect(database_url)
        try:
            serial = fleet["node-2"][1]
            await set_task(conn, first, "node-2", serial, "failed", duration_s=3.0,
                           error="assert_failed: no", failed_step="check")
            await conn.executemany(
                "INSERT INTO step_results (run_id, node_id, device_serial, step_id, idx, action, state, seq,"
                " started_at, finished_at, output, error) VALUES ($1, 'node-2', $2, $3, $4, $5, $6, 1, $7, $7, $8, $9)",
                [(uuid.UUID(first), serial, "open", 0, "open_url", "ok", T0, "opened", None),
                 (uuid.UUID(first), serial, "check", 1, "assert_text", "failed", T0, None, "assert_failed: no")])
        finally:
            await conn.close()

        # Pages of 5 over 12 tasks: every task once, in (node, serial) order.
        everything = await all_tasks(client, first, page=5)
        keys = [(t["node_id"], t["device_serial"]) for t in everything]
        assert keys == sorted((n, s) for n, serials in fleet.items() for s in serials)
        assert [t["run_id"] for t in everything] == [first] * 12
        page = (await client.get(f"/v1/runs/{first}/tasks", params={"limit": 5})).json()
        assert len(page["tasks"]) == 5 and page["next_cursor"]
        last = (await client.get(f"/v1/runs/{first}/tasks", params={"limit": 12})).json()
        assert len(last["tasks"]) == 12 and last["next_cursor"] is None

        # Filters, alone and with paging.
        failed = await all_tasks(client, first, state="failed")
        assert [(t["device_serial"], t["duration_ms"], t["failed_step"]) for t in failed] == [(serial, 3000, "check")]
        node3 = await all_tasks(client, first, page=1, node_id="node-3")
        assert [t["device_serial"] for t in node3] == fleet["node-3"]
        assert [t["node_id"] for t in await all_tasks(client, first, serial=serial)] == ["node-2"]
        assert await all_tasks(client, first, state="lost") == []

        # One task with its steps in order and its (no) artifacts.
        r = await client.get(f"/v1/runs/{first}/tasks/node-2/{serial}")
        assert r.status_code == 200, r.text
        detail = r.json()
        assert detail["task"] == failed[0] and detail["artifacts"] == []
        assert [(s["step_id"], s["state"], s["output"], s["error"]) for s in detail["steps"]] == [
            ("open", "ok", "opened", None), ("check", "failed", None, "assert_failed: no")]

        # A device's history: newest run first, paged, with each run's workflow.
        history = (await client.get(f"/v1/devices/node-2/{serial}/tasks", params={"limit": 1})).json()
        assert [(t["run_id"], t["workflow_id"], t["workflow_version"]) for t in history["tasks"]] == [
            (second, "device-smoke", 1)]
        older = (await client.get(f"/v1/devices/node-2/{serial}/tasks",
                                  params={"limit": 1, "cursor": history["next_cursor"]})).json()
        assert [(t["run_id"], t["state"]) for t in older["tasks"]] == [(first, "failed")]
        assert older["next_cursor"] is None
        only_failed = (await client.get(f"/v1/devices/node-2/{serial}/tasks", params={"state": "failed"})).json()
        assert [t["run_id"] for t in only_failed["tasks"]] == [first]
        assert (await client.get("/v1/devices/node-9/NOPE/tasks")).json() == {"tasks": [], "next_cursor": None}

        # Refusals: 404 for what does not exist, 422 for unknown parameters, bad cursors and bad filters.
        unknown_run = "6f1c7a3e-0000-4000-8000-000000000000"
        for path in (f"/v1/runs/{unknown_run}/tasks", f"/v1/runs/{unknown_run}/tasks/node-1/{serial}"):
            r = await client.get(path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "run_not_found", r.text
        r = await client.get(f"/v1/runs/{first}/tasks/node-1/GHOST")
        assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        for path, params in [
            (f"/v1/runs/{first}", {"verbose": "1"}),
            (f"/v1/runs/{first}/tasks", {"page": "2"}),
            (f"/v1/runs/{first}/tasks", {"cursor": "bm90LW91cnM"}),
            (f"/v1/runs/{first}/tasks", {"state": "exploded"}),
            (f"/v1/runs/{first}/tasks", {"limit": "0"}),
            (f"/v1/runs/{first}/tasks", {"node_id": "bad node"}),
            (f"/v1/runs/{first}/tasks/node-2/{serial}", {"steps": "all"}),
            (f"/v1/devices/node-2/{serial}/tasks", {"run_id": first}),
            (f"/v1/devices/node-2/{serial}/tasks", {"cursor": "WyJ4IiwieSJd"}),  # ["x","y"]: not a date
        ]:
            r = await client.get(path, params=params)
            assert r.status_code == 422, (path, params, r.text)
            assert r.json()["error"]["details"], r.text
