"""The node agent's scheduling under load: 100 phones, 20 slots, simulated step latency.

Usage: .venv/bin/python bench/bench_scheduler.py [--devices 100 --slots 20 --runs 3 --latency-ms 50]

A real node agent (in this process) runs `--runs` broadcasts over every
device of a vendor simulator (a separate process, so its CPU is not counted)
with a real nats-server. Figures:

* slot utilisation: busy slot-seconds / (slots x the time from the first
  start to the last finish), while work was queued the whole time;
* dispatch gap: a slot frees (a task's terminal event) -> the next task on it
  starts (`running` event), p50 / p99;
* agent CPU ms per workflow: this process's CPU time over the run / workflows;
* floor (same run): workflows x one workflow's time measured alone / slots;
* RSS with 10,000 queued jobs: a fresh agent's process RSS before and after
  100 broadcasts x 100 devices were journaled and queued (queues paused).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nats  # noqa: E402
import psutil  # noqa: E402

from bench.auth_support import creds, embedded_nats, options  # noqa: E402
from contracts.recipe_check import validate_recipe  # noqa: E402
from doai.embedded import EmbeddedNats, free_port  # noqa: E402
from runtime import aio, jetstream  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402
from services.node.agent import NodeAgent  # noqa: E402
from services.node.driver import Key  # noqa: E402
from services.node.factory import build_driver, build_store  # noqa: E402
from services.node.journal import Journal  # noqa: E402
from services.node.settings import NodeSettings  # noqa: E402
from tests.node_support import TEST_PUBLIC_KEY, broadcast, send, until  # noqa: E402

NODE = "node-bench"
RECIPE = validate_recipe({"dsl": 1, "workflow_id": "bench", "params": {
    "youtubeVideoId": {"type": "string", "required": False, "default": "vid"}}, "steps": [
    {"id": "model", "action": "adb_shell", "command": ["getprop", "ro.product.model"]},
    {"id": "battery", "action": "adb_shell", "command": ["dumpsys", "battery"]},
    {"id": "home", "action": "keyevent", "key": "home"},
    {"id": "open", "action": "open_url", "url": "https://example.org/"},
    {"id": "report", "action": "report"},
]})


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def one_workflow_alone(agent: NodeAgent, serial: str) -> float:
    """The floor: one workflow's vendor round trips with nothing else running."""
    started = time.perf_counter()
    driver = agent.driver
    await driver.shell(serial, "getprop ro.product.model")
    await driver.shell(serial, "dumpsys battery")
    await driver.press_key(serial, Key.HOME)
    await driver.shell(serial, "am start -a android.intent.action.VIEW -d 'https://example.org/'")
    return time.perf_counter() - started


def loops(choice: str) -> list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]]:
    """The event loops to measure on: asyncio's (what a Windows node PC runs) and uvloop (Linux/macOS nodes)."""
    chosen: list[tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]] = []
    if choice in ("asyncio", "both"):
        chosen.append(("asyncio", None))
    if choice in ("uvloop", "both"):
        factory = aio.loop_factory()
        if factory is None:
            raise SystemExit("uvloop is not installed (or DOAI_UVLOOP=0): install the `uvloop` extra")
        chosen.append(("uvloop", factory))
    return chosen


def main(devices: int, slots: int, runs: int, latency_ms: float, loop: str = "both") -> None:
    configure_logging(level="warning")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = embedded_nats(tmp / "nats")
        server.start()
        port = free_port()
        sim = subprocess.Popen([sys.executable, "-m", "doai.cli", "sim", "--devices", str(devices), "--port",
                                str(port), "--latency-ms", str(latency_ms), "--seed", "1"], cwd=ROOT,
                               env={**os.environ, "DOAI_LOG_LEVEL": "warning"}, stderr=subprocess.DEVNULL)
        try:
            for name, factory in loops(loop):
                out(f"\n## event loop: {name}")
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(run_bench(tmp / name, server, port, devices, slots, runs))
            asyncio.run(rss_bench(tmp, server, port))
        finally:
            sim.terminate()
            sim.wait(10)
            server.stop()


