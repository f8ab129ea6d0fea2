"""The chaos verdict cannot be talked round: fed fabricated evidence, it fails every run whose
re-runs lack a cause that predates them, and every run that loses, dead-letters or
double-completes a genuine task (``tests/chaos/verdict.py``)."""

from __future__ import annotations

from collections import Counter

from tests.chaos.verdict import (
    FAILED,
    LEASE_LOST,
    LOCK_STATE_LOST,
    SIGKILL,
    DeadLetter,
    Evidence,
    Execution,
    Fault,
    LogLine,
    judge,
)

T0 = 1_800_000_000.0


def clean(*shares: str) -> Evidence:
    """A run where every share ran once, stored one result, and sent one event."""
    ev = Evidence(published=list(shares), confirmed=set(shares),
                  results=Counter(dict.fromkeys(shares, 1)),
                  planned_faults=["sigkill"],
                  faults=[Fault("sigkill", T0 + 1, T0 + 1, T0 + 3)])
    for i, s in enumerate(shares):
        ev.executions.append(Execution(s, 100, 1, T0 + i, T0 + i + 0.01))
        ev.winner_pid[s] = 100
        ev.completed_ids[s] = {f"event-{s}"}
    ev.completed_copies = len(shares)
    return ev


def rerun(ev: Evidence, share: str, *, first_pid: int, first_start: float,
          second_start: float) -> None:
    """Replace ``share``'s execution by two: ``first_pid`` then pid 200."""
    ev.executions = [e for e in ev.executions if e.share_id != share]
    ev.executions += [Execution(share, first_pid, 1, first_start, first_start + 0.01),
                      Execution(share, 200, 1, second_start, second_start + 0.01)]
    ev.winner_pid[share] = 200


def test_a_clean_run_passes() -> None:
    report = judge(clean("a", "b", "c"))
    assert report.passed, report.failures
    assert "VERDICT                  PASS" in report.render()


def test_a_concurrent_double_run_fails_even_though_its_first_process_was_killed() -> None:
    """The forced verdict of issue 15: the second execution started *before* the first
    one's process was killed, so the kill cannot explain it."""
    ev = clean("a", "b")
    rerun(ev, "a", first_pid=100, first_start=T0 + 10, second_start=T0 + 10.5)
    ev.kills[100] = T0 + 11.0
    report = judge(ev)
    assert not report.passed
    assert list(report.duplicate_effects) == ["a"]
    assert "killed" in report.duplicate_effects["a"]
    assert "duplicate effects: 1" in report.failures
    assert "VERDICT                  FAIL" in report.render()


def test_a_rerun_after_the_first_process_was_killed_is_excused_as_sigkill() -> None:
    ev = clean("a")
    rerun(ev, "a", first_pid=100, first_start=T0 + 10, second_start=T0 + 12)
    ev.kills[100] = T0 + 11.0
    report = judge(ev)
    assert report.passed, report.failures
    assert list(report.reruns[SIGKILL]) == ["a"]


def test_a_failure_logged_by_another_process_or_attempt_excuses_nothing() -> None:
    ev = clean("a")
    rerun(ev, "a", first_pid=100, first_start=T0 + 10, second_start=T0 + 12)
    ev.logs = [LogLine(999, "task.failed", "a", 1, T0 + 11, "not this run's daemon"),
               LogLine(100, "task.failed", "a", 2, T0 + 11, "not this run's attempt"),
               LogLine(100, "task.failed", "a", 1, T0 + 13, "after the re-run started")]
    assert list(judge(ev).duplicate_effects) == ["a"]
    ev.logs.append(LogLine(100, "task.failed", "a", 1, T0 + 11, "effect not recorded"))
    report = judge(ev)
    assert report.passed, report.failures
    assert report.reruns[FAILED]["a"].endswith("effect not recorded")


def test_lock_state_lost_needs_a_redis_kill_just_after_the_first_run_started() -> None:
    ev = clean("a")
    rerun(ev, "a", first_pid=100, first_start=T0 + 10, second_start=T0 + 15)
    ev.faults.append(Fault("redis_kill", T0 + 30, T0 + 32, T0 + 34))  # too late
    assert not judge(ev).passed
    ev.faults.append(Fault("redis_kill", T0 + 10.8, T0 + 13, T0 + 14))
    ev.planned_faults += ["redis_kill", "redis_kill"]
    report = judge(ev)
    assert report.passed, report.failures
    assert list(report.reruns[LOCK_STATE_LOST]) == ["a"]


def test_lease_lost_needs_the_first_runs_own_lock_lost_line() -> None:
    ev = clean("a")
    rerun(ev, "a", first_pid=100, first_start=T0 + 10, second_start=T0 + 30)
    ev.logs = [LogLine(100, "lock.lost", "b", None, T0 + 25, "another share")]
    assert not judge(ev).passed
    ev.logs.append(LogLine(100, "lock.lost", "a", 1, T0 + 25, "taken over or expired"))
    report = judge(ev)
    assert report.passed, report.failures
    assert list(report.reruns[LEASE_LOST]) == ["a"]


