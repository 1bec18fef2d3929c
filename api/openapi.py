"""The OpenAPI 3.1 spec served at `/openapi.json`, built from the pydantic models the API uses.

Each handler declares what it takes and returns with one decorator, under its route:

    @routes.get("/api/things/{id}")
    @openapi.operation(responses={200: ThingOut, 404: ErrorOut})
    async def get_thing(request): ...

`build_spec(app)` walks the app's router, so the spec lists exactly the routes that are served.
Every operation also documents the answers the middlewares give on any route: 401 (except
public routes), 503 (a backing service is down), and for routes with a body 400 (not JSON),
413 (too large) and 422 (invalid), all with `error` as their body (ErrorOut unless the route
says otherwise, as OpenAI-compatible routes do). An API route without the decorator is listed
by `undocumented(app)`, which a test keeps empty. An `/api/` route's documented query is its
whole query: `query_middleware` refuses any other parameter with a 422.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from api.errors import ErrorOut
from promptq.errors import InvalidRequest

#: Where the spec is served; public, like /healthz.
SPEC_PATH = "/openapi.json"
_ATTR = "__openapi_operation__"
_REF_TEMPLATE = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")

H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Content:
    """A body that is not a pydantic model: its media type and, optionally, its JSON schema."""

    media_type: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


#: What a request or response body is: a model, a type adapter (unions), or raw content.
BodySpec = type[BaseModel] | TypeAdapter[Any] | Content


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers."""

    responses: Mapping[int, BodySpec | tuple[BodySpec, ...] | None]
    #: The body, or the bodies (one per media type) the route accepts.
    request: BodySpec | tuple[BodySpec, ...] | None = None
    #: A model whose fields are the query parameters.
    query: type[BaseModel] | None = None
    summary: str | None = None
    description: str | None = None
    #: Needs no API key (like /healthz).
    public: bool = False
    tags: tuple[str, ...] = ()
    #: Descriptions of path parameters, by name (each is a string).
    path_params: Mapping[str, str] = field(default_factory=dict)
    #: Response headers by status: {202: {"Location": "where the job is"}}.
    headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    #: The body of the errors every route may answer (401, 503, 400/413/422 for bodies).
    error: BodySpec = ErrorOut


def operation(
    *,
    responses: Mapping[int, BodySpec | tuple[BodySpec, ...] | None],
    request: BodySpec | tuple[BodySpec, ...] | None = None,
    query: type[BaseModel] | None = None,
    summary: str | None = None,
    description: str | None = None,
    public: bool = False,
    tags: tuple[str, ...] = (),
    path_params: Mapping[str, str] | None = None,
    headers: Mapping[int, Mapping[str, str]] | None = None,
    error: BodySpec = ErrorOut,
) -> Callable[[H], H]:
    """Document a handler. `responses` maps each status it returns itself to its body model."""
    spec = Operation(
        responses=responses,
        request=request,
        query=query,
        summary=summary,
        description=description,
        public=public,
        tags=tags,
        path_params=path_params or {},
        headers=headers or {},
        error=error,
    )

    def mark(handler: H) -> H:
        setattr(handler, _ATTR, spec)
        return handler

    return mark


def operation_of(handler: object) -> Operation | None:
    """The Operation a handler was documented with, if any."""
    spec = getattr(handler, _ATTR, None)
    return spec if isinstance(spec, Operation) else None


@web.middleware
async def query_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse a query parameter that an `/api/` route with a documented query does not take:
    a misspelt filter (`?batch=` for `?batch_id=`) would otherwise be ignored, and the answer
    would look right while covering every job."""
    spec = operation_of(request.match_info.handler)
    if spec is not None and spec.query is not None and request.path.startswith("/api/"):
        taken = spec.query.model_fields
        if unknown := sorted(set(request.query) - set(taken)):
            raise InvalidRequest(
                f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))}; {request.path} takes {', '.join(taken)}"
            )
    return await handler(request)


#: Why each status that a middleware may give is given.
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "The body is not valid JSON or misses a required part",
    401: "No valid API key: send `Authorization: Bearer <key>`",
    403: "Forbidden",
    404: "No such object, or it is not yours",
    409: "Conflicts with the object's current state",
    413: "The body or a document in it is larger than this server accepts",
    422: "The request is not valid; the message says what to change",
    503: "A backing service (database or Redis) is unavailable; retry after `Retry-After`",
}


def _routes(app: web.Application) -> list[tuple[str, str, object]]:
    """(method, path, handler) of every served route, HEAD and catch-alls left out."""
    found: list[tuple[str, str, object]] = []
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in ("HEAD", "*"):
            continue
        found.append((route.method, resource.canonical, route.handler))
    return found


#: Routes under these prefixes must be documented (pages for people, such as a dashboard,
#: may be).
API_PREFIXES = ("/api/", "/v1/", "/healthz", "/metrics")


def undocumented(app: web.Application) -> list[tuple[str, str]]:
    """Served API routes without an `@operation`."""
    return [
        (method, path)
        for method, path, handler in _routes(app)
        if operation_of(handler) is None and path.startswith(API_PREFIXES)
    ]


@dataclass(frozen=True)
class _Placeholder:
    """Where a model's schema goes once all schemas are generated together."""

    index: int


