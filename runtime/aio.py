"""Small asyncio helpers shared by the services, and the one place that picks the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

T = TypeVar("T")

# Set to 0 to run on asyncio's own loop even where uvloop is installed.
UVLOOP_ENV = "DOAI_UVLOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the `uvloop` extra; POSIX only), else None: asyncio's.

    uvloop does not exist on Windows, where node PCs usually run: there the
    default loop (the proactor) is used, as it is when `DOAI_UVLOOP=0`.
    """
    if sys.platform == "win32":
        return None
    if os.environ.get(UVLOOP_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """Which loop `run` uses here: "uvloop" or "asyncio"."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop when it is installed: every doai entry point starts its loop here."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


class Stopped(Exception):
    """A start-up wait was abandoned because the process is stopping."""


async def unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event | None) -> T:
    """Await `awaitable`, or cancel it and raise `Stopped` as soon as `stop` is set."""
    if stop is None:
        return await awaitable
    return await finish_unless_stopped(awaitable, stop, grace_s=0.0)


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`, waking early when `stop` is set; return whether it is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
    return stop.is_set()


async def wait_for_wake(wake: asyncio.Event, stop: asyncio.Event, timeout_s: float) -> None:
    """Wait until `wake` or `stop` is set, or `timeout_s` passes (a poll that can be hurried)."""
    waiter = asyncio.ensure_future(wake.wait())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiter, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        stopper.cancel()


async def finish_unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event, grace_s: float) -> T:
    """Await `awaitable`; once `stop` is set, give it `grace_s` more, then cancel it (raises `Stopped`)."""
    task = asyncio.ensure_future(awaitable)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace_s)
    except BaseException:  # we were cancelled (a supervisor killing the loop): the attempt goes with us
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: S110 - cut off because we are stopping
        pass
    raise Stopped


async def drain_forever(
    once: Callable[[], Awaitable[int]],
    wake: asyncio.Event,
    stop: asyncio.Event,
    *,
    poll_s: float,
    what: str,
    first_backoff_s: float = 0.2,
    max_backoff_s: float = 30.0,
    stop_grace_s: float = 1.0,
    batch: int | None = None,
) -> None:
    """Call `once` until it returns 0 (or less than `batch`), then wait for `wake` (or `poll_s`); on errors back off.

    The loop of an outbox: whatever `once` did not finish stays where it was and
    is retried after `first_backoff_s`, doubling up to `max_backoff_s`. When
    `stop` is set, a `once` in flight gets `stop_grace_s` more and is then
    cancelled (what it did not finish stays for the next attempt): a hung
    server does not hold up a stop. With `batch`, a call that handled fewer
    items means it found nothing more (its source sets `wake` for anything
    added since, as `wake` is cleared first).
    """
    log = structlog.get_logger(__name__)
    backoff = first_backoff_s

    async def until_empty() -> None:
        while (done := await once()) and (batch is None or done >= batch):
            pass

    while not stop.is_set():
        wake.clear()
        try:
            await finish_unless_stopped(until_empty(), stop, stop_grace_s)
            backoff = first_backoff_s
        except Stopped:
            return
        except Exception as exc:
            log.warning(f"{what} failed; will retry", error=str(exc) or repr(exc), retry_in_s=backoff)
            await pause(stop, backoff)
            backoff = min(backoff * 2, max_backoff_s)
            continue
        await wait_for_wake(wake, stop, poll_s)
