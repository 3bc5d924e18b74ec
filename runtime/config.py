"""One way every doai part reads its configuration.

Each part has one settings class: a msgspec Struct whose fields carry their
environment variable as the encoded name (`msgspec.field(name="DOAI_SLOTS")`)
and their default, and whose `__post_init__` checks the cross-field rules.
`load_settings` builds it once from the environment, with the CLI's flags on
top, and turns every fault into one `ConfigError` naming the variable:

    settings = load_settings(NodeSettings, os.environ, node_id=args.node_id, slots=args.slots)

Flags passed as `None` were not given and leave the environment's value (or
the default) in place. Values from the environment are strings, converted by
msgspec (`"20"` → 20, `"true"` → True); a `list[str]` field takes a
comma-separated list and a `dict[str, int]` field `key=value` pairs. The CLI
prints a `ConfigError` as one line; nothing below the CLI raises `SystemExit`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec


class ConfigError(ValueError):
    """A configuration a part refuses to start with; the message names the variable and what is wrong."""


def redact_url(text: str) -> str:
    """`text` with the password of a URL in it (`postgresql://u:pw@h/db`, `nats://u:pw@h`) as `***`."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not password:
        return text
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@")))


class Settings(msgspec.Struct, kw_only=True):
    """Base of every part's settings: secrets never appear in `repr` (or in logs that use it)."""

    # Attribute names whose values are secrets.
    SECRETS: ClassVar[frozenset[str]] = frozenset()
    # Older or alternative variable names: {attribute: ("OTHER_NAME", ...)}, read when the main one is unset.
    ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __repr__(self) -> str:
        shown = []
        for field in msgspec.structs.fields(self):
            value = getattr(self, field.name)
            if field.name in self.SECRETS and value:
                text = "***"
            else:  # a DSN or server URL keeps its password out too (DATABASE_URL is not a secret field)
                text = repr(redact_url(value)) if isinstance(value, str) else repr(value)
            shown.append(f"{field.name}={text}")
        return f"{type(self).__name__}({', '.join(shown)})"


S = TypeVar("S", bound=Settings)

_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`(?: - at `\$\.(?P<at>[^`]+)`)?$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
_AT = re.compile(r" - at `\$\.(?P<at>[^`\[]+)[^`]*`$")
_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text", "array": "a list"}


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    raise NotImplementedError(f"cannot read {kind!r} from configuration")


def _from_text(kind: Any, text: str, variable: str) -> Any:
    """Split list and mapping variables; everything else is converted by msgspec."""
    origin = getattr(kind, "__origin__", None)
    if origin is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    if origin is dict:
        pairs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{variable}: {item!r} is not key=value")
            pairs[key.strip()] = value.strip()
        return pairs
    return text


def _message(err: msgspec.ValidationError, names: dict[str, str]) -> str:
    text = str(err)
    missing = _MISSING.match(text)
    if missing:
        return f"set {missing['name']}"
    match = _EXPECTED.match(text)
    if match:
        variable = match["at"] or "?"
        want = " or ".join(_KINDS.get(w.strip(), w.strip()) for w in match["want"].split("|"))
        return f"{variable}: expected {want}"
    at = _AT.search(text)
    if at:
        return f"{at['at']}: {text[:at.start()]}"
    return text  # a rule of __post_init__: its message already names the setting


def env_names(cls: type[Settings]) -> dict[str, str]:
    """{attribute: environment variable} of a settings class."""
    return {f.name: f.encode_name for f in msgspec.structs.fields(cls)}


def load_settings(cls: type[S], env: Mapping[str, str], /, **flags: Any) -> S:
    """Build `cls` from `env`, with the flags that were given (not None) on top; raise `ConfigError`."""
    names = env_names(cls)
    unknown = set(flags) - set(names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {sorted(unknown)}")
    kinds = {f.name: f.type for f in msgspec.structs.fields(cls)}
    data: dict[str, Any] = {}
    for attr, variable in names.items():
        for candidate in (variable, *cls.ALIASES.get(attr, ())):
            text = env.get(candidate)
            if text is not None and text != "":
                data[variable] = _from_text(kinds[attr], text, candidate)
                break
    for attr, value in flags.items():
        if value is not None:
            data[names[attr]] = value
    try:
        return msgspec.convert(data, cls, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as err:
        raise ConfigError(_message(err, names)) from None
