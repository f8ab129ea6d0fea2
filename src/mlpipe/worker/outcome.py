"""The one place that decides what happens to a delivery.

Every delivery that ran ends in exactly one of: **ack**, **delayed retry**, or
**dead-letter** (a delivery acked without running is a ``Skip``, one handed back unsettled a
``Requeue``). The decision depends only on what was raised and how often the task was already
retried:

=========================================  ===========================================
raised                                      outcome
=========================================  ===========================================
nothing                                     ack
``PermanentError`` (incl. contract errors,  dead-letter at once, reason from the error
budget exceeded, no handler)
``TransientError`` or any other exception   retry after backoff, until ``max_retries``
                                            retries were made; then dead-letter with
                                            reason ``retries_exhausted``
``Deferred`` (lock held for other input,    wait ``delay_s`` and try again without using
budget full with ``budget_action=retry``)   the retry budget; after ``max_deferrals``
                                            dead-letter with the deferral's reason
=========================================  ===========================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

from mlpipe.errors import Deferred, PermanentError, TransientError
from mlpipe.settings import RetryPolicy

#: Longest error text carried in dead-letter headers.
MAX_ERROR_TEXT = 1000


@dataclass(frozen=True)
class Ack:
    """The handler ran and its effects are durable."""

    label: ClassVar[str] = "ack"


@dataclass(frozen=True)
class Skip:
    """Acked without running the handler: the work is covered already. ``reason`` is
    ``duplicate_in_flight`` (the same input is running under another message, whose own
    delivery stays unacked until it is done), ``already_done`` (stored from this input),
    ``superseded`` (a workflow has moved past it) or ``fenced`` (a newer lease stored it).
    Counted as an ack in ``mlpipe_tasks_total`` (the broker saw one), and by reason in
    ``mlpipe_skipped_total``."""

    reason: str
    label: ClassVar[str] = "ack"


@dataclass(frozen=True)
class Retry:
    delay_s: float
    reason: str
    error: str
    #: False for deferrals: they do not use up the retry budget.
    counts: bool = True
    label: ClassVar[str] = "retry"


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    error_class: str
    error: str
    label: ClassVar[str] = "dead_letter"


@dataclass(frozen=True)
class Requeue:
    """Handed back to the broker unsettled: the daemon is stopping, or a settle could not
    publish. Redelivered as is; not a retry."""

    label: ClassVar[str] = "requeue"


#: Every path of a delivery ends in exactly one of these; ``settle`` turns it into broker calls
#: and the metrics count it under its ``label``.
Outcome = Ack | Skip | Retry | DeadLetter | Requeue
#: ``Ack`` has no fields: one instance serves every delivery.
ACK = Ack()


class Processed(NamedTuple):
    """A delivery after processing: its outcome, the task type (``invalid`` for a message that
    is no task), the handler's result when it ran, and the decoded task when there is one
    (the dead-letter branch tells the workflows about it)."""

    outcome: Outcome
    task_type: str
    result: Any = None
    task: Any = None


class DeliveryProcessor(Protocol):
    """Turns one delivery into a ``Processed``; the task processor and control-queue
    processors (workflow deadlines) plug into ``QueueConsumer`` through this."""

    async def process(self, message: Any, queue: str) -> Processed: ...


def backoff_delay(policy: RetryPolicy, retry_count: int) -> float:
    """Delay before retry number ``retry_count`` (0-based), jittered downwards."""
    step: float = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(retry_count, 32))
    return step * (1 - policy.jitter * random.random())


def decide(exc: BaseException | None, retry_count: int, policy: RetryPolicy, *,
           deferrals: int = 0, max_deferrals: int = 50) -> Outcome:
    if exc is None:
        return ACK
    text = f"{exc}"[:MAX_ERROR_TEXT] or type(exc).__name__
    if isinstance(exc, PermanentError):
        return DeadLetter(exc.reason, type(exc).__name__, text)
    if isinstance(exc, Deferred):
        if deferrals >= max_deferrals:
            return DeadLetter(exc.reason, type(exc).__name__,
                              f"still deferred after {deferrals} waits: {text}"[:MAX_ERROR_TEXT])
        delay = exc.delay_s if exc.delay_s is not None else backoff_delay(policy, 0)
        return Retry(delay, exc.reason, text, counts=False)
    if retry_count >= policy.max_retries:
        return DeadLetter("retries_exhausted", type(exc).__name__,
                          f"gave up after {retry_count + 1} attempts: {text}"[:MAX_ERROR_TEXT])
    if isinstance(exc, TransientError):
        delay = exc.delay_s if exc.delay_s is not None else backoff_delay(policy, retry_count)
        return Retry(delay, exc.reason, text)
    return Retry(backoff_delay(policy, retry_count), "unexpected_error",
                 f"{type(exc).__name__}: {text}"[:MAX_ERROR_TEXT])
