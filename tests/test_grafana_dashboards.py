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
from decimal import Decimal
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
EXPECTED_UIDS = {"doai-fleet", "doai-runs", "doai-run", "doai-failures", "doai-artifacts"}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


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


DS = {"type": "postgres", "uid": "doai-postgres"}
PANEL_TYPES = {"stat", "gauge", "bargauge", "piechart", "timeseries", "table", "barchart"}
# Panels that reduce a query to values: with `reduceOptions.values` false Grafana shows one value for all rows.
REDUCING = {"stat", "gauge", "bargauge", "piechart"}
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def field_units(panel: dict[str, Any]) -> dict[str, str]:
    """Unit per field name from the overrides (byName), with "*" for the panel's default."""
    units = {"*": panel["fieldConfig"]["defaults"]["unit"]}
    for o in panel["fieldConfig"]["overrides"]:
        for prop in o["properties"]:
            if prop["id"] == "unit":
                units[o["matcher"]["options"]] = prop["value"]
    return units


def test_dashboards_load_as_grafana_would() -> None:
    """What Grafana checks or silently breaks on at load: schema version, uids, datasource, panel ids, grid,
    field config shape, variables defined for every use, data links and image cells where promised."""
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "doai-postgres.yaml").read_text())
    ds = datasources["datasources"][0]
    assert (ds["uid"], ds["type"]) == ("doai-postgres", "postgres")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "doai.yaml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/doai"
    boards = {p.stem: load(p) for p in DASHBOARDS}
    uids = [b["uid"] for b in boards.values()]
    assert set(uids) == EXPECTED_UIDS and len(uids) == len(set(uids))
    for name, board in boards.items():
        assert board["schemaVersion"] == 39 and len(board["uid"]) <= 40 and board["title"], name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), f"{name}: panel ids"
        defined = variables(board)
        for v in defined.values():
            assert v["type"] == "query" and v["datasource"] == DS and v["query"] == v["definition"], v["name"]
        for panel in board["panels"]:
            where = f"{name}:{panel['title']}"
            assert panel["type"] in PANEL_TYPES, where
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) for k in "xywh") and grid["x"] + grid["w"] <= 24, where
            assert panel["datasource"] == DS, where
            config = panel["fieldConfig"]
            assert isinstance(config["defaults"].get("unit"), str) and config["defaults"]["unit"], f"{where}: unit"
            assert isinstance(config["overrides"], list), where
            for o in config["overrides"]:
                assert o["matcher"]["id"] == "byName" and isinstance(o["matcher"]["options"], str), where
                assert o["properties"] and all(set(p) == {"id", "value"} for p in o["properties"]), where
            steps = config["defaults"].get("thresholds", {}).get("steps", [])
            if steps:
                assert steps[0]["value"] is None and all(s["value"] is not None for s in steps[1:]), where
            for target in panel["targets"]:
                assert target["datasource"] == DS and target["format"] in ("table", "time_series"), where
                assert target["rawQuery"] is True and target["rawSql"].strip(), where
                used = {n for n in VARIABLE.findall(target["rawSql"]) if not n.startswith("__")}
                assert used <= set(defined), f"{where}: undefined variables {used - set(defined)}"
                selects_run_id = re.search(r"SELECT[^;]*\brun_id\b[^;]*FROM", target["rawSql"].split(" WHERE ")[0])
                if panel["type"] == "table" and selects_run_id and name != "run":
                    links = [p["value"] for o in config["overrides"] if o["matcher"]["options"] == "run_id"
                             for p in o["properties"] if p["id"] == "links"]
                    assert links and links[0][0]["url"].startswith("/d/doai-run/"), f"{where}: run id without link"
    # Variables: $node and $workflow wherever nodes or workflows are shown; $run on the run dashboard.
    assert set(variables(boards["fleet"])) == {"node"}
    for name in ("runs", "failures", "artifacts"):
        assert set(variables(boards[name])) == {"workflow", "node"}, name
    assert set(variables(boards["run"])) == {"run"} and not variables(boards["run"])["run"]["includeAll"]
    # Screenshots: image cells from the API's signed links.
    for name, title in (("run", "Screenshots"), ("artifacts", "Recent screenshots")):
        [panel] = [p for p in boards[name]["panels"] if p["title"] == title]
        assert "artifact_url(" in panel["targets"][0]["rawSql"]
        [image] = [o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "image"]
        assert {"id": "custom.cellOptions", "value": {"type": "image"}} in image["properties"]
    # Thresholds where an operator must look.
    for name, title in (("fleet", "Nodes offline"), ("runs", "Task failure rate"), ("runs", "Task success rate")):
        [panel] = [p for p in boards[name]["panels"] if p["title"] == title]
        assert "red" in {s["color"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]}, title


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
        await conn.execute("INSERT INTO fleet_settings (name, value) VALUES"
                           " ('api_public_url', 'http://127.0.0.1:8080'), ('artifact_url_key', 'grafana-test-key')"
                           " ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value")
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


def quoted(values: list[str]) -> str:
    return ",".join("'" + v.replace("'", "''") + "'" for v in values)


