"""Review attacks on the trust boundary (issue 9), each against a real backend and nats-server.

Each test performs the attack, asserts the refusal and that nothing else changed
(PostgreSQL rows, the consumers declared on nats-server).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from contracts.subjects import CMD_STREAM
from runtime.jetstream import consumer_names
from services.node.enroll import new_user_seed, user_public_key_of
from tests.conftest import AuthNats
from tests.test_security_enrollment import SECRET, count


async def cmd_consumers(nats_server: AuthNats) -> set[str]:
    nc = await nats_server.connect("admin")
    try:
        return await consumer_names(nc.jetstream(), CMD_STREAM)
    finally:
        await nc.close()


async def test_two_first_enrollments_of_one_id_leave_one_key(
    start_system: Any, nats_server: AuthNats, database_url: str, tmp_path: Path
) -> None:
    """Attack: race a node's first enrollment with another key (both found no row and both got a JWT
    before; only the second key was recorded, so revoking the node left the first key working)."""
    system = await start_system(nodes=0, node_secret=SECRET)
    async with httpx.AsyncClient(base_url=system.api_url, headers={"X-Node-Auth": SECRET}) as node_api:
        for i in range(10):
            node_id = f"race-{i}"
            keys = [user_public_key_of(new_user_seed()), user_public_key_of(new_user_seed())]
            answers = await asyncio.gather(*(
                node_api.post("/v1/node/enroll", json={"node_id": node_id, "public_key": k}) for k in keys))
            codes = sorted(r.status_code for r in answers)
            assert codes == [201, 409], (node_id, [(r.status_code, r.text[:200]) for r in answers])
            loser = next(r for r in answers if r.status_code == 409)
            assert loser.json()["error"]["code"] == "node_enrolled" and "user_jwt" not in loser.text
            winner = keys[[r.status_code for r in answers].index(201)]
            # The one recorded key is the one that got a JWT: revoking the node revokes it.
            assert await count(database_url, "SELECT public_key FROM node_identities WHERE node_id = $1",
                               node_id) == winner

        # The same key raced for two node ids: one 409 (not a 500), one row.
        key = user_public_key_of(new_user_seed())
        answers = await asyncio.gather(*(
            node_api.post("/v1/node/enroll", json={"node_id": n, "public_key": key}) for n in ("twin-a", "twin-b")))
        assert sorted(r.status_code for r in answers) == [201, 409], [r.text[:200] for r in answers]
        assert await count(database_url, "SELECT count(*) FROM node_identities WHERE public_key = $1", key) == 1
    assert await count(database_url, "SELECT count(*) FROM node_identities") == 11


async def test_node_id_with_a_trailing_line_feed_is_refused_at_enrollment(
    start_system: Any, nats_server: AuthNats, database_url: str, tmp_path: Path
) -> None:
    """Attack: `"node-1\\n"` matches the node id pattern (Python's `$` allows a final line feed). It got
    a 503 "nats_unavailable" (a node would retry it for ever) only because nats-py happened to
    refuse the consumer name; it must be a 422 with the path, and nothing recorded or declared."""
    system = await start_system(nodes=0, node_secret=SECRET)
    before = await cmd_consumers(nats_server)
    key = user_public_key_of(new_user_seed())
    async with httpx.AsyncClient(base_url=system.api_url, headers={"X-Node-Auth": SECRET}) as node_api:
        for bad in ("node-1\n", "node-1\r\n", "\nnode-1"):
            r = await node_api.post("/v1/node/enroll", json={"node_id": bad, "public_key": key})
            assert r.status_code == 422, (bad, r.status_code, r.text[:300])
            assert any(d["path"] == "$.node_id" for d in r.json()["error"]["details"]), r.text[:300]
    assert await count(database_url, "SELECT count(*) FROM node_identities") == 0
    assert await cmd_consumers(nats_server) == before


def test_settings_repr_keeps_database_and_nats_passwords_out(tmp_path: Path) -> None:
    """Leak: `repr(BackendSettings)` masked the secret fields but showed DATABASE_URL whole, password
    included (and a `nats://user:password@` URL the same)."""
    from runtime.signing import generate_seed
    from services.backend.settings import BackendSettings

    settings = BackendSettings("postgresql://doai:pg-Pa55word@db.example:5432/doai",
                               "nats://someone:nats-Pa55word@127.0.0.1:4222", api_tokens=["t" * 32],
                               node_secret="n" * 40, command_signing_seed=generate_seed(),
                               nats_auth_dir=tmp_path)
    shown = repr(settings)
    assert "pg-Pa55word" not in shown and "nats-Pa55word" not in shown, shown
    assert "postgresql://doai:***@db.example:5432/doai" in shown  # the rest stays readable
    assert settings.database_url.endswith("pg-Pa55word@db.example:5432/doai")  # the value itself is intact
