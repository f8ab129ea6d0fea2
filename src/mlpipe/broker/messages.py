"""AMQP messages for events and outbox entries: JSON, persistent, traceparent in the headers."""

from __future__ import annotations

import json
from typing import Any

import aio_pika

from mlpipe.broker.topology import DELAY_TIER_HEADER


def event_message(body: dict[str, Any], message_id: str,
                  headers: dict[str, Any] | None = None) -> aio_pika.Message:
    """A JSON message from the outbox. One carrying a delay-tier header is a timer: it expires
    in its tier's delay queue and comes back to its target queue then."""
    hdrs = dict(headers or {})
    tier = hdrs.get(DELAY_TIER_HEADER)
    if body.get("traceparent"):
        hdrs.setdefault("traceparent", body["traceparent"])
    return aio_pika.Message(
        json.dumps(body, separators=(",", ":")).encode(), content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id,
        correlation_id=body.get("correlationId") or body.get("metadata", {}).get("correlationId"),
        headers=hdrs, type="ml.result" if "status" in body else None,
        expiration=int(tier) / 1000 if tier else None)
