"""Per-device state of the simulated phones, and the adb shell emulation.

Everything here is synchronous and side-effect free apart from mutating the
``SimDevice`` (the server does the file writing and the latency).
"""

from __future__ import annotations

import functools
import shlex
import zlib
from dataclasses import dataclass, field
from typing import Any

from .png import make_png

LAUNCHER = "com.android.launcher3"
RECENTS = "com.android.systemui"
BROWSER = "com.android.chrome"

DEFAULT_PACKAGES: tuple[str, ...] = (
    LAUNCHER,
    RECENTS,
    BROWSER,
    "com.android.settings",
    "com.google.android.youtube",
    "com.android.vending",
    "com.google.android.gm",
    "com.google.android.apps.maps",
    "com.instagram.android",
    "com.zhiliaoapp.musically",
)

#: (model, marketing name, width, height, android release, sdk)
MODELS: tuple[tuple[str, str, int, int, str, int], ...] = (
    ("SM-G991B", "Galaxy S21", 1080, 2340, "13", 33),
    ("Pixel 7", "Pixel 7", 1080, 2400, "14", 34),
    ("M2101K9G", "Mi 11 Lite", 1080, 2400, "12", 31),
    ("CPH2211", "OPPO A74", 1080, 2400, "12", 31),
    ("SM-A525F", "Galaxy A52", 1080, 2400, "13", 33),
)

SCREEN_SCALE = 4
"""Simulated screenshots are written at 1/SCREEN_SCALE of the phone resolution."""

_KEYCODES: dict[str, int] = {
    "KEYCODE_HOME": 3,
    "KEYCODE_BACK": 4,
    "KEYCODE_POWER": 26,
    "KEYCODE_ENTER": 66,
    "KEYCODE_DEL": 67,
    "KEYCODE_MENU": 82,
    "KEYCODE_APP_SWITCH": 187,
    "KEYCODE_SLEEP": 223,
    "KEYCODE_WAKEUP": 224,
}


class ShellError(Exception):
    """Raised by a shell builtin to end the command with the given output."""

    def __init__(self, output: str) -> None:
        super().__init__(output)
        self.output = output


