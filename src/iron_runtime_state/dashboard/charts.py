"""Charts drawn on the server as SVG: budget usage bars and the spend-over-time line.

No chart library and no script: the SVG is part of the page, styled by the package's own
stylesheet through class names (so the page's content security policy needs no inline style).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from .html import Html, el, join

__all__ = ["nice_ticks", "spend_chart", "usage_bar"]

_SVG_NS = "http://www.w3.org/2000/svg"


def _n(value: float) -> str:
    """A coordinate, short."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


def usage_bar(spent: float, held: float, limit: float | None, *, width: int = 160, height: int = 12) -> Html:
    """A bar of a budget's period: spent (solid) and held (hatched) against the limit.

    Past the limit the bar is full and marked ``over``; without a limit it is empty, with the
    spend as its tooltip.
    """
    if not limit:
        title = f"spent {spent:,.6g}, held {held:,.6g}, no limit"
        spent_w = held_w = 0.0
        state = "nolimit"
    else:
        used = (spent + held) / limit
        spent_w = min(spent / limit, 1.0) * width
        held_w = min(max(width - spent_w, 0.0), held / limit * width)
        state = "over" if used > 1.0 else "high" if used >= 0.8 else "ok"
        title = f"spent {spent:,.6g} + held {held:,.6g} of {limit:,.6g} ({used:.0%})"
    return el(
        "svg",
        {
            "xmlns": _SVG_NS,
            "class": f"bar bar-{state}",
            "width": width,
            "height": height,
            "viewBox": f"0 0 {width} {height}",
            "role": "img",
            "aria-label": title,
        },
        el("title", None, title),
        el("rect", {"class": "bar-track", "x": 0, "y": 0, "width": width, "height": height, "rx": 2}),
        el("rect", {"class": "bar-spent", "x": 0, "y": 0, "width": _n(spent_w), "height": height, "rx": 2}),
        el(
            "rect",
            {"class": "bar-held", "x": _n(spent_w), "y": 0, "width": _n(held_w), "height": height},
        )
        if held_w > 0
        else None,
    )


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """Round values from 0 to at least ``top`` for an axis (1, 2 or 5 times a power of ten apart)."""
    if top <= 0:
        return [0.0, 1.0]
    raw_step = top / count
    power = 10 ** math.floor(math.log10(raw_step))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw_step)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _clock(stamp: float, span: float) -> str:
    fmt = "%H:%M:%S" if span < 600 else "%H:%M" if span < 2 * 86400 else "%m-%d %H:%M"
    return time.strftime(fmt, time.gmtime(stamp))


def spend_chart(points: Sequence[tuple[float, float]], *, width: int = 640, height: int = 200) -> Html:
    """The fleet's total spend over time (``(unix_seconds, spent)`` points, oldest first) as SVG.

    Times are UTC. With no point yet the chart says so.
    """
    left, right, top, bottom = 56, 12, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    frame = {
        "xmlns": _SVG_NS,
        "class": "chart",
        "viewBox": f"0 0 {width} {height}",
        "preserveAspectRatio": "xMidYMid meet",
        "role": "img",
        "aria-label": "Total spend over time",
    }
    if not points:
        return el(
            "svg",
            frame,
            el("text", {"class": "chart-empty", "x": width / 2, "y": height / 2}, "no spend sampled yet"),
        )
    t0, t1 = points[0][0], points[-1][0]
    t1 = max(t1, t0 + 60)  # at least a minute wide: a new history grows from the left
    span = t1 - t0
    ticks = nice_ticks(max(value for _, value in points) or 1.0)
    y_max = ticks[-1]

    def x(t: float) -> float:
        return left + (t - t0) / span * plot_w

    def y(v: float) -> float:
        return top + plot_h - v / y_max * plot_h

    line = " ".join(f"{_n(x(t))},{_n(y(v))}" for t, v in points)
    area = f"{_n(x(points[0][0]))},{_n(y(0))} {line} {_n(x(points[-1][0]))},{_n(y(0))}"
    grid = [
        join(
            el(
                "line",
                {"class": "chart-grid", "x1": left, "x2": width - right, "y1": _n(y(v)), "y2": _n(y(v))},
            ),
            el("text", {"class": "chart-label chart-y", "x": left - 6, "y": _n(y(v) + 4)}, f"{v:,.6g}"),
        )
        for v in ticks
    ]
    times = [
        el("text", {"class": "chart-label chart-x", "x": _n(x(t)), "y": height - 8}, _clock(t, span))
        for t in (t0 + span * i / 4 for i in range(5))
    ]
    last_t, last_v = points[-1]
    return el(
        "svg",
        frame,
        el("title", None, f"Total spend over time (UTC); now {last_v:,.6g}"),
        grid,
        times,
        el("polygon", {"class": "chart-area", "points": area}),
        el("polyline", {"class": "chart-line", "points": line}),
        el("circle", {"class": "chart-dot", "cx": _n(x(last_t)), "cy": _n(y(last_v)), "r": 3}),
    )
