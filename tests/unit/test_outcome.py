from __future__ import annotations

import pytest

from mlpipe.broker.topology import Topology, delay_tiers, parse_queue_names
from mlpipe.errors import BudgetExceeded, ContractError, PermanentError, TransientError
from mlpipe.settings import QueueTuning, RetryPolicy, Settings
from mlpipe.worker.outcome import Ack, DeadLetter, Retry, backoff_delay, decide

POLICY = RetryPolicy(max_retries=3, base_delay_s=1.0, max_delay_s=5.0, jitter=0.2)


def test_success_acks() -> None:
    assert decide(None, 0, POLICY) == Ack()


@pytest.mark.parametrize("exc", [PermanentError("x"), ContractError("bad"),
                                 BudgetExceeded("over")])
def test_permanent_errors_dead_letter_at_once(exc: Exception) -> None:
    out = decide(exc, 0, POLICY)
    assert isinstance(out, DeadLetter)
    assert out.reason == exc.reason  # type: ignore[attr-defined]


def test_transient_retries_until_policy_gives_up() -> None:
    for n in range(3):
        assert isinstance(decide(TransientError("t"), n, POLICY), Retry)
    out = decide(TransientError("t"), 3, POLICY)
    assert isinstance(out, DeadLetter)
    assert out.reason == "retries_exhausted"


def test_unexpected_exceptions_count_as_transient() -> None:
    out = decide(KeyError("k"), 0, POLICY)
    assert isinstance(out, Retry)
    assert out.reason == "unexpected_error"


def test_transient_delay_override() -> None:
    out = decide(TransientError("rate limited", delay_s=2.5), 0, POLICY)
    assert isinstance(out, Retry)
    assert out.delay_s == 2.5


def test_backoff_grows_and_is_capped_with_jitter_below_step() -> None:
    for n, step in enumerate([1.0, 2.0, 4.0, 5.0, 5.0]):
        for _ in range(50):
            d = backoff_delay(POLICY, n)
            assert step * 0.8 <= d <= step


def test_delay_tiers_cover_every_backoff_step() -> None:
    tiers = delay_tiers(1.0, 5.0, 5)
    assert tiers == (1000, 2000, 4000, 5000)
    topo = Topology(delay_tiers_ms=tiers)
    assert topo.tier_for(1500) == 2000
    assert topo.tier_for(999_999) == 5000


def test_queue_names() -> None:
    assert [q.short_name for q in parse_queue_names("transcribe, embed")] == [
        "transcribe", "embed"]
    with pytest.raises(ValueError, match="unknown queue"):
        parse_queue_names("transcribe,nope")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_RETRY", '{"max_retries": 2}')
    monkeypatch.setenv("MLPIPE_QUEUES__EMBED", '{"prefetch": 8, "concurrency": 4}')
    monkeypatch.setenv("MLPIPE_MAX_TASKS", "100")
    s = Settings()
    assert s.retry.max_retries == 2
    assert s.max_tasks == 100
    assert s.tuning("embed") == QueueTuning(prefetch=8, concurrency=4)
    assert s.tuning("transcribe") == QueueTuning(prefetch=2, concurrency=1)


def test_settings_reject_unknown_keys_and_bad_tuning() -> None:
    with pytest.raises(ValueError, match="no_such_setting"):
        Settings(no_such_setting=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="below concurrency"):
        QueueTuning(prefetch=1, concurrency=4)


def test_settings_reject_unknown_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLPIPE_MAX_TASK", "5")  # misspelt
    with pytest.raises(ValueError, match="MLPIPE_MAX_TASK"):
        Settings()


def test_deferrals_do_not_use_the_retry_budget_but_are_bounded() -> None:
    from mlpipe.errors import Deferred

    out = decide(Deferred("lock held", delay_s=3), retry_count=3, policy=POLICY, deferrals=4,
                 max_deferrals=5)
    assert isinstance(out, Retry)
    assert (out.counts, out.delay_s) == (False, 3)
    out = decide(Deferred("lock held", reason="lock_contention"), 0, POLICY, deferrals=5,
                 max_deferrals=5)
    assert isinstance(out, DeadLetter)
    assert out.reason == "lock_contention"
