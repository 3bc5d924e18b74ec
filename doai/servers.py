"""Where NATS and PostgreSQL come from: the environment, or the embedded default."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from doai.embedded import EmbeddedNats, EmbeddedPostgres
from doai.nats_cluster import NatsCluster
from runtime.config import ConfigError
from runtime.nats_auth import NatsTrust, TrustError


@dataclass(frozen=True)
class Infra:
    nats_url: str
    database_url: str
    embedded: bool
    # The NATS trust folder (`runtime.nats_auth`): the backend's issuer keys and the central roles' creds.
    nats_auth_dir: Path
    # CA file that signed nats-server's TLS certificate (None: plain nats://).
    nats_ca: Path | None = None
    # How many replicas the backend gives the streams (3 on the embedded cluster: `--nats-cluster 3`;
    # from DOAI_NATS_REPLICAS with an external NATS_URL).
    nats_replicas: int = 1


def _replicas(text: str | None) -> int:
    try:
        replicas = int(text or 1)
    except ValueError:
        raise ConfigError(f"DOAI_NATS_REPLICAS: expected an integer, got {text!r}") from None
    if not 1 <= replicas <= 5:
        raise ConfigError(f"DOAI_NATS_REPLICAS must be between 1 and 5 (JetStream's limit), got {replicas}")
    return replicas


def doai_home() -> Path:
    """Folder for the embedded servers' data, journals and artifacts (`DOAI_HOME`, default ./var)."""
    return Path(os.environ.get("DOAI_HOME", "var")).resolve()


@asynccontextmanager
async def infrastructure(home: Path | None = None, nats_cluster: int = 0) -> AsyncIterator[Infra]:
    """Yield server addresses; start embedded servers for whatever the environment lacks.

    NATS trust material: `DOAI_NATS_AUTH_DIR` with an external `NATS_URL` (made by
    `doai nats-auth init`); for the embedded server it is made once under
    `DOAI_HOME/nats-auth` and reused on every start. `nats_cluster` (3 or more): the embedded
    NATS is a cluster of that many servers (`doai.nats_cluster`), with streams of 3 replicas.
    """
    home = home or doai_home()
    nats_url = os.environ.get("NATS_URL")
    database_url = os.environ.get("DATABASE_URL")
    configured_auth = os.environ.get("DOAI_NATS_AUTH_DIR")
    if nats_url and not configured_auth:
        raise TrustError("NATS_URL is set: also set DOAI_NATS_AUTH_DIR to its trust folder "
                         "(`doai nats-auth init --dir DIR`)")
    auth_dir = Path(configured_auth) if configured_auth else home / "nats-auth"
    nats_ca = Path(os.environ["DOAI_NATS_CA"]) if os.environ.get("DOAI_NATS_CA") else None
    if nats_url and nats_cluster:
        raise ConfigError("--nats-cluster starts an embedded NATS cluster, but NATS_URL is set: unset it, or "
                          "give NATS_URL every server of your cluster and DOAI_NATS_REPLICAS=3")
    nats: EmbeddedNats | NatsCluster | None = None
    replicas = _replicas(os.environ.get("DOAI_NATS_REPLICAS"))
    if not nats_url:
        trust = await asyncio.to_thread(NatsTrust.ensure, auth_dir)
        if nats_cluster:
            nats = NatsCluster(home / "nats-cluster", trust, nats_cluster)
            replicas = nats.replicas
        else:
            nats = EmbeddedNats(home / "nats", trust)
    pg = None if database_url else EmbeddedPostgres(home / "pg")
    try:
        if nats is not None:
            await asyncio.to_thread(nats.start)
            nats_url = nats.url
        if pg is not None:
            database_url = await asyncio.to_thread(pg.start)
        assert nats_url is not None and database_url is not None
        yield Infra(nats_url, database_url, embedded=nats is not None or pg is not None,
                    nats_auth_dir=auth_dir, nats_ca=nats_ca, nats_replicas=replicas)
    finally:
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        if pg is not None:
            await asyncio.to_thread(pg.stop)
