"""The `doai` command turns bad input and unreachable servers into one clear line, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.signing_support import TEST_SIGNING_SEED

ROOT = Path(__file__).resolve().parent.parent


def doai(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"NATS_URL", "DATABASE_URL", "DOAI_API_TOKEN"}}
    return subprocess.run([sys.executable, "-m", "doai.cli", *args], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_recipes_validate_reports_each_fault_with_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dsl": 1, "workflow_id": "Bad", "steps": [{"id": "a", "action": "nope"}]}))
    ok = doai("recipes", "validate", str(ROOT / "recipes" / "device-smoke.json"))
    assert ok.returncode == 0 and "ok (device-smoke, 10 steps)" in ok.stdout
    res = doai("recipes", "validate", str(bad), str(tmp_path / "missing.json"))
    assert res.returncode == 1
    assert f"{bad}: $.steps[0].action: unknown action" in res.stderr
    assert f"{bad}: $.workflow_id: Expected `str` matching regex" in res.stderr
    assert "missing.json: cannot read" in res.stderr
    assert "Traceback" not in res.stderr


def test_services_refuse_missing_configuration() -> None:
    res = doai("backend")
    assert res.returncode != 0 and "set DATABASE_URL" in res.stderr
    res = doai("backend", env={"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://127.0.0.1:1"})
    assert res.returncode != 0 and "set DOAI_API_TOKEN" in res.stderr
    res = doai("node", "--node-id", "bad.id", env={"NATS_URL": "nats://127.0.0.1:1"})
    assert res.returncode != 0 and "DOAI_NODE_ID (--node-id) 'bad.id' is invalid" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args, env, message", [
    (["node"], {"NATS_URL": "nats://127.0.0.1:1"}, "doai node: set DOAI_NODE_ID"),
    (["node", "--node-id", "n1"], {}, "doai node: set NATS_URL (or use `doai up`"),
    (["node", "--node-id", "n1"], {"NATS_URL": "nats://x:1", "DOAI_SLOTS": "many"}, "DOAI_SLOTS: expected an integer"),
    (["node", "--node-id", "n1", "--slots", "0"], {"NATS_URL": "nats://x:1"}, "DOAI_SLOTS (--slots) must be between"),
    (["node", "--node-id", "n1"], {"NATS_URL": "nats://x:1", "DOAI_ARTIFACT_STORE": "supabase"},
     "the supabase store needs SUPABASE_URL"),
    (["aggregator"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://x:1",
                      "DOAI_AGG_BATCH": "0"}, "doai aggregator: DOAI_AGG_BATCH must be between 1 and 10000"),
    (["backend", "--port", "70000"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://x:1",
                                      "DOAI_API_TOKEN": "t", "NODE_AGENT_SHARED_SECRET": "n" * 32},
     "DOAI_API_PORT (--port) must be between 0 and 65535"),
    (["backend"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://x:1", "DOAI_API_TOKEN": "t",
                   "NODE_AGENT_SHARED_SECRET": "n" * 32, "DOAI_NODE_SLOTS": "node-1"},
     "DOAI_NODE_SLOTS: 'node-1' is not key=value"),
    (["backend"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://x:1", "DOAI_API_TOKEN": "t",
                   "NODE_AGENT_SHARED_SECRET": "n" * 32, "DOAI_NATS_AUTH_DIR": "/x"},
     "doai backend: set DOAI_COMMAND_SIGNING_KEY"),
    (["backend"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://x:1", "DOAI_API_TOKEN": "t",
                   "NODE_AGENT_SHARED_SECRET": "n" * 32}, "doai backend: set DOAI_NATS_AUTH_DIR"),
    (["backend"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/d", "NATS_URL": "nats://x:1", "DOAI_API_TOKEN": "t",
                   "NODE_AGENT_SHARED_SECRET": "n" * 32, "DOAI_COMMAND_SIGNING_KEY_FILE": "/nonexistent/k.seed",
                   "DOAI_NATS_AUTH_DIR": "/x"},
     "DOAI_COMMAND_SIGNING_KEY_FILE: cannot read /nonexistent/k.seed"),
])
def test_every_part_reports_a_bad_setting_in_one_line_naming_the_variable(
    args: list[str], env: dict[str, str], message: str
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DOAI_", "SUPABASE"))}
    res = subprocess.run([sys.executable, "-m", "doai.cli", *args], cwd=ROOT, env={**clean, **env},
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1, res.stderr
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_node_without_the_command_public_key_does_not_start(tmp_path: Path) -> None:
    """No key, no node: it would otherwise have to run unsigned commands. One line, nothing created."""
    clean = {"NATS_URL": "nats://127.0.0.1:1", "DOAI_COMMAND_PUBLIC_KEY": ""}
    state = tmp_path / "state"
    res = doai("node", "--node-id", "node-1", "--state-dir", str(state), env=clean)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("doai node: no command public key: set DOAI_COMMAND_PUBLIC_KEY to the backend's "
                                  "command-signing public key (enrollment provides it); without it the node would "
                                  "run unsigned commands")
    assert not state.exists()
    seed = doai("keygen", "--out", str(tmp_path / "k.seed"))
    res = doai("node", "--node-id", "node-1", "--state-dir", str(state),
               env={**clean, "DOAI_COMMAND_PUBLIC_KEY": (tmp_path / "k.seed").read_text().strip()})
    assert res.returncode == 1 and "Traceback" not in res.stderr and seed.returncode == 0
    assert "DOAI_COMMAND_PUBLIC_KEY is unusable: the command public key is not an nkey public key" in res.stderr
    assert (tmp_path / "k.seed").read_text().strip() not in res.stderr  # the secret is not echoed


def test_keygen_makes_a_private_seed_once_and_prints_its_public_key(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "command.seed"
    first = doai("keygen", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    seed = out.read_text().strip()
    assert seed.startswith("SN") and seed not in first.stdout + first.stderr
    public = first.stdout.strip()
    assert public.startswith("N") and len(public) == 56
    again = doai("keygen", "--out", str(out))
    assert again.stdout.strip() == public and out.read_text().strip() == seed  # kept, never rewritten


def test_unreachable_database_is_one_line_without_the_password() -> None:
    res = doai("backend", env={"DATABASE_URL": "postgresql://u:s3cret@127.0.0.1:1/d",
                               "NATS_URL": "nats://127.0.0.1:1", "DOAI_API_TOKEN": "t",
                               "NODE_AGENT_SHARED_SECRET": "n" * 32, "DOAI_COMMAND_SIGNING_KEY": TEST_SIGNING_SEED,
                               "DOAI_NATS_AUTH_DIR": "/nonexistent"})
    assert res.returncode == 1
    assert "doai backend: cannot reach PostgreSQL at postgresql://u:***@127.0.0.1:1/d" in res.stderr
    assert "s3cret" not in res.stderr and "Traceback" not in res.stderr
