"""How a command on `doai.cmd.<node_id>` is signed: header names and the exact bytes signed.

The backend signs every `RunBroadcast` and `RunCancel` with its command-signing
key (Ed25519, an nkey); a node verifies with the backend's public key before it
decodes anything. The signature covers the subject as well as the payload, so a
command signed for one node cannot be replayed onto another node's subject, and
it travels in NATS headers, so the JSON body stays readable (`nats sub`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

SIG_HEADER: Final = "Doai-Sig"
"""Ed25519 signature of `signed_bytes(subject, payload)`, unpadded base64url."""

SIG_KEY_HEADER: Final = "Doai-Sig-Key"
"""The signer's public nkey: informative only (logged on refusal, for rotation); never trusted."""

_DOMAIN: Final = b"doai-cmd-v1\n"


def signed_bytes(subject: str, payload: bytes) -> bytes:
    """What is signed: a fixed domain tag, the subject and the payload exactly as published.

    NATS subjects never contain a newline, so the subject/payload boundary is unambiguous.
    """
    return _DOMAIN + subject.encode() + b"\n" + payload


def encode_signature(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_signature(text: str) -> bytes:
    """The raw signature from a header value; `ValueError` when it is not base64url."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"signature header is not base64url: {exc}") from None
