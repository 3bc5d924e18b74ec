"""Node enrollment (rule 8) and revocation, against the real backend and a real nats-server.

A new node enrolls with the shared secret, gets its own NATS identity and runs a
task; a wrong secret gets 401 and changes nothing; an enrolled id cannot be taken
over with another key; an operator revokes the node and from then on its
credentials no longer connect — all without restarting nats-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest

from contracts.subjects import node_durable, node_inbox_prefix
from doai.embedded import EmbeddedNats
from runtime.nats_auth import NatsTrust, jwt_subject
from runtime.nats_creds import creds_jwt
from services.node.agent import run_node
from services.node.enroll import EnrollmentRefused, enroll, new_user_seed, user_public_key_of
from services.node.settings import NodeSettings
from services.simulator.server import Simulator, SimulatorConfig
from tests.backend_support import running_backend
from tests.conftest import AuthNats
from tests.node_support import until
from tests.test_e2e import wait_completed

SECRET = "enrollment-test-shared-secret-0123456789-abcdef"
PARAMS = {"url": "https://example.org/enroll", "youtubeVideoId": "enrollVid01"}
ROOT = Path(__file__).resolve().parent.parent


def node_settings(system: Any, nats_url: str, tmp_path: Path, node_id: str, sim: Simulator | None = None,
                  secret: str = SECRET) -> NodeSettings:
    return NodeSettings(node_id=node_id, nats_url=nats_url, vendor_url=sim.url if sim else "ws://127.0.0.1:9/",
                        state_dir=tmp_path / f"state-{node_id}", artifact_dir=tmp_path / "artifacts",
                        api_url=system.api_url, node_secret=secret, inventory_interval_s=0.3)


async def count(database_url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def connects(url: str, creds: Path, node_id: str) -> bool:
    try:
        nc = await nats.connect(url, user_credentials=str(creds), inbox_prefix=node_inbox_prefix(node_id),
                                allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    except Exception as exc:
        assert "authorization violation" in str(exc).lower(), exc
        return False
    await nc.close()
    return True


async def test_enroll_run_a_task_then_revoke_without_restarting_nats(
    start_system: Any, nats_server: AuthNats, database_url: str, tmp_path: Path, log_file: Path
) -> None:
    system = await start_system(nodes=0, node_secret=SECRET)
    server_pid = nats_server.proc.pid if nats_server.proc else None

    # A wrong secret: 401, no identity recorded, nothing written on the node.
    wrong = node_settings(system, nats_server.url, tmp_path, "node-new", secret="not-the-secret-" + "x" * 32)
    with pytest.raises(EnrollmentRefused, match="401"):
        await enroll(wrong)
    assert not wrong.enrolled_creds_path.exists() and not wrong.enrollment_path.exists()
    assert await count(database_url, "SELECT count(*) FROM node_identities") == 0

    # The right secret: the node enrolls on its first start and runs a task with its own identity.
    stop = asyncio.Event()
    async with Simulator(SimulatorConfig(devices=1, serial_prefix="NEW", seed=3, default_latency_ms=2.0)) as sim:
        settings = node_settings(system, nats_server.url, tmp_path, "node-new", sim)
        node = asyncio.create_task(run_node(settings, stop))
        try:
            async with system.client() as client:
                async def online() -> bool:
                    devices = (await client.get("/v1/devices")).json()["devices"]
                    return any(d["node_id"] == "node-new" and d["status"] == "online" for d in devices)

                await until(online, 30, "the enrolled node's device online")
                r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                        "targets": {"nodes": ["node-new"]}})
                assert r.status_code == 201, r.text
                run = await wait_completed(client, r.json()["run_id"])
                assert run["counts"] == {"succeeded": 1}, run
        finally:
            stop.set()
            await asyncio.wait_for(node, 30)

    creds = settings.enrolled_creds_path
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.enrollment_path.stat().st_mode) == 0o600
    record = json.loads(settings.enrollment_path.read_text())
    key = record["public_key"]
    assert record["node_id"] == "node-new" and "command_public_key" in record
    assert await count(database_url, "SELECT public_key FROM node_identities WHERE node_id = 'node-new'") == key
    # The seed never left the node: the backend stored only the public key. The secret is nowhere.
    seed = creds.read_text().split("-----BEGIN USER NKEY SEED-----")[1].split()[0]
    assert seed.startswith("SU") and user_public_key_of(seed) == key
    logs = log_file.read_text()
    assert seed not in logs and SECRET not in logs
    assert SECRET not in creds.read_text() and SECRET not in settings.enrollment_path.read_text()

    # A second start reuses the credentials: no new enrollment, same key.
    assert await connects(nats_server.url, creds, "node-new")

    # Taking over the enrolled id with another key: 409, nothing changed.
    async with httpx.AsyncClient(base_url=system.api_url, headers={"X-Node-Auth": SECRET}) as node_api:
        other = user_public_key_of(new_user_seed())
        r = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": other})
        assert r.status_code == 409 and r.json()["error"]["code"] == "node_enrolled", r.text
        # Retrying with the same key (a lost answer) gets the same identity again.
        again = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": key})
        assert again.status_code == 201 and again.json()["public_key"] == key
        # A malformed key is refused with its path.
        bad = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": "UABC"})
        assert bad.status_code == 422 and bad.json()["error"]["details"][0]["path"] == "$.public_key"
    assert await count(database_url, "SELECT public_key FROM node_identities WHERE node_id = 'node-new'") == key

    # Revocation needs an operator; the node secret is not enough.
    async with httpx.AsyncClient(base_url=system.api_url, headers={"X-Node-Auth": SECRET}) as node_api:
        assert (await node_api.post("/v1/nodes/node-new/revoke")).status_code == 401
    assert await connects(nats_server.url, creds, "node-new")

    # An operator revokes it: a connected client is dropped, and the credentials no longer connect.
    watcher = await nats.connect(nats_server.url, user_credentials=str(creds),
                                 inbox_prefix=node_inbox_prefix("node-new"), allow_reconnect=False)
    async with system.client() as client:
        r = await client.post("/v1/nodes/node-new/revoke")
        assert r.status_code == 200, r.text
        assert r.json()["public_key"] == key
        assert (await client.post("/v1/nodes/node-unknown/revoke")).status_code == 404
    await until(lambda: watcher.is_closed, 10, "the revoked node's connection to be dropped")
    assert not await connects(nats_server.url, creds, "node-new")
    # Every other identity still works.
    assert await connects(nats_server.url, nats_server.creds("node", "node-other"), "node-other")
    # The same server process throughout: no restart, no reload.
    assert nats_server.proc is not None and nats_server.proc.pid == server_pid and nats_server.proc.poll() is None

    # A revoked id stays out, even with a new key pair and the shared secret (a stolen PC has both),
    # until an operator re-admits it; then it enrolls with a new key only.
    fresh_key = user_public_key_of(new_user_seed())
    async with httpx.AsyncClient(base_url=system.api_url, headers={"X-Node-Auth": SECRET}) as node_api:
        reused = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": key})
        assert reused.status_code == 409 and reused.json()["error"]["code"] == "key_revoked"
        stolen = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": fresh_key})
        assert stolen.status_code == 409 and stolen.json()["error"]["code"] == "node_revoked"
        assert await count(database_url, "SELECT public_key FROM node_identities WHERE node_id = 'node-new'") == key
        async with system.client() as client:
            assert (await client.post("/v1/nodes/node-new/readmit")).status_code == 200
            assert (await client.post("/v1/nodes/node-new/readmit")).status_code == 404  # nothing left to re-admit
        assert (await node_api.post("/v1/nodes/node-new/readmit")).status_code == 401  # operators only
        reused = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": key})
        assert reused.status_code == 409 and reused.json()["error"]["code"] == "key_revoked"
        fresh = await node_api.post("/v1/node/enroll", json={"node_id": "node-new", "public_key": fresh_key})
        assert fresh.status_code == 201, fresh.text
    assert await count(database_url, "SELECT count(*) FROM nats_revocations") == 1


async def test_revocations_survive_a_nats_server_that_lost_its_account_store(
    nats_server: AuthNats, database_url: str
) -> None:
    """The backend pushes the account JWT with every revocation when it starts."""
    creds = nats_server.creds("node", "node-lost")
    public = jwt_subject(creds_jwt(creds.read_text()))
    async with running_backend(database_url, nats_server.url) as backend:
        headers = {"X-Node-Auth": backend.settings.node_secret}
        async with httpx.AsyncClient(base_url=backend.url, headers=headers) as api:
            r = await api.post("/v1/node/enroll", json={"node_id": "node-lost", "public_key": public})
            assert r.status_code == 201, r.text
        async with backend.client() as client:
            assert (await client.post("/v1/nodes/node-lost/revoke")).status_code == 200
    assert not await connects(nats_server.url, creds, "node-lost")
    # The server loses its resolver folder (a new volume): the preloaded account knows no revocation.
    nats_server.stop()
    shutil.rmtree(nats_server.store_dir / "jwt")
    nats_server.start()
    assert await connects(nats_server.url, creds, "node-lost")
    async with running_backend(database_url, nats_server.url):
        assert not await connects(nats_server.url, creds, "node-lost")


def test_nats_auth_init_and_creds_write_private_files_nats_server_accepts(tmp_path: Path) -> None:
    trust_dir = tmp_path / "trust"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    init = subprocess.run([sys.executable, "-m", "doai.cli", "nats-auth", "init", "--dir", str(trust_dir)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    assert stat.S_IMODE(trust_dir.stat().st_mode) == 0o700
    for path in trust_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert "resolver" in (trust_dir / "nats-auth.conf").read_text()
    # Running it again never overwrites an operator.
    again = subprocess.run([sys.executable, "-m", "doai.cli", "nats-auth", "init", "--dir", str(trust_dir)],
                           capture_output=True, text=True, env=env, timeout=60, check=False)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    out = tmp_path / "n7.creds"
    made = subprocess.run([sys.executable, "-m", "doai.cli", "nats-auth", "creds", "--dir", str(trust_dir),
                           "--role", "node", "--node-id", "n7", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    server = EmbeddedNats(tmp_path / "nats", NatsTrust(trust_dir))
    server.start()
    try:
        assert asyncio.run(connects(server.url, out, "n7"))
    finally:
        server.stop()


async def test_with_nats_down_enroll_and_revoke_answer_503_and_record_nothing(
    nats_server: AuthNats, database_url: str
) -> None:
    creds = nats_server.creds("node", "node-down")
    public = jwt_subject(creds_jwt(creds.read_text()))
    async with running_backend(database_url, nats_server.url) as backend:
        headers = {"X-Node-Auth": backend.settings.node_secret}
        async with httpx.AsyncClient(base_url=backend.url, headers=headers, timeout=60) as api:
            assert (await api.post("/v1/node/enroll", json={"node_id": "node-down", "public_key": public})
                    ).status_code == 201
            nats_server.stop()
            try:
                other = user_public_key_of(new_user_seed())
                r = await api.post("/v1/node/enroll", json={"node_id": "node-late", "public_key": other})
                assert r.status_code == 503 and r.json()["error"]["code"] == "nats_unavailable", r.text
                async with backend.client(timeout=60) as client:
                    r = await client.post("/v1/nodes/node-down/revoke")
                assert r.status_code == 503 and r.json()["error"]["code"] == "nats_unavailable", r.text
            finally:
                nats_server.start()
    assert await count(database_url, "SELECT count(*) FROM node_identities WHERE node_id = 'node-late'") == 0
    assert await count(database_url, "SELECT revoked_at FROM node_identities WHERE node_id = 'node-down'") is None
    assert await count(database_url, "SELECT count(*) FROM nats_revocations") == 0
    # Nothing was revoked on the server either.
    assert await connects(nats_server.url, creds, "node-down")


def test_doai_up_against_an_external_nats_needs_its_trust_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NATS_URL": "nats://127.0.0.1:1"}
    env.pop("DOAI_NATS_AUTH_DIR", None)
    res = subprocess.run([sys.executable, "-m", "doai.cli", "up", "--home", str(tmp_path / "home"), "--port", "0"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert "set DOAI_NATS_AUTH_DIR" in res.stderr and "Traceback" not in res.stderr


async def test_enrollment_stops_at_the_node_limit_and_records_nothing_beyond(
    nats_server: AuthNats, database_url: str
) -> None:
    """A leaked shared secret cannot mint NATS identities without bound: DOAI_MAX_NODES caps the enrolled ids."""
    keys = {f"node-cap{i}": user_public_key_of(new_user_seed()) for i in range(4)}
    async with running_backend(database_url, nats_server.url, max_nodes=2) as backend:
        headers = {"X-Node-Auth": backend.settings.node_secret}
        async with httpx.AsyncClient(base_url=backend.url, headers=headers, timeout=60) as api:
            async def post(node_id: str) -> httpx.Response:
                return await api.post("/v1/node/enroll", json={"node_id": node_id, "public_key": keys[node_id]})

            assert (await post("node-cap0")).status_code == 201
            assert (await post("node-cap1")).status_code == 201
            # Two more at once: both refused (the count is taken under a lock, so no race gets past it).
            refused = await asyncio.gather(post("node-cap2"), post("node-cap3"))
            for r in refused:
                assert r.status_code == 409 and r.json()["error"]["code"] == "node_limit", r.text
                assert "DOAI_MAX_NODES" in r.json()["error"]["message"]
            # An enrolled node asking again still gets its answer.
            assert (await post("node-cap1")).status_code in (200, 201)
            # Nothing recorded and no consumer declared for the refused ids.
            assert await count(database_url, "SELECT count(*) FROM node_identities") == 2
            nc = await nats_server.connect()
            try:
                js = nc.jetstream()
                consumers = {c.name for c in await js.consumers_info("DOAI_CMD")}
                assert {node_durable("node-cap0"), node_durable("node-cap1")} <= consumers, consumers
                assert not {node_durable("node-cap2"), node_durable("node-cap3")} & consumers, consumers
            finally:
                await nc.close()
            # Revoking one makes room for one.
            async with backend.client(timeout=60) as client:
                assert (await client.post("/v1/nodes/node-cap0/revoke")).status_code == 200
            assert (await post("node-cap2")).status_code == 201
            r = await post("node-cap3")
            assert r.status_code == 409 and r.json()["error"]["code"] == "node_limit", r.text
    assert await count(database_url, "SELECT count(*) FROM node_identities WHERE node_id = 'node-cap3'") == 0
