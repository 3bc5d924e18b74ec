"""`doai up`: the whole system on the embedded default.

Starts (or uses) NATS and PostgreSQL, the backend, the aggregator, and
`--nodes` node agents each with its own simulator of `--devices` phones
(in this process, or with `--workers N` in N worker processes: `doai.fleet`);
publishes the recipes in `recipes/`; then serves until Ctrl-C, or with
`--demo` runs `device-smoke` on every device and exits 0 only if the run
completed with every task succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import structlog

from doai.api_client import RetryingTransport
from doai.embedded import free_port, port_free
from doai.fleet import NodeHostSpec, WorkerFailed, WorkerFleet, host_nodes, split_nodes
from doai.resources import recipe_files
from doai.servers import Infra, infrastructure
from runtime.aio import Stopped, unless_stopped
from runtime.nats_creds import write_secret
from runtime.signing import load_or_create_seed
from runtime.stopping import install_stop_handlers
from runtime.supervisor import LoopFailed, Supervisor
from services.aggregator.main import AggregatorSettings, run_aggregator
from services.backend.main import run_backend
from services.backend.settings import BackendSettings
from services.simulator.server import Simulator

log = structlog.get_logger(__name__)

DEMO_PARAMS = {"url": "https://example.org/doai-smoke", "youtubeVideoId": "dQw4w9WgXcQ"}


def say(text: str = "") -> None:
    """Operator-facing output (the summary), separate from the log stream."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass
class UpOptions:
    home: Path
    nodes: int = 2
    devices: int = 10
    slots: int = 20
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    demo: bool = False
    demo_timeout_s: float = 300.0
    sim_latency_ms: float = 20.0
    screen_latency_ms: float = 300.0
    inventory_interval_s: float = 2.0
    # X-Node-Auth secret for the backend; None: generate one (embedded mode, rule 8).
    node_secret: str | None = None
    # The backend's command-signing seed; None: the one kept under `home` (made on first start, 0600).
    command_signing_seed: str | None = field(default=None, repr=False)
    # Where the JSON log goes (the console shows only what `say` prints unless -v); None: not a file.
    log_file: Path | None = None
    # The API port was given (--port): else the one of the last start of this home, else 8000.
    port_given: bool = True
    # Worker processes hosting the nodes and their simulators (0: all in this process).
    workers: int = 0
    # Servers of the embedded NATS cluster (`--nats-cluster`, 3 or more); 0: one nats-server.
    nats_cluster: int = 0


def console_state_path(home: Path) -> Path:
    """The API token and port of this DOAI_HOME, kept across restarts (0600)."""
    return home / "keys" / "console.json"


