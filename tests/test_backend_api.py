"""The backend's REST rules, against the real backend (uvicorn) on real PostgreSQL and nats-server.

Idempotent run creation, run listing with cursor pagination and capped pages,
target resolution that reports what it left out, errors in one shape (also
FastAPI's own 404/405/422), body and JSON depth limits, the node-facing
endpoint behind `X-Node-Auth` only, secrets that never leak, and
`doai recipes publish`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from doai.embedded import EmbeddedNats
from runtime.config import ConfigError
from services.backend.settings import BackendSettings
from tests.backend_support import (
    NODE_SECRET,
    PARAMS,
    RECIPE_BYTES,
    ROOT,
    fetchval,
    fleet_of,
    publish_recipe,
    run_body,
    running_backend,
    seed_fleet,
)
from tests.conftest import TEST_TOKEN


def error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code and body["error"]["message"]
    return body["error"]


async def test_idempotency_key_returns_the_same_run_and_refuses_another_body(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(2, 3))
        key = {"Idempotency-Key": "order-42"}
        first = await client.post("/v1/runs", json=run_body(), headers=key)
        assert first.status_code == 201, first.text
        assert "idempotent-replayed" not in first.headers
        # Same body (other key order, other whitespace): the same run, nothing new stored.
        same = json.dumps({"targets": {"all_online": True}, "params": PARAMS, "workflow_id": "device-smoke"}, indent=2)
        again = await client.post("/v1/runs", content=same, headers=key)
        assert again.status_code == 201 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        # Same key, another body: 409, and still one run.
        other = await client.post("/v1/runs", json=run_body(params={**PARAMS, "youtubeVideoId": "other"}), headers=key)
        error(other, 409, "idempotency_key_reused")
        assert await fetchval(database_url, "SELECT count(*) FROM runs") == 1
        assert await fetchval(database_url, "SELECT count(*) FROM outbox") == 2
        # Concurrent requests with one fresh key make one run between them.
        racing = await asyncio.gather(*(
            client.post("/v1/runs", json=run_body(), headers={"Idempotency-Key": "race-1"}) for _ in range(6)
        ))
        assert {r.status_code for r in racing} == {201}
        assert len({r.json()["run_id"] for r in racing}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in racing) == 5
        assert await fetchval(database_url, "SELECT count(*) FROM runs") == 2
        # A refused request does not burn its key.
        bad_key = {"Idempotency-Key": "later-ok"}
        error(await client.post("/v1/runs", json=run_body(params={}), headers=bad_key), 422, "invalid")
        assert (await client.post("/v1/runs", json=run_body(), headers=bad_key)).status_code == 201
        body = error(await client.post("/v1/runs", json=run_body(), headers={"Idempotency-Key": "has space"}),
                     422, "invalid")
        assert body["details"][0]["path"] == "$.header.Idempotency-Key"


async def test_targets_report_unknown_offline_and_stale_devices(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, {"node-1": ["OK1", "OK2"]})
        await seed_fleet(database_url, {"node-1": ["OFF1"]}, status="offline")
        await seed_fleet(database_url, {"node-2": ["OLD1"]}, seen=datetime.now(UTC) - timedelta(minutes=10))
        wanted = [{"node_id": "node-1", "serial": s} for s in ("OK1", "OFF1", "GHOST")]
        wanted.append({"node_id": "node-2", "serial": "OLD1"})
        r = await client.post("/v1/runs", json=run_body(targets={"devices": wanted}))
        assert r.status_code == 201, r.text
        assert r.json()["targets"] == 1
        assert r.json()["rejected"] == [
            {"node_id": "node-1", "serial": "OFF1", "reason": "device is offline"},
            {"node_id": "node-1", "serial": "GHOST", "reason": "unknown device"},
            {"node_id": "node-2", "serial": "OLD1", "reason": "device not seen recently"},
        ]
        # Nodes: only online, recent devices; a node with none is reported.
        r = await client.post("/v1/runs", json=run_body(targets={"nodes": ["node-1", "node-2", "node-3"]}))
        assert r.status_code == 201 and r.json()["targets"] == 2
        assert [x["node_id"] for x in r.json()["rejected"]] == ["node-2", "node-3"]
        # Nothing to run on: 422 with every reason, nothing stored.
        body = error(await client.post("/v1/runs", json=run_body(targets={"devices": wanted[1:]})), 422, "no_targets")
        assert len(body["details"]) == 3
        assert await fetchval(database_url, "SELECT count(*) FROM runs") == 2


async def test_runs_list_pages_with_a_cursor_and_filters(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 2))
        made = []
        for _ in range(7):
            r = await client.post("/v1/runs", json=run_body())
            assert r.status_code == 201
            made.append(r.json()["run_id"])
        cancelled = made[2]
        assert (await client.post(f"/v1/runs/{cancelled}/cancel")).status_code == 202
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            r = await client.get("/v1/runs", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            page = r.json()
            pages += 1
            assert len(page["runs"]) <= 3
            seen += [x["run_id"] for x in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3 and seen == list(reversed(made))  # newest first, no repeats, none skipped
        first = (await client.get("/v1/runs", params={"limit": 1})).json()["runs"][0]
        assert first["targets"] == 2 and first["counts"] == {"queued": 2} and first["workflow_id"] == "device-smoke"

        only = (await client.get("/v1/runs", params={"status": "cancelled"})).json()
        assert [x["run_id"] for x in only["runs"]] == [cancelled] and only["next_cursor"] is None
        assert only["runs"][0]["counts"] == {"cancelled": 2}
        assert (await client.get("/v1/runs", params={"workflow_id": "other-flow"})).json()["runs"] == []
        later = datetime.now(UTC) + timedelta(hours=1)
        assert (await client.get("/v1/runs", params={"created_after": later.isoformat()})).json()["runs"] == []
        assert len((await client.get("/v1/runs", params={"created_before": later.isoformat()})).json()["runs"]) == 7

        body = error(await client.get("/v1/runs", params={"limit": 201}), 422, "invalid")
        assert body["details"][0]["path"] == "$.query.limit"
        error(await client.get("/v1/runs", params={"limit": 0}), 422, "invalid")
        body = error(await client.get("/v1/runs", params={"cursor": "bm90LWEtY3Vyc29y"}), 422, "invalid")
        assert body["details"][0]["path"] == "$.query.cursor"
        body = error(await client.get("/v1/runs", params={"status": "sleeping"}), 422, "invalid")
        assert body["details"][0]["path"] == "$.query.status"


async def test_every_error_has_one_shape_and_is_documented(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url, max_body_bytes=64_000) as backend, \
            backend.client() as client:
        await publish_recipe(client)
        error(await client.get("/v1/no-such-thing"), 404, "not_found")
        error(await client.delete("/v1/runs"), 405, "method_not_allowed")
        error(await client.get("/v1/workflows/device-smoke/versions/zero"), 422, "invalid")
        error(await client.get("/v1/workflows/Not_Valid"), 422, "invalid")
        error(await client.post("/v1/runs", content=b"{\"targets\": [1,"), 400, "bad_json")
        error(await client.post("/v1/runs", content=b"{" * 40_000), 422, "json_too_deep")
        deep: Any = "x"
        for _ in range(40):
            deep = {"a": deep}
        body = error(await client.post("/v1/workflows", json={"dsl": 1, "workflow_id": "d", "steps": [deep]}),
                     422, "json_too_deep")
        assert body["details"] == [{"path": "$", "message": "maximum depth is 32"}]
        error(await client.post("/v1/workflows", content=b"x" * 70_000), 413, "body_too_large")
        body = error(await client.post("/v1/runs", json=run_body(params={"url": ["not", "a", "scalar"]})),
                     422, "invalid")
        assert body["details"][0]["path"] == "$.params.url"
        error(await client.post(f"/v1/runs/{'0' * 8}/cancel"), 422, "invalid")
        error(await client.post(f"/v1/runs/{'0' * 8}-0000-0000-0000-{'0' * 12}/cancel"), 404, "run_not_found")

        spec = (await client.get("/openapi.json")).json()
        error_ref = "#/components/schemas/ErrorResponse"
        for path, methods in spec["paths"].items():
            for method, op in methods.items():
                codes = op["responses"]
                assert "500" in codes, (method, path)
                for code, resp in codes.items():
                    if path == "/v1/artifacts/{store}/{key}" and code in ("200", "307"):
                        continue  # the file itself, or a redirect to it
                    schema = resp["content"]["application/json"]["schema"]
                    if code.startswith(("4", "5")):
                        assert schema == {"$ref": error_ref}, (method, path, code)
                    else:
                        assert schema["$ref"].startswith("#/components/schemas/"), (method, path, code)
                if method == "post" and path in ("/v1/runs", "/v1/workflows"):
                    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        run_create = spec["components"]["schemas"]["RunCreate"]
        assert run_create["required"] == ["workflow_id", "targets"]
        assert spec["paths"]["/v1/node/config"]["get"]["security"] == [{"NodeAuth": []}]


async def test_node_config_accepts_only_the_node_secret(database_url: str, nats_server: EmbeddedNats) -> None:
    async with running_backend(database_url, nats_server.url, node_slots={"node-2": 7}) as backend:
        async with backend.client(token=None) as anonymous:
            url = "/v1/node/config"
            node = {"X-Node-Auth": NODE_SECRET}
            r = await anonymous.get(url, params={"node_id": "node-2"}, headers=node)
            assert r.status_code == 200, r.text
            assert r.json() == {"node_id": "node-2", "slots": 7, "timeouts": {"step_ms": 90_000, "upload_ms": 30_000}}
            assert (await anonymous.get(url, params={"node_id": "node-1"}, headers=node)).json()["slots"] == 20
            error(await anonymous.get(url, params={"node_id": "node-1"}), 401, "unauthorized")
            error(await anonymous.get(url, params={"node_id": "node-1"}, headers={"X-Node-Auth": NODE_SECRET[:-1]}),
                  401, "unauthorized")
            # An operator token is not a node credential, and the node secret opens no operator endpoint.
            error(await anonymous.get(url, params={"node_id": "node-1"},
                                      headers={"Authorization": f"Bearer {TEST_TOKEN}"}), 401, "unauthorized")
            error(await anonymous.get("/v1/runs", headers=node), 401, "unauthorized")
            error(await anonymous.get("/v1/runs", headers={"Authorization": f"Bearer {NODE_SECRET}"}),
                  401, "unauthorized")
            body = error(await anonymous.get(url, params={"node_id": "a.b"}, headers=node), 422, "invalid")
            assert body["details"][0]["path"] == "$.query.node_id"


async def test_secrets_never_appear_in_responses_openapi_or_logs(
    database_url: str, nats_server: EmbeddedNats, log_file: Path
) -> None:
    seen: list[str] = []
    async with running_backend(database_url, nats_server.url) as backend:
        async with backend.client() as client:
            await publish_recipe(client)
            await seed_fleet(database_url, fleet_of(1, 2))
            responses = [
                await client.get("/openapi.json"),
                await client.get("/docs"),
                await client.post("/v1/runs", json=run_body()),
                await client.get("/v1/node/config", params={"node_id": "node-1"},
                                 headers={"X-Node-Auth": NODE_SECRET}),
                await client.get("/v1/node/config", params={"node_id": "node-1"},
                                 headers={"X-Node-Auth": NODE_SECRET + "x"}),
                await client.get("/v1/runs", headers={"Authorization": f"Bearer {TEST_TOKEN}x"}),
                await client.get("/v1/runs", headers={"Authorization": f"Basic {TEST_TOKEN}"}),
            ]
            async with backend.client(token=None) as anonymous:
                responses.append(await anonymous.get("/v1/runs", headers={"X-Node-Auth": NODE_SECRET}))
            run_id = responses[2].json()["run_id"]
            assert responses[2].status_code == 201
            responses.append(await client.get(f"/v1/runs/{run_id}"))
            responses.append(await client.get("/v1/nodes"))
            seen = [r.text for r in responses]
    assert [r.status_code for r in responses] == [200, 200, 201, 200, 401, 401, 401, 401, 200, 200]
    logs = log_file.read_text()
    assert "node authentication failed" in logs and "operator authentication failed" in logs
    for text in [*seen, logs]:
        assert NODE_SECRET not in text
        assert TEST_TOKEN not in text
    for line in logs.splitlines():  # every line is JSON, none carries a credential in any field
        assert NODE_SECRET not in json.dumps(json.loads(line))


@pytest.mark.parametrize("secret, message", [
    ("", "set NODE_AGENT_SHARED_SECRET"),
    ("too-short-0123456789", "NODE_AGENT_SHARED_SECRET is too short: use at least 32 bytes"),
])
async def test_backend_refuses_to_start_without_a_long_node_secret(
    database_url: str, nats_server: EmbeddedNats, secret: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        BackendSettings(database_url, nats_server.url, [TEST_TOKEN], port=0, node_secret=secret)
    # The command line says the same in one line, without a traceback or the secret.
    env = {k: v for k, v in os.environ.items() if k != "NODE_AGENT_SHARED_SECRET"}
    env.update(DATABASE_URL=database_url, NATS_URL=nats_server.url, DOAI_API_TOKEN=TEST_TOKEN)
    if secret:
        env["NODE_AGENT_SHARED_SECRET"] = secret
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "doai.cli", "backend", "--port", "0", cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert message in err.decode() and "Traceback" not in err.decode()
    if secret:
        assert secret not in err.decode()


async def test_recipes_publish_from_the_command_line(
    database_url: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    changed = json.loads(RECIPE_BYTES)
    changed["title"] = "Device smoke, v2"
    v2 = tmp_path / "device-smoke-v2.json"
    v2.write_text(json.dumps(changed))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dsl": 1, "workflow_id": "bad", "steps": [{"id": "a", "action": "nope"},
                                                                        {"id": "b", "action": "wait"}]}))

    async def doai(*args: str, token: str | None = TEST_TOKEN) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("DOAI_API_TOKEN", "DOAI_API_URL")}
        if token:
            env["DOAI_API_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "doai.cli", "recipes", "publish", *args, cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async with running_backend(database_url, nats_server.url) as backend:
        api = ["--api-url", backend.url]
        smoke = str(ROOT / "recipes" / "device-smoke.json")
        code, out, err = await doai(*api, smoke, str(v2))
        assert code == 0, err
        assert out.splitlines() == [f"{smoke}: published device-smoke version 1",
                                    f"{v2}: published device-smoke version 2"]
        code, out, err = await doai(*api, str(v2), str(bad))
        assert code == 1
        assert f"{v2}: unchanged (recipe equals the latest version 2 of device-smoke)" in out
        assert f"{bad}: $.steps[0].action: unknown action" in err
        assert f"{bad}: $.steps[1].ms: Object missing required field `ms`" in err
        code, _, err = await doai(*api, str(v2), token="wrong-token")
        assert code == 1 and "401 unauthorized: invalid API token" in err
        code, _, err = await doai(*api, str(v2), token=None)
        assert code == 1 and "set DOAI_API_TOKEN" in err and "Traceback" not in err
        async with backend.client() as client:
            assert (await client.get("/v1/workflows")).json()["workflows"][0]["latest_version"] == 2
