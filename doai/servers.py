"""Where NATS and PostgreSQL come from: the environment, or the embedded default."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from doai.embedded import EmbeddedNats, EmbeddedPostgres
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


def doai_home() -> Path:
    """Folder for the embedded servers' data, journals and artifacts (`DOAI_HOME`, default ./var)."""
    return Path(os.environ.get("DOAI_HOME", "var")).resolve()


@asynccontextmanager
async def infrastructure(home: Path | None = None) -> AsyncIterator[Infra]:
    """Yield server addresses; start embedded servers for whatever the environment lacks.

    NATS trust material: `DOAI_NATS_AUTH_DIR` with an external `NATS_URL` (made by
    `doai nats-auth init`); for the embedded server it is made once under
    `DOAI_HOME/nats-auth` and reused on every start.
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
    nats = None if nats_url else EmbeddedNats(home / "nats", await asyncio.to_thread(NatsTrust.ensure, auth_dir))
    pg = None if database_url else EmbeddedPostgres(home / "pg")
    try:
        if nats is not None:
            await asyncio.to_thread(nats.start)
            nats_url = nats.url
        if pg is not None:
            database_url = await asyncio.to_thread(pg.start)
        assert nats_url is not None and database_url is not None
        yield Infra(nats_url, database_url, embedded=nats is not None or pg is not None,
                    nats_auth_dir=auth_dir, nats_ca=nats_ca)
    finally:
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        if pg is not None:
            await asyncio.to_thread(pg.stop)
