"""The operation table: one entry per endpoint, read both by the aiohttp router
(``mlpipe.api.dispatch``) and by the OpenAPI generator (``mlpipe.api.openapi``), so an
endpoint cannot exist without being documented or be documented with other parameters than
it takes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from . import endpoints
from .auth import Access
from .models import (
    Budgets,
    CostPage,
    CostsQuery,
    CostSummary,
    Health,
    HitPage,
    NoParams,
    RangeQuery,
    ResultsQuery,
    SearchQuery,
    SharePath,
    ShareResults,
    SimilarQuery,
    TaskSummary,
    WorkflowState,
)

Handler = Callable[..., Awaitable[BaseModel]]


@dataclass(frozen=True)
class Operation:
    method: str
    #: OpenAPI path template; aiohttp reads the same ``{name}`` syntax.
    path: str
    operation_id: str
    tag: str
    summary: str
    description: str
    handler: Handler
    response: type[BaseModel]
    path_params: type[BaseModel] = NoParams
    query: type[BaseModel] = NoParams
    access: Access = Access.READ
    #: Statuses this operation can answer besides 200, 400, 503 and the auth ones.
    not_found: bool = False


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "GET", "/v1/search", "searchText", "search", "Search chunks by text",
        "Embeds `q` with the server's model and returns the nearest stored chunks, best "
        "first. `from`/`to` bound when a chunk was embedded (contract v1 carries no "
        "publication date). Pages are cut from one ranking at most 1000 hits deep.",
        endpoints.search_text, HitPage, query=SearchQuery),
    Operation(
        "GET", "/v1/shares/{shareId}/similar", "similarShares", "search",
        "Shares similar to a share",
        "Other shares nearest to this share's average chunk vector, each with its best "
        "chunk, best first; the share itself is excluded. 404 when the share has no vectors "
        "of this embedding type.",
        endpoints.similar_shares, HitPage, path_params=SharePath, query=SimilarQuery,
        not_found=True),
    Operation(
        "GET", "/v1/shares/{shareId}/results", "shareResults", "shares", "A share's results",
        "The stored result of each task type that ran for this share (`ml_results`). An "
        "unknown share and a share still in progress both give an empty list.",
        endpoints.share_results, ShareResults, path_params=SharePath, query=ResultsQuery),
    Operation(
        "GET", "/v1/shares/{shareId}/workflow", "shareWorkflow", "shares",
        "A share's video workflow state",
        "Current state and history of the video workflow (transcribe, combined summary, "
        "rich embedding). 404 when the share never entered one.",
        endpoints.share_workflow, WorkflowState, path_params=SharePath, not_found=True),
    Operation(
        "GET", "/v1/costs/summary", "costSummary", "analytics", "Spend summary",
        "Spend in `[from, to)` by task type, model and unit kind (`ml_costs`). Admin token.",
        endpoints.cost_summary, CostSummary, query=RangeQuery, access=Access.ADMIN),
    Operation(
        "GET", "/v1/costs", "listCosts", "analytics", "Cost ledger entries",
        "One entry per paid call, newest first, filtered and paged with a cursor. Admin "
        "token.",
        endpoints.list_costs, CostPage, query=CostsQuery, access=Access.ADMIN),
    Operation(
        "GET", "/v1/tasks/summary", "taskSummary", "analytics", "Task summary",
        "Stored results by task type and outcome, open budget reservations and video "
        "workflows by state, over `[from, to)`. Only what Postgres holds: dead-lettered "
        "tasks are in the dead-letter queue (`mlpipe dlq list`) and retries in the daemon's "
        "metrics, not here. Admin token.",
        endpoints.task_summary, TaskSummary, query=RangeQuery, access=Access.ADMIN),
    Operation(
        "GET", "/v1/budgets", "budgetStatus", "analytics", "Budget status",
        "Rolling last-hour and last-day spend (charges plus open reservations) of each task "
        "type against its ceilings, as the budget pre-flight sees it. Admin token.",
        endpoints.budget_status, Budgets, access=Access.ADMIN),
    Operation(
        "GET", "/healthz", "health", "ops", "Liveness and database reachability",
        "200 when Postgres answers, 503 otherwise. No token needed.",
        endpoints.health, Health, access=Access.PUBLIC),
)
