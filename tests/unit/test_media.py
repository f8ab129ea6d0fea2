"""consumers.media: which URLs may be read at all, and bounded downloads.

The path checks are the security boundary (a task must not make the worker read
``/etc/shadow`` or a key next to the media), so each way out of the roots is tried: ``..``,
symlinks, ``file://``, look-alike prefixes, other schemes. Downloads are tried against a local
aiohttp server that lies about sizes, fails and stalls on purpose.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web

from consumers.media import fetch_media
from mlpipe.errors import PermanentError, TransientError
from mlpipe.settings import Settings


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.wav").write_bytes(b"RIFF....WAVE")
    (tmp_path / "secret.txt").write_text("outside the roots")
    return media


@pytest.fixture
def lookalike(root: Path) -> Path:
    """A sibling whose name starts with the root's: inside it as a string, not as a path."""
    evil = Path(f"{root}-evil")
    evil.mkdir()
    (evil / "clip.wav").write_bytes(b"x")
    return evil


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def settings(root: Path) -> Settings:
    # the download tests' servers listen on loopback, which a deployment must opt in
    return Settings(media_roots=[str(root)], media_max_bytes=1000, media_timeout_s=0.5,
                    media_allow_private_networks=["127.0.0.0/8"])


async def refused(url: str, settings: Settings, dest: Path) -> str:
    with pytest.raises(PermanentError) as err:
        await fetch_media(url, settings, dest)
    return err.value.reason


# --- local paths ------------------------------------------------------------------------------


async def test_plain_path_and_file_url_under_a_root_are_read_in_place(
        root: Path, settings: Settings, tmp_path: Path) -> None:
    spaced = root / "my clip.wav"
    spaced.write_bytes(b"x")
    assert await fetch_media(str(root / "clip.wav"), settings, tmp_path) == root / "clip.wav"
    assert await fetch_media(f"file://{quote(str(spaced))}", settings, tmp_path) == spaced
    assert await fetch_media(f"file://localhost{root}/clip.wav", settings, tmp_path) \
        == root / "clip.wav"
    assert names(tmp_path) == ["media", "secret.txt"]  # read in place: nothing copied


@pytest.mark.parametrize("path", [
    "{root}/../secret.txt",
    "{root}/sub/../../secret.txt",
    "{root}/./../secret.txt",
    "/etc/passwd",
    "{root}-evil/clip.wav",       # shares the root's prefix as a string, not as a path
])
@pytest.mark.usefixtures("lookalike")
async def test_paths_outside_the_roots_are_forbidden(path: str, root: Path, settings: Settings,
                                                     tmp_path: Path) -> None:
    url = path.format(root=root)
    assert await refused(url, settings, tmp_path) == "forbidden_media_url"
    assert await refused(f"file://{url}", settings, tmp_path) == "forbidden_media_url"


async def test_symlink_escaping_a_root_is_forbidden(root: Path, settings: Settings,
                                                    tmp_path: Path) -> None:
    (root / "innocent.wav").symlink_to(tmp_path / "secret.txt")
    (root / "dir").symlink_to(tmp_path, target_is_directory=True)
    assert await refused(str(root / "innocent.wav"), settings, tmp_path) \
        == "forbidden_media_url"
    assert await refused(str(root / "dir" / "secret.txt"), settings, tmp_path) \
        == "forbidden_media_url"
    assert await refused(f"file://{root}/innocent.wav", settings, tmp_path) \
        == "forbidden_media_url"


async def test_symlinks_inside_the_roots_are_followed(root: Path, tmp_path: Path) -> None:
    (root / "alias.wav").symlink_to(root / "clip.wav")
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(root, target_is_directory=True)
    settings = Settings(media_roots=[str(linked_root)])
    assert await fetch_media(str(root / "alias.wav"), settings, tmp_path) == root / "clip.wav"
    assert await fetch_media(str(linked_root / "clip.wav"), settings, tmp_path) \
        == root / "clip.wav"


async def test_symlink_loop_is_refused(root: Path, settings: Settings, tmp_path: Path) -> None:
    (root / "a").symlink_to(root / "b")
    (root / "b").symlink_to(root / "a")
    assert await refused(str(root / "a"), settings, tmp_path) in ("forbidden_media_url",
                                                                  "media_not_found")


@pytest.mark.parametrize("url", [
    "clip.wav",                       # relative: no root to anchor it
    "media/clip.wav",
    "//fileserver/share/clip.wav",    # a host, not a local path
    "file://fileserver{root}/clip.wav",
    "FILE:///etc/passwd",
    "{root}/clip.wav\x00.txt",
])
async def test_malformed_local_references_are_forbidden(url: str, root: Path,
                                                        settings: Settings,
                                                        tmp_path: Path) -> None:
    assert await refused(url.format(root=root), settings, tmp_path) == "forbidden_media_url"


