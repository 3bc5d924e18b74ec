"""DSL steps against the vendor-protocol simulator over a real WebSocket, and the artifact store."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio

from contracts import recipe_model as dsl
from contracts.local_names import local_path
from services.node.artifacts import ArtifactError, LocalArtifactStore, StoredArtifact, render_key
from services.node.settings import DEFAULT_PATH_TEMPLATE
from services.node.steps import StepContext, StepError, execute, shell_line
from services.node.vendor_client import VendorClient, VendorFailure
from services.simulator import Simulator, SimulatorConfig
from services.simulator.device import BROWSER, LAUNCHER, SCREEN_SCALE
from services.simulator.png import PNG_SIGNATURE

SERIAL = "SIM0001"
RUN_ID = "0b6f3a52-4a55-4d1e-9d1c-2f9a0c6f1e11"
NODE_ID = "node-A1"
VIDEO_ID = "dQw4w9WgXcQ"
TIMEOUT_S = 5.0

INJECTIONS = [
    "x'; rm -rf /; echo 'pwned",
    "$(reboot)",
    "`reboot`",
    'a "b" \\ c && reboot | sh > /dev/null; echo $HOME',
    "it's  two  spaces\tand a tab",
]


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(devices=3, seed=7, latency_ms={}, default_latency_ms=0)
    async with Simulator(config) as s:
        yield s


@pytest_asyncio.fixture
async def vendor(sim: Simulator) -> AsyncIterator[VendorClient]:
    async with VendorClient(sim.url, pool_size=2, request_timeout_s=TIMEOUT_S, screenshot_wait_s=TIMEOUT_S) as c:
        yield c


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def make_ctx(
    vendor: VendorClient,
    store: LocalArtifactStore,
    tmp_path: Path,
    *,
    params: dict[str, str] | None = None,
    serial: str = SERIAL,
    template: str = DEFAULT_PATH_TEMPLATE,
) -> StepContext:
    values = {"youtubeVideoId": VIDEO_ID, **(params or {})}
    values.update(run_id=RUN_ID, node_id=NODE_ID, device_serial=serial)
    return StepContext(
        driver=vendor,
        store=store,
        serial=serial,
        values=values,
        spool=tmp_path / "spool" / RUN_ID / serial,
        path_template=template,
    )


def step(doc: dict[str, object]) -> dsl.StepBase:
    """A step as a recipe would hold it (validated by msgspec, like the DSL does)."""
    result: dsl.StepBase = msgspec.convert(doc, dsl.Step)
    return result


def shell_calls(sim: Simulator) -> int:
    return sim.action_counts["adb_shell"]


# -- shell quoting ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", INJECTIONS)
async def test_adb_shell_payload_reaches_the_device_as_one_argument(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path, payload: str
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"payload": payload})
    s = step({"id": "echo", "action": "adb_shell", "command": ["echo", "{{payload}}"]})
    result = await execute(s, ctx, TIMEOUT_S)

    history = sim.devices[SERIAL].shell_history
    assert len(history) == 1
    received = history[0]
    assert received == shell_line(["echo", payload])
    assert shlex.split(received) == ["echo", payload]
    # The device's shell ran one echo with the payload as its single argument; nothing else ran.
    assert result.output == payload + "\n"
    assert sim.calls == [("adb_shell", SERIAL)]


async def test_placeholder_inside_an_argument_stays_inside_it(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    payload = INJECTIONS[0]
    ctx = make_ctx(vendor, store, tmp_path, params={"payload": payload})
    s = step({"id": "echo", "action": "adb_shell", "command": ["echo", "pre-{{payload}}-{{device_serial}}"]})
    result = await execute(s, ctx, TIMEOUT_S)
    argv = ["echo", f"pre-{payload}-{SERIAL}"]
    [received] = sim.devices[SERIAL].shell_history
    assert received == shell_line(argv)
    assert shlex.split(received) == argv
    assert result.output == argv[1] + "\n"


async def test_open_url_is_quoted(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    url = "https://example.com/watch?v=abc&t=1;reboot 'x' $(id) `id`"
    ctx = make_ctx(vendor, store, tmp_path, params={"url": url})
    result = await execute(step({"id": "open", "action": "open_url", "url": "{{url}}"}), ctx, TIMEOUT_S)
    argv = ["am", "start", "-a", "android.intent.action.VIEW", "-d", url]
    [received] = sim.devices[SERIAL].shell_history
    assert received == shell_line(argv)
    assert shlex.split(received) == argv
    dev = sim.devices[SERIAL]
    assert dev.foreground == BROWSER
    assert dev.current_url == url
    assert result.output is not None and "Starting: Intent" in result.output


async def test_input_text_is_quoted_with_spaces_encoded(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    text = "hello world; reboot && echo 'x'"
    ctx = make_ctx(vendor, store, tmp_path, params={"text": text})
    await execute(step({"id": "type", "action": "input_text", "text": "{{text}}"}), ctx, TIMEOUT_S)
    argv = ["input", "text", text.replace(" ", "%s")]
    [received] = sim.devices[SERIAL].shell_history
    assert received == shell_line(argv)
    assert sim.devices[SERIAL].typed_text == text


async def test_tap_and_swipe(sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    await execute(step({"id": "tap", "action": "tap", "x": 10, "y": 20}), ctx, TIMEOUT_S)
    swipe = {"id": "swipe", "action": "swipe", "x1": 1, "y1": 2, "x2": 3, "y2": 4, "duration_ms": 250}
    await execute(step(swipe), ctx, TIMEOUT_S)
    dev = sim.devices[SERIAL]
    assert dev.shell_history == ["input tap 10 20", "input swipe 1 2 3 4 250"]
    assert dev.taps == [(10, 20)]
    assert dev.swipes == [(1, 2, 3, 4, 250)]


# -- key events ---------------------------------------------------------------------------------


async def test_keyevent_home_uses_push_event(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"url": "https://example.com/"})
    await execute(step({"id": "open", "action": "open_url", "url": "{{url}}"}), ctx, TIMEOUT_S)
    dev = sim.devices[SERIAL]
    assert dev.foreground == BROWSER
    shells_before = shell_calls(sim)

    result = await execute(step({"id": "home", "action": "keyevent", "key": "home"}), ctx, TIMEOUT_S)
    assert result.output is None
    assert sim.calls[-1] == ("pushevent", SERIAL)
    assert sim.action_counts["pushevent"] == 1
    assert shell_calls(sim) == shells_before  # not through `input keyevent`
    assert dev.foreground == LAUNCHER
    assert dev.current_url is None


async def test_keyevent_back_and_recents_use_push_event(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    await execute(step({"id": "recents", "action": "keyevent", "key": "Recents"}), ctx, TIMEOUT_S)
    dev = sim.devices[SERIAL]
    assert dev.foreground != LAUNCHER
    await execute(step({"id": "back", "action": "keyevent", "key": "back"}), ctx, TIMEOUT_S)
    assert dev.foreground == LAUNCHER
    assert sim.action_counts["pushevent"] == 2
    assert shell_calls(sim) == 0


async def test_other_keyevents_go_through_input_keyevent(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"key": "KEYCODE_ENTER; reboot"})
    await execute(step({"id": "enter", "action": "keyevent", "key": "KEYCODE_ENTER"}), ctx, TIMEOUT_S)
    await execute(step({"id": "evil", "action": "keyevent", "key": "{{key}}"}), ctx, TIMEOUT_S)
    dev = sim.devices[SERIAL]
    assert dev.shell_history == [
        "input keyevent KEYCODE_ENTER",
        shell_line(["input", "keyevent", "KEYCODE_ENTER; reboot"]),
    ]
    assert dev.keyevents == ["KEYCODE_ENTER", "KEYCODE_ENTER; reboot"]
    assert sim.action_counts["pushevent"] == 0


# -- apps and vendor failures -------------------------------------------------------------------


async def test_launch_and_stop_app(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"pkg": BROWSER})
    await execute(step({"id": "launch", "action": "launch_app", "package": "{{pkg}}"}), ctx, TIMEOUT_S)
    dev = sim.devices[SERIAL]
    assert dev.foreground == BROWSER
    await execute(step({"id": "stop", "action": "stop_app", "package": BROWSER}), ctx, TIMEOUT_S)
    assert dev.foreground == LAUNCHER
    assert ("startapk", SERIAL) in sim.calls and ("stopapk", SERIAL) in sim.calls


@pytest.mark.parametrize("pkg", ["com.x; reboot", "com.x,com.y", "notapackage", "com.x\nrm", "../x", ""])
async def test_app_steps_refuse_what_is_not_a_package_name(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path, pkg: str
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"pkg": pkg})
    before = len(sim.calls)
    for action in ("launch_app", "stop_app"):
        with pytest.raises(StepError) as info:
            await execute(step({"id": "app", "action": action, "package": "{{pkg}}"}), ctx, TIMEOUT_S)
        assert info.value.code == "invalid_package"
    assert len(sim.calls) == before  # nothing reached the vendor program


async def test_vendor_failures_fail_the_step(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    with pytest.raises(VendorFailure):
        await execute(step({"id": "launch", "action": "launch_app", "package": "com.not.installed"}), ctx, TIMEOUT_S)
    sim.set_device_status(SERIAL, "offline")
    with pytest.raises(VendorFailure, match="offline"):
        await execute(step({"id": "echo", "action": "adb_shell", "command": ["echo", "hi"]}), ctx, TIMEOUT_S)
    assert sim.devices[SERIAL].shell_history == []


# -- assert, wait, report -----------------------------------------------------------------------


async def test_assert_step_passes_and_fails(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"min_digits": "1"})
    battery = step({"id": "battery", "action": "adb_shell", "command": ["dumpsys", "battery"]})
    result = await execute(battery, ctx, TIMEOUT_S)
    assert result.output is not None
    level = sim.devices[SERIAL].battery_level
    assert f"level: {level}" in result.output
    ctx.outputs["battery"] = result.output  # what the executor does after an ok step

    ok = step({"id": "has-level", "action": "assert", "source": "battery", "pattern": r"level: \d{{{min_digits}},}"})
    assert (await execute(ok, ctx, TIMEOUT_S)).output is None

    bad = step({"id": "no-level", "action": "assert", "source": "battery", "pattern": r"level: 1000"})
    with pytest.raises(StepError) as info:
        await execute(bad, ctx, TIMEOUT_S)
    assert info.value.code == "assert_failed"

    missing = step({"id": "nothing", "action": "assert", "source": "never-ran", "pattern": "."})
    with pytest.raises(StepError) as info:
        await execute(missing, ctx, TIMEOUT_S)
    assert info.value.code == "assert_failed"


def test_assert_patterns_take_linear_time_on_the_node(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    """`(a+)+$` against 100,000 a's and a '!' takes exponential time with a backtracking engine (and no step
    timeout can interrupt it: the event loop is blocked). With RE2 it returns at once.

    Run on a loop of its own in a daemon thread, so that a regression fails this test instead of hanging it.
    """
    ctx = make_ctx(vendor, store, tmp_path, params={"tail": "!", "broken": "("})
    ctx.outputs["src"] = "a" * 100_000 + "!"
    outcomes: list[str] = []

    def run(pattern: str) -> None:
        async def one() -> None:
            try:
                await execute(step({"id": "check", "action": "assert", "source": "src", "pattern": pattern}),
                              ctx, TIMEOUT_S)
                outcomes.append("ok")
            except StepError as exc:
                outcomes.append(exc.code)
        asyncio.run(one())

    for pattern in ("^(a+)+$", "^(a+)+{{tail}}$", "^(a|aa)+$", "(a*)*b", "{{broken}}"):
        worker = threading.Thread(target=run, args=(pattern,), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert not worker.is_alive(), f"the assert pattern {pattern} did not return"
    assert outcomes == ["assert_failed", "ok", "assert_failed", "assert_failed", "invalid_pattern"]


async def test_wait_and_report(vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    assert (await execute(step({"id": "w", "action": "wait", "ms": 0}), ctx, TIMEOUT_S)).output is None
    ctx.states.update({"model": "ok", "open": "failed"})
    result = await execute(step({"id": "report", "action": "report"}), ctx, TIMEOUT_S)
    assert result.output == '{"model":"ok","open":"failed"}'


# -- screenshot and upload ----------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def test_screenshot_writes_a_png_into_the_spool(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    result = await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    assert result.output is not None
    path = Path(result.output)
    assert path.parent == ctx.spool / "shot"
    assert ctx.screenshots == {"shot": path}
    dev = sim.devices[SERIAL]
    assert png_size(path.read_bytes()) == (dev.width // SCREEN_SCALE, dev.height // SCREEN_SCALE)
    assert dev.screenshots == 1
    assert sim.calls == [("screen", SERIAL)]


async def test_upload_stores_the_screenshot_under_the_default_key(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    shot = await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    assert shot.output is not None
    spooled = Path(shot.output)
    content = spooled.read_bytes()

    before = int(time.time())
    result = await execute(step({"id": "upload", "action": "upload"}), ctx, TIMEOUT_S)
    after = int(time.time())

    art = result.artifact
    assert art is not None
    match = re.fullmatch(rf"{VIDEO_ID}/{NODE_ID}/{SERIAL}/{RUN_ID}/(\d+)\.png", art.key)
    assert match, art.key
    assert before <= int(match.group(1)) <= after
    stored = store.root / art.key
    assert stored.read_bytes() == content
    assert art.bytes == len(content) == stored.stat().st_size
    assert art.sha256 == hashlib.sha256(content).hexdigest()
    assert art.store == "local"
    assert art.uri == stored.as_uri()
    assert result.output == art.uri
    assert not spooled.exists(), "the spool copy is removed once stored"


async def test_upload_with_an_explicit_source_and_template(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, template="{node_id}/{campaign}/{device_serial}-{timestamp}.png")
    ctx.values["campaign"] = "spring"
    first = await execute(step({"id": "first", "action": "screenshot"}), ctx, TIMEOUT_S)
    await execute(step({"id": "second", "action": "screenshot"}), ctx, TIMEOUT_S)
    assert first.output is not None
    content = Path(first.output).read_bytes()
    result = await execute(step({"id": "up", "action": "upload", "source": "first"}), ctx, TIMEOUT_S)
    assert result.artifact is not None
    assert re.fullmatch(rf"{NODE_ID}/spring/{SERIAL}-\d+\.png", result.artifact.key)
    assert (store.root / result.artifact.key).read_bytes() == content
    assert ctx.screenshots["second"].exists()  # only the uploaded one leaves the spool


async def test_upload_with_a_missing_template_param_fails(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    del ctx.values["youtubeVideoId"]
    await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    with pytest.raises(StepError) as info:
        await execute(step({"id": "upload", "action": "upload"}), ctx, TIMEOUT_S)
    assert info.value.code == "artifact_path"
    assert "youtubeVideoId" in str(info.value)
    assert ctx.screenshots["shot"].exists()
    assert not store.root.exists() or not any(store.root.rglob("*.png"))


async def test_upload_with_a_path_escaping_param_fails(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path, params={"youtubeVideoId": ".."})
    await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    with pytest.raises(StepError) as info:
        await execute(step({"id": "upload", "action": "upload"}), ctx, TIMEOUT_S)
    assert info.value.code == "artifact_path"
    assert ctx.screenshots["shot"].exists()
    assert not store.root.exists() or not any(store.root.rglob("*.png"))
    assert [p.name for p in tmp_path.rglob("*.png")] == [ctx.screenshots["shot"].name]


async def test_upload_without_a_screenshot_fails(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    ctx = make_ctx(vendor, store, tmp_path)
    with pytest.raises(StepError) as info:
        await execute(step({"id": "upload", "action": "upload"}), ctx, TIMEOUT_S)
    assert info.value.code == "no_screenshot"
    with pytest.raises(StepError) as info:
        await execute(step({"id": "upload", "action": "upload", "source": "shot"}), ctx, TIMEOUT_S)
    assert info.value.code == "no_screenshot"


# -- render_key and the local store -------------------------------------------------------------


BASE_VALUES = {
    "youtubeVideoId": VIDEO_ID,
    "node_id": NODE_ID,
    "device_serial": "192.168.1.5:5555",
    "run_id": RUN_ID,
    "timestamp": "1739012345",
}


def test_render_key_default_template() -> None:
    key = render_key(DEFAULT_PATH_TEMPLATE, BASE_VALUES)
    assert key == f"{VIDEO_ID}/{NODE_ID}/192.168.1.5:5555/{RUN_ID}/1739012345.png"


@pytest.mark.parametrize("bad", ["..", "../etc", "a/b", "/abs", "a/../b", "..\\x", "a\\b", "", ".", "vid%2Fx",
                                 "a\nb"])
def test_render_key_refuses_unsafe_values(bad: str) -> None:
    with pytest.raises(ArtifactError):
        render_key(DEFAULT_PATH_TEMPLATE, {**BASE_VALUES, "youtubeVideoId": bad})


def test_render_key_ignores_unsafe_values_the_template_does_not_use() -> None:
    assert render_key("{run_id}.png", {**BASE_VALUES, "youtubeVideoId": "../x"}) == f"{RUN_ID}.png"


def test_render_key_refuses_missing_params_and_absolute_keys() -> None:
    values = {k: v for k, v in BASE_VALUES.items() if k != "youtubeVideoId"}
    with pytest.raises(ArtifactError, match="youtubeVideoId"):
        render_key(DEFAULT_PATH_TEMPLATE, values)
    with pytest.raises(ArtifactError):
        render_key("/{run_id}.png", BASE_VALUES)


async def test_local_store_refuses_keys_escaping_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    local = LocalArtifactStore(root)
    source = tmp_path / "in.png"
    source.write_bytes(PNG_SIGNATURE + b"data")
    for key in ("../evil.png", "a/../../evil.png", str(tmp_path / "evil.png"), "a/../../store-sibling/evil.png",
                "a/../ok.png"):  # a '..' segment is refused outright, even one that would stay inside
        with pytest.raises(ArtifactError):
            await local.put(key, source, "image/png")
    assert not (tmp_path / "evil.png").exists()
    assert not (tmp_path / "store-sibling").exists()
    assert not root.exists() or not any(root.rglob("*.png"))
    art = await local.put("a/ok.png", source, "image/png")
    assert (root / "a" / "ok.png").read_bytes() == source.read_bytes()
    assert art.bytes == source.stat().st_size


async def test_local_store_keeps_both_files_of_one_second(tmp_path: Path) -> None:
    local = LocalArtifactStore(tmp_path / "store")
    key = render_key(DEFAULT_PATH_TEMPLATE, BASE_VALUES)
    contents = [PNG_SIGNATURE + bytes([i]) * (i + 1) for i in range(3)]
    stored = []
    for i, content in enumerate(contents):
        src = tmp_path / f"src{i}.png"
        src.write_bytes(content)
        stored.append(await local.put(key, src, "image/png"))
    keys = [a.key for a in stored]
    assert keys[0] == key
    assert len(set(keys)) == 3
    assert keys[1] == key.removesuffix(".png") + "-1.png"
    assert keys[2] == key.removesuffix(".png") + "-2.png"
    for art, content in zip(stored, contents, strict=True):
        path = local.root / local_path(art.key)  # the Wi-Fi serial's ':' is written as %3A on disk
        assert path.read_bytes() == content
        assert art.sha256 == hashlib.sha256(content).hexdigest()
        assert art.bytes == len(content)
    assert not list(local.root.rglob("*.part"))


class ScriptedStore:
    """A store whose first `put`s raise the given exceptions, then stores locally."""

    name = "scripted"

    def __init__(self, inner: LocalArtifactStore, errors: list[Exception]) -> None:
        self.inner = inner
        self.errors = errors
        self.tries = 0

    async def put(self, key: str, source: Path, content_type: str) -> StoredArtifact:
        self.tries += 1
        assert content_type == "image/png" and source.exists()
        if self.errors:
            raise self.errors.pop(0)
        return await self.inner.put(key, source, content_type)


async def test_upload_retries_store_errors_with_the_same_key(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    flaky = ScriptedStore(store, [ArtifactError("Supabase Storage unreachable"), OSError("connection reset")])
    ctx = make_ctx(vendor, store, tmp_path)
    ctx.store = flaky
    await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    result = await execute(step({"id": "upload", "action": "upload"}), ctx, TIMEOUT_S)
    assert flaky.tries == 3 and result.artifact is not None
    assert (store.root / result.artifact.key).exists()


async def test_upload_gives_up_before_its_timeout_and_keeps_the_spool_copy(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    down = ScriptedStore(store, [ConnectionError("down")] * 100)
    ctx = make_ctx(vendor, store, tmp_path)
    ctx.store = down
    shot = await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    started = time.monotonic()
    with pytest.raises(StepError) as info:
        await execute(step({"id": "upload", "action": "upload"}), ctx, 2.0)
    assert info.value.code == "upload_failed" and time.monotonic() - started < 2.0
    assert down.tries >= 2 and "spool" in str(info.value)
    assert Path(str(shot.output)).exists()


async def test_upload_does_not_retry_an_error_marked_not_retryable(
    vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    refused = ArtifactError("bucket does not exist", retryable=False)
    once = ScriptedStore(store, [refused])
    ctx = make_ctx(vendor, store, tmp_path)
    ctx.store = once
    await execute(step({"id": "shot", "action": "screenshot"}), ctx, TIMEOUT_S)
    with pytest.raises(StepError, match="bucket does not exist"):
        await execute(step({"id": "upload", "action": "upload"}), ctx, TIMEOUT_S)
    assert once.tries == 1


async def test_integer_fields_take_integer_params(
    sim: Simulator, vendor: VendorClient, store: LocalArtifactStore, tmp_path: Path
) -> None:
    """`{{param}}` in tap/swipe/wait integer fields is filled in per device; a value that does not fit the field
    fails the step before anything reaches the phone."""
    ctx = make_ctx(vendor, store, tmp_path, params={"x": "11", "y": "22", "dur": "260", "pause": "5"})
    await execute(step({"id": "tap", "action": "tap", "x": "{{x}}", "y": "{{ y }}"}), ctx, TIMEOUT_S)
    swipe = {"id": "swipe", "action": "swipe", "x1": "{{x}}", "y1": 2, "x2": 3, "y2": "{{y}}", "duration_ms": "{{dur}}"}
    await execute(step(swipe), ctx, TIMEOUT_S)
    started = time.monotonic()
    await execute(step({"id": "pause", "action": "wait", "ms": "{{pause}}"}), ctx, TIMEOUT_S)
    assert time.monotonic() - started < 1.0
    dev = sim.devices[SERIAL]
    assert dev.shell_history == ["input tap 11 22", "input swipe 11 2 3 22 260"]
    bad = make_ctx(vendor, store, tmp_path, params={"x": "-5", "y": "1"})
    with pytest.raises(StepError) as info:
        await execute(step({"id": "tap", "action": "tap", "x": "{{x}}", "y": "{{y}}"}), bad, TIMEOUT_S)
    assert info.value.code == "invalid_param" and "x must be within" in str(info.value)
    assert dev.shell_history == ["input tap 11 22", "input swipe 11 2 3 22 260"]  # nothing more reached it
