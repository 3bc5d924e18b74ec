"""The node's error root: every error a driver (and, later, the rest of the node) raises on purpose.

`code` is a short machine-readable code that goes into step and task events;
`retryable` says whether trying the same request again later can succeed
(the vendor program was unreachable or slow) or cannot (it refused the request).
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of the node's deliberate errors."""

    code: str = "node_error"
    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
