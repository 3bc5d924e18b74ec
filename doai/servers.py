"""Where NATS and PostgreSQL come from: the environment, or the embedded default."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from doai.embedded import EmbeddedNats, EmbeddedPostgres


@dataclass(frozen=True)
class Infra:
    nats_url: str
    database_url: str
    embedded: bool


def doai_home() -> Path:
    """Folder for the embedded servers' data, journals and artifacts (`DOAI_HOME`, default ./var)."""
    return Path(os.environ.get("DOAI_HOME", "var")).resolve()


@asynccontextmanager
async def infrastructure(home: Path | None = None) -> AsyncIterator[Infra]:
    """Yield server addresses; start embedded servers for whatever the environment lacks."""
    home = home or doai_home()
    nats_url = os.environ.get("NATS_URL")
    database_url = os.environ.get("DATABASE_URL")
    nats = None if nats_url else EmbeddedNats(home / "nats")
    pg = None if database_url else EmbeddedPostgres(home / "pg")
    try:
        if nats is not None:
            await asyncio.to_thread(nats.start)
            nats_url = nats.url
        if pg is not None:
            database_url = await asyncio.to_thread(pg.start)
        assert nats_url is not None and database_url is not None
        yield Infra(nats_url, database_url, embedded=nats is not None or pg is not None)
    finally:
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        if pg is not None:
            await asyncio.to_thread(pg.stop)
