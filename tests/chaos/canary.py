"""The network half of the hostile set: a canary HTTP server on loopback, the URLs that aim a
worker at it, and a tripwire that tells whether the media guard refuses a URL before dialling.

A worker that fetches a publisher's ``mediaUrl`` from inside the cluster is a server-side
request forgery waiting to happen. The canary listens on ``127.0.0.1`` and ``[::1]`` (one
port) and counts every connection it accepts, so "the guard refused" is measured at the
destination, not inferred from a log line. A second loopback server answers ``302`` to the
canary (a worker must refuse it already: it is on loopback too), and the canary serves an HLS
playlist whose entries point at ``file:///etc/passwd`` and back at itself.

Some URLs name addresses off this machine (the cloud metadata service, a private network).
The harness itself never sends anything there: such a URL goes into a task only after the
tripwire showed, in this process, that the guard refuses it without a connection attempt.
Without the guard they are withheld, and the verdict says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpipe.errors import PermanentError
from mlpipe.settings import Settings

#: Longest wait for a request head; a client that connects and sends nothing still counts.
READ_HEAD_S = 5.0
#: Buckets a hostile ``s3://`` URL names; the daemons list only ``chaos``.
UNLISTED_BUCKETS = ("chaos-private", "billing-exports")


@dataclass
class Hits:
    """What reached the canary servers: accepted connections per server and the request
    lines seen (a TLS hello or silence has none)."""

    connections: Counter[str] = field(default_factory=Counter)
    requests: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.connections.values())


class Canary:
    """Two HTTP servers on loopback: the canary (``127.0.0.1:port`` and ``[::1]:port``) and a
    redirector (``127.0.0.1:redirect_port``) that answers every request with a 302 to it."""

    def __init__(self) -> None:
        self.hits = Hits()
        self.port = 0
        self.redirect_port = 0
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        for _ in range(20):  # a port free on both loopback addresses
            v4 = await asyncio.start_server(self._serve("canary"), "127.0.0.1", 0)
            port = v4.sockets[0].getsockname()[1]
            try:
                v6 = await asyncio.start_server(self._serve("canary"), "::1", port)
            except OSError:
                v4.close()
                continue
            self.port = port
            self._servers += [v4, v6]
            break
        else:
            raise RuntimeError("no port free on both 127.0.0.1 and ::1")
        redirector = await asyncio.start_server(self._serve("redirector"), "127.0.0.1", 0)
        self.redirect_port = redirector.sockets[0].getsockname()[1]
        self._servers.append(redirector)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, name: str) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.hits.connections[name] += 1
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_HEAD_S)
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                self.hits.requests.append(f"{name}: {line}")
                writer.write(self._answer(name, line))
                await writer.drain()
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ConnectionError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        return handle

    def _answer(self, name: str, request_line: str) -> bytes:
        if name == "redirector":
            return (f"HTTP/1.1 302 Found\r\nLocation: {self.url}/redirected.mp3\r\n"
                    "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
        path = request_line.split(" ")[1] if request_line.count(" ") >= 2 else "/"
        if path.endswith(".m3u8"):
            body = ("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n"
                    f"#EXTINF:10,\n{self.url}/segment.ts\n#EXT-X-ENDLIST\n").encode()
            ctype = "application/vnd.apple.mpegurl"
        else:
            body, ctype = b"RIFF canary: a worker fetched this", "audio/wav"
        return (f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Target:
    """One hostile media URL and what it stands for."""

    label: str
    url: str
    #: Dials an address off this machine if the guard lets it through: used only once the
    #: tripwire showed the guard refuses it before connecting.
    off_host: bool = False


def targets(canary: Canary) -> list[Target]:
    """Every spelling of "this machine" and its neighbours that a guard must refuse."""
    p, r = canary.port, canary.redirect_port
    return [
        Target("loopback", f"http://127.0.0.1:{p}/a.mp3"),
        Target("localhost", f"http://localhost:{p}/a.mp3"),
        Target("localhost upper case", f"http://LOCALHOST:{p}/a.mp3"),
        Target("decimal", f"http://2130706433:{p}/a.mp3"),
        Target("hex", f"http://0x7f000001:{p}/a.mp3"),
        Target("octal", f"http://0177.0.0.1:{p}/a.mp3"),
        Target("shortened", f"http://127.1:{p}/a.mp3"),
        Target("unspecified", f"http://0.0.0.0:{p}/a.mp3"),
        Target("ipv6 loopback", f"http://[::1]:{p}/a.mp3"),
        Target("ipv4-mapped ipv6", f"http://[::ffff:127.0.0.1]:{p}/a.mp3"),
        Target("userinfo", f"http://media.example.com@127.0.0.1:{p}/a.mp3"),
        Target("https loopback", f"https://127.0.0.1:{p}/a.mp3"),
        Target("redirect to canary", f"http://127.0.0.1:{r}/r.mp3"),
        Target("hls playlist", f"http://127.0.0.1:{p}/list.m3u8"),
        *(Target(f"s3 unlisted bucket {b}", f"s3://{b}/secret.wav") for b in UNLISTED_BUCKETS),
        Target("cloud metadata", "http://169.254.169.254/latest/meta-data/iam/", off_host=True),
        Target("cloud metadata ipv6", "http://[fd00:ec2::254]/latest/meta-data/",
               off_host=True),
        Target("private network", "http://10.11.12.13/a.mp3", off_host=True),
    ]


# --- the tripwire ----------------------------------------------------------------------------


class Tripped(ConnectionRefusedError):
    """Raised instead of connecting while the tripwire is armed."""


@contextlib.contextmanager
def tripwire(dialled: list[str]) -> Iterator[None]:
    """While active, every socket connect in this process is recorded in ``dialled`` and
    refused before a packet leaves (``sock_connect`` of the asyncio loop and plain
    ``socket.connect``). Only for the preflight: nothing else may connect meanwhile."""
    from asyncio import selector_events

    loop_cls: Any = selector_events.BaseSelectorEventLoop
    original_async = loop_cls.sock_connect
    original_sync, original_ex = socket.socket.connect, socket.socket.connect_ex

    async def sock_connect(self: Any, sock: socket.socket, address: Any) -> None:
        dialled.append(str(address))
        raise Tripped(f"tripwire: connect to {address}")

    def connect(self: socket.socket, address: Any) -> None:
        dialled.append(str(address))
        raise Tripped(f"tripwire: connect to {address}")

    def connect_ex(self: socket.socket, address: Any) -> int:
        dialled.append(str(address))
        return 111  # ECONNREFUSED

    loop_cls.sock_connect = sock_connect
    socket.socket.connect = connect  # type: ignore[method-assign, assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        loop_cls.sock_connect = original_async
        socket.socket.connect = original_sync  # type: ignore[method-assign]
        socket.socket.connect_ex = original_ex  # type: ignore[method-assign]


@dataclass(frozen=True)
class Preflight:
    """Per target: refused before any connect (True) or not (False), with what happened."""

    refused: dict[str, bool]
    notes: dict[str, str]

    def usable(self, all_targets: list[Target]) -> list[Target]:
        """The targets that may go into tasks: on-host ones always (their worst case is a
        canary hit), off-host ones only when the guard refused them here."""
        return [t for t in all_targets if not t.off_host or self.refused.get(t.label, False)]

    def withheld(self, all_targets: list[Target]) -> list[str]:
        return [t.label for t in all_targets if t not in self.usable(all_targets)]


async def preflight(all_targets: list[Target], settings: Settings) -> Preflight:
    """Ask the real media code, in this process and behind the tripwire, whether each
    off-host target is refused before a connection is attempted (on-host targets are judged
    by the canary itself)."""
    from consumers.media import fetch_media

    refused: dict[str, bool] = {}
    notes: dict[str, str] = {}
    for t in (t for t in all_targets if t.off_host):
        dialled: list[str] = []
        with tempfile.TemporaryDirectory() as tmp, tripwire(dialled):
            try:
                await asyncio.wait_for(fetch_media(t.url, settings, Path(tmp)), 10)
                outcome = "fetched"
            except PermanentError as exc:
                outcome = f"refused ({exc.reason})"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
        refused[t.label] = outcome.startswith("refused") and not dialled
        notes[t.label] = outcome + (f"; tried to dial {dialled[:3]}" if dialled else "")
    return Preflight(refused, notes)
