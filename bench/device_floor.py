"""The device-time floor of one device-smoke task: its vendor requests, straight to a simulator, nothing else."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from services.node.driver import Key
from services.node.vendor_client import VendorClient
from services.simulator import Simulator, SimulatorConfig


async def floor_one_device(latency_ms: float, screen_ms: float) -> float:
    """Seconds one device takes for device-smoke's requests with these simulated latencies (and its `wait`)."""
    config = SimulatorConfig(devices=1, default_latency_ms=latency_ms, latency_ms={"screen": screen_ms})
    async with Simulator(config) as sim, VendorClient(sim.url, pool_size=1) as vendor:
        serial = next(iter(sim.devices))
        with tempfile.TemporaryDirectory() as spool:
            started = time.perf_counter()
            await vendor.shell(serial, "getprop ro.product.model")
            await vendor.shell(serial, "getprop ro.build.version.release")
            await vendor.shell(serial, "dumpsys battery")
            await vendor.press_key(serial, Key.HOME)
            await vendor.shell(serial, "am start -a android.intent.action.VIEW -d https://example.org/")
            await asyncio.sleep(0.3)  # the recipe's `wait` step
            await vendor.screenshot(serial, Path(spool))
            return time.perf_counter() - started
