"""What every endpoint handler gets, and the one error type handlers raise."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import asyncpg

from mlpipe.search import Embedder
from mlpipe.settings import Budget

from .models import ErrorCode, ProblemDetail


@dataclass(frozen=True)
class ApiContext:
    pool: asyncpg.Pool
    #: Turns a query text into a vector of ``search_model``.
    embedder: Embedder
    #: Name of the stored vectors' model (``ml_embeddings.model``) that searches compare in.
    search_model: str
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    budget_action: str = "dead_letter"


class ApiError(Exception):
    """An answer other than 200, with the status and problem body the client gets."""

    def __init__(self, status: int, error: ErrorCode, message: str, *,
                 details: list[ProblemDetail] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error: ErrorCode = error
        self.message = message
        self.details = details or []
        self.headers = dict(headers or {})
