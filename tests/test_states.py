"""Task, step and run states are the contracts' Literals, and every part reads the same ones."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest

from contracts.api import FINISHED_RUN_STATUSES, RUN_STATUSES, RunOutcome, RunSummary, StepView
from contracts.events import (
    DONE_TASK_STATES,
    RECORDED_TASK_STATES,
    STEP_STATES,
    TASK_STATES,
    TERMINAL_STEP_STATES,
    TERMINAL_TASK_STATES,
    TaskEvent,
)
from doai.api_client import FINAL_TASK_STATES, progress
from doai.cli import build_parser
from services.aggregator.fold import DONE, TERMINAL, TERMINAL_STEP
from services.aggregator.housekeeping import OPEN_STATES
from services.backend.runs import outcome_of


def test_the_state_sets_are_made_of_the_literals() -> None:
    assert set(TASK_STATES) < set(RECORDED_TASK_STATES) and set(RECORDED_TASK_STATES) - set(TASK_STATES) == {"lost"}
    assert TERMINAL_TASK_STATES < set(TASK_STATES)
    assert DONE_TASK_STATES == TERMINAL_TASK_STATES | {"lost"}
    assert TERMINAL_STEP_STATES == set(STEP_STATES) - {"started"}
    assert FINISHED_RUN_STATUSES < set(RUN_STATUSES)
    assert set(FINAL_TASK_STATES) <= set(RECORDED_TASK_STATES)
    # The aggregator's SQL parameters are the contracts' sets, not copies of them.
    assert set(TERMINAL) == TERMINAL_TASK_STATES and set(DONE) == DONE_TASK_STATES
    assert set(TERMINAL_STEP) == TERMINAL_STEP_STATES
    assert set(OPEN_STATES) == set(TASK_STATES) - TERMINAL_TASK_STATES
    assert {outcome_of(s, 1, 1) for s in RUN_STATUSES} <= {None, *get_args(RunOutcome)}


def test_a_state_outside_the_literal_is_refused_at_every_decode() -> None:
    event = {"kind": "task", "event_id": "e1", "ts": "2026-11-29T10:00:00Z", "node_id": "n1", "run_id": "r1",
             "device_serial": "S1", "seq": 1, "state": "lost"}
    with pytest.raises(msgspec.ValidationError, match="state"):  # a node never reports `lost`
        msgspec.convert(event, TaskEvent)
    with pytest.raises(msgspec.ValidationError, match="state"):
        msgspec.convert({"step_id": "s", "index": 0, "action": "tap", "state": "done", "started_at": None,
                         "finished_at": None, "output": None, "error": None}, StepView)
    summary = {"run_id": "r", "workflow_id": "w", "workflow_version": 1, "status": "running",
               "created_at": "x", "dispatched_at": None, "finished_at": None, "targets": 1}
    assert msgspec.convert({**summary, "counts": {"lost": 1}}, RunSummary).counts == {"lost": 1}
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**summary, "counts": {"vanished": 1}}, RunSummary)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**summary, "status": "finished", "counts": {}}, RunSummary)


def test_doai_runs_offers_exactly_the_api_states(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for state in RECORDED_TASK_STATES:
        assert parser.parse_args(["runs", "show", "r", "--tasks", "--state", state]).state == state
    for status in RUN_STATUSES:
        assert parser.parse_args(["runs", "ls", "--status", status]).status == status
    for argv in (["runs", "show", "r", "--state", "done"], ["runs", "ls", "--status", "finished"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_progress_reads_a_run_summary() -> None:
    p = progress({"run_id": "r", "workflow_id": "w", "workflow_version": 2, "status": "completed", "targets": 3,
                  "counts": {"succeeded": 2, "lost": 1}})
    assert p.finished and p.done == 3 and p.outcome == "failed" and p.exit_code() == 1
