"""Nothing outlives its parent: a small guardian process that stops a parent's children when the parent dies.

A process that starts long-lived children (`doai up`: nats-server, PostgreSQL,
worker processes) starts one watchdog (`Watchdog.start()`, or the process-wide
`shared_watchdog()`) and registers each child with `watch(...)`. The watchdog
is a separate Python process (`python -m runtime.watchdog`) that reads
commands from a pipe whose only writer is the parent. When that pipe closes —
the parent exited, crashed or was killed with SIGKILL, on any OS, Windows
included — the watchdog stops every child still registered:

1. the child is checked to still be the process that was registered (pid and
   creation time, so a reused pid is never touched);
2. its stop command runs if it has one (e.g. `pg_ctl stop -m fast` on
   Windows), else it gets its stop signal (SIGTERM by default; SIGINT is
   PostgreSQL's fast shutdown), plus SIGCONT so a stopped (SIGSTOP) child
   handles it;
3. after `grace_s` it is killed (SIGKILL; TerminateProcess on Windows).

A parent that stops a child itself calls `forget(name)` first; `close()` at
the end is an orderly goodbye (nothing left to stop). The watchdog runs in
its own session / process group, so a Ctrl-C on the terminal reaches the
parent (which stops its children politely) and not the watchdog.

Children must be started with `subprocess` (close_fds, the default) or the
`spawn` start method, not a bare `fork`: a forked child inherits the pipe's
write end and the watchdog would only see the pipe close when that child
exits too.

Protocol (one JSON object per line on the watchdog's stdin; the watchdog
answers each with one line `ok` or `error ...` on its stdout):
`{"op": "watch", "name", "pid", "create_time", "stop_argv", "stop_signal", "grace_s"}`,
`{"op": "forget", "name"}`.
"""

from __future__ import annotations

import atexit
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import psutil

DEFAULT_GRACE_S = 5.0


class WatchdogError(RuntimeError):
    """The watchdog could not be started or did not answer."""


@dataclass(frozen=True)
class Guarded:
    """One child the watchdog stops when the parent dies."""

    name: str
    pid: int
    create_time: float  # psutil's creation time of `pid`: a reused pid is never stopped
    stop_argv: tuple[str, ...] = ()  # run first when given (bounded by grace_s), else stop_signal
    stop_signal: int = int(signal.SIGTERM)
    grace_s: float = DEFAULT_GRACE_S


def process_create_time(pid: int) -> float:
    """The creation time psutil reports for `pid` (what `Guarded.create_time` holds)."""
    return float(psutil.Process(pid).create_time())


