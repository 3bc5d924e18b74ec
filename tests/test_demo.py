"""The README's first command: `doai up --demo` starts everything itself and exits 0 on a completed run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_doai_up_demo_completes_a_run_with_screenshots_at_the_convention(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN", "DOAI_LOG_FILE"}}
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
    # A quiet console: what an operator needs on the terminal, every log line in a JSON file under the home.
    assert len(res.stdout.splitlines()) + len(res.stderr.splitlines()) < 40, res.stdout + res.stderr[-3000:]
    log_lines = [json.loads(line) for line in (home / "logs" / "doai.jsonl").read_text().splitlines()]
    assert sum(1 for e in log_lines if e.get("run_id") == run_id) >= 6 * 10, "every device's steps are logged"
    # The token and the API port are kept (0600) for the next start of this home.
    state_file = home / "keys" / "console.json"
    assert state_file.stat().st_mode & 0o777 == 0o600
    state = json.loads(state_file.read_text())
    assert state["token"] in res.stdout and f":{state['api_port']}" in res.stdout
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
    # Nothing doai up wrote under the home is open to other users: logs, journals, artifacts, keys, the NATS store
    # (the home itself is 0711 as root, so a guessable name would otherwise be enough to read a file).
    exposed = [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in home.rglob("*")
               if not p.is_symlink() and p.stat().st_mode & 0o077 and not p.is_socket()]
    assert not exposed, exposed[:20]


def test_doai_up_keeps_token_and_api_port_across_restarts_of_the_same_home(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN", "DOAI_LOG_FILE"}}
    home = tmp_path / "home"
    seen = []
    for _ in range(2):
        res = subprocess.run(
            [sys.executable, "-m", "doai.cli", "up", "--demo", "--home", str(home), "--nodes", "1", "--devices", "1",
             "--timeout", "120"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        found = re.search(r"doai is up: API (\S+)\s+\(token: (\S+)\)", res.stdout)
        assert found, res.stdout
        seen.append(found.groups())
    assert seen[0] == seen[1], "the same API address and token at the second start"
