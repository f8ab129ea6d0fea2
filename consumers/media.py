"""Media access shared by the handlers: ``s3://``, ``http(s)://`` and local files.

A media URL comes from a producer, i.e. from outside, and asks this worker to read something
on its behalf. So everything not explicitly allowed is refused: only the schemes below; local
files only under ``settings.media_roots``, judged after symlinks and ``..`` are resolved (a
link inside a root pointing out of it is outside); ``http(s)`` only to public addresses or the
deployment's opt-ins, checked on the address dialled and on every redirect hop
(``netpolicy``); ``s3://`` only from ``settings.media_s3_buckets``; downloads bounded in size
while streaming (``Content-Length`` may be absent or lie, and gzip may expand) and in time.

Outcomes: a URL that may never be read -> ``PermanentError("forbidden_media_url")``; missing or
denied (404/403) -> ``PermanentError("media_not_found")``; larger than ``media_max_bytes`` ->
``PermanentError("media_too_large")``; 5xx, throttling, connection trouble, timeouts ->
``TransientError("media_unavailable")``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from mlpipe.errors import PermanentError, TransientError
from mlpipe.settings import Settings

from .netpolicy import (
    FORBIDDEN_REASON,
    DestinationPolicy,
    Refusal,
    connector_kwargs,
    refused,
)

CHUNK_BYTES = 1 << 16

#: S3 error codes that mean "this object is not there for us", whatever the retries.
_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "403", "AccessDenied",
                 "AllAccessDisabled", "InvalidObjectState"}
_S3_TRANSIENT = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                 "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed"}


async def fetch_media(url: str, settings: Settings, dest_dir: Path, *,
                      resolver: AbstractResolver | None = None) -> Path:
    """Make the media at ``url`` readable as a local file and return its path.

    Remote media is downloaded into ``dest_dir`` (which the caller owns and cleans up); an
    allowed local file is returned in place, resolved, without a copy. ``resolver`` is the
    name resolution that ``http(s)`` hosts go through (the system's by default); whatever it
    answers is checked against the destination policy before it is dialled."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("", "file"):
        return local_media_path(url, settings)
    if scheme in ("http", "https"):
        return await _fetch_http(url, settings, dest_dir, resolver)
    if scheme == "s3":
        return await _fetch_s3(url, settings, dest_dir)
    raise PermanentError(f"media URL scheme {scheme!r} is not allowed",
                         reason="forbidden_media_url")


# --- local files ------------------------------------------------------------------------------


def local_media_path(url: str, settings: Settings) -> Path:
    """The resolved path of a plain path or ``file://`` URL, if it is a regular file under one
    of ``settings.media_roots``; refused otherwise (no roots configured: all refused)."""
    raw = _local_path_text(url)
    try:
        if "\x00" in raw or not Path(raw).is_absolute():
            raise ValueError("not an absolute path")
        resolved = Path(raw).resolve()
        roots = [Path(r).resolve() for r in settings.media_roots]
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes, relative
        raise PermanentError(f"local media path {url!r} refused: {exc}",
                             reason="forbidden_media_url") from exc
    if not any(resolved.is_relative_to(root) for root in roots):
        raise PermanentError(f"local media path {url!r} is outside the media roots",
                             reason="forbidden_media_url")
    if not resolved.exists():
        raise PermanentError(f"local media {url!r} does not exist", reason="media_not_found")
    if not resolved.is_file():  # a directory, FIFO or device would hang or mislead the tools
        raise PermanentError(f"local media {url!r} is not a regular file",
                             reason="forbidden_media_url")
    size = resolved.stat().st_size
    if size > settings.media_max_bytes:
        raise PermanentError(f"local media {url!r} has {size} bytes, more than "
                             f"{settings.media_max_bytes}", reason="media_too_large")
    return resolved


def _local_path_text(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        if parts.netloc:  # "//host/share/x": not a local path
            raise PermanentError(f"media path {url!r} names a host", reason="forbidden_media_url")
        return url
    if parts.netloc not in ("", "localhost"):
        raise PermanentError(f"file URL {url!r} names a remote host",
                             reason="forbidden_media_url")
    return unquote(parts.path)


# --- downloads --------------------------------------------------------------------------------


async def _write_limited(chunks: AsyncIterator[bytes], target: Path, max_bytes: int) -> None:
    """Stream ``chunks`` into ``target``, giving up as soon as more than ``max_bytes`` came."""
    written = 0
    try:
        with target.open("wb") as out:
            async for chunk in chunks:
                written += len(chunk)
                if written > max_bytes:
                    raise PermanentError(f"media is larger than {max_bytes} bytes",
                                         reason="media_too_large")
                await asyncio.to_thread(out.write, chunk)
    except BaseException:
        await asyncio.to_thread(target.unlink, missing_ok=True)
        raise


def _target(dest_dir: Path, url_path: str) -> Path:
    """``media`` plus the URL's extension when it looks like one (a hint for the demuxer;
    never a path component taken from the URL)."""
    suffix = Path(url_path).suffix
    return dest_dir / ("media" + (suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""))


#: Statuses whose ``Location`` mlpipe follows itself, hop by hop, through the same checks.
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def _fetch_http(url: str, settings: Settings, dest_dir: Path,
                      resolver: AbstractResolver | None) -> Path:
    policy = DestinationPolicy(settings)
    target = _target(dest_dir, _checked_http_url(url, url, policy).path)
    t = settings.media_timeout_s
    # No total limit: a large file on a slow link may take long; the handler's timeout bounds
    # the whole run, these bound each wait so a stalled server is noticed.
    timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
    # trust_env stays off: a proxy would dial on our behalf, past the resolver's check.
    session = aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(**connector_kwargs(policy, resolver)),
        trust_env=False)
    try:
        async with session, await _follow(session, url, settings, policy) as resp:
            _check_http_status(resp, url)
            declared = resp.content_length
            if declared is not None and declared > settings.media_max_bytes:
                raise PermanentError(f"media {url!r} declares {declared} bytes, more than "
                                     f"{settings.media_max_bytes}", reason="media_too_large")
            await _write_limited(resp.content.iter_chunked(CHUNK_BYTES), target,
                                 settings.media_max_bytes)
    except aiohttp.InvalidURL as exc:
        raise PermanentError(f"media URL {url!r} is malformed: {exc}",
                             reason="invalid_media_url") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise TransientError(f"fetching {url!r}: {type(exc).__name__}: {exc}",
                             reason="media_unavailable") from exc
    return target


async def _follow(session: aiohttp.ClientSession, url: str, settings: Settings,
                  policy: DestinationPolicy) -> aiohttp.ClientResponse:
    """GET ``url``, following at most ``media_max_redirects`` redirects. aiohttp's own
    following would dial each hop unchecked; here each hop's URL passes the same checks as
    the first (and its connection the resolver's), and a hop may not change to another
    scheme or downgrade https to http."""
    current = url
    for _ in range(settings.media_max_redirects + 1):
        resp = await session.get(current, allow_redirects=False)
        location = resp.headers.get("Location")
        if resp.status not in _REDIRECTS or location is None:
            return resp
        resp.release()
        current = redirect_hop(url, current, location, policy)
    raise PermanentError(f"media {url!r}: more than {settings.media_max_redirects} redirects",
                         reason=FORBIDDEN_REASON)


def redirect_hop(origin: str, current: str, location: str, policy: DestinationPolicy) -> str:
    """The URL a redirect from ``current`` to ``location`` leads to, if it may be followed:
    http(s) only, never from https down to http, its host checked like the first one's."""
    nxt = urljoin(current, location)
    if urlsplit(current).scheme.lower() == "https" and urlsplit(nxt).scheme.lower() != "https":
        raise refused(origin, urlsplit(nxt).hostname or "",
                      Refusal("redirect_downgrade", nxt[:300]), hint="")
    _checked_http_url(origin, nxt, policy)
    return nxt


def _checked_http_url(origin: str, url: str, policy: DestinationPolicy) -> SplitResult:
    """``url`` (the first or a redirect hop of ``origin``) split, if its scheme is http(s)
    and its host is not refused without a lookup; names are checked again when resolved."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise refused(origin, parts.hostname or "", Refusal("scheme", parts.scheme[:20]),
                      hint="")
    try:
        host = parts.hostname
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise PermanentError(f"media URL {url[:300]!r} is malformed: {exc}",
                             reason="invalid_media_url") from exc
    if not host:
        raise PermanentError(f"media URL {url[:300]!r} has no host", reason="invalid_media_url")
    if parts.username is not None or parts.password is not None:
        raise refused(origin, host, Refusal("credentials_in_url", host), hint="")
    policy.check_host(origin, host)
    return parts


def _check_http_status(resp: aiohttp.ClientResponse, url: str) -> None:
    status = resp.status
    if 200 <= status < 300:
        return
    if status in (401, 403, 404, 410):
        raise PermanentError(f"media {url!r}: HTTP {status}", reason="media_not_found")
    if status >= 500 or status in (408, 425, 429):
        raise TransientError(f"media {url!r}: HTTP {status}", reason="media_unavailable",
                             delay_s=_retry_after(resp.headers.get("Retry-After")))
    raise PermanentError(f"media {url!r}: HTTP {status}", reason="media_rejected")


def _retry_after(raw: str | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _parse_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/key``; the key is taken verbatim (S3 keys may contain ``?`` and ``#``,
    which a URL parser would cut off)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise PermanentError(f"S3 URL {url!r} needs a bucket and a key",
                             reason="invalid_media_url")
    return bucket, key


async def _fetch_s3(url: str, settings: Settings, dest_dir: Path) -> Path:
    bucket, key = _parse_s3(url)
    if bucket not in settings.media_s3_buckets:
        # Before any client exists: the worker's credentials read only the listed buckets.
        raise refused(url, bucket, Refusal("s3_bucket_not_listed", bucket),
                      hint="list the bucket in MLPIPE_MEDIA_S3_BUCKETS if it is yours")
    target = _target(dest_dir, key)
    t = settings.media_timeout_s
    # the AWS SDK only for s3:// media (its import alone is tens of megabytes)
    from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
    from aiobotocore.session import get_session  # type: ignore[import-untyped]
    from botocore.exceptions import (  # type: ignore[import-untyped]
        BotoCoreError,
        ClientError,
        NoCredentialsError,
    )

    config = AioConfig(connect_timeout=t, read_timeout=t,
                       retries={"max_attempts": 2, "mode": "standard"})
    try:
        async with get_session().create_client(
                "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
                config=config) as s3:
            obj = await s3.get_object(Bucket=bucket, Key=key)
            async with obj["Body"] as body:
                declared = int(obj.get("ContentLength") or 0)
                if declared > settings.media_max_bytes:
                    raise PermanentError(f"media {url!r} has {declared} bytes, more than "
                                         f"{settings.media_max_bytes}", reason="media_too_large")
                await _write_limited(body.iter_chunks(CHUNK_BYTES), target,
                                     settings.media_max_bytes)
    except ClientError as exc:
        raise _s3_error(url, exc) from exc
    except NoCredentialsError as exc:
        raise PermanentError(f"fetching {url!r}: no AWS credentials configured",
                             reason="media_credentials") from exc
    except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
        raise TransientError(f"fetching {url!r}: {type(exc).__name__}: {exc}",
                             reason="media_unavailable") from exc
    return target


def _s3_error(url: str, exc: Any) -> PermanentError | TransientError:
    """``exc``: a botocore ``ClientError``."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = f"fetching {url!r}: S3 {code or status}: {exc}"
    if code in _S3_NOT_FOUND or status in (403, 404):
        return PermanentError(message, reason="media_not_found")
    if code in _S3_TRANSIENT or status >= 500 or status == 429:
        return TransientError(message, reason="media_unavailable")
    return PermanentError(message, reason="media_rejected")
