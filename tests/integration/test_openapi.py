"""The served OpenAPI spec: complete, public, and true to the error shape and auth scheme.

Given the real API app, `/openapi.json` answers without a key with an OpenAPI 3.1 document
that lists every route the app serves, says each needs a Bearer key (except the public ones),
and documents the one error body.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api import openapi
from api.auth import PUBLIC_PATHS
from tests.conftest import ApiStarter


async def served_spec(start_api: ApiStarter) -> tuple[web.Application, dict[str, Any]]:
    """The app and the spec it serves (fetched without a key)."""
    api = await start_api()
    async with api.get("/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        spec = await response.json()
    assert api.app is not None
    return api.app, spec


async def test_the_spec_is_public_and_lists_every_served_route(start_api: ApiStarter) -> None:
    app, spec = await served_spec(start_api)
    assert spec["openapi"] == "3.1.0"
    missing = openapi.undocumented(app)
    assert missing == [], (
        f"document these routes with @openapi.operation(...) under their route: {missing}"
    )
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method not in ("HEAD", "*")
        and route.resource.canonical.startswith(openapi.API_PREFIXES)
    }
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert served <= documented
    assert ("post", "/api/jobs") in documented


async def test_every_operation_says_how_it_authenticates_and_how_it_fails(
    start_api: ApiStarter,
) -> None:
    _, spec = await served_spec(start_api)
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from `promptq keys create`",
    }
    assert spec["security"] == [{"bearer": []}]
    error_ref = {"$ref": "#/components/schemas/ErrorOut"}
    error = spec["components"]["schemas"]["ErrorOut"]
    assert error["required"] == ["error"]
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            where = f"{method.upper()} {path}"
            public = op.get("security") == []
            assert public == (path in PUBLIC_PATHS), where
            statuses = set(op["responses"])
            assert ("401" in statuses) != public, where
            assert "503" in statuses, where
            if "requestBody" in op:
                assert {"400", "413", "422"} <= statuses, where
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    if path.startswith("/api/"):  # /v1 answers in OpenAI's error shape
                        assert schema == error_ref, where
            # 503 (a backing service is down) and, for a chat completion, 502/504 (the job
            # failed or is still running) are answers; a 500 never is
            assert "500" not in statuses, where
