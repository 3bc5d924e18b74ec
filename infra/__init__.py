"""Not code: marks `infra/` as the package data `doai.infra` (NATS config, Grafana provisioning)."""
