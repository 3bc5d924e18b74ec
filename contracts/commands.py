"""Commands the backend sends to one node on `doai.cmd.<node_id>`."""

from __future__ import annotations

from datetime import datetime

from msgspec import Struct

from contracts.recipe_model import Recipe


class RunBroadcast(Struct, tag_field="type", tag="run", kw_only=True):
    """Run `recipe` once on each of `devices` (serials of this node, already resolved)."""

    run_id: str
    node_id: str
    workflow_id: str
    workflow_version: int
    recipe: Recipe  # snapshot: the node never fetches a workflow by itself
    params: dict[str, str]
    step_timeouts_ms: dict[str, int]  # effective timeout of every step, overrides applied
    devices: list[str]
    created_at: datetime


class RunCancel(Struct, tag_field="type", tag="cancel", kw_only=True):
    run_id: str
    node_id: str


Command = RunBroadcast | RunCancel
