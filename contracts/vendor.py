"""The vendor device-control protocol, shared by the node's client and the simulator.

What is here is the protocol itself (docs/vendor.md has the evidence behind it):
the envelope, the result codes, the licence text, the action names doai and the
simulator know, the event type codes, the one-device serial rule, and the names
of the response variants a tolerant client accepts (the simulator can produce
each, the client records each it sees).

No request id exists: a response cannot be matched to its request by content.
"""

from __future__ import annotations

import enum
from typing import Any

from msgspec import Struct

from contracts.ids import is_serial

DEFAULT_URL = "ws://127.0.0.1:22222/"
SUCCESS = 10000
FAILURE = 10001
LICENCE_MESSAGE = "请激活会员后使用"
"""The failure text when the program's licence is not activated."""
UNKNOWN_ACTION_MESSAGE = "invalid action"
"""What the program answers (10001) to an action name it does not know."""
DEFAULT_SCREEN_FOLDER = r"D:\Pictures"
"""Where the program documents writing screenshots when `screen` has no `savePath`."""
WIFI_ADB_PORT = 5555


class Action(enum.StrEnum):
    """Action names (the program compares them case-insensitively)."""

    LIST = "list"
    ADB_SHELL = "adb_shell"
    ADB = "adb"
    XIAOWEI_ADB = "xiaowei.adb"
    SCREEN = "screen"
    POINTER_EVENT = "pointerEvent"
    PUSH_EVENT = "pushEvent"
    START_APK = "startApk"
    STOP_APK = "stopApk"
    INSTALL_APK = "installApk"
    UNINSTALL_APK = "uninstallApk"
    APK_LIST = "apkList"
    IME_LIST = "imeList"
    SELECT_IME = "selectIme"
    INPUT_TEXT = "inputText"
    WRITE_CLIPBOARD = "writeClipBoard"
    PULL_FILE = "pullFile"
    UPDATE_DEVICES = "updateDevices"
    ACTION_CREATE = "actionCreate"
    AUTOJS_CREATE = "autojsCreate"
    AUTOJS_TASKS = "autojsTasks"
    AUTOJS_REMOVE = "autojsRemove"


class PushEvent(enum.IntEnum):
    """`pushEvent` `data.type` (sent as a string)."""

    RECENTS = 1
    HOME = 2
    BACK = 3


class PointerEvent(enum.IntEnum):
    """`pointerEvent` `data.type` (sent as a string); 6-9 need no x/y."""

    PRESS = 0
    RELEASE = 1
    MOVE = 2
    WHEEL_UP = 4
    WHEEL_DOWN = 5
    SWIPE_UP = 6
    SWIPE_DOWN = 7
    SWIPE_LEFT = 8
    SWIPE_RIGHT = 9


class DeviceMode(enum.IntEnum):
    """`list` `mode`: how the phone is connected (10-12 are cloud phones)."""

    USB = 0
    WIFI = 1
    OTG = 2
    ACCESSIBILITY = 3


class Request(Struct, omit_defaults=True):
    """One request frame. doai always sends `devices` as exactly one serial (or none for `list`)."""

    action: str
    devices: str | None = None
    data: Any = None


class Response(Struct):
    """One response frame as the documentation shows it (the simulator's default dialect)."""

    code: int
    message: str
    data: Any = None


class Variant(enum.StrEnum):
    """Response shapes besides the documented one that the client accepts (and records).

    Each is normalised in one place on the node (`services/node/vendor_decode.py`);
    the simulator produces each on request (`SimulatorConfig.deviations`).
    """

    SHELL_STRING = "shell_string"
    """`adb_shell` `data` is the output text itself, not `{serial: text}`."""
    SHELL_NULL = "shell_null"
    """`adb_shell` `data` is null (no output)."""
    DATA_RESULT = "data_result"
    """`data` is wrapped: `{"result": <data>}`."""
    LIST_KEYED = "list_keyed"
    """`list` `data` is an object keyed by serial instead of an array."""
    MSG_FIELD = "msg_field"
    """The text is in `msg` instead of `message`."""
    CODE_STRING = "code_string"
    """`code` is a string of digits ("10000")."""
    NO_CODE = "no_code"
    """A success answer carries no `code` at all."""
    CODE_ZERO = "code_zero"
    """Success is `code` 0 (or 200) instead of 10000."""
    CODE_OTHER = "code_other"
    """A code other than the success codes and 10001: a failure carrying that code."""


SUCCESS_CODES: frozenset[int] = frozenset({SUCCESS, 0, 200})


def check_serial(serial: str) -> str:
    """Return `serial` if it names exactly one device, else raise ValueError.

    doai never addresses `all` devices or a comma-separated list (DESIGN rule 6).
    A Wi-Fi phone's `IP:PORT` is one device.
    """
    if not isinstance(serial, str):
        raise ValueError(f"serial must be a string, not {type(serial).__name__}")
    if not serial.strip():
        raise ValueError("serial must not be empty")
    if serial.strip().lower() == "all":
        raise ValueError("refusing to address 'all' devices: send exactly one serial")
    if "," in serial:
        raise ValueError(f"refusing a list of serials {serial!r}: send exactly one serial")
    if not is_serial(serial):
        raise ValueError(f"{serial!r:.80} is not a device serial (letters, digits, '.', '_', ':', '-')")
    return serial


def is_wifi_serial(serial: str) -> bool:
    """True for an `IP:PORT` serial (a phone attached over Wi-Fi adb)."""
    host, sep, port = serial.rpartition(":")
    return bool(sep) and port.isdigit() and host.count(".") == 3 and all(
        part.isdigit() for part in host.split("."))