async def test_no_roots_configured_means_no_local_files(root: Path, tmp_path: Path) -> None:
    assert await refused(str(root / "clip.wav"), Settings(), tmp_path) == "forbidden_media_url"


async def test_directories_missing_and_oversized_files(root: Path, settings: Settings,
                                                       tmp_path: Path) -> None:
    (root / "sub").mkdir()
    (root / "big.wav").write_bytes(b"x" * 1001)
    assert await refused(str(root / "sub"), settings, tmp_path) == "forbidden_media_url"
    assert await refused(str(root), settings, tmp_path) == "forbidden_media_url"
    assert await refused(str(root / "nope.wav"), settings, tmp_path) == "media_not_found"
    assert await refused(str(root / "big.wav"), settings, tmp_path) == "media_too_large"


@pytest.mark.parametrize("url", [
    "ftp://example.org/clip.mp3",
    "gopher://example.org/1/clip",
    "data:audio/wav;base64,UklGRg==",
    "javascript:alert(1)",
    "dict://127.0.0.1:11211/stats",
    "ldap://example.org/x",
    "jar:file:///tmp/x.jar!/a",
    "smb://server/share/a.wav",
    "c:/media/clip.wav",
])
async def test_other_schemes_are_forbidden(url: str, settings: Settings,
                                           tmp_path: Path) -> None:
    assert await refused(url, settings, tmp_path) == "forbidden_media_url"


async def test_malformed_remote_urls(settings: Settings, tmp_path: Path) -> None:
    assert await refused("s3://bucket-only", settings, tmp_path) == "invalid_media_url"
    assert await refused("s3:///key", settings, tmp_path) == "invalid_media_url"
    assert await refused("http:///clip.wav", settings, tmp_path) == "invalid_media_url"


# --- http(s) ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Starts a local HTTP server answering every path with a given handler."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_http_download(server: Callable[[Handler], Awaitable[str]], settings: Settings,
                             tmp_path: Path) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(body=b"a" * 1000)

    base = await server(ok)
    path = await fetch_media(f"{base}/x/clip.mp3?sig=1", settings, tmp_path)
    assert path == tmp_path / "media.mp3"
    assert path.read_bytes() == b"a" * 1000


async def test_http_size_limit_is_enforced_while_streaming(
        server: Callable[[Handler], Awaitable[str]], settings: Settings,
        tmp_path: Path) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # no Content-Length: only counting can stop it
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(50):
            await resp.write(b"b" * 100)
        await resp.write_eof()
        return resp

    async def declared(_: web.Request) -> web.Response:
        return web.Response(body=b"c" * 5000)

    assert await refused(f"{await server(chunked)}/a.wav", settings, tmp_path) \
        == "media_too_large"
    assert not (tmp_path / "media.wav").exists()  # the partial download is removed
    assert await refused(f"{await server(declared)}/a.wav", settings, tmp_path) \
        == "media_too_large"


@pytest.mark.parametrize(("status", "reason"), [(404, "media_not_found"),
                                                (403, "media_not_found"),
                                                (400, "media_rejected")])
async def test_http_client_errors_are_permanent(
        status: int, reason: str, server: Callable[[Handler], Awaitable[str]],
        settings: Settings, tmp_path: Path) -> None:
    async def fail(_: web.Request) -> web.Response:
        return web.Response(status=status)

    assert await refused(f"{await server(fail)}/a.wav", settings, tmp_path) == reason


async def test_http_server_errors_and_stalls_are_transient(
        server: Callable[[Handler], Awaitable[str]], settings: Settings,
        tmp_path: Path) -> None:
    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": "7"})

    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"d" * 10)
        await asyncio.wait_for(release.wait(), 10)  # stalls until the client gave up
        return resp

    with pytest.raises(TransientError) as err:
        await fetch_media(f"{await server(broken)}/a.wav", settings, tmp_path)
    assert (err.value.reason, err.value.delay_s) == ("media_unavailable", 7.0)
    try:
        with pytest.raises(TransientError, match="Timeout"):
            await fetch_media(f"{await server(stall)}/a.wav", settings, tmp_path)
    finally:
        release.set()


async def test_http_connection_refused_is_transient(settings: Settings,
                                                    tmp_path: Path) -> None:
    with pytest.raises(TransientError) as err:
        await fetch_media("http://127.0.0.1:9/a.wav", settings, tmp_path)
    assert err.value.reason == "media_unavailable"
