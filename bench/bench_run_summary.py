"""A run's summary and its first task page at 5,000 devices, against the raw SQL in the same process.

Usage: .venv/bin/python bench/bench_run_summary.py [--nodes 50 --devices 100] [--steps 10] [--other-runs 4]
                                                   [--requests 200]

Embedded PostgreSQL and nats-server start in a temporary folder; the backend runs in-process (uvicorn,
port 0). One run over nodes x devices is created through the API, then its tasks and their steps are
written as the aggregator folds them (most succeeded, some failed or timed out at various steps, a few
cancelled), next to `--other-runs` runs of the same size (so the tables are not just this run).

Figures (each from the same run):

* `GET /v1/runs/{id}` (the summary): p50 / p99 latency over HTTP, and its size;
* `GET /v1/runs/{id}/tasks?limit=50` (the first page) and a page in the middle (by cursor);
* `GET /v1/runs/{id}/tasks/{node}/{serial}` (one task with its steps);
* raw reference: the summary's SQL statements with bare asyncpg on one connection, and the first page's
  SQL, so the API's own cost (HTTP, JSON, pool) is the difference;
* for scale: reading every task row and every step row of the run (what the summary used to inline).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from bench.auth_support import embedded_nats  # noqa: E402
from doai.embedded import EmbeddedPostgres  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from runtime.signing import generate_seed  # noqa: E402
from services.backend.main import run_backend  # noqa: E402
from services.backend.runs import (  # noqa: E402
    SUMMARY_FAILING_SQL,
    SUMMARY_PER_NODE_SQL,
    SUMMARY_TIMINGS_SQL,
    TASK_COLUMNS,
    TOP_FAILING_STEPS,
)
from services.backend.settings import BackendSettings  # noqa: E402
from tests.backend_support import seed_fleet  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123456789"
SECRET = "bench-node-secret-0123456789abcdef0123456789"
PARAMS = {"url": "https://example.org/bench", "youtubeVideoId": "dQw4w9WgXcQ"}
STEP_IDS = ["open", "wait", "tap", "type", "shell", "check", "shot", "upload", "home", "report"]


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    for _ in range(5):  # warm-up
        await call()
    latencies = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        latencies.append((time.perf_counter() - t0) * 1000)
    return latencies


def line(name: str, ms: list[float], extra: str = "") -> str:
    return f"{name:<58} p50 {pct(ms, 0.5):7.2f} ms   p99 {pct(ms, 0.99):7.2f} ms   {extra}"


def seed_rows(run_id: uuid.UUID, fleet: list[tuple[str, str]], steps: int, rng: random.Random
              ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """run_tasks and step_results rows of one finished run, as the fold leaves them."""
    tasks: list[tuple[object, ...]] = []
    step_rows: list[tuple[object, ...]] = []
    t0 = datetime.now(UTC) - timedelta(hours=1)
    for i, (node, serial) in enumerate(fleet):
        started = t0 + timedelta(seconds=i // 20 * 30 + rng.random())
        roll = rng.random()
        fail_at: int | None = None
        if roll < 0.90:
            state, error = "succeeded", None
        elif roll < 0.96:
            state, fail_at = "failed", rng.randrange(steps)
            error = f"{rng.choice(['assert_failed', 'vendor_error', 'device_offline'])}: step {fail_at} went wrong"
        elif roll < 0.99:
            state, fail_at, error = "timed_out", rng.randrange(steps), "step_timeout: no result within 90 s"
        else:
            state, error = "cancelled", "run cancelled"
        duration = timedelta(seconds=20 + rng.random() * 40)
        failed_step = STEP_IDS[fail_at % len(STEP_IDS)] + (str(fail_at) if fail_at >= len(STEP_IDS) else "") \
            if fail_at is not None else None
        tasks.append((run_id, node, serial, state, 1, 40, started, started + duration, error, failed_step))
        for k in range(steps):
            sid = STEP_IDS[k % len(STEP_IDS)] + (str(k) if k >= len(STEP_IDS) else "")
            s_state = "ok" if fail_at is None or k < fail_at else ("failed" if k == fail_at else "skipped")
            at = started + duration * (k / steps)
            step_rows.append((run_id, node, serial, sid, k, "adb_shell", s_state, k * 2 + 2, at,
                              at + duration / steps, "x" * 60 if s_state == "ok" else None,
                              error if k == fail_at else None))
    return tasks, step_rows


async def bench(args: argparse.Namespace, home: Path) -> None:
    pg = EmbeddedPostgres(home / "pg")
    nats_server = embedded_nats(home / "nats")
    database_url = await asyncio.to_thread(pg.start)
    await asyncio.to_thread(nats_server.start)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    settings = BackendSettings(database_url, nats_server.url, [TOKEN], port=0, node_secret=SECRET,
                               nats_auth_dir=nats_server.trust.dir, command_signing_seed=generate_seed())
    backend = asyncio.create_task(run_backend(settings, stop, on_ready=ready.set_result))
    rng = random.Random(7)
    try:
        url = await asyncio.wait_for(ready, 60)
        fleet = [(f"node-{n:02d}", f"BENCH{n}X{d:04d}") for n in range(1, args.nodes + 1) for d in range(args.devices)]
        # Devices and their nodes' heartbeats, as the aggregator writes them (a device is online on a live node).
        by_node: dict[str, list[str]] = {}
        for node, serial in fleet:
            by_node.setdefault(node, []).append(serial)
        await seed_fleet(database_url, by_node)
        conn = await asyncpg.connect(database_url)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60) as client:
            r = await client.post("/v1/workflows", content=(ROOT / "recipes" / "device-smoke.json").read_bytes())
            assert r.status_code == 201, r.text
            run_ids: list[uuid.UUID] = []
            seed_started = time.perf_counter()
            for _ in range(args.other_runs + 1):
                r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": PARAMS,
                                                        "targets": {"all_online": True}})
                assert r.status_code == 201 and r.json()["targets"] == len(fleet), r.text
                rid = uuid.UUID(r.json()["run_id"])
                run_ids.append(rid)
                tasks, step_rows = seed_rows(rid, fleet, args.steps, rng)
                async with conn.transaction():
                    await conn.execute("DELETE FROM run_tasks WHERE run_id = $1", rid)
                    await conn.copy_records_to_table(
                        "run_tasks", records=tasks,
                        columns=["run_id", "node_id", "device_serial", "state", "attempt", "seq", "started_at",
                                 "finished_at", "error", "failed_step"])
                    await conn.copy_records_to_table(
                        "step_results", records=step_rows,
                        columns=["run_id", "node_id", "device_serial", "step_id", "idx", "action", "state", "seq",
                                 "started_at", "finished_at", "output", "error"])
                    await conn.execute("UPDATE runs SET status = 'completed', finished_at = now() WHERE run_id = $1",
                                       rid)
            await conn.execute("ANALYZE")
            rid = run_ids[len(run_ids) // 2]
            out(f"seeded {len(run_ids)} runs x {len(fleet)} tasks x {args.steps} steps in "
                f"{time.perf_counter() - seed_started:.1f} s; measuring run {rid} ({args.requests} requests each)")

            summary = await client.get(f"/v1/runs/{rid}")
            assert summary.status_code == 200, summary.text
            body = summary.json()
            assert body["targets"] == len(fleet) and body["outcome"] == "failed", body["counts"]
            out(f"summary: {body['counts']}; {len(body['failing_steps'])} failing steps; "
                f"p50 {body['timings']['p50_task_ms']} ms, p95 {body['timings']['p95_task_ms']} ms")

            async def get(path: str, **params: str) -> httpx.Response:
                r = await client.get(path, params=params)
                assert r.status_code == 200, r.text
                return r

            ms = await timed(args.requests, lambda: get(f"/v1/runs/{rid}"))
            out(line("GET /v1/runs/{id} (summary)", ms, f"{len(summary.content):,} bytes"))
            first = await get(f"/v1/runs/{rid}/tasks", limit="50")
            ms = await timed(args.requests, lambda: get(f"/v1/runs/{rid}/tasks", limit="50"))
            out(line("GET /v1/runs/{id}/tasks?limit=50 (first page)", ms, f"{len(first.content):,} bytes"))
            middle = fleet[len(fleet) // 2]
            cursor = base64.urlsafe_b64encode(json.dumps(list(middle)).encode()).decode().rstrip("=")
            ms = await timed(args.requests, lambda: get(f"/v1/runs/{rid}/tasks", limit="50", cursor=cursor))
            out(line("GET /v1/runs/{id}/tasks?limit=50&cursor= (middle page)", ms))
            one = await get(f"/v1/runs/{rid}/tasks/{middle[0]}/{middle[1]}")
            ms = await timed(args.requests, lambda: get(f"/v1/runs/{rid}/tasks/{middle[0]}/{middle[1]}"))
            out(line("GET /v1/runs/{id}/tasks/{node}/{serial} (one task)", ms, f"{len(one.content):,} bytes"))

        # Raw references on one bare connection: the same statements the backend runs.
        async def raw_summary() -> None:
            await conn.fetchrow("SELECT * FROM runs WHERE run_id = $1", rid)
            await conn.fetch(SUMMARY_PER_NODE_SQL, rid)
            await conn.fetch(SUMMARY_FAILING_SQL, rid, TOP_FAILING_STEPS)
            await conn.fetchrow(SUMMARY_TIMINGS_SQL, rid)

        ms = await timed(args.requests, raw_summary)
        out(line("raw SQL: the summary's 4 statements (asyncpg)", ms))
        ms = await timed(args.requests, lambda: conn.fetch(
            f"SELECT {TASK_COLUMNS} FROM run_tasks t WHERE t.run_id = $1 ORDER BY t.node_id, t.device_serial"
            " LIMIT 51", rid))
        out(line("raw SQL: first page of 50 (asyncpg)", ms))
        n = max(5, args.requests // 20)
        ms = await timed(n, lambda: conn.fetch("SELECT * FROM run_tasks WHERE run_id = $1", rid))
        out(line("for scale: every task row of the run (asyncpg)", ms, f"({n} requests)"))
        ms = await timed(n, lambda: conn.fetch("SELECT * FROM step_results WHERE run_id = $1", rid))
        out(line("for scale: every step row of the run (asyncpg)", ms, f"({n} requests)"))
        await conn.close()
    finally:
        stop.set()
        await asyncio.wait_for(backend, 30)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(pg.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--other-runs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    configure_logging("error")
    with tempfile.TemporaryDirectory(prefix="doai-bench-summary-") as home:
        asyncio.run(bench(args, Path(home)))


if __name__ == "__main__":
    main()
