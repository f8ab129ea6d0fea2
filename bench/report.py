"""Turning measured figures into ratios, target verdicts, tables and JSON. Pure: no I/O
(except ``python -m bench.report FILE``, which prints the README table of a results file).

Kept apart from the measuring code so that the arithmetic that decides PASS or FAIL is unit
tested (``tests/unit/test_bench_report.py``) and cannot drift with the workloads. Ratios are
always *contender ÷ baseline* of figures taken in the same run (the contender is mlpipe, or
for the embedding rows the batched mode); a figure that could not be measured stays ``None``
all the way to the table (shown with its reason), and a target that depends on it is
``NOT MEASURED``, never PASS.

Each figure is the **median** of its interleaved rounds, shown with the lowest and highest
round: on a shared machine a burst of load from elsewhere moves one round, and the median
moves least with it, without flattering anyone the way a best-of would. Targets are judged on
medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: The contender every ratio is taken from, unless a workload names another.
MLPIPE = "mlpipe"


@dataclass(frozen=True)
class Figure:
    """One number of one contender in one workload: the median of its rounds.

    :param workload: key such as ``noop_consume``.
    :param contender: key such as ``mlpipe`` or ``raw_aio_pika``.
    :param unit: ``msg/s``, ``us/msg``, ``ms`` or ``MB``.
    :param samples: every round's value; ``value`` is their median.
    :param note: why there is no value (``not available yet``, an error) or how it was taken.
    """

    workload: str
    contender: str
    unit: str
    value: float | None
    samples: tuple[float, ...] = ()
    higher_is_better: bool = True
    note: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.workload, self.contender)

    @property
    def low(self) -> float | None:
        """The lowest round (None without a finite sample)."""
        finite = _finite(self.samples)
        return min(finite) if finite else None

    @property
    def high(self) -> float | None:
        """The highest round (None without a finite sample)."""
        finite = _finite(self.samples)
        return max(finite) if finite else None


def _finite(samples: Iterable[float]) -> list[float]:
    return [s for s in samples if math.isfinite(s)]


def median(samples: Sequence[float]) -> float | None:
    """The middle round (the mean of the middle two for an even count), ignoring rounds that
    produced no finite number; None when there is none."""
    finite = _finite(samples)
    return statistics.median(finite) if finite else None


def figure(workload: str, contender: str, unit: str, samples: Iterable[float], *,
           higher_is_better: bool = True, note: str = "") -> Figure:
    values = tuple(float(s) for s in samples)
    return Figure(workload, contender, unit, median(values), values, higher_is_better, note)


def missing(workload: str, contender: str, unit: str, why: str, *,
            higher_is_better: bool = True) -> Figure:
    """A figure that was not measured, with the reason shown in its place."""
    return Figure(workload, contender, unit, None, (), higher_is_better, why)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def round_ratios(a: Figure, b: Figure) -> list[float]:
    """``a ÷ b`` round by round, for two contenders that ran every round of the same
    interleaved series (equal sample counts); empty otherwise. Their spread is the honest
    range of a ratio: both figures of a round met the same load."""
    if len(a.samples) != len(b.samples):
        return []
    return [x / y for x, y in zip(a.samples, b.samples, strict=True)
            if y and math.isfinite(x) and math.isfinite(y)]


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0-100) with linear interpolation between closest ranks (numpy's
    default), so p50 of an even count is the mean of the middle two."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --- targets ------------------------------------------------------------------------------------

Verdict = Literal["PASS", "FAIL", "NOT MEASURED"]
Kind = Literal["ratio", "ratio_max", "below", "growth"]


@dataclass(frozen=True)
class Target:
    """A target of issue 17 (or one of issue 7's still standing).

    ``kind``: ``ratio`` (figure ``a`` ÷ figure ``b`` at least ``threshold``), ``ratio_max``
    (``a`` ÷ ``b`` at most ``threshold``: CPU per message, latency), ``below`` (figure ``a``
    under ``threshold``) or ``growth`` ((``b`` - ``a``) ÷ ``a`` at most ``threshold``).
    """

    name: str
    kind: Kind
    a: tuple[str, str]
    threshold: float
    b: tuple[str, str] | None = None
    #: Which issue set it.
    issue: int = 17


@dataclass(frozen=True)
class Check:
    target: Target
    measured: float | None
    verdict: Verdict
    why: str = ""


TARGETS: tuple[Target, ...] = (
    Target("full path vs hand-written full path, same work", "ratio", ("full_path", MLPIPE),
           1.0, ("full_path", "hand_written")),
    Target("full path vs Celery stack of the original system", "ratio", ("full_path", MLPIPE),
           3.0, ("full_path", "celery")),
    Target("full path CPU us/task vs hand-written", "ratio_max", ("full_cpu", MLPIPE), 1.0,
           ("full_cpu", "hand_written")),
    Target("no-op consume vs raw aio-pika", "ratio", ("noop_consume", MLPIPE), 0.85,
           ("noop_consume", "raw_aio_pika")),
    Target("no-op consume CPU us/msg vs raw aio-pika", "ratio_max", ("noop_cpu", MLPIPE), 1.3,
           ("noop_cpu", "raw_aio_pika")),
    Target("no-op consume vs FastStream", "ratio", ("noop_consume", MLPIPE), 1.2,
           ("noop_consume", "faststream")),
    Target("no-op consume vs Celery", "ratio", ("noop_consume", MLPIPE), 3.0,
           ("noop_consume", "celery")),
    Target("latency p99 at a fixed rate vs raw", "ratio_max", ("latency_p99", MLPIPE), 1.2,
           ("latency_p99", "raw_aio_pika")),
    Target("embedding batching vs one call per message, API", "ratio",
           ("embed_api", "batched"), 4.0, ("embed_api", "per_message")),
    Target("idle RSS, shipped handlers, API backends (MB)", "below", ("memory", "api_idle"),
           80.0),
    Target("publishing, many in flight, vs raw", "ratio", ("publish_in_flight", MLPIPE), 0.8,
           ("publish_in_flight", "raw_aio_pika"), issue=7),
    Target("idle RSS, no-op handlers (MB)", "below", ("memory", "idle"), 80.0, issue=7),
    Target("RSS growth between the two task counts", "growth", ("memory", "after_a"), 0.10,
           ("memory", "after_b"), issue=7),
)


def check(target: Target, figures: Mapping[tuple[str, str], Figure]) -> Check:
    a = figures.get(target.a)
    b = figures.get(target.b) if target.b is not None else None
    absent = [f"{k[0]}/{k[1]}" for k, f in ((target.a, a), (target.b, b))
              if k is not None and (f is None or f.value is None)]
    if absent:
        notes = [f.note for f in (a, b) if f is not None and f.value is None and f.note]
        return Check(target, None, "NOT MEASURED",
                     "; ".join(dict.fromkeys(notes)) or f"no figure for {', '.join(absent)}")
    assert a is not None
    assert a.value is not None
    if target.kind == "below":
        return Check(target, a.value, "PASS" if a.value < target.threshold else "FAIL")
    assert b is not None
    assert b.value is not None
    if target.kind in ("ratio", "ratio_max"):
        measured = ratio(a.value, b.value)
        if measured is None:
            return Check(target, None, "NOT MEASURED", "baseline figure is zero")
        ok = (measured >= target.threshold if target.kind == "ratio"
              else measured <= target.threshold)
        return Check(target, measured, "PASS" if ok else "FAIL")
    if a.value == 0:
        return Check(target, None, "NOT MEASURED", "first RSS reading is zero")
    growth = (b.value - a.value) / a.value
    return Check(target, growth, "PASS" if growth <= target.threshold else "FAIL")


def check_all(figures: Iterable[Figure],
              targets: Sequence[Target] = TARGETS) -> list[Check]:
    index = {f.key: f for f in figures}
    return [check(t, index) for t in targets]


# --- rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """How one workload is shown: its title and its contenders in order, with labels."""

    key: str
    title: str
    contenders: tuple[tuple[str, str], ...]
    #: False for figures that are not "a contender vs a baseline" (memory readings).
    ratios: bool = True
    #: The contender the ratios of this workload are taken from.
    reference: str = MLPIPE


WORKLOADS: tuple[Workload, ...] = (
    Workload("noop_consume", "1. no-op consume", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"), ("faststream", "FastStream"),
        ("celery", "Celery"))),
    Workload("noop_cpu", "1'. no-op consume, client CPU", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"), ("faststream", "FastStream"))),
    Workload("full_path", "2. full path (lock, result, event, ack)", (
        (MLPIPE, "mlpipe"), ("hand_written", "hand-written aio-pika, same work"),
        ("celery", "Celery + celery-singleton + psycopg"),
        ("raw_no_events", "hand-written, no outbox/events (reference)"))),
    Workload("full_cpu", "2'. full path, client CPU", (
        (MLPIPE, "mlpipe"), ("hand_written", "hand-written aio-pika, same work"),
        ("raw_no_events", "hand-written, no outbox/events (reference)"))),
    Workload("publish_serial", "3a. publish, one at a time", (
        (MLPIPE, "mlpipe Producer"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("publish_in_flight", "3b. publish, many in flight", (
        (MLPIPE, "mlpipe Producer"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("latency_p50", "4a. latency p50", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("latency_p99", "4b. latency p99", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("embed_api", "5. embedding batching, API", (
        ("batched", "batched"), ("per_message", "one call per message")),
        reference="batched"),
    Workload("embed_batching", "5'. embedding batching, local MiniLM (CPU)", (
        ("batched", "batched"), ("per_message", "one call per message")),
        reference="batched"),
    Workload("memory", "6. daemon RSS", (
        ("idle", "idle"), ("after_a", "after first count"), ("after_b", "after second count"),
        ("api_idle", "shipped handlers, API backends, idle"),
        ("models_idle", "shipped handlers, local queues, idle"),
        ("models_loaded", "offline models loaded")), ratios=False),
)


#: Longest reason shown inside the table; the full text is in the JSON and the error list.
NOTE_WIDTH = 60


def _short(text: str, width: int = NOTE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _number(x: float, unit: str) -> str:
    if unit in ("msg/s", "us/msg"):
        return f"{x:,.0f}"
    return f"{x:,.2f}" if unit == "ms" else f"{x:,.1f}"


def _fmt_value(f: Figure) -> str:
    """``median unit`` and, with more than one round, ``(min..max)`` of the rounds."""
    if f.value is None:
        return f"— ({_short(f.note)})" if f.note else "—"
    text = f"{_number(f.value, f.unit)} {f.unit}"
    lo, hi = f.low, f.high
    if len(_finite(f.samples)) > 1 and lo is not None and hi is not None:
        text += f" ({_number(lo, f.unit)}..{_number(hi, f.unit)})"
    return text


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _rows(figures: Mapping[tuple[str, str], Figure]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for w in WORKLOADS:
        mine = figures.get((w.key, w.reference))
        first = True
        for key, label in w.contenders:
            f = figures.get((w.key, key))
            if f is None:
                continue
            shown = label if not f.note or f.value is None else f"{label} [{f.note}]"
            rel = ""
            if w.ratios and key != w.reference:
                rel = _fmt_ratio(ratio(mine.value if mine else None, f.value))
            rows.append((w.title if first else "", shown, _fmt_value(f), rel))
            first = False
    return rows


def _fmt_measured(c: Check) -> str:
    if c.measured is None:
        return "n/a"
    if c.target.kind in ("ratio", "ratio_max"):
        return f"{c.measured:.2f}x"
    if c.target.kind == "growth":
        return f"{c.measured * 100:+.1f}%"
    return f"{c.measured:.1f}"


def _fmt_needed(t: Target) -> str:
    if t.kind == "ratio":
        return f">= {t.threshold:g}x"
    if t.kind == "ratio_max":
        return f"<= {t.threshold:g}x"
    if t.kind == "growth":
        return f"<= {t.threshold * 100:g}%"
    return f"< {t.threshold:g}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


_RATIO_LEGEND = ("ratio: the first contender's median (mlpipe; batched for the embedding rows) "
                 "over that contender's, same run; above 1 is better for msg/s, below 1 for ms "
                 "and us/msg")


def render(figures: Iterable[Figure], checks: Sequence[Check], *, title: str = "") -> str:
    """The table ``make bench`` prints: medians with the (min..max) of the rounds and the
    ratios of medians (for latency and CPU, below 1 is better), then each target with its
    verdict, judged on medians."""
    index = {f.key: f for f in figures}
    out = [title] if title else []
    out += _grid(("workload", "contender", "median (min..max)", "ratio"), _rows(index))
    out.append(f"({_RATIO_LEGEND})")
    out.append("")
    target_rows = [(c.target.name, _fmt_measured(c), _fmt_needed(c.target),
                    c.verdict + (f" ({_short(c.why)})" if c.why else "")) for c in checks]
    out += _grid(("target (medians)", "measured", "needed", "result"), target_rows)
    return "\n".join(out)


def figures_from_json(doc: Mapping[str, Any]) -> list[Figure]:
    """The figures of a results file, as ``Report.to_json`` wrote them. The value is the
    median of the samples wherever there are samples, so a file written before medians (its
    values were best rounds) is shown and judged as what the table says it is."""
    figures = []
    for f in doc["figures"]:
        samples = tuple(float(s) for s in f.get("samples", ()))
        value = median(samples) if samples else f["value"]
        figures.append(Figure(f["workload"], f["contender"], f["unit"], value, samples,
                              f.get("higher_is_better", True), f.get("note", "")))
    return figures


def markdown(doc: Mapping[str, Any]) -> str:
    """The README's performance table, made from a results file (``python -m bench.report
    bench/results/latest.json``), so the README shows measured figures and nothing else."""
    figures = figures_from_json(doc)
    index = {f.key: f for f in figures}
    env = doc.get("environment", {})
    load = (f"load average {env['load_avg_start'][0]} at start, {env['load_avg_end'][0]} at end"
            if "load_avg_start" in env and "load_avg_end" in env else "load average unknown")
    out = [f"`make bench` ({doc.get('mode', '?')} run, {doc.get('started_at', '?')}, "
           f"{doc.get('seconds', 0):.0f} s, {env.get('cpus', '?')} CPUs shared with other work, "
           f"{load}; RabbitMQ {env.get('rabbitmq', '?')}, Python {env.get('python', '?')}, "
           f"commit {env.get('commit', '?')}; median (min..max) of "
           f"{doc.get('plan', {}).get('rounds', '?')} interleaved rounds):", "",
           "| workload | contender | median (min..max) | ratio |", "|---|---|---|---|"]
    for w_title, label, value, rel in _rows(index):
        out.append(f"| {w_title} | {label} | {value} | {rel} |")
    out += ["", _RATIO_LEGEND[0].upper() + _RATIO_LEGEND[1:] + ".",
            "", "| target (medians) | measured | needed | result |", "|---|---|---|---|"]
    for c in check_all(figures):
        why = f" ({_short(c.why)})" if c.why else ""
        out.append(f"| {c.target.name} | {_fmt_measured(c)} | {_fmt_needed(c.target)} | "
                   f"{c.verdict}{why} |")
    return "\n".join(out)


# --- JSON ---------------------------------------------------------------------------------------


def _ratios(index: Mapping[tuple[str, str], Figure]) -> dict[str, float | None]:
    return {
        f"{w.key}/{key}": ratio(index[(w.key, w.reference)].value, index[(w.key, key)].value)
        for w in WORKLOADS if w.ratios and (w.key, w.reference) in index
        for key, _ in w.contenders if key != w.reference and (w.key, key) in index
    }


@dataclass
class Report:
    """Everything one run wrote to ``bench/results/<timestamp>.json``."""

    started_at: str
    mode: str
    seconds: float
    environment: dict[str, Any]
    plan: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    durations_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        checks = check_all(self.figures)
        index = {f.key: f for f in self.figures}
        return {
            "started_at": self.started_at,
            "mode": self.mode,
            "seconds": round(self.seconds, 1),
            "statistic": "median of the interleaved rounds; min and max of the rounds",
            "environment": self.environment,
            "plan": self.plan,
            "figures": [{**asdict(f), "min": f.low, "max": f.high} for f in self.figures],
            "ratios": _ratios(index),
            "targets": [{"name": c.target.name, "issue": c.target.issue,
                         "measured": c.measured, "needed": _fmt_needed(c.target),
                         "verdict": c.verdict, "why": c.why}
                        for c in checks],
            "durations_s": {k: round(v, 1) for k, v in self.durations_s.items()},
            "errors": self.errors,
            "notes": self.notes,
        }


if __name__ == "__main__":  # pragma: no cover - a two-line command-line wrapper
    import json
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json"
    with open(path) as f:
        print(markdown(json.load(f)))