def is_same_process(pid: int, create_time: float) -> bool:
    """`pid` is alive and is the process that had `create_time` (not a reused pid, not a zombie)."""
    try:
        proc = psutil.Process(pid)
        if abs(float(proc.create_time()) - create_time) > 0.01:
            return False
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def wait_gone(pid: int, create_time: float, timeout_s: float) -> bool:
    """Poll until the process is gone (or became a zombie); True if it is gone within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while is_same_process(pid, create_time):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop_process(target: Guarded) -> str:
    """Stop one guarded child: its stop command or signal, then a kill after the grace period.

    Returns what happened ("gone", "stopped", "killed"); used by the watchdog and by
    the parent for a stale server of an earlier run (same rules, same identity check).
    """
    if not is_same_process(target.pid, target.create_time):
        return "gone"
    if target.stop_argv:
        try:
            subprocess.run(list(target.stop_argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=target.grace_s, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        _signal(target.pid, target.stop_signal)
    if wait_gone(target.pid, target.create_time, target.grace_s):
        return "stopped"
    try:
        if is_same_process(target.pid, target.create_time):
            psutil.Process(target.pid).kill()  # SIGKILL; TerminateProcess on Windows
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    wait_gone(target.pid, target.create_time, 5.0)
    return "killed"


def _signal(pid: int, sig: int) -> None:
    try:
        proc = psutil.Process(pid)
        if sys.platform == "win32":
            proc.terminate()  # Windows has no catchable stop signal for a console-less child
            return
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) child handles the signal too
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


@dataclass
class Watchdog:
    """The parent's handle on its watchdog process (see the module docstring)."""

    proc: subprocess.Popen[bytes]
    guarded: dict[str, Guarded] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def start(cls, timeout_s: float = 15.0) -> Watchdog:
        """Start the watchdog process; returns once it answered (it guards nothing yet)."""
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # no Ctrl-C, and no console whose closing would end it before the parent
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        proc = subprocess.Popen([sys.executable, "-m", "runtime.watchdog"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, **kwargs)
        dog = cls(proc)
        dog._ask({"op": "ping"}, timeout_s)
        return dog

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def watch(self, name: str, pid: int, *, stop_argv: Sequence[str] = (), stop_signal: int = int(signal.SIGTERM),
              grace_s: float = DEFAULT_GRACE_S, create_time: float | None = None) -> Guarded:
        """Guard `pid` under `name` (a later `watch` with the same name replaces it)."""
        target = Guarded(name, pid, process_create_time(pid) if create_time is None else create_time,
                         tuple(stop_argv), int(stop_signal), grace_s)
        self._ask({"op": "watch", **asdict(target)})
        self.guarded[name] = target
        return target

    def forget(self, name: str) -> None:
        """Stop guarding `name` (the parent stopped it itself, or hands it over)."""
        if self.guarded.pop(name, None) is not None and self.alive():
            self._ask({"op": "forget", "name": name})

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the pipe: the watchdog stops whatever is still guarded, then exits (waited for, bounded)."""
        with self._lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout_s + max((g.grace_s for g in self.guarded.values()), default=0.0))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.guarded.clear()

    def _ask(self, command: dict[str, Any], timeout_s: float = 15.0) -> None:
        with self._lock:
            stdin, stdout = self.proc.stdin, self.proc.stdout
            if stdin is None or stdout is None or stdin.closed:
                raise WatchdogError("the watchdog is closed")
            try:
                stdin.write(json.dumps(command).encode() + b"\n")
                stdin.flush()
            except OSError as exc:
                raise WatchdogError(f"the watchdog (pid {self.proc.pid}) is gone: {exc}") from exc
            answer = _readline(stdout, timeout_s)
        if answer != b"ok":
            raise WatchdogError(f"the watchdog (pid {self.proc.pid}) answered {answer!r} to {command['op']}")


def _readline(stream: IO[bytes], timeout_s: float) -> bytes:
    """One answer line, or b"" after `timeout_s` (a thread: pipes cannot be polled on Windows)."""
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0].strip() if result else b""


_shared: Watchdog | None = None
_shared_lock = threading.Lock()


def shared_watchdog() -> Watchdog:
    """This process's watchdog, started on first use and closed at exit (then it stops what is left)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive():
            _shared = Watchdog.start()
            atexit.register(_shared.close)
        return _shared


# --- the watchdog process -------------------------------------------------------------------------------


def serve(commands: IO[bytes], answers: IO[bytes]) -> dict[str, Guarded]:
    """Read commands until the pipe closes; return what is still guarded then."""
    guarded: dict[str, Guarded] = {}
    for raw in iter(commands.readline, b""):
        try:
            command = json.loads(raw)
            op = command.pop("op")
            if op == "watch":
                command["stop_argv"] = tuple(command.get("stop_argv") or ())
                target = Guarded(**command)
                guarded[target.name] = target
            elif op == "forget":
                guarded.pop(command["name"], None)
            elif op != "ping":
                raise ValueError(f"unknown op {op!r}")
            answers.write(b"ok\n")
        except (ValueError, TypeError, KeyError) as exc:
            answers.write(f"error {exc}\n".encode())
        answers.flush()
    return guarded


def main() -> int:
    if sys.platform != "win32":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C; we wait for its pipe
    left = serve(sys.stdin.buffer, sys.stdout.buffer)
    # The parent is gone (or said goodbye): stop what it left, all at once (each bounded by its grace).
    threads = [threading.Thread(target=stop_process, args=(t,), daemon=True) for t in left.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
