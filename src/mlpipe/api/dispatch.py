"""aiohttp glue: route every ``Operation``, check its token, validate its parameters with its
models, run its handler and render the result; turn every failure into a JSON problem.

Order per request: authorisation first (an unauthenticated caller learns nothing, not even
which parameters are wrong), then parameters (400), then the handler. Failures of the
database or of the query embedding are 503 (retry later); anything unexpected is logged with
its traceback and answered 500 without details.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from aiohttp import web
from multidict import MultiMapping
from pydantic import BaseModel, ValidationError

from mlpipe.errors import TransientError
from mlpipe.store.pool import UNAVAILABLE

from .auth import Access, Role, TokenSet
from .context import ApiContext, ApiError
from .models import Problem, ProblemDetail
from .routes import OPERATIONS, Operation

log = structlog.get_logger("mlpipe.api")

_CHALLENGE = 'Bearer realm="mlpipe"'
_JSON = "application/json"
_ROUTER_ERRORS: dict[int, Any] = {404: "not_found", 405: "method_not_allowed"}
#: Failures that mean "try again later", not "this request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (TransientError, *UNAVAILABLE)


def build_app(ctx: ApiContext, tokens: TokenSet, openapi_json: str,
              operations: tuple[Operation, ...] = OPERATIONS) -> web.Application:
    app = web.Application(middlewares=[_problems])
    for op in operations:
        app.router.add_route(op.method, op.path, _endpoint(op, ctx, tokens))

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(text=openapi_json, content_type=_JSON)

    app.router.add_get("/openapi.json", openapi, allow_head=False)
    return app


def _endpoint(op: Operation, ctx: ApiContext,
              tokens: TokenSet) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        authorize(request.headers.get("Authorization"), op.access, tokens)
        path = _parse(op.path_params, dict(request.match_info), "path")
        query = _parse(op.query, _single(request.query), "query")
        result = await op.handler(ctx, path, query)
        return _render(200, result)

    return handle


def authorize(header: str | None, access: Access, tokens: TokenSet) -> None:
    """Raise 401/403 unless ``header`` grants ``access``.

    Without any configured token (only allowed on loopback) the read endpoints answer
    everyone and the admin ones no one (403): no token can prove a caller is an admin, and
    "it runs on loopback" says nothing about who else shares the machine."""
    if access is Access.PUBLIC:
        return
    if not tokens.enabled:
        if access is Access.ADMIN:
            raise ApiError(403, "forbidden", "this endpoint needs an admin token and none is "
                                             "configured (MLPIPE_API_ADMIN_TOKENS)")
        return
    if not header:
        raise ApiError(401, "unauthorized", "a bearer token is required",
                       headers={"WWW-Authenticate": _CHALLENGE})
    scheme, _, token = header.partition(" ")
    role = tokens.role(token.strip()) if scheme.lower() == "bearer" else None
    if role is None:
        raise ApiError(401, "unauthorized", "invalid bearer token",
                       headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})
    if access is Access.ADMIN and role is not Role.ADMIN:
        raise ApiError(403, "forbidden", "this endpoint needs an admin token")


def _single(query: MultiMapping[str]) -> dict[str, str]:
    """A parameter given twice is ambiguous; refuse it rather than pick one."""
    out: dict[str, str] = {}
    for name in query:
        values = query.getall(name)
        if len(values) > 1:
            raise ApiError(400, "invalid_request", f"query parameter {name!r} given "
                                                   f"{len(values)} times")
        out[name] = values[0]
    return out


def _parse(model: type[BaseModel], data: Mapping[str, str], where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = [ProblemDetail(loc=".".join([where, *map(str, e["loc"])]), msg=e["msg"])
                   for e in exc.errors(include_url=False, include_input=False)]
        raise ApiError(400, "invalid_request", f"invalid {where} parameters",
                       details=details) from None


def _render(status: int, model: BaseModel, headers: Mapping[str, str] | None = None
            ) -> web.Response:
    return web.Response(status=status, text=model.model_dump_json(by_alias=True),
                        content_type=_JSON, headers=headers)


def _problem(exc: ApiError) -> web.Response:
    body = Problem(error=exc.error, message=exc.message, details=exc.details)
    return _render(exc.status, body, exc.headers)


@web.middleware
async def _problems(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return _problem(exc)
    except web.HTTPException as exc:  # the router's 404 and 405
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _problem(ApiError(exc.status, _ROUTER_ERRORS.get(exc.status, "invalid_request"),
                                 exc.reason, headers=allow))
    except _UNAVAILABLE as exc:
        log.warning("api.unavailable", path=request.path, error_class=type(exc).__name__,
                    error=str(exc)[:300])
        return _problem(ApiError(503, "unavailable", "a backing service is unavailable; "
                                                     "retry later"))
    except Exception:
        log.exception("api.error", method=request.method, path=request.path)
        return _problem(ApiError(500, "internal", "internal error"))
