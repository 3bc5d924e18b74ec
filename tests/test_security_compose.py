"""compose.yaml and its files, checked here since no Docker engine runs on these machines.

* The PostgreSQL init script really makes a read-only role: run against the real
  (embedded) PostgreSQL, then Grafana's role can read every table the migrations
  made and can write nothing.
* nats-server accepts the compose configs (plain and TLS) with the auth block `doai nats-auth init`
  writes; compose.conf run as three servers on loopback forms a JetStream cluster (an R3 stream),
  and a server dialing a route without the route password is refused.
* compose.yaml runs NATS as three servers, gives every part all three URLs and the backend
  DOAI_NATS_REPLICAS=3, keeps the route password to the NATS servers.
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
from runtime.nats_auth import NatsTrust
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
            assert 0 < int(query["expires"]) - time.time() <= 601  # now() rounded to the second
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


def route_env(name: str, password: str, route_ports: list[int], host: str = "127.0.0.1") -> dict[str, str]:
    """What compose.yaml's `x-nats-env` gives server `name` (routes on loopback ports instead of nats-N:6222)."""
    env = {"NATS_SERVER_NAME": name, "NATS_ROUTE_PASSWORD": password}
    for i, port in enumerate(route_ports, start=1):
        env[f"NATS_ROUTE_{i}"] = f"nats-route://doai-route:{password}@{host}:{port}"
    return env


def test_nats_server_accepts_the_compose_configs_with_generated_auth(tmp_path: Path) -> None:
    etc = tmp_path / "etc-nats"
    etc.mkdir()
    for name in ("nats-server.conf", "compose.conf", "compose-tls.conf"):
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
    # compose-tls.conf reads the certificate under /etc/nats/tls: point it at a real one here.
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("nats-1", "nats-2", "nats-3")
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls_conf = etc / "compose-tls.conf"
    tls_conf.write_text(tls_conf.read_text().replace("/etc/nats/tls", str(tmp_path)))
    from doai.embedded import nats_server_binary

    for conf in ("compose.conf", "compose-tls.conf"):
        server_env = {**os.environ, **route_env("nats-1", "route-pass-123", [6222, 6223, 6224])}
        check = subprocess.run([nats_server_binary(), "-c", str(etc / conf), "-t"], capture_output=True,
                               text=True, timeout=60, check=False, env=server_env)
        assert check.returncode == 0, conf + check.stdout + check.stderr
        # Without the route variables compose did not set (no NATS_ROUTE_PASSWORD), the server does not start.
        bare = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
        refused = subprocess.run([nats_server_binary(), "-c", str(etc / conf), "-t"], capture_output=True,
                                 text=True, timeout=60, check=False, env=bare)
        assert refused.returncode != 0 and "NATS_" in refused.stdout + refused.stderr


def test_compose_publishes_on_loopback_only_and_keeps_passwords_out() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            assert port.startswith(("127.0.0.1:", "${NATS_BIND:-127.0.0.1}:")), (name, port)
    assert "doai:doai@" not in text and "POSTGRES_PASSWORD: doai" not in text
    assert COMPOSE["services"]["grafana"]["environment"]["DOAI_GRAFANA_PG_USER"] == "grafana_ro"
    assert "postgres" not in [p.split(":")[0] for p in COMPOSE["services"]["postgres"].get("ports", [])]


def test_compose_runs_nats_as_a_three_server_cluster_with_route_auth_and_three_replicas() -> None:
    services = COMPOSE["services"]
    text = (ROOT / "compose.yaml").read_text()
    servers = [f"nats-{i}" for i in (1, 2, 3)]
    assert "nats" not in services and all(s in services for s in servers)
    urls = "nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222"
    for name in ("backend", "aggregator", "node-a1"):  # every client is given all three servers
        assert services[name]["environment"]["NATS_URL"] == f"${{DOAI_NATS_URL:-{urls}}}", name
        assert set(servers) <= set(services[name]["depends_on"]), name
    assert services["backend"]["environment"]["DOAI_NATS_REPLICAS"] == "3"
    for i, name in enumerate(servers, start=1):
        env = services[name]["environment"]
        assert env["NATS_SERVER_NAME"] == name
        assert env["NATS_ROUTE_PASSWORD"].startswith("${NATS_ROUTE_PASSWORD:?")  # no default: compose refuses
        assert [env[f"NATS_ROUTE_{j}"] for j in (1, 2, 3)] == [
            f"nats-route://doai-route:${{NATS_ROUTE_PASSWORD}}@nats-{j}:6222" for j in (1, 2, 3)]
        volumes = services[name]["volumes"]
        assert f"nats-{i}-data:/data" in volumes  # each server its own store
        assert not any("nats-auth:" in v and "nats-auth.conf" not in v for v in volumes)  # no seed
        assert services[name]["ports"] == [f"${{NATS_BIND:-127.0.0.1}}:{4221 + i}:4222"]  # routes unpublished
    # The route password reaches the NATS servers only.
    for name, service in services.items():
        if name not in servers:
            assert "NATS_ROUTE" not in str(service), name
    assert "6222:" not in text


