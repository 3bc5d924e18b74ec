"""The signing module (nkeys, Ed25519), the backend's signing settings, and `contained` for paths."""

from __future__ import annotations

import os
from pathlib import Path

import nkeys
import pytest

from contracts.signatures import SIG_HEADER, SIG_KEY_HEADER, signed_bytes
from doai.up import command_key_path
from runtime.config import ConfigError, load_settings
from runtime.paths import PathEscape, contained, contained_below
from runtime.signing import (
    BadSignature,
    Signer,
    SigningKeyError,
    Verifier,
    generate_seed,
    load_or_create_seed,
    public_key_of,
    sign,
    verify,
)
from services.backend.settings import BackendSettings
from services.node.artifacts import ArtifactKeyEscape, LocalArtifactStore
from services.node.settings import NodeSettings
from services.node.steps import StepError, _saved_inside

BASE_ENV = {"DATABASE_URL": "postgresql://x", "NATS_URL": "nats://x", "DOAI_API_TOKEN": "t",
            "NODE_AGENT_SHARED_SECRET": "s" * 32, "DOAI_NATS_AUTH_DIR": "/etc/doai/nats-auth"}


# -- signing -----------------------------------------------------------------------------------------


def test_sign_and_verify_round_trip_and_what_breaks_it() -> None:
    seed = generate_seed()
    public = public_key_of(seed)
    assert seed.startswith("SN") and public.startswith("N") and len(public) == 56
    # The same key as the nkeys library derives (interoperable with NATS tooling).
    assert bytes(nkeys.from_seed(seed.encode()).public_key).decode() == public
    signature = sign(seed, b"payload")
    verify(public, b"payload", signature)
    with pytest.raises(BadSignature, match="does not verify"):
        verify(public, b"payload!", signature)
    with pytest.raises(BadSignature, match="does not verify"):
        verify(public_key_of(generate_seed()), b"payload", signature)
    with pytest.raises(BadSignature, match="64"):
        verify(public, b"payload", signature[:10])


def test_command_headers_bind_the_subject_and_the_exact_payload() -> None:
    signer = Signer(generate_seed())
    verifier = Verifier(signer.public_key)
    headers = signer.command_headers("doai.cmd.node-1", b'{"x":1}')
    assert set(headers) == {SIG_HEADER, SIG_KEY_HEADER} and headers[SIG_KEY_HEADER] == signer.public_key
    verifier.verify_command("doai.cmd.node-1", b'{"x":1}', headers)
    for subject, payload in (("doai.cmd.node-2", b'{"x":1}'), ("doai.cmd.node-1", b'{"x":2}'),
                             ("doai.cmd.node-1", b'{"x":1} ')):
        with pytest.raises(BadSignature) as err:
            verifier.verify_command(subject, payload, headers)
        assert err.value.code == "bad_signature"
    with pytest.raises(BadSignature) as err:
        verifier.verify_command("doai.cmd.node-1", b'{"x":1}', None)
    assert err.value.code == "unsigned"
    other = Signer(generate_seed()).command_headers("doai.cmd.node-1", b'{"x":1}')
    with pytest.raises(BadSignature) as err:
        verifier.verify_command("doai.cmd.node-1", b'{"x":1}', other)
    assert err.value.code == "wrong_key"
    # The subject/payload boundary cannot be shifted: "a" + "\nb" and "a\n" + "b" sign different bytes.
    assert signed_bytes("doai.cmd.a", b"b") != signed_bytes("doai.cmd.a.b", b"")


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("not a key", "not an nkey"),
    ("SNAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "checksum"),
])
def test_bad_seeds_and_public_keys_get_a_clear_error_without_the_key(text: str, message: str) -> None:
    with pytest.raises(SigningKeyError, match=message) as err:
        Signer(text)
    assert not text or text not in str(err.value)
    with pytest.raises(SigningKeyError, match=message):
        Verifier(text)


def test_keys_of_other_roles_are_refused() -> None:
    user_seed = bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()
    with pytest.raises(SigningKeyError, match="server role"):
        Signer(user_seed)  # a NATS user credential is not a command-signing key
    user_public = bytes(nkeys.from_seed(user_seed.encode()).public_key).decode()
    with pytest.raises(SigningKeyError, match="server role"):
        Verifier(user_public)
    seed = generate_seed()
    with pytest.raises(SigningKeyError, match="not an nkey public key"):
        Verifier(seed)  # a seed where the public key belongs
    with pytest.raises(SigningKeyError, match="not a public key|not an nkey seed"):
        Signer(public_key_of(seed))


def test_the_seed_never_shows_in_a_repr() -> None:
    seed = generate_seed()
    assert seed not in repr(Signer(seed)) and public_key_of(seed) in repr(Signer(seed))
    settings = load_settings(BackendSettings, {**BASE_ENV, "DOAI_COMMAND_SIGNING_KEY": seed})
    assert seed not in repr(settings) and settings.command_public_key == public_key_of(seed)


