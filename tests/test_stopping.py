"""A stop request reaches the part's `stop` event on the Windows path too (no add_signal_handler there)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from runtime.stopping import install_stop_handlers


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("use_loop", [False, None], ids=["windows-path", "platform-default"])
async def test_a_stop_signal_sets_the_event_and_the_loop_goes_on(sig: signal.Signals, use_loop: bool | None) -> None:
    stop = asyncio.Event()
    before = signal.getsignal(sig)
    restore = install_stop_handlers(stop, use_loop=use_loop)
    try:
        signal.raise_signal(sig)
        await asyncio.wait_for(stop.wait(), 5)
        # The loop is still alive and serving other work: a stop is a request, not a crash.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
    finally:
        restore()
    assert signal.getsignal(sig) == before
