"""compose.yaml and its files, checked here since no Docker engine runs on these machines.

* The PostgreSQL init script really makes a read-only role: run against the real
  (embedded) PostgreSQL, then Grafana's role can read every table the migrations
  made and can write nothing.
* nats-server accepts the compose config with the auth block `doai nats-auth init` writes.
* Every published port is bound to 127.0.0.1 (or the NATS_BIND the operator chooses),
  no password is written into the file, and the variables it sets are the ones the
  parts read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
import yaml

from runtime import db
from runtime.config import env_names
from services.aggregator.main import AggregatorSettings
from services.backend.settings import BackendSettings
from services.node.settings import NodeSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())


def psql() -> str:
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "psql")


async def test_grafana_gets_a_role_that_reads_everything_and_writes_nothing(database_url: str) -> None:
    parts = urlsplit(database_url)
    dbname = parts.path.lstrip("/")
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    host = query.get("host") or parts.hostname or ""
    port = query.get("port") or parts.port  # a Unix-socket URI names its port in the query (?host=DIR&port=N)
    owner = parts.username or "postgres"
    pool = await db.create_pool(database_url)
    try:
        await db.migrate(pool)  # the tables exist before the script runs (as on an upgrade) ...
    finally:
        await pool.close()
    env = {**os.environ, "POSTGRES_USER": owner, "POSTGRES_DB": dbname, "GRAFANA_PG_PASSWORD": "ro-pass-123",
           "PGHOST": host, "PATH": f"{Path(psql()).parent}:{os.environ.get('PATH', '')}"}
    if port:
        env["PGPORT"] = str(port)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    admin = await asyncpg.connect(database_url)
    try:
        run = await asyncio.to_thread(
            subprocess.run, ["sh", str(ROOT / "infra" / "postgres" / "10-grafana-readonly.sh")], env=env,
            capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, run.stderr
        # ... and a table a later migration creates is readable too (default privileges).
        await admin.execute("CREATE TABLE later_migration (x int)")
        await admin.execute("INSERT INTO later_migration VALUES (1)")
        ro_url = parts._replace(netloc=f"grafana_ro:ro-pass-123@{parts.hostname or ''}"
                                       f"{':' + str(parts.port) if parts.port else ''}").geturl()
        # The backend's link settings and one recorded artifact, as a running fleet has them.
        await admin.execute("INSERT INTO fleet_settings (name, value) VALUES ('api_public_url', 'http://127.0.0.1:8080'),"
                            " ('artifact_url_key', 'link-key-secret'), ('artifact_url_ttl_s', '600')"
                            " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value")
        await admin.execute("INSERT INTO artifacts (run_id, node_id, device_serial, step_id, store, key, uri, bytes,"
                            " sha256, content_type, created_at) VALUES (gen_random_uuid(), 'node-1', 'S1', 'shot',"
                            " 'local', 'lab/node-1/S1/r/1.png', 'file:///x', 8, 'x', 'image/png', now())")
        settings_before = await admin.fetch("SELECT name, value FROM fleet_settings ORDER BY name")
        ro = await asyncpg.connect(ro_url)
        try:
            assert await ro.fetchval("SELECT count(*) FROM runs") == 0
            # The link key stays hidden from the read-only role, however it asks ...
            visible = {r["name"] for r in await ro.fetch("SELECT name FROM fleet_settings")}
            assert "api_public_url" in visible and "artifact_url_key" not in visible, visible
            assert await ro.fetchval("SELECT value FROM fleet_settings WHERE name = 'artifact_url_key'") is None
            for attack in ("SET row_security = off; SELECT value FROM fleet_settings",
                           "ALTER TABLE fleet_settings DISABLE ROW LEVEL SECURITY",
                           "DROP POLICY fleet_settings_readable ON fleet_settings"):
                with pytest.raises(asyncpg.PostgresError):
                    await ro.execute(attack)
            # ... while Grafana's image links still work, for recorded artifacts only, expiring as configured.
            link = await ro.fetchval("SELECT artifact_url('local', 'lab/node-1/S1/r/1.png')")
            assert link is not None and link.startswith("http://127.0.0.1:8080/v1/artifacts/local/lab/node-1/S1/r/1.png?")
            query = dict(p.split("=", 1) for p in urlsplit(link).query.split("&"))
            assert 0 < int(query["expires"]) - time.time() <= 600
            message = f"local\nlab/node-1/S1/r/1.png\n{query['expires']}".encode()
            assert query["sig"] == hmac.new(b"link-key-secret", message, hashlib.sha256).hexdigest()
            assert await ro.fetchval("SELECT artifact_url('local', 'any/key/I/like.png')") is None
            assert await ro.fetchval("SELECT count(*) FROM run_summary") == 0
            assert await ro.fetchval("SELECT x FROM later_migration") == 1
            for attack in ("INSERT INTO runs (run_id) VALUES (gen_random_uuid())", "DELETE FROM later_migration",
                           "CREATE TABLE evil (x int)", "DROP TABLE later_migration",
                           "UPDATE devices SET status = 'x'"):
                with pytest.raises(asyncpg.PostgresError):
                    await ro.execute(attack)
        finally:
            await ro.close()
        assert await admin.fetchval("SELECT x FROM later_migration") == 1  # nothing changed
        assert await admin.fetch("SELECT name, value FROM fleet_settings ORDER BY name") == settings_before
        assert await admin.fetchval("SELECT relrowsecurity FROM pg_class WHERE relname = 'fleet_settings'")
        assert await admin.fetchval("SELECT count(*) FROM runs") == 0
    finally:
        await admin.execute("DROP OWNED BY grafana_ro")
        await admin.close()
        other = await asyncpg.connect(database_url)
        try:
            await other.execute("DROP ROLE IF EXISTS grafana_ro")
        except asyncpg.PostgresError:  # still referenced in another database of a shared server
            pass
        finally:
            await other.close()


def test_nats_server_accepts_the_compose_config_with_generated_auth(tmp_path: Path) -> None:
    etc = tmp_path / "etc-nats"
    etc.mkdir()
    for name in ("nats-server.conf", "compose.conf"):
        shutil.copy(ROOT / "infra" / "nats" / name, etc / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    init = subprocess.run([sys.executable, "-m", "doai.cli", "nats-auth", "init", "--dir", str(tmp_path / "auth"),
                           "--resolver-dir", str(tmp_path / "jwt")], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert init.returncode == 0, init.stderr
    (etc / "auth").mkdir()
    shutil.copy(tmp_path / "auth" / "nats-auth.conf", etc / "auth" / "nats-auth.conf")
    # The server's file holds JWTs and public keys only, never a seed.
    assert not re.search(r"\bS[OAU][A-Z2-7]{50,}", (etc / "auth" / "nats-auth.conf").read_text())
    from doai.embedded import nats_server_binary

    check = subprocess.run([nats_server_binary(), "-c", str(etc / "compose.conf"), "-t"], capture_output=True,
                           text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_compose_publishes_on_loopback_only_and_keeps_passwords_out() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            assert port.startswith(("127.0.0.1:", "${NATS_BIND:-127.0.0.1}:")), (name, port)
    assert "doai:doai@" not in text and "POSTGRES_PASSWORD: doai" not in text
    assert COMPOSE["services"]["grafana"]["environment"]["DOAI_GRAFANA_PG_USER"] == "grafana_ro"
    assert "postgres" not in [p.split(":")[0] for p in COMPOSE["services"]["postgres"].get("ports", [])]


def test_compose_sets_the_variables_the_parts_read() -> None:
    services = COMPOSE["services"]
    backend = set(env_names(BackendSettings).values())
    aggregator = set(env_names(AggregatorSettings).values())
    node = set(env_names(NodeSettings).values())
    assert {"DOAI_NATS_AUTH_DIR", "DOAI_NATS_CA", "NATS_URL", "DATABASE_URL"} <= backend
    assert set(services["backend"]["environment"]) - {"DOAI_LOG_FORMAT", "<<"} <= backend
    assert set(services["aggregator"]["environment"]) - {"DOAI_LOG_FORMAT", "<<"} <= aggregator
    assert set(services["node-a1"]["environment"]) - {"DOAI_LOG_FORMAT"} <= node
    assert "--api-url" in services["node-a1"]["command"]
    # Each part gets only what it needs from the trust folder.
    assert services["aggregator"]["volumes"][0].endswith("aggregator.creds:/auth/aggregator.creds:ro")
    assert not any("nats-auth:" in v and "nats-auth.conf" not in v for v in services["nats"]["volumes"])