async def variable_values(conn: asyncpg.Connection, dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """What Grafana does first: run each variable's query; its values are what `All` stands for."""
    return {name: [str(r[0]) for r in await conn.fetch(v["query"])] for name, v in variables(dashboard).items()}


def substitute(sql: str, chosen: dict[str, list[str]], defined: dict[str, dict[str, Any]]) -> str:
    """Grafana's PostgreSQL interpolation: a multi-value (or All) variable's values single-quoted and joined with
    commas; a single-value variable's value as it is (the SQL quotes it)."""
    for name in sorted(chosen, key=len, reverse=True):
        v = defined[name]
        text = quoted(chosen[name]) if v["multi"] or v["includeAll"] else chosen[name][0]
        sql = sql.replace(f"${{{name}}}", text).replace(f"${name}", text)
    return sql


async def run_panels(conn: asyncpg.Connection, start: datetime, end: datetime,
                     choose: Any) -> tuple[list[str], list[tuple[str, dict[str, Any], list[asyncpg.Record]]]]:
    failures: list[str] = []
    results = []
    for path in DASHBOARDS:
        board = load(path)
        chosen = choose(path.stem, await variable_values(conn, board))
        for panel in board["panels"]:
            name = f"{path.stem}:{panel['title']}"
            for target in panel["targets"]:
                sql = render(substitute(target["rawSql"], chosen, variables(board)), start, end, 30)
                try:
                    rows = await conn.fetch(sql)
                except asyncpg.PostgresError as exc:
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
                results.append((name, panel, rows))
    return failures, results


def everything(board: str, values: dict[str, list[str]]) -> dict[str, list[str]]:
    """`All` for multi-value variables; the newest run for $run."""
    return {name: vals[:1] if name == "run" else vals for name, vals in values.items()}


async def test_every_panel_query_runs_with_its_variables_and_returns_rows(seeded: tuple[str, datetime]) -> None:
    database_url, now = seeded
    start, end = now - timedelta(hours=6), now + timedelta(minutes=1)
    conn = await asyncpg.connect(database_url)
    try:
        # Two run statuses, so a panel that shows one row per status has more than one row to show.
        await conn.execute("UPDATE runs SET status = 'cancelled'"
                           " WHERE run_id = (SELECT run_id FROM runs ORDER BY created_at LIMIT 1)")
        failures, results = await run_panels(conn, start, end, everything)
        for name, panel, rows in results:
            target = panel["targets"][0]
            if not rows:
                failures.append(f"{name}: no rows")
                continue
            if target["format"] == "time_series":
                times = [r["time"] for r in rows]
                if times != sorted(times):
                    failures.append(f"{name}: time series not ordered by time")
            # Units: a fraction is shown as percent only where the values are fractions (never on a count).
            units = field_units(panel)
            for column in rows[0].keys():
                unit = units.get(column, units["*"])
                values = [r[column] for r in rows
                          if isinstance(r[column], int | float | Decimal) and not isinstance(r[column], bool)]
                if unit == "percentunit" and any(not 0 <= float(v) <= 1 for v in values):
                    failures.append(f"{name}: {column} is not a fraction but has unit percentunit")
            if panel["type"] in REDUCING and len(rows) > 1 and not panel["options"]["reduceOptions"]["values"]:
                failures.append(f"{name}: {len(rows)} rows reduced to one value (reduceOptions.values)")
            if "image" in rows[0].keys() and any(r["image"] is None for r in rows):
                failures.append(f"{name}: an image without a link")
        # One node and one workflow chosen: the queries still run and keep to them.
        def one(board: str, values: dict[str, list[str]]) -> dict[str, list[str]]:
            picks = {"node": ["node-1"], "workflow": ["device-smoke"], "run": values.get("run", [])[:1]}
            return {name: picks[name] for name in values}

        narrowed_failures, narrowed = await run_panels(conn, start, end, one)
        failures += narrowed_failures
        for name, _, rows in narrowed:
            for r in rows:
                if "node_id" in r.keys() and not name.startswith("run:") and r["node_id"] != "node-1":
                    failures.append(f"{name}: node {r['node_id']} shown with $node = node-1")
                if "workflow_id" in r.keys() and r["workflow_id"] != "device-smoke":
                    failures.append(f"{name}: workflow {r['workflow_id']} shown with $workflow = device-smoke")
    finally:
        await conn.close()
    assert not failures, "\n".join(failures)
    assert len(results) >= 30


async def test_rates_and_durations_leave_cancelled_tasks_out(seeded: tuple[str, datetime]) -> None:
    database_url, now = seeded
    start, end = now - timedelta(hours=12), now + timedelta(minutes=1)
    conn = await asyncpg.connect(database_url)
    try:
        # Three succeeded tasks become cancelled after 10 hours: they must move no rate and no percentile.
        await conn.execute(
            "UPDATE run_tasks SET state = 'cancelled', started_at = finished_at - interval '10 hours'"
            " WHERE (run_id, node_id, device_serial) IN (SELECT run_id, node_id, device_serial FROM run_tasks"
            " WHERE state = 'succeeded' ORDER BY node_id, device_serial LIMIT 3)")
        counts = {r["state"]: r["n"] for r in await conn.fetch("SELECT state, count(*) AS n FROM run_tasks GROUP BY 1")}
        finished = sum(n for s, n in counts.items() if s in ("succeeded", "failed", "timed_out", "skipped", "lost"))
        assert counts.get("cancelled", 0) >= 3
        _, results = await run_panels(conn, start, end, everything)
        by_name = {name: rows for name, _, rows in results}
        [success] = by_name["runs:Task success rate"]
        assert success["success rate"] == pytest.approx(counts["succeeded"] / finished)
        [failure] = by_name["runs:Task failure rate"]
        assert failure["failure rate"] == pytest.approx(1 - counts["succeeded"] / finished)
        for row in by_name["runs:Task duration per workflow (p50 / p95, cancelled left out)"]:
            assert row["max_s"] < 3600, row
        for row in by_name["runs:Task duration p50 / p95 over time (cancelled left out)"]:
            assert row["p95"] < 3600, row
    finally:
        await conn.close()


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
