"""The chaos scenario at small scale (1,000 tasks, one fault of each kind, 200 hostile
messages) as part of the normal suite; ``make chaos`` runs the full one."""

from __future__ import annotations

import pytest

from tests.chaos.run import SMALL, run


@pytest.mark.timeout(900)
async def test_small_chaos_scenario_loses_nothing_and_duplicates_nothing() -> None:
    report = await run(SMALL)
    print(report.render())
    assert report.published == report.confirmed + report.publish_raised
    assert report.lost == []
    assert report.double_results == []
    assert report.duplicate_effects_unexplained == []
    assert report.hostile_dead_lettered == report.hostile_sent == SMALL.hostile
    assert report.media_fetched == 0
    assert report.daemon_crashes == 0
    assert len(report.recovery_s) == len(SMALL.faults)
    assert report.passed
