"""The endpoint handlers: ``(ctx, path params, query params) -> response model``.

They know nothing of HTTP beyond raising ``ApiError``; parsing, authorisation and rendering
are ``mlpipe.api.dispatch``'s job, so each handler reads as the query it answers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from mlpipe.errors import PermanentError
from mlpipe.search import Hit, ShareNotEmbedded, VectorLike, search, similar_to_share
from mlpipe.store import costs
from mlpipe.workflow import video

from . import cursor, queries
from .context import ApiContext, ApiError
from .models import (
    Budgets,
    BudgetStatus,
    CostEntry,
    CostPage,
    CostsQuery,
    CostSummary,
    Health,
    HitPage,
    InFlight,
    NoParams,
    RangeQuery,
    ResultRow,
    ResultsQuery,
    SearchHit,
    SearchQuery,
    SharePath,
    ShareResults,
    SimilarQuery,
    SpendRow,
    TaskOutcome,
    TaskSummary,
    TaskTypeSpend,
    WorkflowCount,
    WorkflowEvent,
    WorkflowState,
)
from .paging import HitSlice, hit_slice

#: Default span of the summary endpoints.
DEFAULT_RANGE = dt.timedelta(hours=24)


# --- search -------------------------------------------------------------------------------------


async def search_text(ctx: ApiContext, _path: NoParams, query: SearchQuery) -> HitPage:
    fp = cursor.fingerprint("search", query)
    offset = _position(query.cursor, fp) or 0
    vector = await _embed(ctx, query.q)

    async def fetch(k: int) -> list[Hit]:
        return await search(
            ctx.pool, vector, limit=k, share_id=query.share_id, platform=query.platform,
            content_type=_value(query.content_type), embedding_type=_value(query.embedding_type),
            model=ctx.search_model, since=query.from_, until=query.to)

    page = await hit_slice(fetch, offset=offset, size=query.limit)
    return _hit_page(ctx, page, fp, offset)


async def similar_shares(ctx: ApiContext, path: SharePath, query: SimilarQuery) -> HitPage:
    fp = cursor.fingerprint("similar", path, query)
    offset = _position(query.cursor, fp) or 0

    async def fetch(k: int) -> list[Hit]:
        try:
            return await similar_to_share(
                ctx.pool, path.share_id, limit=k, model=ctx.search_model,
                embedding_type=query.embedding_type.value, platform=query.platform,
                content_type=_value(query.content_type), since=query.from_, until=query.to)
        except ShareNotEmbedded as exc:
            raise ApiError(404, "not_found", str(exc.args[0])) from exc

    page = await hit_slice(fetch, offset=offset, size=query.limit)
    return _hit_page(ctx, page, fp, offset)


async def _embed(ctx: ApiContext, text: str) -> VectorLike:
    """A broken model is the server's problem, not the request's: 503, not 400. (A transient
    failure becomes 503 in the dispatcher.)"""
    try:
        vectors: Sequence[VectorLike] = await ctx.embedder([text])
    except PermanentError as exc:
        raise ApiError(503, "unavailable", f"the query could not be embedded: {exc}") from exc
    return vectors[0]


def _hit_page(ctx: ApiContext, page: HitSlice, fp: str, offset: int) -> HitPage:
    items = [_hit(hit) for hit in page.items]
    following = cursor.encode(fp, offset + len(items)) if page.more else None
    return HitPage(model=ctx.search_model, items=items, next_cursor=following)


def _hit(hit: Hit) -> SearchHit:
    meta = hit.metadata
    return SearchHit(
        share_id=hit.share_id, chunk_index=hit.chunk_index, chunk_text=hit.chunk_text,
        start_s=hit.start_s, end_s=hit.end_s, similarity=hit.similarity,
        embedding_type=hit.embedding_type, model=hit.model, platform=_text(meta, "platform"),
        content_type=_text(meta, "content_type"), title=_text(meta, "title"),
        url=_text(meta, "url"), indexed_at=hit.indexed_at, metadata=meta)


def share_path(share_id: str) -> SharePath:
    """A share id from a URL, validated as the path parameter is (``ValidationError``)."""
    return SharePath.model_validate({"shareId": share_id})


# --- a share's results and workflow ---------------------------------------------------------------


async def share_results(ctx: ApiContext, path: SharePath, query: ResultsQuery) -> ShareResults:
    rows = await queries.share_results(ctx.pool, path.share_id, _value(query.task_type))
    return ShareResults(share_id=path.share_id, results=[ResultRow(**dict(r)) for r in rows])


async def share_workflow(ctx: ApiContext, path: SharePath, _query: NoParams) -> WorkflowState:
    status = await video.status(ctx.pool, path.share_id)
    if status is None:
        raise ApiError(404, "not_found", f"share {path.share_id!r} has no video workflow")
    state = video.State(status.state)
    return WorkflowState(
        share_id=status.share_id, state=state, final=state in video.FINAL,
        history=[WorkflowEvent(state=str(h.get("state", "")), at=_epoch(h.get("at", 0)),
                               detail=str(h.get("detail", ""))) for h in status.history],
        created_at=_epoch(status.created_at), updated_at=_epoch(status.updated_at))


# --- analytics (admin) --------------------------------------------------------------------------


async def cost_summary(ctx: ApiContext, _path: NoParams, query: RangeQuery) -> CostSummary:
    start, end = _range(query)
    rows = [SpendRow(**dict(r)) for r in await queries.spend_rows(ctx.pool, start, end)]
    by_type: dict[str, tuple[int, Decimal]] = {}
    for row in rows:
        calls, usd = by_type.get(row.task_type, (0, Decimal(0)))
        by_type[row.task_type] = (calls + row.calls, usd + row.usd)
    return CostSummary(
        from_=start, to=end, total_usd=sum((r.usd for r in rows), start=Decimal(0)),
        by_task_type=[TaskTypeSpend(task_type=t, calls=c, usd=u)
                      for t, (c, u) in sorted(by_type.items())],
        rows=rows)


async def list_costs(ctx: ApiContext, _path: NoParams, query: CostsQuery) -> CostPage:
    fp = cursor.fingerprint("costs", query)
    rows = await queries.cost_entries(
        ctx.pool, task_type=_value(query.task_type), model=query.model,
        share_id=query.share_id, start=query.from_, end=query.to,
        before_id=_position(query.cursor, fp), limit=query.limit + 1)
    items = [CostEntry(**dict(r)) for r in rows[:query.limit]]
    more = len(rows) > query.limit
    return CostPage(items=items, next_cursor=cursor.encode(fp, items[-1].id) if more else None)


async def task_summary(ctx: ApiContext, _path: NoParams, query: RangeQuery) -> TaskSummary:
    start, end = _range(query)
    outcomes = await queries.task_outcomes(ctx.pool, start, end)
    reserved = await queries.in_flight(ctx.pool, start, end)
    workflows = await queries.workflow_counts(ctx.pool, start, end)
    return TaskSummary(
        from_=start, to=end,
        results=[TaskOutcome(task_type=r["task_type"], outcome=r["outcome"], count=r["count"],
                             avg_processing_ms=r["avg_ms"], p95_processing_ms=r["p95_ms"],
                             cost_usd=r["usd"]) for r in outcomes],
        in_flight=[InFlight(**dict(r)) for r in reserved],
        workflows=[WorkflowCount(**dict(r)) for r in workflows])


async def budget_status(ctx: ApiContext, _path: NoParams, _query: NoParams) -> Budgets:
    out = []
    for task_type, budget in sorted(ctx.budgets.items()):
        spent = await costs.spend(ctx.pool, task_type)
        hourly, daily = _limit(budget.hourly_usd), _limit(budget.daily_usd)
        out.append(BudgetStatus(
            task_type=task_type, hourly_limit_usd=hourly, daily_limit_usd=daily,
            hour_usd=spent.hour_usd, day_usd=spent.day_usd,
            hour_used_pct=_pct(spent.hour_usd, hourly), day_used_pct=_pct(spent.day_usd, daily),
            exhausted=(hourly is not None and spent.hour_usd >= hourly)
            or (daily is not None and spent.day_usd >= daily)))
    return Budgets(at=dt.datetime.now(dt.UTC), action=ctx.budget_action, budgets=out)


async def health(ctx: ApiContext, _path: NoParams, _query: NoParams) -> Health:
    await queries.ping(ctx.pool)
    return Health(ok=True)


# --- helpers --------------------------------------------------------------------------------------


def _position(token: str | None, fp: str) -> int | None:
    if token is None:
        return None
    try:
        return cursor.decode(token, fp)
    except cursor.CursorError as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from exc


def _range(query: RangeQuery) -> tuple[dt.datetime, dt.datetime]:
    end = query.to or dt.datetime.now(dt.UTC)
    if query.from_ is not None:
        return query.from_, end
    try:
        return end - DEFAULT_RANGE, end
    except OverflowError:  # `to` in the first day of year 1
        return dt.datetime.min.replace(tzinfo=dt.UTC), end


def _value(enum: Any) -> str | None:
    return None if enum is None else str(enum.value)


def _text(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get(name)
    return value if isinstance(value, str) else None


def _epoch(seconds: Any) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(seconds), dt.UTC)


def _limit(usd: float) -> Decimal | None:
    """Settings hold ceilings as floats; 0 means none."""
    return Decimal(str(usd)) if usd > 0 else None


def _pct(spent: Decimal, limit: Decimal | None) -> float | None:
    return round(float(spent / limit * 100), 1) if limit is not None else None
