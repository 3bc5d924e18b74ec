"""The broadcast outbox: a committed run reaches every node exactly once, whatever dies when.

Real PostgreSQL and nats-server. A backend process is SIGKILLed after the
commit and before the publish; a relay dies after the JetStream ack and
before its commit; two relays drain one outbox at once. In each case every
command is stored exactly once in DOAI_CMD, and a run's `RunCancel` never
reaches a node before its `RunBroadcast`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import asyncpg
import httpx
import msgspec
import nats
import pytest

from contracts.api import RunCreate, Targets
from contracts.commands import Command, RunBroadcast
from contracts.recipe_check import decode_recipe
from doai.embedded import EmbeddedNats, free_port
from runtime import db, jetstream
from runtime.nats_auth import inbox_prefix
from services.backend import runs, workflows
from services.backend.relay import OutboxRelay
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
    stream_counts,
    stream_messages,
    wait_until,
)
from tests.conftest import TEST_TOKEN, creds_file, trust
from tests.signing_support import TEST_SIGNER, TEST_SIGNING_SEED


async def unsent(database_url: str) -> int:
    n: int = await fetchval(database_url, "SELECT count(*) FROM outbox WHERE sent_at IS NULL")
    return n


async def start_backend_process(database_url: str, nats_url: str, port: int) -> asyncio.subprocess.Process:
    env = {**os.environ, "DATABASE_URL": database_url, "NATS_URL": nats_url, "DOAI_API_TOKEN": TEST_TOKEN,
           "NODE_AGENT_SHARED_SECRET": NODE_SECRET, "DOAI_COMMAND_SIGNING_KEY": TEST_SIGNING_SEED,
           "DOAI_NATS_AUTH_DIR": str(trust().dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "doai.cli", "backend", "--port", str(port), cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def healthy() -> bool:
        assert proc.returncode is None, "the backend process exited"
        try:
            async with httpx.AsyncClient() as c:
                return (await c.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(healthy, 60, "the backend process to listen")
    return proc


async def test_backend_killed_between_commit_and_publish_broadcasts_once_after_restart(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    port = free_port("127.0.0.1")
    proc = await start_backend_process(database_url, nats_server.url, port)
    try:
        headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            await publish_recipe(client)
            await seed_fleet(database_url, fleet_of(2, 3))
            # NATS goes away: the run commits, its broadcasts cannot leave.
            nats_server.stop()
            r = await client.post("/v1/runs", json=run_body())
            assert r.status_code == 201, r.text
            run_id = r.json()["run_id"]
        assert await unsent(database_url) == 2
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    nats_server.start()  # same port, same store
    assert await unsent(database_url) == 2
    assert await fetchval(database_url, "SELECT status FROM runs") == "pending"

    async with running_backend(database_url, nats_server.url):
        await wait_until(lambda: _none_unsent(database_url), 60, "the restarted backend to relay the outbox")
    assert await stream_counts(nats_server.url) == {"doai.cmd.node-1": 1, "doai.cmd.node-2": 1}
    for subject, data, msg_id in await stream_messages(nats_server.url):
        broadcast = msgspec.json.decode(data, type=Command)
        assert isinstance(broadcast, RunBroadcast) and broadcast.run_id == run_id
        assert subject == f"doai.cmd.{broadcast.node_id}" and msg_id == f"run-{run_id}-{broadcast.node_id}"
        assert broadcast.devices == fleet_of(2, 3)[broadcast.node_id]
    assert await fetchval(database_url, "SELECT status FROM runs") == "dispatched"


async def _none_unsent(database_url: str) -> bool:
    return await unsent(database_url) == 0


class _DiesBeforeCommit(OutboxRelay):
    """A relay whose process 'dies' after JetStream acked its batch and before its commit."""

    async def _mark_sent(self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record]) -> None:
        raise ConnectionError("killed after the ack, before the commit")


@pytest.fixture
async def backend_db(database_url: str, nats_server: EmbeddedNats) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database with the device-smoke recipe and a fleet of 3 nodes x 4 devices."""
    pool = await db.create_pool(database_url)
    try:
        await db.migrate(pool)
        await workflows.publish(pool, decode_recipe(RECIPE_BYTES))
        await seed_fleet(database_url, fleet_of(3, 4))
        yield pool
    finally:
        await pool.close()


