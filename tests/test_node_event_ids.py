"""Node event ids: unique within a process, between processes (nodes, restarts) and after a fork."""

from __future__ import annotations

import os

import msgspec

from contracts.events import EventId
from services.node import event_ids
from services.node.event_ids import EventIds, new_event_id


def test_ids_of_one_process_never_repeat_and_fit_the_contract() -> None:
    ids = [new_event_id() for _ in range(200_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 36 and i.count("-") == 4 for i in ids[:1000])
    assert msgspec.convert(ids[0], EventId) == ids[0]


def test_two_processes_share_no_id() -> None:
    """Two generators are two node processes (or one node before and after a restart): independent keys."""
    a, b = EventIds(), EventIds()
    assert not {a.next() for _ in range(20_000)} & {b.next() for _ in range(20_000)}


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_event_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then gone without running the parent's cleanup
        try:
            os.write(write, "\n".join(event_ids.new_event_id() for _ in range(500)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    parent = {new_event_id() for _ in range(500)}
    assert len(child) == 500
    assert not child & parent
