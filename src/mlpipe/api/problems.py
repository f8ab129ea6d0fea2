"""Every failure as a JSON problem (``{"error", "message", "details"}``), whatever raised it:
an endpoint (``ApiError``), FastAPI's parameter validation (400, never FastAPI's 422), the
router (404, 405 with ``Allow``), a backing service that is down (503, retry later), or a bug
(500, logged with its traceback, answered without details).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlpipe.errors import TransientError
from mlpipe.store.pool import UNAVAILABLE

from .context import ApiError
from .models import ErrorCode, Problem, ProblemDetail

log = structlog.get_logger("mlpipe.api")

JSON = "application/json"
#: Failures that mean "try again later", not "this request is wrong".
def _handleable(classes: tuple[type[BaseException], ...]) -> tuple[type[Exception], ...]:
    return tuple(c for c in classes if issubclass(c, Exception))  # all of them, in fact


UNAVAILABLE_ERRORS = _handleable((TransientError, *UNAVAILABLE))
_ROUTER_ERRORS: dict[int, ErrorCode] = {404: "not_found", 405: "method_not_allowed"}


def json_response(model: BaseModel, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    """The wire form of every JSON answer: camelCase aliases, decimals as strings."""
    return Response(model.model_dump_json(by_alias=True), status_code=status,
                    media_type=JSON, headers=dict(headers or {}))


def problem(exc: ApiError) -> Response:
    body = Problem(error=exc.error, message=exc.message, details=exc.details)
    return json_response(body, exc.status, exc.headers)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` and wrap it in the last-resort 500 guard."""

    async def api_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return problem(exc)

    async def invalid(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors: list[dict[str, Any]] = list(exc.errors())
        where = str(errors[0]["loc"][0]) if errors and errors[0].get("loc") else "request"
        details = [ProblemDetail(loc=".".join(map(str, e.get("loc", ()))), msg=str(e["msg"]))
                   for e in errors]
        return problem(ApiError(400, "invalid_request", f"invalid {where} parameters",
                                details=details))

    async def routing(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        allow = {"Allow": exc.headers["Allow"]} if exc.headers and "Allow" in exc.headers \
            else None
        return problem(ApiError(exc.status_code,
                                _ROUTER_ERRORS.get(exc.status_code, "invalid_request"),
                                str(exc.detail), headers=allow))

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("api.unavailable", path=request.url.path, error_class=type(exc).__name__,
                    error=str(exc)[:300])
        return problem(ApiError(503, "unavailable", "a backing service is unavailable; "
                                                    "retry later"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, routing)
    for error_class in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error_class, unavailable)
    app.add_middleware(LastResort)


class LastResort:
    """Turns an exception nothing else handled into a 500 problem, once, with the traceback in
    the log (Starlette's own guard would answer plain text and re-raise into the server)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("api.error", method=scope.get("method"), path=scope.get("path"))
            if started:  # too late for a status: the client sees a cut response
                return
            response = problem(ApiError(500, "internal", "internal error"))
            await response(scope, receive, send)
