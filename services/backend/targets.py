"""Resolve a run's targets to explicit (node, serial) pairs from the fleet inventory (rule 6)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg

from contracts.api import Targets


@dataclass
class Resolution:
    by_node: dict[str, list[str]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.by_node.values())


async def resolve(conn: asyncpg.Connection, targets: Targets) -> Resolution:
    """Only devices the `device_liveness` view calls `online` are targeted: listed online by their
    node's inventory within the liveness window, on a node whose heartbeat is within it too (the
    rule `GET /v1/devices`, `GET /v1/nodes` and Grafana use)."""
    by_node: dict[str, list[str]] = defaultdict(list)
    rejected: list[dict[str, str]] = []
    if isinstance(targets.devices, list):
        known = {
            (r["node_id"], r["serial"]): r["status"]
            for r in await conn.fetch(
                "SELECT d.node_id, d.serial, d.liveness AS status FROM device_liveness d"
                " JOIN unnest($1::text[], $2::text[]) AS t(node_id, serial)"
                " ON d.node_id = t.node_id AND d.serial = t.serial",
                [d.node_id for d in targets.devices],
                [d.serial for d in targets.devices],
            )
        }
        seen: set[tuple[str, str]] = set()
        for d in targets.devices:
            key = (d.node_id, d.serial)
            if key in seen:
                continue
            seen.add(key)
            status = known.get(key)
            if status is None:
                rejected.append({"node_id": d.node_id, "serial": d.serial, "reason": "unknown device"})
            elif status != "online":
                reason = "device not seen recently" if status == "stale" else f"device is {status}"
                rejected.append({"node_id": d.node_id, "serial": d.serial, "reason": reason})
            else:
                by_node[d.node_id].append(d.serial)
    else:
        nodes = targets.nodes if isinstance(targets.nodes, list) else None
        rows = await conn.fetch(
            "SELECT node_id, serial FROM device_liveness WHERE online"
            " AND ($1::text[] IS NULL OR node_id = ANY($1)) ORDER BY node_id, serial",
            nodes,
        )
        for r in rows:
            by_node[r["node_id"]].append(r["serial"])
        for node in nodes or []:
            if node not in by_node:
                rejected.append({"node_id": node, "serial": "", "reason": "node has no online device"})
    return Resolution(dict(by_node), rejected)
