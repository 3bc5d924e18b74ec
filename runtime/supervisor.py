"""One lifecycle for every part's background loops: an `asyncio.TaskGroup` that never lets a loop die silently.

A part starts its long-running loops (outbox, inventory, command consumer,
relay, fold) with `Supervisor.start`. Each loop runs until the part's `stop`
event is set. When a loop raises, or returns while the part is not stopping:

* `restart=True` (the default): the crash is logged with the loop's name and
  the loop is started again after a backoff (0.5 s doubling to 30 s, reset
  after it ran for a minute); `restarts[name]` counts it;
* `restart=False`: the failure sets `stop`, so the other loops end the way
  they always do (jobs journaled, outboxes flushed), and leaving the block
  raises `LoopFailed` naming the loop; the part's caller exits non-zero so the
  service manager restarts the process.

Leaving the `async with` block normally waits until `stop` is set (by the
part's signal handler, its caller, or a failed loop), then up to `grace_s` for
the loops to finish, and cancels the rest. An exception in the block cancels
the loops at once.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ClassVar

import structlog

from runtime.aio import pause

log = structlog.get_logger(__name__)

Loop = Callable[[], Awaitable[None]]


class LoopFailed(RuntimeError):
    """A loop that must not be restarted ended; the message names it."""


class Supervisor:
    # The supervisors running in this process (for health reports and tests that kill a loop).
    live: ClassVar[weakref.WeakSet[Supervisor]] = weakref.WeakSet()

    def __init__(self, stop: asyncio.Event, part: str, *, grace_s: float = 10.0,
                 first_backoff_s: float = 0.5, max_backoff_s: float = 30.0, healthy_after_s: float = 60.0) -> None:
        self.stop = stop
        self.part = part
        self.grace_s = grace_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.restarts: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}  # the supervising task of each loop
        self.running: dict[str, asyncio.Future[None]] = {}  # the loop's current run (what a crash ends)
        self.failure: LoopFailed | None = None  # the first loop that ended the part
        self._group = asyncio.TaskGroup()

    async def __aenter__(self) -> Supervisor:
        await self._group.__aenter__()
        Supervisor.live.add(self)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
        if exc is None:
            await self.stop.wait()  # the loops run until the part stops (or one of them stops it)
        Supervisor.live.discard(self)
        if exc is None:
            pending = [t for t in self.tasks.values() if not t.done()]
            if pending:
                _, late = await asyncio.wait(pending, timeout=self.grace_s)
                for task in late:
                    log.warning("loop did not stop in time; cancelled", part=self.part, loop=task.get_name(),
                                grace_s=self.grace_s)
                    task.cancel()
        try:
            await self._group.__aexit__(kind, exc, tb)
        except BaseExceptionGroup as group:
            # One clear error for the caller (the CLI prints it as one line), not a group of one.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        if self.failure is not None and exc is None:
            raise self.failure
        return None

    def start(self, name: str, loop: Loop, *, restart: bool = True) -> asyncio.Task[None]:
        """Run `loop()` under supervision until `stop` is set."""
        task = self._group.create_task(self._keep(name, loop, restart), name=f"{self.part}:{name}")
        self.tasks[name] = task
        return task

    def _fail(self, failure: LoopFailed, cause: BaseException | None) -> None:
        failure.__cause__ = cause
        if self.failure is None:
            self.failure = failure
        self.stop.set()

    async def _keep(self, name: str, loop: Loop, restart: bool) -> None:
        backoff = self.first_backoff_s
        self.restarts.setdefault(name, 0)
        while True:
            started = time.monotonic()
            inner = asyncio.ensure_future(loop())
            self.running[name] = inner
            try:
                await inner
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the supervisor itself is being cancelled
                # Only the loop was cancelled (killed from outside): a crash like any other.
                if not restart:
                    self._fail(LoopFailed(f"{self.part}: the {name} loop was killed"), None)
                    return
                log.error("loop was killed; restarting", part=self.part, loop=name, retry_in_s=backoff)
            except Exception as exc:
                if not restart:
                    log.exception("loop failed; stopping the part", part=self.part, loop=name)
                    self._fail(LoopFailed(f"{self.part}: the {name} loop failed: {exc!r}"), exc)
                    return
                log.exception("loop crashed; restarting", part=self.part, loop=name, retry_in_s=backoff)
            else:
                if self.stop.is_set():
                    return
                if not restart:
                    log.error("loop ended while the part was running; stopping the part", part=self.part, loop=name)
                    self._fail(LoopFailed(f"{self.part}: the {name} loop ended while the part was running"), None)
                    return
                log.error("loop ended while the part was running; restarting", part=self.part, loop=name,
                          retry_in_s=backoff)
            if time.monotonic() - started >= self.healthy_after_s:
                backoff = self.first_backoff_s
            if await pause(self.stop, backoff):
                return
            backoff = min(backoff * 2, self.max_backoff_s)
            self.restarts[name] += 1
            log.info("loop restarted", part=self.part, loop=name, restarts=self.restarts[name])
