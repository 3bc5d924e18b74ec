"""The vendor client's per-request debug line: there at debug level, not built at all otherwise."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest_asyncio
import structlog

from services.node.vendor_client import VendorClient
from services.simulator import Simulator, SimulatorConfig


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(devices=2, seed=3, default_latency_ms=1)) as s:
        yield s


async def shell_once(url: str) -> list[MutableMapping[str, Any]]:
    with structlog.testing.capture_logs() as logs:
        async with VendorClient(url) as client:
            assert (await client.shell("SIM0001", "getprop ro.product.model")).strip()
    return [line for line in logs if line["event"] == "vendor request"]


async def test_debug_level_logs_each_request_and_info_level_does_not(sim: Simulator, log_file: Path) -> None:
    # `log_file`: the session's logging set-up (info level), restored below.
    assert await shell_once(sim.url) == []
    info_level = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        lines = await shell_once(sim.url)
    finally:
        structlog.configure(wrapper_class=info_level)
    assert len(lines) == 1
    assert lines[0]["action"] == "adb_shell" and lines[0]["log_level"] == "debug"
    assert isinstance(lines[0]["duration_ms"], float)


def test_every_install_the_node_extra_allows_can_send_json_bytes_as_text() -> None:
    """The vendor client sends its msgspec-encoded JSON bytes with `send(payload, text=True)`, an argument
    websockets' asyncio client has from 14.0 on. A node PC whose websockets 13.x already satisfies the
    extra would fail every vendor request with a TypeError, so every declared lower bound must be >= 14."""
    import inspect
    import re

    from websockets.asyncio.client import ClientConnection

    assert "text" in inspect.signature(ClientConnection.send).parameters  # what this install has
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    bounds = re.findall(r'"websockets>=(\d+)', pyproject)
    assert bounds and all(int(major) >= 14 for major in bounds), bounds
