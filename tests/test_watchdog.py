"""The watchdog (`runtime.watchdog`): a parent's children are stopped when the parent dies, and nothing else is.

The parent is a real Python process killed with SIGKILL; its children are real processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from runtime.watchdog import Watchdog, is_same_process, process_create_time

ROOT = Path(__file__).resolve().parent.parent

# A child that ignores SIGTERM (only the kill after the grace period ends it), and one that stops on SIGTERM.
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(600)")
POLITE = "import time; print('ready', flush=True); time.sleep(600)"

PARENT = textwrap.dedent("""
    import json, subprocess, sys, time
    from runtime.watchdog import Watchdog
    dog = Watchdog.start()
    kids = {}
    for name, code in json.loads(sys.argv[1]).items():
        kid = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
        kid.stdout.readline()
        kids[name] = kid.pid
    for name, pid in kids.items():
        dog.watch(name, pid, grace_s=1.0)
    dog.forget("forgotten")
    # A guard on a pid with another creation time (what a reused pid looks like) must not stop that process.
    dog.watch("reused", kids["innocent"], create_time=1.0, grace_s=1.0)
    dog.forget("innocent")
    print(json.dumps({"kids": kids, "watchdog": dog.pid}), flush=True)
    time.sleep(600)
""")


def _gone_within(pids: dict[str, tuple[int, float]], timeout_s: float) -> set[str]:
    """The names still alive after `timeout_s` (or as soon as all are gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {name for name, (pid, created) in pids.items() if is_same_process(pid, created)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def test_children_die_with_a_killed_parent_and_nothing_else_is_touched() -> None:
    kids_code = {"polite": POLITE, "stubborn": STUBBORN, "forgotten": POLITE, "innocent": POLITE}
    kids: dict[str, tuple[int, float]] = {}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(kids_code)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        started = json.loads(parent.stdout.readline())
        kids = {name: (pid, process_create_time(pid)) for name, pid in started["kids"].items()}
        dog = (started["watchdog"], process_create_time(started["watchdog"]))
        assert _gone_within(kids, 0.0) == set(kids)  # all alive before
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        # polite: SIGTERM; stubborn: ignores it, killed after its 1 s grace; then the watchdog exits.
        assert _gone_within({k: kids[k] for k in ("polite", "stubborn")} | {"watchdog": dog}, 10.0) == set()
        # Forgotten, and guarded only under another creation time: both still run.
        assert _gone_within({k: kids[k] for k in ("forgotten", "innocent")}, 0.0) == {"forgotten", "innocent"}
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid, _ in kids.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_a_closed_watchdog_stops_what_is_still_guarded_and_exits() -> None:
    kid = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert kid.stdout is not None
        kid.stdout.readline()
        dog = Watchdog.start()
        dog.watch("kid", kid.pid, grace_s=0.5)
        started = time.monotonic()
        dog.close()
        assert kid.wait(5) == -signal.SIGKILL  # SIGTERM ignored, so killed after the grace
        assert time.monotonic() - started < 5.0
        assert not dog.alive()
    finally:
        if kid.poll() is None:
            kid.kill()
            kid.wait()
