"""Run creation: `POST /v1/runs` for 100 devices, throughput and latency, against the raw limits.

Usage: .venv/bin/python bench/bench_runs.py [--runs 300] [--nodes 2 --devices 50] [--concurrency 8]

Embedded PostgreSQL and nats-server start in a temporary folder; the backend
runs in-process (uvicorn, port 0) with its outbox relay; the fleet is written
into the `devices` table (no node agents: the benchmark is the backend). The
HTTP client shares the process and the event loop, as a second core is taken
by PostgreSQL.

Figures (each from the same run):

* `POST /v1/runs`, one request at a time: p50 / p99 latency and runs/s;
* the same with `--concurrency` clients: runs/s, p50 / p99;
* created → broadcast: until the relay has published every run's outbox rows;
* raw reference 1: the run's bare INSERT transaction with asyncpg (the same
  runs row, run_tasks rows via COPY and outbox rows with the same payloads),
  one at a time, p50 / p99 and transactions/s;
* raw reference 2: bare JetStream publishes with `Nats-Msg-Id` of the same
  payloads, awaited one at a time and in gathered windows (what the relay does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import nats  # noqa: E402

from bench.auth_support import embedded_nats, options  # noqa: E402
from doai.embedded import EmbeddedPostgres  # noqa: E402
from runtime import jetstream  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from runtime.signing import generate_seed  # noqa: E402
from services.backend.main import run_backend  # noqa: E402
from services.backend.settings import BackendSettings  # noqa: E402
from tests.backend_support import seed_fleet  # noqa: E402

TOKEN = "bench-token-0123456789abcdef0123456789"
SECRET = "bench-node-secret-0123456789abcdef0123456789"
PARAMS = {"url": "https://example.org/bench", "youtubeVideoId": "dQw4w9WgXcQ"}


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, latencies_s: list[float], elapsed_s: float) -> str:
    ms = [x * 1000 for x in latencies_s]
    return (f"{name:<48} {len(ms) / elapsed_s:8.1f}/s   p50 {pct(ms, 0.5):6.2f} ms   p99 {pct(ms, 0.99):6.2f} ms")


async def timed(n: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> tuple[list[float], float]:
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


async def bench(args: argparse.Namespace, home: Path) -> None:
    pg = EmbeddedPostgres(home / "pg")
    nats_server = embedded_nats(home / "nats")
    database_url = await asyncio.to_thread(pg.start)
    await asyncio.to_thread(nats_server.start)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    settings = BackendSettings(database_url, nats_server.url, [TOKEN], port=0, node_secret=SECRET,
                               nats_auth_dir=nats_server.trust.dir,
                               command_signing_seed=generate_seed())
    backend = asyncio.create_task(run_backend(settings, stop, on_ready=ready.set_result))
    try:
        url = await asyncio.wait_for(ready, 60)
        fleet = [(f"node-{n}", f"BENCH{n}X{d:04d}") for n in range(1, args.nodes + 1) for d in range(args.devices)]
        # Devices and their nodes' heartbeats, as the aggregator writes them (a device is online on a live node).
        by_node: dict[str, list[str]] = {}
        for node, serial in fleet:
            by_node.setdefault(node, []).append(serial)
        await seed_fleet(database_url, by_node)
        conn = await asyncpg.connect(database_url)
        targets = {"devices": [{"node_id": n, "serial": s} for n, s in fleet]}
        body = {"workflow_id": "device-smoke", "params": PARAMS, "targets": targets}
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"},
                                     timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            r = await client.post("/v1/workflows", content=(ROOT / "recipes" / "device-smoke.json").read_bytes())
            assert r.status_code == 201, r.text

            async def create(_: int) -> None:
                r = await client.post("/v1/runs", json=body)
                assert r.status_code == 201 and r.json()["targets"] == len(fleet), r.text

            await timed(20, 1, create)  # warm-up
            out(f"fleet: {args.nodes} node(s) x {args.devices} devices = {len(fleet)} targets per run; "
                f"{args.runs} runs per figure")
            lat, el = await timed(args.runs, 1, create)
            out(summary("POST /v1/runs, 1 client", lat, el))
            lat, el = await timed(args.runs, args.concurrency, create)
            out(summary(f"POST /v1/runs, {args.concurrency} clients", lat, el))

            started = time.perf_counter()
            await asyncio.gather(*(create(i) for i in range(args.runs)))
            while True:  # poll the outbox until the relay has sent everything
                if not await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL"):
                    break
                await asyncio.sleep(0.01)
            el = time.perf_counter() - started
            out(f"{'created → broadcast (all at once, relay drained)':<48} {args.runs / el:8.1f}/s   "
                f"{args.runs} runs in {el:.2f} s")

        # Raw reference 1: the same INSERT transaction, bare asyncpg.
        sample = await conn.fetch("SELECT node_id, subject, payload FROM outbox ORDER BY id LIMIT $1", args.nodes)
        by_node = {n: [s for node, s in fleet if node == n] for n, _ in fleet}

        async def insert(_: int) -> None:
            run_id = uuid.uuid4()
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms, status)"
                    " VALUES ($1, 'device-smoke', 1, '{}'::jsonb, '{}'::jsonb, 'pending')", run_id)
                await conn.copy_records_to_table("run_tasks", columns=["run_id", "node_id", "device_serial"],
                                                 records=[(run_id, n, s) for n in by_node for s in by_node[n]])
                await conn.executemany(
                    "INSERT INTO outbox (run_id, node_id, subject, msg_id, payload, sent_at)"
                    " VALUES ($1, $2, $3, $4, $5, now())",
                    [(run_id, r["node_id"], r["subject"], f"raw-{run_id}-{r['node_id']}", r["payload"])
                     for r in sample])

        lat, el = await timed(args.runs, 1, insert)
        out(summary("raw: the INSERT transaction alone (asyncpg)", lat, el))
        await conn.close()

        # Raw reference 2: bare JetStream publishes of the same payloads with Nats-Msg-Id.
        nc = await nats.connect(nats_server.url, **options(nats_server))
        js = nc.jetstream()
        await jetstream.ensure_streams(js)
        payload = sample[0]["payload"]

        async def publish(i: int) -> None:
            await js.publish("doai.cmd.raw", payload, headers={"Nats-Msg-Id": f"raw-{uuid.uuid4()}"})

        n_pub = args.runs * 5
        lat, el = await timed(n_pub, 1, publish)
        out(summary(f"raw: JetStream publish {len(payload)} B, awaited singly", lat, el))
        started = time.perf_counter()
        for _ in range(n_pub // 100):
            await asyncio.gather(*(publish(0) for _ in range(100)))
        el = time.perf_counter() - started
        out(f"{'raw: JetStream publish, gathered windows of 100':<48} {n_pub / el:8.1f}/s")
        await nc.close()
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(backend, 30)
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(pg.stop)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--devices", type=int, default=50, help="devices per node")
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    configure_logging(level="warning")
    with tempfile.TemporaryDirectory(prefix="doai-bench-runs-") as home:
        asyncio.run(bench(args, Path(home)))


if __name__ == "__main__":
    main()