class _Schemas:
    """Collects every model's JSON schema into components/schemas with shared $refs."""

    def __init__(self) -> None:
        self._inputs: list[tuple[int, JsonSchemaMode, TypeAdapter[Any]]] = []
        self._seen: dict[tuple[int, str], _Placeholder] = {}

    def add(self, spec: BodySpec, mode: JsonSchemaMode) -> _Placeholder | Mapping[str, Any]:
        """A placeholder for the body's schema (a raw Content's schema as is)."""
        if isinstance(spec, Content):
            return dict(spec.schema)
        key = (id(spec), mode)
        if key not in self._seen:
            adapter = spec if isinstance(spec, TypeAdapter) else TypeAdapter(spec)
            self._seen[key] = _Placeholder(len(self._inputs))
            self._inputs.append((len(self._inputs), mode, adapter))
        return self._seen[key]

    def resolve(self) -> tuple[dict[_Placeholder, Any], dict[str, Any]]:
        """Each placeholder's schema, and the shared definitions they refer to."""
        by_key, defs = TypeAdapter.json_schemas(self._inputs, ref_template=_REF_TEMPLATE)
        schemas = {_Placeholder(index): schema for (index, _), schema in by_key.items()}
        return schemas, defs.get("$defs", {})


def _media_type(spec: BodySpec) -> str:
    return spec.media_type if isinstance(spec, Content) else "application/json"


def build_spec(app: web.Application, *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for every documented route of `app`."""
    schemas = _Schemas()
    pending: list[tuple[str, str, str, Operation, dict[str, Any]]] = []
    for method, path, handler in _routes(app):
        spec = operation_of(handler)
        if spec is None:
            continue
        name = getattr(handler, "__name__", f"{method}_{path}")
        pending.append((method, path, name, spec, _operation(spec, path, name, handler, schemas)))
    resolved, defs = schemas.resolve()

    def fill(value: Any) -> Any:
        if isinstance(value, _Placeholder):
            return resolved[value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    paths: dict[str, dict[str, Any]] = {}
    for method, path, _, _, body in pending:
        paths.setdefault(path, {})[method.lower()] = fill(body)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(defs.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `promptq keys create`",
                }
            },
        },
        "security": [{"bearer": []}],
    }


def _operation(
    spec: Operation, path: str, name: str, handler: object, schemas: _Schemas
) -> dict[str, Any]:
    doc = (getattr(handler, "__doc__", None) or "").strip()
    body: dict[str, Any] = {
        "operationId": name,
        "summary": spec.summary or doc.split("\n")[0],
    }
    if spec.description:
        body["description"] = spec.description
    if spec.tags:
        body["tags"] = list(spec.tags)
    if spec.public:
        body["security"] = []
    parameters = [
        {
            "name": param,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            **({"description": spec.path_params[param]} if param in spec.path_params else {}),
        }
        for param in _PATH_PARAM.findall(path)
    ]
    if spec.query is not None:
        query_schema = spec.query.model_json_schema()
        required = set(query_schema.get("required", []))
        for param, raw_schema in query_schema.get("properties", {}).items():
            param_schema = _query_schema(raw_schema, query_schema.get("$defs", {}))
            description = param_schema.pop("description", None)
            parameters.append(
                {
                    "name": param,
                    "in": "query",
                    "required": param in required,
                    "schema": param_schema,
                    **({"description": description} if description else {}),
                }
            )
    if parameters:
        body["parameters"] = parameters
    statuses: dict[int, BodySpec | tuple[BodySpec, ...] | None] = dict(spec.responses)
    if spec.query is not None:
        statuses.setdefault(422, spec.error)
    if spec.request is not None:
        bodies = spec.request if isinstance(spec.request, tuple) else (spec.request,)
        body["requestBody"] = {
            "required": True,
            "content": {_media_type(b): {"schema": schemas.add(b, "validation")} for b in bodies},
        }
        for status in (400, 413, 422):
            statuses.setdefault(status, spec.error)
    if not spec.public:
        statuses.setdefault(401, spec.error)
    statuses.setdefault(503, spec.error)
    responses: dict[str, Any] = {}
    for status, response in sorted(statuses.items()):
        entry: dict[str, Any] = {"description": _REASONS.get(status, "See the error message")}
        if response is not None:
            bodies = response if isinstance(response, tuple) else (response,)
            entry["content"] = {
                _media_type(b): {"schema": schemas.add(b, "serialization")} for b in bodies
            }
        if status in spec.headers:
            entry["headers"] = {
                header: {"description": text, "schema": {"type": "string"}}
                for header, text in spec.headers[status].items()
            }
        responses[str(status)] = entry
    body["responses"] = responses
    return body


def _query_schema(schema: dict[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    """A query parameter's schema: refs inlined, and `| None` dropped (absent means None)."""
    if "$ref" in schema:
        schema = {**defs[schema["$ref"].rsplit("/", 1)[-1]], **schema}
        del schema["$ref"]
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if "anyOf" in schema and len(options) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return _query_schema({**options[0], **rest}, defs)
    schema.pop("title", None)
    if schema.get("default") is None:
        schema.pop("default", None)
    return schema


SPEC = web.AppKey("openapi_spec", dict)


def setup(app: web.Application, *, title: str = "promptq", version: str = "0") -> None:
    """Serve the spec of `app` at SPEC_PATH, built once when the app starts."""

    async def build(app: web.Application) -> None:
        app[SPEC].update(build_spec(app, title=title, version=version))

    app[SPEC] = {}
    app.on_startup.append(build)
    app.router.add_get(SPEC_PATH, serve_spec, allow_head=False)


async def serve_spec(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 spec of this API."""
    return web.json_response(request.app[SPEC])
