"""Every benchmark in bench/ still runs, with tiny sizes, as the README's set-up leaves the machine.

Benchmarks are not timed tests (their figures are read by people, bench/RESULTS.md); this only keeps them from
rotting: each is run as a subprocess exactly as documented, must exit 0 and must print its headline figures
(the line a reader compares against the raw reference). Figures are not asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "bench_outbox": (["--events", "400", "--repeat", "1"], ["durable / gather", "publish_async"]),
    "bench_fold": (["--devices", "10", "--repeat", "1", "--loop", "both"],
                   ["asyncio: median of 1", "uvloop: median of 1", "of raw consume"]),
    "bench_scheduler": (["--devices", "40", "--slots", "20", "--runs", "1", "--latency-ms", "5"],
                        ["slot utilisation while work was queued", "dispatch gap", "agent CPU per workflow"]),
    "bench_runs": (["--runs", "5", "--nodes", "1", "--devices", "5"],
                   ["POST /v1/runs, 1 client", "raw: the INSERT transaction alone"]),
    "bench_run_summary": (["--nodes", "1", "--devices", "200", "--other-runs", "0", "--requests", "3"],
                          ["GET /v1/runs/{id} (summary)", "raw SQL: the summary"]),
    "bench_inventory_bytes": (["--devices", "5"], ["reduction:"]),
    "demo_e2e": (["--repeat", "1", "--nodes", "1", "--devices", "2"], ["run / floor"]),
    "fleet": (["--nodes", "2", "--devices", "3", "--workers", "1", "--latency-ms", "20", "--screen-latency-ms", "20",
               "--settle-s", "0.5"], ["makespan / floor", "checks:", "worker processes left: none"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_and_prints_its_figures(name: str, tmp_path: Path) -> None:
    args, expected = CASES[name]
    env = {**os.environ, "TMPDIR": str(tmp_path), "DOAI_LOG_LEVEL": "warning"}
    env.pop("NATS_URL", None)
    env.pop("DATABASE_URL", None)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, (f"{name} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-3000:]}")
    for text in expected:
        assert text in result.stdout, f"{name}: no {text!r} in its output\n{result.stdout[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
