"""The console's read pages: Overview, Workflows (and one share's timeline), Search, Costs,
and the login form. Each page asks the same functions the JSON endpoints use (or
``mlpipe.api.ui.data`` for what only the console shows) and renders a template."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Annotated

import structlog
from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from mlpipe.dlq import list_dead
from mlpipe.producer import topology_from

from .. import endpoints
from ..auth import SESSION_COOKIE
from ..context import ApiError
from ..models import CostsQuery, NoParams, RangeQuery, SearchQuery
from . import data
from .charts import Bar, bars
from .common import HEADERS, ctx_of, gate, hub_of, render, settings_of
from .session import COOKIE_MAX_AGE_S, secure_cookie, visitor

log = structlog.get_logger("mlpipe.api.ui")
router = APIRouter(prefix="/ui", include_in_schema=False)
_NONE = NoParams()
WINDOWS = {"1h": dt.timedelta(hours=1), "24h": dt.timedelta(days=1),
           "7d": dt.timedelta(days=7), "30d": dt.timedelta(days=30)}


@router.get("")
async def overview(request: Request) -> Response:
    who = gate(request)
    if isinstance(who, Response):
        return who
    ctx, settings, hub = ctx_of(request), settings_of(request), hub_of(request)
    queues: list[data.QueueDepth] = []
    broker_note = "" if settings else "no broker configured for this server"
    failed = dead = None
    if settings is not None and hub is not None:
        try:
            queues = await data.queue_depths(await hub.connection(), topology_from(settings))
            entries = await list_dead(settings, limit=1000)
            failed = data.dead_counts(entries, failed_only=True)
            dead = data.dead_counts(entries, failed_only=False)
        except Exception as exc:  # the page still shows what Postgres knows
            log.warning("ui.broker_unavailable", error=repr(exc)[:300])
            broker_note = "the broker is unreachable"
    chart = None
    if who.admin:
        budgets = await endpoints.budget_status(ctx, _NONE, _NONE)
        rows = []
        for b in budgets.budgets:
            for window, used, limit in (("hour", b.hour_usd, b.hourly_limit_usd),
                                        ("day", b.day_usd, b.daily_limit_usd)):
                if limit is not None:
                    rows.append(Bar(f"{b.task_type} / {window}", float(used / limit),
                                    f"{used / limit:.0%} · ${used:.4f} of ${limit:.4f}"))
        chart = bars(rows, title="spend against each budget", budget=True)
    return render(request, "overview.html", who, page="overview", queues=queues,
                  broker_note=broker_note, done=await data.done_counts(ctx.pool),
                  failed=failed, dead=dead, chart=chart)


@router.get("/workflows")
async def workflows(request: Request, state: str | None = None) -> Response:
    who = gate(request)
    if isinstance(who, Response):
        return who
    pool = ctx_of(request).pool
    return render(request, "workflows.html", who, page="workflows", state=state or "",
                  states=await data.workflow_states(pool),
                  rows=await data.workflows(pool, state or None))


@router.get("/workflows/{share_id}")
async def workflow(request: Request, share_id: str) -> Response:
    who = gate(request)
    if isinstance(who, Response):
        return who
    ctx, hub = ctx_of(request), hub_of(request)
    try:
        state = await endpoints.share_workflow(
            ctx, endpoints.share_path(share_id), _NONE)
    except (ApiError, ValidationError):
        state = None
    remembered = hub.remembered(share_id) if hub is not None else []
    steps = await data.timeline(ctx.pool, share_id, remembered)
    return render(request, "workflow.html", who, page="workflows", share_id=share_id,
                  state=state, steps=steps, status=200 if state or steps else 404)


@router.get("/search")
async def search(request: Request, q: str = "") -> Response:
    who = gate(request)
    if isinstance(who, Response):
        return who
    hits, error = None, ""
    if q.strip():
        try:
            query = SearchQuery.model_validate({"q": q, "limit": "20"})
            hits = (await endpoints.search_text(ctx_of(request), _NONE, query)).items
        except ValidationError:
            error = "the query must be 1 to 1000 characters"
        except ApiError as exc:
            error = exc.message
    return render(request, "search.html", who, page="search", q=q, hits=hits, error=error)


@router.get("/costs")
async def costs(request: Request, window: str = "24h", cursor: str | None = None) -> Response:
    who = gate(request, admin=True)
    if isinstance(who, Response):
        return who
    ctx = ctx_of(request)
    window = window if window in WINDOWS else "24h"
    start = dt.datetime.now(dt.UTC) - WINDOWS[window]
    summary = await endpoints.cost_summary(
        ctx, _NONE, RangeQuery.model_validate({"from": start.isoformat()}))
    top = max((t.usd for t in summary.by_task_type), default=Decimal(0))
    chart = bars([Bar(t.task_type, float(t.usd / top) if top else 0.0,
                      f"${t.usd:f} · {t.calls} call{'' if t.calls == 1 else 's'}")
                  for t in summary.by_task_type],
                 title=f"spend by task type, last {window}")
    try:
        ledger = await endpoints.list_costs(ctx, _NONE, CostsQuery.model_validate(
            {"limit": "25", **({"cursor": cursor} if cursor else {})}))
    except (ApiError, ValidationError):
        return RedirectResponse(f"/ui/costs?window={window}", status_code=303,
                                headers=HEADERS)
    return render(request, "costs.html", who, page="costs", window=window,
                  windows=list(WINDOWS), summary=summary, chart=chart, ledger=ledger)


@router.get("/login")
async def login_form(request: Request, next: str = "/ui") -> Response:
    return render(request, "login.html", visitor(request), page="login", next=_local(next),
                  error="")


@router.post("/login")
async def login(request: Request, token: Annotated[str, Form(max_length=512)],
                next: Annotated[str, Form(max_length=2000)] = "/ui") -> Response:
    tokens = request.app.state.tokens
    if not tokens.enabled or tokens.role(token) is None:
        error = ("no tokens are configured: reading is open, admin pages are closed"
                 if not tokens.enabled else "unknown token")
        return render(request, "login.html", visitor(request), status=401, page="login",
                      next=_local(next), error=error)
    response = RedirectResponse(_local(next), status_code=303, headers=HEADERS)
    response.set_cookie(SESSION_COOKIE, token, max_age=COOKIE_MAX_AGE_S, path="/",
                        httponly=True, samesite="strict", secure=secure_cookie(request))
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form(max_length=200)]) -> Response:
    who = visitor(request)
    if who.signed_in and not who.csrf_ok(csrf):
        return render(request, "forbidden.html", who, status=403, why="stale form; reload")
    response = RedirectResponse("/ui/login", status_code=303, headers=HEADERS)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _local(target: str) -> str:
    """Only this console's own pages are places to go after login (no open redirect)."""
    return target if target.startswith("/ui") and "//" not in target else "/ui"
