"""The daemon's HTTP side: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for
Kubernetes.

* ``/healthz`` (liveness) answers 200 while the event loop turns: a heartbeat task stamps the
  time every second, and a stamp older than ``stall_after_s`` means the loop is blocked (a
  handler doing CPU work without ``to_thread``). A dead broker is *not* a liveness failure:
  restarting the pod would not bring the broker back.
* ``/readyz`` (readiness) answers 200 only when the broker connection is up, every queue's
  subscription is active (consumers that silently never came back after a broker restart are
  a known failure mode), and each extra check (Redis, Postgres) passes within its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mlpipe.observability.metrics import Metrics

log = structlog.get_logger(__name__)

ReadinessCheck = Callable[[], Awaitable[None]]
StatusSource = Callable[[], dict[str, Any]]


class HealthServer:
    def __init__(self, metrics: Metrics, status: StatusSource, *, host: str, port: int,
                 checks: dict[str, ReadinessCheck] | None = None,
                 refresh: Callable[[], None] | None = None,
                 collect: Callable[[], Awaitable[None]] | None = None,
                 check_timeout_s: float = 2.0,
                 stall_after_s: float = 10.0) -> None:
        self._metrics = metrics
        self._status = status
        self._checks = checks or {}
        self._refresh = refresh
        self._collect = collect
        self._host, self._port = host, port
        self._check_timeout = check_timeout_s
        self._stall_after = stall_after_s
        self._runner: web.AppRunner | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._beat = time.monotonic()
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_view)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="health-heartbeat")

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat_task
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(1.0)

    async def _metrics_view(self, _request: web.Request) -> web.Response:
        if self._refresh is not None:
            self._refresh()
        if self._collect is not None:
            # Gauges read from the store; a slow or down database must not fail the scrape
            # (the broker and task series still matter most then): keep the last values.
            try:
                async with asyncio.timeout(self._check_timeout):
                    await self._collect()
            except Exception as exc:
                log.warning("metrics.collect_failed", error=repr(exc))
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        lag = time.monotonic() - self._beat
        ok = lag < self._stall_after
        return web.json_response({"alive": ok, "heartbeatAgeS": round(lag, 3)},
                                 status=200 if ok else 503)

    async def _readyz(self, _request: web.Request) -> web.Response:
        status = self._status()
        problems: dict[str, str] = {}
        if not status.get("connected"):
            problems["broker"] = "not connected"
        for queue, consuming in status.get("consuming", {}).items():
            if not consuming:
                problems[f"consumer:{queue}"] = "not consuming"
        if status.get("stopping"):
            problems["daemon"] = "stopping"
        results = await asyncio.gather(*(self._run_check(c) for c in self._checks.values()))
        for name, error in zip(self._checks, results, strict=True):
            if error is not None:
                problems[name] = error
        return web.json_response({"ready": not problems, "problems": problems},
                                 status=200 if not problems else 503)

    async def _run_check(self, check: ReadinessCheck) -> str | None:
        try:
            async with asyncio.timeout(self._check_timeout):
                await check()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
        return None
