"""What every console page shares: the templates, the gate (signed in, admin), the security
headers, and the broker pieces the app was started with."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from mlpipe.settings import Settings

from ..context import ApiContext
from ..events import EventHub
from .session import Visitor, visitor

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

#: Every asset is this server's; no inline script (the live feed is a file), no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "same-origin", "Cache-Control": "no-store"}


def ctx_of(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def settings_of(request: Request) -> Settings | None:
    settings: Settings | None = request.app.state.settings
    return settings


def hub_of(request: Request) -> EventHub | None:
    hub: EventHub | None = request.app.state.events
    return hub


def render(request: Request, template: str, who: Visitor, status: int = 200,
           **values: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, template, {"who": who, "now": dt.datetime.now(dt.UTC), **values},
        status_code=status, headers=HEADERS)


def gate(request: Request, *, admin: bool = False) -> Visitor | Response:
    """The visitor, or the answer instead of the page: the login form for a stranger, 403
    for a read token on an admin page (and for everyone when no admin token exists)."""
    who = visitor(request)
    if not who.signed_in:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={_quote(target)}", status_code=303,
                                headers=HEADERS)
    if admin and not who.admin:
        why = ("this page needs an admin token" if who.tokens_enabled else
               "this page needs an admin token and none is configured "
               "(MLPIPE_API_ADMIN_TOKENS)")
        return render(request, "forbidden.html", who, status=403, why=why)
    return who


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="/")


def age(seconds: float | None) -> str:
    """``3 min``, ``5 h``, ``2 d``: how long ago, for tables."""
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


templates.env.filters["age"] = age
