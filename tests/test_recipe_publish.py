"""Recipe checks at publish and run creation over HTTP (issue 11 item 8): refused with the JSON path and
nothing stored, or accepted with warnings; integer params checked against the fields they fill.

Against the real backend (uvicorn) on real PostgreSQL and nats-server.
"""

from __future__ import annotations

from typing import Any

from doai.embedded import EmbeddedNats
from tests.backend_support import fetchval, fleet_of, running_backend, seed_fleet

SHOT = [{"id": "shot", "action": "screenshot"}, {"id": "upload", "action": "upload"},
        {"id": "report", "action": "report"}]


def recipe(workflow_id: str, params: dict[str, Any], steps: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {"dsl": 1, "workflow_id": workflow_id, "params": params, "steps": steps, **top}


async def test_publish_refuses_with_paths_warns_on_unused_and_checks_integer_params(
    database_url: str, nats_server: EmbeddedNats
) -> None:
    async with running_backend(database_url, nats_server.url) as backend, backend.client() as client:
        vid = {"youtubeVideoId": {"pattern": "^[A-Za-z0-9_-]{1,64}$"}}
        refusals = [
            (recipe("a", {"youtubeVideoId": {"pattern": "^[a-z]+$", "default": "NO"}}, SHOT),
             "$.params.youtubeVideoId.default"),
            (recipe("b", {}, SHOT), "$.params.youtubeVideoId"),
            (recipe("c", vid, SHOT, timeouts={"step_ms": 700_000}), "$.timeouts.step_ms"),
            (recipe("d", vid, [SHOT[0], SHOT[2], SHOT[1]]), "$.steps[1]"),
            (recipe("e", {**vid, "n": {"type": "string"}}, [{"id": "t", "action": "tap", "x": "{{n}}", "y": 1},
                                                           *SHOT]), "$.steps[0].x"),
        ]
        for doc, path in refusals:
            r = await client.post("/v1/workflows", json=doc)
            assert r.status_code == 422, (path, r.text)
            body = r.json()["error"]
            assert body["code"] == "invalid_recipe" and [d["path"] for d in body["details"]] == [path], body
        assert await fetchval(database_url, "SELECT count(*) FROM workflows") == 0

        # Accepted: `$schema`, an integer param in wait/tap, an unused param returned as a warning.
        doc = recipe("ints", {**vid, "x": {"type": "integer", "default": 10}, "pause": {"type": "integer"},
                              "spare": {"required": False}},
                     [{"id": "t", "action": "tap", "x": "{{x}}", "y": 1},
                      {"id": "w", "action": "wait", "ms": "{{pause}}"}, *SHOT],
                     **{"$schema": "https://example.org/recipes/schema.json"})
        r = await client.post("/v1/workflows", json=doc)
        assert r.status_code == 201, r.text
        assert r.json()["warnings"] == [{"path": "$.params.spare",
                                         "message": "declared but not used by any step (nor by the artifact path)"}]
        stored = (await client.get("/v1/workflows/ints")).json()["recipe"]
        assert stored["$schema"] == "https://example.org/recipes/schema.json"
        assert stored["steps"][1]["ms"] == "{{pause}}"

        # At run creation an integer param must fit the field it fills; nothing is stored when it does not.
        await seed_fleet(database_url, fleet_of(1, 2))
        body = {"workflow_id": "ints", "params": {"youtubeVideoId": "v", "pause": 4_000_000},
                "targets": {"all_online": True}}
        r = await client.post("/v1/runs", json=body)
        assert r.status_code == 422, r.text
        assert [(d["path"], "within" in d["message"]) for d in r.json()["error"]["details"]] == [
            ("$.params.pause", True)]
        assert await fetchval(database_url, "SELECT count(*) FROM runs") == 0
        assert await fetchval(database_url, "SELECT count(*) FROM outbox") == 0
        r = await client.post("/v1/runs", json={**body, "params": {"youtubeVideoId": "v", "pause": 5}})
        assert r.status_code == 201, r.text
