"""Starting a share's video workflow from the producer side."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from mlpipe.contract.models import TaskType, build_task
from mlpipe.producer import Producer, PublishReceipt


@dataclass(frozen=True)
class VideoSubmission:
    caption: PublishReceipt
    transcription: PublishReceipt


async def submit_video(producer: Producer, share_id: str, media_url: str, *,
                       caption: str, hashtags: list[str] | None = None,
                       platform: str | None = None, language: str | None = None,
                       backend: str | None = None, correlation_id: str | None = None,
                       traceparent: str | None = None) -> VideoSubmission:
    """Publish the caption embedding (searchable in seconds) and the transcription that drives
    the rest of the workflow; both carry one correlation id."""
    corr = correlation_id or str(uuid.uuid4())
    options = {"backend": backend} if backend else {}
    embed = build_task(
        TaskType.EMBED_VECTORS, share_id,
        {"content": {"text": caption, "type": "caption", "platform": platform},
         "options": {**options, "embeddingType": "content"}},
        correlation_id=corr, traceparent=traceparent)
    transcribe = build_task(
        TaskType.TRANSCRIBE_WHISPER, share_id,
        {"mediaUrl": media_url, "language": language, "options": options,
         "video": {"caption": caption, "hashtags": hashtags or [], "platform": platform}},
        correlation_id=corr, traceparent=traceparent)
    return VideoSubmission(await producer.publish(embed), await producer.publish(transcribe))
