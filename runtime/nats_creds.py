"""NATS credentials files (`.creds`: a user JWT and its nkey seed) and secret files, stdlib only.

The node agent uses this (it writes its own `.creds` after enrolling), so it
must not need the server-side `nats-jwt` package; minting lives in
`runtime.nats_auth`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_CREDS_TEMPLATE = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""

_JWT_BLOCK = re.compile(r"-----BEGIN NATS USER JWT-----\s*(\S+)\s*------END NATS USER JWT------")


def format_creds(jwt: str, seed: str) -> str:
    return _CREDS_TEMPLATE.format(jwt=jwt, seed=seed)


def creds_jwt(text: str) -> str:
    """The user JWT inside a `.creds` file's text (raises ValueError if there is none)."""
    found = _JWT_BLOCK.search(text)
    if found is None:
        raise ValueError("not a NATS credentials file (no user JWT block)")
    return found.group(1)


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path` readable by the owner only (0600), atomically (a temp file, then rename).

    The folder is created 0700 when missing. The file is created 0600 from the
    start (never world-readable, not even for a moment).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to an existing leftover temp file
    os.replace(tmp, path)
