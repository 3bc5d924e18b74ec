"""Ed25519 signatures with NATS nkeys: the backend signs commands, nodes verify them.

The command-signing key is an nkey of the *server* role: its seed starts with
`SN` and its public key with `N`. nats-server never accepts such a key as a
client identity, so the signing key cannot double as a NATS credential, and a
NATS user or account seed given here by mistake is refused with a clear error.

The seed is a secret: nothing here logs or formats it (`Signer` has no seed in
its repr). A seed file is created 0600 and never rewritten.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import nacl.exceptions
import nacl.signing
import nkeys

from contracts.signatures import SIG_HEADER, SIG_KEY_HEADER, decode_signature, encode_signature, signed_bytes

ROLE: Final = nkeys.PREFIX_BYTE_SERVER
ROLE_NAME: Final = "server"
SIGNATURE_BYTES: Final = 64


class SigningKeyError(ValueError):
    """A seed or public key that is not a valid command-signing nkey (the message says why, never the key)."""


class BadSignature(Exception):
    """A signature that is missing, malformed or does not verify with the configured key."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _crc_ok(raw: bytes) -> bool:
    return bytes(nkeys.crc16_checksum(raw[:-2])) == raw[-2:]


def _b32(text: str, what: str) -> bytes:
    cleaned = text.strip()
    if not cleaned.isascii() or not cleaned:
        raise SigningKeyError(f"the {what} is empty or not ASCII")
    try:
        return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError):
        raise SigningKeyError(f"the {what} is not an nkey (base32)") from None


def _raw_seed(seed: str) -> bytes:
    raw = _b32(seed, "command-signing seed")
    if len(raw) != 36 or not _crc_ok(raw):
        raise SigningKeyError("the command-signing seed is not an nkey seed (wrong length or checksum)")
    if raw[0] & 0xF8 != nkeys.PREFIX_BYTE_SEED:
        raise SigningKeyError("the command-signing key must be an nkey seed (starting with 'S'), not a public key")
    prefix = (raw[0] & 0x07) << 5 | (raw[1] & 0xF8) >> 3
    if prefix != ROLE:
        raise SigningKeyError(f"the command-signing seed must be an nkey of the {ROLE_NAME} role (starting 'SN')")
    return raw[2:34]


def _raw_public(public_key: str) -> bytes:
    raw = _b32(public_key, "command public key")
    if len(raw) != 35 or not _crc_ok(raw):
        raise SigningKeyError("the command public key is not an nkey public key (wrong length or checksum)")
    if raw[0] != ROLE:
        raise SigningKeyError(f"the command public key must be an nkey of the {ROLE_NAME} role (starting 'N')")
    return raw[1:33]


def generate_seed() -> str:
    """A fresh command-signing seed (text, starts with `SN`)."""
    return bytes(nkeys.encode_seed(os.urandom(32), ROLE)).decode()


def public_key_of(seed: str) -> str:
    """The public key (text, starts with `N`) that verifies what `seed` signs."""
    return Signer(seed).public_key


class Signer:
    """Signs bytes with a seed. Its repr shows the public key only."""

    def __init__(self, seed: str) -> None:
        self._key = nacl.signing.SigningKey(_raw_seed(seed))
        raw_public = bytes(self._key.verify_key)
        body = bytes([ROLE]) + raw_public
        self.public_key = base64.b32encode(body + bytes(nkeys.crc16_checksum(body))).decode().rstrip("=")

    def __repr__(self) -> str:
        return f"Signer(public_key={self.public_key!r})"

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data).signature)

    def command_headers(self, subject: str, payload: bytes) -> dict[str, str]:
        """The headers that make `payload` on `subject` a signed command."""
        return {SIG_HEADER: encode_signature(self.sign(signed_bytes(subject, payload))),
                SIG_KEY_HEADER: self.public_key}


class Verifier:
    """Verifies signatures with one public key."""

    def __init__(self, public_key: str) -> None:
        self._key = nacl.signing.VerifyKey(_raw_public(public_key))
        self.public_key = public_key.strip()

    def __repr__(self) -> str:
        return f"Verifier(public_key={self.public_key!r})"

    def verify(self, data: bytes, signature: bytes) -> None:
        """Return if `signature` is this key's signature of `data`; raise `BadSignature` otherwise."""
        if len(signature) != SIGNATURE_BYTES:
            raise BadSignature("bad_signature", f"signature has {len(signature)} bytes, not {SIGNATURE_BYTES}")
        try:
            self._key.verify(data, signature)
        except nacl.exceptions.BadSignatureError:
            raise BadSignature("bad_signature", "signature does not verify with the backend's public key") from None

    def verify_command(self, subject: str, payload: bytes, headers: Mapping[str, str] | None) -> None:
        """Check the signature headers of a command received on `subject`; raise `BadSignature` if wrong."""
        text = (headers or {}).get(SIG_HEADER)
        if not text:
            raise BadSignature("unsigned", f"no {SIG_HEADER} header: the command is not signed")
        try:
            signature = decode_signature(text)
        except ValueError as exc:
            raise BadSignature("bad_signature", str(exc)) from None
        try:
            self.verify(signed_bytes(subject, payload), signature)
        except BadSignature:
            claimed = (headers or {}).get(SIG_KEY_HEADER)
            if claimed and claimed != self.public_key:
                shown = claimed[:12] if claimed[:12].isalnum() else "?"  # untrusted text: keep the log clean
                raise BadSignature("wrong_key", f"signed by another key ({shown}…), not the backend's "
                                                f"({self.public_key[:12]}…)") from None
            raise


def sign(seed: str, data: bytes) -> bytes:
    return Signer(seed).sign(data)


def verify(public_key: str, data: bytes, signature: bytes) -> None:
    Verifier(public_key).verify(data, signature)


def load_or_create_seed(path: Path) -> str:
    """The seed kept in `path`, created (0600, exclusively) with a fresh seed when missing.

    An existing file is checked (a valid seed) but never rewritten; it should be 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Written whole to a private temporary file, then linked into place: a concurrent
        # starter either wins the link or reads the winner's complete file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(generate_seed() + "\n")
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    seed = path.read_text().strip()
    Signer(seed)  # raises SigningKeyError with the file's name left to the caller
    return seed
