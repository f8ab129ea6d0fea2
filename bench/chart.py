"""The chart of a results file: every ratio target as a bar, its needed value as a mark.

``make bench`` writes it next to the JSON (``bench/results/latest.png``) for the README;
``python -m bench.chart [RESULTS.json [OUT.png]]`` redraws it from any results file. Made
from the JSON only (through ``bench.report``), so the picture and the table cannot disagree.

One row per ratio target (the MB targets are not ratios; they are in the table): the bar is
the ratio of medians, the whisker the lowest and highest round-by-round ratio when both
contenders ran every round, the black tick the threshold. The x axis is logarithmic, so 0.5x
and 2x are equally far from parity. Green means the target's PASS, red FAIL, grey NOT
MEASURED. Targets where lower is better (CPU, latency) say so in their label.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.report import Check, Figure, check_all, figures_from_json, round_ratios

COLOURS = {"PASS": "#2e7d32", "FAIL": "#c62828", "NOT MEASURED": "#9e9e9e"}


def _spread(c: Check, index: Mapping[tuple[str, str], Figure]) -> tuple[float, float] | None:
    t = c.target
    if t.b is None or c.measured is None:
        return None
    a, b = index.get(t.a), index.get(t.b)
    if a is None or b is None:
        return None
    per_round = round_ratios(a, b)
    if len(per_round) < 2:
        return None
    return min(per_round), max(per_round)


def _needed(c: Check) -> str:
    return ("≥ " if c.target.kind == "ratio" else "≤ ") + f"{c.target.threshold:g}x"


def write_chart(doc: Mapping[str, Any], path: Path) -> Path:
    """Draw the ratio targets of a results document to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figures = figures_from_json(doc)
    index = {f.key: f for f in figures}
    checks = [c for c in check_all(figures) if c.target.kind in ("ratio", "ratio_max")]
    checks.reverse()  # matplotlib draws the first row at the bottom
    fig, ax = plt.subplots(figsize=(9.5, 0.45 * len(checks) + 1.6), dpi=110)
    for y, c in enumerate(checks):
        colour = COLOURS[c.verdict]
        value = c.measured if c.measured is not None else c.target.threshold
        ax.barh(y, value, color=colour, alpha=0.85 if c.measured is not None else 0.25,
                height=0.6, left=0)
        spread = _spread(c, index)
        right = max(value, c.target.threshold)
        if spread is not None:
            ax.plot(spread, (y, y), color="#424242", linewidth=1, marker="|", markersize=6)
            right = max(right, spread[1])
        ax.plot((c.target.threshold,) * 2, (y - 0.38, y + 0.38), color="black", linewidth=2.5)
        text = f"{c.measured:.2f}x, {c.verdict}" if c.measured is not None else c.verdict
        ax.annotate(f"{text} (needs {_needed(c)})", (right, y), xytext=(6, -3),
                    textcoords="offset points", fontsize=8)
    ax.set_yticks(range(len(checks)),
                  [c.target.name + (" [lower is better]" if c.target.kind == "ratio_max"
                                    else "") for c in checks], fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    ax.set_xlabel("ratio of medians (bar), round-by-round range (line), needed (black tick)")
    env = doc.get("environment", {})
    ax.set_title(f"mlpipe bench, {doc.get('mode', '?')} run {doc.get('started_at', '?')}, "
                 f"{env.get('cpus', '?')} CPUs, median of "
                 f"{doc.get('plan', {}).get('rounds', '?')} rounds", fontsize=9)
    hi = max([c.measured or 0 for c in checks] + [c.target.threshold for c in checks])
    ax.set_xlim(0.1, max(30.0, hi * 8))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else Path("bench/results/latest.json")
    out = Path(argv[1]) if len(argv) > 1 else source.with_suffix(".png")
    print(write_chart(json.loads(source.read_text()), out))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
