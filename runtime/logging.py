"""structlog set-up that renders the context of DESIGN.md rule 9.

Console lines look like
`[run_id=… node_id=node-A1 device_serial=ABC123] Task started  step=shot`;
with `DOAI_LOG_FORMAT=json` every line is a JSON object with the same fields.
`DOAI_LOG_FILE` additionally appends JSON lines to a file (tests read it).
Context is bound with `structlog.contextvars.bound_contextvars(...)`, so it
follows each asyncio task.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, WrappedLogger

CONTEXT_KEYS = ("run_id", "node_id", "device_serial")
_REDACTED_KEYS = frozenset({"secret", "token", "password", "authorization", "x-node-auth"})


def _redact(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    for key in list(event):
        if key.lower() in _REDACTED_KEYS:
            event[key] = "***"
    return event


_with_traceback = structlog.processors.format_exc_info


_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """`value` with everything but JSON's own types (recursing into dicts, lists and tuples) as its repr, as
    structlog's encoder writes them. msgspec alone would write a Struct's or a dataclass's fields one by one,
    past a `__repr__` that hides secrets (`runtime.config.Settings`)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k if isinstance(k, _PLAIN) else repr(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return repr(value)


def _json_line(event: EventDict, **_: Any) -> str:
    """One JSON log line, encoded by msgspec (several times faster than the standard library's `json`: a node
    logs each step of each device)."""
    try:
        return msgspec.json.encode(_plain(event)).decode()
    except (TypeError, ValueError, RecursionError):  # a log line is never worth an exception in the caller
        return json.dumps(event, default=repr)


def _context_prefix(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    parts = [f"{k}={event.pop(k)}" for k in CONTEXT_KEYS if k in event]
    if parts:
        event["event"] = f"[{' '.join(parts)}] {event.get('event', '')}"
    return event




def configure_logging(level: str | None = None, fmt: str | None = None, log_file: str | None = None,
                      console: bool = True) -> None:
    """`console=False`: log lines go only to `log_file` (the quiet console of `doai up`)."""
    level_name = (level or os.environ.get("DOAI_LOG_LEVEL", "info")).upper()
    fmt = fmt or os.environ.get("DOAI_LOG_FORMAT", "console")
    log_file = log_file or os.environ.get("DOAI_LOG_FILE")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    file_renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    console_renderer: Any
    if fmt == "json":
        console_renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    else:
        # plain_traceback: structlog's default (rich, when installed) prints every frame's local variables,
        # and a local can be a secret (a DSN with its password, the enrollment secret, a seed).
        console_renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                         exception_formatter=structlog.dev.plain_traceback)

    def render(logger: WrappedLogger, name: str, event: EventDict) -> str:
        if log_file:
            # `log.exception(...)`: the traceback goes into the JSON line as `exception` (text).
            line = file_renderer(logger, name, _with_traceback(logger, name, dict(event)))
            _file_sink(log_file).write((line.decode() if isinstance(line, bytes) else line) + "\n")
        if not console:
            raise structlog.DropEvent
        if fmt != "json":
            event = _context_prefix(logger, name, event)  # the console renderer prints a traceback itself
        else:
            event = _with_traceback(logger, name, event)
        rendered: str = console_renderer(logger, name, event)
        return rendered

    structlog.configure(
        processors=[*shared, render],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level_name) if level_name in logging._nameToLevel else 20
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (uvicorn, nats) go to stderr plainly.
    if console or not log_file:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, stream=_file_sink(log_file), format="%(name)s: %(message)s",
                            force=True)


_sinks: dict[str, TextIO] = {}


def _file_sink(path: str) -> TextIO:
    sink = _sinks.get(path)
    if sink is None:
        sink = _sinks[path] = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
    return sink
