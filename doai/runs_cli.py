"""`doai runs`: create, list, show, watch, cancel and retry runs over the REST API.

Talks only to the API (`DOAI_API_URL`, `DOAI_API_TOKEN`, or `--api-url`, `--token`). `--json` prints one
JSON document on stdout for scripts. `watch` exits 0 when every device succeeded, 1 when the run ended
otherwise (failed devices, cancelled), 2 on errors (API unreachable, unknown run, bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from contracts.events import RecordedTaskState
from doai.api_client import Api, ApiError, Progress, progress

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
STATE_ORDER: tuple[RecordedTaskState, ...] = (
    "succeeded", "failed", "timed_out", "lost", "cancelled", "skipped", "interrupted", "running", "queued")
STATE_STYLE: dict[RecordedTaskState, str] = {
    "succeeded": "green", "failed": "red", "timed_out": "red", "lost": "red", "cancelled": "yellow",
    "skipped": "yellow", "interrupted": "yellow", "running": "cyan", "queued": "dim"}


class UsageError(Exception):
    """A bad argument value (exit 2)."""


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err(message: str) -> int:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]doai runs:[/red] {message}", markup=True)
    return EXIT_ERROR


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"{what} {item!r}: write NAME=VALUE")
        out.append((name, value))
    return out


def _param_value(spec: dict[str, Any] | None, name: str, text: str) -> Any:
    kind = (spec or {}).get("type", "string")
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"param {name} is an integer, not {text!r}") from None
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise UsageError(f"param {name} is true or false, not {text!r}")
        return text.lower() == "true"
    return text


def create_body(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    """The `POST /v1/runs` body from the command line (params typed by the workflow's declared params)."""
    body: dict[str, Any] = {"workflow_id": args.workflow}
    if args.version is not None:
        body["workflow_version"] = args.version
    pairs = _pairs(args.param, "param")
    if pairs:
        try:
            specs = api.workflow(args.workflow, args.version).get("recipe", {}).get("params", {})
        except ApiError as err:
            if err.status != 404:
                raise
            specs = {}  # the API answers the unknown workflow itself, below
        body["params"] = {name: _param_value(specs.get(name), name, value) for name, value in pairs}
    timeouts: dict[str, int] = {}
    for step, ms in _pairs(args.step_timeout, "--step-timeout"):
        if not ms.isdigit():
            raise UsageError(f"--step-timeout {step}={ms}: milliseconds, a whole number")
        timeouts[step] = int(ms)
    if timeouts:
        body["step_timeouts_ms"] = timeouts
    if args.all_online:
        body["targets"] = {"all_online": True}
    elif args.node:
        body["targets"] = {"nodes": args.node}
    else:
        devices = []
        for ref in args.device:
            node_id, sep, serial = ref.partition("/")
            if not sep or not node_id or not serial:
                raise UsageError(f"--device {ref!r}: write NODE/SERIAL")
            devices.append({"node_id": node_id, "serial": serial})
        body["targets"] = {"devices": devices}
    return body


# -- rendering ------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _counts_text(counts: dict[RecordedTaskState, int]) -> Text:
    text = Text()
    for state in sorted(counts, key=lambda s: (STATE_ORDER.index(s) if s in STATE_ORDER else 99, s)):
        if text:
            text.append("  ")
        text.append(f"{state} {counts[state]}", style=STATE_STYLE.get(state, ""))
    return text


def render_progress(p: Progress) -> Group:
    now = datetime.now(UTC)
    head = Text(f"run {p.run_id}  {p.workflow}  ", style="bold")
    head.append(p.status if p.outcome is None else f"{p.status} ({p.outcome})",
                style={"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(p.outcome or "", "cyan"))
    bar = ProgressBar(total=max(p.targets, 1), completed=p.done, width=40)
    line = Text(f" {p.done}/{p.targets}  elapsed {_duration(p.elapsed_s(now))}  "
                f"rate {p.rate(now):.1f}/s  ETA {_duration(p.eta_s(now))}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("node")
    table.add_column("tasks", justify="right")
    table.add_column("states")
    for node_id in sorted(p.nodes):
        table.add_row(node_id, str(sum(p.nodes[node_id].values())), _counts_text(p.nodes[node_id]))
    parts: list[Any] = [head, Group(bar, line), _counts_text(p.counts)]
    if p.nodes:
        parts.append(table)
    return Group(*parts)


def _progress_line(p: Progress) -> str:
    counts = " ".join(f"{k}={v}" for k, v in sorted(p.counts.items()))
    return (f"run {p.run_id} {p.status} {p.done}/{p.targets} {counts} elapsed {_duration(p.elapsed_s())}"
            f" rate {p.rate():.1f}/s eta {_duration(p.eta_s())}")


# -- commands -------------------------------------------------------------------------


def watch(api: Api, run_id: str, interval_s: float, as_json: bool, timeout_s: float | None = None) -> int:
    console = _out()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    p = progress(api.run(run_id))
    if as_json:
        while not p.finished:
            if deadline is not None and time.monotonic() > deadline:
                return _err(f"run {run_id} did not finish within {timeout_s:g} s")
            time.sleep(interval_s)
            p = progress(api.run(run_id))
        _print_json(p.to_dict())
        return p.exit_code()
    if console.is_terminal:
        with Live(render_progress(p), console=console, refresh_per_second=4, transient=False) as live:
            while not p.finished:
                if deadline is not None and time.monotonic() > deadline:
                    return _err(f"run {run_id} did not finish within {timeout_s:g} s")
                time.sleep(interval_s)
                p = progress(api.run(run_id))
                live.update(render_progress(p))
    else:  # a CI log: one line per change
        last = ""
        while True:
            line = _progress_line(p)
            if line.split(" elapsed")[0] != last:
                console.print(line)
                last = line.split(" elapsed")[0]
            if p.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                return _err(f"run {run_id} did not finish within {timeout_s:g} s")
            time.sleep(interval_s)
            p = progress(api.run(run_id))
    console.print(f"run {p.run_id} {p.outcome}: {p.counts.get('succeeded', 0)} of {p.targets} devices succeeded"
                  f" in {_duration(p.elapsed_s())}")
    return p.exit_code()


def cmd_create(api: Api, args: argparse.Namespace) -> int:
    created = api.create_run(create_body(api, args), args.idempotency_key)
    return _after_create(api, args, created)


def _after_create(api: Api, args: argparse.Namespace, created: dict[str, Any]) -> int:
    if args.watch:
        if not args.json:
            _out().print(f"run {created['run_id']} created: {created['targets']} device(s)")
        code = watch(api, created["run_id"], args.interval, args.json, args.timeout)
        return code
    if args.json:
        _print_json(created)
    else:
        console = _out()
        console.print(f"run {created['run_id']} created: {created['targets']} device(s)")
        for r in created.get("rejected") or []:
            console.print(f"  not targeted: {r}")
    return EXIT_OK


def cmd_ls(api: Api, args: argparse.Namespace) -> int:
    runs = api.list_runs(args.status, args.workflow, args.limit)
    if args.json:
        _print_json(runs)
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    for col in ("run", "workflow", "status", "devices", "states", "created"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["run_id"], f"{r['workflow_id']}@{r['workflow_version']}", r["status"],
                      str(r.get("targets", "")), _counts_text(r.get("counts") or {}), r["created_at"])
    _out().print(table)
    return EXIT_OK


def cmd_show(api: Api, args: argparse.Namespace) -> int:
    run = api.run(args.run)
    tasks = api.tasks(args.run, args.state, args.node, args.serial, args.limit) if args.tasks else None
    if args.json:
        doc = dict(run)
        if tasks is not None:
            doc["tasks"] = tasks
        _print_json(doc)
        return EXIT_OK
    p = progress(run)
    console = _out()
    console.print(render_progress(p))
    if p.parent_run_id:
        console.print(f"retry of {p.parent_run_id}")
    for child in run.get("retry_run_ids") or []:
        console.print(f"retried by {child}")
    if run.get("params"):
        console.print("params: " + ", ".join(f"{k}={v}" for k, v in sorted(run["params"].items())))
    for f in run.get("failing_steps") or []:
        console.print(f"failing step {f['step_id']}: {f.get('error_code')} x{f['tasks']}")
    if tasks is not None:
        table = Table(box=None, header_style="bold")
        for col in ("node", "device", "state", "failed step", "error"):
            table.add_column(col)
        for t in tasks:
            table.add_row(t["node_id"], t["device_serial"], Text(t["state"], style=STATE_STYLE.get(t["state"], "")),
                          t.get("failed_step") or "", (t.get("error") or "")[:120])
        console.print(table)
    return EXIT_OK


def cmd_watch(api: Api, args: argparse.Namespace) -> int:
    return watch(api, args.run, args.interval, args.json, args.timeout)


def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    cancelled = api.cancel(args.run)
    if args.json:
        _print_json(cancelled)
    else:
        _out().print(f"run {cancelled['run_id']} cancelled ({cancelled['nodes']} node(s) told)")
    return EXIT_OK


def cmd_retry(api: Api, args: argparse.Namespace) -> int:
    states = [s.strip() for s in args.states.split(",") if s.strip()]
    created = api.retry(args.run, states, args.idempotency_key)
    return _after_create(api, args, created)


COMMANDS = {"create": cmd_create, "ls": cmd_ls, "show": cmd_show, "watch": cmd_watch, "cancel": cmd_cancel,
            "retry": cmd_retry}


def main(args: argparse.Namespace) -> int:
    try:
        with Api(args.api_url, args.token) as api:
            return COMMANDS[args.runs_command](api, args)
    except UsageError as exc:
        return _err(str(exc))
    except ApiError as exc:
        if args.json:
            _print_json({"error": {"status": exc.status, "code": exc.code, "message": exc.message,
                                   "details": exc.details}})
        return _err(str(exc))
    except KeyboardInterrupt:
        return 130
