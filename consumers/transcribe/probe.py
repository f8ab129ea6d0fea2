"""Preflight: is this media something we can and may transcribe?

Runs before anything costly (extraction, a model, a paid API call): not media at all (a text
file renamed ``.mp4``, a truncated container) -> ``unsupported_media``; media without an audio
stream -> ``no_audio``; longer than ``max_audio_s`` -> ``duration``. All permanent: the same
bytes will never pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlpipe.errors import PermanentError

from .tools import SAFE_INPUT, media_input, run_tool

#: ffprobe only reads headers; this bounds a pathological file, not normal work.
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class MediaInfo:
    format_name: str
    audio_codec: str
    #: Seconds, from the container or stream header, or measured by decoding when neither
    #: says (live-recorded WebM/Matroska often has no duration).
    duration_s: float


async def probe_media(path: Path, max_audio_s: float) -> MediaInfo:
    result = await run_tool(
        "ffprobe", "-v", "error", "-print_format", "json",
        "-show_entries", "format=format_name,duration:stream=index,codec_type,codec_name,duration",
        *SAFE_INPUT, f"file:{path}", timeout_s=PROBE_TIMEOUT_S)
    if result.returncode != 0:
        if "not on whitelist" in result.stderr:
            raise PermanentError(f"media container refused (playlists and other formats that "
                                 f"open further files or URLs are not read): {result.tail()}",
                                 reason="forbidden_media_format")
        raise PermanentError(f"not readable as audio or video: {result.tail()}",
                             reason="unsupported_media")
    doc = _json(result.stdout)
    fmt: dict[str, Any] = doc.get("format") or {}
    audio = [s for s in doc.get("streams") or [] if s.get("codec_type") == "audio"]
    if not audio:
        raise PermanentError(f"no audio stream in {fmt.get('format_name', 'the media')}",
                             reason="no_audio")
    stream = audio[0]
    codec = str(stream.get("codec_name") or "")
    if not codec or codec == "none":
        raise PermanentError("the audio stream has an unknown codec", reason="unsupported_media")
    duration = _seconds(stream.get("duration")) or _seconds(fmt.get("duration"))
    if duration is None:
        duration = await _decoded_duration(path, max_audio_s)
    check_duration(duration, max_audio_s)
    return MediaInfo(str(fmt.get("format_name", "")), codec, duration)


def check_duration(duration_s: float, max_audio_s: float) -> None:
    if duration_s > max_audio_s:
        raise PermanentError(f"audio is {duration_s:.0f}s long, more than the {max_audio_s:.0f}s "
                             "accepted", reason="duration")


def _json(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise PermanentError(f"ffprobe output unreadable: {exc}",
                             reason="unsupported_media") from exc
    return doc if isinstance(doc, dict) else {}


def _seconds(raw: object) -> float | None:
    try:
        value = float(str(raw))
    except ValueError:
        return None
    return value if value == value and value >= 0 else None  # drops NaN ("N/A" is caught above)


async def _decoded_duration(path: Path, max_audio_s: float) -> float:
    """Decode the audio (no output) to learn its length, stopping just past ``max_audio_s``
    so an endless or huge stream costs at most that much decoding."""
    result = await run_tool(
        "ffmpeg", "-nostdin", "-v", "error", *media_input(path), "-map", "0:a:0",
        "-t", f"{max_audio_s + 1:.3f}", "-f", "null", "-progress", "pipe:1", "-nostats", "-",
        timeout_s=None)
    if result.returncode != 0:
        raise PermanentError(f"audio cannot be decoded: {result.tail()}",
                             reason="unsupported_media")
    times = re.findall(r"^out_time_us=(\d+)$", result.stdout, re.MULTILINE)
    if not times:
        raise PermanentError("audio has no decodable samples", reason="unsupported_media")
    return int(times[-1]) / 1e6
