"""A logged traceback never shows local variables: one may be a secret (review of wave 3).

structlog's console renderer uses rich's traceback with `show_locals=True` when rich is installed
(the `cli` extra installs it): `log.exception(...)` in a frame holding the enrollment secret or a
DSN with its password printed them on stderr (a node PC's console, a worker's stderr file).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SECRET = "s3cr3t-enrollment-value-8c1f"
PASSWORD = "pw-in-a-dsn-77ad"


def _run(fmt: str, log_file: Path) -> str:
    code = textwrap.dedent(f"""
        import structlog
        from runtime.logging import configure_logging
        configure_logging(fmt={fmt!r}, log_file={str(log_file)!r})
        log = structlog.get_logger("t")

        def enroll():
            node_secret = {SECRET!r}
            dsn = "postgresql://doai:{PASSWORD}@127.0.0.1/doai"
            raise RuntimeError("enrollment failed")

        try:
            enroll()
        except RuntimeError:
            log.exception("enrollment failed")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=60, check=True)
    return res.stdout + res.stderr


def test_console_and_json_tracebacks_show_no_locals(tmp_path: Path) -> None:
    for fmt in ("console", "json"):
        log_file = tmp_path / f"{fmt}.jsonl"
        out = _run(fmt, log_file)
        assert "RuntimeError: enrollment failed" in out or "enrollment failed" in out, out
        assert "Traceback" in out or "traceback" in out.lower(), out
        for text in (out, log_file.read_text()):
            assert SECRET not in text and PASSWORD not in text, text


def test_a_logged_settings_object_keeps_its_secrets_out_of_every_log_line(tmp_path: Path) -> None:
    """A value JSON has no form for is logged as its repr, which `Settings` redacts: an encoder that writes a
    Struct's or dataclass's fields one by one would print the secret (review of the msgspec log encoder)."""
    log_file = tmp_path / "json.jsonl"
    code = textwrap.dedent(f"""
        import dataclasses
        import structlog
        from runtime.logging import configure_logging
        from services.node.settings import NodeSettings
        configure_logging(fmt="json", log_file={str(log_file)!r})

        @dataclasses.dataclass
        class Options:
            seed: str = dataclasses.field(default={SECRET!r}, repr=False)

        settings = NodeSettings(node_id="n1", nats_url="nats://127.0.0.1:4222",
                                node_secret={SECRET!r}, api_url="http://u:{PASSWORD}@127.0.0.1:1")
        structlog.get_logger("t").info("settings", settings=settings, nested={{"options": [Options()]}})
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for text in (res.stdout + res.stderr, log_file.read_text()):
        assert SECRET not in text and PASSWORD not in text, text
    [line] = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert line["settings"].startswith("NodeSettings(") and "node_id='n1'" in line["settings"], line
    assert line["nested"]["options"][0].startswith("Options("), line
