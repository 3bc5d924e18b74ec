"""`doai runs` driven as a subprocess against a live stack (real NATS, PostgreSQL, simulators over WebSocket):
create → watch (0) → a run with a failing device → watch (1) → retry only the failed → the retry succeeds
with the same params and step timeouts and the parent link; cancel; `--json` parses; errors exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from doai.up import System
from tests.backend_support import fetchval, wait_until

ROOT = Path(__file__).resolve().parent.parent

RECIPE = {
    "dsl": 1, "workflow_id": "cli-check", "title": "Battery charged",
    "params": {"label": {"type": "string", "pattern": "^[a-z]+$"}},
    "timeouts": {"step_ms": 10000, "upload_ms": 10000, "min_ms": 100, "max_ms": 60000},
    "steps": [
        {"id": "battery", "action": "adb_shell", "command": ["dumpsys", "battery"]},
        {"id": "charged", "action": "assert", "source": "battery", "pattern": "level: [5-9][0-9]"},
        {"id": "open", "action": "open_url", "url": "http://127.0.0.1/{{label}}"},
        {"id": "hold", "action": "wait", "ms": 20},
        {"id": "report", "action": "report"},
    ],
}
SLOW = {**RECIPE, "workflow_id": "cli-slow",
        "steps": [{"id": "hold", "action": "wait", "ms": 30000}, {"id": "report", "action": "report"}]}


async def doai(system: System, *args: str, token: str | None = None) -> tuple[int, str, str]:
    """Run `python -m doai.cli ...` without blocking the event loop the system runs in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOAI_")}
    env.update(DOAI_API_URL=system.api_url, DOAI_API_TOKEN=token or system.token, COLUMNS="200")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "doai.cli", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def publish(system: System, recipe: dict[str, Any]) -> None:
    for sim in system.sims:  # charged phones: the assert passes unless a test says otherwise
        for device in sim.devices.values():
            device.battery_level = 80
    async with system.client() as client:
        r = await client.post("/v1/workflows", json=recipe)
        assert r.status_code == 201, r.text


async def test_create_watch_fail_retry_the_failed_with_the_same_overrides(
    start_system: Callable[..., Awaitable[System]], database_url: str,
) -> None:
    system = await start_system(nodes=2, devices=2)
    await publish(system, RECIPE)

    code, out, err = await doai(system, "runs", "create", "cli-check", "-p", "label=first", "--all-online",
                                "--step-timeout", "battery=5000", "--watch", "--interval", "0.2", "--timeout", "60")
    assert code == 0, out + err
    assert "succeeded: 4 of 4 devices succeeded" in out

    weak_node, weak = "node-2", sorted(system.sims[1].devices)[0]
    system.sims[1].devices[weak].battery_level = 12  # the assert fails on this device only
    code, out, err = await doai(system, "runs", "create", "cli-check", "-p", "label=second", "--all-online",
                                "--step-timeout", "battery=4000", "--json")
    assert code == 0, err
    first = json.loads(out)["run_id"]
    code, out, err = await doai(system, "runs", "watch", first, "--interval", "0.2", "--timeout", "60")
    assert code == 1, out + err
    assert "failed: 3 of 4 devices succeeded" in out

    system.sims[1].devices[weak].battery_level = 90  # fixed: the retry can succeed
    code, out, err = await doai(system, "runs", "retry", first, "--states", "failed", "--json",
                                "--idempotency-key", "retry-1")
    assert code == 0, err
    created = json.loads(out)
    assert created["targets"] == 1
    again = await doai(system, "runs", "retry", first, "--states", "failed", "--json", "--idempotency-key", "retry-1")
    assert again[0] == 0 and json.loads(again[1])["run_id"] == created["run_id"], "the key replays the same run"
    code, out, err = await doai(system, "runs", "watch", created["run_id"], "--json", "--interval", "0.2",
                                "--timeout", "60")
    assert code == 0, out + err
    watched = json.loads(out)
    assert watched["outcome"] == "succeeded" and watched["parent_run_id"] == first

    retry_id = uuid.UUID(created["run_id"])
    conn = await asyncpg.connect(database_url)
    try:
        parent = await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", uuid.UUID(first))
        child = await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", retry_id)
        child_tasks = [tuple(r) for r in await conn.fetch(
            "SELECT node_id, device_serial, state FROM run_tasks WHERE run_id = $1", retry_id)]
    finally:
        await conn.close()
    assert child_tasks == [(weak_node, weak, "succeeded")], "exactly the failed device, and it succeeded"
    assert child["parent_run_id"] == uuid.UUID(first)
    assert (child["workflow_version"], child["params"], child["step_timeouts_ms"]) == (
        parent["workflow_version"], parent["params"], parent["step_timeouts_ms"])
    assert json.loads(child["step_timeouts_ms"])["battery"] == 4000 and json.loads(child["params"]) == {
        "label": "second"}

    code, out, _ = await doai(system, "runs", "show", first, "--json")
    assert code == 0 and json.loads(out)["retry_run_ids"] == [created["run_id"]], "the parent shows the link"
    code, out, _ = await doai(system, "runs", "show", created["run_id"], "--tasks", "--json")
    shown = json.loads(out)
    assert shown["parent_run_id"] == first and [t["device_serial"] for t in shown["tasks"]] == [weak]
    code, out, _ = await doai(system, "runs", "ls", "--workflow", "cli-check", "--json")
    assert code == 0 and {r["run_id"] for r in json.loads(out)} >= {first, created["run_id"]}
    code, out, _ = await doai(system, "runs", "ls")
    assert code == 0 and first in out