def test_each_rerun_of_a_thrice_run_share_needs_its_own_cause() -> None:
    ev = clean("a")
    rerun(ev, "a", first_pid=100, first_start=T0 + 10, second_start=T0 + 12)
    ev.executions.append(Execution("a", 300, 1, T0 + 14, T0 + 14.01))
    ev.kills[100] = T0 + 11.0
    assert list(judge(ev).duplicate_effects) == ["a"]  # pid 200 was never killed
    ev.kills[200] = T0 + 13.0
    assert judge(ev).passed


def test_two_completed_events_for_one_result_fail_but_a_resent_copy_does_not() -> None:
    ev = clean("a", "b")
    ev.completed_copies += 1  # the same event id delivered twice: at-least-once, fine
    assert judge(ev).passed
    ev.completed_ids["a"].add("a-second-completion")
    report = judge(ev)
    assert not report.passed
    assert report.events_wrong == {"a": 2}


def test_a_result_without_its_event_fails() -> None:
    ev = clean("a", "b")
    del ev.completed_ids["b"]
    assert judge(ev).events_wrong == {"b": 0}


def test_a_dead_lettered_genuine_task_fails_and_is_not_lost() -> None:
    ev = clean("a", "b")
    del ev.results["b"], ev.completed_ids["b"]
    ev.dead.append(DeadLetter("m-b", "b", "lock_contention", 3))
    report = judge(ev)
    assert report.lost == []
    assert report.genuine_dead == ["b"]
    assert "genuine tasks dead-lettered: 1" in report.failures


def test_a_confirmed_task_without_any_trace_is_lost_and_never_seen_again() -> None:
    ev = clean("a", "b")
    del ev.results["b"], ev.completed_ids["b"]
    ev.executions = [e for e in ev.executions if e.share_id != "b"]
    report = judge(ev)
    assert report.lost == ["b"]
    assert report.never_seen == ["b"]
    assert not report.passed


def test_raised_publishes_must_end_in_a_result() -> None:
    ev = clean("a", "b")
    ev.raised["a"] = 2
    assert judge(ev).passed
    ev.published.append("c")
    ev.raised["c"] = 20  # never confirmed, never stored
    report = judge(ev)
    assert report.unconfirmed == ["c"]
    assert report.raised_accounted == 1
    assert report.raised_shares == 2
    assert not report.passed


def test_canary_hits_media_fetches_and_withheld_targets_each_fail() -> None:
    for spoil in ("canary", "fetch", "withheld"):
        ev = clean("a")
        if spoil == "canary":
            ev.canary_hits = 1
        elif spoil == "fetch":
            ev.executions.append(Execution("h1", 100, 1, T0, T0, kind="media_fetch"))
        else:
            ev.withheld_targets = ["cloud metadata"]
        assert not judge(ev).passed, spoil


def test_hostile_messages_must_all_be_dead_lettered() -> None:
    ev = clean("a")
    ev.hostile = {"hostile-0": "junk", "hostile-5": "network"}
    ev.dead.append(DeadLetter("hostile-0", None, "invalid_json", 1))
    report = judge(ev)
    assert report.hostile_missing == ["hostile-5"]
    assert not report.passed
    ev.dead.append(DeadLetter("hostile-5", "h1", "forbidden_media_url", 1))
    report = judge(ev)
    assert report.passed, report.failures
    assert report.network_reasons == {"forbidden_media_url": 1}


def test_a_planned_fault_that_did_not_run_or_recover_fails() -> None:
    ev = clean("a")
    ev.planned_faults.append("cluster_leader_kill")
    assert judge(ev).faults_not_run == ["cluster_leader_kill"]
    ev = clean("a")
    ev.faults = [Fault("sigkill", T0, T0, None)]
    assert "sigkill never recovered" in judge(ev).failures


async def test_the_pacer_keeps_work_for_every_recovery_however_fast_the_pipeline() -> None:
    """A recovery is timed on ``RECOVERY_RESULTS`` results after the service is back: even a
    pipeline that finishes everything released before each fault's service returns must find
    that much work left, for the last fault too."""
    from tests.chaos.faults import Pacer
    from tests.chaos.verdict import RECOVERY_RESULTS

    for tasks, faults in ((400, 1), (2000, 2), (1000, 8), (10_000, 13)):
        pacer = Pacer(tasks, faults)
        assert pacer.released < tasks
        for left in range(faults, 0, -1):
            await pacer.fault_began()
            assert pacer.released <= tasks - 2 * RECOVERY_RESULTS * left
            drained = pacer.released  # everything released was done meanwhile
            await pacer.service_back(drained)
            assert pacer.released >= drained + RECOVERY_RESULTS
        await pacer.release_all()
        assert pacer.released == tasks
