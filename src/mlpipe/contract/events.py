"""Result events: what the outside world hears when a task finished or failed.

Published to the ``mlpipe.events`` topic exchange with routing key ``ml.result.<taskType>``;
bind ``ml.result.#`` for everything or ``ml.result.transcribe_whisper`` for one kind. A
``completed`` event follows the commit of the result; a ``failed`` one follows a dead-letter.
Same evolution rules as tasks: unknown fields ignored within major version 1.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from mlpipe.contract.models import _TRACEPARENT, TaskType, _Model

EVENT_VERSION = "1.0"
#: Longest string kept in an event's ``summary`` (the full result stays in ``ml_results``).
SUMMARY_TEXT_LIMIT = 500


class ResultRef(_Model):
    table: str = "ml_results"
    share_id: str
    task_type: TaskType


class ResultEvent(_Model):
    version: Annotated[str, Field(pattern=r"^1\.\d+$")] = EVENT_VERSION
    share_id: str
    task_type: TaskType
    status: Literal["completed", "failed"]
    #: Where the full result lives (completed events).
    result_ref: ResultRef | None = None
    #: Scalar fields of the result, long strings shortened (completed events).
    summary: dict[str, Any] | None = None
    cost_usd: float = 0.0
    #: Why it failed (failed events): the dead-letter reason and error text.
    reason: str | None = None
    error: str | None = None
    correlation_id: str | None = None
    traceparent: Annotated[str, Field(pattern=_TRACEPARENT)] | None = None
    #: The task message this event is about.
    message_id: str | None = None
    occurred_at: float


def routing_key(task_type: TaskType | str) -> str:
    return f"ml.result.{TaskType(task_type).value}"


def summarize_result(data: dict[str, Any]) -> dict[str, Any]:
    """The cheap part of a result for an event: scalars, strings cut to a limit, list sizes."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, str):
            out[key] = value[:SUMMARY_TEXT_LIMIT]
        elif isinstance(value, bool | int | float) or value is None:
            out[key] = value
        elif isinstance(value, list):
            out[f"{key}Count"] = len(value)
    return out
