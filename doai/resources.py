"""Files the installed package carries: the bundled recipes, the NATS config and Grafana provisioning.

In the repository they stay where the design puts them (`recipes/`, `infra/`);
pyproject.toml maps those folders to the packages `doai.recipes` and
`doai.infra`, so a wheel installed anywhere (and an editable install) reads
them through `importlib.resources`, never relative to a source checkout.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable


def recipe_files() -> list[Traversable]:
    """The bundled workflow recipes (`recipes/*.json` without the JSON Schema), by name."""
    return sorted((f for f in files("doai.recipes").iterdir()
                   if f.name.endswith(".json") and f.name != "schema.json"), key=lambda f: f.name)


def recipe_schema() -> Traversable:
    return files("doai.recipes") / "schema.json"


def nats_config() -> str:
    """The text of `infra/nats/nats-server.conf`."""
    return (files("doai.infra") / "nats" / "nats-server.conf").read_text(encoding="utf-8")


def grafana() -> Traversable:
    """`infra/grafana`: provisioning (datasource, dashboard provider) and the dashboards."""
    return files("doai.infra") / "grafana"
