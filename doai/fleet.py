"""The simulated fleet of `doai up`: node agents with their simulators, in this process or in worker processes.

`host_nodes` starts, for each node number `i` of a `NodeHostSpec`, a simulator of
`devices` phones (serials `SIM<i>X0000`...) and the node agent `node-<i>` driving it,
under the caller's `Supervisor`. `doai up` calls it in its own process
(`--workers 0`, the default), or `WorkerFleet` starts `--workers N` worker
processes (`python -m doai.fleet`), each hosting every N-th node, so a large fleet
uses every core. The same function runs in both cases.

Worker processes:

* get their `NodeHostSpec` as one JSON line on stdin (the node enrollment secret
  never appears in a command line or an environment variable), answer one
  `doai-worker-ready {...}` line on stdout with their pid and devices, then keep
  stdin open as a lifeline (`doai.lifeline`): when the parent closes it or dies,
  the worker stops its nodes the usual way (jobs journaled, outboxes flushed);
* run in their own process group / session, so a Ctrl-C on the terminal reaches
  only the parent, which stops them all (closes each lifeline, waits up to
  `grace_s`, then kills what is left);
* log JSON lines to `<log file stem>.worker-<k>.jsonl` next to `doai up`'s log,
  stderr to `worker-<k>.stderr` in the same folder;
* each node enrolls on its first start like any node and keeps its credentials
  under `DOAI_HOME/node/<node_id>.creds`, so a restarted worker reuses them.

Supervision: a worker that fails to become ready at start fails `doai up` (with the
last line of its stderr). A worker that dies later is restarted with a backoff
(0.5 s doubling to 30 s, `runtime.supervisor`): its nodes restart from their
journals as after any crash (a job found running is re-queued or failed,
`max_attempts`), and its simulators come back with the same serials.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import structlog

from runtime import aio
from runtime.logging import configure_logging
from runtime.stopping import install_stop_handlers
from runtime.supervisor import LoopFailed, Supervisor
from services.node.agent import run_node
from services.node.settings import NodeSettings
from services.simulator.server import Simulator, SimulatorConfig

log = structlog.get_logger(__name__)

READY = b"doai-worker-ready "


class NodeHostSpec(msgspec.Struct, kw_only=True, frozen=True):
    """What one host (this process or a worker) runs: node numbers and how to build their parts."""

    nodes: list[int]  # node numbers: node-<i> driving simulator SIM<i>X
    devices: int
    slots: int
    sim_latency_ms: float
    screen_latency_ms: float
    inventory_interval_s: float
    nats_url: str
    nats_ca: str | None
    api_url: str
    node_secret: str
    home: str
    worker: int = 0  # 1..N for a worker process, 0 in `doai up`'s own process
    log_file: str | None = None


def simulator_config(spec: NodeHostSpec, i: int) -> SimulatorConfig:
    # The latencies are the phones' (actions on a device); listing the devices is the vendor program's own
    # table and stays quick (at most 20 ms), so slow phones do not hold a connection with every inventory poll.
    latencies = {"screen": spec.screen_latency_ms, "list": min(spec.sim_latency_ms, 20.0)}
    return SimulatorConfig(devices=spec.devices, serial_prefix=f"SIM{i}X", seed=i,
                           default_latency_ms=spec.sim_latency_ms, latency_ms=latencies)


def node_settings(spec: NodeHostSpec, i: int, vendor_url: str) -> NodeSettings:
    # Each node enrolls at the API with the shared secret on its first start (its own NATS identity,
    # kept under home/node) and reuses those credentials afterwards.
    home = Path(spec.home)
    return NodeSettings(
        node_id=f"node-{i}", nats_url=spec.nats_url, vendor_url=vendor_url, slots=spec.slots,
        state_dir=home / "node", artifact_dir=home / "artifacts", inventory_interval_s=spec.inventory_interval_s,
        api_url=spec.api_url, node_secret=spec.node_secret, nats_ca=Path(spec.nats_ca) if spec.nats_ca else None,
    )


async def host_nodes(spec: NodeHostSpec, parts: Supervisor, stop: asyncio.Event,
                     sims: list[Simulator]) -> dict[str, list[str]]:
    """Start each node's simulator (appended to `sims`; the caller closes them) and agent; return their devices."""
    devices: dict[str, list[str]] = {}
    for i in spec.nodes:
        sim = Simulator(simulator_config(spec, i))
        await sim.start()
        sims.append(sim)
        node = node_settings(spec, i, sim.url)
        parts.start(node.node_id, functools.partial(run_node, node, stop), restart=False)
        devices[node.node_id] = sorted(sim.devices)
    return devices


