"""The video workflow, driven by the daemon's own results (no polling).

A share submitted with ``submit_video`` gets two tasks at once: its caption is embedded
(searchable within seconds) and its media is transcribed. Then, each step inside the
transaction that stores the previous step's result:

==============================  =====================================================
result stored                    state change and follow-up task (through the outbox)
==============================  =====================================================
transcription starts             ``video_pending`` -> ``video_transcribing``
transcript                       -> ``video_summarizing``; ``summarize_video_combined``
                                 (transcript + caption + hashtags)
combined summary                 ``embed_vectors`` of summary + transcript ("rich")
rich embedding                   -> ``completed``: it replaced the caption-only chunks
transcription dead-lettered,     -> ``failed_transcription``: the caption embedding stays
or no transcript within
``workflow_timeout_s``
==============================  =====================================================

The timeout is a message, not a poll: when transcription starts, a deadline message is sent
through a delay queue of ``workflow_timeout_s`` and comes back on ``mlpipe.workflow``, where
the daemon moves a share still waiting for its transcript to ``failed_transcription``.

``VideoWorkflow`` is these steps as an ``mlpipe.effects.hooks.Workflow``: register it with
``registry.add_workflow(VideoWorkflow(settings.workflow_timeout_s))`` (the shipped handlers'
``build_registry`` does).

Transitions only move forward, so a redelivered or duplicated step changes nothing; follow-up
tasks carry deterministic message ids and meet the stored-result check downstream, so no paid
step runs twice. A caption embedding that arrives after the rich one (a re-submitted share) is
acked as superseded instead of overwriting it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import structlog

from mlpipe.contract.models import (
    ContentType,
    EmbedTask,
    SummarizeVideoCombinedTask,
    Task,
    TaskType,
    TranscribeTask,
    build_task,
)
from mlpipe.effects.hooks import Workflow, WorkflowEnv
from mlpipe.errors import ContractError
from mlpipe.handlers import HandlerResult
from mlpipe.observability.metrics import Metrics
from mlpipe.store.pool import DB

log = structlog.get_logger(__name__)


class State(StrEnum):
    PENDING = "video_pending"
    TRANSCRIBING = "video_transcribing"
    SUMMARIZING = "video_summarizing"
    COMPLETED = "completed"
    FAILED_TRANSCRIPTION = "failed_transcription"


#: Which states each state may be reached from.
_FROM: dict[State, tuple[State, ...]] = {
    State.TRANSCRIBING: (State.PENDING,),
    State.SUMMARIZING: (State.PENDING, State.TRANSCRIBING),
    State.COMPLETED: (State.SUMMARIZING,),
    State.FAILED_TRANSCRIPTION: (State.PENDING, State.TRANSCRIBING),
}
FINAL = (State.COMPLETED, State.FAILED_TRANSCRIPTION)


@dataclass(frozen=True)
class WorkflowStatus:
    share_id: str
    state: str
    history: list[dict[str, Any]]
    created_at: float
    updated_at: float


def is_video(task: Task) -> bool:
    return isinstance(task, TranscribeTask) and task.payload.video is not None


async def start(conn: DB, share_id: str, detail: str) -> None:
    """Create the workflow row in ``video_pending`` if it does not exist yet."""
    await conn.execute(
        "INSERT INTO ml_workflows (share_id, state, history) VALUES ($1, $2, $3) "
        "ON CONFLICT (share_id) DO NOTHING",
        share_id, State.PENDING.value,
        [{"state": State.PENDING.value, "at": time.time(), "detail": detail}])


async def advance(conn: DB, share_id: str, to: State, detail: str = "") -> bool:
    """Move forward to ``to`` if the share is in a state that may reach it; True if it moved."""
    entry = json.dumps([{"state": to.value, "at": time.time(), "detail": detail}])
    row = await conn.fetchval(
        "UPDATE ml_workflows SET state = $2, history = history || $3::text::jsonb, "
        "updated_at = now() WHERE share_id = $1 AND state = ANY($4::text[]) RETURNING 1",
        share_id, to.value, entry, [s.value for s in _FROM[to]])
    return row is not None


async def state_of(conn: DB, share_id: str) -> State | None:
    raw = await conn.fetchval("SELECT state FROM ml_workflows WHERE share_id = $1", share_id)
    return State(raw) if raw else None


async def status(conn: DB, share_id: str) -> WorkflowStatus | None:
    row = await conn.fetchrow(
        "SELECT share_id, state, history, extract(epoch FROM created_at) AS c, "
        "extract(epoch FROM updated_at) AS u FROM ml_workflows WHERE share_id = $1", share_id)
    if row is None:
        return None
    return WorkflowStatus(row["share_id"], row["state"], row["history"], float(row["c"]),
                          float(row["u"]))


async def state_counts(conn: DB) -> tuple[dict[State, int], float]:
    """Shares per state, and the age in seconds of the oldest share still in flight (0 when
    none): what the workflow gauges show. One grouped scan of the ``(state, updated_at)``
    index."""
    rows = await conn.fetch(
        "SELECT state, count(*) AS n, extract(epoch FROM now() - min(created_at)) AS age "
        "FROM ml_workflows GROUP BY state")
    counts = {s: 0 for s in State}
    oldest = 0.0
    for row in rows:
        try:
            state = State(row["state"])
        except ValueError:  # a state written by a newer release: not ours to chart
            continue
        counts[state] = int(row["n"])
        if state not in FINAL:
            oldest = max(oldest, float(row["age"]))
    return counts, oldest


# --- the workflow's hooks ----------------------------------------------------------------------

DEADLINE = "video_deadline"


class VideoWorkflow(Workflow):
    """The hooks above, as the effects layer calls them. ``timeout_s``: how long a share may
    wait for its transcript before it falls back to caption-only."""

    name = "video"

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self.control = {DEADLINE: self._on_deadline}

    def watches(self, task: Task) -> bool:
        if isinstance(task, EmbedTask):
            return task.payload.content.type in (ContentType.CAPTION, ContentType.TRANSCRIPT)
        return is_video(task) or isinstance(task, SummarizeVideoCombinedTask)

    async def skip_reason(self, conn: DB, task: Task) -> str | None:
        """A caption embedding for a share whose rich embedding already landed must not
        replace it."""
        if isinstance(task, EmbedTask) and task.payload.content.type is ContentType.CAPTION \
                and await state_of(conn, task.share_id) is State.COMPLETED:
            return "superseded"
        return None

    async def before_run(self, conn: DB, task: Task, env: WorkflowEnv) -> None:
        """Transcription is starting: the workflow enters ``video_transcribing`` and, the
        first time, arms its deadline."""
        if not is_video(task):
            return
        await start(conn, task.share_id, "submitted")
        if await advance(conn, task.share_id, State.TRANSCRIBING, "transcription started"):
            await env.schedule(conn, task, DEADLINE,
                               {"shareId": task.share_id,
                                "correlationId": task.metadata.correlation_id},
                               self._timeout_s, message_id=f"wf-deadline:{task.share_id}")

    async def on_result(self, conn: DB, task: Task, result: HandlerResult,
                        env: WorkflowEnv) -> None:
        """Inside the result's transaction: move the state on and queue the next step."""
        if isinstance(task, TranscribeTask) and task.payload.video is not None:
            await start(conn, task.share_id, "submitted")
            if await advance(conn, task.share_id, State.SUMMARIZING, "transcript stored"):
                await env.follow_up(conn, task, _combined_summary(task, result))
        elif isinstance(task, SummarizeVideoCombinedTask):
            if await state_of(conn, task.share_id) is State.SUMMARIZING:
                await env.follow_up(conn, task, _rich_embedding(task, result))
        elif isinstance(task, EmbedTask) and task.payload.content.type is ContentType.TRANSCRIPT:
            await advance(conn, task.share_id, State.COMPLETED, "rich embedding stored")

    async def on_dead_letter(self, conn: DB, task: Task, reason: str) -> None:
        if is_video(task):
            await start(conn, task.share_id, "submitted")
            await advance(conn, task.share_id, State.FAILED_TRANSCRIPTION,
                          f"transcription failed ({reason}); caption-only")

    async def _on_deadline(self, conn: DB, doc: dict[str, Any]) -> None:
        """The deadline fired: still no transcript means caption-only."""
        share = doc.get("shareId")
        if not isinstance(share, str):
            raise ContractError(f"a video deadline without a shareId: {doc!r}"[:300])
        fell_back = await advance(conn, share, State.FAILED_TRANSCRIPTION,
                                  f"no transcript within {self._timeout_s:g}s; caption-only")
        log.info("workflow.deadline", share_id=share, fell_back=fell_back)

    async def collect_metrics(self, conn: DB, metrics: Metrics) -> None:
        """Workflow gauges, read at scrape time: a replica that is down exports nothing
        stale."""
        counts, oldest = await state_counts(conn)
        for state, n in counts.items():
            metrics.workflows.labels(state.value).set(n)
        metrics.oldest_workflow_age.set(oldest)


