"""Artifacts an operator can open over HTTP (issue 11 item 4).

The real backend (uvicorn) on real PostgreSQL and nats-server. Local store: the
backend serves the file itself, with the bearer token or a signed, expiring
link; traversal and symlinks out of the store are refused before anything is
opened (the targets outside are FIFOs: opening one to read would block the
request, so a quick 404 proves nothing was read). Storage-compatible store: the
link is a signed URL of the Storage stand-in, opened without any key. Failure
screenshots: a failed step leaves a `failure` artifact, and a recipe can switch
it off (whole system with the simulator).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from contracts.local_names import local_path
from doai.embedded import EmbeddedNats
from tests.backend_support import (
    all_tasks,
    fetchval,
    fleet_of,
    publish_recipe,
    run_body,
    running_backend,
    seed_fleet,
    task_detail,
)
from tests.supabase_support import FakeStorage, serving
from tests.test_backend_cancel import poll_run

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40 + b"IEND\xaeB`\x82"
URL_KEY = "artifact-url-key-for-tests-0123456789"


async def record(database_url: str, run_id: str, node: str, serial: str, store: str, key: str,
                 content_type: str = "image/png", kind: str = "screenshot") -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO artifacts (run_id, node_id, device_serial, step_id, store, key, uri, bytes, sha256,"
            " content_type, created_at, kind) VALUES ($1, $2, $3, 'upload', $4, $5, $6, $7, $8, $9, $10, $11)",
            uuid.UUID(run_id), node, serial, store, key, f"{store}://{key}", len(PNG),
            hashlib.sha256(PNG).hexdigest(), content_type, datetime.now(UTC), kind)
    finally:
        await conn.close()


def sign(key: str, expires: int, store: str = "local") -> str:
    return hmac.new(URL_KEY.encode(), f"{store}\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


async def test_local_store_download_signed_links_and_refusals(
    database_url: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    key = "vid/node-1/SIM1X000/run/1739012345.png"
    (root / key).parent.mkdir(parents=True)
    (root / key).write_bytes(PNG)
    # Targets outside the store: FIFOs (opening one to read blocks), reached by a recorded `..` key and by a
    # symlink inside the store.
    os.mkfifo(outside / "secret.png")
    (root / "vid" / "link.png").symlink_to(outside / "secret.png")
    async with running_backend(database_url, nats_server.url, artifact_dir=str(root),
                               artifact_url_key=URL_KEY) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 1))
        r = await client.post("/v1/runs", json=run_body())
        run_id = r.json()["run_id"]
        await record(database_url, run_id, "node-1", "SIM1X000", "local", key)
        await record(database_url, run_id, "node-1", "SIM1X000", "local", "../outside/secret.png")
        await record(database_url, run_id, "node-1", "SIM1X000", "local", "vid/link.png")
        await record(database_url, run_id, "node-1", "SIM1X000", "local", "vid/page.html", content_type="text/html")
        (root / "vid" / "page.html").write_text("<script>alert(1)</script>")

        listing = (await client.get(f"/v1/runs/{run_id}/artifacts")).json()["artifacts"]
        by_key = {a["key"]: a for a in listing}
        link = by_key[key]["url"]
        assert link.startswith(f"{backend.url}/v1/artifacts/local/{key}?expires=") and by_key[key]["error"] is None
        assert by_key["../outside/secret.png"]["url"] is None
        assert by_key["../outside/secret.png"]["error"] == "artifact key escapes the local store"
        assert by_key["vid/link.png"]["url"] is None  # the symlink resolves outside: no link either
        detail = await task_detail(client, run_id, "node-1", "SIM1X000")
        assert [a["key"] for a in detail["artifacts"]] == [a["key"] for a in listing]

        async with httpx.AsyncClient(base_url=backend.url, timeout=5) as anonymous:
            # The signed link, without the token; the token without a link.
            got = await anonymous.get(link)
            assert got.status_code == 200 and got.content == PNG and got.headers["content-type"] == "image/png"
            assert got.headers["x-content-type-options"] == "nosniff"
            got = await client.get(f"/v1/artifacts/local/{key}")
            assert got.status_code == 200 and got.content == PNG
            # No credentials, a tampered or expired signature, a signature for another key: 401.
            past = int(time.time()) - 1
            for params in [{}, {"expires": str(int(time.time()) + 60), "sig": "0" * 64},
                           {"expires": str(past), "sig": sign(key, past)}]:
                r = await anonymous.get(f"/v1/artifacts/local/{key}", params=params)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (params, r.text)
            future = int(time.time()) + 60
            r = await anonymous.get("/v1/artifacts/local/vid/page.html",
                                    params={"expires": str(future), "sig": sign(key, future)})
            assert r.status_code == 401
            # A valid signature made with the backend's key works (the expiry is part of what is signed).
            good = {"expires": str(future), "sig": sign(key, future)}
            r = await anonymous.get(f"/v1/artifacts/local/{key}", params=good)
            assert r.status_code == 200 and r.content == PNG
            # ... as does the link PostgreSQL makes for Grafana's image cells (same key, same HMAC).
            sql_link = await fetchval(database_url, "SELECT artifact_url('local', $1)", key)
            assert sql_link.startswith(f"{backend.url}/v1/artifacts/local/{key}?expires=")
            r = await anonymous.get(sql_link)
            assert r.status_code == 200 and r.content == PNG
            r = await anonymous.get(sql_link.replace("/local/", "/supabase/"))  # signed for another store
            assert r.status_code == 401

        # Traversal: unrecorded keys, a recorded key out of the store, a symlink out of it: 404, nothing opened.
        # (`..` written as is would be resolved by the client before sending: these reach the server.)
        for bad in ["%2e%2e/outside/secret.png", "..%2Foutside%2Fsecret.png", "vid/%2E%2E/%2E%2E/outside/secret.png",
                    "nothing/here.png"]:
            r = await asyncio.wait_for(client.get(f"/v1/artifacts/local/{bad}"), 5)
            assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found", (bad, r.text)
        for recorded in ["%2E%2E/outside/secret.png", "vid/link.png"]:
            r = await asyncio.wait_for(client.get(f"/v1/artifacts/local/{recorded}"), 5)
            assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found", (recorded, r.text)
        # A key whose segment is no Windows file name (a Wi-Fi serial) is stored under its mapped local name
        # (contracts.local_names), and served from there.
        wifi = "vid/node-1/192.168.0.5:5555/run/1739012345.png"
        mapped = root.joinpath(*local_path(wifi).parts)
        mapped.parent.mkdir(parents=True)
        mapped.write_bytes(PNG[::-1])
        await record(database_url, run_id, "node-1", "192.168.0.5:5555", "local", wifi)
        r = await client.get(f"/v1/artifacts/local/{wifi}")
        assert r.status_code == 200 and r.content == PNG[::-1], r.text
        # A recorded non-image is a download, never a page of the API's origin.
        r = await client.get("/v1/artifacts/local/vid/page.html")
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("attachment")
        # Unknown query parameters: 422 (after the credentials).
        r = await client.get(f"/v1/artifacts/local/{key}", params={"download": "1"})
        assert r.status_code == 422, r.text
        # The file that goes away: 404 artifact_gone.
        (root / key).unlink()
        r = await client.get(f"/v1/artifacts/local/{key}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_gone"
    assert (outside / "secret.png").exists() and not (outside / "secret.png").is_file()  # still an unread FIFO


async def test_storage_store_links_are_signed_urls_that_download(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    storage = FakeStorage("service-key-for-tests")
    async with serving(storage) as storage_url, running_backend(
        database_url, nats_server.url, supabase_url=storage_url, supabase_key=storage.key,
        supabase_bucket="shots", signed_url_ttl_s=120,
    ) as backend, backend.client() as client:
        await publish_recipe(client)
        await seed_fleet(database_url, fleet_of(1, 1))
        run_id = (await client.post("/v1/runs", json=run_body())).json()["run_id"]
        key = f"vid/node-1/SIM1X000/{run_id}/1739012345.png"
        storage.objects[f"shots/{key}"] = (PNG, "image/png")
        await record(database_url, run_id, "node-1", "SIM1X000", "supabase", key)
        [link] = (await client.get(f"/v1/runs/{run_id}/artifacts")).json()["artifacts"]
        assert link["store"] == "supabase" and link["error"] is None
        assert link["url"].startswith(f"{storage_url}/storage/v1/object/sign/shots/{key}?token=t-120-")
        async with httpx.AsyncClient() as anonymous:  # no service key, no API token: the signature is enough
            got = await anonymous.get(link["url"])
            assert got.status_code == 200 and got.content == PNG
            forged = await anonymous.get(link["url"].rsplit("=", 1)[0] + "=t-120-forged")
            assert forged.status_code == 400
            # Grafana's link goes through the backend, which redirects to a fresh signed URL.
            sql_link = await fetchval(database_url, "SELECT artifact_url('supabase', $1)", key)
            r = await anonymous.get(sql_link)
            assert r.status_code == 307 and r.headers["location"].startswith(f"{storage_url}/storage/v1/object/sign/")
            got = await anonymous.get(sql_link, follow_redirects=True)
            assert got.status_code == 200 and got.content == PNG
        assert storage.signed_downloads == 2


FAILING: dict[str, Any] = {
    "dsl": 1, "workflow_id": "fails", "title": "A check that fails",
    "params": {"youtubeVideoId": {"pattern": "^[A-Za-z0-9_-]{1,64}$"}},
    "steps": [
        {"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
        {"id": "check", "action": "assert", "source": "model", "pattern": "^never-this-model$"},
        {"id": "report", "action": "report"},
    ],
}


async def test_a_failed_step_leaves_a_failure_screenshot(start_system: Any) -> None:
    system = await start_system(nodes=1, devices=2)
    async with system.client() as client:
        quiet = {**FAILING, "workflow_id": "fails-quietly", "failure_screenshot": False}
        for doc in (FAILING, quiet):
            r = await client.post("/v1/workflows", json=doc)
            assert r.status_code == 201, r.text
        runs = {}
        for workflow_id in ("fails", "fails-quietly"):
            r = await client.post("/v1/runs", json={"workflow_id": workflow_id, "params": {"youtubeVideoId": "vid"},
                                                    "targets": {"all_online": True}})
            assert r.status_code == 201, r.text
            runs[workflow_id] = await poll_run(client, r.json()["run_id"], lambda run: run["status"] == "completed")
        run = runs["fails"]
        assert run["outcome"] == "failed" and run["counts"] == {"failed": 2}
        [failing] = run["failing_steps"]
        assert (failing["step_id"], failing["error_code"], failing["tasks"]) == ("check", "assert_failed", 2)
        for task in await all_tasks(client, run["run_id"]):
            detail = await task_detail(client, run["run_id"], task["node_id"], task["device_serial"])
            [shot] = detail["artifacts"]
            assert shot["kind"] == "failure" and shot["step_id"] == "check" and shot["store"] == "local"
            assert shot["key"].startswith(f"vid/{task['node_id']}/{task['device_serial']}/{run['run_id']}/")
            assert shot["key"].endswith("-failure-check.png")
            async with httpx.AsyncClient() as anonymous:
                got = await anonymous.get(shot["url"])
            assert got.status_code == 200 and got.content.startswith(b"\x89PNG") and len(got.content) == shot["bytes"]
        # Switched off in the recipe: the run fails the same way and stores nothing.
        quiet_run = runs["fails-quietly"]
        assert quiet_run["outcome"] == "failed"
        assert (await client.get(f"/v1/runs/{quiet_run['run_id']}/artifacts")).json()["artifacts"] == []
