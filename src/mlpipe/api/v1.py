"""The JSON endpoints, declared with FastAPI: each route states its token (``access``), its
parameters (the models of ``mlpipe.api.models``) and its answers, and FastAPI both validates
requests and writes the OpenAPI document from those declarations, so an endpoint cannot
take other parameters than it documents.

Handlers stay in ``mlpipe.api.endpoints`` (``(ctx, path, query) -> model``); a route only
unpacks the request and renders the model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mlpipe.contract.models import _ID as SHARE_ID_PATTERN

from . import endpoints
from .auth import SESSION_COOKIE, Access, Role, TokenSet, authorize
from .context import ApiContext, ApiError
from .models import (
    Budgets,
    CostPage,
    CostsQuery,
    CostSummary,
    Health,
    HitPage,
    NoParams,
    Problem,
    RangeQuery,
    ResultsQuery,
    SearchQuery,
    ShareResults,
    SimilarQuery,
    TaskSummary,
    WorkflowState,
)
from .problems import json_response

#: Name of the bearer scheme in the OpenAPI document.
SECURITY_SCHEME = "bearerAuth"
_bearer = HTTPBearer(scheme_name=SECURITY_SCHEME, auto_error=False)
_NO_PARAMS = NoParams()

STATUS_TEXT = {400: "invalid parameters or cursor", 401: "missing or invalid bearer token",
               403: "an admin token is required (a server without tokens has none to accept)",
               404: "not found",
               503: "a backing service (database, query embedding, broker) is unavailable; "
                    "retry later"}


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


def tokens_of(request: Request) -> TokenSet:
    tokens: TokenSet = request.app.state.tokens
    return tokens


def require(access: Access, *, cookie: bool = False) -> Callable[..., Awaitable[Role | None]]:
    """A dependency that checks the caller's token before anything else about the request
    (an unauthenticated caller learns nothing, not even which parameters are wrong), then
    refuses a query parameter given twice (ambiguous: refused rather than one picked).

    ``cookie``: the console's login cookie may stand in for the header (a browser's
    ``EventSource`` cannot set headers); it holds the same token."""

    async def check(request: Request, _credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Role | None:
        header = request.headers.get("Authorization")
        if header is None and cookie and request.cookies.get(SESSION_COOKIE):
            header = f"Bearer {request.cookies[SESSION_COOKIE]}"
        role = authorize(header, access, tokens_of(request))
        single_values(request)
        return role

    return check


def require_public(request: Request) -> None:
    single_values(request)


def single_values(request: Request) -> None:
    seen: set[str] = set()
    for name, _value in request.query_params.multi_items():
        if name in seen:
            count = len(request.query_params.getlist(name))
            raise ApiError(400, "invalid_request",
                           f"query parameter {name!r} given {count} times")
        seen.add(name)


def route_options(access: Access, *, not_found: bool = False,
                  cookie: bool = False) -> dict[str, Any]:
    """What every route declares about its token, its errors and the document."""
    statuses = [400, *((401,) if access is not Access.PUBLIC else ()),
                *((403,) if access is Access.ADMIN else ()), *((404,) if not_found else ()),
                503]
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": Problem, "description": STATUS_TEXT[s]} for s in statuses}
    if 401 in responses:
        responses[401]["headers"] = {"WWW-Authenticate": {
            "description": "the bearer challenge (RFC 6750)", "required": True,
            "schema": {"type": "string"}}}
    extra: dict[str, Any] = {"x-mlpipe-access": access.value}
    if access is Access.PUBLIC:
        extra["security"] = []
    dependency = require_public if access is Access.PUBLIC else require(access, cookie=cookie)
    return {"responses": responses, "openapi_extra": extra,
            "dependencies": [Depends(dependency)]}


ShareIdParam = Annotated[str, Path(alias="shareId", pattern=SHARE_ID_PATTERN,
                                   description="a contract v1 share id")]
Ctx = Annotated[ApiContext, Depends(context)]


_share = endpoints.share_path


router = APIRouter()


@router.get(
    "/v1/search", operation_id="searchText", tags=["search"], summary="Search chunks by text",
    description="Embeds `q` with the server's model and returns the nearest stored chunks, "
    "best first. `from`/`to` bound when a chunk was embedded (contract v1 carries no "
    "publication date). Pages are cut from one ranking at most 1000 hits deep.",
    response_model=HitPage, **route_options(Access.READ))
async def search_text(ctx: Ctx, query: Annotated[SearchQuery, Query()]) -> Response:
    return json_response(await endpoints.search_text(ctx, _NO_PARAMS, query))


@router.get(
    "/v1/shares/{shareId}/similar", operation_id="similarShares", tags=["search"],
    summary="Shares similar to a share",
    description="Other shares nearest to this share's average chunk vector, each with its "
    "best chunk, best first; the share itself is excluded. 404 when the share has no vectors "
    "of this embedding type.",
    response_model=HitPage, **route_options(Access.READ, not_found=True))
async def similar_shares(ctx: Ctx, share_id: ShareIdParam,
                         query: Annotated[SimilarQuery, Query()]) -> Response:
    return json_response(await endpoints.similar_shares(ctx, _share(share_id), query))


@router.get(
    "/v1/shares/{shareId}/results", operation_id="shareResults", tags=["shares"],
    summary="A share's results",
    description="The stored result of each task type that ran for this share (`ml_results`). "
    "An unknown share and a share still in progress both give an empty list.",
    response_model=ShareResults, **route_options(Access.READ))
async def share_results(ctx: Ctx, share_id: ShareIdParam,
                        query: Annotated[ResultsQuery, Query()]) -> Response:
    return json_response(await endpoints.share_results(ctx, _share(share_id), query))


@router.get(
    "/v1/shares/{shareId}/workflow", operation_id="shareWorkflow", tags=["shares"],
    summary="A share's video workflow state",
    description="Current state and history of the video workflow (transcribe, combined "
    "summary, rich embedding). 404 when the share never entered one.",
    response_model=WorkflowState, **route_options(Access.READ, not_found=True))
async def share_workflow(ctx: Ctx, share_id: ShareIdParam,
                         query: Annotated[NoParams, Query()]) -> Response:
    return json_response(await endpoints.share_workflow(ctx, _share(share_id), query))


@router.get(
    "/v1/costs/summary", operation_id="costSummary", tags=["analytics"],
    summary="Spend summary",
    description="Spend in `[from, to)` by task type, model and unit kind (`ml_costs`). Admin "
    "token.",
    response_model=CostSummary, **route_options(Access.ADMIN))
async def cost_summary(ctx: Ctx, query: Annotated[RangeQuery, Query()]) -> Response:
    return json_response(await endpoints.cost_summary(ctx, _NO_PARAMS, query))


@router.get(
    "/v1/costs", operation_id="listCosts", tags=["analytics"], summary="Cost ledger entries",
    description="One entry per paid call, newest first, filtered and paged with a cursor. "
    "Admin token.",
    response_model=CostPage, **route_options(Access.ADMIN))
async def list_costs(ctx: Ctx, query: Annotated[CostsQuery, Query()]) -> Response:
    return json_response(await endpoints.list_costs(ctx, _NO_PARAMS, query))


@router.get(
    "/v1/tasks/summary", operation_id="taskSummary", tags=["analytics"], summary="Task summary",
    description="Stored results by task type and outcome, open budget reservations and video "
    "workflows by state, over `[from, to)`. Only what Postgres holds: dead-lettered tasks are "
    "in the dead-letter queue (`mlpipe dlq list`) and retries in the daemon's metrics, not "
    "here. Admin token.",
    response_model=TaskSummary, **route_options(Access.ADMIN))
async def task_summary(ctx: Ctx, query: Annotated[RangeQuery, Query()]) -> Response:
    return json_response(await endpoints.task_summary(ctx, _NO_PARAMS, query))


@router.get(
    "/v1/budgets", operation_id="budgetStatus", tags=["analytics"], summary="Budget status",
    description="Rolling last-hour and last-day spend (charges plus open reservations) of "
    "each task type against its ceilings, as the budget pre-flight sees it. Admin token.",
    response_model=Budgets, **route_options(Access.ADMIN))
async def budget_status(ctx: Ctx, query: Annotated[NoParams, Query()]) -> Response:
    return json_response(await endpoints.budget_status(ctx, _NO_PARAMS, query))


@router.get(
    "/healthz", operation_id="health", tags=["ops"],
    summary="Liveness and database reachability",
    description="200 when Postgres answers, 503 otherwise. No token needed.",
    response_model=Health, **route_options(Access.PUBLIC))
async def health(ctx: Ctx, query: Annotated[NoParams, Query()]) -> Response:
    return json_response(await endpoints.health(ctx, _NO_PARAMS, query))