def _combined_summary(task: TranscribeTask, result: HandlerResult) -> Task:
    video = task.payload.video
    assert video is not None
    transcript: dict[str, Any] = {"text": str(result.data.get("text") or video.caption or "-"),
                                  "type": "transcript"}
    if result.data.get("segments"):
        transcript["segments"] = result.data["segments"]
    return build_task(
        TaskType.SUMMARIZE_VIDEO_COMBINED, task.share_id,
        {"transcript": transcript, "caption": video.caption, "hashtags": video.hashtags,
         "options": _backend_option(task)},
        correlation_id=task.metadata.correlation_id, traceparent=task.metadata.traceparent)


def _rich_embedding(task: SummarizeVideoCombinedTask, result: HandlerResult) -> Task:
    """Summary, caption and hashtags plus the transcript. With timed segments, the transcript
    is chunked in timestamped windows (so a hit on the spoken words says where they are) and
    the rest goes ahead as an untimed ``lead``; without, all of it is one text."""
    p = task.payload
    summary = str(result.data.get("summary") or "")
    parts = (summary.strip(), (p.caption or "").strip(), " ".join(f"#{h}" for h in p.hashtags))
    # an extractive summary of a short clip can be its caption: said once
    lead = "\n\n".join(dict.fromkeys(part for part in parts if part))
    transcript, segments = p.transcript, p.transcript.segments or []
    content: dict[str, Any] = {"type": "transcript"}
    if any(s.text.strip() for s in segments):
        content["text"] = transcript.text
        content["segments"] = [s.model_dump(by_alias=True) for s in segments]
        if lead:
            content["lead"] = lead
    else:
        # a silent video's "transcript" is the caption (or "-") standing in: not said twice
        stand_in = transcript.text.strip() in ("-", (p.caption or "").strip())
        spoken = "" if stand_in else transcript.text
        content["text"] = "\n\n".join(part for part in (lead, spoken) if part.strip()) \
            or transcript.text
    return build_task(
        TaskType.EMBED_VECTORS, task.share_id,
        {"content": content, "options": {**_backend_option(task), "embeddingType": "content"}},
        correlation_id=task.metadata.correlation_id, traceparent=task.metadata.traceparent)


def _backend_option(task: Task) -> dict[str, Any]:
    backend = task.payload.options.backend
    return {"backend": backend.value} if backend is not None else {}