def split_nodes(nodes: int, workers: int) -> list[list[int]]:
    """Node numbers 1..nodes dealt round-robin over `workers` hosts (no empty host)."""
    workers = max(1, min(workers, nodes))
    return [list(range(k, nodes + 1, workers)) for k in range(1, workers + 1)]


# -- the worker process -----------------------------------------------------------------


THREADS_PER_NODE = 6  # what one node's process gets by default on a 2-core PC: min(32, cores + 4)


def started_threads(executor: ThreadPoolExecutor, count: int) -> None:
    """Start the pool's `count` threads now, before any node runs. A pool starts a thread on demand, and
    `Thread.start` waits for the new thread to run: in the first screenshot burst, with the GIL contended, that
    stalled the event loop for seconds (bench/fleet.py's first wave)."""
    gate = threading.Barrier(count)  # each task holds its thread until all `count` are running
    for done in [executor.submit(gate.wait) for _ in range(count)]:
        done.result()


async def _serve_worker(spec: NodeHostSpec) -> int:
    from doai.lifeline import watch_lifeline

    # A node does its file work (screenshot folders, artifact copies) in the loop's default executor. On its own
    # PC each node has one; a worker hosting many nodes gives its loop as many threads as they would have had,
    # or their screenshots queue behind each other (measured: +3 s per screenshot with 25 nodes on 6 threads).
    threads = min(256, THREADS_PER_NODE * len(spec.nodes))
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="worker")
    started_threads(executor, threads)
    asyncio.get_running_loop().set_default_executor(executor)
    stop = asyncio.Event()
    restore = install_stop_handlers(stop)
    watch_lifeline(sys.stdin.buffer, stop)
    sims: list[Simulator] = []
    parts = Supervisor(stop, f"worker-{spec.worker}", grace_s=10.0)
    code = 0
    try:
        async with parts:
            devices = await host_nodes(spec, parts, stop, sims)
            ready = {"pid": os.getpid(), "worker": spec.worker, "devices": devices}
            sys.stdout.buffer.write(READY + msgspec.json.encode(ready) + b"\n")
            sys.stdout.buffer.flush()
            _quiet_stdout()  # the parent reads no further: a full pipe must never block this process
            log.info("worker ready", worker=spec.worker, nodes=len(devices))
    except LoopFailed as exc:
        log.error("worker stopping: a node failed", worker=spec.worker, failure=str(exc))
        code = 1
    finally:
        for sim in sims:
            await sim.close()
        restore()
    log.info("worker stopped", worker=spec.worker)
    return code


