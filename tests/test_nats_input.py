"""Malformed messages on NATS are reported clearly, kept where they can be, and stop nothing."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats

from contracts.commands import RunBroadcast
from contracts.events import NodeHeartbeat, TaskEvent
from contracts.ids import new_id
from contracts.recipe_check import decode_recipe
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM, cmd_subject, evt_subject
from tests.conftest import nats_options
from tests.signing_support import signed_headers
from tests.test_e2e import wait_completed

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "device-smoke.json"
PARAMS = {"url": "https://example.org/", "youtubeVideoId": "abc"}


async def poll(check: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_aggregator_dead_letters_bad_events_and_keeps_folding(
    start_system: Any, nats_server: Any, database_url: str
) -> None:
    await start_system()
    now = datetime.now(UTC)
    orphan = TaskEvent(event_id=new_id(), ts=now, node_id="node-x", run_id=new_id(), device_serial="S1",
                       seq=1, state="running")
    bad = [
        b"{not json",
        b'{"kind": "task"}',
        b'{"kind": "teleport", "event_id": "e", "ts": "2026-01-01T00:00:00Z", "node_id": "n"}',
        msgspec.json.encode(orphan),
    ]
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        js = nc.jetstream()
        for payload in bad:
            await js.publish(evt_subject("node-x", "task"), payload)
        beat = NodeHeartbeat(event_id=new_id(), ts=now, node_id="probe", slots=7, running=0, queued=0,
                             vendor_connected=True, version="t")
        await js.publish(evt_subject("probe", "node"), msgspec.json.encode(beat))

        conn = await asyncpg.connect(database_url)
        try:
            await poll(lambda: conn.fetchval("SELECT slots FROM nodes WHERE node_id = 'probe'"))
            rows = await conn.fetch("SELECT subject, raw, error FROM dead_letters ORDER BY id")
        finally:
            await conn.close()
        assert [bytes(r["raw"]) for r in rows] == bad
        assert all(r["subject"] == "doai.evt.node-x.task" and r["error"] for r in rows)
        assert "unknown run" in rows[3]["error"]

        async def settled() -> bool:
            info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await poll(settled)
    finally:
        await nc.close()


async def test_node_drops_bad_commands_and_keeps_working(
    start_system: Any, nats_server: Any, log_file: Path
) -> None:
    system = await start_system(devices=2)
    recipe = decode_recipe(RECIPE.read_bytes())
    misaddressed = RunBroadcast(
        run_id=new_id(), node_id="node-2", workflow_id="device-smoke", workflow_version=1, recipe=recipe,
        params=PARAMS, step_timeouts_ms={}, devices=["SIM1X0001"], created_at=datetime.now(UTC),
    )
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        js = nc.jetstream()
        # Signed with the backend's key, so they get past the signature check to decoding and addressing.
        for payload in (b"\x00garbage", msgspec.json.encode(misaddressed)):
            await js.publish(cmd_subject("node-1"), payload, headers=signed_headers(cmd_subject("node-1"), payload))
    finally:
        await nc.close()
    async with system.client() as client:
        r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                "targets": {"nodes": ["node-1"]}})
        assert r.status_code == 201, r.text
        run = await wait_completed(client, r.json()["run_id"])
    assert run["counts"] == {"succeeded": 2}

    def logged() -> set[str]:
        return {json.loads(line)["event"] for line in log_file.read_text().splitlines()}

    async def both_logged() -> bool:
        return {"malformed command dropped", "command for another node dropped"} <= logged()

    await poll(both_logged)
