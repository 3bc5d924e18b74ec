"""The REST API's routes, one `APIRouter` per resource; `services.backend.app.create_app` includes them.

| module | paths |
|---|---|
| `health.py` | `/healthz` |
| `workflows.py` | `/v1/workflows...` |
| `runs.py` | `/v1/runs...` |
| `fleet.py` | `/v1/devices`, `/v1/nodes` |
| `node.py` | `/v1/node/...` (X-Node-Auth only) |
| `artifacts.py` | `/v1/artifacts/{store}/{key}` (bearer token or a signed link) |

`common.py` holds what they share: the `Context` (pool, relay, settings, the
two credential dependencies, body decoding) and the input rules every request
meets (control characters, unknown query parameters, dates).
"""
