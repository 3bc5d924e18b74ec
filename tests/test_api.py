"""Bad input at the REST API gets a clear error in one shape and changes nothing.

Against the real backend (uvicorn) on real PostgreSQL and nats-server.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.conftest import TEST_TOKEN

RECIPE = json.loads((Path(__file__).resolve().parent.parent / "recipes" / "device-smoke.json").read_text())
PARAMS = {"url": "https://example.org/", "youtubeVideoId": "abc"}


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert body["code"] == code and body["message"]
    return body


async def run_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM runs")
        return n
    finally:
        await conn.close()


async def test_operator_token_is_required(start_system: Any) -> None:
    system = await start_system()
    async with httpx.AsyncClient(base_url=system.api_url) as anonymous:
        body = error(await anonymous.get("/v1/workflows/device-smoke"), 401, "unauthorized")
        assert "Bearer" in body["message"]
        r = await anonymous.get("/v1/workflows/device-smoke", headers={"Authorization": "Bearer wrong"})
        error(r, 401, "unauthorized")
        r = await anonymous.get("/v1/workflows/device-smoke", headers={"Authorization": f"Basic {TEST_TOKEN}"})
        error(r, 401, "unauthorized")
        r = await anonymous.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                   "targets": {"all_online": True}})
        error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    async with system.client() as client:
        assert (await client.get("/v1/workflows/device-smoke")).status_code == 200


async def test_workflow_publish_validates_and_versions(start_system: Any) -> None:
    system = await start_system()
    async with system.client() as client:
        bad = {**RECIPE, "workflow_id": "bad-one", "steps": [
            {"id": "a", "action": "adb_shell", "command": "not-a-list"},
            {"id": "b", "action": "teleport"},
            {"id": "c", "action": "open_url", "url": "{{nowhere}}", "colour": "red"},
        ]}
        body = error(await client.post("/v1/workflows", json=bad), 422, "invalid_recipe")
        paths = {d["path"] for d in body["details"]}
        assert paths == {"$.steps[0].command", "$.steps[1].action", "$.steps[2].colour"}
        semantic = {**RECIPE, "workflow_id": "bad-two", "steps": [
            {"id": "a", "action": "open_url", "url": "{{nowhere}}"},
            {"id": "a", "action": "upload"},
        ]}
        body = error(await client.post("/v1/workflows", json=semantic), 422, "invalid_recipe")
        assert {d["path"] for d in body["details"]} == {"$.steps[0].url", "$.steps[1].id", "$.steps[1]"}
        # Structural and semantic faults are reported together.
        mixed = {**bad, "workflow_id": "bad-3",
                 "steps": [*bad["steps"][:2], {"id": "c", "action": "open_url", "url": "{{nowhere}}"}]}
        body = error(await client.post("/v1/workflows", json=mixed), 422, "invalid_recipe")
        assert {d["path"] for d in body["details"]} == {"$.steps[0].command", "$.steps[1].action", "$.steps[2].url"}
        error(await client.get("/v1/workflows/bad-one"), 404, "workflow_not_found")

        error(await client.post("/v1/workflows", content=b"{not json"), 400, "bad_json")
        # Same body as the latest version: nothing new is stored.
        error(await client.post("/v1/workflows", json=RECIPE), 409, "unchanged")
        changed = {**RECIPE, "title": "Device smoke test, v2"}
        r = await client.post("/v1/workflows", json=changed)
        assert r.status_code == 201 and r.json() == {"workflow_id": "device-smoke", "version": 2, "warnings": []}
        latest = (await client.get("/v1/workflows/device-smoke")).json()
        assert latest["version"] == 2 and latest["recipe"]["title"] == "Device smoke test, v2"
        first = (await client.get("/v1/workflows/device-smoke/versions/1")).json()
        assert first["version"] == 1 and first["recipe"]["title"] == RECIPE["title"]
        error(await client.get("/v1/workflows/device-smoke/versions/9"), 404, "workflow_not_found")


async def test_bad_runs_are_refused_and_store_nothing(start_system: Any, database_url: str) -> None:
    system = await start_system()
    async with system.client() as client:
        def run(**fields: Any) -> dict[str, Any]:
            return {"workflow_id": "device-smoke", "params": PARAMS, "targets": {"all_online": True}, **fields}

        error(await client.post("/v1/runs", json=run(workflow_id="no-such-flow")), 404, "workflow_not_found")
        error(await client.post("/v1/runs", json=run(workflow_version=7)), 404, "workflow_not_found")

        body = error(await client.post("/v1/runs", json=run(params={"youtubeVideoId": "abc"})), 422, "invalid")
        assert body["details"] == [{"path": "$.params.url", "message": "required param is missing"}]
        body = error(await client.post("/v1/runs", json=run(params={**PARAMS, "url": "ftp://x"})), 422, "invalid")
        assert body["details"][0]["path"] == "$.params.url"

        body = error(await client.post("/v1/runs", json=run(step_timeouts_ms={"open": 10})), 422, "invalid")
        assert body["details"][0]["path"] == "$.step_timeouts_ms.open"
        assert "[1000, 600000]" in body["details"][0]["message"]
        body = error(await client.post("/v1/runs", json=run(step_timeouts_ms={"nope": 5000})), 422, "invalid")
        assert body["details"][0]["path"] == "$.step_timeouts_ms.nope"

        body = error(await client.post("/v1/runs", json=run(targets={})), 422, "invalid")
        assert body["details"][0]["path"] == "$.targets"
        body = error(await client.post("/v1/runs", json=run(targets={"devices": [{"node_id": "a.b", "serial": "x"}]})),
                     422, "invalid")
        assert body["details"][0]["path"] == "$.targets.devices[0].node_id"
        body = error(await client.post("/v1/runs", json=run(
            targets={"devices": [{"node_id": "node-9", "serial": "GHOST"}]})), 422, "no_targets")
        assert body["details"] == [{"node_id": "node-9", "serial": "GHOST", "reason": "unknown device"}]

        error(await client.post("/v1/runs", content=b'{"workflow_id": '), 400, "bad_json")
        error(await client.post("/v1/runs", content=b"x" * 2_000_000), 413, "body_too_large")

        error(await client.get(f"/v1/runs/{uuid.uuid4()}"), 404, "run_not_found")
        body = error(await client.get("/v1/runs/not-a-uuid"), 422, "invalid")  # not a run id at all
        assert body["details"][0]["path"] == "$.path.run_id"
    assert await run_count(database_url) == 0


async def test_explicit_devices_report_the_ones_left_out(start_system: Any, database_url: str) -> None:
    system = await start_system(devices=2)
    async with system.client() as client:
        devices = (await client.get("/v1/devices")).json()["devices"]
        serials = sorted(d["serial"] for d in devices)
        r = await client.post("/v1/runs", json={
            "workflow_id": "device-smoke", "params": PARAMS,
            "targets": {"devices": [{"node_id": "node-1", "serial": serials[0]},
                                    {"node_id": "node-1", "serial": "GHOST"}]},
        })
        assert r.status_code == 201, r.text
        assert r.json()["targets"] == 1
        assert r.json()["rejected"] == [{"node_id": "node-1", "serial": "GHOST", "reason": "unknown device"}]
        tasks = (await client.get(f"/v1/runs/{r.json()['run_id']}/tasks")).json()["tasks"]
        assert [t["device_serial"] for t in tasks] == [serials[0]]
    assert await run_count(database_url) == 1
