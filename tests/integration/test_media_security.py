"""Hostile media URLs against real servers (issue 14): a canary HTTP server on loopback counts
every request, so each refusal is shown to happen before anything is dialled; redirects come
from a real redirecting server; S3 refusals from a real (moto) S3 server behind a counting
proxy; HLS and concat files through the real ffprobe/ffmpeg; and the whole path through a
running daemon, where each refusal must be dead-lettered at once with its reason."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from consumers.media import fetch_media
from consumers.netpolicy import DestinationPolicy, GuardedResolver
from consumers.transcribe import register
from consumers.transcribe.audio import extract_audio
from consumers.transcribe.probe import probe_media
from mlpipe.contract.models import TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.errors import PermanentError
from mlpipe.handlers import Registry
from mlpipe.producer import Producer
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import running_daemon, wait_for
from tests.canary import Canary
from tests.conftest import REDIS_URL
from tests.media_fixtures import speech_clip

#: 127.0.0.1 and ::1 as a publisher might spell them.
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "localhost", "LOCALHOST", "localhost.", "media.localhost", "2130706433",
    "0x7f000001", "0X7F000001", "0177.0.0.1", "0x7f.1", "127.1", "127.0.0.1.", "017700000001",
    "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::127.0.0.1]",
]
#: Addresses that must be refused without a lookup or a connection (never dialled here).
NEVER_DIALLED = {
    "169.254.169.254": "link local", "[fd00:ec2::254]": "cloud metadata",
    "10.0.0.7": "private", "172.16.1.1": "private", "192.168.0.1": "private",
    "100.64.0.1": "carrier grade nat", "0.0.0.0": "unspecified", "[::]": "unspecified",
    "224.0.0.1": "multicast", "255.255.255.255": "broadcast", "240.0.0.1": "reserved",
    "[fc00::1]": "unique local", "[fe80::1]": "link local", "[::ffff:10.0.0.1]": "private",
    "[::ffff:169.254.169.254]": "link local", "[64:ff9b::a9fe:a9fe]": "link local",
    "[2002:a9fe:a9fe::1]": "link local", "2852039166": "link local",
    "0xa9fea9fe": "link local", "0251.0376.0251.0376": "link local", "10.1": "private",
}


class HostsResolver(AbstractResolver):
    """Name resolution from a table, as /etc/hosts or a split-horizon DNS would answer; with
    several answers per name it gives the next one on each lookup (a rebinding DNS server)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self._table = table
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answers = self._table.get(host)
        if not answers:
            raise OSError(f"{host}: name not known")
        address = answers[min(len(self.lookups), len(answers) - 1)]
        self.lookups.append(address)
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [{"hostname": host, "host": address, "port": port, "family": fam, "proto": 0,
                 "flags": 0}]

    async def close(self) -> None:
        return None


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    server = await Canary().start("::1")
    yield server
    await server.stop()


@pytest.fixture
async def redirector() -> AsyncIterator[Canary]:
    """A redirecting server on 127.0.0.2, which the tests that use it opt in by network."""
    server = await Canary(host="127.0.0.2").start()
    yield server
    await server.stop()


async def reason_of(url: str, settings: Settings, tmp_path: Path,
                    resolver: AbstractResolver | None = None) -> str:
    with pytest.raises(PermanentError) as err:
        await fetch_media(url, settings, tmp_path, resolver=resolver)
    return f"{err.value.reason}: {err.value}"


async def test_loopback_in_every_spelling_is_refused_before_dialling(
        canary: Canary, tmp_path: Path) -> None:
    settings = Settings(media_timeout_s=2)
    for host in LOOPBACK_SPELLINGS:
        outcome = await reason_of(f"http://{host}:{canary.port}/a.mp3", settings, tmp_path)
        assert outcome.startswith("forbidden_media_url: "), (host, outcome)
        assert "loopback" in outcome, (host, outcome)
        outcome = await reason_of(f"https://{host}:{canary.port}/a.mp3", settings, tmp_path)
        assert outcome.startswith("forbidden_media_url: "), (host, outcome)
    assert canary.hits == []
    # the counter works: the same server, opted in, is fetched
    opted = Settings(media_timeout_s=2, media_allow_private_networks=["127.0.0.0/8", "::1/128"])
    await fetch_media(canary.url(host="::1"), opted, tmp_path)
    await fetch_media(canary.url("/b.mp3", host="127.0.0.1"), opted, tmp_path)
    assert len(canary.hits) == 2
    # a legacy numeric spelling is never dialled, even of an opted-in address
    outcome = await reason_of(canary.url(host="0x7f000001"), opted, tmp_path)
    assert outcome.startswith("invalid_media_url: ")
    assert len(canary.hits) == 2


