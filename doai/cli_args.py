"""The `doai runs` and `doai tap` command lines (argparse only: `doai --help` needs no operator package)."""

from __future__ import annotations

import argparse
from typing import Any

from contracts.api import RUN_STATUSES
from contracts.events import RECORDED_TASK_STATES


def add_runs_parser(sub: Any) -> argparse.ArgumentParser:
    """`doai runs ...` under the main parser's subcommands."""
    runs = sub.add_parser("runs", help="create, list, show, watch, cancel and retry runs (REST API)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api-url", help="the API (default: DOAI_API_URL, else http://127.0.0.1:8000)")
    common.add_argument("--token", help="operator token (default: DOAI_API_TOKEN)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    rsub = runs.add_subparsers(dest="runs_command", required=True)

    watching = argparse.ArgumentParser(add_help=False)
    watching.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    watching.add_argument("--timeout", type=float, default=None, help="give up (exit 2) after this many seconds")

    c = rsub.add_parser("create", parents=[common, watching], help="start a run of a workflow")
    c.add_argument("workflow")
    c.add_argument("--version", type=int, help="workflow version (default: the latest)")
    c.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE")
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--all-online", action="store_true", help="every online device")
    target.add_argument("--node", action="append", metavar="ID", help="every online device of this node")
    target.add_argument("--device", action="append", metavar="NODE/SERIAL", help="one device")
    c.add_argument("--step-timeout", action="append", default=[], metavar="STEP=MS")
    c.add_argument("--idempotency-key", metavar="K", help="the same key and body give the same run again")
    c.add_argument("--watch", action="store_true", help="then watch it (exit code as `watch`)")

    ls = rsub.add_parser("ls", parents=[common], help="list runs, newest first")
    ls.add_argument("--status", choices=RUN_STATUSES)
    ls.add_argument("--workflow")
    ls.add_argument("--limit", type=int, default=20)

    show = rsub.add_parser("show", parents=[common], help="a run's summary (--tasks: its devices)")
    show.add_argument("run")
    show.add_argument("--tasks", action="store_true", help="list the run's tasks")
    show.add_argument("--state", choices=RECORDED_TASK_STATES, help="only tasks in this state")
    show.add_argument("--node", help="only tasks of this node")
    show.add_argument("--serial", help="only the task of this device")
    show.add_argument("--limit", type=int, default=200)

    w = rsub.add_parser("watch", parents=[common, watching],
                        help="live progress until the run ends (exit 0 all succeeded, 1 otherwise, 2 errors)")
    w.add_argument("run")

    x = rsub.add_parser("cancel", parents=[common], help="cancel a run")
    x.add_argument("run")

    rt = rsub.add_parser("retry", parents=[common, watching],
                         help="a new run over the devices of a finished run in some states")
    rt.add_argument("run")
    rt.add_argument("--states", default="failed,timed_out,lost", help="comma-separated (default failed,timed_out,lost)")
    rt.add_argument("--idempotency-key", metavar="K")
    rt.add_argument("--watch", action="store_true", help="then watch the new run")
    return runs  # type: ignore[no-any-return]


def add_tap_parser(sub: Any) -> argparse.ArgumentParser:
    """`doai tap ...`: follow events live from NATS."""
    tap = sub.add_parser("tap", help="follow events live from NATS (read-only tap identity)")
    tap.add_argument("--run", metavar="ID", help="only this run's task, step and artifact events")
    tap.add_argument("--node", metavar="ID", help="only this node's events")
    tap.add_argument("--device", metavar="SERIAL", help="only this device's events")
    tap.add_argument("--kind", metavar="K,K", help="task, step, artifact, device, node (comma-separated)")
    tap.add_argument("--json", action="store_true", help="one JSON object per line: subject and event")
    tap.add_argument("--nats-url", help="default: NATS_URL, else nats://127.0.0.1:4222")
    tap.add_argument("--creds", help="tap credentials (default: DOAI_NATS_CREDS, else DOAI_HOME/nats-auth/tap.creds)")
    tap.add_argument("--max", type=int, default=0, metavar="N", help="stop after N events")
    return tap  # type: ignore[no-any-return]
