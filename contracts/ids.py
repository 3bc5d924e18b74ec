"""Identifier rules shared by every part (they end up in NATS subjects and file paths)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

# Node ids become a NATS subject token and a path segment: no dots, wildcards,
# spaces or slashes.
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
# Serials come from the vendor (`onlySerial`) or adb; Wi-Fi devices look like IP:PORT.
SERIAL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
WORKFLOW_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

_NODE_ID = re.compile(NODE_ID_PATTERN)
_SERIAL = re.compile(SERIAL_PATTERN)


def is_node_id(value: str) -> bool:
    return bool(_NODE_ID.fullmatch(value))  # `match` with `$` would allow a trailing "\n"


def is_serial(value: str) -> bool:
    return bool(_SERIAL.fullmatch(value))


def is_run_id(value: str) -> bool:
    """A run id is a UUID in canonical form (lower-case, hyphenated): it becomes a path segment on nodes."""
    try:
        return str(uuid.UUID(value)) == value
    except (ValueError, TypeError, AttributeError):
        return False


def new_id() -> str:
    """A fresh random id (event ids, run ids)."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)