def _quiet_stdout() -> None:
    """Point stdout (the file descriptor too, for C code) at the null device."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def worker_main() -> int:
    """`python -m doai.fleet`: read the spec from stdin, host its nodes until stdin closes or a signal."""
    line = sys.stdin.buffer.readline()
    if not line.strip():
        sys.stderr.write("doai worker: no spec on stdin (this process is started by `doai up --workers`)\n")
        return 2
    spec = msgspec.json.decode(line, type=NodeHostSpec)
    configure_logging(log_file=spec.log_file, console=spec.log_file is None)
    profile_dir = os.environ.get("DOAI_WORKER_PROFILE_DIR")  # bench/fleet.py --profile: where the CPU goes
    profiler = cProfile.Profile() if profile_dir else None
    try:
        if profiler is not None:
            profiler.enable()
        return aio.run(_serve_worker(spec))  # the faster loop when installed, like every entry point
    except KeyboardInterrupt:
        return 130
    finally:
        if profiler is not None and profile_dir:
            profiler.disable()
            profiler.dump_stats(str(Path(profile_dir) / f"worker-{spec.worker}.pstats"))


# -- the parent: start, supervise and stop the workers ------------------------------------


class WorkerFailed(RuntimeError):
    """A worker process could not start its nodes (the message says which and why)."""


def _detached() -> dict[str, Any]:
    """Start a worker outside the terminal's process group: Ctrl-C reaches only the parent, which stops it."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _child_env() -> dict[str, str]:
    """The parent's environment, with this checkout importable (a source tree run without installing)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _tail(path: Path, lines: int = 1) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class WorkerFleet:
    """`doai up --workers N`: N worker processes, each `host_nodes` for its share of the nodes."""

    def __init__(self, specs: Mapping[int, NodeHostSpec], stop: asyncio.Event, logs_dir: Path, *,
                 grace_s: float = 12.0, ready_timeout_s: float = 120.0) -> None:
        self.specs = dict(specs)
        self.stop = stop
        self.logs_dir = logs_dir
        self.grace_s = grace_s
        self.ready_timeout_s = ready_timeout_s
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.devices: dict[str, list[str]] = {}
        self.started: dict[int, int] = {}  # worker -> how many times it was started

    def pids(self) -> list[int]:
        return [p.pid for _, p in sorted(self.procs.items())]

    async def start_all(self) -> None:
        """Start every worker and wait until each hosts its nodes; on a failure stop them all and raise."""
        results = await asyncio.gather(*(self._spawn(k) for k in self.specs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise WorkerFailed("; ".join(str(e) for e in errors))

    async def _spawn(self, k: int) -> asyncio.subprocess.Process:
        spec = self.specs[k]
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        err_path = self.logs_dir / f"worker-{k}.stderr"
        with open(err_path, "ab") as err:  # noqa: ASYNC230 (a local file, opened once per start)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "doai.fleet", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=err, env=_child_env(), **_detached())
        self.procs[k] = proc
        self.started[k] = self.started.get(k, 0) + 1
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(msgspec.json.encode(spec) + b"\n")
        try:
            await proc.stdin.drain()
            ready = await asyncio.wait_for(self._ready_line(proc.stdout), self.ready_timeout_s)
        except (OSError, TimeoutError, ConnectionError) as exc:
            await self._kill(proc)
            raise WorkerFailed(f"worker {k} (pid {proc.pid}) did not start: {exc or type(exc).__name__}; "
                               f"{_tail(err_path)}") from None
        if ready is None:
            await proc.wait()
            raise WorkerFailed(f"worker {k} (pid {proc.pid}) exited with {proc.returncode} before it was ready: "
                               f"{_tail(err_path) or 'see ' + str(err_path)}")
        self.devices.update(ready["devices"])
        log.info("worker started", worker=k, pid=proc.pid, nodes=len(ready["devices"]), starts=self.started[k])
        return proc

    @staticmethod
    async def _ready_line(stdout: asyncio.StreamReader) -> dict[str, Any] | None:
        while True:
            line = await stdout.readline()
            if not line:
                return None
            if line.startswith(READY):
                ready: dict[str, Any] = msgspec.json.decode(line[len(READY):])
                return ready

    async def keep(self, k: int) -> None:
        """A `Supervisor` loop: watch worker `k` (starting it again after a death) until `stop`, then stop it."""
        proc = self.procs.get(k)
        if proc is None or proc.returncode is not None:
            if self.stop.is_set():
                return
            log.warning("restarting worker", worker=k)
            proc = await self._spawn(k)
        exited = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                await self._stop_one(k, proc)
                return
            self.procs.pop(k, None)
            if self.stop.is_set():
                return
            err = _tail(self.logs_dir / f"worker-{k}.stderr")
            raise WorkerFailed(f"worker {k} (pid {proc.pid}) exited with {proc.returncode}"
                               + (f": {err}" if err else ""))
        finally:
            stopping.cancel()
            if proc.returncode is None:  # cancelled (the supervisor's grace ran out): do not leave it behind
                await self._kill(proc)

    async def _stop_one(self, k: int, proc: asyncio.subprocess.Process) -> None:
        """Close the worker's lifeline; kill it if it has not stopped within `grace_s`."""
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), self.grace_s)
        except TimeoutError:
            log.warning("worker did not stop in time; killed", worker=k, pid=proc.pid, grace_s=self.grace_s)
            await self._kill(proc)
        log.info("worker stopped", worker=k, pid=proc.pid, returncode=proc.returncode)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """Stop every worker still running (the last resort of `doai up`'s shutdown)."""
        await asyncio.gather(*(self._stop_one(k, p) for k, p in list(self.procs.items()) if p.returncode is None))


if __name__ == "__main__":
    sys.exit(worker_main())
