"""Pieces of the console and the event stream that need no server: charts escape what they
draw, a subscription filters and cuts off a client that falls behind, dead letters are counted
by when they died."""

from __future__ import annotations

import asyncio

from mlpipe.api.events import Event, Subscription
from mlpipe.api.ui.charts import Bar, bars
from mlpipe.api.ui.data import dead_counts
from mlpipe.dlq import DeadLetterEntry


def test_chart_escapes_labels_and_colours_budgets() -> None:
    svg = str(bars([Bar("<script>alert(1)</script>", 0.5, "a & b")], title="t<"))
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg
    assert "a &amp; b" in svg
    budget = str(bars([Bar("x", 1.2, ""), Bar("y", 0.85, ""), Bar("z", 0.1, "")], title="b",
                      budget=True))
    assert [c for c in ("bar over", "bar warn", "bar ok") if c in budget] == [
        "bar over", "bar warn", "bar ok"]
    assert 'width="340"' in budget  # an overspent bar is drawn full, not past the track
    assert "bar plain" in str(bars([Bar("x", 2.0, "")], title="relative"))
    assert "nothing to show" in str(bars([], title="empty"))


def event(share: str, task_type: str = "summarize_llm", n: int = 0) -> Event:
    return Event(f"{share}-{n}", "completed", task_type, share, "{}")


async def test_subscription_filters_and_drops_a_slow_client() -> None:
    sub = Subscription("a", "summarize_llm", asyncio.Queue(2))
    sub.offer(event("b"))
    sub.offer(event("a", "embed_vectors"))
    assert sub.buffer.qsize() == 0
    sub.offer(event("a", n=1))
    sub.replayed.add("a-2")
    sub.offer(event("a", n=2))  # already sent from memory
    sub.offer(event("a", n=3))
    assert sub.buffer.qsize() == 2
    assert not sub.dropped.is_set()
    sub.offer(event("a", n=4))
    assert sub.dropped.is_set()
    assert sub.why.startswith("too slow")
    assert sub.buffer.qsize() == 2  # nothing beyond the bound was kept


def dead(at: int | None, task_type: str | None = "embed_vectors") -> DeadLetterEntry:
    return DeadLetterEntry(message_id="m", reason="r", error_class=None, error=None,
                           attempts=1, origin_queue="ml.embed", routing_key="embed_vectors",
                           task_type=task_type, share_id=None, dead_lettered_at=at,
                           body_preview="")


def test_dead_letters_counted_by_when_they_died() -> None:
    now = 1_000_000
    entries = [dead(now - 60), dead(now - 7200), dead(now - 90_000), dead(None),
               dead(now - 30, task_type=None)]
    everything = dead_counts(entries, failed_only=False, now=now)
    assert (everything.hour, everything.day) == (2, 3)
    failed = dead_counts(entries, failed_only=True, now=now)
    assert (failed.hour, failed.day) == (1, 2)
