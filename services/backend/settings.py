"""Backend configuration, from the environment (`doai backend --help` lists it)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class BackendSettings:
    database_url: str
    nats_url: str
    api_tokens: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1_048_576
    # How often the relay looks for unsent broadcasts when nothing woke it up.
    relay_poll_s: float = 1.0
    # Devices whose last inventory is older than this are not targeted.
    device_stale_s: float = 60.0

    @classmethod
    def from_env(cls, database_url: str, nats_url: str) -> BackendSettings:
        tokens = [t for t in os.environ.get("DOAI_API_TOKEN", "").split(",") if t.strip()]
        return cls(
            database_url=database_url,
            nats_url=nats_url,
            api_tokens=[t.strip() for t in tokens],
            host=os.environ.get("DOAI_API_HOST", "127.0.0.1"),
            port=int(os.environ.get("DOAI_API_PORT", "8000")),
            device_stale_s=float(os.environ.get("DOAI_DEVICE_STALE_S", "60")),
        )
