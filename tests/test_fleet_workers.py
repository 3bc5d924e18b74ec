"""`doai up --workers N`: nodes and simulators in worker processes that never outlive `doai up`.

Each test runs `doai up` as a subprocess on the test's own nats-server and PostgreSQL database
(NATS_URL + DATABASE_URL: no embedded servers, so a SIGKILLed parent leaves nothing else behind)
and checks the worker processes by pid.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import AuthNats

ROOT = Path(__file__).resolve().parent.parent


def up_env(nats_server: AuthNats, database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DOAI_API_TOKEN", "DOAI_LOG_FILE", "DOAI_NATS_CA"}}
    env.update(NATS_URL=nats_server.url, DOAI_NATS_AUTH_DIR=str(nats_server.trust.dir), DATABASE_URL=database_url)
    return env


def up_command(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "doai.cli", "up", "--home", str(home), "--port", "0", *args]


def worker_pids(stdout: str) -> list[int]:
    found = re.search(r"worker processes \(pids ([0-9 ]+)\)", stdout)
    assert found, stdout
    return [int(p) for p in found.group(1).split()]


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        await asyncio.sleep(0.1)
    return [p for p in pids if alive(p)]


def fleet_workers(parent: int) -> list[int]:
    """The `python -m doai.fleet` children of `parent`."""
    try:
        children = psutil.Process(parent).children()
    except psutil.NoSuchProcess:
        return []
    out = []
    for child in children:
        try:
            if "doai.fleet" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(out)


async def read_until(proc: subprocess.Popen[str], pattern: str, timeout_s: float) -> str:
    """What `proc` printed up to the first line matching `pattern`."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), deadline - time.monotonic())
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
    raise AssertionError(f"no line matching {pattern!r}: {''.join(seen)}")


async def test_demo_on_two_workers_completes_and_leaves_no_worker_behind(
        nats_server: AuthNats, database_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = await asyncio.to_thread(
        subprocess.run,
        up_command(home, "--workers", "2", "--nodes", "4", "--devices", "5", "--demo", "--timeout", "90"),
        cwd=ROOT, env=up_env(nats_server, database_url), capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert "tasks: succeeded 20" in res.stdout
    pids = worker_pids(res.stdout)
    assert len(pids) == 2 and os.getpid() not in pids
    assert await wait_until_gone(pids, 5.0) == [], "every worker ended with doai up"
    # Every node enrolled once and keeps its own credentials under DOAI_HOME; each worker logged its nodes.
    assert sorted(p.name for p in (home / "node").glob("*.creds")) == [f"node-{i}.creds" for i in range(1, 5)]
    for k in (1, 2):
        log = (home / "logs" / f"doai.worker-{k}.jsonl").read_text()
        assert '"worker ready"' in log and "Traceback" not in (home / "logs" / f"worker-{k}.stderr").read_text()
    assert "Traceback" not in res.stderr


async def test_a_killed_worker_is_restarted_and_sigterm_stops_every_worker(
        nats_server: AuthNats, database_url: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; every wait on it goes through a thread)
        up_command(tmp_path / "home", "--workers", "2", "--nodes", "2", "--devices", "2"),
                            cwd=ROOT, env=up_env(nats_server, database_url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pids = worker_pids(await read_until(proc, r"worker processes \(pids", 90.0))
        await read_until(proc, "press Ctrl-C", 10.0)
        assert fleet_workers(proc.pid) == sorted(pids)
        os.kill(pids[0], signal.SIGKILL)  # a worker dies: doai up starts it again (backoff 0.5 s)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            now = fleet_workers(proc.pid)
            if len(now) == 2 and pids[0] not in now:
                break
            await asyncio.sleep(0.1)
        now = fleet_workers(proc.pid)
        assert len(now) == 2 and pids[0] not in now and pids[1] in now, (pids, now)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 40)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
        assert await wait_until_gone(now, 5.0) == [], "SIGTERM to doai up stops every worker"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_worker_stops_by_itself_when_doai_up_is_killed(
        nats_server: AuthNats, database_url: str, tmp_path: Path) -> None:
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; every wait on it goes through a thread)
        up_command(tmp_path / "home", "--workers", "2", "--nodes", "2", "--devices", "1"),
                            cwd=ROOT, env=up_env(nats_server, database_url), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    pids: list[int] = []
    try:
        pids = worker_pids(await read_until(proc, r"worker processes \(pids", 90.0))
        assert all(alive(p) for p in pids)
        proc.kill()  # SIGKILL: no handler runs in doai up; only the workers' lifeline (stdin) tells them
        proc.wait()
        assert await wait_until_gone(pids, 20.0) == [], "a worker must not outlive doai up"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:  # reparented now: find them by pid
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
