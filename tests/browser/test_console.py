"""The ops console (``/ui``) in a real headless Chromium (Debian's, driven by Playwright's
Python API; ``playwright install`` is never run), against the real broker, Postgres and a
daemon running in-process: every page loads real data without a console error (a CSP
violation or a failed asset is one), a dead letter replayed from the page is stored by the
daemon, the live feed shows an event published during the test, a read token is refused the
admin pages, and a replay without the CSRF token is refused. Screenshots go to docs/img/."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from mlpipe.api import ApiConfig, ApiServer
from mlpipe.contract.models import Task, TaskType, build_task
from mlpipe.dlq import list_dead
from mlpipe.effects import Effects
from mlpipe.embedding.local import LocalEmbedder
from mlpipe.errors import PermanentError
from mlpipe.handlers import Cost, HandlerResult, Registry, TaskContext
from mlpipe.producer import Producer
from mlpipe.settings import Settings
from mlpipe.testing import running_daemon, wait_for
from tests.conftest import REDIS_URL
from tests.integration.test_api import BUDGETS, embedder_of, seed

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "img"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
READER = "reader-token-console-01"
ADMIN = "admin-token-console-001"


@pytest.fixture(scope="module")
def local_model(model_dir: str) -> LocalEmbedder:
    return LocalEmbedder(model_dir)


@pytest.fixture
def settings(broker_url: str, pg_dsn: str, pg_schema: str, lock_prefix: str) -> Settings:
    return Settings(broker_url=broker_url, database_url=pg_dsn, database_schema=pg_schema,
                    redis_url=REDIS_URL, lock_prefix=lock_prefix)


class Handler:
    """summarize_llm that refuses the shares in ``refuse`` (dead-lettered) until told not to."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()

    def registry(self) -> Registry:
        reg = Registry()

        @reg.handler(TaskType.SUMMARIZE_LLM)
        async def summarize(task: Task, ctx: TaskContext) -> HandlerResult:
            if task.share_id in self.refuse:
                raise PermanentError("the text is a shopping list", reason="content_too_short")
            return HandlerResult({"summary": f"summary of {task.share_id}"},
                                 costs=(Cost(120, "tokens", Decimal("0.000240"),
                                             "gpt-4o-mini"),))

        return reg


def task(share: str) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": f"The text of {share}, long enough to summarise."}})


@dataclasses.dataclass
class Stack:
    settings: Settings
    server: ApiServer
    handler: Handler
    producer: Producer
    pool: asyncpg.Pool

    async def stored(self, share: str) -> bool:
        return bool(await self.pool.fetchval(
            "SELECT count(*) FROM ml_results WHERE share_id = $1", share))


@pytest.fixture
async def stack(settings: Settings, pg_dsn: str, pg_schema: str,
                local_model: LocalEmbedder) -> AsyncIterator[Stack]:
    embed = embedder_of(local_model)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2, server_settings={
        "search_path": f"{pg_schema}, public"})
    assert pool is not None
    async with pool.acquire() as conn:
        await seed(conn, embed)
    handler = Handler()
    config = ApiConfig(database_url=pg_dsn, database_schema=pg_schema, host="127.0.0.1", port=0,
                       tokens=(READER,), admin_tokens=(ADMIN,), budgets=BUDGETS,
                       settings=settings)
    try:
        async with Effects(settings) as effects, \
                running_daemon(settings, handler.registry(), "summarize",
                               executor=effects.executor), \
                Producer(settings) as producer, ApiServer(config, embedder=embed) as server:
            yield Stack(settings, server, handler, producer, pool)
    finally:
        await pool.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        # root in a container: Chromium's sandbox needs user namespaces it may not have
        chromium = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


class Console:
    """One browser tab on the console, collecting every console error and page error."""

    def __init__(self, page: Page, base: str) -> None:
        self.page, self.base = page, base
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"{message.text} @ {message.location.get('url')}")

    async def open(self, path: str) -> None:
        response = await self.page.goto(self.base + path)
        assert response is not None, path
        assert response.ok, (path, response.status)
        self.clean(path)

    def clean(self, where: str) -> None:
        assert not self.errors, (where, self.errors)

    async def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)

    async def login(self, token: str) -> None:
        await self.page.goto(self.base + "/ui")
        assert "/ui/login" in self.page.url  # a stranger is sent to the login form
        await self.page.fill("#token", token)
        await self.page.click("button[type=submit]")
        await self.page.wait_for_url(self.base + "/ui")
        self.clean("login")


async def tab(browser: Browser, stack: Stack) -> Console:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    return Console(await context.new_page(), stack.server.url)


