"""`doai tap`: follow events live from NATS, filtered by run, node, device and kind.

The run, node and kind filters are subject filters (`contracts.subjects.evt_filters`): NATS sends only the
matching events. The device filter is applied here (a serial is not a subject token). Connects with the
read-only tap identity: `--creds`, else `DOAI_NATS_CREDS`, else `DOAI_HOME/nats-auth/tap.creds` when it
exists (`doai up` makes it). Live only: events published before the tap started are not shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any, cast

import msgspec

from contracts.events import ArtifactEvent, DeviceInventoryEvent, Event, NodeHeartbeat, StepEvent, TaskEvent
from contracts.subjects import EVENT_KINDS, EventKind, evt_filters, role_inbox_prefix
from runtime import aio
from runtime.jetstream import server_urls, tls_options
from runtime.stopping import install_stop_handlers

_decoder = msgspec.json.Decoder(Event)
CONNECT_TIMEOUT_S = 8.0


def creds_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    if env := os.environ.get("DOAI_NATS_CREDS"):
        return Path(env)
    default = Path(os.environ.get("DOAI_HOME", "var")) / "nats-auth" / "tap.creds"  # where `doai up` makes it
    return default if default.exists() else None


def line(event: Event) -> str:
    """One human-readable line per event."""
    ts = event.ts.strftime("%H:%M:%S.%f")[:-3]
    if isinstance(event, TaskEvent):
        extra = f" error={event.error}" if event.error else ""
        return f"{ts} {event.node_id} {event.device_serial} run {event.run_id[:8]} task {event.state}{extra}"
    if isinstance(event, StepEvent):
        extra = f" error={event.error}" if event.error else ""
        return (f"{ts} {event.node_id} {event.device_serial} run {event.run_id[:8]} step {event.index}"
                f" {event.step_id} ({event.action}) {event.state}{extra}")
    if isinstance(event, ArtifactEvent):
        return (f"{ts} {event.node_id} {event.device_serial} run {event.run_id[:8]} artifact {event.step_id}"
                f" {event.store}:{event.key} {event.bytes} B")
    if isinstance(event, DeviceInventoryEvent):
        return f"{ts} {event.node_id} devices {len(event.devices)}"
    if isinstance(event, NodeHeartbeat):
        return f"{ts} {event.node_id} heartbeat running {event.running}/{event.slots} queued {event.queued}"
    return f"{ts} {event.node_id} {type(event).__name__}"  # pragma: no cover


def _matches_device(event: Event, serial: str | None) -> bool:
    return serial is None or getattr(event, "device_serial", None) == serial


async def tap(args: argparse.Namespace, stop: asyncio.Event) -> int:
    import nats

    kinds: tuple[EventKind, ...] | None = None
    if args.kind:
        wanted = [k.strip() for k in args.kind.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in EVENT_KINDS]
        if unknown:
            sys.stderr.write(f"doai tap: unknown kind(s) {', '.join(unknown)}; known: {', '.join(EVENT_KINDS)}\n")
            return 2
        kinds = cast(tuple[EventKind, ...], tuple(wanted))
    if args.device and kinds is None:
        kinds = ("task", "step", "artifact")  # device and node events are not about one device
    filters = evt_filters(run_id=args.run, node_id=args.node, kinds=kinds)
    if not filters:
        sys.stderr.write("doai tap: --run selects task, step and artifact events only\n")
        return 2
    url = args.nats_url or os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"
    options: dict[str, Any] = {"allow_reconnect": True, "max_reconnect_attempts": -1, "connect_timeout": 5,
                               "inbox_prefix": role_inbox_prefix("tap")}
    creds = creds_path(args.creds)
    if creds is not None:
        options["user_credentials"] = str(creds)
    options.update(tls_options(url, os.environ.get("DOAI_NATS_CA")))  # `doai up --nats-cluster`: its CA file
    async def quiet(_: Exception) -> None:  # nats-py would log every failed attempt
        return None

    try:
        # nats-py keeps retrying a refused first connect when reconnects are allowed: bound it.
        nc = await asyncio.wait_for(nats.connect(server_urls(url), error_cb=quiet, **options),
                                    CONNECT_TIMEOUT_S)
    except TimeoutError:
        sys.stderr.write(f"doai tap: cannot connect to {url} within {CONNECT_TIMEOUT_S:g} s\n")
        return 2
    except Exception as exc:  # noqa: BLE001 - nats-py raises several unrelated types on connect
        sys.stderr.write(f"doai tap: cannot connect to {url}: {exc or type(exc).__name__}\n")
        return 2
    out = sys.stdout
    shown = 0

    async def on_message(msg: Any) -> None:
        nonlocal shown
        try:
            event = _decoder.decode(msg.data)
        except msgspec.DecodeError:
            sys.stderr.write(f"doai tap: undecodable message on {msg.subject}\n")
            return
        if not _matches_device(event, args.device):
            return
        if args.json:
            out.write(msgspec.json.encode({"subject": msg.subject, "event": event}).decode() + "\n")
        else:
            out.write(line(event) + "\n")
        out.flush()
        shown += 1
        if args.max and shown >= args.max:
            stop.set()

    try:
        for subject in filters:
            await nc.subscribe(subject, cb=on_message)
        await nc.flush()
        sys.stderr.write(f"doai tap: listening on {' '.join(filters)}\n")
        sys.stderr.flush()
        await stop.wait()
    finally:
        try:
            await nc.drain()
        except Exception:  # noqa: BLE001 - closing a connection that was lost
            pass
    return 0


def main(args: argparse.Namespace) -> int:
    async def runner() -> int:
        stop = asyncio.Event()
        restore = install_stop_handlers(stop)
        try:
            return await tap(args, stop)
        finally:
            restore()

    try:
        return aio.run(runner())
    except KeyboardInterrupt:
        return 0
