"""Running ffmpeg and ffprobe as child processes that never outlive the handler.

A handler run can be cancelled at any await (its timeout, a shutdown). An ffmpeg left running
after that would keep burning CPU on a task the daemon already gave up on, so the child is
killed and reaped on every way out that is not a normal exit.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass

from mlpipe.errors import PermanentError, TransientError

INSTALL_HINT = "install ffmpeg (apt-get install -y ffmpeg; .ci/run does it)"

#: Containers a shared audio or video file arrives in. The input's demuxer must be one of
#: these: playlist and indirection formats (HLS, DASH, concat, image sequences, SDP/RTSP,
#: script formats) open further files or URLs named *inside* the file, so a downloaded
#: ``.m3u8`` could make ffmpeg read ``/etc/passwd`` or dial an internal host. An allow-list,
#: not a deny-list: a demuxer added to a future ffmpeg stays refused until listed here.
MEDIA_DEMUXERS = (
    "mov", "matroska", "mp3", "wav", "w64", "ogg", "flac", "aac", "avi", "flv", "mpegts",
    "mpeg", "asf", "amr", "aiff", "caf", "au", "wv", "ape", "ac3", "eac3", "dts", "truehd",
    "tta", "loas", "3gp",
)

#: Input options for every ffmpeg and ffprobe run on media from outside: read the named
#: file through the ``file`` protocol only (nothing that reaches the network, a pipe, or a
#: subprocess), with one of ``MEDIA_DEMUXERS``.
SAFE_INPUT = ("-protocol_whitelist", "file", "-format_whitelist", ",".join(MEDIA_DEMUXERS))


def media_input(path: object) -> tuple[str, ...]:
    """``-i`` for ``path`` behind ``SAFE_INPUT``, as an explicit ``file:`` URL so a file name
    can never be read as another protocol (``concat:``, ``subfile,,``...)."""
    return (*SAFE_INPUT, "-i", f"file:{path}")


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stdout: str
    stderr: str

    def tail(self, lines: int = 5) -> str:
        return " | ".join(self.stderr.strip().splitlines()[-lines:])


async def run_tool(*args: str, timeout_s: float | None = None) -> ToolResult:
    """Run ``args``; raise ``TransientError`` if the child was killed by a signal (out of
    memory, an operator) or ran past ``timeout_s``: the same input may well succeed later.
    A missing executable is a deployment fault no retry fixes: ``PermanentError`` naming the
    setup step (dead-lettered with its reason, replayable once it is fixed)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise PermanentError(f"{args[0]} not found: {INSTALL_HINT}",
                             reason="ffmpeg_unavailable") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError as exc:
        await _kill(proc)
        raise TransientError(f"{args[0]} ran past {timeout_s}s", reason="media_tool_timeout"
                             ) from exc
    except BaseException:
        await asyncio.shield(_kill(proc))
        raise
    result = ToolResult(proc.returncode or 0, out.decode(errors="replace"),
                        err.decode(errors="replace"))
    if result.returncode < 0:
        raise TransientError(f"{args[0]} was killed by signal {-result.returncode}",
                             reason="media_tool_killed")
    return result


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
