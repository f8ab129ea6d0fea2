"""The ASGI application: the JSON endpoints, ``/v1/events``, ``/openapi.json``, ``/docs`` and
the console (``/ui``), with every API error as a JSON problem. ``create_app`` builds the API
routes alone (what the OpenAPI document is made from); ``build_app`` adds what a running
server needs (its pool, tokens, event hub, the console).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from mlpipe.settings import Settings

from . import docs, problems, stream, ui, v1
from .auth import TokenSet
from .context import ApiContext
from .events import EventHub


def create_app() -> FastAPI:
    app = FastAPI(title=docs.TITLE, version=docs.API_VERSION, description=docs.DESCRIPTION,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  swagger_ui_oauth2_redirect_url=None)
    problems.install(app)
    app.include_router(v1.router)
    app.include_router(stream.router)
    return app


def contract() -> dict[str, Any]:
    """The OpenAPI document (``contracts/openapi.json``), without a database or broker."""
    return docs.document(create_app())


def build_app(ctx: ApiContext, tokens: TokenSet, events: EventHub | None = None,
              settings: Settings | None = None) -> FastAPI:
    """``settings``: the daemon's, for what the console reads from the broker (queues, dead
    letters); ``events``: the hub behind ``/v1/events``."""
    app = create_app()
    app.state.ctx = ctx
    app.state.tokens = tokens
    app.state.events = events
    app.state.settings = settings
    app.include_router(docs.docs_router(docs.render(docs.document(app))))
    docs.mount_assets(app)
    ui.install(app)
    return app
