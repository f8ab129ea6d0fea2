"""The ASGI application: the JSON endpoints, ``/openapi.json`` and ``/docs``, with every error
as a JSON problem. ``create_app`` builds the routes alone (what the OpenAPI document is made
from); ``build_app`` adds what a running server needs (its pool, tokens, event hub).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from . import docs, problems, v1
from .auth import TokenSet
from .context import ApiContext


def create_app() -> FastAPI:
    app = FastAPI(title=docs.TITLE, version=docs.API_VERSION, description=docs.DESCRIPTION,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None)
    problems.install(app)
    app.include_router(v1.router)
    return app


def contract() -> dict[str, Any]:
    """The OpenAPI document (``contracts/openapi.json``), without a database or broker."""
    return docs.document(create_app())


def build_app(ctx: ApiContext, tokens: TokenSet) -> FastAPI:
    app = create_app()
    app.state.ctx = ctx
    app.state.tokens = tokens
    app.include_router(docs.docs_router(docs.render(docs.document(app))))
    docs.mount_assets(app)
    return app
