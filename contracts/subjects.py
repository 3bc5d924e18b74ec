"""Stream, subject and consumer names: the NATS side of the contract."""

from __future__ import annotations

from typing import Final, Literal

CMD_STREAM: Final = "DOAI_CMD"
EVT_STREAM: Final = "DOAI_EVT"

CMD_SUBJECTS: Final = "doai.cmd.*"
EVT_SUBJECTS: Final = "doai.evt.>"

AGGREGATOR_DURABLE: Final = "aggregator"

EventKind = Literal["task", "step", "artifact", "device", "node"]


def cmd_subject(node_id: str) -> str:
    """Where the backend sends commands (`RunBroadcast`, `RunCancel`) for one node."""
    return f"doai.cmd.{node_id}"


#: Event kinds about one device task of one run: their subject ends with the run id.
RUN_EVENT_KINDS: Final[tuple[EventKind, ...]] = ("task", "step", "artifact")
EVENT_KINDS: Final[tuple[EventKind, ...]] = ("task", "step", "artifact", "device", "node")


def evt_subject(node_id: str, kind: EventKind, run_id: str | None = None) -> str:
    """Where a node publishes one event: `doai.evt.<node_id>.<kind>.<run_id>` for task, step and artifact
    events, `doai.evt.<node_id>.<kind>` for device and node events.

    So a subject filter selects one run (`doai.evt.*.*.<run_id>`) or one node (`doai.evt.<node_id>.>`),
    and NATS does the filtering; a node's permission stays `doai.evt.<node_id>.>`.
    """
    if kind in RUN_EVENT_KINDS and run_id is not None:
        return f"doai.evt.{node_id}.{kind}.{run_id}"
    return f"doai.evt.{node_id}.{kind}"  # without a run id: the layout before run tokens (still accepted)


def evt_filters(*, run_id: str | None = None, node_id: str | None = None,
                kinds: tuple[EventKind, ...] | None = None) -> list[str]:
    """The subject filters that select exactly the events of one run and/or node and/or kinds.

    `run_id` limits the kinds to the run's (task, step, artifact): device and node events belong to no run.
    """
    node = node_id or "*"
    if run_id is None and kinds is None:
        return [f"doai.evt.{node}.>"]
    chosen = kinds or EVENT_KINDS
    if run_id is not None:
        return [f"doai.evt.{node}.{kind}.{run_id}" for kind in chosen if kind in RUN_EVENT_KINDS]
    return [f"doai.evt.{node}.{kind}.*" if kind in RUN_EVENT_KINDS else f"doai.evt.{node}.{kind}"
            for kind in chosen]


def node_durable(node_id: str) -> str:
    """Name of the node's durable pull consumer on `DOAI_CMD`."""
    return f"node-{node_id}"


# Replies (JetStream API answers, fetched messages, publish acks) go to the client's inbox.
# Every NATS identity has its own inbox prefix and may subscribe only below it, so no
# client can read another's replies (for example the commands another node fetched).
NODE_INBOX_ROOT: Final = "_INBOX_NODE"


def node_inbox_prefix(node_id: str) -> str:
    """The inbox prefix of node `node_id` (its NATS user may subscribe only to `<prefix>.>`)."""
    return f"{NODE_INBOX_ROOT}.{node_id}"


def role_inbox_prefix(role: str) -> str:
    """The inbox prefix of a central role (`backend`, `aggregator`, `tap`)."""
    return f"_INBOX_{role}"
