"""Helpers for the backend tests: the real backend (uvicorn) alone, on the test's PostgreSQL and NATS.

The fleet is written straight into the `devices` table (what the aggregator
would fold from node inventories), so these tests need no node agents.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
from nats.js import JetStreamContext

from contracts.subjects import CMD_STREAM
from services.backend.main import run_backend
from services.backend.settings import BackendSettings
from tests.conftest import TEST_TOKEN, nats_options, server_ca, trust
from tests.signing_support import TEST_SIGNING_SEED

ROOT = Path(__file__).resolve().parent.parent
RECIPE_BYTES = (ROOT / "recipes" / "device-smoke.json").read_bytes()
PARAMS = {"url": "https://example.org/", "youtubeVideoId": "abc"}
NODE_SECRET = "node-secret-for-tests-0123456789abcdef-XYZ"


@dataclass
class Backend:
    url: str
    settings: BackendSettings

    def client(self, token: str | None = TEST_TOKEN, timeout: float = 30.0) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)


@contextlib.asynccontextmanager
async def running_backend(database_url: str, nats_url: str, **overrides: Any) -> AsyncIterator[Backend]:
    settings = BackendSettings(database_url, nats_url, [TEST_TOKEN], port=0, node_secret=NODE_SECRET,
                               relay_poll_s=0.2, nats_auth_dir=trust().dir,
                               nats_ca=server_ca(nats_url), command_signing_seed=TEST_SIGNING_SEED)
    for name, value in overrides.items():
        setattr(settings, name, value)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_backend(settings, stop, on_ready=ready.set_result), name="test-backend")
    try:
        done, _ = await asyncio.wait({ready, task}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert ready.done(), "the backend did not start within 60 s"
        yield Backend(ready.result(), settings)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def seed_fleet(database_url: str, fleet: dict[str, list[str]], status: str = "online",
                     seen: datetime | None = None) -> None:
    """Write devices as the aggregator would from the nodes' inventories."""
    conn = await asyncpg.connect(database_url)
    try:
        when = seen or datetime.now(UTC)
        await conn.executemany(
            "INSERT INTO devices (node_id, serial, status, model, last_seen) VALUES ($1, $2, $3, 'SIM', $4)"
            " ON CONFLICT (node_id, serial) DO UPDATE SET status = EXCLUDED.status, last_seen = EXCLUDED.last_seen",
            [(node, serial, status, when) for node, serials in fleet.items() for serial in serials],
        )
        # Their nodes' heartbeats: a device is online only on a live node (the `device_liveness` view).
        await conn.executemany(
            "INSERT INTO nodes (node_id, slots, running, queued, vendor_connected, version, last_seen)"
            " VALUES ($1, 20, 0, 0, true, 'test', $2)"
            " ON CONFLICT (node_id) DO UPDATE SET last_seen = GREATEST(nodes.last_seen, EXCLUDED.last_seen)",
            [(node, when) for node in fleet],
        )
    finally:
        await conn.close()


def fleet_of(nodes: int, devices: int) -> dict[str, list[str]]:
    return {f"node-{n}": [f"SIM{n}X{d:03d}" for d in range(devices)] for n in range(1, nodes + 1)}


async def publish_recipe(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/workflows", content=RECIPE_BYTES)
    assert r.status_code in (201, 409), r.text


def run_body(**fields: Any) -> dict[str, Any]:
    return {"workflow_id": "device-smoke", "params": PARAMS, "targets": {"all_online": True}, **fields}


async def fetchval(database_url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def stream_counts(nats_url: str) -> dict[str, int]:
    """Messages stored in DOAI_CMD per subject (each broadcast/cancel must be there once)."""
    nc = await nats.connect(nats_url, **nats_options(nats_url))
    try:
        js: JetStreamContext = nc.jetstream()
        info = await js.stream_info(CMD_STREAM, subjects_filter="doai.cmd.>")
        return dict(info.state.subjects or {})
    finally:
        await nc.close()


async def stream_messages(nats_url: str) -> list[tuple[str, bytes, str | None]]:
    """Every message in DOAI_CMD as (subject, payload, Nats-Msg-Id), in stream order."""
    nc = await nats.connect(nats_url, **nats_options(nats_url))
    try:
        js = nc.jetstream()
        info = await js.stream_info(CMD_STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg(CMD_STREAM, seq)
            out.append((msg.subject, msg.data or b"", (msg.headers or {}).get("Nats-Msg-Id")))
        return out
    finally:
        await nc.close()


async def wait_until(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> Any:
    """Poll `predicate` (async) until it returns something truthy, with a deadline."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def all_tasks(client: httpx.AsyncClient, run_id: str, page: int = 50, **filters: str) -> list[dict[str, Any]]:
    """Every task of a run from `GET /v1/runs/{id}/tasks`, following `next_cursor`."""
    tasks: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": page, **filters, **({"cursor": cursor} if cursor else {})}
        r = await client.get(f"/v1/runs/{run_id}/tasks", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        tasks += body["tasks"]
        cursor = body["next_cursor"]
        if cursor is None:
            return tasks


async def task_detail(client: httpx.AsyncClient, run_id: str, node_id: str, serial: str) -> dict[str, Any]:
    r = await client.get(f"/v1/runs/{run_id}/tasks/{node_id}/{serial}")
    assert r.status_code == 200, r.text
    detail: dict[str, Any] = r.json()
    return detail
