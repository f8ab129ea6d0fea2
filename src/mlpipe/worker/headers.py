"""The headers mlpipe puts on the messages it re-publishes, and how a delivery's are read.

One module, because three places speak this vocabulary: ``process`` reads a delivery's retry
and deferral counts, ``settle`` writes them on retries and dead letters, and ``dlq`` reads them
back and strips them for a replay.
"""

from __future__ import annotations

from mlpipe.broker.topology import DELAY_TIER_HEADER
from mlpipe.worker.delivery import InboundMessage

H_REASON = "x-mlpipe-reason"
H_ERROR_CLASS = "x-mlpipe-error-class"
H_ERROR = "x-mlpipe-error"
H_ATTEMPTS = "x-mlpipe-attempts"
H_ORIGIN_QUEUE = "x-mlpipe-origin-queue"
H_ROUTING_KEY = "x-mlpipe-routing-key"
H_RETRY_COUNT = "x-mlpipe-retry-count"
H_DEAD_AT = "x-mlpipe-dead-lettered-at"
H_DEFERRALS = "x-mlpipe-deferrals"
#: Every header mlpipe adds; ``dlq replay`` strips them again.
MLPIPE_HEADERS = (H_REASON, H_ERROR_CLASS, H_ERROR, H_ATTEMPTS, H_ORIGIN_QUEUE, H_ROUTING_KEY,
                  H_RETRY_COUNT, H_DEAD_AT, H_DEFERRALS, DELAY_TIER_HEADER)


def _int_header(message: InboundMessage, name: str) -> int:
    raw = (message.headers or {}).get(name, 0)
    return max(0, raw) if isinstance(raw, int) else 0


def retry_count_of(message: InboundMessage) -> int:
    """How often this delivery was already retried: the header we set, else 0."""
    return _int_header(message, H_RETRY_COUNT)


def deferrals_of(message: InboundMessage) -> int:
    return _int_header(message, H_DEFERRALS)


def original_routing_key(message: InboundMessage) -> str:
    return str((message.headers or {}).get(H_ROUTING_KEY) or message.routing_key or "")
