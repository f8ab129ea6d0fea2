"""The chaos scenario at small scale (1,000 tasks on a private node with one fault of each
kind, broker, Redis and Postgres kills included, 200 hostile messages with the network set
aimed at a canary, then 400 tasks on a private three-node cluster that loses the node leading
its work queues) as part of the normal suite; ``make chaos`` runs the full one."""

from __future__ import annotations

import pytest

from tests.chaos.run import SMALL, run


@pytest.mark.timeout(1200)
async def test_small_chaos_scenario_loses_nothing_and_duplicates_nothing() -> None:
    assert {"broker_kill", "redis_kill", "pg_kill"} <= set(SMALL.faults)
    assert "cluster_leader_kill" in SMALL.cluster_faults
    report = await run(SMALL)
    print(report.render())
    assert report.published == report.confirmed
    assert report.raised_accounted == report.raised_shares
    assert report.lost == []
    assert report.never_seen == []
    assert report.genuine_dead == []
    assert report.duplicate_effects == {}
    assert report.events_wrong == {}
    assert report.hostile_dead_lettered == report.hostile_sent == SMALL.hostile
    assert report.network_sent > 0
    assert report.withheld_targets == []
    assert report.media_fetched == 0
    assert report.canary_hits == 0
    assert report.daemon_crashes == 0
    assert sorted(f.name for f in report.faults) == sorted(SMALL.faults + SMALL.cluster_faults)
    assert all(f.recovered is not None for f in report.faults)
    assert report.passed
