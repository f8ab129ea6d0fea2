"""The Dead letters page: what died, why, and sending it back (admin token).

Listing and replay are ``mlpipe.dlq``'s (what ``mlpipe dlq list/replay`` run): messages are
looked at with ``basic.get`` and held unacked, so listing removes nothing, and a replayed
message leaves the dead-letter queue only once its copy is confirmed on its origin queue.

Replay is two posts: the first counts what the selection matches right now (a dry run) and
asks to confirm that number; the second replays. Both carry the CSRF token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from mlpipe.dlq import DeadLetterEntry, list_dead, make_filter, replay

from .common import HEADERS, gate, render, settings_of
from .session import Visitor

router = APIRouter(prefix="/ui", include_in_schema=False)
#: Dead letters a page lists (and a replay considers).
LIMIT = 500


@router.get("/dead-letters")
async def dead_letters(request: Request, reason: str = "", taskType: str = "",
                       replayed: int | None = None) -> Response:
    who = gate(request, admin=True)
    if isinstance(who, Response):
        return who
    settings = settings_of(request)
    if settings is None:
        return render(request, "dead_letters.html", who, page="dead", entries=[],
                      reasons=[], task_types=[], reason=reason, task_type=taskType,
                      replayed=None, note="no broker configured for this server", now=0)
    entries = await list_dead(settings, limit=LIMIT)
    reasons = sorted({e.reason for e in entries})
    task_types = sorted({e.task_type for e in entries if e.task_type})
    shown = [e for e in entries if (not reason or e.reason == reason)
             and (not taskType or e.task_type == taskType)]
    return render(request, "dead_letters.html", who, page="dead", entries=shown,
                  reasons=reasons, task_types=task_types, reason=reason, task_type=taskType,
                  replayed=replayed, note="", now=time.time())


@router.post("/dead-letters/replay")
async def replay_post(request: Request) -> Response:
    who = gate(request, admin=True)
    if isinstance(who, Response):
        return who
    form = await request.form()
    if not who.csrf_ok(_field(form.get("csrf"))):
        return render(request, "forbidden.html", who, status=403,
                      why="this form is stale or came from another site; reload the page")
    settings = settings_of(request)
    if settings is None:
        return render(request, "forbidden.html", who, status=503,
                      why="no broker configured for this server")
    ids = [v for v in (_field(x) for x in form.getlist("id")) if v]
    reason = _field(form.get("reason")) or ""
    match = _selection(ids, reason)
    if match is None:
        return RedirectResponse("/ui/dead-letters", status_code=303, headers=HEADERS)
    if _field(form.get("confirm")) != "yes":
        preview = await replay(settings, match, limit=LIMIT, dry_run=True)
        return _confirm(request, who, ids, reason, preview)
    done = await replay(settings, match, limit=LIMIT)
    return RedirectResponse(f"/ui/dead-letters?replayed={len(done)}", status_code=303,
                            headers=HEADERS)


def _selection(ids: list[str], reason: str) -> Callable[[DeadLetterEntry], bool] | None:
    if ids:
        wanted = set(ids)
        return lambda e: e.message_id in wanted
    if reason:
        return make_filter(reason=reason)
    return None


def _confirm(request: Request, who: Visitor, ids: list[str], reason: str,
             preview: list[DeadLetterEntry]) -> Response:
    return render(request, "replay_confirm.html", who, page="dead", ids=ids, reason=reason,
                  preview=preview)


def _field(value: object) -> str | None:
    return value if isinstance(value, str) else None
