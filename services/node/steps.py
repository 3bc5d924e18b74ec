"""What each DSL step does on a device, through the device driver (vendor program or adb).

Every value a recipe or a run parameter puts into a shell command is quoted
with `shlex.quote`, element by element, so a parameter cannot inject a command.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from contracts import recipe_model as dsl
from contracts.patterns import PatternError
from contracts.patterns import search as pattern_search
from contracts.recipe_check import resolve_int
from runtime.paths import PathEscape, contained
from services.node.artifacts import ArtifactStore, StoredArtifact, render_key
from services.node.driver import DeviceDriver, Key
from services.node.errors import NodeError

log = structlog.get_logger(__name__)

_OUTPUT_LIMIT = 4000
_NATIVE_KEYS = frozenset(k.value for k in Key)


class StepError(NodeError):
    """A step failed for a reason the recipe can see (`code` goes into the event)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


@dataclass
class StepContext:
    """Everything one device's workflow needs while it runs."""

    driver: DeviceDriver
    store: ArtifactStore
    serial: str
    values: dict[str, str]  # params + run_id / node_id / device_serial
    spool: Path
    path_template: str
    outputs: dict[str, str] = field(default_factory=dict)
    screenshots: dict[str, Path] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)

    def render(self, text: str) -> str:
        return dsl.render(text, self.values)

    def ints(self, step: dsl.StepBase) -> list[int]:
        """The step's integer fields in declaration order, `{{param}}` placeholders filled in and checked."""
        try:
            return [resolve_int(value, name, self.values) for name, value in dsl.int_fields(step)]
        except ValueError as exc:
            raise StepError("invalid_param", f"step {step.id!r}: {exc}") from None


@dataclass
class StepResult:
    output: str | None = None
    artifact: StoredArtifact | None = None


_PACKAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)+$")


def _package(name: str) -> str:
    """An Android package name, checked: the vendor program receives it as is, unquoted."""
    if not _PACKAGE.match(name):
        raise StepError("invalid_package", f"{name!r} is not an Android package name")
    return name


def _inside(root: Path, *parts: str) -> Path:
    try:
        return contained(root, *parts)
    except PathEscape as exc:
        raise StepError(exc.code, str(exc)) from None


def _saved_inside(folder: Path, path: Path) -> Path:
    """The file a driver saved, checked to lie under `folder` (a program may add dated subfolders)."""
    try:
        relative = path.resolve().relative_to(folder)
    except ValueError:
        raise StepError("path_escape", f"the driver saved the screenshot outside {folder}: {path}") from None
    return _inside(folder, *relative.parts)


