"""A child process that must not outlive its parent: it watches a pipe the parent holds open.

The parent starts the child with `stdin=PIPE` and never closes its end while it
wants the child to run. When the parent closes it (an orderly stop) or dies in
any way (SIGKILL, a crash, a closed console on Windows), the operating system
closes the write end, the child reads end-of-file, and `watch_lifeline` sets the
child's `stop` event: the child shuts down through its usual path. Works the
same on Windows and POSIX (a blocking read in a daemon thread; no signals, no
fork-only tricks).
"""

from __future__ import annotations

import asyncio
import threading
from typing import BinaryIO

import structlog

log = structlog.get_logger(__name__)


def watch_lifeline(pipe: BinaryIO, stop: asyncio.Event, what: str = "parent") -> threading.Thread:
    """Set `stop` (on the running loop) once `pipe` reaches end-of-file; return the watching thread.

    Whatever the parent writes after the start is read and ignored. Call from the loop's thread.
    """
    loop = asyncio.get_running_loop()

    def watch() -> None:
        try:
            while pipe.read(4096):
                pass
        except (OSError, ValueError):
            pass  # a closed or broken pipe: the parent is gone as well
        log.info("lifeline closed; stopping", of=what)
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            pass  # the loop already ended

    thread = threading.Thread(target=watch, name=f"lifeline-{what}", daemon=True)
    thread.start()
    return thread
