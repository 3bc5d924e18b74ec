"""A node agent killed with SIGKILL mid-run: its tasks become `lost`, REST and the views agree it is
offline, run creation refuses it; on return its real outcomes replace `lost`. A run cancelled while
its node is down ends `cancelled` with those tasks `cancelled`.

Real nats-server, PostgreSQL, backend and aggregator (in-process, with a 3 s liveness window and
grace), the simulator over WebSocket, and the node agent as a child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from doai.embedded import EmbeddedNats
from services.aggregator.main import AggregatorSettings, run_aggregator
from services.simulator import Simulator, SimulatorConfig
from tests.backend_support import all_tasks, running_backend
from tests.conftest import creds_file
from tests.node_support import NodeProcess, provision_node, recipe

NODE = "node-L"
DEVICES = 4
GRACE_S = 3.0
STEPS = [
    {"id": "probe", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
    {"id": "work", "action": "wait", "ms": 6000},
    {"id": "report", "action": "report"},
]


async def poll(check: Callable[[], Awaitable[Any]], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for: {what}"
        await asyncio.sleep(0.1)


@dataclass
class Lab:
    client: httpx.AsyncClient
    node: NodeProcess
    db: asyncpg.Connection
    serials: list[str]

    async def run(self, run_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/runs/{run_id}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        body["tasks"] = await all_tasks(self.client, run_id)  # the summary has none: read them from their pages
        return body

    async def task_states(self, run_id: str) -> list[str]:
        return sorted(t["state"] for t in (await self.run(run_id))["tasks"])

    async def start_run(self) -> str:
        r = await self.client.post("/v1/runs", json={"workflow_id": "lost-test", "params": {},
                                                     "targets": {"nodes": [NODE]}})
        assert r.status_code == 201, r.text
        run_id: str = r.json()["run_id"]

        async def all_running() -> bool:
            return await self.task_states(run_id) == ["running"] * DEVICES
        await poll(all_running, 60, "every task running")
        return run_id


@contextlib.asynccontextmanager
async def lab(nats_server: EmbeddedNats, database_url: str, tmp_path: Path) -> AsyncIterator[Lab]:
    stop = asyncio.Event()
    settings = AggregatorSettings(database_url=database_url, nats_url=nats_server.url, liveness_window_s=GRACE_S,
                                  lost_after_s=GRACE_S, housekeeping_s=0.2, nats_creds=str(creds_file("aggregator")),
                                  nats_ca=str(nats_server.ca_file) if nats_server.ca_file else None)
    async with Simulator(SimulatorConfig(devices=DEVICES, seed=11, default_latency_ms=2.0)) as sim, \
            running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        aggregator = asyncio.create_task(run_aggregator(settings, stop), name="test-aggregator")
        await provision_node(nats_server.url, NODE)  # its identity and consumer, as the backend would
        node = NodeProcess(node_id=NODE, nats_url=nats_server.url, vendor_url=sim.url, state_dir=tmp_path / "state",
                           artifact_dir=tmp_path / "artifacts", log_path=tmp_path / "node.jsonl", slots=DEVICES)
        node.env["DOAI_INVENTORY_INTERVAL_S"] = "0.5"
        node.env["DOAI_INVENTORY_SNAPSHOT_S"] = "1"  # below the 3 s liveness window (device liveness reads listings)
        conn = await asyncpg.connect(database_url)
        try:
            r = await client.post("/v1/workflows", content=msgspec.json.encode(recipe(STEPS, workflow_id="lost-test")))
            assert r.status_code == 201, r.text
            node.start()

            async def online() -> bool:
                devices = (await client.get("/v1/devices")).json()["devices"]
                return sum(d["online"] for d in devices if d["node_id"] == NODE) == DEVICES
            await poll(online, 60, "the node's devices online")
            yield Lab(client, node, conn, sorted(sim.devices))
        finally:
            node.stop()
            await conn.close()
            stop.set()
            await asyncio.wait_for(aggregator, 30)


async def test_killed_node_tasks_become_lost_then_real_outcomes_replace_them(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path
) -> None:
    async with lab(nats_server, database_url, tmp_path) as lab_:
        run_id = await lab_.start_run()
        lab_.node.kill9()
        killed_at = time.monotonic()

        async def all_lost() -> bool:
            return await lab_.task_states(run_id) == ["lost"] * DEVICES
        await poll(all_lost, 20, "every task of the killed node lost")
        assert time.monotonic() - killed_at < GRACE_S + 10
        run = await lab_.run(run_id)
        assert run["counts"] == {"lost": DEVICES}
        assert all(t["error"].startswith("node_lost:") for t in run["tasks"])
        summary = await lab_.db.fetchrow("SELECT lost, running, done FROM run_summary WHERE run_id = $1",
                                         uuid.UUID(run_id))
        assert dict(summary) == {"lost": DEVICES, "running": 0, "done": DEVICES}

        # One answer to "is it alive": REST nodes, REST devices, the views, run creation.
        nodes = {n["node_id"]: n for n in (await lab_.client.get("/v1/nodes")).json()["nodes"]}
        assert nodes[NODE]["online"] is False and nodes[NODE]["vendor_connected"] is False
        devices = [d for d in (await lab_.client.get("/v1/devices")).json()["devices"] if d["node_id"] == NODE]
        assert len(devices) == DEVICES and not any(d["online"] for d in devices)
        assert {d["liveness"] for d in devices} == {"stale"}
        view_node = await lab_.db.fetchrow("SELECT online, vendor_connected, last_seen FROM node_liveness"
                                           " WHERE node_id = $1", NODE)
        assert (view_node["online"], view_node["vendor_connected"]) == (False, False)
        assert nodes[NODE]["last_seen"].replace("Z", "") == view_node["last_seen"].isoformat().replace("+00:00", "")
        assert await lab_.db.fetchval("SELECT count(*) FROM device_liveness WHERE node_id = $1 AND online",
                                      NODE) == 0
        runs_before = await lab_.db.fetchval("SELECT count(*) FROM runs")
        for targets in ({"nodes": [NODE]}, {"devices": [{"node_id": NODE, "serial": lab_.serials[0]}]},
                        {"all_online": True}):
            refused = await lab_.client.post("/v1/runs", json={"workflow_id": "lost-test", "params": {},
                                                               "targets": targets})
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "no_targets", refused.text
        assert await lab_.db.fetchval("SELECT count(*) FROM runs") == runs_before

        # The node comes back: its journal reports the interrupted tasks, runs them again, and the
        # real outcomes replace `lost`.
        lab_.node.start()

        async def all_succeeded() -> bool:
            return await lab_.task_states(run_id) == ["succeeded"] * DEVICES
        await poll(all_succeeded, 90, "every task succeeded after the node's return")
        run = await lab_.run(run_id)
        assert run["status"] == "completed" and run["counts"] == {"succeeded": DEVICES}
        assert all(t["attempt"] == 2 and t["error"] is None for t in run["tasks"])
        assert await lab_.db.fetchval("SELECT count(*) FROM run_tasks WHERE lost_at IS NOT NULL") == 0
        nodes = {n["node_id"]: n for n in (await lab_.client.get("/v1/nodes")).json()["nodes"]}
        assert nodes[NODE]["online"] is True and nodes[NODE]["vendor_connected"] is True


@pytest.mark.parametrize("when", ["before_lost", "after_lost"])
async def test_run_cancelled_while_its_node_is_down_ends_cancelled(
    nats_server: EmbeddedNats, database_url: str, tmp_path: Path, when: str
) -> None:
    """Cancelled before the grace ends: the housekeeping cancels the open tasks of the silent node.
    Cancelled once they are `lost`: the cancel itself makes them `cancelled`, in its transaction."""
    async with lab(nats_server, database_url, tmp_path) as lab_:
        run_id = await lab_.start_run()
        lab_.node.kill9()
        seqs = {r["device_serial"]: r["seq"] for r in await lab_.db.fetch(
            "SELECT device_serial, seq FROM run_tasks WHERE run_id = $1", uuid.UUID(run_id))}
        if when == "after_lost":
            async def all_lost() -> bool:
                return await lab_.task_states(run_id) == ["lost"] * DEVICES
            await poll(all_lost, 20, "every task of the killed node lost")
        cancelled = await lab_.client.post(f"/v1/runs/{run_id}/cancel")
        assert cancelled.status_code in (200, 202), cancelled.text
        if when == "after_lost":
            run = await lab_.run(run_id)
            assert run["status"] == "cancelled" and run["counts"] == {"cancelled": DEVICES}
            assert all("was lost" in t["error"] for t in run["tasks"])

        async def all_cancelled() -> bool:
            run = await lab_.run(run_id)
            return run["status"] == "cancelled" and run["counts"] == {"cancelled": DEVICES}
        await poll(all_cancelled, 20, "the cancelled run's tasks on the dead node cancelled")
        assert await lab_.db.fetchval("SELECT count(*) FROM run_tasks WHERE state = 'lost'") == 0

        # The node returns and reports on each task (a higher seq): the run stays cancelled.
        lab_.node.start()

        async def reported() -> bool:
            rows = await lab_.db.fetch("SELECT device_serial, seq FROM run_tasks WHERE run_id = $1",
                                       uuid.UUID(run_id))
            return all(r["seq"] > seqs[r["device_serial"]] for r in rows)
        await poll(reported, 60, "the returned node's reports on every task")

        async def settled() -> bool:
            return await lab_.task_states(run_id) == ["cancelled"] * DEVICES
        await poll(settled, 30, "every task cancelled after the node's return")
        run = await lab_.run(run_id)
        assert run["status"] == "cancelled" and run["counts"] == {"cancelled": DEVICES}
