"""A canary HTTP server for SSRF tests: it answers anything and remembers every request, so a
test can prove that a worker refused a URL *before* dialling it ("canary hits 0"), not only
that the fetch failed. It also serves media, redirects and playlists on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Canary:
    """Listens on ``host`` (IPv4 or IPv6 loopback). ``routes`` maps a path to ``(status,
    headers, body)``; any other path answers 200 with a few bytes."""

    host: str = "127.0.0.1"
    routes: dict[str, tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _extra: list[web.TCPSite] = field(default_factory=list)

    async def start(self, *also_on: str) -> Canary:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for host in also_on:  # the same port on other loopback addresses (e.g. ::1)
            extra = web.TCPSite(self._runner, host, self.port)
            await extra.start()
            self._extra.append(extra)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, path: str = "/a.mp3", host: str | None = None) -> str:
        shown = host or self.host
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        return f"http://{shown}:{self.port}{path}"

    async def _answer(self, request: web.Request) -> web.Response:
        self.hits.append(f"{request.method} {request.host}{request.path_qs}")
        status, headers, body = self.routes.get(request.path, (200, {}, b"ID3canary"))
        return web.Response(status=status, headers=headers, body=body)
