"""The scenario's daemon processes, their kill log and what their logs say about re-runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from tests.chaos.verdict import LogLine

ROOT = Path(__file__).resolve().parents[2]
#: Daemon log events that can excuse a re-run (``verdict.excuse``).
EVIDENCE_EVENTS = ("task.failed", "lock.lost")


class Daemons:
    """``count`` ``mlpipe consume`` processes; a SIGKILLed one is replaced at once. Each writes
    its JSON log to its own file, so every log line is tied to the pid that wrote it."""

    def __init__(self, env: dict[str, str], count: int, log_dir: Path, tag: str) -> None:
        self._env = env
        self._log_dir = log_dir
        self._tag = tag
        self._count = count
        self.procs: list[asyncio.subprocess.Process] = []
        self.log_of: dict[int, Path] = {}
        #: pid -> epoch second the harness saw it dead after its SIGKILL.
        self.killed: dict[int, float] = {}

    async def start_one(self) -> None:
        path = self._log_dir / f"daemon-{self._tag}-{len(self.procs)}.log"
        log = open(path, "wb")  # noqa: SIM115, ASYNC230
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mlpipe.cli", "--log-json", "--log-level", "INFO",
            "consume", "--queues", "transcribe,summarize,embed",
            "--handlers", "tests.chaos.handlers:build_registry",
            cwd=ROOT, env=self._env, stdout=asyncio.subprocess.DEVNULL, stderr=log)
        log.close()
        self.procs.append(proc)
        self.log_of[proc.pid] = path

    async def start(self) -> None:
        for _ in range(self._count):
            await self.start_one()

    async def kill_one(self, index: int) -> int:
        """SIGKILL one live daemon (round robin by ``index``), note when it was dead, start a
        replacement; returns the victim's pid."""
        alive = [p for p in self.procs if p.returncode is None]
        victim = alive[index % len(alive)]
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        self.killed[victim.pid] = time.time()
        await self.start_one()
        return victim.pid

    def exited_on_their_own(self) -> int:
        return sum(1 for p in self.procs
                   if p.returncode is not None and p.pid not in self.killed)

    async def stop(self) -> int:
        """SIGTERM the live daemons; return how many failed to exit cleanly (code != 0)."""
        live = [p for p in self.procs if p.returncode is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        bad = 0
        for p in live:
            try:
                bad += await asyncio.wait_for(p.wait(), timeout=60) != 0
            except TimeoutError:
                p.kill()
                bad += 1
        return bad

    def kill_all(self) -> None:
        """Last resort when the run is interrupted: no daemon of ours outlives it."""
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()

    def evidence(self) -> list[LogLine]:
        """``task.failed`` and ``lock.lost`` lines of every daemon, with the writer's pid."""
        out: list[LogLine] = []
        for pid, path in self.log_of.items():
            if path.exists():
                out += read_log(pid, path)
        return out


def read_log(pid: int, path: Path) -> list[LogLine]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not any(f'"{e}"' in line for e in EVIDENCE_EVENTS):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        share, event = entry.get("share_id"), entry.get("event")
        if not share or event not in EVIDENCE_EVENTS:
            continue
        attempt = entry.get("attempt")
        detail = str(entry.get("error") or entry.get("why") or "")[:200]
        out.append(LogLine(pid, event, share, attempt if isinstance(attempt, int) else None,
                           parse_timestamp(entry.get("timestamp", "")), detail))
    return out


def parse_timestamp(text: str) -> float:
    """The daemon's ``2026-11-23T10:46:05.123456Z`` as epoch seconds (0 if unreadable: such a
    line excuses nothing, since evidence must predate the re-run it explains... and follow the
    run it belongs to)."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0
