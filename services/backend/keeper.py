"""The backend keeps doai's JetStream layout alive: streams and every node's command consumer.

The backend is the one part that manages streams and consumers (a node may
not create its own consumer). Every `every_s` it re-declares what is missing:

* `DOAI_CMD` and `DOAI_EVT`, with their limits (`runtime.jetstream`);
* the durable consumer `node-<id>` on `DOAI_CMD` of every node it knows: nodes
  that sent a heartbeat (`nodes`) or an inventory (`devices`), and nodes with
  a broadcast still waiting in the outbox.

Whatever it recreates is logged as a warning. A deleted stream or consumer is
therefore back within `every_s` (plus a round trip), and the parts consuming it
bind again by themselves (`runtime.pull_consumer`). A recreated node consumer
delivers the whole stream again from the start; the node journal keeps each
broadcast once, so nothing runs twice.
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from nats.js import JetStreamContext

from contracts.subjects import node_durable
from runtime import jetstream
from runtime.aio import pause

log = structlog.get_logger(__name__)

_KNOWN_NODES = """
SELECT node_id FROM nodes
UNION SELECT DISTINCT node_id FROM devices
UNION SELECT DISTINCT node_id FROM outbox WHERE sent_at IS NULL
UNION SELECT node_id FROM node_identities WHERE revoked_at IS NULL
"""


class StreamKeeper:
    def __init__(self, pool: asyncpg.Pool, js: JetStreamContext, *, every_s: float = 3.0,
                 limits: dict[str, jetstream.StreamLimits] | None = None) -> None:
        self._pool = pool
        self._js = js
        self._every_s = every_s
        self._limits = limits
        self.streams_recreated = 0
        self.consumers_recreated = 0
        self.rounds = 0

    async def ensure_once(self) -> tuple[list[str], list[str]]:
        """Recreate missing streams and node consumers; return (streams, nodes) recreated."""
        streams = await jetstream.ensure_streams(self._js, self._limits, update=False)
        for name in streams:
            log.warning("stream was missing; recreated", stream=name)
        node_ids = sorted(r["node_id"] for r in await self._pool.fetch(_KNOWN_NODES))
        nodes = await jetstream.ensure_node_consumers(self._js, node_ids) if node_ids else []
        for node_id in nodes:
            log.warning("node command consumer was missing; recreated", node_id=node_id,
                        durable=node_durable(node_id))
        self.streams_recreated += len(streams)
        self.consumers_recreated += len(nodes)
        self.rounds += 1
        return streams, nodes

    async def run(self, stop: asyncio.Event) -> None:
        failing = False
        while not await pause(stop, self._every_s):
            try:
                await self.ensure_once()
            except Exception as exc:  # NATS or PostgreSQL unreachable: try again next round
                if not failing:
                    log.warning("re-declaring streams and consumers failed; retrying", error=repr(exc))
                failing = True
            else:
                if failing:
                    log.info("re-declaring streams and consumers works again")
                failing = False
