"""Contract v1: the JSON every producer (Python, Node, Go, ...) sends and every consumer reads.

The pydantic models here are the source of truth; ``contracts/*.schema.json`` are generated
from them (``mlpipe contract export``) and a test fails when the two drift apart.

Rules that make the contract safe to evolve across languages:

* unknown fields are ignored (a 1.1 producer must not break a 1.0 consumer);
* missing required fields and wrong types are rejected, without coercion (``"3"`` is not 3);
* numbers are finite: ``NaN``, ``Infinity`` and literals out of float range (``1e400``) are
  not JSON numbers other languages can send or read back, so they are rejected;
* ``version`` is ``1.<minor>``; any other major version is refused as unsupported.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

#: Major version this code speaks. Producers stamp ``CONTRACT_VERSION``.
MAJOR_VERSION = 1
CONTRACT_VERSION = "1.2"

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_TRACEPARENT = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


class TaskType(StrEnum):
    TRANSCRIBE_WHISPER = "transcribe_whisper"
    SUMMARIZE_LLM = "summarize_llm"
    SUMMARIZE_VIDEO_COMBINED = "summarize_video_combined"
    EMBED_VECTORS = "embed_vectors"


class Backend(StrEnum):
    API = "api"
    LOCAL = "local"


class _Model(BaseModel):
    """Camel-case on the wire, snake-case in Python, strict types, unknown fields ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        strict=True,
        extra="ignore",
        frozen=True,
        use_enum_values=False,
        allow_inf_nan=False,
    )


# --- shared pieces ----------------------------------------------------------------------------


class Segment(_Model):
    """A timed piece of a transcript, in seconds from the start of the media."""

    start: Annotated[float, Field(ge=0, strict=False)]
    end: Annotated[float, Field(ge=0, strict=False)]
    text: str

    @model_validator(mode="after")
    def _ordered(self) -> Segment:
        if self.end < self.start:
            raise ValueError("segment end is before its start")
        return self


class ContentType(StrEnum):
    CAPTION = "caption"
    TRANSCRIPT = "transcript"
    ARTICLE = "article"
    COMMENT = "comment"
    TWEET = "tweet"


class Content(_Model):
    text: Annotated[str, Field(min_length=1, max_length=2_000_000)]
    title: str | None = None
    url: str | None = None
    platform: str | None = None
    type: ContentType | None = None
    segments: list[Segment] | None = None
    #: Added in 1.2; a 1.1 consumer ignores it (and embeds only ``text``/``segments``).
    lead: Annotated[str, Field(max_length=2_000_000)] | None = Field(None, description=(
        "Text that goes with the content but has no time in the media (a video's summary, "
        "caption and hashtags next to its timed transcript). embed_vectors gives it chunks of "
        "its own, ahead of the content's and without timestamps; other tasks ignore it."))


class Options(_Model):
    """Options every task type understands."""

    #: ``local`` routes to the ``*_local`` queue (self-hosted models); ``api`` or unset to the
    #: default one.
    backend: Backend | None = None
    model: str | None = None
    #: Run the handler even when a result for this share and task type is already stored.
    force_recompute: bool = False


class TranscribeOptions(Options):
    pass


class SummarizeOptions(Options):
    max_length: Annotated[int, Field(ge=16, le=8192)] | None = None


class EmbeddingType(StrEnum):
    CONTENT = "content"
    SUMMARY = "summary"
    COMPOSITE = "composite"


class ChunkStrategy(StrEnum):
    AUTO = "auto"
    WHOLE = "whole"
    TRANSCRIPT = "transcript"
    PARAGRAPH = "paragraph"


class EmbedOptions(Options):
    embedding_type: EmbeddingType = EmbeddingType.CONTENT
    chunk_strategy: ChunkStrategy = ChunkStrategy.AUTO


# --- payloads ---------------------------------------------------------------------------------


class VideoContext(_Model):
    """Marks a transcription as the start of a share's video workflow (contract 1.1): what the
    combined summary needs besides the transcript."""

    caption: Annotated[str, Field(max_length=100_000)] | None = None
    hashtags: list[Annotated[str, Field(max_length=200)]] = []
    platform: str | None = None


