"""Tolerant decoding of the vendor program's answers: every accepted variant is normalised here.

Nobody here has seen the real program's answers, and an earlier client of the
same program accepted more shapes than the documented one (see docs/vendor.md).
Each function below takes the raw value, returns the normalised value and the
set of `Variant`s it had to tolerate, or raises `ShapeError` for a shape it does
not know. The client turns a `ShapeError` into a `VendorProtocolError` for that
one request and logs each (action, reason) once; it counts every variant seen.

Accepted variants (`contracts.vendor.Variant`):

* envelope: `code` as a digit string; no `code` (success, unless the text is
  the licence message); success as 0 or 200; any other code is a failure that
  carries it; the text in `msg` instead of `message`; `data` wrapped as
  `{"result": ...}`;
* `adb_shell`: `data` as `{serial: text}` (documented), the text itself, or
  null (no output); a one-entry object keyed by another name for the device;
* `list`: an array of devices (documented) or an object keyed by serial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from contracts.events import DeviceInfo
from contracts.ids import is_serial
from contracts.vendor import FAILURE, LICENCE_MESSAGE, SUCCESS, SUCCESS_CODES, Variant
from services.node.errors import NodeError

RAW_LIMIT = 300
"""How much of a raw answer an error message carries."""


class ShapeError(NodeError):
    """An answer whose shape the client does not know; `reason` is stable per shape (logged once).

    The client turns it into a `VendorProtocolError` (same code) that names the action."""

    code = "vendor_protocol_error"

    def __init__(self, reason: str, raw: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def clip_raw(raw: Any) -> str:
    """The raw answer as text, truncated for an error message or a log line."""
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    elif isinstance(raw, str):
        text = raw
    else:
        try:
            text = msgspec.json.encode(raw).decode()
        except (TypeError, msgspec.EncodeError):
            text = repr(raw)
    return text if len(text) <= RAW_LIMIT else text[:RAW_LIMIT] + "…"


_NONE: frozenset[Variant] = frozenset()


@dataclass(slots=True)
class Reply:
    """One answer, normalised."""

    ok: bool
    code: int | None
    message: str
    data: Any
    licence: bool = False
    variants: frozenset[Variant] = _NONE


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def decode_reply(raw: str | bytes) -> Reply:
    """The envelope of one answer frame."""
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ShapeError("the answer is not JSON", raw) from None
    if not isinstance(obj, dict):
        raise ShapeError(f"the answer is a JSON {_type(obj)}, not an object", raw)
    variants: set[Variant] | None = None

    code: int | None
    raw_code = obj.get("code")
    if "code" not in obj or raw_code is None:
        code = None
    elif isinstance(raw_code, bool) or not isinstance(raw_code, int | str):
        raise ShapeError(f"code is a {_type(raw_code)}", raw)
    elif isinstance(raw_code, str):
        if not raw_code.strip().lstrip("-").isdigit():
            raise ShapeError("code is a string that is not a number", raw)
        code = int(raw_code)
        variants = {Variant.CODE_STRING}
    else:
        code = raw_code

    text: Any = obj.get("message")
    if text is None and obj.get("msg") is not None:
        text = obj["msg"]
        variants = (variants or set()) | {Variant.MSG_FIELD}
    message = "" if text is None else text if isinstance(text, str) else clip_raw(text)

    data = obj.get("data")
    if isinstance(data, dict) and len(data) == 1 and "result" in data:
        data = data["result"]
        variants = (variants or set()) | {Variant.DATA_RESULT}

    licence = message.strip() == LICENCE_MESSAGE
    if licence:
        ok = False
    elif code is None:
        ok = True
        variants = (variants or set()) | {Variant.NO_CODE}
    elif code in SUCCESS_CODES:
        ok = True
        if code != SUCCESS:
            variants = (variants or set()) | {Variant.CODE_ZERO}
    else:
        ok = False
        if code != FAILURE:
            variants = (variants or set()) | {Variant.CODE_OTHER}
    return Reply(ok, code, message, data, licence, frozenset(variants) if variants else _NONE)


def shell_text(data: Any, serial: str) -> tuple[str, frozenset[Variant]]:
    """The stdout of an `adb_shell` on `serial`."""
    if data is None:
        return "", frozenset({Variant.SHELL_NULL})
    if isinstance(data, str):
        return data, frozenset({Variant.SHELL_STRING})
    if not isinstance(data, dict):
        raise ShapeError(f"adb_shell data is a {_type(data)}", data)
    if serial in data:
        value = data[serial]
    elif len(data) == 1:
        value = next(iter(data.values()))  # keyed by another name of the same phone (serial vs onlySerial)
    else:
        raise ShapeError("adb_shell data has no entry for the device", data)
    if value is None:
        return "", _NONE
    if not isinstance(value, str):
        raise ShapeError(f"adb_shell output is a {_type(value)}", data)
    return value, _NONE


def device_entries(data: Any) -> tuple[list[dict[str, Any]], frozenset[Variant]]:
    """The device objects of a `list` answer (an empty list may mean the program is restarting)."""
    if data is None:
        return [], _NONE
    if isinstance(data, list):
        if not all(isinstance(d, dict) for d in data):
            raise ShapeError("list data has an element that is not an object", data)
        return data, _NONE
    if isinstance(data, dict):
        if not all(isinstance(d, dict) for d in data.values()):
            raise ShapeError("list data is an object whose values are not devices", data)
        entries = [{"serial": key, "onlySerial": key, **value} for key, value in data.items()]
        return entries, frozenset({Variant.LIST_KEYED})
    raise ShapeError(f"list data is a {_type(data)}", data)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def device_info(entry: dict[str, Any]) -> DeviceInfo | None:
    """doai's view of one listed device, keyed by the stable `onlySerial`; None if it has no usable serial."""
    serial = str(entry.get("onlySerial") or entry.get("serial") or "")
    if not is_serial(serial):
        return None
    return DeviceInfo(
        serial=serial, status=str(entry.get("status") or "unknown"), model=str(entry.get("model") or ""),
        name=str(entry.get("name") or ""), mode=_int(entry.get("mode")), width=_int(entry.get("width")),
        height=_int(entry.get("height")),
    )