async def _jetstream(url: str) -> tuple[nats.NATS, nats.js.JetStreamContext]:
    nc = await jetstream.connect(url, name="test-relay", creds=creds_file("backend"),
                                 inbox_prefix=inbox_prefix("backend"))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    return nc, js


async def test_relay_dying_after_the_ack_republishes_and_jetstream_keeps_one(
    backend_db: asyncpg.Pool, nats_server: EmbeddedNats
) -> None:
    body = RunCreate(workflow_id="device-smoke", params=PARAMS, targets=Targets(all_online=True))
    run_id = (await runs.create_run(backend_db, body)).response.run_id
    nc, js = await _jetstream(nats_server.url)
    try:
        with pytest.raises(ConnectionError):
            await _DiesBeforeCommit(backend_db, js, signer=TEST_SIGNER).relay_once()
        # Published and acked, but the rows still say unsent: the next relay sends them again.
        assert await backend_db.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 3
        assert sum((await stream_counts(nats_server.url)).values()) == 3
        relay = OutboxRelay(backend_db, js, signer=TEST_SIGNER)
        assert await relay.relay_once() == 3
        assert await relay.relay_once() == 0
    finally:
        await nc.close()
    assert await stream_counts(nats_server.url) == {f"doai.cmd.node-{n}": 1 for n in (1, 2, 3)}
    assert await backend_db.fetchval("SELECT status FROM runs WHERE run_id = $1", run_id) == "dispatched"


async def test_two_relays_at_once_publish_every_command_once_and_in_order(
    backend_db: asyncpg.Pool, database_url: str, nats_server: EmbeddedNats
) -> None:
    body = RunCreate(workflow_id="device-smoke", params=PARAMS, targets=Targets(all_online=True))
    made = [(await runs.create_run(backend_db, body)).response.run_id for _ in range(30)]
    for run_id in made[::3]:  # a third are cancelled before anything was relayed
        await runs.cancel_run(backend_db, run_id)
    rows = {r["msg_id"] for r in await backend_db.fetch("SELECT msg_id FROM outbox")}
    assert len(rows) == 30 * 3 + 10 * 3
    # Broadcasts of runs cancelled before they left are withdrawn: only their RunCancel goes out.
    withdrawn = {m for m in rows if m.startswith("run-") and any(run_id in m for run_id in made[::3])}
    assert len(withdrawn) == 10 * 3
    expected = rows - withdrawn

    pools = [await db.create_pool(database_url) for _ in range(2)]
    conns = [await _jetstream(nats_server.url) for _ in range(2)]
    relays = [OutboxRelay(pool, js, signer=TEST_SIGNER, batch=7, poll_s=0.05)
              for pool, (_, js) in zip(pools, conns, strict=True)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop)) for relay in relays]
    try:
        await wait_until(lambda: _none_unsent(database_url), 60, "both relays to drain the outbox")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for nc, _ in conns:
            await nc.close()
        for pool in pools:
            await pool.close()

    # Every row was claimed by exactly one relay, both took part, and the stream holds each command once.
    assert sum(r.published for r in relays) == len(expected)
    assert all(r.published > 0 for r in relays), [r.published for r in relays]
    messages = await stream_messages(nats_server.url)
    ids = Counter(msg_id for _, _, msg_id in messages)
    assert set(ids) == expected and set(ids.values()) == {1}
    # Per (run, node): the broadcast is stored before the cancel, and a cancelled run was never broadcast.
    order: dict[tuple[str, str], list[str]] = {}
    for subject, data, _ in messages:
        command = msgspec.json.decode(data, type=Command)
        assert subject == f"doai.cmd.{command.node_id}"
        order.setdefault((command.run_id, command.node_id), []).append(type(command).__name__)
    assert len(order) == 30 * 3
    for (run_id, _), kinds in order.items():
        assert kinds == (["RunCancel"] if run_id in made[::3] else ["RunBroadcast"]), kinds
    statuses = Counter(r["status"] for r in await backend_db.fetch("SELECT status FROM runs"))
    assert statuses == {"dispatched": 20, "cancelled": 10}
