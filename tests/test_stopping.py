"""A stop request reaches the part's `stop` event on the Windows path too (no add_signal_handler there)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from runtime.aio import Stopped, drain_forever, finish_unless_stopped
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


async def test_an_attempt_in_flight_gets_its_grace_after_stop_then_is_cut_off() -> None:
    """`finish_unless_stopped` / `drain_forever`: a hung server does not hold up a stop (issue 10 item 9)."""
    stop = asyncio.Event()
    hung_cancelled = asyncio.Event()

    async def hung() -> int:
        try:
            await asyncio.sleep(3600)
        finally:
            hung_cancelled.set()
        return 1

    async def finishes_in(seconds: float) -> int:
        await asyncio.sleep(seconds)
        return 7

    attempt = asyncio.ensure_future(finish_unless_stopped(hung(), stop, grace_s=0.3))
    await asyncio.sleep(0.05)
    assert not attempt.done()
    started = time.monotonic()
    stop.set()
    with pytest.raises(Stopped):
        await attempt
    assert 0.25 <= time.monotonic() - started < 2.0 and hung_cancelled.is_set()
    # Within its grace an attempt still finishes and its result counts.
    assert await finish_unless_stopped(finishes_in(0.1), stop, grace_s=2.0) == 7

    # The outbox loop: a publish hung on a frozen server ends the loop within the grace.
    stop = asyncio.Event()
    hung_cancelled.clear()
    loop = asyncio.ensure_future(drain_forever(hung, asyncio.Event(), stop, poll_s=1.0, what="test",
                                               stop_grace_s=0.3))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(loop, 2.0)
    assert time.monotonic() - started < 2.0 and hung_cancelled.is_set()


async def test_a_cancelled_caller_takes_its_attempt_with_it() -> None:
    """A supervisor that kills the loop leaves no attempt running on its own (no second publisher)."""
    stop = asyncio.Event()
    hung_cancelled = asyncio.Event()

    async def hung() -> int:
        try:
            await asyncio.sleep(3600)
        finally:
            hung_cancelled.set()
        return 1

    caller = asyncio.ensure_future(finish_unless_stopped(hung(), stop, grace_s=5.0))
    await asyncio.sleep(0.05)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(hung_cancelled.wait(), 1.0)
