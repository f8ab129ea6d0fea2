"""The one place that decides what happens to a delivery.

Every delivery ends in exactly one of: **ack**, **delayed retry**, or **dead-letter**. The
decision depends only on what was raised and how often the task was already retried:

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

from mlpipe.errors import Deferred, PermanentError, TransientError
from mlpipe.settings import RetryPolicy

#: Longest error text carried in dead-letter headers.
MAX_ERROR_TEXT = 1000


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Retry:
    delay_s: float
    reason: str
    error: str
    #: False for deferrals: they do not use up the retry budget.
    counts: bool = True


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    error_class: str
    error: str


Outcome = Ack | Retry | DeadLetter


def backoff_delay(policy: RetryPolicy, retry_count: int) -> float:
    """Delay before retry number ``retry_count`` (0-based), jittered downwards."""
    step: float = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(retry_count, 32))
    return step * (1 - policy.jitter * random.random())


def decide(exc: BaseException | None, retry_count: int, policy: RetryPolicy, *,
           deferrals: int = 0, max_deferrals: int = 50) -> Outcome:
    if exc is None:
        return Ack()
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
