"""The recycler retires a worker after max_tasks or past max_rss_mb, reading the RSS at most
once per interval (on its injectable clock)."""

from __future__ import annotations

from mlpipe.worker.recycle import Recycler, rss_bytes

MB = 1024 * 1024


def test_max_tasks() -> None:
    r = Recycler(max_tasks=3, max_rss_mb=0)
    assert [r.settled() for _ in range(3)] == [None, None, "max_tasks"]
    assert r.tasks_done == 3


def test_rss_over_the_limit_retires_on_the_first_settle() -> None:
    assert Recycler(max_tasks=0, max_rss_mb=1).settled() == "max_rss"


def test_rss_growth_is_seen_within_one_interval() -> None:
    now = [100.0]
    r = Recycler(max_tasks=0, max_rss_mb=(rss_bytes() + 40 * MB) // MB,
                 rss_check_interval_s=0.3, clock=lambda: now[0])
    assert r.settled() is None
    ballast = bytearray(80 * MB)
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touch every page: it is resident now
    assert rss_bytes() > (r._max_rss)
    assert r.settled() is None  # within the interval: /proc is not read again
    now[0] += 0.29
    assert r.settled() is None  # still within it
    now[0] += 0.02
    assert r.settled() == "max_rss"
    del ballast


def test_no_limits_never_retire() -> None:
    r = Recycler(max_tasks=0, max_rss_mb=0)
    assert all(r.settled() is None for _ in range(1000))
