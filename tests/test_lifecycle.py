"""Nothing outlives `doai up` (issue 10 item 9), and its addresses stay the same across restarts (issue 11 item 6).

Real `doai up` processes with their embedded nats-server and PostgreSQL, killed with
SIGKILL (not a polite stop); processes are checked by pid (and creation time, so a
reused pid does not count as alive).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
import pytest

from runtime.watchdog import is_same_process, process_create_time

ROOT = Path(__file__).resolve().parent.parent
START_S = 120.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN", "DOAI_LOG_FILE", "DOAI_NATS_PORT",
                         "DOAI_PG_PORT"}}


@dataclass
class Proc:
    """A process by pid and creation time: `alive` is False once it exited (a zombie counts as gone)."""

    pid: int
    created: float

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, process_create_time(pid))

    def alive(self) -> bool:
        return is_same_process(self.pid, self.created)


def gone_within(procs: list[Proc], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(p.alive() for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Up:
    """One `doai up` subprocess, its console output, and the processes it started."""

    proc: subprocess.Popen[bytes]
    out: Path
    home: Path

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_S
        while "press Ctrl-C to stop" not in self.text():
            assert self.proc.poll() is None, f"doai up exited with {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"doai up not ready within {START_S} s:\n{self.text()}"
            time.sleep(0.1)
        # The node agent is up too (it has connected to NATS): stopping now exercises every part's shutdown.
        log = self.home / "logs" / "doai.jsonl"
        while '"node agent ready"' not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the node agent did not get ready"
            time.sleep(0.1)

    def addresses(self) -> dict[str, str]:
        text = self.text()
        api = re.search(r"doai is up: API (\S+)\s+\(token: (\S+)\)", text)
        nats = re.search(r"^\s+NATS (nats://\S+)", text, re.M)
        pg = re.search(r"^\s+PostgreSQL (postgresql://\S+)", text, re.M)
        assert api and nats and pg, text
        return {"api": api.group(1), "token": api.group(2), "nats": nats.group(1), "pg": pg.group(1)}

    def nats_server(self) -> Proc:
        return Proc.of(int((self.home / "nats" / "nats-server.pid").read_text().split()[0]))

    def postgres(self) -> Proc:
        return Proc.of(int((self.home / "pg" / "postmaster.pid").read_text().splitlines()[0]))

    def watchdog(self) -> Proc:
        found = [c for c in psutil.Process(self.proc.pid).children()
                 if "runtime.watchdog" in " ".join(c.cmdline())]
        assert len(found) == 1, found
        return Proc.of(found[0].pid)


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(home: Path, *extra: str) -> Up:
        out = tmp_path / f"up-{len(started)}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "doai.cli", "up", "--home", str(home), "--nodes", "1",
                                     "--devices", "1", *extra], cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL,
                                    stdout=sink, stderr=subprocess.STDOUT)
        up = Up(proc, out, home)
        started.append(up)
        return up

    yield start
    for up in started:  # a failed test leaves nothing behind either
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait(10)


def test_a_killed_doai_up_leaves_no_server_and_the_next_start_keeps_every_address(
    tmp_path: Path, start_up: Callable[..., Up]
) -> None:
    start = start_up
    home = tmp_path / "home"

    # 1. kill -9 `doai up`: its nats-server and PostgreSQL (and the watchdog) are gone within seconds.
    first = start(home, "--port", "0")
    first.wait_ready()
    addresses = first.addresses()
    servers = [first.nats_server(), first.postgres()]
    dog = first.watchdog()
    assert all(p.alive() for p in [*servers, dog])
    password = (home / "keys" / "postgres.password").read_text().strip()
    assert password not in first.text(), "the PostgreSQL password is not printed"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert gone_within([*servers, dog], 15.0), "nats-server / postgres / watchdog outlived the killed doai up"

    # 2. The next start on the same home: the same API address, token, NATS port and PostgreSQL port.
    second = start(home)
    second.wait_ready()
    assert second.addresses() == addresses, second.text()

    # PostgreSQL over TCP (what psql and Grafana use): the password is required, and it works.
    async def connect_tcp() -> None:
        conn = await asyncpg.connect(addresses["pg"], password=password, timeout=10)
        try:
            assert await conn.fetchval("SELECT count(*) FROM runs") >= 0  # doai's schema, on this server
        finally:
            await conn.close()
        for wrong in ("", "not-the-password"):
            with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
                                asyncpg.ClientConfigurationError)):
                await asyncpg.connect(addresses["pg"], password=wrong, timeout=10)

    asyncio.run(connect_tcp())

    # 3. The stale case: `doai up` and its watchdog both killed, so the servers are left running ...
    stale = [second.nats_server(), second.postgres()]
    second_dog = second.watchdog()
    second_dog_proc = psutil.Process(second_dog.pid)
    second_dog_proc.kill()
    second.proc.send_signal(signal.SIGKILL)
    second.proc.wait(10)
    assert gone_within([second_dog], 10.0)
    assert all(p.alive() for p in stale), "the servers run on without a watchdog (what a stale home looks like)"

    # ... and the next start stops them (they are ours: pid file, command line and folder match) and starts anew.
    third = start(home)
    third.wait_ready()
    assert third.addresses() == addresses, third.text()
    assert gone_within(stale, 5.0), "the stale servers of the killed run were stopped"
    assert {third.nats_server().pid, third.postgres().pid}.isdisjoint({p.pid for p in stale})
    log = (home / "logs" / "doai.jsonl").read_text()
    assert "stale nats-server of an earlier run stopped" in log and "stale postgresql of an earlier run stopped" in log
    assert f"stopped a nats-server (pid {stale[0].pid}) left running by an earlier, killed start" in third.text()
    assert f"stopped a PostgreSQL (pid {stale[1].pid}) left running" in third.text()

    # 4. A second `doai up` on a home in use is refused, and touches nothing of the running one.
    running = [third.nats_server(), third.postgres(), third.watchdog()]
    res = subprocess.run([sys.executable, "-m", "doai.cli", "up", "--home", str(home), "--nodes", "1"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert f"another doai up (pid {third.proc.pid}) is using {home}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert all(p.alive() for p in running) and third.proc.poll() is None

    # 5. A polite stop takes its servers with it.
    third.proc.send_signal(signal.SIGINT)
    assert third.proc.wait(30) == 0, third.text()
    assert gone_within(running, 5.0)


def test_a_stop_completes_within_seconds_while_nats_and_postgres_hang(
    tmp_path: Path, start_up: Callable[..., Up]
) -> None:
    up = start_up(tmp_path / "home", "--port", "0")
    up.wait_ready()
    servers = [up.nats_server(), up.postgres()]
    for server in servers:  # both stop answering: connections stay open, nothing comes back
        os.kill(server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        try:
            code = up.proc.wait(10.0)  # about 3 s on a loaded machine; 15 s before the waits were bounded
        except subprocess.TimeoutExpired:
            pytest.fail(f"doai up still running {time.monotonic() - started:.1f} s after SIGINT with NATS and "
                        f"PostgreSQL hung:\n{up.text()}")
    finally:
        for server in servers:
            if server.alive():
                os.kill(server.pid, signal.SIGCONT)
    text = up.text()
    assert code == 0, text
    assert "stopping: the parts, then the embedded servers" in text
    assert "Traceback" not in text
    # The hung servers did not outlive it either.
    assert gone_within(servers, 5.0)