@dataclass
class SimDevice:
    """One simulated phone."""

    serial: str
    """Identifier in ``list``'s ``serial`` field (equals ``only_serial`` for USB devices)."""
    only_serial: str
    """The stable id (``onlySerial``); the simulator's ``devices`` dict is keyed by it."""
    model: str = "SM-G991B"
    name: str = "Galaxy S21"
    status: str = "online"
    mode: int = 0
    width: int = 1080
    height: int = 2340
    intranet_ip: str = "192.168.1.100"
    connect_time: int = 0
    sort: int = 0
    hide: bool = False
    android_release: str = "13"
    sdk: int = 33
    battery_level: int = 80
    charging: bool = True
    foreground: str = LAUNCHER
    current_url: str | None = None
    screen_on: bool = True
    ime_selected: bool = False
    typed_text: str = ""
    clipboard: str = ""
    pending_sleep_s: float = 0.0
    """What `sleep N` in the last shell command asked for (the server waits it out)."""
    installed: set[str] = field(default_factory=lambda: set(DEFAULT_PACKAGES))
    back_stack: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    """The phone's filesystem as far as the simulator knows it (screencap, uiautomator dump)."""
    taps: list[tuple[int, int]] = field(default_factory=list)
    swipes: list[tuple[int, ...]] = field(default_factory=list)
    keyevents: list[str] = field(default_factory=list)
    pointer_events: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    shell_history: list[str] = field(default_factory=list)
    screenshots: int = 0

    # ------------------------------------------------------------------ views

    def to_list_entry(self) -> dict[str, Any]:
        """The device as the vendor's ``list`` action reports it."""
        return {
            "serial": self.serial,
            "onlySerial": self.only_serial,
            "model": self.model,
            "name": self.name,
            "status": self.status,
            "mode": self.mode,
            "intranetIp": self.intranet_ip,
            "width": self.width,
            "height": self.height,
            "sourceWidth": self.width,
            "sourceHeight": self.height,
            "connectTime": self.connect_time,
            "sort": self.sort,
            "hide": self.hide,
        }

    @property
    def online(self) -> bool:
        return self.status == "online"

    def screen_seed(self) -> int:
        """A seed that changes whenever what is on screen changes."""
        if not self.screen_on:
            return 0
        key = f"{self.only_serial}|{self.foreground}|{self.current_url}|{self.typed_text}"
        return zlib.crc32(key.encode())

    def render_screen(self) -> bytes:
        """A real PNG of the current screen (quarter resolution; black-ish when off)."""
        self.screenshots += 1
        return make_png(
            max(1, self.width // SCREEN_SCALE),
            max(1, self.height // SCREEN_SCALE),
            self.screen_seed(),
        )

    # ------------------------------------------------------------ app changes

    def open_app(self, package: str, url: str | None = None) -> None:
        if package != self.foreground:
            self.back_stack.append(self.foreground)
            del self.back_stack[:-20]
        self.foreground = package
        self.current_url = url
        self.screen_on = True

    def go_home(self) -> None:
        self.back_stack.clear()
        self.foreground = LAUNCHER
        self.current_url = None
        self.screen_on = True

    def go_back(self) -> None:
        self.foreground = self.back_stack.pop() if self.back_stack else LAUNCHER
        if self.foreground != BROWSER:
            self.current_url = None

    def show_recents(self) -> None:
        self.open_app(RECENTS)

    def stop_app(self, package: str) -> None:
        self.back_stack = [p for p in self.back_stack if p != package]
        if self.foreground == package:
            self.foreground = self.back_stack.pop() if self.back_stack else LAUNCHER
            self.current_url = None

    # ------------------------------------------------------------------ shell

    def run_shell(self, command: str) -> str:
        """Emulate ``adb shell <command>`` and return its stdout (always a str).

        Supports ``;`` / ``&&`` sequences (as separate tokens) and ``| grep PATTERN``
        / ``| head -n N`` filters. Unknown commands answer like ``sh`` does.
        """
        self.shell_history.append(command)
        try:
            tokens = list(_shell_tokens(command) if len(command) <= CACHED_COMMAND_MAX else _tokenize(command))
        except ValueError:
            return "/system/bin/sh: syntax error: unterminated quoted string\n"
        out: list[str] = []
        for pipeline in _split(tokens, {";", "&&"}):
            stages = _split(pipeline, {"|"})
            if not stages or not stages[0]:
                continue
            try:
                text = self._run_one(stages[0])
                for stage in stages[1:]:
                    text = _filter(stage, text)
            except ShellError as exc:
                text = exc.output
            out.append(text)
        return "".join(out)

    def _run_one(self, argv: list[str]) -> str:
        cmd, args = argv[0], argv[1:]
        handler = getattr(self, f"_sh_{cmd.replace('-', '_')}", None)
        if handler is None:
            return f"/system/bin/sh: {cmd}: not found\n"
        result: str = handler(args)
        return result

    def _sh_echo(self, args: list[str]) -> str:
        return " ".join(args) + "\n"

    def take_sleep(self) -> float:
        delay, self.pending_sleep_s = self.pending_sleep_s, 0.0
        return delay

    def _sh_sleep(self, args: list[str]) -> str:
        try:
            self.pending_sleep_s += min(5.0, max(0.0, float(args[0]))) if args else 0.0
        except ValueError:
            return f"sleep: invalid number '{args[0]}'\n"
        return ""

    def _sh_true(self, args: list[str]) -> str:
        return ""

    def _sh_getprop(self, args: list[str]) -> str:
        props = {
            "ro.product.model": self.model,
            "ro.product.brand": self.model.split("-")[0].lower(),
            "ro.product.manufacturer": "samsung" if self.model.startswith("SM-") else "vendor",
            "ro.build.version.release": self.android_release,
            "ro.build.version.sdk": str(self.sdk),
            "ro.serialno": self.only_serial,
            "sys.boot_completed": "1",
        }
        if not args:
            return "".join(f"[{k}]: [{v}]\n" for k, v in props.items())
        return props.get(args[0], "") + "\n"

    def _sh_dumpsys(self, args: list[str]) -> str:
        what = args[0] if args else ""
        if what == "battery":
            return (
                "Current Battery Service state:\n"
                f"  AC powered: {str(self.charging).lower()}\n"
                "  USB powered: false\n"
                "  Wireless powered: false\n"
                "  Max charging current: 0\n"
                f"  status: {2 if self.charging else 3}\n"
                "  health: 2\n"
                "  present: true\n"
                f"  level: {self.battery_level}\n"
                "  scale: 100\n"
                "  voltage: 4012\n"
                "  temperature: 290\n"
                "  technology: Li-ion\n"
            )
        if what == "window":
            act = f"{self.foreground}/{self.foreground}.MainActivity"
            return (
                f"  mCurrentFocus=Window{{1a2b3c u0 {act}}}\n"
                f"  mFocusedApp=ActivityRecord{{4d5e6f u0 {act} t42}}\n"
            )
        if what == "activity":
            act = f"{self.foreground}/{self.foreground}.MainActivity"
            return f"    mResumedActivity: ActivityRecord{{4d5e6f u0 {act} t42}}\n"
        if what == "power":
            state = "Awake" if self.screen_on else "Asleep"
            return f"  mWakefulness={state}\n  mHoldingDisplaySuspendBlocker={self.screen_on}\n"
        return f"Can't find service: {what}\n"

    def _sh_wm(self, args: list[str]) -> str:
        if args[:1] == ["size"]:
            return f"Physical size: {self.width}x{self.height}\n"
        if args[:1] == ["density"]:
            return "Physical density: 420\n"
        return "usage: wm [size|density] ...\n"

    def _sh_am(self, args: list[str]) -> str:
        if not args:
            return "usage: am [subcommand] [options]\n"
        sub, rest = args[0], args[1:]
        if sub == "force-stop":
            if rest:
                self.stop_app(rest[-1])
            return ""
        if sub in {"start", "start-activity"}:
            opts = _options(rest, with_value={"-a", "-d", "-n", "-c", "-t", "--user"})
            url = opts.get("-d")
            component = opts.get("-n")
            action = opts.get("-a")
            if component:
                package = component.split("/")[0]
                if package not in self.installed:
                    return (
                        f"Starting: Intent {{ cmp={component} }}\n"
                        f"Error type 3\nError: Activity class {{{component}}} does not exist.\n"
                    )
                self.open_app(package, url)
                return f"Starting: Intent {{ cmp={component} }}\n"
            if action == "android.intent.action.VIEW" and url:
                self.open_app(BROWSER, url)
                return f"Starting: Intent {{ act={action} dat={url} }}\n"
            return "Error: Intent does not match any activities\n"
        return f"Unknown command: {sub}\n"

    def _sh_monkey(self, args: list[str]) -> str:
        opts = _options(args, with_value={"-p", "-c", "--throttle", "-s"})
        package = opts.get("-p")
        if not package or package not in self.installed:
            return "** No activities found to run, monkey aborted.\n"
        self.open_app(package)
        return "  bash arg: -p\n  bash arg: " + package + "\nEvents injected: 1\n"

    def _sh_input(self, args: list[str]) -> str:
        if args and args[0] in {"touchscreen", "keyboard"}:
            args = args[1:]
        if not args:
            return "Usage: input [<source>] <command> [<arg>...]\n"
        sub, rest = args[0], args[1:]
        try:
            nums = [int(float(a)) for a in rest] if sub in {"tap", "swipe"} else []
        except ValueError as exc:
            raise ShellError(f"Error: Invalid arguments for command: {sub}\n") from exc
        if sub == "tap":
            if len(nums) != 2:
                raise ShellError("Error: Invalid arguments for command: tap\n")
            self.taps.append((nums[0], nums[1]))
            self.screen_on = True
            return ""
        if sub == "swipe":
            if len(nums) not in {4, 5}:
                raise ShellError("Error: Invalid arguments for command: swipe\n")
            self.swipes.append(tuple(nums))
            return ""
        if sub == "keyevent":
            for key in rest:
                self._keyevent(key)
            return ""
        if sub == "text":
            self.typed_text += " ".join(rest).replace("%s", " ")
            return ""
        return f"Error: Unknown command: {sub}\n"

    def _keyevent(self, key: str) -> None:
        name = key.upper()
        if name.isdigit():
            code = int(name)
        else:
            if not name.startswith("KEYCODE_"):
                name = "KEYCODE_" + name
            code = _KEYCODES.get(name, -1)
        self.keyevents.append(key)
        if code == 3:
            self.go_home()
        elif code == 4:
            self.go_back()
        elif code == 187:
            self.show_recents()
        elif code == 26:
            self.screen_on = not self.screen_on
        elif code == 223:
            self.screen_on = False
        elif code == 224:
            self.screen_on = True
        elif code == 67:
            self.typed_text = self.typed_text[:-1]

    def _sh_screencap(self, args: list[str]) -> str:
        paths = [a for a in args if not a.startswith("-")]
        if not paths:
            # Real screencap writes the image to stdout; a text frame cannot carry it.
            return ""
        self.files[paths[-1]] = self.render_screen()
        return ""

    def _sh_uiautomator(self, args: list[str]) -> str:
        if args[:1] != ["dump"]:
            return "Usage: uiautomator <subcommand> [options]\n"
        path = args[1] if len(args) > 1 else "/sdcard/window_dump.xml"
        xml = (
            "<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>"
            f'<hierarchy rotation="0"><node index="0" text="" package="{self.foreground}" '
            f'class="android.widget.FrameLayout" bounds="[0,0][{self.width},{self.height}]" />'
            "</hierarchy>"
        )
        self.files[path] = xml.encode()
        return f"UI hierchary dumped to: {path}\n"

    def _sh_cat(self, args: list[str]) -> str:
        out: list[str] = []
        for path in args:
            if path not in self.files:
                out.append(f"cat: {path}: No such file or directory\n")
            else:
                out.append(self.files[path].decode("utf-8", "replace"))
        return "".join(out)

    def _sh_rm(self, args: list[str]) -> str:
        for path in args:
            if not path.startswith("-"):
                self.files.pop(path, None)
        return ""

    def _sh_ls(self, args: list[str]) -> str:
        paths = [a for a in args if not a.startswith("-")]
        if not paths:
            return "".join(f"{p}\n" for p in sorted(self.files))
        out: list[str] = []
        for path in paths:
            prefix = path.rstrip("/") + "/"
            hits = sorted(p for p in self.files if p == path or p.startswith(prefix))
            out.extend(f"{p}\n" for p in hits)
            if not hits:
                out.append(f"ls: {path}: No such file or directory\n")
        return "".join(out)

    def _sh_pm(self, args: list[str]) -> str:
        if args[:2] == ["list", "packages"]:
            return "".join(f"package:{p}\n" for p in sorted(self.installed))
        if args[:1] == ["path"] and len(args) > 1:
            if args[1] in self.installed:
                return f"package:/data/app/{args[1]}/base.apk\n"
            return ""
        return "usage: pm [list|path] ...\n"


#: Longer shell commands (a long `input text`, each one different) are tokenized without the cache:
#: it holds at most 4096 short ones, whatever a client sends (up to the WebSocket's 16 MiB a message).
CACHED_COMMAND_MAX = 1024


def _tokenize(command: str) -> tuple[str, ...]:
    """``command`` as ``sh`` splits it (``;``, ``&&`` and ``|`` as tokens of their own)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return tuple(lexer)


#: Cached: a fleet asks every phone the same few commands, and shlex is slow pure Python (its tokenizer
#: was the simulators' largest own cost in bench/fleet.py's profile). A ValueError (an unterminated quote)
#: is raised, never cached.
_shell_tokens = functools.lru_cache(maxsize=4096)(_tokenize)


def _split(tokens: list[str], seps: set[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for tok in tokens:
        if tok in seps:
            parts.append([])
        else:
            parts[-1].append(tok)
    return [p for p in parts if p]


def _options(args: list[str], *, with_value: set[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        if args[i] in with_value and i + 1 < len(args):
            opts[args[i]] = args[i + 1]
            i += 2
        else:
            i += 1
    return opts


def _filter(stage: list[str], text: str) -> str:
    cmd, args = stage[0], stage[1:]
    lines = text.splitlines(keepends=True)
    if cmd == "grep":
        flags = [a for a in args if a.startswith("-")]
        pats = [a for a in args if not a.startswith("-")]
        if not pats:
            return ""
        pat = pats[0]
        if "-i" in flags:
            return "".join(line for line in lines if pat.lower() in line.lower())
        return "".join(line for line in lines if pat in line)
    if cmd == "head":
        n = 10
        if len(args) >= 2 and args[0] == "-n":
            n = int(args[1]) if args[1].isdigit() else 10
        return "".join(lines[:n])
    return f"/system/bin/sh: {cmd}: not found\n"
