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


async def resolve(conn: asyncpg.Connection, targets: Targets, stale_s: float) -> Resolution:
    """Explicit devices must be listed online; `nodes` / `all_online` take the devices seen
    online within the last `stale_s` seconds (an inventory older than that is not trusted)."""
    by_node: dict[str, list[str]] = defaultdict(list)
    rejected: list[dict[str, str]] = []
    if isinstance(targets.devices, list):
        known = {
            (r["node_id"], r["serial"]): r["status"]
            for r in await conn.fetch(
                "SELECT d.node_id, d.serial,"
                " CASE WHEN d.last_seen < now() - make_interval(secs => $3) THEN 'stale' ELSE d.status END"
                " AS status FROM devices d"
                " JOIN unnest($1::text[], $2::text[]) AS t(node_id, serial)"
                " ON d.node_id = t.node_id AND d.serial = t.serial",
                [d.node_id for d in targets.devices],
                [d.serial for d in targets.devices],
                stale_s,
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
            "SELECT node_id, serial FROM devices WHERE status = 'online'"
            " AND last_seen >= now() - make_interval(secs => $2)"
            " AND ($1::text[] IS NULL OR node_id = ANY($1)) ORDER BY node_id, serial",
            nodes,
            stale_s,
        )
        for r in rows:
            by_node[r["node_id"]].append(r["serial"])
        for node in nodes or []:
            if node not in by_node:
                rejected.append({"node_id": node, "serial": "", "reason": "node has no online device"})
    return Resolution(dict(by_node), rejected)