def test_internal_addresses_are_refused_without_a_connection() -> None:
    policy = DestinationPolicy(Settings())
    for host, rule in NEVER_DIALLED.items():
        with pytest.raises(PermanentError, match=rule) as err:
            policy.check_host(f"http://{host}/x.mp3", host)
        assert err.value.reason == "forbidden_media_url"
    for public in ("93.184.216.34", "[2606:4700::1]", "[::ffff:8.8.8.8]", "media.example.com"):
        policy.check_host(f"http://{public}/x.mp3", public)  # no lookup, no error


def test_numeric_hosts_that_are_no_address_are_refused() -> None:
    policy = DestinationPolicy(Settings())
    for host in ("1.2.3.4.5", "256.1.1.1", "0x1.0x2.0x3.0x100", "media.123", "08.0.0.1",
                 "4294967296", "[::ffff:1.2.3]"):
        with pytest.raises(PermanentError) as err:
            policy.check_host(f"http://{host}/", host)
        assert err.value.reason == "forbidden_media_url", host


async def test_a_name_is_checked_on_the_address_it_resolves_to(canary: Canary,
                                                               tmp_path: Path) -> None:
    hosts = HostsResolver({"media.corp.test": ["127.0.0.1"], "v6.corp.test": ["::1"]})
    settings = Settings(media_timeout_s=2)
    for name in ("media.corp.test", "v6.corp.test"):
        outcome = await reason_of(canary.url(host=name), settings, tmp_path, hosts)
        assert outcome.startswith("forbidden_media_url: ")
        assert "loopback" in outcome
    assert canary.hits == []


async def test_rebinding_a_name_between_lookups_does_not_get_through(
        canary: Canary, tmp_path: Path) -> None:
    """A pre-check's lookup saw a public address; the lookup made for the connection answers
    127.0.0.1. The address actually dialled is the one checked, so it is refused."""
    rebinding = HostsResolver({"rebind.test": ["93.184.216.34", "127.0.0.1"]})
    policy = DestinationPolicy(Settings())
    [first] = await GuardedResolver(policy, rebinding).resolve("rebind.test", canary.port)
    assert first["host"] == "93.184.216.34"  # what a check before the fetch would have seen
    outcome = await reason_of(canary.url(host="rebind.test"), Settings(media_timeout_s=2),
                              tmp_path, rebinding)
    assert outcome.startswith("forbidden_media_url: ")
    assert "127.0.0.1" in outcome
    assert rebinding.lookups == ["93.184.216.34", "127.0.0.1"]
    assert canary.hits == []


async def test_a_name_with_one_private_answer_among_public_ones_is_refused(
        canary: Canary, tmp_path: Path) -> None:
    class TwoAnswers(HostsResolver):
        async def resolve(self, host: str, port: int = 0,
                          family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
            return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET,
                     "proto": 0, "flags": 0} for a in ("93.184.216.34", "127.0.0.1")]

    outcome = await reason_of(canary.url(host="mixed.test"), Settings(media_timeout_s=2),
                              tmp_path, TwoAnswers({}))
    assert outcome.startswith("forbidden_media_url: ")
    assert canary.hits == []


async def test_opt_ins_let_the_same_urls_through(canary: Canary, tmp_path: Path) -> None:
    hosts = HostsResolver({"media.corp.test": ["127.0.0.1"], "cdn.corp.test": ["127.0.0.1"],
                           "localhost": ["127.0.0.1"]})
    by_host = Settings(media_timeout_s=2,
                       media_allowed_hosts=["127.0.0.1", "localhost", "*.corp.test"])
    for url in (canary.url(), canary.url(host="localhost"), canary.url(host="127.0.0.1"),
                canary.url(host="media.corp.test"), canary.url(host="cdn.corp.test")):
        path = await fetch_media(url, by_host, tmp_path, resolver=hosts)
        assert path.read_bytes() == b"ID3canary"
    by_network = Settings(media_timeout_s=2, media_allow_private_networks=["127.0.0.0/8"])
    await fetch_media(canary.url(host="127.0.0.1"), by_network, tmp_path)
    assert len(canary.hits) == 6
    # an allowed host does not open its neighbours
    outcome = await reason_of(canary.url(host="other.test"), by_host, tmp_path,
                              HostsResolver({"other.test": ["127.0.0.1"]}))
    assert outcome.startswith("forbidden_media_url: ")
    assert len(canary.hits) == 6


