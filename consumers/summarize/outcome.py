"""The result every summarisation backend returns, in the shape stored in ``ml_results``."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from mlpipe.handlers import Cost, HandlerResult


@dataclass(frozen=True)
class Summary:
    summary: str
    model: str
    backend: str
    input_tokens: int
    output_tokens: int
    #: The input was cut to fit the model's context (the summary covers its beginning only).
    truncated: bool
    model_version: str
    cost: Cost | None = None

    def result(self) -> HandlerResult:
        usd = self.cost.usd if self.cost is not None else Decimal(0)
        return HandlerResult(
            {"summary": self.summary, "model": self.model, "backend": self.backend,
             "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
             "truncated": self.truncated,
             # A JSON number for readers of the result; the ledger (ml_costs) keeps the exact
             # decimal.
             "cost_usd": float(usd)},
            model_version=self.model_version,
            costs=(self.cost,) if self.cost is not None else (),
        )
