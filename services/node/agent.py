"""`doai node`: wires the journal, scheduler, executor, inventory, commands and outbox together."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any

import structlog
from structlog.contextvars import bound_contextvars

from contracts.commands import RunBroadcast, RunCancel
from contracts.events import TERMINAL_TASK_STATES, TaskState
from contracts.subjects import node_inbox_prefix
from runtime import jetstream
from runtime.aio import pause
from runtime.supervisor import Supervisor
from services.node.artifacts import ArtifactStore, LocalArtifactStore
from services.node.commands import CommandConsumer
from services.node.driver import DeviceDriver
from services.node.enroll import NodeIdentity, node_identity
from services.node.executor import Executor
from services.node.factory import build_driver, build_store
from services.node.inventory import Inventory
from services.node.journal import Job, Journal
from services.node.outbox import Outbox
from services.node.scheduler import Scheduler
from services.node.settings import NodeSettings

log = structlog.get_logger(__name__)


class NodeAgent:
    def __init__(self, settings: NodeSettings, journal: Journal, driver: DeviceDriver,
                 store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.journal = journal
        self.driver = driver
        # A draining device (an abandoned request may still run on it) gets no new job until the drain ends.
        self.scheduler = Scheduler(settings.slots, is_draining=driver.drains.is_draining)
        driver.drains.on_drained = lambda serial: self.dispatch()
        self.tasks: dict[str, asyncio.Task[TaskState]] = {}  # serial -> running workflow
        self.outbox: Outbox | None = None
        self.commands: CommandConsumer | None = None
        self.identity: NodeIdentity | None = None
        self.loops: Supervisor | None = None  # the outbox, inventory and command loops while running
        self._stopping = False
        self.executor = Executor(
            node_id=settings.node_id, journal=journal, driver=driver,
            store=store or LocalArtifactStore(settings.artifact_dir), spool_dir=settings.spool_dir,
            path_template=settings.path_template,
        )
        self.inventory = Inventory(
            node_id=settings.node_id, driver=driver, scheduler=self.scheduler, journal=journal,
            on_event=self._wake_outbox, on_change=self._inventory_changed,
            list_timeout_s=settings.inventory_timeout_s, snapshot_s=settings.inventory_snapshot_s,
        )

    def _wake_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.wake()

    # -- scheduling ----------------------------------------------------------------

    def _inventory_changed(self) -> None:
        """A usable inventory arrived: skip the jobs of devices offline past the grace period, then fill slots."""
        for job in self.scheduler.expire_offline(self.settings.offline_grace_s):
            with bound_contextvars(run_id=job.run_id, node_id=self.settings.node_id, device_serial=job.serial):
                log.warning("Task skipped: device offline", grace_s=self.settings.offline_grace_s)
                self.executor.task_event(
                    job, "skipped",
                    error=f"device_offline: not online for {self.settings.offline_grace_s:g} s while queued",
                )
        self.dispatch()

    def dispatch(self) -> None:
        """Fill every free slot now (called whenever work arrives or a slot frees).

        Nothing starts while the command consumer is behind (at start and after a reconnect, until
        every waiting command was handled): a cancel that arrived meanwhile must win. Its catch-up
        calls this again when done.
        """
        if self._stopping or (self.commands is not None and self.commands.behind):
            return
        for job in self.scheduler.start_all():
            task = asyncio.create_task(self._run_job(job), name=f"job-{job.run_id}-{job.serial}")
            self.tasks[job.serial] = task
            # A done-callback, not a `finally`: it also runs for a task cancelled before it started.
            task.add_done_callback(functools.partial(self._job_done, job))

    async def _run_job(self, job: Job) -> TaskState:
        state: TaskState
        try:
            state = await self.executor.run(job, self.journal.broadcast(job.run_id))
        except Exception as exc:  # a bug must not take the other devices down (fail-soft)
            with bound_contextvars(run_id=job.run_id, node_id=self.settings.node_id, device_serial=job.serial):
                log.exception("Task crashed")
                self.executor.task_event(job, "failed", error=f"internal_error: {exc!r}")
            state = "failed"
        # The workflow is over: free its slot now rather than a loop turn later in `_job_done` (which
        # still runs, and finds nothing left to release).
        task = asyncio.current_task()
        if task is not None:
            self._release(job, task)
            self.dispatch()
        return state

    def _release(self, job: Job, task: asyncio.Task[Any]) -> None:
        if self.tasks.get(job.serial) is task:
            del self.tasks[job.serial]
        if self.scheduler.running.get(job.serial) is job:
            self.scheduler.finish(job.serial)

    def _job_done(self, job: Job, task: asyncio.Task[TaskState]) -> None:
        """Give the device and the slot back, then fill the free slots."""
        self._release(job, task)
        if task.cancelled() and job.cancel_requested and job.state not in TERMINAL_TASK_STATES:
            # Cancelled before the executor could record it (e.g. before its first step).
            with bound_contextvars(run_id=job.run_id, node_id=self.settings.node_id, device_serial=job.serial):
                self.executor.task_event(job, "cancelled", error="run cancelled")
                log.info("Task cancelled")
        self.dispatch()

    def on_broadcast(self, broadcast: RunBroadcast) -> None:
        """Journal an admitted broadcast (`admission.check_broadcast` passed) and queue its jobs.

        A device this node's driver never listed is not this node's: its job ends `skipped`
        (`unknown_device`) at once and nothing about it reaches the driver.
        """
        jobs = self.journal.add_broadcast(broadcast)
        with bound_contextvars(run_id=broadcast.run_id, node_id=self.settings.node_id):
            log.info("Run received", devices=len(broadcast.devices), new_jobs=len(jobs),
                     workflow_id=broadcast.workflow_id, workflow_version=broadcast.workflow_version)
        for job in jobs:
            if not self.journal.is_known_device(job.serial):
                with bound_contextvars(run_id=job.run_id, node_id=self.settings.node_id, device_serial=job.serial):
                    log.warning("Task skipped: device unknown to this node")
                    self.executor.task_event(
                        job, "skipped", error="unknown_device: this node's driver never listed this serial")
                continue
            self.scheduler.submit(job)
        self.journal.flush()  # the command is acked when this returns: its events are committed first
        self.dispatch()

    def on_cancel(self, cancel: RunCancel) -> None:
        self.journal.mark_cancelled(cancel.run_id)
        dropped = self.scheduler.remove_queued(lambda j: j.run_id == cancel.run_id)
        for job in dropped:
            self.executor.task_event(job, "cancelled", error="run cancelled")
        for job in list(self.scheduler.running.values()):
            if job.run_id == cancel.run_id:
                job.cancel_requested = True
                task = self.tasks.get(job.serial)
                if task is not None:
                    task.cancel()
        self.journal.flush()  # the command is acked when this returns: its events are committed first
        with bound_contextvars(run_id=cancel.run_id, node_id=self.settings.node_id):
            log.info("Run cancelled", dropped=len(dropped))

    def recover(self) -> None:
        """Re-queue what the journal says was unfinished when the agent last stopped.

        `running` jobs died mid-workflow: each becomes `interrupted`, then is
        re-queued with `attempt + 1` while `attempt < max_attempts`, else ends
        `failed`. Each transition is one journal transaction, and `interrupted`
        jobs are themselves unfinished, so a crash during recovery resumes here.
        """
        max_attempts = self.settings.max_attempts
        for job in self.journal.unfinished_jobs():
            with bound_contextvars(run_id=job.run_id, node_id=self.settings.node_id, device_serial=job.serial):
                if self.journal.is_cancelled(job.run_id):
                    self.executor.task_event(job, "cancelled", error="run cancelled")
                    continue
                if job.state == "running":
                    self.executor.task_event(job, "interrupted", error="agent stopped while the task ran")
                if job.state == "interrupted":
                    if job.attempt >= max_attempts:
                        log.warning("Task interrupted too often; failed", attempt=job.attempt)
                        self.executor.task_event(
                            job, "failed",
                            error=f"interrupted: agent stopped while the task ran (attempt {job.attempt} of "
                                  f"{max_attempts})",
                        )
                        continue
                    job.attempt += 1
                    log.info("Task interrupted; queued again", attempt=job.attempt)
                    self.executor.task_event(job, "queued")
            self.scheduler.submit(job)
        self.journal.flush()
        if self.scheduler.queued:
            log.info("journal recovered", node_id=self.settings.node_id, queued=self.scheduler.queued)

    async def prune_journal(self, stop: asyncio.Event) -> None:
        """Every `journal_prune_interval_s`, drop finished runs past their age (`Journal.prune`)."""
        s = self.settings
        while True:
            pruned = self.journal.prune(s.journal_max_age_s, s.journal_seen_max_age_s)
            if pruned.broadcasts or pruned.seen or pruned.refused:
                log.info("journal pruned", node_id=s.node_id, broadcasts=pruned.broadcasts, jobs=pruned.jobs,
                         seen_forgotten=pruned.seen, refused_events_dropped=pruned.refused)
            if pruned.refused:  # never published: PostgreSQL will not have them
                log.error("events set aside as too large for NATS dropped from the journal unsent, past their age",
                          node_id=s.node_id, refused_events_dropped=pruned.refused,
                          max_age_s=s.journal_seen_max_age_s)
            if await pause(stop, s.journal_prune_interval_s):
                return

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        s.check_command_key_source()
        identity = await node_identity(s, stop)
        self.identity = identity
        if not s.command_public_key:  # enrollment hands the node the backend's command-signing key
            s.command_public_key = identity.command_public_key
        verifier = s.command_verifier()  # no key, no start: never run unsigned commands
        nc = await jetstream.connect(s.nats_url, name=f"doai-node-{s.node_id}", stop=stop, creds=identity.creds,
                                     inbox_prefix=node_inbox_prefix(s.node_id), ca_file=s.nats_ca)
        try:
            js = nc.jetstream()
            # Streams and this node's consumer are declared by the backend (the node may not): the
            # command consumer binds to it and retries until it exists.
            self.outbox = Outbox(self.journal, js)
            # From here no job starts until the commands waiting for this node were read (cancel before restart).
            commands = self.commands = CommandConsumer(
                js, s.node_id, verifier=verifier, on_broadcast=self.on_broadcast, on_cancel=self.on_cancel, nc=nc,
                on_caught_up=self.dispatch, catch_up_s=s.command_catch_up_s)
            self.recover()
            outbox = self.outbox
            async with Supervisor(stop, f"node {s.node_id}") as loops:
                self.loops = loops
                loops.start("outbox", lambda: outbox.run(stop))
                loops.start("inventory", lambda: self.inventory.run(stop, s.inventory_interval_s))
                loops.start("journal", lambda: self.prune_journal(stop))
                await self.inventory.poll()  # know the devices before taking work
                await commands.catch_up(stop)  # a cancel that arrived while the node was down wins; then dispatch
                loops.start("commands", lambda: commands.run(stop))
                log.info("node agent ready", node_id=s.node_id, slots=s.slots, vendor=s.vendor_url)
                await stop.wait()
                self._stopping = True  # no new job starts while the running ones are cancelled
                for task in self.tasks.values():
                    task.cancel()
                for task in list(self.tasks.values()):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            # Bounded as a whole (one publish can wait longer than the drain's own deadline): the rest stays
            # journaled for the next start.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(outbox.drain(timeout_s=1.0), 1.5)
            if left := self.journal.outbox_size():  # not lost: published (same event ids) at the next start
                log.warning("events not acked by JetStream kept in the journal for the next start",
                            node_id=s.node_id, events=left)
        finally:
            await jetstream.close(nc)


async def run_node(settings: NodeSettings, stop: asyncio.Event) -> None:
    """A node agent until `stop`; its driver and store come from `factory` (chosen by config)."""
    settings.check_command_key_source()
    journal = Journal(settings.journal_path)
    driver = build_driver(settings)
    try:
        await NodeAgent(settings, journal, driver, build_store(settings)).run(stop)
    finally:
        await driver.close()
        journal.close()
