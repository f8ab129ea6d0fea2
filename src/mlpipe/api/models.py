"""Wire models of the read API: the one source of request validation, response serialisation
and the OpenAPI document (``mlpipe.api.openapi``), so the three cannot disagree.

JSON is camelCase (as in contract v1). Amounts of money and units travel as decimal strings
("0.001250"): the ledger keeps exact decimals and a JSON number would round them in most
clients. Times are RFC 3339 with an offset; a query-string time without one is refused rather
than guessed.
"""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

from mlpipe.contract.models import _ID as SHARE_ID_PATTERN
from mlpipe.contract.models import ContentType, EmbeddingType, TaskType
from mlpipe.workflow.video import State

# --- scalar types -------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339_only(value: Any) -> Any:
    """pydantic would also take unix seconds or a bare date; a filter that silently read
    "1700000000" as a time is worse than a 400."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("expected an RFC 3339 date-time with an offset, "
                         "e.g. 2024-05-01T12:00:00Z")
    return value


def _to_utc(value: dt.datetime) -> dt.datetime:
    """An offset can push year 1 or 9999 past what ``datetime`` holds in UTC; such a bound
    means "unbounded" anyway, so it is clamped instead of failing the request."""
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        edge = dt.datetime.min if value.year == 1 else dt.datetime.max
        return edge.replace(tzinfo=dt.UTC)


#: A time given in a query string.
Instant = Annotated[AwareDatetime, BeforeValidator(_rfc3339_only), AfterValidator(_to_utc)]


def _plain(value: Decimal) -> str:
    return format(value, "f")  # never "1E-7"


#: An exact decimal (USD, units), as a plain decimal string on the wire.
Amount = Annotated[
    Decimal,
    PlainSerializer(_plain, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
                    "examples": ["0.001250"]}, mode="serialization"),
]

#: Free text in a filter: Postgres text cannot hold NUL, so it is refused up front.
Text = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]+$")]
ShareId = Annotated[str, Field(pattern=SHARE_ID_PATTERN, description="a contract v1 share id")]
Cursor = Annotated[str, Field(
    min_length=1, max_length=512, pattern=r"^[A-Za-z0-9_-]+$",
    description="`nextCursor` of the previous page, for the same filters (400 otherwise)")]
From = Annotated[Instant | None, Field(
    alias="from", description="inclusive lower bound (RFC 3339)")]
To = Annotated[Instant | None, Field(description="exclusive upper bound (RFC 3339)")]


# --- bases ----------------------------------------------------------------------------------------


class _In(BaseModel):
    """Path and query parameters: camelCase names only; an unknown parameter is an error, so
    a misspelt filter cannot silently widen a search."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False,
                              extra="forbid", frozen=True)


