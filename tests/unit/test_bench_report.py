"""The arithmetic behind ``make bench``'s verdicts: best-of-rounds, ratios, percentiles, target
checks, and that an unmeasured figure is never shown or judged as a number."""

from __future__ import annotations

import json

import pytest

from bench.report import (
    TARGETS,
    Figure,
    Report,
    Target,
    best,
    check,
    check_all,
    figure,
    figures_from_json,
    markdown,
    missing,
    percentile,
    ratio,
    render,
)


def _complete() -> list[Figure]:
    """One run in which every target passes."""
    return [
        figure("noop_consume", "mlpipe", "msg/s", [3000, 3400]),
        figure("noop_consume", "raw_aio_pika", "msg/s", [3800, 3600]),
        figure("noop_consume", "faststream", "msg/s", [2500]),
        figure("noop_consume", "celery", "msg/s", [1000]),
        figure("full_path", "mlpipe", "msg/s", [2000]),
        figure("full_path", "raw_aio_pika", "msg/s", [1900]),
        figure("publish_serial", "mlpipe", "msg/s", [700]),
        figure("publish_serial", "raw_aio_pika", "msg/s", [720]),
        figure("publish_in_flight", "mlpipe", "msg/s", [9000]),
        figure("publish_in_flight", "raw_aio_pika", "msg/s", [10000]),
        figure("latency_p50", "mlpipe", "ms", [4.0, 3.0], higher_is_better=False),
        figure("latency_p50", "raw_aio_pika", "ms", [2.0], higher_is_better=False),
        figure("latency_p99", "mlpipe", "ms", [12.0], higher_is_better=False),
        figure("latency_p99", "raw_aio_pika", "ms", [10.0], higher_is_better=False),
        figure("embed_batching", "batched", "msg/s", [500]),
        figure("embed_batching", "per_message", "msg/s", [100]),
        figure("memory", "idle", "MB", [60.0]),
        figure("memory", "after_a", "MB", [70.0], note="after 10,000 tasks"),
        figure("memory", "after_b", "MB", [72.0], note="after 20,000 tasks"),
    ]


def test_best_round_is_the_fastest_or_the_lowest_latency() -> None:
    assert best([3000, 3400, 3100]) == 3400
    assert best([4.0, 3.0, 5.0], higher_is_better=False) == 3.0
    assert best([]) is None
    assert best([float("nan"), 2.0]) == 2.0


def test_figure_keeps_every_sample_and_reports_the_best() -> None:
    f = figure("noop_consume", "mlpipe", "msg/s", [3000, 3400])
    assert f.value == 3400
    assert f.samples == (3000.0, 3400.0)
    assert f.key == ("noop_consume", "mlpipe")


def test_ratio_is_none_when_either_side_is_missing_or_zero() -> None:
    assert ratio(3400, 3800) == pytest.approx(0.8947, abs=1e-4)
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


@pytest.mark.parametrize(("q", "expected"), [(0, 1.0), (50, 2.5), (100, 4.0), (25, 1.75)])
def test_percentile_interpolates_like_numpy(q: float, expected: float) -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], q) == pytest.approx(expected)


def test_percentile_of_many_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_every_target_passes_on_a_good_run() -> None:
    checks = check_all(_complete())
    assert [c.verdict for c in checks] == ["PASS"] * len(TARGETS)
    by_name = {c.target.name: c for c in checks}
    assert by_name["no-op consume vs raw aio-pika"].measured == pytest.approx(3400 / 3800)
    assert by_name["full path vs no-op raw aio-pika"].measured == pytest.approx(2000 / 3800)
    assert by_name["RSS growth between the two task counts"].measured == pytest.approx(2 / 70)


def test_targets_fail_below_their_thresholds() -> None:
    figures = {f.key: f for f in _complete()}
    figures[("noop_consume", "mlpipe")] = figure("noop_consume", "mlpipe", "msg/s", [3000])
    figures[("full_path", "mlpipe")] = figure("full_path", "mlpipe", "msg/s", [1800])
    figures[("memory", "idle")] = figure("memory", "idle", "MB", [80.0])
    figures[("memory", "after_b")] = figure("memory", "after_b", "MB", [77.5])
    verdicts = {c.target.name: c.verdict for c in check_all(figures.values())}
    assert verdicts["no-op consume vs raw aio-pika"] == "FAIL"  # 3000 / 3800 = 0.79
    assert verdicts["no-op consume vs Celery"] == "PASS"  # 3.0x exactly is enough
    assert verdicts["full path vs raw full path"] == "FAIL"  # slower than hand-written
    assert verdicts["idle daemon RSS (MB)"] == "FAIL"  # "under 80" is strict
    assert verdicts["RSS growth between the two task counts"] == "FAIL"  # +10.7 %


def test_an_unmeasured_figure_is_never_judged() -> None:
    figures = [f for f in _complete() if f.workload != "embed_batching"]
    figures += [missing("embed_batching", "batched", "msg/s", "not available yet"),
                missing("embed_batching", "per_message", "msg/s", "not available yet")]
    result = {c.target.name: c for c in check_all(figures)}
    embed = result["embedding micro-batching vs per message"]
    assert embed.verdict == "NOT MEASURED"
    assert embed.measured is None
    assert embed.why == "not available yet"


