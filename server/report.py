"""The demo's outputs: a per-day text table, ``summary.json`` and a self-contained ``report.html``.

Plots are inline SVG and images inline PNG, so the report opens anywhere without a network.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUMMARY_KEYS = (
    "day",
    "sites",
    "valid_presentations",
    "median_noise_corrected_ev",
    "stretch_success_fraction",
    "median_stretch_ratio",
    "onehot_improved_fraction",
    "overprediction",
)


@dataclass
class DaySummary:
    day: int
    sites: int
    valid_presentations: int
    median_noise_corrected_ev: float | None = None
    stretch_success_fraction: float | None = None
    stretch_success_ci: tuple[float, float] | None = None
    median_stretch_ratio: float | None = None
    onehot_improved_fraction: float | None = None
    overprediction: float | None = None
    n_targets: int = 0
    stretch_ratios: list[float] = field(default_factory=list)
    onehot_scores: list[tuple[float, float]] = field(default_factory=list)  # (synthetic, natural)
    predicted_vs_measured: list[tuple[float, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: _clean(v) for k, v in data.items()}


@dataclass(frozen=True)
class ExampleImage:
    png: bytes
    target_site: int
    kind: str  # "stretch" | "one_hot"
    day: int
    predicted: float | None  # model units (``predicted_units``)
    measured: float | None  # mean spike count in the response window
    predicted_units: str = ""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def format_table(days: Sequence[DaySummary]) -> str:
    header = (
        "day",
        "sites",
        "valid pres.",
        "median NC-EV",
        "stretch success (95% CI)",
        "median stretch ratio",
        "one-hot improved",
        "over-prediction",
    )
    rows = []
    for d in days:
        ci = (
            f" ({_pct(d.stretch_success_ci[0])}–{_pct(d.stretch_success_ci[1])})"
            if d.stretch_success_ci
            else ""
        )
        rows.append(
            (
                str(d.day),
                str(d.sites),
                str(d.valid_presentations),
                _fmt(d.median_noise_corrected_ev),
                _pct(d.stretch_success_fraction) + ci,
                _fmt(d.median_stretch_ratio),
                _pct(d.onehot_improved_fraction),
                _fmt(d.overprediction),
            )
        )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])


def write_summary(path: Path, days: Sequence[DaySummary], extra: dict[str, Any]) -> None:
    payload = {
        "days": [
            {k: d.to_json()[k] for k in SUMMARY_KEYS}
            | {
                "stretch_success_ci": d.to_json()["stretch_success_ci"],
                "n_targets": d.n_targets,
            }
            for d in days
        ],
        **extra,
    }
    path.write_text(json.dumps(payload, indent=2))


# --------------------------------------------------------------------------- SVG plots


def _scale(lo: float, hi: float, a: float, b: float) -> Any:
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def svg_scatter(
    points: Sequence[tuple[float, float]], title: str, xlabel: str, ylabel: str, size: int = 320
) -> str:
    if not points:
        return f'<p class="empty">{html.escape(title)}: nothing to show yet</p>'
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    lo = min(min(xs), min(ys))
    hi = max(max(xs), max(ys))
    pad = 40
    sx = _scale(lo, hi, pad, size - 10)
    sy = _scale(lo, hi, size - pad, 10)
    dots = "".join(
        f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#2b6cb0" fill-opacity="0.6"/>'
        for x, y in points
    )
    diag = (
        f'<line x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" y2="{sy(hi):.1f}" '
        'stroke="#999" stroke-dasharray="4 3"/>'
    )
    return (
        f'<figure><svg width="{size}" height="{size}" role="img" aria-label="{html.escape(title)}">'
        f'<rect x="{pad}" y="10" width="{size - pad - 10}" height="{size - pad - 10}" fill="none" stroke="#ccc"/>'
        f"{diag}{dots}"
        f'<text x="{size / 2:.0f}" y="{size - 8}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>'
        f'<text x="12" y="{size / 2:.0f}" font-size="11" transform="rotate(-90 12 {size / 2:.0f})" text-anchor="middle">{html.escape(ylabel)}</text>'
        f'<text x="{pad + 4}" y="24" font-size="10">{lo:.2f} … {hi:.2f}</text>'
        f"</svg><figcaption>{html.escape(title)}</figcaption></figure>"
    )


def svg_days(
    series: dict[str, list[float | None]],
    days: Sequence[int],
    title: str,
    ylabel: str,
    reference: float | None = None,
    width: int = 420,
    height: int = 260,
) -> str:
    values = [v for vs in series.values() for v in vs if v is not None]
    if not values:
        return f'<p class="empty">{html.escape(title)}: nothing to show yet</p>'
    lo = min([*values, reference if reference is not None else values[0], 0.0])
    hi = max([*values, reference if reference is not None else values[0]]) * 1.1 or 1.0
    pad = 44
    sx = _scale(min(days), max(days) if len(days) > 1 else min(days) + 1, pad, width - 20)
    sy = _scale(lo, hi, height - 30, 12)
    colors = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1"]
    parts = []
    for i, (name, vs) in enumerate(series.items()):
        pts = [(sx(d), sy(v)) for d, v in zip(days, vs, strict=True) if v is not None]
        color = colors[i % len(colors)]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>' for x, y in pts)
        parts.append(
            f'<text x="{width - 150}" y="{20 + 14 * i}" font-size="11" fill="{color}">{html.escape(name)}</text>'
        )
    if reference is not None:
        parts.append(
            f'<line x1="{pad}" x2="{width - 20}" y1="{sy(reference):.1f}" y2="{sy(reference):.1f}" stroke="#999" stroke-dasharray="4 3"/>'
        )
    ticks = "".join(
        f'<text x="{sx(d):.1f}" y="{height - 12}" font-size="10" text-anchor="middle">day {d}</text>'
        for d in days
    )
    yt = "".join(
        f'<text x="{pad - 4}" y="{sy(v):.1f}" font-size="10" text-anchor="end">{v:.2f}</text>'
        for v in (lo, (lo + hi) / 2, hi)
    )
    return (
        f'<figure><svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">'
        f'<rect x="{pad}" y="10" width="{width - pad - 20}" height="{height - 40}" fill="none" stroke="#ccc"/>'
        f"{''.join(parts)}{ticks}{yt}"
        f'<text x="10" y="{height / 2:.0f}" font-size="11" transform="rotate(-90 10 {height / 2:.0f})" text-anchor="middle">{html.escape(ylabel)}</text>'
        f"</svg><figcaption>{html.escape(title)}</figcaption></figure>"
    )


def write_report(
    path: Path,
    days: Sequence[DaySummary],
    examples: Sequence[ExampleImage],
    meta: dict[str, Any],
) -> None:
    day_numbers = [d.day for d in days]
    scatter_points = [p for d in days for p in d.predicted_vs_measured]
    ratios = {
        "median stretch ratio": [d.median_stretch_ratio for d in days],
    }
    fractions = {
        "stretch success": [d.stretch_success_fraction for d in days],
        "one-hot improved": [d.onehot_improved_fraction for d in days],
    }
    onehot_points = [p for d in days for p in d.onehot_scores]
    gallery = "".join(
        '<figure class="img"><img src="data:image/png;base64,'
        + base64.b64encode(e.png).decode()
        + f'" width="96" height="96" alt="site {e.target_site}"/><figcaption>day {e.day} · '
        f"{html.escape(e.kind)} · site {e.target_site}<br/>pred {_fmt(e.predicted)}"
        f"{' ' + html.escape(e.predicted_units.split(' ')[0]) if e.predicted_units else ''}"
        f" · meas {_fmt(e.measured)} spikes</figcaption></figure>"
        for e in examples
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(c)}</td>"
            for c in (
                str(d.day),
                str(d.sites),
                str(d.valid_presentations),
                _fmt(d.median_noise_corrected_ev),
                _pct(d.stretch_success_fraction),
                _fmt(d.median_stretch_ratio),
                _pct(d.onehot_improved_fraction),
                _fmt(d.overprediction),
            )
        )
        + "</tr>"
        for d in days
    )
    meta_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in meta.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>popcontrol demo report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1a202c; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ddd; padding: 4px 8px; }}
th {{ background: #f7fafc; text-align: left; }} figure {{ display: inline-block; margin: 8px; vertical-align: top; }}
figure.img figcaption {{ font-size: 11px; }} .empty {{ color: #888; }}
</style></head><body>
<h1>popcontrol — closed-loop demo</h1>
<p>Simulated recording days on the virtual monkey, run end to end through the real HTTP and
ZeroMQ paths. Stretch ratio = max measured mean response over a target's synthetic images /
max over natural images (&gt; 1 means control beyond the natural range).</p>
<table><tr><th>day</th><th>sites</th><th>valid presentations</th><th>median NC-EV</th>
<th>stretch success</th><th>median stretch ratio</th><th>one-hot improved</th><th>over-prediction</th></tr>
{rows}</table>
<h2>Control across days</h2>
{svg_days(ratios, day_numbers, "Median stretch ratio per day (dashed: 1 = best natural image)", "ratio", reference=1.0)}
{svg_days(fractions, day_numbers, "Fraction of targets controlled per day", "fraction")}
<h2>Model</h2>
{svg_scatter(scatter_points, "Predicted vs measured response on synthetic images (all days)", "predicted", "measured")}
{svg_scatter(onehot_points, "One-hot control score: best synthetic (x) vs best natural (y)", "synthetic", "natural")}
<h2>Example synthetic images by target</h2>
<p>pred: the model's prediction at the target, in its units (z: responses z-scored per session
with the normalizer images); meas: the measured mean spike count of the target in its response
window.</p>
<div>{gallery or '<p class="empty">no synthetic images yet</p>'}</div>
<h2>Run</h2><table>{meta_rows}</table>
</body></html>
"""
    path.write_text(page)
