"""Regenerate `recipes/schema.json` from the workflow DSL (`contracts.recipe_model.recipe_json_schema`).

Usage: python scripts/gen_recipe_schema.py [--check]

With `--check`, write nothing and exit 1 if the committed schema is out of date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from contracts.recipe_model import recipe_json_schema  # noqa: E402

SCHEMA_PATH = ROOT / "recipes" / "schema.json"


def render_schema() -> str:
    return json.dumps(recipe_json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render_schema()
    if "--check" in argv:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            sys.stderr.write(f"{SCHEMA_PATH} is out of date: run python scripts/gen_recipe_schema.py\n")
            return 1
        return 0
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {SCHEMA_PATH.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
