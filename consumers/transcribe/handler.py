"""The ``transcribe_whisper`` handler: media URL in, timed transcript out.

The order is chosen so that money and CPU are spent last: fetch (bounded) -> ffprobe
preflight (not media, no audio, too long: permanent, before anything else) -> one ffmpeg pass
to 16 kHz mono WAV with loudness normalisation and silence measurement -> silent: answered at
zero cost -> chunks -> backend -> timestamp-corrected merge.

Budget: ``estimate_cost`` runs before the handler and sees only the task, not the media, so
for the API backend it reserves the worst case, ``audio_cost(model, max_audio_s)`` ($0.18 for
30 min of whisper-1). The preflight guarantees no call exceeds that, so a reservation can never
be overrun and the ceilings hold even with several workers; the real cost replaces the
reservation when the result is stored. The price of that safety: in the last worst-case
amount under a ceiling, tasks are refused that might have fitted. Returning 0 instead would
switch the pre-flight check off entirely (the budget guard skips free tasks), letting
transcription spend past its ceilings; lower ``max_audio_s`` to make the hold smaller.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from consumers.media import fetch_media
from mlpipe.backends import audio_cost, backend_for
from mlpipe.contract.models import Backend, Task, TranscribeTask
from mlpipe.handlers import HandlerResult, TaskContext
from mlpipe.settings import Settings

from .audio import ChunkPolicy, PreparedAudio, extract_audio, split_wav
from .backends import (
    ApiTranscriber,
    ChunkTranscript,
    LocalWhisper,
    is_language_code,
    total_usd,
    whisper_language,
)
from .probe import probe_media

#: Names of the daemon-owned resources this handler uses.
RESOURCE_API = "transcribe.api"
RESOURCE_LOCAL = "transcribe.local"


class Transcriber(Protocol):
    async def transcribe(self, wav: Path, duration_s: float,
                         language: str | None) -> ChunkTranscript: ...


class TranscribeHandler:
    def __init__(self, settings: Settings, chunking: ChunkPolicy | None = None) -> None:
        self._settings = settings
        self._chunking = chunking or ChunkPolicy()

    def estimate_cost(self, task: Task) -> Decimal:
        if backend_for(task, self._settings) is Backend.LOCAL:
            return Decimal(0)
        return audio_cost(self._settings.transcribe_api_model, self._settings.max_audio_s)

    async def __call__(self, task: TranscribeTask, ctx: TaskContext) -> HandlerResult:
        backend = backend_for(task, self._settings)
        transcriber, model = self._transcriber(backend, ctx)
        max_s = self._settings.max_audio_s
        with tempfile.TemporaryDirectory(prefix="mlpipe-transcribe-") as tmp:
            work = Path(tmp)
            media = await fetch_media(task.payload.media_url, self._settings, work)
            info = await probe_media(media, max_s)
            ctx.log.info("transcribe.probed", format=info.format_name, codec=info.audio_codec,
                         duration_s=info.duration_s, backend=backend.value)
            audio = await extract_audio(media, work / "audio.wav", max_s)
            if audio.is_silent:
                ctx.log.info("transcribe.silent", duration_s=audio.duration_s)
                return _silent(audio, backend, model)
            parts = await self._transcribe_chunks(audio, transcriber, task, work)
        language = whisper_language(task.payload.language) or parts[0][1].language
        segments = [s.shifted(offset) for offset, part in parts for s in part.segments]
        costs = tuple(part.cost for _, part in parts if part.cost is not None)
        usd = total_usd(list(costs))
        ctx.log.info("transcribe.done", chunks=len(parts), duration_s=audio.duration_s,
                     usd=str(usd))
        return HandlerResult({
            "status": "ok",
            "text": " ".join(part.text for _, part in parts if part.text),
            "language": language,
            "segments": [asdict(s) for s in segments],
            "duration": round(audio.duration_s, 3),
            "cost_usd": float(usd),
            "model": model,
            "backend": backend.value,
        }, model_version=model, costs=costs)

    async def _transcribe_chunks(self, audio: PreparedAudio, transcriber: Transcriber,
                                 task: TranscribeTask, work: Path
                                 ) -> list[tuple[float, ChunkTranscript]]:
        """Chunks in order; the language detected in the first one is kept for the rest, so
        a chunk that opens with music or a name is not transcribed as another language."""
        language = whisper_language(task.payload.language)
        parts: list[tuple[float, ChunkTranscript]] = []
        for chunk in await split_wav(audio, self._chunking, work):
            part = await transcriber.transcribe(chunk.path, chunk.duration_s, language)
            if language is None and is_language_code(part.language):
                language = part.language
            parts.append((chunk.offset_s, part))
        return parts

    def _transcriber(self, backend: Backend, ctx: TaskContext) -> tuple[Transcriber, str]:
        if backend is Backend.API:
            api: ApiTranscriber = ctx.resources[RESOURCE_API]
            return api, api.model
        local: LocalWhisper = ctx.resources[RESOURCE_LOCAL]
        return local, local.name


def _silent(audio: PreparedAudio, backend: Backend, model: str) -> HandlerResult:
    """Nothing to hear: no model, no paid call, no cost entry."""
    return HandlerResult({
        "status": "silent", "text": "", "segments": [], "language": None,
        "duration": round(audio.duration_s, 3), "cost_usd": 0.0, "model": model,
        "backend": backend.value,
    }, model_version=model, costs=())


__all__ = ["RESOURCE_API", "RESOURCE_LOCAL", "TranscribeHandler"]