def shell_line(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


async def _shell(ctx: StepContext, argv: list[str], timeout_s: float) -> str:
    return await ctx.driver.shell(ctx.serial, shell_line(argv), timeout_s=timeout_s)


async def execute(step: dsl.StepBase, ctx: StepContext, timeout_s: float) -> StepResult:
    """Run one step; raise `StepError` (or a vendor error) when it fails."""
    match step:
        case dsl.AdbShell(command=command):
            return StepResult(await _shell(ctx, [ctx.render(a) for a in command], timeout_s))
        case dsl.OpenUrl(url=url):
            argv = ["am", "start", "-a", "android.intent.action.VIEW", "-d", ctx.render(url)]
            return StepResult(await _shell(ctx, argv, timeout_s))
        case dsl.LaunchApp(package=package):
            await ctx.driver.start_apk(ctx.serial, _package(ctx.render(package)))
            return StepResult()
        case dsl.StopApp(package=package):
            await ctx.driver.stop_apk(ctx.serial, _package(ctx.render(package)))
            return StepResult()
        case dsl.KeyEvent(key=key):
            name = ctx.render(key)
            if name.lower() in _NATIVE_KEYS:  # home, back, recents: the driver presses them natively
                await ctx.driver.press_key(ctx.serial, Key(name.lower()))
                return StepResult()
            return StepResult(await _shell(ctx, ["input", "keyevent", name], timeout_s))
        case dsl.Tap():
            x, y = ctx.ints(step)
            return StepResult(await _shell(ctx, ["input", "tap", str(x), str(y)], timeout_s))
        case dsl.Swipe():
            x1, y1, x2, y2, ms = ctx.ints(step)
            argv = ["input", "swipe", str(x1), str(y1), str(x2), str(y2), str(ms)]
            return StepResult(await _shell(ctx, argv, timeout_s))
        case dsl.InputText(text=text):
            # `input text` takes %s for a space; the whole argument is still quoted.
            return StepResult(await _shell(ctx, ["input", "text", ctx.render(text).replace(" ", "%s")], timeout_s))
        case dsl.Wait():
            [ms] = ctx.ints(step)
            await asyncio.sleep(ms / 1000)
            return StepResult()
        case dsl.Screenshot():
            folder = _inside(ctx.spool, step.id)
            folder.mkdir(parents=True, exist_ok=True)
            path = await ctx.driver.screenshot(ctx.serial, folder, timeout_s=timeout_s)
            path = _saved_inside(folder, path)
            ctx.screenshots[step.id] = path
            return StepResult(str(path))
        case dsl.Upload(source=source):
            return await _upload(ctx, source, timeout_s)
        case dsl.Assert(source=source, pattern=pattern):
            # RE2: linear in the output whatever the pattern, so no recipe can stall the node's event loop.
            text = ctx.outputs.get(source, "")
            try:
                matched = pattern_search(ctx.render(pattern), text)
            except PatternError as exc:
                raise StepError("invalid_pattern", f"pattern of step {step.id!r}: {exc}") from None
            if not matched:
                raise StepError("assert_failed", f"output of step {source!r} does not match {pattern!r}")
            return StepResult()
        case dsl.Report():
            return StepResult(msgspec.json.encode(ctx.states).decode())
    raise StepError("unknown_action", f"step action {type(step).__name__} is not supported by this node")


# An upload that fails is retried with this backoff until the step's time is nearly
# out, then the step fails with `upload_failed`; the screenshot stays in the spool.
UPLOAD_BACKOFF_S = (0.5, 1.0, 2.0, 4.0)
UPLOAD_MARGIN_S = 0.5  # fail with the store's error just before the step's own timeout fires


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed `put` is worth another try: yes, unless it is a `NodeError` that is not `retryable`.

    Stores report unreachable servers and refusals alike as `ArtifactError` (retryable);
    within the step's upload timeout, trying again is cheap and never wrong. A key that
    escapes the store (`ArtifactKeyEscape`) is not retried.
    """
    return exc.retryable if isinstance(exc, NodeError) else True


async def _upload(ctx: StepContext, source: str | None, timeout_s: float) -> StepResult:
    if source is None:
        if not ctx.screenshots:
            raise StepError("no_screenshot", "no screenshot was taken before this upload")
        source = list(ctx.screenshots)[-1]
    path = ctx.screenshots.get(source)
    if path is None:
        raise StepError("no_screenshot", f"step {source!r} produced no screenshot")
    if not path.exists():
        raise StepError("no_screenshot", f"the screenshot of step {source!r} is gone from the spool ({path})")
    values = {**ctx.values, "timestamp": str(int(time.time()))}
    try:
        key = render_key(ctx.path_template, values)
    except Exception as exc:
        raise StepError("artifact_path", str(exc)) from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s - UPLOAD_MARGIN_S
    tries = 0
    while True:
        tries += 1
        try:
            async with asyncio.timeout(max(0.01, deadline - loop.time())):
                stored = await ctx.store.put(key, path, "image/png")
            break
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError) and loop.time() >= deadline
            delay = UPLOAD_BACKOFF_S[min(tries - 1, len(UPLOAD_BACKOFF_S) - 1)]
            if not timed_out and isinstance(exc, NodeError) and not exc.retryable:
                raise StepError(exc.code, str(exc)) from None
            if timed_out or loop.time() + delay >= deadline:
                raise StepError(
                    "upload_failed",
                    f"{ctx.store.name} store: {tries} tries within {timeout_s:g} s, last error: "
                    f"{exc!r:.300}; the screenshot stays in the spool at {path}",
                ) from None
            log.warning("upload failed; retrying", store=ctx.store.name, key=key, tries=tries,
                        retry_in_s=delay, error=f"{exc!r:.300}")
            await asyncio.sleep(delay)
    path.unlink(missing_ok=True)  # the spool copy is no longer needed once stored
    return StepResult(stored.uri, stored)


def clip(text: str | None) -> str | None:
    if text is None or len(text) <= _OUTPUT_LIMIT:
        return text
    return text[:_OUTPUT_LIMIT] + "…"


FAILURE_SHOT_MAX_S = 30.0  # a failure screenshot (capture + store) never holds the slot longer than this


async def failure_screenshot(ctx: StepContext, step_id: str, timeout_s: float) -> StoredArtifact | None:
    """Capture the device's screen after step `step_id` failed and store it; None when it could not be done.

    The key follows the path template with `{timestamp}` as `<epoch>-failure-<step_id>`, e.g.
    `dQw4w9WgXcQ/node-A1/ABC123/<run>/1739012345-failure-open.png`. Whatever goes wrong here is logged and
    does not change the task's outcome (the step's own error is what the task reports).
    """
    limit = min(timeout_s, FAILURE_SHOT_MAX_S)
    try:
        key = render_key(ctx.path_template,
                         {**ctx.values, "timestamp": f"{int(time.time())}-failure-{step_id}"})
    except Exception as exc:
        log.warning("no failure screenshot: the artifact path cannot be made", step_id=step_id, error=str(exc))
        return None
    folder = ctx.spool / f"failure-{step_id}"
    try:
        async with asyncio.timeout(limit):
            folder.mkdir(parents=True, exist_ok=True)
            path = await ctx.driver.screenshot(ctx.serial, folder, timeout_s=limit)
            stored = await ctx.store.put(key, path, "image/png")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.warning("failure screenshot could not be taken or stored", step_id=step_id, error=f"{exc!r:.300}")
        return None
    path.unlink(missing_ok=True)
    return stored