def test_a_figure_absent_altogether_is_named() -> None:
    target = Target("t", "ratio", ("x", "mlpipe"), 1.0, ("x", "base"))
    result = check(target, {})
    assert result.verdict == "NOT MEASURED"
    assert "x/mlpipe" in result.why


def test_table_shows_figures_ratios_and_verdicts() -> None:
    figures = _complete()
    table = render(figures, check_all(figures), title="bench")
    lines = table.splitlines()
    assert lines[0] == "bench"
    raw = next(line for line in lines if "raw aio-pika" in line and "3,800 msg/s" in line)
    assert raw.rstrip().endswith("0.89x")
    celery = next(line for line in lines if "Celery" in line)
    assert "1,000 msg/s" in celery
    assert celery.rstrip().endswith("3.40x")
    p99 = next(line for line in lines if line.startswith("4b. latency p99"))
    assert "12.00 ms" in p99
    assert "after 20,000 tasks" in table
    assert any(line.startswith("no-op consume vs raw aio-pika") and line.endswith("PASS")
               for line in lines)


def test_table_shows_why_a_figure_is_missing_instead_of_a_number() -> None:
    figures = [f for f in _complete() if f.workload != "embed_batching"]
    figures += [missing("embed_batching", "batched", "msg/s", "not available yet"),
                missing("embed_batching", "per_message", "msg/s", "not available yet")]
    table = render(figures, check_all(figures))
    batched = next(line for line in table.splitlines() if "5. embedding" in line)
    assert "— (not available yet)" in batched
    assert not any(ch.isdigit() for ch in batched.split("—", 1)[1])
    verdict = next(line for line in table.splitlines()
                   if line.startswith("embedding micro-batching"))
    assert "NOT MEASURED (not available yet)" in verdict


def test_long_reasons_are_shortened_in_the_table_only() -> None:
    why = "RuntimeError: " + "x" * 200
    figures = [missing("noop_consume", "celery", "msg/s", why)]
    table = render(figures, [])
    assert "…" in table
    assert why not in table
    assert figures[0].note == why


def test_report_json_carries_ratios_targets_and_samples() -> None:
    figures = _complete()
    report = Report(started_at="2026-01-01T00:00:00Z", mode="quick", seconds=61.234,
                    environment={"cpus": 2}, plan={"rounds": 1}, figures=figures,
                    durations_s={"noop": 12.34}, errors={}, notes={"latency/x": "slow"})
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["seconds"] == 61.2
    assert doc["ratios_mlpipe_over_baseline"]["noop_consume/raw_aio_pika"] == \
        pytest.approx(3400 / 3800)
    assert doc["ratios_mlpipe_over_baseline"]["latency_p99/raw_aio_pika"] == pytest.approx(1.2)
    assert "embed_batching/per_message" not in doc["ratios_mlpipe_over_baseline"]
    assert {t["verdict"] for t in doc["targets"]} == {"PASS"}
    noop = next(f for f in doc["figures"] if f["workload"] == "noop_consume"
                and f["contender"] == "mlpipe")
    assert noop["samples"] == [3000.0, 3400.0]
    assert noop["value"] == 3400.0
    assert doc["notes"] == {"latency/x": "slow"}


def test_markdown_table_is_made_from_a_results_file() -> None:
    figures = _complete()
    report = Report(started_at="2026-01-01T00:00:00Z", mode="full", seconds=300.4,
                    environment={"cpus": 2, "load_avg_start": [1.5, 1, 1],
                                 "load_avg_end": [2.25, 1, 1], "rabbitmq": "3.10.8",
                                 "python": "3.11.7", "commit": "abc123"},
                    plan={"rounds": 3}, figures=figures)
    doc = json.loads(json.dumps(report.to_json()))
    assert [f.key for f in figures_from_json(doc)] == [f.key for f in figures]
    text = markdown(doc)
    lines = text.splitlines()
    assert "full run, 2026-01-01T00:00:00Z, 300 s, 2 CPUs" in lines[0]
    assert "load average 1.5 at start, 2.25 at end" in lines[0]
    assert "| 1. no-op consume | mlpipe | 3,400 msg/s |  |" in lines
    assert "|  | raw aio-pika | 3,800 msg/s | 0.89x |" in lines
    assert "| no-op consume vs raw aio-pika | 0.89x | >= 0.85x | PASS |" in lines
    assert "| idle daemon RSS (MB) | 60.0 | < 80 | PASS |" in lines


def test_markdown_shows_why_a_target_was_not_measured() -> None:
    figures = [f for f in _complete() if f.workload != "memory"]
    figures += [missing("memory", k, "MB", "espeak-ng failed")
                for k in ("idle", "after_a", "after_b")]
    doc = json.loads(json.dumps(Report(started_at="t", mode="quick", seconds=1.0,
                                       environment={}, plan={}, figures=figures).to_json()))
    text = markdown(doc)
    assert "load average unknown" in text
    assert "| idle daemon RSS (MB) | n/a | < 80 | NOT MEASURED (espeak-ng failed) |" in text
    assert "— (espeak-ng failed)" in text
