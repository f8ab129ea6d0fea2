"""The error types that decide what happens to a delivery.

A handler (or any layer of the delivery path) says *what kind* of failure happened by the type
it raises; ``mlpipe.worker.outcome`` alone turns that into ack, delayed retry or dead-letter.
Library exceptions (aio-pika, asyncpg, redis, httpx) are translated into these at the
boundary where they occur, so handlers never need to know about them.
"""

from __future__ import annotations


class MlpipeError(Exception):
    """Base of every error mlpipe raises on purpose."""

    #: Short machine-readable reason, carried in dead-letter headers and metrics labels.
    reason: str = "error"

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


# --- outcomes of a delivery -----------------------------------------------------------------


class PermanentError(MlpipeError):
    """Retrying cannot help (bad input, unsupported media, content too short).
    The delivery is dead-lettered at once."""

    reason = "permanent_error"


class ContractError(PermanentError):
    """The message does not follow the contract: not JSON, schema violation, unknown version
    or task type. Dead-lettered with the validation error as its reason."""

    reason = "contract_invalid"


class UnknownTaskType(ContractError):
    reason = "unknown_task_type"


class UnsupportedVersion(ContractError):
    reason = "unsupported_version"


class NoHandler(PermanentError):
    """The task type is valid but this daemon has no handler for it (a routing mistake)."""

    reason = "no_handler"


class BudgetExceeded(PermanentError):
    """The pre-flight cost estimate would cross a budget ceiling."""

    reason = "budget_exceeded"


class TransientError(MlpipeError):
    """The same input may succeed later (timeout, 5xx, connection reset, a dependency briefly
    down). Retried with backoff through the delay queues until the policy gives up."""

    reason = "transient_error"

    def __init__(
        self, message: str = "", *, reason: str | None = None, delay_s: float | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        #: Overrides the policy's backoff for this retry (e.g. a rate limit's Retry-After).
        self.delay_s = delay_s


class HandlerTimeout(TransientError):
    reason = "timeout"


class Deferred(TransientError):
    """Not a failure: the task cannot run *yet* (another worker holds its lock for a different
    input, or the budget window is full and the policy says wait). Comes back after
    ``delay_s`` without using up the retry budget; ``max_deferrals`` bounds the waiting."""

    reason = "deferred"


# --- publishing ------------------------------------------------------------------------------


class PublishError(MlpipeError):
    """A publish did not reach the broker; the caller must decide what to do with it."""

    reason = "publish_failed"


class BufferFull(PublishError):
    """The broker is unreachable and the retry buffer already holds its maximum."""

    reason = "buffer_full"


class CircuitOpen(PublishError):
    """The broker has been unreachable for long enough that publishes fail fast."""

    reason = "circuit_open"


class PublishTimeout(PublishError):
    """No confirm arrived within the producer's publish timeout (outage included)."""

    reason = "publish_timeout"


class Unroutable(PublishError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""

    reason = "unroutable"


class PublishNacked(PublishError):
    """The broker refused the message (a queue at its limit with ``reject-publish``)."""

    reason = "nacked"


class TopologyMismatch(MlpipeError):
    """A queue or exchange exists with other arguments than mlpipe would declare."""

    reason = "topology_mismatch"


class ApiConfigError(MlpipeError):
    """The read API (``mlpipe serve``) cannot start as configured: a public address without
    tokens, a weak token, an unmigrated schema."""

    reason = "api_config"


class AlreadySettled(MlpipeError):
    """A delivery was acked or nacked twice: a bug (the broker would close the channel)."""

    reason = "already_settled"