class _Out(BaseModel):
    """Responses: every field is always present (null when unknown), and the schema says so."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True,
                              json_schema_serialization_defaults_required=True)


class NoParams(_In):
    """An operation without path or query parameters."""


class SharePath(_In):
    share_id: ShareId


# --- queries --------------------------------------------------------------------------------------


class SearchQuery(_In):
    q: Annotated[str, Field(min_length=1, max_length=1000, pattern=r"^[^\x00]+$",
                            description="the text to search for")]
    share_id: ShareId | None = Field(None, description="only chunks of this share")
    platform: Text | None = Field(None, description="only content from this platform")
    content_type: ContentType | None = None
    embedding_type: EmbeddingType | None = None
    from_: From = None
    to: To = None
    limit: int = Field(10, ge=1, le=100, description="hits per page")
    cursor: Cursor | None = None


class SimilarQuery(_In):
    platform: Text | None = Field(None, description="only shares from this platform")
    content_type: ContentType | None = None
    embedding_type: EmbeddingType = Field(
        EmbeddingType.CONTENT, description="vectors compared (the share's and the others')")
    from_: From = None
    to: To = None
    limit: int = Field(10, ge=1, le=100, description="shares per page")
    cursor: Cursor | None = None


class ResultsQuery(_In):
    task_type: TaskType | None = Field(None, description="only this task type's result")


class RangeQuery(_In):
    from_: From = Field(None, alias="from",
                        description="inclusive lower bound (RFC 3339); default: `to` - 24 h")
    to: To = Field(None, description="exclusive upper bound (RFC 3339); default: now")


class CostsQuery(_In):
    task_type: TaskType | None = None
    model: Text | None = None
    share_id: ShareId | None = None
    from_: From = None
    to: To = None
    limit: int = Field(100, ge=1, le=500, description="entries per page")
    cursor: Cursor | None = None


class EventsQuery(_In):
    share_id: ShareId | None = Field(None, description="only events of this share")
    task_type: TaskType | None = Field(None, description="only events of this task type")


# --- responses ------------------------------------------------------------------------------------


class SearchHit(_Out):
    share_id: str
    chunk_index: int
    chunk_text: str
    start_s: float | None = Field(description="start of the chunk in the media, seconds")
    end_s: float | None
    similarity: float = Field(description="1 - cosine distance, computed by Postgres")
    embedding_type: str
    model: str
    platform: str | None
    content_type: str | None
    title: str | None
    url: str | None
    indexed_at: dt.datetime = Field(description="when the chunk was (last) embedded")
    metadata: dict[str, Any] = Field(description="everything stored with the chunk")


class HitPage(_Out):
    model: str = Field(description="embedding model the vectors were compared in")
    items: list[SearchHit]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; "
                                                "null on the last page")


class ResultRow(_Out):
    task_type: str
    input_hash: str | None
    result_data: dict[str, Any]
    model_version: str | None
    processing_ms: int | None
    cost_usd: Amount
    created_at: dt.datetime
    updated_at: dt.datetime


class ShareResults(_Out):
    share_id: str
    results: list[ResultRow]


class WorkflowEvent(_Out):
    state: str
    at: dt.datetime
    detail: str


class WorkflowState(_Out):
    share_id: str
    state: State
    final: bool = Field(description="completed or failed_transcription: nothing more happens")
    history: list[WorkflowEvent]
    created_at: dt.datetime
    updated_at: dt.datetime


class SpendRow(_Out):
    task_type: str
    model: str
    unit_kind: str
    calls: int
    units: Amount
    usd: Amount


class TaskTypeSpend(_Out):
    task_type: str
    calls: int
    usd: Amount


class CostSummary(_Out):
    from_: dt.datetime = Field(alias="from")
    to: dt.datetime
    total_usd: Amount
    by_task_type: list[TaskTypeSpend]
    rows: list[SpendRow] = Field(description="by task type, model and unit kind")


class CostEntry(_Out):
    id: int
    task_type: str
    model: str
    units: Amount
    unit_kind: str
    usd: Amount
    share_id: str | None
    correlation_id: str | None
    created_at: dt.datetime


class CostPage(_Out):
    items: list[CostEntry] = Field(description="newest first")
    next_cursor: str | None


class TaskOutcome(_Out):
    task_type: str
    outcome: str = Field(description="the stored result's own `status` (transcription: ok, "
                                     "silent), else ok")
    count: int
    avg_processing_ms: float | None
    p95_processing_ms: float | None
    cost_usd: Amount


class InFlight(_Out):
    task_type: str
    reservations: int
    usd: Amount


class WorkflowCount(_Out):
    state: str
    count: int


class TaskSummary(_Out):
    from_: dt.datetime = Field(alias="from")
    to: dt.datetime
    results: list[TaskOutcome] = Field(description="stored results updated in the range")
    in_flight: list[InFlight] = Field(
        description="budget reservations made in the range and not yet settled: paid calls "
                    "running now, or orphaned by a crashed worker")
    workflows: list[WorkflowCount] = Field(description="video workflows updated in the range, "
                                                       "by current state")


class BudgetStatus(_Out):
    task_type: str
    hourly_limit_usd: Amount | None = Field(description="null: no ceiling")
    daily_limit_usd: Amount | None
    hour_usd: Amount = Field(description="last hour: charges plus open reservations")
    day_usd: Amount
    hour_used_pct: float | None
    day_used_pct: float | None
    exhausted: bool = Field(description="a ceiling is reached: paid tasks of this type are "
                                        "refused until the window moves on")


class Budgets(_Out):
    at: dt.datetime
    action: str = Field(description="what a task over budget does: dead_letter or retry")
    budgets: list[BudgetStatus]


class Health(_Out):
    ok: bool


ErrorCode = Literal["invalid_request", "invalid_cursor", "unauthorized", "forbidden",
                    "not_found", "method_not_allowed", "unavailable", "internal"]


class ProblemDetail(_Out):
    loc: str
    msg: str


class Problem(_Out):
    error: ErrorCode
    message: str
    details: list[ProblemDetail] = Field(default_factory=list)
