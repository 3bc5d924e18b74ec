"""Shared fixtures: a real PostgreSQL (embedded, or DOAI_TEST_DATABASE_URL) and real nats-servers.

Each test that needs a database gets a fresh one (CREATE DATABASE on the
session's server); each test that needs NATS gets its own nats-server with an
empty store, so tests never see each other's streams.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS

from doai.embedded import EmbeddedNats, EmbeddedPostgres
from doai.servers import Infra
from doai.up import System, UpOptions, fleet_devices, publish_recipes, running_system, wait_for_devices
from runtime import jetstream
from runtime.logging import configure_logging
from runtime.nats_auth import NatsTrust, inbox_prefix
from runtime.nats_creds import write_secret
from tests.signing_support import TEST_SIGNING_SEED


@pytest.fixture(scope="session")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every structlog line of the session, as JSON, for tests that check log context."""
    path = tmp_path_factory.mktemp("logs") / "doai.jsonl"
    configure_logging(level="info", fmt="console", log_file=str(path))
    return path


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory, log_file: Path) -> Iterator[str]:
    configured = os.environ.get("DOAI_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    uri = pg.start()
    yield uri
    pg.stop()


def with_database(uri: str, name: str) -> str:
    return urlunsplit(urlsplit(uri)._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_database(pg_server: str) -> AsyncIterator[str]:
    """A new, empty database on the session's server, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(pg_server, name)
    finally:
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url(pg_server: str) -> AsyncIterator[str]:
    """A new, empty database for this test."""
    async with fresh_database(pg_server) as url:
        yield url


# -- NATS: every server has decentralized auth; every client connects as some identity ----------

_TRUST: list[NatsTrust] = []
_SERVERS: dict[str, AuthNats] = {}


def trust() -> NatsTrust:
    """The session's NATS trust material (one operator for every test server)."""
    assert _TRUST, "the nats_trust fixture has not run (use the nats_server fixture)"
    return _TRUST[0]


def creds_file(role: str = "admin", node_id: str | None = None) -> Path:
    """A credentials file of the session's trust material for this identity (made once, 0600)."""
    t = trust()
    path = t.dir / "test-creds" / (f"node-{node_id}.creds" if role == "node" else f"{role}.creds")
    if not path.exists():
        write_secret(path, t.new_user_creds(role, node_id))
    return path


def nats_options(url: str, role: str = "admin", node_id: str | None = None) -> dict[str, Any]:
    """`nats.connect` keyword arguments for an identity on the test server at `url`.

    `admin` (unrestricted, tests only) is what test helpers use to set up and inspect
    streams; the parts under test connect as their real roles.
    """
    options: dict[str, Any] = {"user_credentials": str(creds_file(role, node_id)),
                               "inbox_prefix": inbox_prefix(role, node_id)}
    server = _SERVERS.get(url)
    if server is not None and server.ca_file is not None:
        options.update(jetstream.tls_options(url, server.ca_file))  # TLS first, as the parts connect
    return options


def server_ca(url: str) -> Path | None:
    """The CA file of the test server at `url` when it runs TLS."""
    server = _SERVERS.get(url)
    return server.ca_file if server is not None else None


class AuthNats(EmbeddedNats):
    """The test's nats-server, with helpers to connect as any identity of the session's trust material."""

    ca_file: Path | None = None

    def creds(self, role: str = "admin", node_id: str | None = None) -> Path:
        return creds_file(role, node_id)

    def options(self, role: str = "admin", node_id: str | None = None) -> dict[str, Any]:
        return nats_options(self.url, role, node_id)

    async def connect(self, role: str = "admin", node_id: str | None = None, **extra: Any) -> NATS:
        nc: NATS = await nats.connect(self.url, **{**self.options(role, node_id), **extra})
        return nc


@pytest.fixture(scope="session")
def nats_trust(tmp_path_factory: pytest.TempPathFactory) -> NatsTrust:
    t = NatsTrust.ensure(tmp_path_factory.mktemp("nats-auth") / "trust")
    _TRUST[:] = [t]
    return t


@pytest.fixture
def nats_server(tmp_path: Path, log_file: Path, nats_trust: NatsTrust) -> Iterator[AuthNats]:
    server = AuthNats(tmp_path / "nats", nats_trust)
    server.start()
    _SERVERS[server.url] = server
    yield server
    server.stop()
    _SERVERS.pop(server.url, None)


TEST_TOKEN = "test-operator-token-0123456789abcdef"


@pytest.fixture
async def start_system(
    nats_server: AuthNats, database_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[System]]]:
    """Start the whole system in-process (backend, aggregator, nodes with simulators) on demand."""
    async with AsyncExitStack() as stack:

        async def start(nodes: int = 1, devices: int = 2, slots: int = 20, **options: Any) -> System:
            opts = UpOptions(home=tmp_path / "home", nodes=nodes, devices=devices, slots=slots,
                             sim_latency_ms=options.pop("sim_latency_ms", 2.0),
                             screen_latency_ms=options.pop("screen_latency_ms", 20.0),
                             inventory_interval_s=options.pop("inventory_interval_s", 0.5),
                             command_signing_seed=TEST_SIGNING_SEED, **options)
            infra = Infra(nats_server.url, database_url, embedded=False, nats_auth_dir=nats_server.trust.dir,
                          nats_ca=nats_server.ca_file)
            system = await stack.enter_async_context(running_system(opts, infra, TEST_TOKEN, port=0))
            async with system.client() as client:
                await publish_recipes(client)
                online = await wait_for_devices(client, fleet_devices(system.sims), timeout_s=30)
            assert online == nodes * devices, f"only {online} devices came online"
            return system

        yield start
