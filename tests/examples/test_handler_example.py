"""What a handler author writes: a handler and its tests with ``TaskHarness``, no broker,
Redis or Postgres. ``tests/unit/test_harness.py`` runs this file with those services'
ports unreachable and checks that it passes in under a second."""

from __future__ import annotations

from decimal import Decimal

from mlpipe import HandlerResult, Registry, TaskContext, TaskType
from mlpipe.contract.models import SummarizeTask, build_task
from mlpipe.errors import PermanentError
from mlpipe.handlers import Cost
from mlpipe.settings import Settings
from mlpipe.testing import TaskHarness
from mlpipe.worker.outcome import Ack, DeadLetter, Skip


def build_registry() -> Registry:
    registry = Registry()

    async def summarize(task: SummarizeTask, ctx: TaskContext) -> HandlerResult:
        text = task.payload.content.text
        if not text.strip():
            raise PermanentError("nothing to summarize", reason="empty_text")
        return HandlerResult({"summary": text.split(".")[0] + "."}, model_version="first-1",
                             costs=(Cost(len(text.split()), "tokens", Decimal("0.40"), "m"),))

    registry.register(TaskType.SUMMARIZE_LLM, summarize, timeout_s=5,
                      estimate_cost=lambda task: Decimal("0.40"))
    return registry


def article(share: str, text: str) -> object:
    return build_task(TaskType.SUMMARIZE_LLM, share, {"content": {"text": text}})


SETTINGS = Settings(budgets={"summarize_llm": {"hourly_usd": 1.0, "daily_usd": 5.0}})


async def test_summary_is_stored_once_and_announced() -> None:
    async with TaskHarness(build_registry(), SETTINGS) as harness:
        run = await harness.send(article("s1", "Rockets reach orbit. Then they coast."))
        again = await harness.send(article("s1", "Rockets reach orbit. Then they coast."))
    assert run.outcome == Ack()
    assert run.stored is not None
    assert run.stored.data == {"summary": "Rockets reach orbit."}
    assert [e["status"] for e in run.events] == ["completed"]
    assert (again.outcome, again.skipped, again.events) == (Skip("already_done"), "already_done",
                                                            ())


async def test_bad_input_and_budget_are_dead_lettered() -> None:
    async with TaskHarness(build_registry(), SETTINGS) as harness:
        empty = await harness.send(article("s2", "   "))
        spent = [await harness.send(article(f"b{i}", f"Text {i}.")) for i in range(3)]
        junk = await harness.send(b'{"taskType": "summarize_llm"')
    assert empty.outcome == DeadLetter("empty_text", "PermanentError", "nothing to summarize")
    assert [r.reason for r in spent] == [None, None, "budget_exceeded"]  # $0.40 each, $1/h
    assert [e["status"] for e in spent[2].events] == ["failed"]
    assert junk.reason == "not_json"
