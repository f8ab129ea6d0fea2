"""The messages every workload sends: contract-v1 embed tasks of about 300 bytes.

Bodies are made from one validated template by swapping a fixed-width share id in place, so
making 20,000 of them costs nothing measurable and every message is a distinct share (which
matters for the full path: one lock and one result row per message). The JSON is what a
Node or Go producer would send (no default-valued options), not mlpipe's own encoding, so the
consumer validates a realistic message.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import aio_pika
from aio_pika.abc import HeadersType

from mlpipe.contract.codec import decode

#: Body size the issue asks for.
TARGET_BYTES = 300
#: Task type and queue the bench uses (``ml.embed``: cheap work, deep prefetch).
TASK_TYPE = "embed_vectors"
SHARE_PREFIX = "bench-"
_ID_WIDTH = 8
_PLACEHOLDER = SHARE_PREFIX + "X" * _ID_WIDTH


def share_id(i: int) -> str:
    return f"{SHARE_PREFIX}{i:0{_ID_WIDTH}d}"


def _doc(text: str) -> dict[str, object]:
    return {
        "version": "1.0",
        "taskType": TASK_TYPE,
        "shareId": _PLACEHOLDER,
        "payload": {"content": {"text": text, "platform": "tiktok", "type": "caption"}},
        "metadata": {"correlationId": str(uuid.uuid4()), "timestamp": int(time.time()),
                     "retryCount": 0},
    }


def _template() -> bytes:
    base = len(json.dumps(_doc(""), separators=(",", ":")).encode())
    text = ("Sourdough starter in seven days, no yeast needed #sourdough #baking " * 8)
    body = json.dumps(_doc(text[: max(1, TARGET_BYTES - base)]), separators=(",", ":")).encode()
    decode(body.replace(_PLACEHOLDER.encode(), share_id(0).encode()))  # must be contract-valid
    return body


_TEMPLATE = _template()


def body(i: int) -> bytes:
    """The body of message ``i`` (a contract-v1 embed task for share ``bench-<i>``)."""
    return _TEMPLATE.replace(_PLACEHOLDER.encode(), share_id(i).encode())


def amqp_message(i: int, *, message_id: str | None = None,
                 headers: HeadersType | None = None) -> aio_pika.Message:
    """Message ``i`` with the properties the contract requires (as ``Producer`` sets them)."""
    return aio_pika.Message(
        body=body(i),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id or uuid.uuid4().hex,
        correlation_id=uuid.uuid4().hex,
        timestamp=int(time.time()),
        headers=dict(headers or {}),
    )


def bodies(n: int, start: int = 0) -> Iterator[bytes]:
    return (body(i) for i in range(start, start + n))


BODY_BYTES = len(body(0))
