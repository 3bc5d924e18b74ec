"""The artifact path convention (DESIGN.md rule 10), shared by the node (which renders keys) and the
backend (which checks a run's params against it when the run is created).

A key is the template rendered with the run's params and the built-ins
`node_id`, `device_serial`, `run_id` and `timestamp` (epoch seconds). Every
value that goes into the key must be one plain path segment: not empty, not `.`
or `..`, no `/`, `\\` or `%` (a store that percent-decodes keys, as Supabase
Storage's client does, would otherwise turn `%2F` into extra folders), no
control or other unprintable character, and at most `MAX_SEGMENT_BYTES` bytes
of UTF-8 (the usual file-name limit).
"""

from __future__ import annotations

import string
from typing import Final

DEFAULT_PATH_TEMPLATE: Final = "{youtubeVideoId}/{node_id}/{device_serial}/{run_id}/{timestamp}.png"
# Filled in by the node, not taken from the run's params.
BUILTIN_FIELDS: Final = frozenset({"node_id", "device_serial", "run_id", "timestamp"})
MAX_SEGMENT_BYTES: Final = 255
SEGMENT_RULE: Final = (f"must be one plain path segment: not empty, '.' or '..', no '/', '\\\\' or '%',"
                       f" only printable characters, at most {MAX_SEGMENT_BYTES} bytes")


class ArtifactPathError(ValueError):
    """A template that cannot be rendered, or a value that is not a plain path segment."""


def segment_problem(value: str) -> str | None:
    """Why `value` cannot be a path segment, or None when it can."""
    if value in ("", ".", ".."):
        return "is empty, '.' or '..'"
    if any(c in value for c in "/\\%"):
        return "contains '/', '\\' or '%'"
    if not value.isprintable():
        return "contains an unprintable character"
    if len(value.encode()) > MAX_SEGMENT_BYTES:
        return f"is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order; `ArtifactPathError` for a template that is not simple."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ArtifactPathError(f"artifact path template is not valid: {exc}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ArtifactPathError(
                f"artifact path template fields must be plain names like {{run_id}}, got {{{name}}}")
        names.append(name)
    if not names or template.startswith("/"):
        raise ArtifactPathError("artifact path template must be relative and use at least one field")
    return names


def param_fields(template: str) -> list[str]:
    """The fields of `template` that come from the run's params."""
    return [name for name in template_fields(template) if name not in BUILTIN_FIELDS]


def check_params(template: str, params: dict[str, str]) -> list[tuple[str, str]]:
    """(param name, problem) for each param the template needs that is missing or not a plain segment."""
    problems: list[tuple[str, str]] = []
    for name in dict.fromkeys(param_fields(template)):
        value = params.get(name)
        if value is None:
            problems.append((name, "is required by the artifact path template (the run uploads a screenshot)"))
        elif (why := segment_problem(value)) is not None:
            problems.append((name, f"{why}; it is a segment of the artifact path, which {SEGMENT_RULE}"))
    return problems


def render_key(template: str, values: dict[str, str]) -> str:
    """Render the template; `ArtifactPathError` when a field is missing or a value is not a plain segment."""
    fields: dict[str, str] = {}
    for name, value in values.items():
        fields[name] = "\0" if segment_problem(value) is not None else value  # caught below if used
    try:
        key = template.format_map(fields)
    except KeyError as exc:
        raise ArtifactPathError(f"artifact path template needs the run param {exc.args[0]!r}") from None
    except (ValueError, IndexError, AttributeError) as exc:
        raise ArtifactPathError(f"artifact path template is not valid: {exc}") from None
    if "\0" in key or key.startswith("/"):
        raise ArtifactPathError("artifact path would contain an empty or '..' segment, or a '/', '\\' or '%'")
    return key
