"""Turning measured figures into ratios, target verdicts, tables and JSON. Pure: no I/O
(except ``python -m bench.report FILE``, which prints the README table of a results file).

Kept apart from the measuring code so that the arithmetic that decides PASS or FAIL is unit
tested (``tests/unit/test_bench_report.py``) and cannot drift with the workloads. Ratios are
always *mlpipe ÷ baseline* of figures taken in the same run; a figure that could not be
measured stays ``None`` all the way to the table (shown with its reason), and a target that
depends on it is ``NOT MEASURED``, never PASS.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: The contender every ratio is taken from.
MLPIPE = "mlpipe"


@dataclass(frozen=True)
class Figure:
    """One number of one contender in one workload (the best of its rounds).

    :param workload: key such as ``noop_consume``.
    :param contender: key such as ``mlpipe`` or ``raw_aio_pika``.
    :param unit: ``msg/s``, ``ms`` or ``MB``.
    :param samples: every round's value; ``value`` is the best of them.
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


def best(samples: Sequence[float], *, higher_is_better: bool = True) -> float | None:
    """The best round: on a shared machine other processes only ever slow a round down, so
    the best one is the least disturbed estimate of what the contender can do."""
    finite = [s for s in samples if math.isfinite(s)]
    if not finite:
        return None
    return max(finite) if higher_is_better else min(finite)


def figure(workload: str, contender: str, unit: str, samples: Iterable[float], *,
           higher_is_better: bool = True, note: str = "") -> Figure:
    values = tuple(float(s) for s in samples)
    return Figure(workload, contender, unit, best(values, higher_is_better=higher_is_better),
                  values, higher_is_better, note)


def missing(workload: str, contender: str, unit: str, why: str, *,
            higher_is_better: bool = True) -> Figure:
    """A figure that was not measured, with the reason shown in its place."""
    return Figure(workload, contender, unit, None, (), higher_is_better, why)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


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


@dataclass(frozen=True)
class Target:
    """A target of issue 7.

    ``kind``: ``ratio`` (figure ``a`` ÷ figure ``b`` at least ``threshold``), ``below``
    (figure ``a`` under ``threshold``) or ``growth`` ((``b`` - ``a``) ÷ ``a`` at most
    ``threshold``).
    """

    name: str
    kind: Literal["ratio", "below", "growth"]
    a: tuple[str, str]
    threshold: float
    b: tuple[str, str] | None = None


@dataclass(frozen=True)
class Check:
    target: Target
    measured: float | None
    verdict: Verdict
    why: str = ""