async def test_redirects_are_followed_hop_by_hop_through_the_same_checks(
        canary: Canary, redirector: Canary, tmp_path: Path) -> None:
    settings = Settings(media_timeout_s=2, media_allow_private_networks=["127.0.0.2/32"],
                        media_max_redirects=3)
    to_canary = [canary.url(), canary.url(host="localhost"), canary.url(host="0x7f000001"),
                 canary.url(host="[::ffff:127.0.0.1]"), "file:///etc/passwd",
                 "ftp://127.0.0.2/a.mp3", "gopher://127.0.0.1:6379/_FLUSHALL",
                 "http://169.254.169.254/latest/meta-data/"]
    for i, target in enumerate(to_canary):
        redirector.routes[f"/r{i}"] = (302, {"Location": target}, b"")
        outcome = await reason_of(redirector.url(f"/r{i}"), settings, tmp_path)
        assert outcome.startswith("forbidden_media_url: "), (target, outcome)
    assert canary.hits == []
    assert len(redirector.hits) == len(to_canary)  # each first hop was made, none after it

    # an allowed chain is followed (relative and absolute Locations, 301/307/308)
    redirector.routes.update({
        "/a": (301, {"Location": "/b"}, b""),
        "/b": (307, {"Location": redirector.url("/c")}, b""),
        "/c": (308, {"Location": "c.mp3"}, b""),
        "/c.mp3": (200, {}, b"media bytes"),
    })
    path = await fetch_media(redirector.url("/a"), settings, tmp_path)
    assert path.read_bytes() == b"media bytes"
    # ... up to media_max_redirects hops
    redirector.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    outcome = await reason_of(redirector.url("/loop"), settings, tmp_path)
    assert outcome.startswith("forbidden_media_url: ")
    assert "more than 3 redirects" in outcome
    assert redirector.hits.count(f"GET 127.0.0.2:{redirector.port}/loop") == 4


def test_a_redirect_may_not_leave_https_or_http() -> None:
    from consumers.media import redirect_hop

    policy = DestinationPolicy(Settings())
    url = "https://media.example.com/a.mp3"
    assert redirect_hop(url, url, "/b.mp3", policy) == "https://media.example.com/b.mp3"
    assert redirect_hop(url, url, "https://cdn.example.net/x", policy) \
        == "https://cdn.example.net/x"
    for location in ("http://media.example.com/a.mp3", "ftp://media.example.com/a.mp3",
                     "file:///etc/passwd", "//127.0.0.1/a.mp3", "data:audio/wav;base64,AA=="):
        with pytest.raises(PermanentError) as err:
            redirect_hop(url, url, location, policy)
        assert err.value.reason == "forbidden_media_url", location


# --- S3 ------------------------------------------------------------------------------------------


