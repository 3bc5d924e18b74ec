"""The node's error root: every error the node raises on purpose derives from `NodeError`.

`code` is a short machine-readable code that goes into step and task events
(`<code>: <message>`) and into log lines; `retryable` says whether trying the
same request again later can succeed (the vendor program or the artifact
store was unreachable or slow) or cannot (the request was refused).

The executor matches errors by type: a `NodeError` reports its own `code`;
any other exception raised while a step runs is a bug in doai (or in a library
it calls) and is reported as `internal_error`, its traceback logged with the
run, node and device bound.

The subclasses, by module: `InvalidRequest` (here), `StepError` (steps),
`VendorError` and its subclasses (vendor_client; the adb driver raises them too),
`ShapeError` (vendor_decode), `DeviceBusy` (driver), `ArtifactError` and
`ArtifactKeyEscape` (artifacts), `Refused` (admission), `EnrollmentRefused`
(enroll). docs/architecture.md ("Errors") lists their codes.
"""

from __future__ import annotations


class NodeError(Exception):
    """Base of the node's deliberate errors; `code` and `retryable` may be set per class or per instance."""

    code: str = "node_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


class InvalidRequest(NodeError, ValueError):
    """A request the node refuses before anything reaches a device: a serial that does not name exactly
    one device (`all`, a comma list, not a serial), an empty vendor action.

    Also a `ValueError`, as these refusals were before the node had its own error root.
    """

    code = "invalid_request"
