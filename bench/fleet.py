"""A 5,000-phone run on this machine: `doai up --workers` with slow simulated phones, measured from outside.

Usage: .venv/bin/python bench/fleet.py [--nodes 50 --devices 100 --slots 20 --workers 2]
                                       [--latency-ms 2000 --screen-latency-ms 3000]

Starts `doai up --workers W` (the command itself, as a subprocess, in a temporary DOAI_HOME with the
embedded nats-server and PostgreSQL) with simulated phones slow enough that device time, not this
machine's CPU, should set the pace; waits until every phone is online; creates one `device-smoke` run
over all of them through the REST API; and reports, from the same run:

* makespan (REST create -> the last task `succeeded`) against the device-time floor: one device's
  device-smoke requests sent straight to a simulator with the same latencies (no doai in between),
  times the waves per node (devices / slots);
* REST create -> a task's first `running`, p50 / p99, over the tasks that started without waiting for a
  slot (the first `slots` tasks of each node);
* event published (its JetStream timestamp) -> visible in PostgreSQL, p50 / p99: from below with the fold's
  `processed_events.processed_at` (its transaction's start), from above with a poller that reads new rows
  every 100 ms;
* peak events/s folded (per second of `processed_at`);
* CPU seconds and peak RSS per process during the run: `doai up` itself (backend + aggregator share it),
  the worker processes (nodes + their simulators share them), nats-server, PostgreSQL (every process of
  the cluster), and this benchmark (REST polls, the poller, psutil);
* checks: every task `succeeded` exactly once (PostgreSQL rows, attempt 1, one `running` and one
  `succeeded` event per device in the stream), every device-task event folded, no device running two
  tasks at once, no node above its slots at any instant (task intervals from the events).

Nothing is mocked: nodes enroll, commands are signed, events go through JetStream with auth.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import msgspec  # noqa: E402
import nats  # noqa: E402
import psutil  # noqa: E402

from bench.device_floor import floor_one_device  # noqa: E402
from contracts.events import Event, StepEvent, TaskEvent  # noqa: E402
from doai.api_client import RetryingTransport  # noqa: E402
from doai.up import DEMO_PARAMS, wait_for_devices  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from runtime.nats_auth import NatsTrust, inbox_prefix  # noqa: E402

PARTS = ("doai up (backend + aggregator)", "workers (nodes + simulators)", "nats-server", "PostgreSQL",
         "this benchmark")


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# -- per-part CPU and memory ----------------------------------------------------------------


def _pg_postmaster(home: Path) -> psutil.Process | None:
    try:
        return psutil.Process(int((home / "pg" / "postmaster.pid").read_text().split()[0]))
    except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
        return None


def _cpu(proc: psutil.Process, with_waited_children: bool = False) -> float:
    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    total = t.user + t.system
    if with_waited_children:
        total += t.children_user + t.children_system
    return float(total)


@dataclass
class PartSampler:
    """CPU seconds and peak RSS of each part, sampled every `interval_s`."""

    up: psutil.Process
    home: Path
    peak_rss: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    last_cpu: dict[str, float] = field(default_factory=dict)  # of living processes, by part and pid
    seen: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (part, last cpu seen)

    def groups(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {p: [] for p in PARTS}
        groups[PARTS[0]].append(self.up)
        groups[PARTS[4]].append(psutil.Process())
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in self.up.children():
                try:
                    cmd = " ".join(child.cmdline())
                except psutil.NoSuchProcess:
                    continue
                if "doai.fleet" in cmd:
                    groups[PARTS[1]].append(child)
                elif "nats-server" in cmd:
                    groups[PARTS[2]].append(child)
        pm = _pg_postmaster(self.home)
        if pm is not None:
            groups[PARTS[3]].append(pm)
            with contextlib.suppress(psutil.NoSuchProcess):
                groups[PARTS[3]] += pm.children(recursive=True)
        return groups

    def sample(self) -> None:
        for part, procs in self.groups().items():
            rss = 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                    # PostgreSQL backends come and go: the postmaster's waited-for children count as its own.
                    cpu = _cpu(proc, with_waited_children=proc.pid == getattr(_pg_postmaster(self.home), "pid", -1))
                except psutil.NoSuchProcess:
                    continue
                self.seen[proc.pid] = (part, cpu)
            self.peak_rss[part] = max(self.peak_rss[part], rss)

    def cpu(self) -> dict[str, float]:
        totals: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        for part, cpu in self.seen.values():
            totals[part] += cpu
        return totals


async def sample_parts(sampler: PartSampler, stop: asyncio.Event, interval_s: float = 1.0) -> None:
    while not stop.is_set():
        await asyncio.to_thread(sampler.sample)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
    await asyncio.to_thread(sampler.sample)


# -- event visibility ---------------------------------------------------------------------------


async def poll_visible(pool: asyncpg.Pool, seen: dict[str, float], stop: asyncio.Event, interval_s: float) -> None:
    """Record when each event id first shows in `processed_events` (wall clock), until `stop`."""
    cursor: datetime | None = None
    while not stop.is_set():
        rows = await pool.fetch(
            "SELECT event_id, processed_at FROM processed_events WHERE $1::timestamptz IS NULL OR processed_at >= $1",
            cursor)
        now = time.time()
        for row in rows:
            seen.setdefault(row["event_id"], now)
        if rows:
            newest = max(r["processed_at"] for r in rows)
            # Transactions commit out of order: keep reading 3 s behind the newest start seen.
            cursor = newest - _seconds(3.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


def _seconds(s: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=s)


async def read_stream(nats_url: str, auth_dir: Path, run_id: str) -> list[tuple[Event, float]]:
    """Every device-task event of the run in DOAI_EVT with its JetStream timestamp (epoch seconds)."""
    creds = auth_dir / "bench-admin.creds"
    if not creds.exists():
        from runtime.nats_creds import write_secret

        write_secret(creds, NatsTrust(auth_dir).new_user_creds("admin"))
    nc = await nats.connect(nats_url, user_credentials=str(creds), inbox_prefix=inbox_prefix("admin"))
    js = nc.jetstream()
    found: list[tuple[Event, float]] = []
    decoder = msgspec.json.Decoder(Event)
    info = await js.stream_info("DOAI_EVT")
    last = info.state.last_seq
    sub = await js.subscribe(f"doai.evt.*.*.{run_id}", ordered_consumer=True)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=5.0)
            except nats.errors.TimeoutError:
                break
            found.append((decoder.decode(msg.data), msg.metadata.timestamp.timestamp()))
            if msg.metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
        await nc.close()
    return found


# -- the run ------------------------------------------------------------------------------------


async def start_up(args: argparse.Namespace, home: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "doai.cli", "up", "--home", str(home), "--port", "0",
           "--workers", str(args.workers), "--nodes", str(args.nodes), "--devices", str(args.devices),
           "--slots", str(args.slots), "--sim-latency-ms", str(args.latency_ms),
           "--screen-latency-ms", str(args.screen_latency_ms)]
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN",
                                                             "DOAI_LOG_FILE"}}
    if args.profile:
        env["DOAI_WORKER_PROFILE_DIR"] = str(home)  # each worker writes worker-<k>.pstats there at its end
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: ASYNC220
                            text=True)
    assert proc.stdout is not None
    try:
        text = ""
        while "press Ctrl-C" not in text:
            line = await asyncio.to_thread(proc.stdout.readline)
            if not line:
                stderr = proc.stderr.read() if proc.stderr else ""
                raise SystemExit(f"doai up ended before it was up:\n{text}\n{stderr}")
            text += line
        found: dict[str, str] = {}
        for key, pattern in (("api", r"API (\S+)"), ("token", r"token: (\S+)\)"), ("nats", r"NATS (nats://\S+)"),
                             ("pg", r"PostgreSQL (postgresql://\S+)"), ("pids", r"pids ([0-9 ]+)\)")):
            match = re.search(pattern, text)
            if match is None:
                raise SystemExit(f"no {key} in doai up's output:\n{text}")
            found[key] = match.group(1)
        # The console line leaves the password out; it is in DOAI_HOME/keys/postgres.password.
        password = (home / "keys" / "postgres.password").read_text(encoding="utf-8").strip()
        found["pg"] = found["pg"].replace("postgresql://postgres@",
                                          f"postgresql://postgres:{quote(password, safe='')}@", 1)
    except BaseException:  # never leave a doai up (and its servers and workers) behind
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    return proc, found


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    floor_task = await floor_one_device(args.latency_ms, args.screen_latency_ms)
    waves = math.ceil(args.devices / args.slots)
    floor = floor_task * waves
    expected = args.nodes * args.devices
    home = Path(tempfile.mkdtemp(prefix="doai-fleet-"))
    t0 = time.monotonic()
    up, found = await start_up(args, home)
    result: dict[str, Any] = {"floor_task_s": floor_task, "waves": waves, "floor_s": floor, "home": str(home)}
    try:
        upp = psutil.Process(up.pid)
        sampler = PartSampler(upp, home)
        async with httpx.AsyncClient(base_url=found["api"], headers={"Authorization": f"Bearer {found['token']}"},
                                     timeout=60.0, transport=RetryingTransport()) as client:
            targets = [{"node_id": f"node-{i}", "serial": f"SIM{i}X{j:04d}"}
                       for i in range(1, args.nodes + 1) for j in range(1, args.devices + 1)]
            online = await wait_for_devices(client, targets, 600.0)
            result["startup_s"] = time.monotonic() - t0
            if online < expected:
                raise SystemExit(f"only {online} of {expected} devices came online")
            # A node lists its devices before it has read the commands waiting for it (it starts jobs only
            # after 1 s without one): let the last nodes finish that, so the run measures a running fleet.
            await asyncio.sleep(args.settle_s)
            pool = await asyncpg.create_pool(found["pg"], min_size=1, max_size=2)
            visible: dict[str, float] = {}
            stop = asyncio.Event()
            await asyncio.to_thread(sampler.sample)
            cpu_before = sampler.cpu()
            machine_before = psutil.cpu_times()
            watchers = [asyncio.create_task(poll_visible(pool, visible, stop, args.poll_s)),
                        asyncio.create_task(sample_parts(sampler, stop))]
            created_wall = time.time()
            created = time.monotonic()
            r = await client.post("/v1/runs", json={"workflow_id": "device-smoke", "params": DEMO_PARAMS,
                                                    "targets": {"devices": targets}},
                                  headers={"Idempotency-Key": f"bench-fleet-{created_wall}"})
            r.raise_for_status()
            run_id = r.json()["run_id"]
            result["post_s"] = time.monotonic() - created
            run: dict[str, Any] = {}
            while time.monotonic() - created < args.timeout:
                run = (await client.get(f"/v1/runs/{run_id}")).json()
                if run["status"] in ("completed", "cancelled"):
                    break
                await asyncio.sleep(0.5)
            result["completed_visible_s"] = time.monotonic() - created
            await asyncio.sleep(1.0)  # the poller sees the last folds
            stop.set()
            await asyncio.gather(*watchers)
            cpu_after = sampler.cpu()
            machine_after = psutil.cpu_times()
            idle = (machine_after.idle - machine_before.idle) + (
                getattr(machine_after, "iowait", 0.0) - getattr(machine_before, "iowait", 0.0))
            total = sum(machine_after) - sum(machine_before)
            result["machine_busy"] = 1.0 - idle / total if total > 0 else float("nan")
            result["run"] = run
            result["cpu"] = {p: cpu_after[p] - cpu_before.get(p, 0.0) for p in PARTS}
            result["rss"] = dict(sampler.peak_rss)
            rows = await pool.fetch("SELECT node_id, device_serial, state, attempt FROM run_tasks WHERE run_id = $1",
                                    run_id)
            processed = {r["event_id"]: r["processed_at"].timestamp()
                         for r in await pool.fetch("SELECT event_id, processed_at FROM processed_events")}
            await pool.close()
        events = await read_stream(found["nats"], home / "nats-auth", run_id)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = await asyncio.to_thread(up.wait, 120)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
        result["up_exit"] = code
        pids = [int(p) for p in found.get("pids", "").split()] if "found" in locals() else []
        result["workers_left"] = [p for p in pids if psutil.pid_exists(p)
                                  and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    result.update(analyse(args, created_wall, rows, events, processed, visible))
    result["wall_s"] = time.monotonic() - created
    return result


def analyse(args: argparse.Namespace, created_wall: float, rows: list[Any], events: list[tuple[Event, float]],
            processed: dict[str, float], visible: dict[str, float]) -> dict[str, Any]:
    r: dict[str, Any] = {}
    states = Counter(row["state"] for row in rows)
    r["rows"] = len(rows)
    r["states"] = dict(states)
    r["attempts_over_1"] = sum(1 for row in rows if row["attempt"] != 1)
    running: dict[tuple[str, str], list[float]] = defaultdict(list)
    final: dict[tuple[str, str], list[float]] = defaultdict(list)
    for ev, _ in events:
        if isinstance(ev, TaskEvent):
            key = (ev.node_id, ev.device_serial)
            if ev.state == "running":
                running[key].append(ev.ts.timestamp())
            elif ev.state in ("succeeded", "failed", "timed_out", "cancelled", "skipped", "lost", "interrupted"):
                final[key].append(ev.ts.timestamp())
    r["devices_running_once"] = sum(1 for v in running.values() if len(v) == 1)
    r["devices_final_once"] = sum(1 for v in final.values() if len(v) == 1)
    r["devices_more_than_once"] = sum(1 for v in running.values() if len(v) > 1) + sum(
        1 for v in final.values() if len(v) > 1)
    ends = [max(v) for v in final.values()]
    r["makespan_s"] = (max(ends) - created_wall) if ends else float("nan")
    # First wave: the first `slots` tasks of each node to start (no slot to wait for).
    per_node: dict[str, list[float]] = defaultdict(list)
    for (node, _), starts in running.items():
        per_node[node].append(min(starts))
    first = [s - created_wall for starts in per_node.values() for s in sorted(starts)[:args.slots]]
    r["to_running_p50_s"], r["to_running_p99_s"] = pct(first, 50), pct(first, 99)
    # Overlaps: per device (two tasks at once) and per node (above its slots), from the task intervals.
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    device_overlap = 0
    for key, starts in running.items():
        spans = sorted(zip(sorted(starts), sorted(final.get(key, [math.inf] * len(starts))), strict=False))
        device_overlap += sum(1 for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1])
        intervals[key[0]] += spans
    max_running = {}
    for node, spans in intervals.items():
        points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda p: (p[0], p[1]))
        level = peak = 0
        for _, d in points:
            level += d
            peak = max(peak, level)
        max_running[node] = peak
    r["device_overlaps"] = device_overlap
    # How long a device request took as the node saw it (step running -> its end), against the simulator's latency.
    step_start: dict[tuple[str, str, str], float] = {}
    step_took: dict[str, list[float]] = defaultdict(list)
    for ev, _ in events:
        if isinstance(ev, StepEvent):
            key3 = (ev.node_id, ev.device_serial, ev.step_id)
            if ev.state == "started":
                step_start[key3] = ev.ts.timestamp()
            elif key3 in step_start:
                step_took[ev.action].append(ev.ts.timestamp() - step_start[key3])
    r["step_took"] = {a: (pct(v, 50), pct(v, 99)) for a, v in step_took.items()}
    r["max_running_per_node"] = max(max_running.values()) if max_running else 0
    r["nodes_over_slots"] = sum(1 for v in max_running.values() if v > args.slots)
    # Event published (JetStream timestamp) -> visible in PostgreSQL.
    low, high, missing = [], [], 0
    for ev, published in events:
        folded = processed.get(ev.event_id)
        if folded is None:
            missing += 1
            continue
        low.append(folded - published)
        seen = visible.get(ev.event_id)
        if seen is not None:
            high.append(seen - published)
    r["events"] = len(events)
    r["events_not_folded"] = missing
    r["visible_low_p50_s"], r["visible_low_p99_s"] = pct(low, 50), pct(low, 99)
    r["visible_high_p50_s"], r["visible_high_p99_s"] = pct(high, 50), pct(high, 99)
    r["visible_high_n"] = len(high)
    per_second = Counter(int(t) for t in processed.values() if t >= created_wall)
    r["peak_events_per_s"] = max(per_second.values()) if per_second else 0
    span = (max(per_second) - min(per_second) + 1) if per_second else 1
    r["mean_events_per_s"] = sum(per_second.values()) / span
    return r


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    n = args.nodes * args.devices
    ok_tasks = r["states"].get("succeeded", 0) == n and r["rows"] == n and r["attempts_over_1"] == 0
    ok_once = r["devices_running_once"] == n and r["devices_final_once"] == n and r["devices_more_than_once"] == 0
    cores = psutil.cpu_count() or 1
    cpu_total = sum(r["cpu"].values())
    busy = cpu_total / (r["makespan_s"] * cores) if r["makespan_s"] > 0 else float("nan")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"fleet: {args.nodes} nodes x {args.devices} simulated phones = {n}, {args.slots} slots per node, "
        f"{args.workers} worker processes; {cores} cores, load average {load:.1f} at the end")
    out(f"  phones: {args.latency_ms:g} ms per device request, {args.screen_latency_ms:g} ms per screenshot: "
        f"one device-smoke task takes {r['floor_task_s']:.2f} s of device time (measured raw)")
    out(f"  start-up (doai up until every phone is online): {r['startup_s']:.1f} s")
    out(f"  makespan (REST create -> last task succeeded) {r['makespan_s']:7.2f} s")
    out(f"  device-time floor ({r['waves']} waves x {r['floor_task_s']:.2f} s)    {r['floor_s']:7.2f} s   "
        f"makespan / floor = {r['makespan_s'] / r['floor_s']:.3f} (target <= 1.10)")
    out(f"  run reads completed (API) after {r['completed_visible_s']:.2f} s; POST /v1/runs took {r['post_s']:.2f} s")
    out(f"  REST create -> task running (first wave, {args.slots} per node): p50 {r['to_running_p50_s']:.3f} s, "
        f"p99 {r['to_running_p99_s']:.3f} s")
    out(f"  event published -> visible in PostgreSQL ({r['events']} device-task events): "
        f"p50 {r['visible_low_p50_s']:.3f} s, p99 {r['visible_low_p99_s']:.3f} s (fold transaction start); "
        f"polled every {args.poll_s:g} s: p50 {r['visible_high_p50_s']:.3f} s, p99 {r['visible_high_p99_s']:.3f} s "
        f"(target p99 < 1 s)")
    out(f"  events folded: peak {r['peak_events_per_s']}/s, mean {r['mean_events_per_s']:.0f}/s over the run")
    machine = r["machine_busy"]
    out(f"  CPU during the run: doai's parts {cpu_total:.1f} s of {r['makespan_s'] * cores:.1f} core-seconds "
        f"({busy:.0%} of this machine); the whole machine was {machine:.0%} busy (other work shares it)"
        + ("  -> device time, not CPU, sets the pace" if machine < 0.8 else "  -> the CPU was saturated: "
           "CPU, not device time, set the pace"))
    took = r["step_took"]
    out("  a step as the node saw it (p50 / p99 s; the phone takes " + f"{args.latency_ms / 1000:g} s per request, "
        f"{args.screen_latency_ms / 1000:g} s per screenshot): "
        + ", ".join(f"{a} {v[0]:.2f} / {v[1]:.2f}" for a, v in sorted(took.items())))
    for part in PARTS:
        out(f"    {part:<32} CPU {r['cpu'][part]:7.1f} s   peak RSS {r['rss'][part] / 2**20:7.0f} MiB")
    out(f"  checks: {r['rows']} tasks, states {r['states']}, attempts > 1: {r['attempts_over_1']}  "
        f"[{'ok' if ok_tasks else 'FAIL'}]")
    out(f"          one running + one final event per device: {r['devices_running_once']}/{r['devices_final_once']} "
        f"of {n}, repeated: {r['devices_more_than_once']}  [{'ok' if ok_once else 'FAIL'}]")
    out(f"          events not folded: {r['events_not_folded']}  [{'ok' if r['events_not_folded'] == 0 else 'FAIL'}]")
    out(f"          device overlaps: {r['device_overlaps']}; most tasks running at once on a node: "
        f"{r['max_running_per_node']} (slots {args.slots}), nodes over slots: {r['nodes_over_slots']}  "
        f"[{'ok' if r['device_overlaps'] == 0 and r['nodes_over_slots'] == 0 else 'FAIL'}]")
    out(f"  doai up stopped with exit {r['up_exit']}; worker processes left: {r['workers_left'] or 'none'}")
    targets = [r["makespan_s"] <= 1.10 * r["floor_s"], r["visible_low_p99_s"] < 1.0, ok_tasks, ok_once,
               r["events_not_folded"] == 0]
    out(f"  targets met: {sum(targets)}/{len(targets)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--workers", type=int, default=psutil.cpu_count() or 2)
    parser.add_argument("--latency-ms", type=float, default=2000.0, help="per device request (default 2000)")
    parser.add_argument("--screen-latency-ms", type=float, default=3000.0, help="per screenshot (default 3000)")
    parser.add_argument("--poll-s", type=float, default=0.1, help="the visibility poller's interval")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--profile", action="store_true",
                        help="profile the workers (cProfile: slower) and print where their CPU went")
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="seconds between every phone online and the run (nodes finish their start-up)")
    args = parser.parse_args()
    configure_logging(level="warning")
    result = asyncio.run(bench(args))
    report(args, result)
    if args.profile:
        profile_split(Path(result["home"]))


def profile_split(home: Path) -> None:
    """The workers' CPU by part (simulator, node, NATS client, websockets, SQLite, logging), from cProfile."""
    import pstats

    files = sorted(home.glob("worker-*.pstats"))
    if not files:
        out("  (no worker profiles found)")
        return
    stats = pstats.Stats(*(str(f) for f in files))
    own: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, tottime, _, _) in raw.items():
        name = filename.replace("\\", "/")
        part = ("simulator" if "services/simulator" in name else "node agent" if "services/node" in name
                else "contracts/runtime" if "/contracts/" in name or "/runtime/" in name
                else "websockets" if "websockets" in name else "nats-py" if "/nats/" in name
                else "structlog/logging" if "structlog" in name or "/logging/" in name
                else "msgspec/json" if "msgspec" in name or "json" in name
                else "asyncio/selectors" if "asyncio" in name or "selectors" in name
                else "sqlite3" if "sqlite" in name else "builtins/C" if filename == "~" else "other")
        own[part] += tottime
    total = sum(own.values()) or 1.0
    out(f"  worker CPU by code (cProfile own time, {total:.1f} s in {len(files)} workers; profiling slows them):")
    for part, seconds in sorted(own.items(), key=lambda kv: -kv[1]):
        out(f"    {part:<20} {seconds:7.1f} s  {seconds / total:5.1%}")
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
