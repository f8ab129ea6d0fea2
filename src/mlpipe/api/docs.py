"""The OpenAPI document FastAPI writes from the routes, and the interactive docs at ``/docs``.

FastAPI generates the document; three house rules are applied on top, because the wire
behaves that way: invalid parameters are 400 problems (FastAPI would document a 422 that is
never sent; a problem is JSON even where the success is an event stream), an optional query
parameter is omitted rather than null (a query string cannot say null), and the API's own
description and version. ``contracts/openapi.json`` is checked in
for teams that generate clients; a test fails when it differs from ``render(document())``.

Swagger UI's files come from the ``fastapi-offline`` wheel (it carries Swagger UI 5, which
reads OpenAPI 3.1) and are served by this server: the docs work without internet access.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from .problems import JSON

#: Version of the API contract, not of the package: it changes when the document does.
API_VERSION = "1.0.0"
TITLE = "mlpipe read API"
DOCS_ASSETS = "/docs/assets"

DESCRIPTION = """\
Read-only access to what mlpipe computed: similarity search over the stored chunk vectors, a
share's results and video workflow state, a live stream of result events, and (admin token)
the cost ledger, a task summary and budget status.

Authentication: `Authorization: Bearer <token>`. An ordinary token reads search, results,
workflow state and events; the analytics endpoints need an admin token (403 otherwise). A
missing or unknown token is 401. A server started without any token (allowed on loopback
only) answers the read endpoints without one and the analytics endpoints with 403.

Paged listings return `nextCursor`; pass it back as `cursor` with the same filters (`limit`
may change) until it is null. Errors are JSON problems (`{"error", "message", "details"}`).
"""


def document(app: FastAPI) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(app.openapi()))  # FastAPI caches its own
    for path in doc["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
            for status, response in operation["responses"].items():
                if status != "200" and "content" in response:  # problems are JSON always
                    response["content"] = {JSON: next(iter(response["content"].values()))}
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _not_null(parameter["schema"])
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for schema in schemas.values():  # pydantic's titles from aliases read "Nextcursor"
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
    return doc


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``X | None = None`` as an optional parameter of type X: drop the null branch, the null
    default and the generated title."""
    schema = {k: v for k, v in schema.items() if k not in ("title", "description")}
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) == 1:
            del schema["anyOf"]
            schema = {**kept[0], **schema}
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    return schema


def swagger_assets() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def docs_router(openapi_text: str) -> APIRouter:
    """``/openapi.json`` (the exact checked-in text) and ``/docs`` (Swagger UI)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> Response:
        return Response(openapi_text, media_type=JSON)

    @router.get("/docs")
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{TITLE} - docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url="/ui/static/favicon.svg")

    return router


def mount_assets(app: FastAPI) -> None:
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_assets()), name="docs-assets")