def test_a_seed_file_is_made_once_private_and_reused(tmp_path: Path) -> None:
    path = command_key_path(tmp_path / "home")
    seed = load_or_create_seed(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_seed(path) == seed  # the next `doai up` on this DOAI_HOME signs with the same key
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    path.write_text("garbage\n")
    with pytest.raises(SigningKeyError):
        load_or_create_seed(path)


def test_backend_settings_read_the_seed_from_the_environment_or_a_file(tmp_path: Path) -> None:
    seed = generate_seed()
    assert load_settings(BackendSettings, {**BASE_ENV, "DOAI_COMMAND_SIGNING_KEY": seed}).command_signing_seed == seed
    path = tmp_path / "k.seed"
    path.write_text(seed + "\n")
    from_file = load_settings(BackendSettings, {**BASE_ENV, "DOAI_COMMAND_SIGNING_KEY_FILE": str(path)})
    assert from_file.command_signing_seed == seed and seed not in repr(from_file)
    with pytest.raises(ConfigError, match="not both"):
        load_settings(BackendSettings, {**BASE_ENV, "DOAI_COMMAND_SIGNING_KEY": seed,
                                        "DOAI_COMMAND_SIGNING_KEY_FILE": str(path)})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(BackendSettings, {**BASE_ENV, "DOAI_COMMAND_SIGNING_KEY_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="set DOAI_COMMAND_SIGNING_KEY"):
        load_settings(BackendSettings, BASE_ENV)  # no key, no backend: it would send unsigned commands
    with pytest.raises(ConfigError, match="DOAI_COMMAND_SIGNING_KEY is unusable") as err:
        load_settings(BackendSettings, {**BASE_ENV, "DOAI_COMMAND_SIGNING_KEY": "SNnotaseed"})
    assert "SNnotaseed" not in str(err.value)


def test_node_settings_check_a_public_key_that_is_set_and_refuse_to_start_without_one() -> None:
    base = {"DOAI_NODE_ID": "node-1", "NATS_URL": "nats://x"}
    public = public_key_of(generate_seed())
    assert load_settings(NodeSettings, {**base, "DOAI_COMMAND_PUBLIC_KEY": public}).command_verifier().public_key \
        == public
    with pytest.raises(ConfigError, match="DOAI_COMMAND_PUBLIC_KEY is unusable"):
        load_settings(NodeSettings, {**base, "DOAI_COMMAND_PUBLIC_KEY": "Nnotakey"})
    unset = load_settings(NodeSettings, base)  # loadable: enrollment may fill the key before the start
    with pytest.raises(ConfigError, match="no command public key"):
        unset.command_verifier()


# -- paths -------------------------------------------------------------------------------------------


def test_contained_keeps_paths_inside_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert contained(root, "a", "b.png") == (root / "a" / "b.png").resolve()
    assert contained(root, "a/b/c") == (root / "a" / "b" / "c").resolve()
    for parts in (("..",), ("..", "outside"), ("a", "..", "..", "outside"), ("a/../../outside",), (".",),
                  ("a", ".."), ("/etc/passwd",), (str(outside),), ("C:\\Windows",), ("\\\\host\\share",),
                  ("",), ("a\0b",)):
        with pytest.raises(PathEscape):
            contained(root, *parts)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathEscape, match="leaves"):
        contained(root, "link", "x.png")  # a symlink inside the root that points out is an escape
    (root / "inner").symlink_to(root / "a", target_is_directory=True)
    assert contained(root, "inner", "x") == (root / "a" / "x").resolve()  # one that stays inside is fine


def test_contained_below_gives_the_answer_of_contained(tmp_path: Path) -> None:
    """The executor's fast check of a task's spool folder (a root resolved once, one lstat per part)."""
    root = (tmp_path / "root").resolve()
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "a" / "deep").symlink_to(outside, target_is_directory=True)
    (root / "inner").symlink_to(root / "a", target_is_directory=True)
    for parts in (("a", "b"), ("new", "x"), ("a",), ("inner", "x"), ("a", "b/c")):
        assert contained_below(root, *parts) == contained(root, *parts), parts
    for parts in (("link",), ("link", "x"), ("a", "deep", "x"), ("..",), ("a", "..", ".."), (".",), ("",),
                  ("a\0b",), ("/etc",), ("C:x",), ("a/../../outside",)):
        with pytest.raises(PathEscape):
            contained_below(root, *parts)


async def test_the_local_store_writes_nothing_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "vid").mkdir(parents=True)
    (root / "vid" / "node-1").symlink_to(outside, target_is_directory=True)
    source = tmp_path / "shot.png"
    source.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    store = LocalArtifactStore(root)
    for key in ("vid/node-1/S1/run/1.png", "../outside/1.png", str(outside / "1.png")):
        with pytest.raises(ArtifactKeyEscape):
            await store.put(key, source, "image/png")
    assert list(outside.iterdir()) == []
    stored = await store.put("vid/node-2/S1/run/1.png", source, "image/png")
    assert (root / stored.key).read_bytes() == source.read_bytes()


def test_a_screenshot_the_driver_reports_outside_its_folder_is_refused(tmp_path: Path) -> None:
    folder = (tmp_path / "spool" / "shot").resolve()
    (folder / "2026-11-29").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    dated = folder / "2026-11-29" / "s.png"
    assert _saved_inside(folder, dated) == dated  # a program that adds a dated subfolder is fine
    (folder / "link").symlink_to(outside, target_is_directory=True)
    for path in (outside / "s.png", folder / ".." / "s.png", folder / "link" / "s.png"):
        with pytest.raises(StepError) as err:
            _saved_inside(folder, path)
        assert err.value.code == "path_escape"
