"""How a doai process is asked to stop: the same `stop` event on POSIX and on Windows.

On POSIX the event loop's `add_signal_handler` sets `stop` on SIGINT and
SIGTERM. Windows event loops have no `add_signal_handler` (node PCs are
Windows machines): there plain `signal.signal` handlers for SIGINT (Ctrl-C),
SIGBREAK (Ctrl-Break, what a service wrapper sends to a console process) and
SIGTERM hand the request to the loop with `call_soon_threadsafe`, so the
part shuts down through the same path (jobs cancelled and journaled, outbox
flushed) instead of dying on a KeyboardInterrupt.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from types import FrameType


def stop_signals() -> list[signal.Signals]:
    """SIGINT and SIGTERM, and SIGBREAK where it exists (Windows)."""
    found = [signal.SIGINT, signal.SIGTERM]
    brk = getattr(signal, "SIGBREAK", None)
    if brk is not None:
        found.append(brk)
    return found


def install_stop_handlers(stop: asyncio.Event, *, use_loop: bool | None = None) -> Callable[[], None]:
    """Set `stop` when the process is asked to stop; return a function that restores the old handlers.

    `use_loop=None` picks the loop's handlers where the platform has them
    (not on Windows); `False` forces the portable path (tests run it on Linux).
    Must be called from the main thread with the loop running.
    """
    loop = asyncio.get_running_loop()
    signals = stop_signals()
    previous = {sig: signal.getsignal(sig) for sig in signals}
    if use_loop is None:
        use_loop = sys.platform != "win32"
    if use_loop:
        try:
            for sig in signals:
                loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:
            pass
        else:
            def remove_loop_handlers() -> None:
                for sig in signals:
                    loop.remove_signal_handler(sig)
                    _restore(sig, previous[sig])
            return remove_loop_handlers

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stop.set)

    for sig in signals:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            _restore(sig, old)
    return restore


def _restore(sig: signal.Signals, old: signal._HANDLER) -> None:
    if old is not None:  # None: the old handler was not installed from Python; leave the default
        signal.signal(sig, old)
