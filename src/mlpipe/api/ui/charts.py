"""Bar charts as inline SVG, drawn on the server: no chart library, no script, and the page
reads the same with JavaScript off. Labels are escaped; sizes are computed here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

_ROW, _LABEL_W, _BAR_W, _VALUE_W, _PAD = 26, 200, 340, 260, 6


@dataclass(frozen=True)
class Bar:
    label: str
    #: Share of the full width, 0..1 (clipped); above 1 the bar is drawn as over.
    fraction: float
    text: str


def bars(rows: Sequence[Bar], *, title: str, budget: bool = False) -> Markup:
    """``budget``: fractions are of a ceiling (green, amber from 80 %, red at 100 %);
    otherwise of the largest row, all in one colour."""
    height = max(1, len(rows)) * _ROW + _PAD
    width = _LABEL_W + _BAR_W + _VALUE_W
    parts = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>"]
    if not rows:
        parts.append('<text x="0" y="18" class="muted">nothing to show</text>')
    for i, row in enumerate(rows):
        y = i * _ROW + _PAD
        frac = max(0.0, row.fraction)
        w = round(min(frac, 1.0) * _BAR_W, 1)
        tone = ("over" if frac >= 1 else "warn" if frac >= 0.8 else "ok") if budget \
            else "plain"
        parts += [
            f'<text x="0" y="{y + 14}" class="label">{escape(row.label)}</text>',
            f'<rect x="{_LABEL_W}" y="{y}" width="{_BAR_W}" height="18" class="track"/>',
            f'<rect x="{_LABEL_W}" y="{y}" width="{w}" height="18" class="bar {tone}"/>',
            f'<text x="{_LABEL_W + _BAR_W + 8}" y="{y + 14}" class="value">'
            f"{escape(row.text)}</text>",
        ]
    parts.append("</svg>")
    return Markup("".join(parts))
