"""What the aggregator checks on every message before the fold (the wire side of the trust boundary).

* The subject must be exactly `doai.evt.<node_id>.<kind>` (task, step and artifact
  events: `doai.evt.<node_id>.<kind>.<run_id>` with the event's run; the 4-token form
  of journals written before that layout is accepted), with the event's own
  `node_id` and kind: under NATS permissions a node may publish only on
  `doai.evt.<its id>.>`, so the subject is the authenticated sender and an event
  claiming another node is refused (`subject_mismatch`).
* A node timestamp later than the message's arrival in JetStream plus
  `max_skew` is clamped to that arrival time. The arrival time is JetStream's
  (it is part of the delivery metadata and the same on every redelivery), so
  the fold stays a function of the messages: replaying them gives the same rows.
  No event can then freeze a row in the future, and an honest node with a fast
  clock still has its events folded.
* Dead letters keep only the head of their payload (`DEAD_LETTER_KEEP_BYTES`)
  with its size and SHA-256, and a bounded subject and error text.

The checks that need PostgreSQL (the run exists; the backend created that task
on that node) are in `fold.py`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Final

import msgspec

from contracts.events import Event, event_kind
from contracts.subjects import RUN_EVENT_KINDS

# Reasons stored in `dead_letters.reason` (and logged).
UNDECODABLE: Final = "undecodable"  # not JSON, or not a valid event
SUBJECT_MISMATCH: Final = "subject_mismatch"  # not doai.evt.<event.node_id>.<event kind>[.<event.run_id>]
UNKNOWN_RUN: Final = "unknown_run"  # the run does not exist
UNKNOWN_TASK: Final = "unknown_task"  # the run exists, but the backend created no such task on that node
REFUSED_BY_DATABASE: Final = "refused_by_database"  # PostgreSQL refused the event's values
REASONS: Final = (UNDECODABLE, SUBJECT_MISMATCH, UNKNOWN_RUN, UNKNOWN_TASK, REFUSED_BY_DATABASE)

DEFAULT_MAX_SKEW_S: Final = 30.0
DEAD_LETTER_KEEP_BYTES: Final = 4096
DEAD_LETTER_SUBJECT_CHARS: Final = 256
DEAD_LETTER_ERROR_CHARS: Final = 2000


def subject_problem(subject: str, event: Event) -> str | None:
    """Why `subject` may not carry `event`, or None when it may."""
    tokens = subject.split(".")
    kind = event_kind(event)
    # A run's events end with the run id; a journal written before that layout holds 4-token subjects.
    sizes = (4, 5) if kind in RUN_EVENT_KINDS else (4,)
    if len(tokens) not in sizes or tokens[0] != "doai" or tokens[1] != "evt":
        return f"subject {clip(subject, 120)!r} is not doai.evt.<node_id>.<kind>[.<run_id>]"
    if tokens[2] != event.node_id:
        return f"published as node {clip(tokens[2], 80)!r} but the event claims node_id {event.node_id!r}"
    if tokens[3] != kind:
        return f"published as kind {clip(tokens[3], 40)!r} but the event is a {kind!r} event"
    run_id = getattr(event, "run_id", None)
    if len(tokens) == 5 and tokens[4] != run_id:
        return f"published for run {clip(tokens[4], 80)!r} but the event claims run_id {run_id!r}"
    return None


class SubjectCheck:
    """`subject_problem`, remembering the (subject, node, kind, run) combinations found good.

    A run's events repeat the same few subjects, so on the hot path the check is
    one dictionary lookup. Only good combinations are kept (refusals are
    recomputed, so junk cannot fill the memory), at most `max_entries`.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._good: set[tuple[str, str, type, str | None]] = set()
        self._max_entries = max_entries

    def __call__(self, subject: str, event: Event) -> str | None:
        key = (subject, event.node_id, type(event), getattr(event, "run_id", None))
        if key in self._good:
            return None
        problem = subject_problem(subject, event)
        if problem is None:
            if len(self._good) >= self._max_entries:
                self._good.clear()
            self._good.add(key)
        return problem


def clamp_future(event: Event, received_at: datetime, max_skew: timedelta) -> Event:
    """`event` with `ts` set to `received_at` when it lies more than `max_skew` after it."""
    if event.ts > received_at + max_skew:
        return msgspec.structs.replace(event, ts=received_at)
    return event


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def storable(text: str, limit: int) -> str:
    """`text` clipped, with NUL (which PostgreSQL text cannot hold) written as `\\x00`."""
    return clip(text, limit).replace("\x00", "\\x00")


def payload_digest(raw: bytes) -> tuple[bytes, int, str]:
    """What a dead letter keeps of a payload: its head, its size and the SHA-256 of all of it."""
    return raw[:DEAD_LETTER_KEEP_BYTES], len(raw), hashlib.sha256(raw).hexdigest()
