"""Every doai entry point starts its event loop through `runtime.aio.run`: uvloop when installed, else asyncio's."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import aio

ROOT = Path(__file__).resolve().parent.parent


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_uvloop_is_installed_by_the_all_extra() -> None:
    # `./run` installs doai[all,test]; `all` brings the `uvloop` extra (POSIX only).
    assert sys.platform != "win32"
    assert importlib.util.find_spec("uvloop") is not None


def test_run_uses_uvloop_when_installed_and_asyncio_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aio.UVLOOP_ENV, raising=False)
    assert aio.loop_name() == "uvloop"
    assert aio.run(_loop_module()).startswith("uvloop")
    monkeypatch.setenv(aio.UVLOOP_ENV, "0")
    assert aio.loop_name() == "asyncio"
    assert aio.run(_loop_module()).startswith("asyncio")


def test_run_never_picks_uvloop_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aio.UVLOOP_ENV, raising=False)
    monkeypatch.setattr(aio.sys, "platform", "win32")
    assert aio.loop_factory() is None


def test_no_entry_point_starts_a_loop_of_its_own() -> None:
    """`asyncio.run` appears nowhere in the parts or the composition root: they all go through `aio.run`."""
    offenders = []
    for folder in ("doai", "services", "runtime"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "runtime" / "aio.py":  # the helper itself
                continue
            text = path.read_text(encoding="utf-8")
            if "asyncio.run(" in text or "uvloop" in text or "new_event_loop(" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_cli_runs_on_uvloop() -> None:
    """In a fresh process that imports the CLI, the helper it calls runs uvloop's loop."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import asyncio\nfrom runtime import aio\nfrom doai import cli\n"
         "async def main():\n    return type(asyncio.get_running_loop()).__module__\n"
         "assert cli.aio is aio\nprint(aio.run(main()))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().startswith("uvloop")