def test_the_compose_nats_config_forms_a_cluster_and_refuses_a_route_without_the_password(
    tmp_path: Path, nats_trust: NatsTrust
) -> None:
    """compose.conf run for real on loopback: three servers form a JetStream cluster (an R3 stream is
    created), and a fourth server dialing a route with a wrong password is refused and never joins."""
    from doai.embedded import free_port, nats_server_binary

    password = "compose-route-pass-0123456789"
    route_ports = [free_port() for _ in range(3)]
    client_ports = [free_port() for _ in range(3)]
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], env: dict[str, str], log: Path) -> None:
        procs.append(subprocess.Popen([nats_server_binary(), *args, "-l", str(log)], env={**os.environ, **env},
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))

    try:
        for i in range(3):
            etc = tmp_path / f"etc-{i + 1}"
            (etc / "auth").mkdir(parents=True)
            shutil.copy(ROOT / "infra" / "nats" / "nats-server.conf", etc / "nats-server.conf")
            # As in compose.yaml, but on loopback ports. (Not with `--cluster`: that flag drops the config's
            # route authorization when its URL carries no password.)
            conf = (ROOT / "infra" / "nats" / "compose.conf").read_text()
            assert "listen: 0.0.0.0:6222" in conf
            (etc / "compose.conf").write_text(conf.replace("listen: 0.0.0.0:6222",
                                                           f"listen: 127.0.0.1:{route_ports[i]}"))
            (etc / "auth" / "nats-auth.conf").write_text(nats_trust.server_config(str(tmp_path / f"jwt-{i + 1}")))
            start(["-js", "-sd", str(tmp_path / f"data-{i + 1}"), "-c", str(etc / "compose.conf"), "-a", "127.0.0.1",
                   "-p", str(client_ports[i])],
                  route_env(f"nats-{i + 1}", password, route_ports), tmp_path / f"nats-{i + 1}.log")
        asyncio.run(_r3_stream([f"nats://127.0.0.1:{p}" for p in client_ports]))

        rogue_log = tmp_path / "rogue.log"
        start(["-a", "127.0.0.1", "-p", str(free_port()), "--cluster", f"nats://127.0.0.1:{free_port()}",
               "--cluster_name", "doai", "--routes", f"nats-route://doai-route:wrong@127.0.0.1:{route_ports[0]}"],
              {}, rogue_log)
        deadline = time.monotonic() + 20
        while "authorization violation" not in (rogue_log.read_text().lower() if rogue_log.exists() else ""):
            assert time.monotonic() < deadline, "the rogue route was not refused"
            time.sleep(0.1)
        # nats-1 still has exactly its two peers as routes (the rogue is not one of them).
        assert asyncio.run(_routes(nats_trust, f"nats://127.0.0.1:{client_ports[0]}")) == {"nats-2", "nats-3"}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def _r3_stream(urls: list[str]) -> None:
    import nats
    from nats.js.api import StreamConfig

    from tests.conftest import creds_file

    nc = await nats.connect(urls, user_credentials=str(creds_file("admin")), max_reconnect_attempts=-1,
                            reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            try:
                info = await js.add_stream(StreamConfig(name="COMPOSE_R3", subjects=["compose.r3"], num_replicas=3))
                break
            except Exception:  # no JetStream leader yet
                assert time.monotonic() < deadline, "the compose cluster did not form"
                await asyncio.sleep(0.3)
        assert info.config.num_replicas == 3
        deadline = time.monotonic() + 30
        while True:  # the new stream answers once its leader is elected and its interest reached this server
            try:
                await js.publish("compose.r3", b"x", timeout=2, headers={"Nats-Msg-Id": "compose-r3-x"})
                break
            except Exception as exc:
                assert time.monotonic() < deadline, f"the new R3 stream never took a publish: {exc!r}"
                await asyncio.sleep(0.2)
        deadline = time.monotonic() + 10
        while True:
            c = (await js.stream_info("COMPOSE_R3")).cluster
            if c is not None and len(c.replicas or []) == 2 and all(r.current for r in c.replicas or []):
                return
            assert time.monotonic() < deadline, c
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _routes(trust: NatsTrust, url: str) -> set[str]:
    import json

    import nats

    nc = await nats.connect(url, user_credentials=str(trust.creds_path("sys-user")), allow_reconnect=False)
    try:
        server_id = nc._server_info["server_id"]
        reply = await nc.request(f"$SYS.REQ.SERVER.{server_id}.ROUTEZ", b"{}", timeout=3)
        data = json.loads(reply.data)["data"]
        return {r.get("remote_name") or r["remote_id"] for r in data.get("routes") or []}
    finally:
        await nc.close()


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
    for server in ("nats-1", "nats-2", "nats-3"):
        assert not any("nats-auth:" in v and "nats-auth.conf" not in v for v in services[server]["volumes"])