async def run_bench(tmp: Path, server: EmbeddedNats, port: int, devices: int, slots: int, runs: int) -> None:
    nc = await nats.connect(server.url, **options(server))  # unrestricted: declares what the backend would
    js = nc.jetstream()
    await jetstream.ensure_streams(js)
    await jetstream.ensure_node_consumer(js, NODE)
    settings = NodeSettings(node_id=NODE, nats_url=server.url, vendor_url=f"ws://127.0.0.1:{port}/", slots=slots,
                            creds_file=creds(server, "node", NODE), command_public_key=TEST_PUBLIC_KEY,
                            state_dir=tmp / "state", artifact_dir=tmp / "artifacts", inventory_interval_s=1.0)
    journal = Journal(settings.journal_path)
    driver = build_driver(settings)
    agent = NodeAgent(settings, journal, driver, build_store(settings))
    marks: list[tuple[float, str]] = []  # (time, "start" | "end")
    ends = [0]  # counted as they come: the harness's own CPU is part of the figure, keep it O(1)
    record = agent.executor.task_event

    def task_event(job, state, error=None, failed_step=None):  # type: ignore[no-untyped-def]
        if state == "running":
            marks.append((time.perf_counter(), "start"))
        elif state in ("succeeded", "failed", "timed_out", "cancelled"):
            marks.append((time.perf_counter(), "end"))
            ends[0] += 1
        record(job, state, error=error, failed_step=failed_step)

    agent.executor.task_event = task_event  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await until(lambda: agent.inventory.vendor_available, 60, "the simulator listed")
    floor_one = statistics.median([await one_workflow_alone(agent, "SIM0001") for _ in range(5)])
    serials = [f"SIM{i:04d}" for i in range(1, devices + 1)]
    total = devices * runs
    proc = psutil.Process()
    cpu0 = proc.cpu_times()
    commits0 = journal.commits
    for _ in range(runs):
        await send(js, broadcast(NODE, RECIPE, serials))
    await until(lambda: ends[0] >= total, 600, "every workflow", 0.02)
    cpu1 = proc.cpu_times()
    commits = journal.commits - commits0
    await nc.close()
    stop.set()
    await runner
    await driver.close()
    journal.close()

    cpu_ms = ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) * 1000
    first, last = marks[0][0], marks[-1][0]
    busy = 0.0
    running = 0
    prev = first
    free_at: list[float] = []
    gaps: list[float] = []
    for t, kind in marks:
        busy += running * (t - prev)
        prev = t
        if kind == "start":
            running += 1
            if free_at:
                gaps.append(t - free_at.pop(0))
        else:
            running -= 1
            free_at.append(t)
    queued_until = max(t for t, kind in marks if kind == "start")  # after this, slots legitimately idle
    busy_q = 0.0
    running = 0
    prev = first
    for t, kind in marks:
        if t > queued_until:
            break
        busy_q += running * (t - prev)
        prev = t
        running += 1 if kind == "start" else -1
    makespan = last - first
    floor = total * floor_one / slots
    out(f"scheduler benchmark: {devices} devices, {slots} slots, {runs} runs = {total} workflows of 4 vendor "
        f"requests + report; simulator latency {args.latency_ms:g} ms per action (separate process)")
    out("| figure | value |")
    out("|---|---|")
    out(f"| makespan, first start -> last finish | {makespan:.2f} s |")
    out(f"| floor: workflows x one workflow alone ({floor_one * 1000:.0f} ms) / slots | {floor:.2f} s |")
    if gaps and queued_until > first:
        out(f"| slot utilisation while work was queued | {busy_q / (slots * (queued_until - first)):.1%} |")
    else:  # as many devices as slots: nothing ever waited for a slot
        out("| slot utilisation while work was queued | n/a (no task waited for a slot: use more devices) |")
    out(f"| slot utilisation over the whole makespan | {busy / (slots * makespan):.1%} |")
    if gaps:
        out(f"| dispatch gap (slot free -> next start) p50 / p99 | {pct(gaps, 50) * 1000:.2f} / "
            f"{pct(gaps, 99) * 1000:.2f} ms |")
    else:
        out("| dispatch gap (slot free -> next start) | n/a (no slot was handed on) |")
    user_ms, system_ms = ((cpu1.user - cpu0.user) * 1000 / total, (cpu1.system - cpu0.system) * 1000 / total)
    out(f"| journal commits per workflow (group commit; 12 events each) | {commits / total:.2f} |")
    out(f"| agent CPU per workflow | {cpu_ms / total:.2f} ms (user {user_ms:.2f}, system {system_ms:.2f}) |")


async def rss_bench(tmp: Path, server: EmbeddedNats, port: int) -> None:
    settings = NodeSettings(node_id="node-rss", nats_url=server.url, vendor_url=f"ws://127.0.0.1:{port}/",
                            state_dir=tmp / "state-rss", artifact_dir=tmp / "artifacts")
    journal = Journal(settings.journal_path)
    agent = NodeAgent(settings, journal, build_driver(settings), build_store(settings))
    agent.scheduler.set_vendor_available(False)  # keep everything queued
    serials = [f"SIM{i:04d}" for i in range(1, 101)]
    journal.note_devices(serials)  # as if the driver had listed them (no inventory poll here)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    for _ in range(100):
        agent.on_broadcast(broadcast("node-rss", RECIPE, serials))
    gc.collect()
    rss1 = psutil.Process().memory_info().rss
    assert agent.scheduler.queued == 10_000
    out(f"| RSS with 10,000 queued jobs (100 broadcasts x 100 devices) | {rss1 / 2**20:.0f} MiB "
        f"(+{(rss1 - rss0) / 2**20:.1f} MiB for the jobs) |")
    await agent.driver.close()
    journal.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--slots", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both",
                   help="asyncio: a Windows node PC's loop; uvloop: what doai uses on Linux/macOS when installed")
    args = p.parse_args()
    main(args.devices, args.slots, args.runs, args.latency_ms, args.loop)
