"""scripts/system-deps, which makes `make setup` the first command on a fresh machine: what it
finds missing, the one command it prints when it may not install, and what it asks apt-get
for when it may. The machine's own packages are never touched: each test runs the script
with a PATH of its own (stub commands) and a fake ``apt-get`` that records its arguments and
"installs" stubs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "system-deps"
#: What the script itself runs besides the commands it looks for.
BASE_COMMANDS = ("bash", "id", "echo", "cat", "chmod")
SYSTEM_PYTHON = "/usr/bin/python3"
#: apt package -> the command it provides, as the fake apt-get installs them.
PROVIDES = {"ffmpeg": "ffmpeg", "espeak-ng": "espeak-ng", "nodejs": "node", "npm": "npm",
            "make": "make"}


def _stub(bin_dir: Path, name: str, body: str = "exit 0") -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _bin(tmp_path: Path, *present: str, uid: int = 0, node_major: int = 20,
         node_ships_npm: bool = False) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in BASE_COMMANDS:
        real = shutil.which(name)
        assert real is not None, name
        (bin_dir / name).symlink_to(real)
    # the system's python3 (not the venv's): the script asks it whether venv can bootstrap pip
    (bin_dir / "python3").symlink_to(SYSTEM_PYTHON)
    (bin_dir / "id").unlink()
    _stub(bin_dir, "id", f'[ "$1" = -u ] && echo {uid}')
    node = (f'[ "$1" = -p ] && echo {node_major}; '
            f'[ "$1" = --version ] && echo v{node_major}.0.0; exit 0')
    for name in present:
        _stub(bin_dir, name, node if name == "node" else "exit 0")
    log = tmp_path / "apt.log"
    installs = "\n".join(
        f'  {pkg}) printf \'#!/bin/sh\\n{"echo " + str(node_major) if cmd == "node" else "exit 0"}'
        f'\\n\' > "{bin_dir}/{cmd}"; chmod +x "{bin_dir}/{cmd}"'
        + (f'; printf \'#!/bin/sh\\nexit 0\\n\' > "{bin_dir}/npm"; chmod +x "{bin_dir}/npm"'
           if pkg == "nodejs" and node_ships_npm else "") + ";;"
        for pkg, cmd in PROVIDES.items())
    _stub(bin_dir, "apt-get", f'echo "$@" >> "{log}"\n'
          'for a in "$@"; do case "$a" in\n' + installs + "\nesac; done")
    return bin_dir


def _run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


def _apt_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path, "ffmpeg", "espeak-ng", "node", "npm", "make")
    result = _run(bin_dir)
    assert result.returncode == 0, result.stderr
    assert _apt_calls(tmp_path) == []


def test_not_root_prints_the_one_command(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path, "node", "npm", "make", uid=1000)
    result = _run(bin_dir)
    assert result.returncode == 1
    assert ("sudo apt-get update && sudo apt-get install -y --no-install-recommends "
            "ffmpeg espeak-ng") in result.stderr
    assert _apt_calls(tmp_path) == []


def test_check_installs_nothing_even_as_root(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path, "ffmpeg", "make")
    result = _run(bin_dir, "--check")
    assert result.returncode == 1
    assert "missing system packages: espeak-ng nodejs" in result.stderr
    assert _apt_calls(tmp_path) == []


@pytest.mark.parametrize("node_ships_npm", [True, False])
def test_root_installs_what_is_missing(tmp_path: Path, node_ships_npm: bool) -> None:
    bin_dir = _bin(tmp_path, "make", node_ships_npm=node_ships_npm)
    result = _run(bin_dir)
    assert result.returncode == 0, result.stderr
    calls = _apt_calls(tmp_path)
    assert calls[0] == "update -qq"
    assert calls[1] == "install -y -qq --no-install-recommends ffmpeg espeak-ng nodejs"
    # Debian's nodejs comes without npm: a second round installs it; NodeSource's has it
    assert calls[2:] == ([] if node_ships_npm
                         else ["install -y -qq --no-install-recommends npm"])
    for cmd in ("ffmpeg", "espeak-ng", "node", "npm"):
        assert (bin_dir / cmd).exists(), cmd


def test_too_old_node_is_refused(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path, "ffmpeg", "espeak-ng", "node", "npm", "make", node_major=16)
    result = _run(bin_dir)
    assert result.returncode == 1
    assert "older than 18" in result.stderr


def test_bad_argument(tmp_path: Path) -> None:
    result = _run(_bin(tmp_path), "--install-everything")
    assert result.returncode == 2
    assert "usage:" in result.stderr
