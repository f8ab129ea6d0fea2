"""The console's guards over plain HTTP (no browser): the login cookie's attributes, where a
login may send you, read and admin tokens, the loopback mode without tokens, the CSRF check
on replay, the security headers, and the cookie standing in for a bearer on /v1/events."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mlpipe.api import ApiConfig, ApiServer
from mlpipe.search import VectorLike

READER = "reader-token-console-http1"
ADMIN = "admin-token-console-http01"


async def no_embedder(texts: list[str]) -> list[VectorLike]:
    raise AssertionError("no search here")


def config(pg_dsn: str, pg_schema: str, **overrides: Any) -> ApiConfig:
    base: dict[str, Any] = {"database_url": pg_dsn, "database_schema": pg_schema,
                            "host": "127.0.0.1", "port": 0, "tokens": (READER,),
                            "admin_tokens": (ADMIN,)}
    return ApiConfig(**{**base, **overrides})


@pytest.fixture
async def server(pg_dsn: str, pg_schema: str) -> AsyncIterator[ApiServer]:
    async with ApiServer(config(pg_dsn, pg_schema), embedder=no_embedder) as api:
        yield api


def session(base: str) -> aiohttp.ClientSession:
    # a jar that keeps cookies for an IP address host, as a browser does
    return aiohttp.ClientSession(base, cookie_jar=aiohttp.CookieJar(unsafe=True))


async def login(client: aiohttp.ClientSession, token: str, next_: str = "/ui",
                headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
    return await client.post("/ui/login", data={"token": token, "next": next_},
                             allow_redirects=False, headers=headers)


async def test_login_cookie_and_redirects(server: ApiServer) -> None:
    async with session(server.url) as client:
        async with client.get("/ui/costs?window=7d", allow_redirects=False) as stranger:
            assert stranger.status == 303
            assert stranger.headers["Location"] == "/ui/login?next=/ui/costs%3Fwindow%3D7d"
        async with await login(client, "wrong-token-00000000") as refused:
            assert refused.status == 401
            assert "unknown token" in await refused.text()
        async with await login(client, ADMIN, "/ui/costs?window=7d") as ok:
            assert ok.status == 303
            assert ok.headers["Location"] == "/ui/costs?window=7d"
            cookie = ok.headers["Set-Cookie"]
            assert cookie.startswith(f"mlpipe_token={ADMIN};")
            for attribute in ("HttpOnly", "SameSite=strict", "Path=/"):
                assert attribute.lower() in cookie.lower(), cookie
            assert "secure" not in cookie.lower()  # plain http on loopback
        async with client.get("/ui/costs") as page:
            assert page.status == 200
            csp = page.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp
            assert "frame-ancestors 'none'" in csp
    async with session(server.url) as client:
        for target in ("https://evil.example/", "//evil.example/ui", "/docs"):
            async with await login(client, READER, target) as away:
                assert away.headers["Location"] == "/ui", target
        async with await login(client, READER, headers={"X-Forwarded-Proto": "https"}) as proxied:
            assert "secure" in proxied.headers["Set-Cookie"].lower()


async def test_read_token_and_csrf(server: ApiServer) -> None:
    async with session(server.url) as client:
        (await login(client, READER)).release()
        for path in ("/ui/costs", "/ui/dead-letters"):
            async with client.get(path) as page:
                assert page.status == 403, path
                assert "needs an admin token" in await page.text()
        async with client.get("/ui/workflows") as page:
            assert page.status == 200
    async with session(server.url) as client:
        (await login(client, ADMIN)).release()
        async with client.get("/ui") as page:
            csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', await page.text())
            assert csrf is not None
        for forged in ({}, {"csrf": "0" * 64}, {"csrf": csrf.group(1)[:-1] + "x"}):
            async with client.post("/ui/dead-letters/replay",
                                   data={**forged, "reason": "content_too_short"},
                                   allow_redirects=False) as refused:
                assert refused.status == 403, forged
        async with client.post("/ui/logout", data={"csrf": csrf.group(1)},
                               allow_redirects=False) as out:
            assert out.status == 303
        async with client.get("/ui", allow_redirects=False) as after:
            assert after.status == 303  # the cookie is gone


async def test_without_tokens_reads_open_admin_closed(pg_dsn: str, pg_schema: str) -> None:
    open_config = config(pg_dsn, pg_schema, tokens=(), admin_tokens=())
    async with ApiServer(open_config, embedder=no_embedder) as api, session(api.url) as client:
        for path in ("/ui", "/ui/workflows", "/ui/search"):
            async with client.get(path, allow_redirects=False) as page:
                assert page.status == 200, path
        for path in ("/ui/costs", "/ui/dead-letters"):
            async with client.get(path) as page:
                assert page.status == 403, path
                assert "MLPIPE_API_ADMIN_TOKENS" in await page.text()
        async with await login(client, ADMIN) as nothing:
            assert nothing.status == 401
            assert "no tokens are configured" in await nothing.text()


async def test_events_take_the_cookie(server: ApiServer) -> None:
    """The console's EventSource cannot send a header: the cookie passes the token check (this
    server has no broker, so the next answer is 503, not 401)."""
    async with session(server.url) as client:
        async with client.get("/v1/events") as anonymous:
            assert anonymous.status == 401
        (await login(client, READER)).release()
        async with client.get("/v1/events") as with_cookie:
            assert with_cookie.status == 503
            assert (await with_cookie.json())["error"] == "unavailable"
        # the other endpoints still want the header
        async with client.get("/v1/shares/x/results") as results:
            assert results.status == 401
