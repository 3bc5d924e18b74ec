"""How long `doai up --demo` takes, and how its run compares with the simulator's own floor.

Usage: .venv/bin/python bench/demo_e2e.py [--repeat 3] [--nodes 2 --devices 10 --slots 20]

Three figures, each the median of `--repeat` runs in fresh data folders:

* end to end: `doai up --demo` as a subprocess, start to exit (embedded
  NATS + PostgreSQL start, migrations, nodes, the run, shutdown);
* run: from `POST /v1/runs` to the run reading `completed` (printed by the demo);
* floor: the same vendor requests one device's device-smoke workflow makes,
  sent straight to a simulator with the demo's latencies (no doai in
  between), times the number of waves (devices per node / slots). The ratio
  run / floor is doai's overhead on this machine, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.device_floor import floor_one_device  # noqa: E402
from doai.up import UpOptions  # noqa: E402
from runtime.logging import configure_logging  # noqa: E402


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_demo(nodes: int, devices: int, slots: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="doai-bench-") as home:
        started = time.perf_counter()
        proc = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "doai"), "up", "--demo", "--port", "0", "--home", home,
             "--nodes", str(nodes), "--devices", str(devices), "--slots", str(slots)],
            capture_output=True, text=True, check=False,
        )
        total = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"doai up --demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    match = re.search(r"completed in ([0-9.]+) s", proc.stdout)
    if match is None:
        raise SystemExit(f"no run time in the demo's output:\n{proc.stdout}")
    return total, float(match.group(1))


async def demo_floor_one_device() -> float:
    """One device's device-smoke requests, straight to the simulator with the demo's latencies."""
    defaults = UpOptions(home=Path("."))
    return await floor_one_device(defaults.sim_latency_ms, defaults.screen_latency_ms)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--slots", type=int, default=20)
    args = parser.parse_args()
    configure_logging(level="warning")
    totals, runs, floors = [], [], []
    for i in range(args.repeat):
        floors.append(asyncio.run(demo_floor_one_device()))
        total, run = run_demo(args.nodes, args.devices, args.slots)
        totals.append(total)
        runs.append(run)
        out(f"  try {i + 1}: end to end {total:.2f} s, run {run:.2f} s, floor {floors[-1]:.3f} s per device")
    waves = math.ceil(args.devices / args.slots)
    floor = statistics.median(floors) * waves
    run = statistics.median(runs)
    out(f"doai up --demo ({args.nodes} nodes x {args.devices} devices, {args.slots} slots), "
        f"median of {args.repeat}:")
    out(f"  end to end                {statistics.median(totals):6.2f} s")
    out(f"  run (POST → completed)    {run:6.2f} s")
    out(f"  simulator floor           {floor:6.2f} s  ({waves} wave(s) x one device's raw vendor requests)")
    out(f"  run / floor               {run / floor:6.2f} x")


if __name__ == "__main__":
    main()