def load_console_state(home: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(console_state_path(home).read_text(encoding="utf-8"))
        return state
    except (OSError, ValueError):
        return {}


def save_console_state(home: Path, token: str, port: int) -> None:
    write_secret(console_state_path(home), json.dumps({"token": token, "api_port": port}))


def command_key_path(home: Path) -> Path:
    """Where `doai up` keeps the backend's command-signing seed for this DOAI_HOME (0600, made once, reused)."""
    return home / "keys" / "command-signing.seed"


async def publish_recipes(client: httpx.AsyncClient) -> list[str]:
    published = []
    for recipe in recipe_files():
        r = await client.post("/v1/workflows", content=recipe.read_bytes())
        if r.status_code not in (201, 409):
            raise RuntimeError(f"publishing {recipe.name} failed: {r.status_code} {r.text}")
        published.append(recipe.name.removesuffix(".json"))
    return published


def fleet_devices(sims: list[Simulator]) -> list[dict[str, str]]:
    """The (node, serial) pairs of the simulated fleet, as run targets."""
    return [{"node_id": f"node-{i}", "serial": serial}
            for i, sim in enumerate(sims, start=1) for serial in sorted(sim.devices)]


async def wait_for_devices(client: httpx.AsyncClient, expected: list[dict[str, str]], timeout_s: float,
                           since: datetime | None = None) -> int:
    """Wait until every expected device is listed online (and seen after `since`); return how many are."""
    wanted = {(d["node_id"], d["serial"]) for d in expected}
    deadline = time.monotonic() + timeout_s
    while True:
        r = await client.get("/v1/devices")
        r.raise_for_status()
        ready = {
            (d["node_id"], d["serial"]) for d in r.json()["devices"]
            if d["online"] and (since is None or datetime.fromisoformat(d["last_seen"]) >= since)
        } & wanted
        if len(ready) == len(wanted) or time.monotonic() >= deadline:
            return len(ready)
        await asyncio.sleep(0.1)


FINAL_STATES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped", "lost", "interrupted"})


@contextlib.contextmanager
def demo_progress(total: int) -> Iterator[Callable[[str, dict[str, int], str], None]]:
    """A live progress bar on a terminal (rich, from the `cli` extra); one line per change otherwise."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        rich_ok = False
    else:
        rich_ok = True
    if not rich_ok or not sys.stdout.isatty():
        yield lambda _status, _counts, line: say(line)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[states]}"), console=Console(), transient=False) as bar:
        task = bar.add_task("device-smoke", total=total, states="")

        def show(status: str, counts: dict[str, int], _line: str) -> None:
            done = sum(n for s, n in counts.items() if s in FINAL_STATES)
            states = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            bar.update(task, completed=done, description=status, states=states)

        yield show


async def run_demo(client: httpx.AsyncClient, opts: UpOptions, system: System) -> bool:
    artifact_dir = system.artifact_dir
    targets = system.targets()
    expected = len(targets)
    # Only devices this process's simulators listed count (the data folder may hold older ones).
    online = await wait_for_devices(client, targets, 60.0, since=system.started_at)
    if online < expected:
        say(f"only {online} of {expected} simulated devices came online within 60 s")
        return False
    started = time.monotonic()
    # With an Idempotency-Key a dropped connection is retried (the API replays the same run).
    r = await client.post("/v1/runs", json={
        "workflow_id": "device-smoke", "params": DEMO_PARAMS, "targets": {"devices": targets},
    }, headers={"Idempotency-Key": f"doai-up-demo-{uuid.uuid4()}"})
    if r.status_code != 201:
        say(f"creating the demo run failed: {r.status_code} {r.text}")
        return False
    run_id = r.json()["run_id"]
    say(f"run {run_id}: device-smoke on {r.json()['targets']} devices")
    last = None
    run: dict[str, Any] = {}
    deadline = started + opts.demo_timeout_s
    with demo_progress(expected) as show:
        while time.monotonic() < deadline:
            run = (await client.get(f"/v1/runs/{run_id}")).json()
            counts_now: dict[str, int] = run["counts"]
            line = f"  {run['status']:<10} " + " ".join(f"{k}={v}" for k, v in sorted(counts_now.items()))
            if line != last:
                show(run["status"], counts_now, line)
                last = line
            if run["status"] in ("completed", "cancelled"):
                break
            await asyncio.sleep(0.25)
    elapsed = time.monotonic() - started
    counts = run.get("counts", {})
    artifacts = (await client.get(f"/v1/runs/{run_id}/artifacts")).json().get("artifacts", [])
    pngs = await asyncio.to_thread(lambda: sorted(artifact_dir.rglob(f"*/{run_id}/*.png")))
    say("")
    say(f"run {run_id} {run.get('status')} in {elapsed:.1f} s: outcome {run.get('outcome')}")
    say("  tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    timings = run.get("timings") or {}
    if timings.get("p50_task_ms") is not None:
        say(f"  task duration: p50 {timings['p50_task_ms']} ms, p95 {timings['p95_task_ms']} ms")
    say(f"  screenshots: {len(pngs)} PNG files under {artifact_dir} ({len(artifacts)} artifacts recorded)")
    if pngs:
        say(f"  e.g. {pngs[0].relative_to(artifact_dir)}")
    for step in run.get("failing_steps", []):
        say(f"  failing step {step['step_id']}: {step['error_code']} on {step['tasks']} devices")
    if run.get("outcome") == "failed":
        page = (await client.get(f"/v1/runs/{run_id}/tasks", params={"limit": 10, "state": "failed"})).json()
        for t in page.get("tasks", []):
            say(f"  {t['node_id']}/{t['device_serial']}: {t['state']} {t['error']}")
    return run.get("outcome") == "succeeded" and counts.get("succeeded") == expected


class ComponentFailed(RuntimeError):
    pass


@dataclass
class System:
    """A running doai: API address and token, the simulators, and a way to stop it all."""

    api_url: str
    token: str
    sims: list[Simulator]
    stop: asyncio.Event
    parts: Supervisor
    artifact_dir: Path
    started_at: datetime
    command_public_key: str  # what the nodes verify commands with (the seed stays in the backend)
    # node_id -> its simulator's serials (in this process or in the workers).
    devices: dict[str, list[str]] = field(default_factory=dict)
    workers: WorkerFleet | None = None  # --workers N: the worker processes hosting the nodes

    def targets(self) -> list[dict[str, str]]:
        """The (node, serial) pairs of the simulated fleet, as run targets."""
        return [{"node_id": node, "serial": serial} for node, serials in sorted(
            self.devices.items(), key=lambda kv: int(kv[0].removeprefix("node-"))) for serial in serials]

    def client(self, timeout: float = 30.0) -> httpx.AsyncClient:
        """An API client whose idempotent requests survive a dropped keep-alive connection."""
        return httpx.AsyncClient(base_url=self.api_url, headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=timeout, transport=RetryingTransport())

    def failures(self) -> list[str]:
        return [str(self.parts.failure)] if self.parts.failure is not None else []


@asynccontextmanager
async def running_system(opts: UpOptions, infra: Infra, token: str, port: int,
                         stop: asyncio.Event | None = None) -> AsyncIterator[System]:
    """Start backend, aggregator, and per node a simulator and an agent; stop them all on exit.

    Each part runs under one `Supervisor`: a part that fails sets `stop`, so
    the others shut down as usual, and the failure is reported (`System.failures`).
    """
    stop = stop or asyncio.Event()
    sims: list[Simulator] = []
    api_ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    artifact_dir = opts.home / "artifacts"
    started_at = datetime.now(UTC)
    node_secret = opts.node_secret or secrets.token_urlsafe(32)
    settings = BackendSettings(infra.database_url, infra.nats_url, [token], opts.host, port,
                               node_secret=node_secret, artifact_dir=str(artifact_dir),
                               nats_auth_dir=infra.nats_auth_dir, nats_ca=infra.nats_ca,
                               stream_replicas=infra.nats_replicas,
                               command_signing_seed=opts.command_signing_seed
                               or load_or_create_seed(command_key_path(opts.home)))
    aggregator = AggregatorSettings(database_url=infra.database_url, nats_url=infra.nats_url,
                                    nats_creds=str(infra.nats_auth_dir / "aggregator.creds"),
                                    nats_ca=str(infra.nats_ca) if infra.nats_ca else None)
    parts = Supervisor(stop, "doai up", grace_s=15.0)
    body_error: BaseException | None = None
    system: System | None = None
    try:
        async with parts:
            parts.start("backend", lambda: run_backend(settings, stop, on_ready=api_ready.set_result), restart=False)
            parts.start("aggregator", lambda: run_aggregator(aggregator, stop), restart=False)
            with contextlib.suppress(Stopped):
                await unless_stopped(asyncio.shield(api_ready), stop)
            api_url = api_ready.result() if api_ready.done() else ""
            system = System(api_url, token, sims, stop, parts, artifact_dir, started_at,
                            settings.command_public_key)
            if not api_ready.done():
                raise ComponentFailed("; ".join(system.failures()) or "stopped before the API was ready")
            spec = NodeHostSpec(
                nodes=list(range(1, opts.nodes + 1)), devices=opts.devices, slots=opts.slots,
                sim_latency_ms=opts.sim_latency_ms, screen_latency_ms=opts.screen_latency_ms,
                inventory_interval_s=opts.inventory_interval_s, nats_url=infra.nats_url,
                nats_ca=str(infra.nats_ca) if infra.nats_ca else None, api_url=api_url, node_secret=node_secret,
                home=str(opts.home))
            if opts.workers > 0:
                logs = opts.log_file.parent if opts.log_file else opts.home / "logs"
                specs = {k: msgspec.structs.replace(
                    spec, nodes=share, worker=k,
                    log_file=str(logs / f"{opts.log_file.stem}.worker-{k}.jsonl") if opts.log_file else None)
                    for k, share in enumerate(split_nodes(opts.nodes, opts.workers), start=1)}
                workers = system.workers = WorkerFleet(specs, stop, logs)
                try:
                    await workers.start_all()
                except WorkerFailed as exc:
                    raise ComponentFailed(str(exc)) from None
                system.devices.update(workers.devices)
                for k in specs:
                    parts.start(f"worker-{k}", functools.partial(workers.keep, k))  # restarted when it dies
            else:
                system.devices.update(await host_nodes(spec, parts, stop, sims))
            try:
                yield system
            except BaseException as exc:  # stop the parts gracefully first, then let it go on
                body_error = exc
            finally:
                stop.set()
    except LoopFailed:
        pass  # reported through System.failures (the caller decides the exit code)
    finally:
        stop.set()
        if system_workers := (system.workers if system is not None else None):
            await system_workers.close()
        for sim in sims:
            await sim.close()
    if body_error is not None:
        raise body_error


async def up(opts: UpOptions) -> int:
    stop = asyncio.Event()
    install_stop_handlers(stop)
    saved = load_console_state(opts.home)  # the same token and port as the last start of this home
    token = opts.token or saved.get("token") or secrets.token_urlsafe(32)
    port = opts.port if opts.port_given else int(saved.get("api_port") or opts.port)
    if port and not port_free(opts.host, port):
        wanted, port = port, free_port(opts.host)
        log.warning("API port busy; using another", wanted=wanted, port=port)
        say(f"API port {wanted} is busy: using {port}")
    async with infrastructure(opts.home, opts.nats_cluster) as infra:
        try:
            async with running_system(opts, infra, token, port, stop) as system, system.client() as client:
                recipes = await publish_recipes(client)
                await asyncio.to_thread(save_console_state, opts.home, token, httpx.URL(system.api_url).port or port)
                say(f"doai is up: API {system.api_url}  (token: {token})")
                say(f"  NATS {infra.nats_url}" + (f" (streams with {infra.nats_replicas} replicas)"
                                                   if infra.nats_replicas > 1 else ""))
                if infra.pg_tcp_url is not None:
                    # The embedded PostgreSQL's TCP address for psql and Grafana; its password stays in the file.
                    say(f"  PostgreSQL {infra.pg_tcp_url}  (psql: PGPASSFILE={infra.pg_pgpass} psql "
                        f"{infra.pg_tcp_url}; password in {opts.home / 'keys' / 'postgres.password'})")
                else:
                    say("  PostgreSQL from DATABASE_URL")
                for note in infra.notes:
                    say(f"  {note}")
                say(f"  NATS credentials under {infra.nats_auth_dir} (read-only tap: "
                    f"{infra.nats_auth_dir / 'tap.creds'}); nodes enroll once, credentials under {opts.home / 'node'}")
                if infra.embedded and infra.nats_ca is not None:
                    say(f"  NATS over TLS: clients verify the servers with DOAI_NATS_CA={infra.nats_ca}")
                say(f"  {opts.nodes} node(s) x {opts.devices} simulated devices, {opts.slots} slots each; "
                    f"recipes: {', '.join(recipes)}")
                if system.workers is not None:
                    say(f"  nodes and simulators in {len(system.workers.specs)} worker processes "
                        f"(pids {' '.join(str(p) for p in system.workers.pids())})")
                if opts.log_file is not None:
                    say(f"  logs (JSON lines): {opts.log_file}   token and API port kept in "
                        f"{console_state_path(opts.home)}")
                say(f"  operator CLI: DOAI_API_URL={system.api_url} DOAI_API_TOKEN=... doai runs ls")
                if opts.demo:
                    ok = await run_demo(client, opts, system)
                    return 0 if ok else 1
                say("press Ctrl-C to stop")
                await stop.wait()
                say("stopping: the parts, then the embedded servers (a few seconds at most)")
                failures = system.failures()
        except ComponentFailed as exc:
            failures = [str(exc)]
        except httpx.HTTPError as exc:  # the API stayed unreachable through the retries: one line, no traceback
            say(f"the API did not answer: {type(exc).__name__}: {exc}")
            failures = [f"API request failed: {exc!r}"]
        for failure in failures:
            log.error("component failed", failure=failure)
            sys.stderr.write(f"doai up: {failure}\n")
        return 1 if failures else 0