class TranscribePayload(_Model):
    media_url: Annotated[str, Field(min_length=1, max_length=4096)]
    language: Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z]{2,4})?$")] | None = None
    options: TranscribeOptions = TranscribeOptions()
    #: Present when the share runs the video workflow (added in 1.1).
    video: VideoContext | None = None


class SummarizePayload(_Model):
    content: Content
    options: SummarizeOptions = SummarizeOptions()


class SummarizeVideoCombinedPayload(_Model):
    """Transcript, caption and hashtags of one video, summarised together."""

    transcript: Content
    caption: Annotated[str, Field(max_length=100_000)] | None = None
    hashtags: list[Annotated[str, Field(max_length=200)]] = []
    options: SummarizeOptions = SummarizeOptions()


class EmbedPayload(_Model):
    content: Content
    options: EmbedOptions = EmbedOptions()


# --- the envelope -----------------------------------------------------------------------------


class Metadata(_Model):
    correlation_id: Annotated[str, Field(min_length=1, max_length=128)]
    #: Unix seconds when the producer created the task.
    timestamp: Annotated[float, Field(ge=0, strict=False)]
    #: How many times this task has been retried after a transient error.
    retry_count: Annotated[int, Field(ge=0)] = 0
    traceparent: Annotated[str, Field(pattern=_TRACEPARENT)] | None = None


class _Envelope(_Model):
    version: Annotated[str, Field(pattern=r"^1\.\d+$")]
    share_id: Annotated[str, Field(pattern=_ID)]
    metadata: Metadata


class TranscribeTask(_Envelope):
    task_type: Literal[TaskType.TRANSCRIBE_WHISPER]
    payload: TranscribePayload


class SummarizeTask(_Envelope):
    task_type: Literal[TaskType.SUMMARIZE_LLM]
    payload: SummarizePayload


class SummarizeVideoCombinedTask(_Envelope):
    task_type: Literal[TaskType.SUMMARIZE_VIDEO_COMBINED]
    payload: SummarizeVideoCombinedPayload


class EmbedTask(_Envelope):
    task_type: Literal[TaskType.EMBED_VECTORS]
    payload: EmbedPayload


Task = TranscribeTask | SummarizeTask | SummarizeVideoCombinedTask | EmbedTask

#: The model that validates each task type's envelope.
TASK_MODELS: dict[TaskType, type[TranscribeTask | SummarizeTask | SummarizeVideoCombinedTask
                                 | EmbedTask]] = {
    TaskType.TRANSCRIBE_WHISPER: TranscribeTask,
    TaskType.SUMMARIZE_LLM: SummarizeTask,
    TaskType.SUMMARIZE_VIDEO_COMBINED: SummarizeVideoCombinedTask,
    TaskType.EMBED_VECTORS: EmbedTask,
}

PAYLOAD_MODELS: dict[TaskType, type[_Model]] = {
    TaskType.TRANSCRIBE_WHISPER: TranscribePayload,
    TaskType.SUMMARIZE_LLM: SummarizePayload,
    TaskType.SUMMARIZE_VIDEO_COMBINED: SummarizeVideoCombinedPayload,
    TaskType.EMBED_VECTORS: EmbedPayload,
}


def build_task(
    task_type: TaskType | str,
    share_id: str,
    payload: dict[str, Any] | BaseModel,
    *,
    correlation_id: str | None = None,
    traceparent: str | None = None,
) -> Task:
    """Make a validated v1 task; what a Python producer calls instead of writing JSON."""
    tt = TaskType(task_type)
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc = {
        "version": CONTRACT_VERSION,
        "taskType": tt.value,
        "shareId": share_id,
        "payload": payload,
        "metadata": {
            "correlationId": correlation_id or str(uuid.uuid4()),
            "timestamp": int(time.time()),
            "retryCount": 0,
            **({"traceparent": traceparent} if traceparent else {}),
        },
    }
    return TASK_MODELS[tt].model_validate_json(_dumps(doc))


def _dumps(doc: Any) -> bytes:
    import json

    return json.dumps(doc, separators=(",", ":")).encode()
