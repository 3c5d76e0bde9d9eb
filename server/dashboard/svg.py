"""Small inline SVG plots drawn on the server: scatter, lines over days, histogram, mask heatmap.

Every label goes through ``html.escape``; numbers are formatted, so the output is safe to embed.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
from markupsafe import Markup

PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")


def _fmt(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 10_000:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _finite_pairs(xs: Sequence[float | None], ys: Sequence[float | None]) -> np.ndarray:
    pairs = [
        (float(x), float(y))
        for x, y in zip(xs, ys, strict=False)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
    ]
    return np.array(pairs, dtype=np.float64).reshape(-1, 2)


def _empty(width: int, height: int, message: str) -> Markup:
    return Markup(
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">'
        f"{html.escape(message)}</text></svg>"
    )


def scatter(
    xs: Sequence[float | None],
    ys: Sequence[float | None],
    *,
    x_label: str,
    y_label: str,
    width: int = 360,
    height: int = 320,
    diagonal: bool = True,
    title: str = "",
) -> Markup:
    """x-y scatter with axes, tick labels at the ends and an optional y = x line."""
    points = _finite_pairs(xs, ys)
    if points.size == 0:
        return _empty(width, height, "no points yet")
    pad_l, pad_r, pad_t, pad_b = 48, 12, 24 if title else 12, 40
    lo = points.min(axis=0)
    hi = points.max(axis=0)
    if diagonal:
        lo[:] = min(lo)
        hi[:] = max(hi)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def px(x: float) -> float:
        return pad_l + (x - lo[0]) / span[0] * plot_w

    def py(y: float) -> float:
        return pad_t + plot_h - (y - lo[1]) / span[1] * plot_h

    parts = [
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title or y_label)}">'
    ]
    if title:
        parts.append(
            f'<text x="{width / 2}" y="15" text-anchor="middle">{html.escape(title)}</text>'
        )
    parts.append(
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" class="frame"/>'
    )
    if diagonal:
        parts.append(
            f'<line x1="{px(lo[0]):.1f}" y1="{py(lo[1]):.1f}" x2="{px(hi[0]):.1f}" '
            f'y2="{py(hi[1]):.1f}" class="diag"/>'
        )
    parts.extend(
        f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" class="dot"/>' for x, y in points
    )
    parts.append(
        f'<text x="{pad_l}" y="{height - 24}" class="tick">{_fmt(lo[0])}</text>'
        f'<text x="{width - pad_r}" y="{height - 24}" text-anchor="end" class="tick">{_fmt(hi[0])}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end" class="tick">{_fmt(lo[1])}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end" class="tick">{_fmt(hi[1])}</text>'
        f'<text x="{pad_l + plot_w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text x="12" y="{pad_t + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {pad_t + plot_h / 2})">{html.escape(y_label)}</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


def lines(
    labels: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    width: int = 640,
    height: int = 260,
    reference: float | None = None,
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """One line per series over the categorical x axis ``labels`` (e.g. recording days)."""
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not labels or not values:
        return _empty(width, height, "no evaluations yet")
    pad_l, pad_r, pad_t, pad_b = 48, 140, 12, 44
    lo = min([*values, *([reference] if reference is not None else [])], default=0.0)
    hi = max([*values, *([reference] if reference is not None else [])], default=1.0)
    lo = min(lo, 0.0)
    if y_range is not None:
        lo, hi = min(lo, y_range[0]), max(hi, y_range[1])
    span = hi - lo if hi > lo else 1.0
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    step = plot_w / max(1, len(labels) - 1)

    def px(i: int) -> float:
        return pad_l + (i * step if len(labels) > 1 else plot_w / 2)

    def py(v: float) -> float:
        return pad_t + plot_h - (v - lo) / span * plot_h

    parts = [
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" class="frame"/>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" text-anchor="end" class="tick">{_fmt(lo)}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end" class="tick">{_fmt(hi)}</text>',
    ]
    if reference is not None:
        parts.append(
            f'<line x1="{pad_l}" x2="{pad_l + plot_w}" y1="{py(reference):.1f}" '
            f'y2="{py(reference):.1f}" class="diag"/>'
        )
    every = max(1, math.ceil(len(labels) / 8))
    for i, label in enumerate(labels):
        if i % every == 0:
            parts.append(
                f'<text x="{px(i):.1f}" y="{height - pad_b + 16}" text-anchor="middle" class="tick">'
                f"{html.escape(label)}</text>"
            )
    for k, (name, ys) in enumerate(series.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = [(px(i), py(v)) for i, v in enumerate(ys) if v is not None and math.isfinite(v)]
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts)
        ly = pad_t + 14 + 18 * k
        parts.append(
            f'<rect x="{width - pad_r + 10}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
            f'<text x="{width - pad_r + 24}" y="{ly}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def histogram(
    values: Sequence[float | None],
    *,
    label: str,
    bins: int = 20,
    width: int = 360,
    height: int = 200,
    value_range: tuple[float, float] | None = None,
) -> Markup:
    data = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if data.size == 0:
        return _empty(width, height, "no values")
    counts, edges = np.histogram(data, bins=bins, range=value_range)
    pad_l, pad_b, pad_t = 36, 36, 8
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    top = max(1, int(counts.max()))
    bar_w = plot_w / len(counts)
    parts = [
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f'<rect x="{pad_l}" y="{pad_t}" width="{plot_w}" height="{plot_h}" class="frame"/>',
    ]
    for i, c in enumerate(counts):
        h = c / top * plot_h
        parts.append(
            f'<rect x="{pad_l + i * bar_w:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bar_w - 1:.1f}" '
            f'height="{h:.1f}" class="bar"><title>{_fmt(edges[i])}–{_fmt(edges[i + 1])}: {c}</title></rect>'
        )
    parts.append(
        f'<text x="{pad_l}" y="{height - 20}" class="tick">{_fmt(edges[0])}</text>'
        f'<text x="{width - 8}" y="{height - 20}" text-anchor="end" class="tick">{_fmt(edges[-1])}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" text-anchor="end" class="tick">{top}</text>'
        f'<text x="{pad_l + plot_w / 2}" y="{height - 4}" text-anchor="middle">{html.escape(label)}</text>'
        "</svg>"
    )
    return Markup("".join(parts))


def mask(values: np.ndarray, *, size_px: int = 64, title: str = "") -> Markup:
    """A (rows, cols) array as a grey-scale grid, scaled to its own min..max."""
    rows, cols = values.shape
    lo, hi = float(values.min()), float(values.max())
    scale = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    cell_w, cell_h = size_px / cols, size_px / rows
    parts = [
        f'<svg class="mask" width="{size_px}" height="{size_px}" viewBox="0 0 {size_px} {size_px}">'
        f"<title>{html.escape(title)}</title>"
    ]
    for r in range(rows):
        for c in range(cols):
            level = round(255 * (1 - float(scale[r, c])))
            parts.append(
                f'<rect x="{c * cell_w:.2f}" y="{r * cell_h:.2f}" width="{cell_w + 0.05:.2f}" '
                f'height="{cell_h + 0.05:.2f}" fill="rgb({level},{level},{level})"/>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))
