"""``TaskHarness``: the daemon's delivery path in memory, with the effects layer's rules."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from mlpipe import HandlerResult, Registry, TaskContext, TaskType
from mlpipe.contract.models import SummarizeTask, Task, build_task
from mlpipe.errors import TransientError
from mlpipe.handlers import Cost
from mlpipe.settings import RetryPolicy, Settings
from mlpipe.testing import TaskHarness
from mlpipe.worker.outcome import Ack, DeadLetter, Retry, Skip

ROOT = Path(__file__).resolve().parents[2]


def task(share: str, text: str = "Some text.", **options: object) -> Task:
    return build_task(TaskType.SUMMARIZE_LLM, share,
                      {"content": {"text": text}, "options": options})


def test_a_handler_authors_test_needs_no_services_and_runs_in_under_a_second() -> None:
    """The example file, with the broker, Redis and Postgres pointed at closed ports."""
    env = {**os.environ, "MLPIPE_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/",
           "MLPIPE_REDIS_URL": "redis://127.0.0.1:1/0",
           "MLPIPE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nothing"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
         "--durations-min=0", "tests/examples/test_handler_example.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout
    times = [float(t) for t in re.findall(r"^([\d.]+)s (?:call|setup|teardown) ",
                                          out.stdout, re.M)]
    assert len(times) == 6, out.stdout
    assert sum(times) < 1.0, out.stdout


async def test_concurrent_double_fire_is_acked_and_other_input_deferred() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []
    registry = Registry()

    async def slow(t: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        calls.append(t.payload.content.text)
        started.set()
        await release.wait()
        return HandlerResult({"n": len(calls)})

    registry.register(TaskType.SUMMARIZE_LLM, slow)
    async with TaskHarness(registry) as harness:
        first = asyncio.create_task(harness.send(task("s", "A")))
        await started.wait()
        double = await harness.send(task("s", "A"))
        other = await harness.send(task("s", "B"))
        release.set()
        done = await first
    assert (done.outcome, done.skipped) == (Ack(), None)
    assert (double.outcome, double.skipped, double.events) == (Skip("duplicate_in_flight"),
                                                               "duplicate_in_flight", ())
    assert isinstance(other.outcome, Retry)
    assert (other.reason, other.outcome.counts) == ("lock_contention", False)
    assert calls == ["A"]
    assert harness.effects.locks == {}


async def test_force_recompute_runs_again_and_replaces_the_result() -> None:
    registry = Registry()
    runs = 0

    async def count(t: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        nonlocal runs
        runs += 1
        return HandlerResult({"run": runs})

    registry.register(TaskType.SUMMARIZE_LLM, count)
    async with TaskHarness(registry) as harness:
        await harness.send(task("s"))
        assert (await harness.send(task("s"))).skipped == "already_done"
        forced = await harness.send(task("s", forceRecompute=True))
        changed = await harness.send(task("s", "Other input."))
    assert forced.stored is not None
    assert forced.stored.data == {"run": 2}
    assert changed.stored is not None
    assert changed.stored.data == {"run": 3}


async def test_settle_follows_retries_until_ack_or_dead_letter() -> None:
    registry = Registry()
    failures = {"flaky": 2, "broken": 99}

    async def handler(t: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        if failures[t.share_id] > 0:
            failures[t.share_id] -= 1
            raise TransientError("upstream 503", reason="upstream")
        return HandlerResult({"attempt": ctx.attempt})

    registry.register(TaskType.SUMMARIZE_LLM, handler)
    settings = Settings(retry=RetryPolicy(max_retries=3))
    async with TaskHarness(registry, settings) as harness:
        flaky = await harness.settle(task("flaky"))
        broken = await harness.settle(task("broken"))
    assert [type(r.outcome) for r in flaky] == [Retry, Retry, Ack]
    assert flaky[-1].stored is not None
    assert flaky[-1].stored.data == {"attempt": 3}
    assert len(broken) == 4
    assert isinstance(broken[-1].outcome, DeadLetter)
    assert broken[-1].reason == "retries_exhausted"
    assert [e["status"] for e in broken[-1].events] == ["failed"]


async def test_budget_windows_follow_the_clock() -> None:
    now = [1_000_000.0]
    registry = Registry()

    async def paid(t: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        return HandlerResult({}, costs=(Cost(1, "tokens", Decimal("0.6"), "m"),))

    registry.register(TaskType.SUMMARIZE_LLM, paid, estimate_cost=lambda t: Decimal("0.6"))
    settings = Settings(budgets={"summarize_llm": {"hourly_usd": 1.0, "daily_usd": 1.5}})
    async with TaskHarness(registry, settings, clock=lambda: now[0]) as harness:
        assert (await harness.send(task("a"))).acked
        assert (await harness.send(task("b"))).reason == "budget_exceeded"
        now[0] += 3601  # a new hour, the same day: $0.60 + $0.60 fits $1.50
        assert (await harness.send(task("c"))).acked
        assert (await harness.send(task("d"))).reason == "budget_exceeded"  # day: 1.2 + 0.6
        assert harness.effects.spent("summarize_llm", 86_400) == Decimal("1.2")
