"""Turning any media into what a Whisper model wants, and cutting it into uploadable chunks.

One ffmpeg pass does three jobs: decode the first audio stream to 16 kHz mono PCM WAV (what
Whisper resamples to anyway, and the smallest lossless upload), normalise its loudness
(``loudnorm``: quiet recordings transcribe worse), and measure silence *before* the
normalisation (``silencedetect``, ``volumedetect``: loudnorm would lift faint noise to speech
level). A silent file is then answered without any model or paid call.

Long audio is cut into chunks (the OpenAI API refuses uploads over 25 MB) at a silence near
each limit where there is one, so a word is rarely split; segment times are shifted back by
each chunk's offset when the transcripts are merged.
"""

from __future__ import annotations

import asyncio
import re
import wave
from dataclasses import dataclass
from pathlib import Path

from mlpipe.errors import PermanentError

from .probe import check_duration
from .tools import media_input, run_tool

SAMPLE_RATE = 16_000
BYTES_PER_SECOND = SAMPLE_RATE * 2  # mono, 16-bit
WAV_HEADER_BYTES = 44
#: Below this level (dBFS) audio counts as silence.
NOISE_DB = -50.0
#: Shortest pause reported as a silence (and usable as a cut point).
MIN_SILENCE_S = 0.5
#: Less non-silent audio than this in the whole file: nothing to transcribe.
MIN_SOUND_S = 0.3
LOUDNORM = "loudnorm=I=-16:TP=-1.5:LRA=11"


@dataclass(frozen=True)
class Silence:
    start: float
    end: float


@dataclass(frozen=True)
class PreparedAudio:
    wav: Path
    duration_s: float
    silences: tuple[Silence, ...]
    #: Peak level before normalisation, dBFS; None if ffmpeg did not report it.
    max_volume_db: float | None

    @property
    def is_silent(self) -> bool:
        if self.duration_s <= 0:
            return True
        if self.max_volume_db is not None and self.max_volume_db <= NOISE_DB:
            return True
        quiet = sum(max(0.0, min(s.end, self.duration_s) - max(s.start, 0.0))
                    for s in self.silences)
        return self.duration_s - quiet < MIN_SOUND_S


async def extract_audio(src: Path, dest: Path, max_audio_s: float) -> PreparedAudio:
    """Decode, measure silence and normalise ``src`` into the WAV ``dest``. Decoding stops just
    past ``max_audio_s``, and a result longer than that is refused: the container header the
    preflight trusted may have lied."""
    filters = ",".join([
        f"aresample={SAMPLE_RATE}", "aformat=channel_layouts=mono",
        f"silencedetect=noise={NOISE_DB}dB:d={MIN_SILENCE_S}", "volumedetect",
        LOUDNORM, f"aresample={SAMPLE_RATE}",
    ])
    result = await run_tool(
        "ffmpeg", "-nostdin", "-hide_banner", "-nostats", "-y", *media_input(src),
        "-map", "0:a:0", "-vn", "-sn", "-dn", "-t", f"{max_audio_s + 1:.3f}", "-af", filters,
        "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", "-f", "wav", str(dest))
    if result.returncode != 0:
        raise PermanentError(f"audio extraction failed: {result.tail()}",
                             reason="unsupported_media")
    try:
        duration = await asyncio.to_thread(wav_duration, dest)
    except (OSError, EOFError, wave.Error) as exc:
        raise PermanentError(f"audio extraction produced no readable WAV: {exc}",
                             reason="unsupported_media") from exc
    check_duration(duration, max_audio_s)
    return PreparedAudio(dest, duration, parse_silences(result.stderr, duration),
                         _max_volume(result.stderr))


def wav_duration(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def parse_silences(stderr: str, duration_s: float) -> tuple[Silence, ...]:
    """``silence_start``/``silence_end`` lines of ffmpeg's silencedetect; a silence still open
    at the end of the stream ends with it."""
    out: list[Silence] = []
    start: float | None = None
    for kind, value in re.findall(r"silence_(start|end): (-?[\d.]+)", stderr):
        t = max(0.0, float(value))
        if kind == "start":
            start = t
        elif start is not None:
            out.append(Silence(start, t))
            start = None
    if start is not None:
        out.append(Silence(start, duration_s))
    return tuple(out)


def _max_volume(stderr: str) -> float | None:
    match = re.search(r"max_volume: (-?[\d.]+|-inf) dB", stderr)
    if match is None:
        return None
    return float("-inf") if match.group(1) == "-inf" else float(match.group(1))


# --- chunking -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkPolicy:
    """Audio longer than ``max_seconds`` or larger (as WAV) than ``max_bytes`` is cut. The
    defaults keep every upload under the OpenAI API's 25 MB limit."""

    max_seconds: float = 600.0
    max_bytes: int = 20 * 1024 * 1024
    #: How far before a hard cut a silence is looked for to cut in instead.
    search_s: float = 30.0

    def limit_s(self) -> float:
        return min(self.max_seconds, (self.max_bytes - WAV_HEADER_BYTES) / BYTES_PER_SECOND)


@dataclass(frozen=True)
class Chunk:
    path: Path
    offset_s: float
    duration_s: float


def plan_chunks(duration_s: float, silences: tuple[Silence, ...],
                policy: ChunkPolicy) -> list[tuple[float, float]]:
    """``(start, end)`` spans covering ``[0, duration_s]``, each at most the policy's limit,
    cut in the middle of the latest silence within ``search_s`` before each limit if any."""
    limit = policy.limit_s()
    if limit <= 0:
        raise ValueError("chunk limit must be positive")
    window = min(policy.search_s, limit / 4)
    spans: list[tuple[float, float]] = []
    start = 0.0
    while duration_s - start > limit:
        hard = start + limit
        lo = hard - window
        mids = [(max(s.start, lo) + min(s.end, hard)) / 2
                for s in silences if s.end > lo and s.start < hard]
        cut = max(mids) if mids else hard
        spans.append((start, cut))
        start = cut
    spans.append((start, duration_s))
    return spans


async def split_wav(audio: PreparedAudio, policy: ChunkPolicy, work_dir: Path) -> list[Chunk]:
    """The chunks to transcribe: the WAV itself when it fits, else sample-exact pieces (the
    offsets are exact frame positions, so merged timestamps do not drift)."""
    spans = plan_chunks(audio.duration_s, audio.silences, policy)
    if len(spans) == 1:
        return [Chunk(audio.wav, 0.0, audio.duration_s)]
    return await asyncio.to_thread(_write_chunks, audio.wav, spans, work_dir)


def _write_chunks(wav: Path, spans: list[tuple[float, float]], work_dir: Path) -> list[Chunk]:
    chunks: list[Chunk] = []
    with wave.open(str(wav), "rb") as src:
        params = src.getparams()
        rate = src.getframerate()
        for i, (start, end) in enumerate(spans):
            first, last = round(start * rate), min(round(end * rate), src.getnframes())
            src.setpos(first)
            path = work_dir / f"chunk-{i:03d}.wav"
            with wave.open(str(path), "wb") as out:
                out.setparams(params)
                out.writeframes(src.readframes(last - first))
            chunks.append(Chunk(path, first / rate, (last - first) / rate))
    return chunks
