"""Runs one device's workflow from its first step to its last while the device holds its slot.

Every state change becomes an event recorded in the journal (and so the
outbox); the executor awaits the journal's commit (`Journal.durable`) before a
step reaches the device, so what the phone does next is always preceded by
the committed events about what came before. A failing step ends the device's task
(unless the step says `on_error: continue`); it never touches other devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path
from typing import Any, Literal

import structlog
from structlog.contextvars import bound_contextvars

from contracts.commands import RunBroadcast
from contracts.events import ArtifactEvent, StepEvent, StepState, TaskEvent, TaskState
from contracts.ids import utcnow
from contracts.local_names import local_segment
from contracts.recipe_model import StepBase, default_step_timeout, step_timeout_bounds
from runtime.paths import PathEscape, contained_below
from services.node.artifacts import ArtifactStore, StoredArtifact
from services.node.driver import DeviceDriver
from services.node.errors import NodeError
from services.node.event_ids import new_event_id
from services.node.journal import Job, Journal
from services.node.steps import StepContext, clip, execute, failure_screenshot
from services.node.vendor_client import VendorTimeout

log = structlog.get_logger(__name__)


def step_timeout_s(b: RunBroadcast, step: StepBase) -> float:
    """The step's limit for this run: the broadcast's effective timeout, kept within the recipe's bounds.

    The backend already refuses overrides outside the bounds (422); a broadcast
    from elsewhere that carries one is clamped here, and said so in the log.
    """
    ms = b.step_timeouts_ms.get(step.id, default_step_timeout(b.recipe, step))
    lo, hi = step_timeout_bounds(b.recipe, step)
    if not lo <= ms <= hi:
        log.warning("step timeout outside the recipe's bounds; clamped", step_id=step.id, timeout_ms=ms,
                    min_ms=lo, max_ms=hi)
        ms = min(max(ms, lo), hi)
    return ms / 1000


class Executor:
    def __init__(self, *, node_id: str, journal: Journal, driver: DeviceDriver, store: ArtifactStore,
                 spool_dir: Path, path_template: str) -> None:
        self.node_id = node_id
        self.journal = journal
        self.driver = driver
        self.store = store
        self.spool_dir = spool_dir
        self._spool_root = spool_dir.resolve()  # resolved once: each task's folder costs two `lstat`s
        self.path_template = path_template

    def task_event(self, job: Job, state: TaskState, error: str | None = None,
                   failed_step: str | None = None) -> None:
        job.seq += 1
        self.journal.record(job, state, TaskEvent(
            event_id=new_event_id(), ts=utcnow(), node_id=self.node_id, run_id=job.run_id,
            device_serial=job.serial, seq=job.seq, state=state,
            attempt=job.attempt, error=error, failed_step=failed_step,
        ))

    def _step_event(self, job: Job, index: int, step_id: str, action: str, state: StepState,
                    output: str | None = None, error: str | None = None) -> None:
        job.seq += 1
        self.journal.record(job, None, StepEvent(
            event_id=new_event_id(), ts=utcnow(), node_id=self.node_id, run_id=job.run_id,
            device_serial=job.serial, seq=job.seq, step_id=step_id, index=index, action=action,
            state=state, output=clip(output), error=error,
        ))

    def _artifact_event(self, job: Job, step_id: str, a: StoredArtifact,
                        kind: Literal["screenshot", "failure"] = "screenshot") -> None:
        job.seq += 1
        self.journal.record(job, None, ArtifactEvent(
            event_id=new_event_id(), ts=utcnow(), node_id=self.node_id, run_id=job.run_id,
            device_serial=job.serial, seq=job.seq, step_id=step_id, store=a.store, key=a.key,
            uri=a.uri, bytes=a.bytes, sha256=a.sha256, purpose=kind,
        ))

    async def run(self, job: Job, broadcast: RunBroadcast) -> TaskState:
        """Run the workflow on the job's device; return the task's final state."""
        with bound_contextvars(run_id=job.run_id, node_id=self.node_id, device_serial=job.serial):
            try:
                spool = contained_below(self._spool_root, job.run_id, local_segment(job.serial))
            except PathEscape as exc:  # admission refuses such ids; a symlink planted in the spool gets here
                log.error("Task failed: spool folder outside the spool", error=str(exc))
                self.task_event(job, "failed", error=f"{exc.code}: {exc}")
                return "failed"
            ctx = StepContext(
                driver=self.driver, store=self.store, serial=job.serial,
                values={**broadcast.params, "run_id": job.run_id, "node_id": self.node_id,
                        "device_serial": job.serial},
                spool=spool, path_template=self.path_template,
            )
            self.task_event(job, "running")
            jlog = log.bind()  # one logger for the task (each call on the module's lazy proxy binds anew)
            jlog.info("Task started", workflow_id=broadcast.workflow_id, attempt=job.attempt)
            try:
                state, error, failed_step = await self._steps(job, broadcast, ctx, jlog)
            except asyncio.CancelledError:
                if job.cancel_requested:
                    current = asyncio.current_task()
                    if current is not None:
                        current.uncancel()  # handled: the slot is free for the next device
                    self.task_event(job, "cancelled", error="run cancelled")
                    jlog.info("Task cancelled")
                    return "cancelled"
                raise  # agent shutting down: the journal keeps it `running` for recovery
            self.task_event(job, state, error=error, failed_step=failed_step)
            jlog.info("Task finished", state=state, error=error)
            if state == "succeeded" and spool.exists():  # not needed any more: removed off the event loop
                await asyncio.to_thread(_remove_spool, spool)
            return state

    async def _steps(self, job: Job, b: RunBroadcast, ctx: StepContext,
                     jlog: Any) -> tuple[TaskState, str | None, str | None]:
        for index, step in enumerate(b.recipe.steps):
            action = type(step).__struct_config__.tag
            assert isinstance(action, str)
            timeout_s = step_timeout_s(b, step)
            outcome: Literal["ok", "failed", "timed_out"] = "failed"
            error: str | None = None
            for attempt in range(step.retries + 1):
                self._step_event(job, index, step.id, action, "started")
                await self.journal.durable()  # committed (with every event before it) before the device acts
                jlog.info("Step started", step_id=step.id, action=action, try_=attempt + 1)
                try:
                    async with asyncio.timeout(timeout_s):
                        result = await execute(step, ctx, timeout_s)
                except (TimeoutError, VendorTimeout):
                    # The vendor's own request timeout is the step's limit too: either way it is the step's.
                    outcome, error = "timed_out", f"step_timeout: no result within {timeout_s:g} s"
                except NodeError as exc:  # a refusal or failure the node raises on purpose: its own code
                    outcome, error = "failed", f"{exc.code}: {exc}"
                except Exception as exc:  # a bug in doai or a library: this device fails, the others go on
                    jlog.exception("Step raised an unexpected error", step_id=step.id, action=action)
                    outcome, error = "failed", f"internal_error: {exc!r:.300}"
                else:
                    ctx.outputs[step.id] = result.output or ""
                    ctx.states[step.id] = "ok"
                    if result.artifact is not None:
                        self._artifact_event(job, step.id, result.artifact)
                    self._step_event(job, index, step.id, action, "ok", output=result.output)
                    jlog.info("Step ok", step_id=step.id)
                    outcome = "ok"
                    break
                self._step_event(job, index, step.id, action, outcome, error=error)
                jlog.warning("Step did not succeed", step_id=step.id, state=outcome, error=error)
            if outcome == "ok":
                continue
            ctx.states[step.id] = outcome
            if b.recipe.takes_failure_screenshots:
                await self.journal.durable()  # the step's failure is committed before the device is touched again
                # No longer than the step itself had (a hung device must not hold its slot much longer).
                shot = await failure_screenshot(ctx, step.id, min(timeout_s, b.recipe.timeouts.upload_ms / 1000))
                if shot is not None:
                    self._artifact_event(job, step.id, shot, kind="failure")
                    jlog.info("Failure screenshot stored", step_id=step.id, key=shot.key)
            if step.on_error == "continue":
                continue
            for later_index, later in enumerate(b.recipe.steps[index + 1:], start=index + 1):
                later_action = type(later).__struct_config__.tag
                self._step_event(job, later_index, later.id, str(later_action), "skipped")
            return ("timed_out" if outcome == "timed_out" else "failed"), error, step.id
        return "succeeded", None, None


def _remove_spool(spool: Path) -> None:
    """A succeeded task's spool folder, and the run's folder once no device of it has anything left."""
    with contextlib.suppress(OSError):
        shutil.rmtree(spool)
        spool.parent.rmdir()