TARGETS: tuple[Target, ...] = (
    Target("no-op consume vs raw aio-pika", "ratio", ("noop_consume", MLPIPE), 0.85,
           ("noop_consume", "raw_aio_pika")),
    Target("no-op consume vs Celery", "ratio", ("noop_consume", MLPIPE), 3.0,
           ("noop_consume", "celery")),
    Target("no-op consume vs FastStream", "ratio", ("noop_consume", MLPIPE), 1.2,
           ("noop_consume", "faststream")),
    Target("full path vs no-op raw aio-pika", "ratio", ("full_path", MLPIPE), 0.5,
           ("noop_consume", "raw_aio_pika")),
    Target("full path vs raw full path", "ratio", ("full_path", MLPIPE), 1.0,
           ("full_path", "raw_aio_pika")),
    Target("publishing, many in flight, vs raw", "ratio", ("publish_in_flight", MLPIPE), 0.8,
           ("publish_in_flight", "raw_aio_pika")),
    Target("embedding micro-batching vs per message", "ratio",
           ("embed_batching", "batched"), 4.0, ("embed_batching", "per_message")),
    Target("idle daemon RSS (MB)", "below", ("memory", "idle"), 80.0),
    Target("RSS growth between the two task counts", "growth", ("memory", "after_a"), 0.10,
           ("memory", "after_b")),
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
    if target.kind == "ratio":
        measured = ratio(a.value, b.value)
        if measured is None:
            return Check(target, None, "NOT MEASURED", "baseline figure is zero")
        return Check(target, measured, "PASS" if measured >= target.threshold else "FAIL")
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
    #: False for figures that are not "mlpipe vs a baseline" (memory readings).
    ratios: bool = True


WORKLOADS: tuple[Workload, ...] = (
    Workload("noop_consume", "1. no-op consume", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"), ("faststream", "FastStream"),
        ("celery", "Celery"))),
    Workload("noop_cpu", "1'. no-op consume, client CPU", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"), ("faststream", "FastStream"))),
    Workload("full_path", "2. full path (lock + upsert + ack)", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("publish_serial", "3a. publish, one at a time", (
        (MLPIPE, "mlpipe Producer"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("publish_in_flight", "3b. publish, many in flight", (
        (MLPIPE, "mlpipe Producer"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("latency_p50", "4a. latency p50", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("latency_p99", "4b. latency p99", (
        (MLPIPE, "mlpipe"), ("raw_aio_pika", "raw aio-pika"))),
    Workload("embed_batching", "5. embedding micro-batching", (
        ("batched", "batched"), ("per_message", "one call per message")), ratios=False),
    Workload("memory", "6. daemon RSS", (
        ("idle", "idle"), ("after_a", "after first count"), ("after_b", "after second count"),
        ("models_idle", "shipped handlers, idle"),
        ("models_loaded", "offline models loaded")), ratios=False),
)


#: Longest reason shown inside the table; the full text is in the JSON and the error list.
NOTE_WIDTH = 60


def _short(text: str, width: int = NOTE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt_value(f: Figure) -> str:
    if f.value is None:
        return f"— ({_short(f.note)})" if f.note else "—"
    if f.unit in ("msg/s", "us/msg"):
        return f"{f.value:,.0f} {f.unit}"
    return f"{f.value:,.1f} {f.unit}" if f.unit != "ms" else f"{f.value:,.2f} ms"


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _rows(figures: Mapping[tuple[str, str], Figure]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for w in WORKLOADS:
        mine = figures.get((w.key, MLPIPE))
        first = True
        for key, label in w.contenders:
            f = figures.get((w.key, key))
            if f is None:
                continue
            shown = label if not f.note or f.value is None else f"{label} [{f.note}]"
            rel = ""
            if w.ratios and key != MLPIPE:
                rel = _fmt_ratio(ratio(mine.value if mine else None, f.value))
            rows.append((w.title if first else "", shown, _fmt_value(f), rel))
            first = False
    return rows


def _fmt_measured(c: Check) -> str:
    if c.measured is None:
        return "n/a"
    if c.target.kind == "ratio":
        return f"{c.measured:.2f}x"
    if c.target.kind == "growth":
        return f"{c.measured * 100:+.1f}%"
    return f"{c.measured:.1f}"


def _fmt_needed(t: Target) -> str:
    if t.kind == "ratio":
        return f">= {t.threshold:g}x"
    if t.kind == "growth":
        return f"<= {t.threshold * 100:g}%"
    return f"< {t.threshold:g}"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def render(figures: Iterable[Figure], checks: Sequence[Check], *, title: str = "") -> str:
    """The table ``make bench`` prints: figures with mlpipe ÷ baseline ratios (for latency,
    below 1 is better), then each target with its verdict."""
    index = {f.key: f for f in figures}
    out = [title] if title else []
    out += _grid(("workload", "contender", "figure", "mlpipe ÷ it"), _rows(index))
    out.append("(mlpipe ÷ it: mlpipe's figure over that contender's, same run; above 1 is better "
               "for msg/s, below 1 for ms and us/msg)")
    out.append("")
    target_rows = [(c.target.name, _fmt_measured(c), _fmt_needed(c.target),
                    c.verdict + (f" ({_short(c.why)})" if c.why else "")) for c in checks]
    out += _grid(("target", "measured", "needed", "result"), target_rows)
    return "\n".join(out)


def figures_from_json(doc: Mapping[str, Any]) -> list[Figure]:
    """The figures of a results file, as ``Report.to_json`` wrote them."""
    return [Figure(f["workload"], f["contender"], f["unit"], f["value"],
                   tuple(f.get("samples", ())), f.get("higher_is_better", True),
                   f.get("note", "")) for f in doc["figures"]]


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
           f"commit {env.get('commit', '?')}; best of {doc.get('plan', {}).get('rounds', '?')} "
           "interleaved rounds):", "",
           "| workload | contender | figure | mlpipe ÷ it |", "|---|---|---|---|"]
    for w_title, label, value, rel in _rows(index):
        out.append(f"| {w_title} | {label} | {value} | {rel} |")
    out += ["", "mlpipe ÷ it: mlpipe's figure over that contender's, same run; above 1 is better "
            "for msg/s, below 1 for ms and us/msg.",
            "", "| target | measured | needed | result |", "|---|---|---|---|"]
    for c in check_all(figures):
        why = f" ({_short(c.why)})" if c.why else ""
        out.append(f"| {c.target.name} | {_fmt_measured(c)} | {_fmt_needed(c.target)} | "
                   f"{c.verdict}{why} |")
    return "\n".join(out)


# --- JSON ---------------------------------------------------------------------------------------


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
        ratios = {
            f"{w.key}/{key}": ratio(index[(w.key, MLPIPE)].value, index[(w.key, key)].value)
            for w in WORKLOADS if w.ratios and (w.key, MLPIPE) in index
            for key, _ in w.contenders if key != MLPIPE and (w.key, key) in index
        }
        return {
            "started_at": self.started_at,
            "mode": self.mode,
            "seconds": round(self.seconds, 1),
            "environment": self.environment,
            "plan": self.plan,
            "figures": [asdict(f) for f in self.figures],
            "ratios_mlpipe_over_baseline": ratios,
            "targets": [{"name": c.target.name, "measured": c.measured,
                         "needed": _fmt_needed(c.target), "verdict": c.verdict, "why": c.why}
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
