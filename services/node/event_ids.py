"""Event ids for this node's events: unique across nodes, restarts and forked processes, unguessable, cheap.

A workflow records 12 events; `uuid.uuid4()` costs a system call (16 bytes from the OS) and a UUID
object per id. Here each process draws a 256-bit key once and an id is the keyed BLAKE2b of a
per-process counter (128 bits, written like a UUID): within a process ids never repeat (a PRF of
distinct inputs, collisions as likely as between random 128-bit values); two processes (other nodes,
a restart, a forked worker: the key is drawn again in the child) have independent keys; and without
the key the next id cannot be derived from earlier ones, as with uuid4. JetStream (`Nats-Msg-Id`)
and the aggregator (`processed_events`) deduplicate by this id across all nodes, so that matters.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sys


class EventIds:
    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._mac = hashlib.blake2b(key=os.urandom(32), digest_size=16)
        self._count = itertools.count()

    def next(self) -> str:
        mac = self._mac.copy()
        mac.update(next(self._count).to_bytes(8, "little"))
        h = mac.hexdigest()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_ids = EventIds()
if sys.platform != "win32":  # a forked child must not repeat its parent's ids (Windows has no fork)
    os.register_at_fork(after_in_child=_ids.reseed)


def new_event_id() -> str:
    """A fresh event id (see the module's docstring)."""
    return _ids.next()
