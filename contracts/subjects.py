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


def evt_subject(node_id: str, kind: EventKind) -> str:
    """Where a node publishes one kind of event."""
    return f"doai.evt.{node_id}.{kind}"


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
