"""Every Grafana panel's SQL runs on a seeded PostgreSQL and returns rows.

No Grafana server can run on this machine (no binary, no Docker), so the test
does what Grafana's PostgreSQL data source does before it sends a query: it
substitutes the macros (`$__timeFilter`, `$__timeFrom()`, `$__timeTo()`,
`$__timeGroupAlias`, `$__interval`, `$__interval_ms`) the way Grafana renders
them, then runs the SQL. The database is seeded by folding two recorded
multi-node runs (events through the real fold), a fresh heartbeat and
inventory, and one dead letter. Provisioning files are checked for the
datasource uid and dashboard folder the panels use.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import yaml

from contracts.events import DeviceInfo, DeviceInventoryEvent, NodeHeartbeat
from contracts.ids import new_id
from services.aggregator.fold import Batch, DeadLetter, Incoming, fold
from tests.aggregator_support import FleetRecording, migrate, seed_run

GRAFANA = Path(__file__).resolve().parent.parent / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
EXPECTED_UIDS = {"doai-fleet", "doai-runs", "doai-failures", "doai-artifacts"}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    found = []
    for path in DASHBOARDS:
        for p in load(path)["panels"]:
            for target in p["targets"]:
                found.append((f"{path.stem}:{p['title']}", p, target))
    return found


def _seconds(interval: str) -> float:
    m = re.fullmatch(r"'?(\d+)(ms|s|m|h|d)'?", interval.strip())
    assert m, f"interval {interval!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def render(sql: str, start: datetime, end: datetime, interval_s: int) -> str:
    """Substitute Grafana's PostgreSQL macros as the data source renders them."""
    iso = "%Y-%m-%dT%H:%M:%SZ"
    frm, to = start.strftime(iso), end.strftime(iso)
    sql = sql.replace("$__interval_ms", str(interval_s * 1000)).replace("$__interval", f"{interval_s}s")
    sql = re.sub(r"\$__timeFilter\(([^)]*)\)", lambda m: f"{m.group(1)} BETWEEN '{frm}' AND '{to}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{frm}'").replace("$__timeTo()", f"'{to}'")

    def group(m: re.Match[str]) -> str:
        column, interval = m.group(1).rsplit(",", 1)
        secs = _seconds(interval)
        return f'floor(extract(epoch from {column.strip()})/{secs:g})*{secs:g} AS "time"'

    sql = re.sub(r"\$__timeGroupAlias\(([^)]*)\)", group, sql)
    assert "$" not in sql, f"a macro or variable the test does not know: {sql}"
    return sql


def test_dashboards_have_stable_uids_and_use_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "doai-postgres.yaml").read_text())
    ds = datasources["datasources"][0]
    assert (ds["uid"], ds["type"]) == ("doai-postgres", "postgres")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "doai.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/doai"
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert set(uids) == EXPECTED_UIDS and len(uids) == len(set(uids))
    for path in DASHBOARDS:
        ids = [p["id"] for p in load(path)["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
    for name, panel, target in panels():
        assert panel["datasource"] == target["datasource"] == {"type": "postgres", "uid": "doai-postgres"}, name
        assert target["format"] in ("table", "time_series"), name
        assert target["rawQuery"] is True and target["rawSql"].strip(), name


async def seed(database_url: str, now: datetime) -> None:
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        for k, workflow in enumerate(["device-smoke", "open-url"]):
            start = now - timedelta(hours=2 - k)
            rec = FleetRecording(str(uuid.uuid4()), nodes=3, devices=10, seed=31 + k, start=start)
            await seed_run(conn, rec.run_id, rec.pairs(), created_at=start, workflow_id=workflow)
            async with conn.transaction():
                await fold(conn, Batch(items=[Incoming(e, "s", None, msgspec.json.encode(e)) for e in rec.events]))
        # The fleet right now: node-1 and node-2 report, node-3 has gone quiet.
        fresh = []
        for node in ("node-1", "node-2"):
            fresh.append(NodeHeartbeat(event_id=new_id(), ts=now, node_id=node, slots=20, running=4, queued=2,
                                       vendor_connected=True, version="t"))
            fresh.append(DeviceInventoryEvent(
                event_id=new_id(), ts=now, node_id=node, vendor_available=True,
                devices=[DeviceInfo(serial=f"{node.upper()}-D{j:03d}", status="online" if j else "offline")
                         for j in range(8)]))
        async with conn.transaction():
            await fold(conn, Batch(items=[Incoming(e, "s", None, b"") for e in fresh],
                                   dead=[DeadLetter("doai.evt.node-1.task", 7, b"{not json", "malformed")]))
    finally:
        await conn.close()


@pytest.fixture
async def seeded(database_url: str) -> tuple[str, datetime]:
    now = datetime.now(UTC)
    await seed(database_url, now)
    return database_url, now


async def test_every_panel_query_runs_and_returns_rows_on_seeded_data(seeded: tuple[str, datetime]) -> None:
    database_url, now = seeded
    start, end = now - timedelta(hours=6), now + timedelta(minutes=1)
    interval_s = 30  # what Grafana picks for 6 h on a ~1000 px wide panel
    conn = await asyncpg.connect(database_url)
    failures = []
    try:
        for name, _, target in panels():
            sql = render(target["rawSql"], start, end, interval_s)
            try:
                rows = await conn.fetch(sql)
            except asyncpg.PostgresError as exc:
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if not rows:
                failures.append(f"{name}: no rows")
            elif target["format"] == "time_series":
                times = [r["time"] for r in rows]
                if times != sorted(times):
                    failures.append(f"{name}: time series not ordered by time")
    finally:
        await conn.close()
    assert not failures, "\n".join(failures)
    assert len(panels()) >= 20


async def test_panels_show_what_was_seeded(seeded: tuple[str, datetime]) -> None:
    database_url, now = seeded
    conn = await asyncpg.connect(database_url)
    try:
        nodes = await conn.fetchrow("SELECT count(*) FILTER (WHERE online) AS online, count(*) AS known"
                                    " FROM node_liveness")
        devices_online = await conn.fetchval("SELECT count(*) FROM device_liveness WHERE online")
        statuses = {r["status"] for r in await conn.fetch("SELECT status FROM runs")}
    finally:
        await conn.close()
    assert (nodes["online"], nodes["known"]) == (2, 3)
    assert devices_online == 2 * 7  # one device of each reporting node is listed offline
    assert statuses == {"completed"}
