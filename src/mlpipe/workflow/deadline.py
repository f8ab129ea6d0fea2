"""Consuming ``mlpipe.workflow``: deadlines of video workflows coming back from their delay
queue. Plugs into the daemon's ``QueueConsumer`` like any task processor, so it gets the same
flow control, draining, retries and dead-lettering."""

from __future__ import annotations

import json

import asyncpg
import structlog

from mlpipe.errors import ContractError
from mlpipe.settings import Settings
from mlpipe.store.pool import unavailable_is_transient
from mlpipe.worker.delivery import InboundMessage
from mlpipe.worker.outcome import Ack, decide
from mlpipe.worker.process import Processed
from mlpipe.worker.settle import retry_count_of
from mlpipe.workflow import video

log = structlog.get_logger(__name__)


class DeadlineProcessor:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool

    async def process(self, message: InboundMessage, queue: str) -> Processed:
        try:
            doc = json.loads(message.body)
            if not isinstance(doc, dict) or doc.get("kind") != video.DEADLINE \
                    or not isinstance(doc.get("shareId"), str):
                raise ContractError(f"not a workflow control message: {message.body[:200]!r}")
            async with unavailable_is_transient("workflow deadline"):
                fell_back = await video.on_deadline(self._pool, doc["shareId"],
                                                    self._settings.workflow_timeout_s)
            log.info("workflow.deadline", share_id=doc["shareId"], fell_back=fell_back)
        except (ValueError, RecursionError) as exc:
            return Processed(decide(ContractError(f"not JSON: {exc}"), 0,
                                    self._settings.retry), "workflow")
        except Exception as exc:
            return Processed(decide(exc, retry_count_of(message), self._settings.retry),
                             "workflow")
        return Processed(Ack(), "workflow")