class CountingProxy:
    """A TCP relay in front of a server that counts the connections made through it."""

    def __init__(self, port: int) -> None:
        self._upstream = port
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_s3_only_from_listed_buckets(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from aiobotocore.session import get_session  # type: ignore[import-untyped]
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = CountingProxy(server.get_host_and_port()[1])
    await proxy.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        async with get_session().create_client("s3", endpoint_url=endpoint,
                                               region_name="us-east-1") as s3:
            for bucket in ("media", "secrets"):
                await s3.create_bucket(Bucket=bucket)
                await s3.put_object(Bucket=bucket, Key="a.wav", Body=b"RIFF" + bucket.encode())
        settings = Settings(s3_endpoint_url=f"http://127.0.0.1:{proxy.port}",
                            media_s3_buckets=["media"], media_timeout_s=5)
        for url in ("s3://secrets/a.wav", "s3://Media/a.wav", "s3://media.evil/a.wav",
                    "s3://other/../media/a.wav"):
            outcome = await reason_of(url, settings, tmp_path)
            assert outcome.startswith("forbidden_media_url: "), (url, outcome)
            assert "MLPIPE_MEDIA_S3_BUCKETS" in outcome
        assert proxy.connections == 0
        assert await reason_of("s3://secrets/a.wav", Settings(s3_endpoint_url=endpoint),
                               tmp_path) != ""  # no buckets listed: every bucket refused
        path = await fetch_media("s3://media/a.wav", settings, tmp_path)
        assert path.read_bytes() == b"RIFFmedia"
        assert proxy.connections >= 1  # the proxy does count what goes through it
    finally:
        await proxy.stop()
        server.stop()


# --- ffmpeg: playlists and other indirections ----------------------------------------------------


def playlists(root: Path, canary: Canary) -> dict[str, Path]:
    """Files that name other files or URLs inside them, each with an innocent extension
    too (the demuxer is chosen by content, not by name)."""
    segment = canary.url("/seg.ts")
    hls = ("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
           f"#EXTINF:10,\nfile:///etc/passwd\n#EXTINF:10,\n{segment}\n"
           f"#EXTINF:10,\n/etc/passwd\n#EXT-X-ENDLIST\n")
    concat = f"ffconcat version 1.0\nfile '/etc/passwd'\nfile '{segment}'\n"
    files = {"hls.m3u8": hls, "hls-renamed.mp3": hls, "concat.ffconcat": concat,
             "concat-renamed.wav": concat}
    out = {}
    for name, text in files.items():
        (root / name).write_text(text)
        out[name] = root / name
    return out


async def test_playlists_are_refused_by_ffprobe_and_ffmpeg(canary: Canary, media_root: Path,
                                                           tmp_path: Path) -> None:
    for name, path in playlists(media_root, canary).items():
        with pytest.raises(PermanentError) as err:
            await probe_media(path, 60)
        assert err.value.reason == "forbidden_media_format", (name, err.value)
        with pytest.raises(PermanentError) as err:  # even if a probe were skipped
            await extract_audio(path, tmp_path / "out.wav", 60)
        assert "not on whitelist" in str(err.value), (name, err.value)
    assert canary.hits == []
    # real media still passes the same gate
    clip = speech_clip(media_root / "speech.wav")
    info = await probe_media(clip, 60)
    assert info.duration_s > 1


# --- through the daemon --------------------------------------------------------------------------


async def test_daemon_dead_letters_every_refusal_at_once(
        canary: Canary, redirector: Canary, media_root: Path, broker_url: str, pg_dsn: str,
        pg_schema: str, lock_prefix: str, tmp_path: Path) -> None:
    settings = Settings(
        broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
        redis_url=REDIS_URL, lock_prefix=lock_prefix, media_roots=[str(media_root)],
        media_allow_private_networks=["127.0.0.2/32"], media_s3_buckets=["media"],
        openai_api_key="test", openai_base_url=canary.url("/v1", host="127.0.0.1"),
        media_timeout_s=2, retry=RetryPolicy(max_retries=3, base_delay_s=0.2, max_delay_s=0.5))
    redirector.routes["/to-canary"] = (302, {"Location": canary.url()}, b"")
    hls = playlists(media_root, canary)["hls-renamed.mp3"]
    expected: dict[str, tuple[str, str]] = {
        "v4": (canary.url(), "forbidden_media_url"),
        "name": (canary.url(host="localhost"), "forbidden_media_url"),
        "hex": (canary.url(host="0x7f000001"), "forbidden_media_url"),
        "decimal": (canary.url(host="2130706433"), "forbidden_media_url"),
        "mapped": (canary.url(host="[::ffff:127.0.0.1]"), "forbidden_media_url"),
        "v6": (canary.url(host="[::1]"), "forbidden_media_url"),
        "metadata": ("http://169.254.169.254/latest/meta-data/", "forbidden_media_url"),
        "redirect": (redirector.url("/to-canary"), "forbidden_media_url"),
        "bucket": ("s3://secrets/a.wav", "forbidden_media_url"),
        "hls": (str(hls), "forbidden_media_format"),
    }
    registry = Registry()
    register(registry, settings)
    tasks = [build_task(TaskType.TRANSCRIBE_WHISPER, share, {"mediaUrl": url})
             for share, (url, _) in expected.items()]
    async with Effects(settings) as effects, \
            running_daemon(settings, registry, "transcribe", executor=effects.executor) as d, \
            Producer(settings) as producer:
        for task in tasks:
            await producer.publish(task)
        await wait_for(lambda: d.status().tasks_done >= len(tasks), timeout=60,
                       message="every hostile task settled")
        dead = {e.share_id: e for e in await list_dead(settings)}
    got: dict[str | None, Any] = {s: (e.reason, e.attempts) for s, e in dead.items()}
    assert got == {share: (reason, 1) for share, (_, reason) in expected.items()}
    assert canary.hits == []  # no media request, and no API call either
    assert redirector.hits == [f"GET 127.0.0.2:{redirector.port}/to-canary"]
