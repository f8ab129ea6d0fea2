"""Transcription (``transcribe_whisper``, queues ``ml.transcribe`` and ``ml.transcribe_local``).

``register(registry, settings)`` adds the handler and its two resources: the OpenAI-compatible
client (``transcribe.api``) and the lazily loaded faster-whisper model (``transcribe.local``).
The local model directory comes from ``MLPIPE_WHISPER_MODEL_DIR``; the test/demo model is
assembled by ``python -m consumers.transcribe.weights`` (see ``weights.py``).
"""

from __future__ import annotations

from mlpipe.contract.models import TaskType, TranscribeTask
from mlpipe.handlers import HandlerResult, Registry, TaskContext
from mlpipe.settings import Settings

from .audio import ChunkPolicy
from .backends import api_resource, local_resource
from .handler import RESOURCE_API, RESOURCE_LOCAL, TranscribeHandler

#: Lock TTL basis: a few minutes of typical audio through either backend. The lock is renewed
#: while the handler runs, so a longer run keeps it.
EXPECTED_RUNTIME_S = 120.0


def register(registry: Registry, settings: Settings, *,
             chunking: ChunkPolicy | None = None) -> None:
    """``chunking`` overrides where long audio is cut (tests use tiny chunks)."""
    transcriber = TranscribeHandler(settings, chunking)
    registry.add_resource(RESOURCE_API, lambda: api_resource(settings))
    registry.add_resource(RESOURCE_LOCAL, lambda: local_resource(settings))

    # The daemon-wide limit: 30 min of audio through CPU whisper base fits well inside the
    # 900 s default, and it stays below RabbitMQ's 30 min consumer_timeout.
    @registry.handler(TaskType.TRANSCRIBE_WHISPER, timeout_s=settings.handler_timeout_s,
                      expected_runtime_s=EXPECTED_RUNTIME_S,
                      estimate_cost=transcriber.estimate_cost)
    async def transcribe_whisper(task: TranscribeTask, ctx: TaskContext) -> HandlerResult:
        return await transcriber(task, ctx)


__all__ = ["RESOURCE_API", "RESOURCE_LOCAL", "ChunkPolicy", "TranscribeHandler", "register"]
