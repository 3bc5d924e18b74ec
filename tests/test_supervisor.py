"""Background loops never die silently: a crash is logged and restarted, or ends the part with a clear error."""

from __future__ import annotations

import asyncio

import pytest

from runtime.supervisor import LoopFailed, Supervisor


async def until(predicate: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_crashed_loop_is_restarted_with_backoff_and_counted() -> None:
    stop = asyncio.Event()
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise RuntimeError(f"boom {runs}")
        await stop.wait()

    async with Supervisor(stop, "test", first_backoff_s=0.01) as sup:
        sup.start("flaky", flaky)
        await until(lambda: runs == 3)
        assert sup.restarts["flaky"] == 2 and not sup.tasks["flaky"].done()
        stop.set()
    assert sup.tasks["flaky"].done() and not sup.tasks["flaky"].cancelled()


async def test_a_loop_that_returns_while_the_part_runs_is_restarted() -> None:
    stop = asyncio.Event()
    runs = 0

    async def quits() -> None:
        nonlocal runs
        runs += 1
        if runs > 1:
            await stop.wait()

    async with Supervisor(stop, "test", first_backoff_s=0.01) as sup:
        sup.start("quits", quits)
        await until(lambda: runs == 2)
        stop.set()
    assert sup.restarts["quits"] == 1


async def test_a_loop_that_must_not_restart_stops_the_part_gracefully_and_is_reported() -> None:
    stop = asyncio.Event()
    sibling_ended_normally = asyncio.Event()

    async def sibling() -> None:
        await stop.wait()  # the way every loop ends: it sees `stop` and finishes its work
        sibling_ended_normally.set()

    async def fatal() -> None:
        await asyncio.sleep(0.01)
        raise OSError("disk gone")

    with pytest.raises(LoopFailed, match="the journal loop failed: OSError") as caught:
        async with Supervisor(stop, "test") as sup:
            sup.start("other", sibling)
            sup.start("journal", fatal, restart=False)
            await stop.wait()
    assert stop.is_set() and sibling_ended_normally.is_set()
    assert isinstance(caught.value.__cause__, OSError)


async def test_a_loop_ignoring_stop_is_cancelled_after_the_grace_period() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        await asyncio.Event().wait()  # never returns by itself

    async with Supervisor(stop, "test", grace_s=0.05) as sup:
        sup.start("stubborn", stubborn)
        stop.set()
    assert sup.tasks["stubborn"].cancelled()


async def test_a_killed_loop_is_restarted_but_stopping_still_ends_it() -> None:
    stop = asyncio.Event()
    runs = 0

    async def worker() -> None:
        nonlocal runs
        runs += 1
        await stop.wait()

    async with Supervisor(stop, "test", first_backoff_s=0.01) as sup:
        sup.start("worker", worker)
        await until(lambda: runs == 1)
        sup.running["worker"].cancel()  # killed from outside, as a crash would end it
        await until(lambda: runs == 2)
        assert sup.restarts["worker"] == 1
        stop.set()
    assert runs == 2 and not sup.tasks["worker"].cancelled()
