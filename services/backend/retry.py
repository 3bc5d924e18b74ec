"""Retry of a finished run: a new run over exactly the devices of that run in some final states.

The new run takes the parent's workflow version, params and step timeouts, and records the parent in
`runs.parent_run_id` (migration 020). An `Idempotency-Key` works as for creation; the request's digest
is taken over the parent run id and the states, so the same key with another run or other states is a
409 `idempotency_key_reused`.
"""

from __future__ import annotations

import hashlib

import asyncpg
import msgspec

from contracts.api import FINISHED_RUN_STATUSES, DeviceRef, RunCreate, RunRetry, Targets
from contracts.recipe_model import default_step_timeout
from contracts.text import clip
from services.backend import runs, workflows
from services.backend.errors import ApiError
from services.backend.settings import IDEMPOTENCY_TTL_S


def retry_digest(run_id: str, body: RunRetry) -> str:
    doc = {"retry_of": run_id, "states": sorted(set(body.states))}
    return hashlib.sha256(msgspec.json.encode(doc, order="sorted")).hexdigest()


async def retry_run(pool: asyncpg.Pool, run_id: str, body: RunRetry, idempotency_ttl_s: float = IDEMPOTENCY_TTL_S,
                    idempotency_key: str | None = None, path_template: str | None = None) -> runs.Created:
    """409 `run_not_finished` while the run is still going; 422 `no_targets` when no device is in `states`."""
    rid = runs.parse_run_id(run_id)
    parent = await pool.fetchrow("SELECT * FROM runs WHERE run_id = $1", rid)
    if parent is None:
        raise ApiError(404, "run_not_found", f"unknown run {clip(run_id)}")
    if parent["status"] not in FINISHED_RUN_STATUSES:
        raise ApiError(409, "run_not_finished",
                       f"run {rid} is {parent['status']}: retry it once it has completed or been cancelled")
    states = sorted(set(body.states))
    rows = await pool.fetch("SELECT node_id, device_serial FROM run_tasks WHERE run_id = $1 AND state = ANY($2)"
                            " ORDER BY node_id, device_serial", rid, states)
    if not rows:
        raise ApiError(422, "no_targets", f"no device of run {rid} is in {', '.join(states)}",
                       [{"path": "$.states", "message": "no task of the run is in these states"}])
    stored = await workflows.get(pool, parent["workflow_id"], parent["workflow_version"])
    if stored is None:  # a run references its workflow version (foreign key)
        raise ApiError(404, "workflow_not_found", f"unknown workflow {parent['workflow_id']}")
    timeouts: dict[str, int] = msgspec.json.decode(parent["step_timeouts_ms"])
    # Only what differs from the recipe's defaults goes in as an override: the same effective timeouts.
    overrides = {s.id: timeouts[s.id] for s in stored.recipe.steps
                 if s.id in timeouts and timeouts[s.id] != default_step_timeout(stored.recipe, s)}
    create = RunCreate(
        workflow_id=parent["workflow_id"], workflow_version=parent["workflow_version"],
        params=msgspec.json.decode(parent["params"]), step_timeouts_ms=overrides,
        targets=Targets(devices=[DeviceRef(r["node_id"], r["device_serial"]) for r in rows]),
    )
    extra = {} if path_template is None else {"path_template": path_template}
    return await runs.create_run(pool, create, idempotency_ttl_s, idempotency_key, parent_run_id=str(rid),
                                 digest=retry_digest(str(rid), body), **extra)