async def test_retry_refusals_change_nothing(start_system: Callable[..., Awaitable[System]], database_url: str) -> None:
    system = await start_system(nodes=1, devices=2)
    await publish(system, RECIPE)
    code, out, err = await doai(system, "runs", "create", "cli-check", "-p", "label=ok", "--all-online",
                                "--watch", "--json", "--interval", "0.2", "--timeout", "60")
    assert code == 0, out + err
    run_id = json.loads(out)["run_id"]
    runs_before = await fetchval(database_url, "SELECT count(*) FROM runs")
    # Nothing failed: no device to retry.
    code, out, err = await doai(system, "runs", "retry", run_id, "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == "no_targets"
    # A state that is not a final failure state.
    code, out, _ = await doai(system, "runs", "retry", run_id, "--states", "succeeded,running", "--json")
    assert code == 2 and json.loads(out)["error"]["status"] == 422
    # The same idempotency key as an earlier different request.
    code, out, _ = await doai(system, "runs", "create", "cli-check", "-p", "label=ok", "--all-online",
                              "--idempotency-key", "k-1", "--json")
    assert code == 0
    runs_before += 1
    code, out, _ = await doai(system, "runs", "retry", run_id, "--states", "succeeded", "--idempotency-key", "k-1",
                              "--json")
    assert code == 2 and json.loads(out)["error"]["status"] == 422  # state checked before the key
    # Unknown run, bad token.
    code, out, _ = await doai(system, "runs", "retry", str(uuid.uuid4()), "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == "run_not_found"
    code, _, err = await doai(system, "runs", "ls", token="wrong-token-wrong-token-wrong-token")
    assert code == 2 and "401" in err
    assert await fetchval(database_url, "SELECT count(*) FROM runs") == runs_before
    assert await fetchval(database_url, "SELECT count(*) FROM runs WHERE parent_run_id IS NOT NULL") == 0


async def test_cancel_ends_the_watch_with_1(start_system: Callable[..., Awaitable[System]], database_url: str) -> None:
    system = await start_system(nodes=1, devices=2)
    await publish(system, SLOW)
    code, out, err = await doai(system, "runs", "create", "cli-slow", "-p", "label=x", "--node", "node-1", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    await wait_until(lambda: fetchval(database_url, "SELECT count(*) = 2 FROM run_tasks WHERE run_id = $1"
                                      " AND state = 'running'", uuid.UUID(run_id)), 30, "both devices running")
    # A running run cannot be retried yet: 409, nothing made.
    code, out, _ = await doai(system, "runs", "retry", run_id, "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == "run_not_finished"
    code, out, err = await doai(system, "runs", "cancel", run_id, "--json")
    assert code == 0 and json.loads(out)["status"] == "cancelled", err
    code, out, err = await doai(system, "runs", "watch", run_id, "--interval", "0.2", "--timeout", "60")
    assert code == 1 and "cancelled" in out, out + err
    code, _, err = await doai(system, "runs", "watch", str(uuid.uuid4()))
    assert code == 2 and "run_not_found" in err
    code, _, err = await doai(system, "runs", "create", "cli-slow", "--device", "no-slash")
    assert code == 2 and "NODE/SERIAL" in err
    assert await fetchval(database_url, "SELECT count(*) FROM runs") == 1
