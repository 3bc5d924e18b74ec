"""`doai tap` as a subprocess against a live stack: the run, node and kind filters are NATS subject filters,
so a tap on one run prints exactly that run's events and nothing else while another run is in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from doai.up import System
from tests.backend_support import fetchval, wait_until
from tests.conftest import AuthNats

ROOT = Path(__file__).resolve().parent.parent

RECIPE = {
    "dsl": 1, "workflow_id": "tap-check", "title": "Two steps with a pause",
    "timeouts": {"step_ms": 20000, "upload_ms": 10000, "min_ms": 100, "max_ms": 60000},
    "steps": [{"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
              {"id": "hold", "action": "wait", "ms": 4000},
              {"id": "report", "action": "report"}],
}


class Tap:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def stop(self) -> list[dict[str, Any]]:
        self.proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout=30)
        assert self.proc.returncode == 0, err.decode()
        return [json.loads(line) for line in out.decode().splitlines()]


async def start_tap(nats: AuthNats, *args: str) -> Tap:
    """`doai tap` with the read-only tap identity."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOAI_", "NATS_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "doai.cli", "tap", "--nats-url", nats.url, "--creds", str(nats.creds("tap")), "--json",
        *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    first = await asyncio.wait_for(proc.stderr.readline(), timeout=30)  # subscribed: events from now on
    assert b"listening on" in first, first
    return Tap(proc)


async def test_tap_on_one_run_prints_exactly_its_events_while_another_is_in_flight(
    start_system: Callable[..., Awaitable[System]], nats_server: AuthNats, database_url: str,
) -> None:
    system = await start_system(nodes=2, devices=2)
    async with system.client() as client:
        assert (await client.post("/v1/workflows", json=RECIPE)).status_code == 201
        body = {"workflow_id": "tap-check", "targets": {"all_online": True}}
        # The taps that need no run id listen before either run exists (started together: a loaded
        # machine takes seconds per Python start-up); the run tap starts as soon as run A has its id, while
        # run A's devices still wait 4 s, and run B, queued behind run A on every device, is posted after it.
        serial = sorted(system.sims[1].devices)[0]
        by_node, by_device, everything = await asyncio.gather(
            start_tap(nats_server, "--node", "node-1", "--kind", "task"),
            start_tap(nats_server, "--device", serial, "--kind", "task,step"),
            start_tap(nats_server))
        run_a = (await client.post("/v1/runs", json=body)).json()["run_id"]
        by_run = await start_tap(nats_server, "--run", run_a)
        run_b = (await client.post("/v1/runs", json=body)).json()["run_id"]
    for run in (run_a, run_b):
        await wait_until(lambda run=run: fetchval(database_url, "SELECT status = 'completed' FROM runs"
                                                  " WHERE run_id = $1", uuid.UUID(run)), 60, f"run {run} completed")
    seen_a = await by_run.stop()
    seen_node = await by_node.stop()
    seen_device = await by_device.stop()
    seen_all = await everything.stop()

    # The unfiltered tap saw both runs' endings: run B was in flight too.
    finals = {(e["event"]["run_id"], e["event"]["device_serial"]) for e in seen_all
              if e["event"]["kind"] == "task" and e["event"]["state"] == "succeeded"}
    assert len(finals) == 8 and {r for r, _ in finals} == {run_a, run_b}
    # The run tap: only run A's events, and all of its devices' endings.
    assert seen_a and {e["event"]["run_id"] for e in seen_a} == {run_a}
    assert all(e["subject"].endswith("." + run_a) for e in seen_a)
    assert {(e["event"]["node_id"], e["event"]["device_serial"]) for e in seen_a
            if e["event"]["kind"] == "task" and e["event"]["state"] == "succeeded"} == {
        (f"node-{i}", s) for i, sim in enumerate(system.sims, start=1) for s in sim.devices}
    # The node tap: node-1's task events of both runs, nothing else.
    assert {(e["event"]["node_id"], e["event"]["kind"]) for e in seen_node} == {("node-1", "task")}
    assert {e["event"]["run_id"] for e in seen_node} == {run_a, run_b}
    # The device tap: that device's task and step events only.
    assert {e["event"]["device_serial"] for e in seen_device} == {serial}
    assert {e["event"]["kind"] for e in seen_device} == {"task", "step"}


async def test_tap_refuses_an_unknown_kind_and_an_unreachable_server() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOAI_", "NATS_"))}
    for args, expected in ((["--kind", "task,bogus"], "unknown kind"),
                           (["--run", str(uuid.uuid4()), "--kind", "node"], "task, step and artifact"),
                           (["--nats-url", "nats://127.0.0.1:1"], "cannot connect")):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "doai.cli", "tap", *args, cwd=ROOT,
                                                    env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode == 2 and expected in err.decode() and not out, (args, err)
