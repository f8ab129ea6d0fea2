"""``GET /v1/events``: result events as Server-Sent Events.

SSE rather than a WebSocket: the stream is one-way, a browser's ``EventSource`` reconnects by
itself and sends ``Last-Event-ID`` when it does, and ``curl -N`` is a client. The response is a
small ASGI app of its own so that three things can end it, whichever comes first: the client
leaving, the hub dropping the subscription (slow client, broker gone, server stopping), and a
send that stays blocked longer than ``SEND_TIMEOUT_S`` (a client that stopped reading).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated

import structlog
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from .auth import Access
from .context import ApiError
from .events import EventHub, Subscription
from .models import EventsQuery
from .v1 import route_options

log = structlog.get_logger("mlpipe.api.events")

#: A comment line this often keeps proxies and idle timeouts from closing a quiet stream.
KEEPALIVE_S = 15.0
#: A client that has not taken a frame in this long has stopped reading.
SEND_TIMEOUT_S = 10.0
#: What an ``EventSource`` waits before reconnecting, milliseconds.
RETRY_MS = 2000

router = APIRouter()


class EventStream(Response):
    """The ``text/event-stream`` answer (also what the OpenAPI document shows for 200)."""

    media_type = "text/event-stream"

    def __init__(self, hub: EventHub | None = None, query: EventsQuery | None = None,
                 last_event_id: str | None = None) -> None:
        super().__init__(status_code=200, media_type=self.media_type, headers={
            "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        # an endless body: no Content-Length (Response sets one for its empty body)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._hub = hub
        self._query = query or EventsQuery()
        self._last = last_event_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._hub is not None
        query = self._query
        async with self._hub.subscribe(
                share_id=query.share_id,
                task_type=query.task_type.value if query.task_type else None,
                last_event_id=self._last) as sub:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            pump = asyncio.create_task(self._pump(sub, send))
            gone = asyncio.create_task(_disconnected(receive))
            dropped = asyncio.create_task(sub.dropped.wait())
            done, pending = await asyncio.wait({pump, gone, dropped},
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if gone in done:
                return
            if dropped in done or pump in done:
                log.info("api.events.dropped", why=sub.why, share_id=query.share_id)
            if sub.why.startswith("too slow"):
                return  # its socket is full: an ending frame would wait like the others
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(send({"type": "http.response.body", "body": b"",
                                             "more_body": False}), SEND_TIMEOUT_S)

    async def _pump(self, sub: Subscription, send: Send) -> None:
        async def frame(data: bytes) -> None:
            await asyncio.wait_for(send({"type": "http.response.body", "body": data,
                                         "more_body": True}), SEND_TIMEOUT_S)

        head = f"retry: {RETRY_MS}\n: connected\n\n"
        if sub.gap:
            head += "event: gap\ndata: " + json.dumps(
                {"lastEventId": self._last, "message": "events after this id are no longer "
                 "remembered; re-read the state you need"}) + "\n\n"
        try:
            await frame(head.encode())
            while True:
                try:
                    event = await asyncio.wait_for(sub.buffer.get(), KEEPALIVE_S)
                except TimeoutError:
                    await frame(b": keep-alive\n\n")
                    continue
                await frame(event.frame())
        except TimeoutError:
            sub.drop(f"too slow: a frame waited more than {SEND_TIMEOUT_S}s to be sent")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


@router.get(
    "/v1/events", operation_id="resultEvents", tags=["events"],
    summary="Live result events (Server-Sent Events)",
    description="A `text/event-stream` of result events as they are published on the "
    "`mlpipe.events` exchange: `event: completed` after a result is stored, `event: failed` "
    "after a task is dead-lettered; `data` is the event (AsyncAPI `ResultEvent`), `id` its "
    "message id. Filters `shareId` and `taskType`. A reconnecting client sends "
    "`Last-Event-ID` and first gets the events it missed while the server still remembers "
    "them (the last 1000), else an `event: gap`. A client that falls behind by more than "
    "the server's buffer is disconnected. 503 when the broker is unreachable.",
    response_class=EventStream, status_code=200, response_description="the event stream",
    **route_options(Access.READ, cookie=True))
async def events(request: Request, query: Annotated[EventsQuery, Query()],
                 last_event_id: Annotated[str | None, Header(
                     alias="Last-Event-ID", max_length=200,
                     description="id of the last event received")] = None) -> Response:
    hub: EventHub | None = getattr(request.app.state, "events", None)
    if hub is None:
        raise ApiError(503, "unavailable", "this server has no broker configured for events")
    try:
        await hub.connection()
    except Exception as exc:  # whatever the client library raises for "no broker"
        log.warning("api.events.broker_unavailable", error=repr(exc)[:300])
        raise ApiError(503, "unavailable", "the broker is unreachable; retry later") from exc
    return EventStream(hub, query, last_event_id)
