"""The test session's command-signing key: what the backend would sign with and nodes verify with.

Every test that publishes a command by hand signs it here (`signed_headers`, or
`node_support.send`); every node a test starts gets `TEST_PUBLIC_KEY`, and every
backend `TEST_SIGNING_SEED`. A fresh key per session: no seed is kept in the repository.
"""

from __future__ import annotations

from runtime.signing import Signer, generate_seed

TEST_SIGNING_SEED = generate_seed()
TEST_SIGNER = Signer(TEST_SIGNING_SEED)
TEST_PUBLIC_KEY = TEST_SIGNER.public_key


def signed_headers(subject: str, payload: bytes, signer: Signer = TEST_SIGNER) -> dict[str, str]:
    """`Doai-Sig` (and `Doai-Sig-Key`) for `payload` published on `subject`, as the relay sends them."""
    return signer.command_headers(subject, payload)
