"""Aggregator throughput: events/s folded (stream → PostgreSQL, acked) for a 5,000-device run.

Measured in the same run, on the same stream and the same rows:

* raw consume: a bare nats-py durable pull consumer that only fetches (batches
  of the same size) and acks each message — the ceiling, since the Python
  NATS client is the bottleneck of every NATS path (the reference of issue 12);
* raw consume, quick next_msg: the same with the one nats-py shortcut the
  aggregator's consumer takes (`runtime.pull_consumer.quick_next_msg`: a
  fetched message already queued is taken without a task and a timer of its
  own) — the stricter reference, since the aggregator no longer pays that cost;
* raw upsert: asyncpg `INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE`
  of the same events' rows (reduced per batch, prepared beforehand), one
  transaction per batch, without guards or idempotence bookkeeping;
* the aggregator: `services.aggregator.consumer.Aggregator` on the durable
  `aggregator` consumer into a fresh database (decode, claim event ids, reduce,
  guarded set-based upserts, derived run status, commit, ack).

Usage: .venv/bin/python bench/bench_fold.py [--devices 5000] [--loop asyncio|uvloop|both] [--repeat 3]
Starts its own nats-server and PostgreSQL (embedded) in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.auth_support import embedded_nats, options  # noqa: E402
from contracts.events import (  # noqa: E402
    ArtifactEvent,
    DeviceInfo,
    DeviceInventoryEvent,
    Event,
    NodeHeartbeat,
    StepEvent,
    TaskEvent,
    event_kind,
)
from contracts.subjects import AGGREGATOR_DURABLE, EVT_STREAM, EVT_SUBJECTS, evt_subject  # noqa: E402
from doai.embedded import EmbeddedNats, EmbeddedPostgres  # noqa: E402
from runtime import db, jetstream  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from runtime.pull_consumer import quick_next_msg  # noqa: E402
from services.aggregator.consumer import Aggregator  # noqa: E402

STEPS = [("model", "adb_shell"), ("android", "adb_shell"), ("battery", "adb_shell"), ("battery-level", "assert"),
         ("home", "keyevent"), ("open", "open_url"), ("settle", "wait"), ("shot", "screenshot"),
         ("upload", "upload"), ("report", "report")]
BATCH = 500


def run_events(run_id: str, devices: int, per_node: int = 100) -> tuple[list[Event], list[tuple[str, str]]]:
    """What the nodes publish for one device-smoke run over `devices` phones (100 per node)."""
    t0 = datetime.now(UTC) - timedelta(hours=1)
    events: list[Event] = []
    pairs = []
    for d in range(devices):
        node, serial = f"node-{d // per_node:03d}", f"PHONE{d:05d}"
        pairs.append((node, serial))
        base = {"node_id": node, "run_id": run_id, "device_serial": serial}
        seq, t = 0, t0 + timedelta(milliseconds=d)

        def nxt() -> int:
            nonlocal seq
            seq += 1
            return seq

        events.append(TaskEvent(event_id=str(uuid.uuid4()), ts=t, seq=nxt(), state="running", **base))
        for i, (step, action) in enumerate(STEPS):
            t += timedelta(milliseconds=300)
            events.append(StepEvent(event_id=str(uuid.uuid4()), ts=t, seq=nxt(), step_id=step, index=i,
                                    action=action, state="started", **base))  # type: ignore[arg-type]
            if action == "screenshot":
                key = f"vid/{node}/{serial}/{run_id}/{int(t.timestamp())}.png"
                events.append(ArtifactEvent(event_id=str(uuid.uuid4()), ts=t, seq=nxt(), step_id=step, store="local",
                                            key=key, uri=f"file:///var/artifacts/{key}", bytes=48_213,
                                            sha256="ab" * 32, **base))  # type: ignore[arg-type]
            events.append(StepEvent(event_id=str(uuid.uuid4()), ts=t, seq=nxt(), step_id=step, index=i,
                                    action=action, state="ok", output="ok", **base))  # type: ignore[arg-type]
        events.append(TaskEvent(event_id=str(uuid.uuid4()), ts=t, seq=nxt(), state="succeeded", **base))
    nodes = sorted({n for n, _ in pairs})
    for tick in range(6):  # inventories and heartbeats every 10 s of a ~1 min run
        at = t0 + timedelta(seconds=10 * tick)
        for node in nodes:
            serials = [s for n, s in pairs if n == node]
            events.append(DeviceInventoryEvent(event_id=str(uuid.uuid4()), ts=at, node_id=node, vendor_available=True,
                                               devices=[DeviceInfo(serial=s, status="online") for s in serials]))
            events.append(NodeHeartbeat(event_id=str(uuid.uuid4()), ts=at, node_id=node, slots=20, running=20,
                                        queued=max(0, len(serials) - 20 * (tick + 1)), vendor_connected=True,
                                        version="bench"))
    # Interleave devices as a stream of many nodes would (deterministically).
    events.sort(key=lambda e: (e.ts, e.event_id))
    return events, pairs


async def publish_all(server: EmbeddedNats, events: list[Event]) -> float:
    nc = await nats.connect(server.url, **options(server))
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    started = time.perf_counter()
    for i in range(0, len(events), 512):
        await asyncio.gather(*(
            js.publish(evt_subject(e.node_id, event_kind(e), getattr(e, "run_id", None)), msgspec.json.encode(e),
                       headers={"Nats-Msg-Id": e.event_id}) for e in events[i:i + 512]))
    elapsed = time.perf_counter() - started
    info = await js.stream_info(EVT_STREAM)
    assert info.state.messages == len(events), info.state.messages
    await nc.close()
    return elapsed


async def raw_consume(server: EmbeddedNats, n: int, durable: str, quick: bool = False) -> float:
    nc = await nats.connect(server.url, **options(server))
    js = nc.jetstream()
    await js.add_consumer(EVT_STREAM, ConsumerConfig(
        durable_name=durable, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
        max_ack_pending=20_000, filter_subject=EVT_SUBJECTS))
    sub = await js.pull_subscribe_bind(durable=durable, stream=EVT_STREAM)
    if quick:
        assert quick_next_msg(sub)
    got = 0
    started = time.perf_counter()
    while got < n:
        try:
            msgs = await sub.fetch(BATCH, timeout=1.0)
        except TimeoutError:
            continue
        for m in msgs:
            await m.ack()
        got += len(msgs)
    await nc.flush()
    elapsed = time.perf_counter() - started
    await js.delete_consumer(EVT_STREAM, durable)
    await nc.close()
    return n / elapsed


_RAW = {
    "run_tasks": ("INSERT INTO run_tasks (run_id, node_id, device_serial, state, attempt, seq, started_at, finished_at)"
                  " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::bigint[],"
                  " $7::timestamptz[], $8::timestamptz[]) ON CONFLICT (run_id, node_id, device_serial) DO UPDATE SET"
                  " state = EXCLUDED.state, attempt = EXCLUDED.attempt, seq = EXCLUDED.seq,"
                  " started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at"),
    "step_results": ("INSERT INTO step_results (run_id, node_id, device_serial, step_id, idx, action, state, seq,"
                     " started_at, finished_at, output) SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[],"
                     " $4::text[], $5::int[], $6::text[], $7::text[], $8::bigint[], $9::timestamptz[],"
                     " $10::timestamptz[], $11::text[]) ON CONFLICT (run_id, node_id, device_serial, step_id)"
                     " DO UPDATE SET state = EXCLUDED.state, seq = EXCLUDED.seq, finished_at = EXCLUDED.finished_at,"
                     " output = EXCLUDED.output"),
    "artifacts": ("INSERT INTO artifacts (run_id, node_id, device_serial, step_id, store, key, uri, bytes, sha256,"
                  " content_type, created_at) SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],"
                  " $5::text[], $6::text[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::timestamptz[])"
                  " ON CONFLICT (store, key) DO NOTHING"),
    "devices": ("INSERT INTO devices (node_id, serial, status, model, name, last_seen) SELECT * FROM unnest("
                "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])"
                " ON CONFLICT (node_id, serial) DO UPDATE SET status = EXCLUDED.status,"
                " last_seen = EXCLUDED.last_seen"),
    "nodes": ("INSERT INTO nodes (node_id, slots, running, queued, vendor_connected, version, last_seen)"
              " SELECT * FROM unnest($1::text[], $2::int[], $3::int[], $4::int[], $5::bool[], $6::text[],"
              " $7::timestamptz[]) ON CONFLICT (node_id) DO UPDATE SET running = EXCLUDED.running,"
              " queued = EXCLUDED.queued, last_seen = EXCLUDED.last_seen"),
}


def raw_rows(batch: list[Event]) -> dict[str, list[list[Any]]]:
    """One row per key per table (last event wins: the raw path does no ordering work)."""
    tables: dict[str, dict[Any, tuple[Any, ...]]] = {k: {} for k in _RAW}
    for e in batch:
        if isinstance(e, TaskEvent):
            tables["run_tasks"][(e.run_id, e.node_id, e.device_serial)] = (
                uuid.UUID(e.run_id), e.node_id, e.device_serial, e.state, e.attempt, e.seq, e.ts, e.ts)
        elif isinstance(e, StepEvent):
            tables["step_results"][(e.run_id, e.node_id, e.device_serial, e.step_id)] = (
                uuid.UUID(e.run_id), e.node_id, e.device_serial, e.step_id, e.index, e.action, e.state, e.seq, e.ts,
                e.ts, e.output)
        elif isinstance(e, ArtifactEvent):
            tables["artifacts"][(e.store, e.key)] = (
                uuid.UUID(e.run_id), e.node_id, e.device_serial, e.step_id, e.store, e.key, e.uri, e.bytes, e.sha256,
                e.content_type, e.ts)
        elif isinstance(e, DeviceInventoryEvent):
            for d in e.devices:
                tables["devices"][(e.node_id, d.serial)] = (e.node_id, d.serial, d.status, d.model, d.name, e.ts)
        elif isinstance(e, NodeHeartbeat):
            tables["nodes"][e.node_id] = (e.node_id, e.slots, e.running, e.queued, e.vendor_connected, e.version,
                                          e.ts)
    return {name: [list(col) for col in zip(*rows.values(), strict=True)] for name, rows in tables.items() if rows}


async def fresh_db(admin_uri: str, run_id: str, pairs: list[tuple[str, str]]) -> str:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_uri)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    from urllib.parse import urlsplit, urlunsplit

    url = urlunsplit(urlsplit(admin_uri)._replace(path=f"/{name}"))
    pool = await db.create_pool(url, max_size=2)
    await db.migrate(pool)
    await pool.execute("INSERT INTO workflows (workflow_id, version, recipe, digest) VALUES ('device-smoke', 1, '{}',"
                       " 'bench')")
    await pool.execute("INSERT INTO runs (run_id, workflow_id, workflow_version, params, step_timeouts_ms, status)"
                       " VALUES ($1, 'device-smoke', 1, '{}', '{}', 'dispatched')", uuid.UUID(run_id))
    await pool.executemany("INSERT INTO run_tasks (run_id, node_id, device_serial) VALUES ($1, $2, $3)",
                           [(uuid.UUID(run_id), n, s) for n, s in pairs])
    await pool.close()
    return url


async def raw_upsert(url: str, events: list[Event]) -> float:
    prepared = [raw_rows(events[i:i + BATCH]) for i in range(0, len(events), BATCH)]
    conn = await asyncpg.connect(url)
    started = time.perf_counter()
    for tables in prepared:
        async with conn.transaction():
            for name, cols in tables.items():
                await conn.execute(_RAW[name], *cols)
    elapsed = time.perf_counter() - started
    await conn.close()
    return len(events) / elapsed


async def aggregator_fold(server: EmbeddedNats, url: str, n: int) -> float:
    admin = await nats.connect(server.url, **options(server))
    ajs = admin.jetstream()
    try:
        await ajs.delete_consumer(EVT_STREAM, AGGREGATOR_DURABLE)
    except Exception:  # noqa: S110 - not there yet
        pass
    await jetstream.ensure_aggregator_consumer(ajs)
    await admin.close()
    # The aggregator folds with its own least-privilege identity, as in production.
    nc = await nats.connect(server.url, **options(server, "aggregator"))
    js = nc.jetstream()
    pool = await db.create_pool(url, max_size=4)
    agg = Aggregator(pool, js, batch_size=BATCH)
    stop = asyncio.Event()
    started = time.perf_counter()
    worker = asyncio.create_task(agg.run(stop))
    while agg.folded + agg.skipped + agg.dead < n:  # noqa: ASYNC110 - polling the worker's counters
        await asyncio.sleep(0.01)
    await nc.flush()  # the last acks are on the wire
    elapsed = time.perf_counter() - started
    stop.set()
    await worker
    # The server has the acks (flush), but JetStream applies them to the consumer a moment later: poll.
    deadline = time.monotonic() + 10.0
    info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
    while info.num_ack_pending and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        info = await js.consumer_info(EVT_STREAM, AGGREGATOR_DURABLE)
    status = await pool.fetchval("SELECT status FROM runs")
    await pool.close()
    await nc.close()
    assert agg.folded == n and agg.dead == 0, (agg.folded, agg.dead)
    assert info.num_ack_pending == 0 and info.num_pending == 0, info
    assert status == "completed", status
    return n / elapsed


async def one_round(server: EmbeddedNats, pg_uri: str, events: list[Event], run_id: str, pairs: list[tuple[str, str]],
                    tag: str) -> dict[str, float]:
    n = len(events)
    c0 = time.process_time()
    consume = await raw_consume(server, n, f"bench-raw-{tag}")
    c1 = time.process_time()
    quick = await raw_consume(server, n, f"bench-quick-{tag}", quick=True)
    c2 = time.process_time()
    upsert = await raw_upsert(await fresh_db(pg_uri, run_id, pairs), events)
    url = await fresh_db(pg_uri, run_id, pairs)
    c3 = time.process_time()
    folded = await aggregator_fold(server, url, n)
    c4 = time.process_time()
    # This process's CPU per event (nats-server and PostgreSQL are other processes): steadier than
    # events/s on a loaded machine.
    return {"raw consume": consume, "raw consume quick": quick, "raw upsert": upsert, "aggregator": folded,
            "cpu raw": (c1 - c0) / n * 1e6, "cpu quick": (c2 - c1) / n * 1e6, "cpu aggregator": (c4 - c3) / n * 1e6}


def run_loop(loop: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=5000)
    p.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    configure_logging(level="warning")
    out = sys.stdout.write
    with tempfile.TemporaryDirectory(prefix="doai-bench-fold-") as tmp:
        Path(tmp).chmod(0o755)
        nats_server = embedded_nats(Path(tmp) / "nats")
        nats_server.start()
        pg = EmbeddedPostgres(Path(tmp) / "pg")
        pg_uri = pg.start()
        try:
            run_id = str(uuid.uuid4())
            events, pairs = run_events(run_id, args.devices)
            size = sum(len(msgspec.json.encode(e)) for e in events) / len(events)
            pub_s = asyncio.run(publish_all(nats_server, events))
            out(f"{len(events)} events for {args.devices} devices ({size:.0f} B average), published in {pub_s:.1f} s\n")
            loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
            for loop in loops:
                rounds = []
                for r in range(args.repeat):
                    def round_main(r: int = r, loop: str = loop) -> Coroutine[Any, Any, dict[str, float]]:
                        return one_round(nats_server, pg_uri, events, run_id, pairs, f"{loop}-{r}")

                    rounds.append(run_loop(loop, round_main))
                    figures = ", ".join(f"{k} {v:,.0f}/s" for k, v in rounds[-1].items() if not k.startswith("cpu"))
                    figures += "; client CPU per event: " + ", ".join(
                        f"{k[4:]} {v:.1f} µs" for k, v in rounds[-1].items() if k.startswith("cpu"))
                    out(f"  [{loop}] round {r + 1}: {figures}\n")
                med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
                out(f"{loop}: median of {args.repeat}: raw consume {med['raw consume']:,.0f} events/s (quick next_msg "
                    f"{med['raw consume quick']:,.0f}), raw upsert {med['raw upsert']:,.0f} events/s, aggregator "
                    f"{med['aggregator']:,.0f} events/s = {med['aggregator'] / med['raw consume']:.0%} of raw consume"
                    f" ({med['aggregator'] / med['raw consume quick']:.0%} of raw consume with quick next_msg)\n")
        finally:
            nats_server.stop()
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