async def test_every_page_replay_and_live_feed(browser: Browser, stack: Stack) -> None:
    console = await tab(browser, stack)
    page = console.page
    await console.login(ADMIN)
    cookie = next(c for c in await page.context.cookies() if c["name"] == "mlpipe_token")
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")

    # Overview: queues from the broker, done counts from Postgres, the budget chart
    await page.wait_for_selector("#feed-status:has-text('live')")
    summarize_row = page.locator("tr", has=page.locator("code", has_text="ml.summarize"))
    assert (await summarize_row.first.locator("td").nth(2).inner_text()).strip() == "1"
    assert await page.locator("svg.chart rect.bar").count() >= 2
    # the live feed shows an event published now
    live = f"live-{uuid.uuid4().hex[:6]}"
    await stack.producer.publish(task(live))
    await page.wait_for_selector(f"#feed li:has-text('{live}')", timeout=15_000)
    console.clean("overview")
    await console.shot("overview")

    # Dead letters: one dies, is listed, replayed from the page after a dry run, then stored
    dead = f"dead-{uuid.uuid4().hex[:6]}"
    stack.handler.refuse.add(dead)
    await stack.producer.publish(task(dead))
    await page.wait_for_selector(f"#feed li.failed:has-text('{dead}')", timeout=15_000)
    await console.open("/ui/dead-letters")
    row = page.locator("tr", has=page.locator(f"a:has-text('{dead}')"))
    assert "content_too_short" in await row.inner_text()
    assert "shopping list" in await row.inner_text()
    await console.shot("dead-letters")
    stack.handler.refuse.discard(dead)
    await row.locator("input[type=checkbox]").check()
    await page.click("text=Replay selected…")
    await page.wait_for_selector("#dry-run")
    assert "Dry run: 1 message" in await page.inner_text("#dry-run")
    assert not await stack.stored(dead), "a dry run replays nothing"
    console.clean("replay dry run")
    await console.shot("replay-confirm")
    await page.click("#confirm-replay")
    await page.wait_for_selector("text=Replayed 1 message")
    await wait_for(lambda: stack.stored(dead), timeout=15, message="replayed task stored")
    await console.open("/ui/dead-letters")
    assert await page.locator(f"a:has-text('{dead}')").count() == 0

    # all dead letters of a reason at once, again after a dry-run count
    bulk = [f"bulk-{n}-{uuid.uuid4().hex[:6]}" for n in range(2)]
    stack.handler.refuse.update(bulk)
    for share in bulk:
        await stack.producer.publish(task(share))

    async def both_dead() -> bool:
        return len(await list_dead(stack.settings)) == 2

    await wait_for(both_dead, timeout=15, message="two dead letters")
    stack.handler.refuse.clear()
    await console.open("/ui/dead-letters?reason=content_too_short")
    await page.click("text=Replay all with reason")
    assert "Dry run: 2 messages" in await page.inner_text("#dry-run")
    await page.click("#confirm-replay")
    await page.wait_for_selector("text=Replayed 2 messages")
    for share in bulk:
        await wait_for(lambda s=share: stack.stored(s), timeout=15, message=f"{share} stored")

    # Workflows: by state, then one share's timeline (states, results with cost)
    await console.open("/ui/workflows")
    assert await page.locator("a.tag:has-text('video_transcribing')").count() == 1
    await console.shot("workflows")
    await page.click("a:has-text('yt-rocket-1')")
    await page.wait_for_selector("ol.timeline")
    timeline = await page.inner_text("ol.timeline")
    assert "video_summarizing" in timeline
    assert "transcribe_whisper" in timeline
    assert "$0.009550" in timeline
    console.clean("timeline")
    await console.shot("workflow")

    # Search: the query box over the stored embeddings
    await console.open("/ui/search")
    await page.fill("input[name=q]", "baking bread with a wild yeast starter")
    await page.click("button:has-text('Search')")
    await page.wait_for_selector("ol.hits li")
    assert "Sourdough at home" in await page.locator("ol.hits li").first.inner_text()
    console.clean("search")
    await console.shot("search")

    # Costs: a window, the spend chart, the ledger with the daemon's own charges
    await console.open("/ui/costs?window=7d")
    ledger = await page.inner_text("section:has(h2:has-text('Ledger'))")
    assert live in ledger
    assert "web-bread-4" in ledger
    assert await page.locator("svg.chart rect.bar").count() >= 3
    await console.shot("costs")

    # the interactive API docs, with their assets from this server
    await console.open("/docs")
    await page.wait_for_selector("[data-path='/v1/events']")
    assert await page.locator(".opblock").count() >= 10
    console.clean("docs")


async def test_read_token_csrf_and_no_javascript(browser: Browser, stack: Stack) -> None:
    console = await tab(browser, stack)
    page = console.page
    await console.login(READER)
    for admin_page in ("/ui/costs", "/ui/dead-letters"):
        response = await page.goto(stack.server.url + admin_page)
        assert response is not None, admin_page
        assert response.status == 403, admin_page
        assert "needs an admin token" in await page.inner_text("main")
    # the browser reports each refused page load as an error: exactly those two, nothing else
    assert len(console.errors) == 2
    assert all("status of 403" in e for e in console.errors), console.errors
    console.errors.clear()
    await console.open("/ui")
    assert "Shown to admin tokens" in await page.inner_text("main")

    admin = await tab(browser, stack)
    await admin.login(ADMIN)
    forged = await admin.page.request.post(stack.server.url + "/ui/dead-letters/replay",
                                           form={"reason": "content_too_short",
                                                 "csrf": "0" * 64})
    assert forged.status == 403

    # without JavaScript every page but the live feed still works
    context = await browser.new_context(java_script_enabled=False)
    await context.add_cookies([{"name": "mlpipe_token", "value": ADMIN,
                                "url": stack.server.url}])
    plain = Console(await context.new_page(), stack.server.url)
    for path in ("/ui", "/ui/dead-letters", "/ui/workflows", "/ui/costs"):
        await plain.open(path)
    await plain.open("/ui/search?q=orbit")
    assert await plain.page.locator("ol.hits li").count() > 0
