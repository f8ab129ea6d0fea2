"""The OpenAPI 3.1 document of the read API, generated from the operation table and its
pydantic models (``python -m mlpipe.api openapi [PATH] [--check]``).

Components are the models' JSON Schemas (2020-12, which OpenAPI 3.1 uses as is): responses in
serialisation mode (what is sent), parameters in validation mode (what is accepted). Query and
path models are spelt out as parameters rather than kept as components; a nullable parameter
becomes an optional one, since a query string cannot say null.

``contracts/openapi.json`` is checked in for teams that generate clients; a test fails when it
differs from what this module produces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .auth import Access
from .models import NoParams, Problem
from .routes import OPERATIONS, Operation

#: Version of the API contract, not of the package: it changes when the document does.
API_VERSION = "1.0.0"
_REF = "#/components/schemas/{model}"
_SECURITY = "bearerAuth"

_DESCRIPTION = """\
Read-only access to what mlpipe computed: similarity search over the stored chunk vectors, a
share's results and video workflow state, and (admin token) the cost ledger, a task summary
and budget status.

Authentication: `Authorization: Bearer <token>`. An ordinary token reads search, results and
workflow state; the analytics endpoints need an admin token (403 otherwise). A missing or
unknown token is 401. A server started without any token (allowed on loopback only) answers
the read endpoints without one and the analytics endpoints with 403.

Paged listings return `nextCursor`; pass it back as `cursor` with the same filters (`limit`
may change) until it is null. Errors are JSON problems (`{"error", "message", "details"}`).
"""

_STATUS_TEXT = {400: "invalid parameters or cursor", 401: "missing or invalid bearer token",
                403: "an admin token is required (a server without tokens has none to accept)",
                404: "not found",
                503: "database or query embedding unavailable; retry later"}


def document(operations: Sequence[Operation] = OPERATIONS) -> dict[str, Any]:
    inputs = {m for op in operations for m in (op.path_params, op.query)}
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)),
        *((m, "serialization") for m in _unique([op.response for op in operations])),
        (Problem, "serialization"),
    ]
    refs, top = models_json_schema(wanted, ref_template=_REF, by_alias=True)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))

    def own(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        name = refs[(model, mode)]["$ref"].rsplit("/", 1)[1]
        return dict(schemas[name])

    paths: dict[str, Any] = {}
    for op in operations:
        parameters = (_parameters(own(op.path_params, "validation"), "path", schemas)
                      + _parameters(own(op.query, "validation"), "query", schemas))
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(
            op, parameters, refs[(op.response, "serialization")])
    for model in inputs:  # spelt out as parameters above
        schemas.pop(refs[(model, "validation")]["$ref"].rsplit("/", 1)[1], None)
    for schema in schemas.values():  # pydantic's titles from aliases read "Nextcursor"
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlpipe read API", "version": API_VERSION,
                 "description": _DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {_SECURITY: {"type": "http", "scheme": "bearer"}},
        },
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _unique(models: list[type[BaseModel]]) -> list[type[BaseModel]]:
    return list(dict.fromkeys(models))


def _operation(op: Operation, parameters: list[dict[str, Any]],
               response_ref: dict[str, Any]) -> dict[str, Any]:
    statuses = [400, *((401,) if op.access is not Access.PUBLIC else ()),
                *((403,) if op.access is Access.ADMIN else ()),
                *((404,) if op.not_found else ()), 503]
    responses: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": response_ref}}}}
    for status in statuses:
        responses[str(status)] = _problem_response(status)
    out: dict[str, Any] = {
        "operationId": op.operation_id, "tags": [op.tag], "summary": op.summary,
        "description": op.description, "parameters": parameters, "responses": responses,
        "security": [] if op.access is Access.PUBLIC else [{_SECURITY: []}],
        "x-mlpipe-access": op.access.value,
    }
    if not parameters:
        del out["parameters"]
    return out


def _problem_response(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _STATUS_TEXT[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Problem")}}}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {
            "description": "the bearer challenge (RFC 6750)", "required": True,
            "schema": {"type": "string"}}}
    return response


def _parameters(schema: dict[str, Any], where: str,
                components: dict[str, Any]) -> list[dict[str, Any]]:
    if schema.get("title") == NoParams.__name__:
        return []
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop = _not_null(prop, components)
        description = prop.pop("description", None)
        param: dict[str, Any] = {"name": name, "in": where,
                                 "required": where == "path" or name in required,
                                 "schema": prop}
        if description:
            param["description"] = description
        out.append(param)
    return out


def _not_null(prop: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """``X | None = None`` as an optional parameter of type X: drop the null branch, the null
    default and pydantic's generated title."""
    prop = {k: v for k, v in prop.items() if k != "title"}
    branches = prop.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1:
            del prop["anyOf"]
            prop = {**kept[0], **prop}
    if prop.get("default", 0) is None:
        del prop["default"]
    return prop
