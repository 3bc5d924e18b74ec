"""The README's first command: `doai up --demo` starts everything itself and exits 0 on a completed run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_doai_up_demo_completes_a_run_with_screenshots_at_the_convention(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN"}}
    home = tmp_path / "home"
    res = subprocess.run(
        [sys.executable, "-m", "doai.cli", "up", "--demo", "--home", str(home), "--port", "0",
         "--nodes", "2", "--devices", "3", "--timeout", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    match = re.search(r"run ([0-9a-f-]{36}) completed in [0-9.]+ s", res.stdout)
    assert match, res.stdout
    run_id = match.group(1)
    assert "tasks: succeeded 6" in res.stdout
    pngs = sorted((home / "artifacts").rglob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        video, node, serial, run, name = png.relative_to(home / "artifacts").parts
        assert (video, run) == ("dQw4w9WgXcQ", run_id) and node in {"node-1", "node-2"}
        assert serial.startswith(f"SIM{node[-1]}X") and name.removesuffix(".png").isdigit()
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # The backend signed every command with the seed `doai up` made for this home: private, never printed.
    seed_file = home / "keys" / "command-signing.seed"
    assert seed_file.stat().st_mode & 0o777 == 0o600
    seed = seed_file.read_text().strip()
    assert seed.startswith("SN") and seed not in res.stdout + res.stderr
