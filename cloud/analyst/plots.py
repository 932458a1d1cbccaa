"""Server-rendered SVG plots for the console (matplotlib's SVG backend: no browser library,
no network). Each function returns the SVG text; none keeps figures open."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

__all__ = ["signal_svg"]


def signal_svg(
    title: str,
    times: Sequence[datetime],
    series: dict[str, Sequence[float | None]],
    *,
    events: Sequence[tuple[datetime, str]] = (),
    threshold: float | None = None,
    ylabel: str = "",
) -> str:
    """A line plot of ``series`` (name -> one value per time, None = no value) over ``times``,
    a dashed horizontal line at ``threshold``, and a vertical line per ``(time, label)`` in
    ``events`` (drift events opened, baselines accepted). Returns SVG text."""
    import matplotlib

    matplotlib.use("svg", force=False)
    from matplotlib.dates import AutoDateFormatter, AutoDateLocator, date2num
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 2.6), dpi=100)
    ax = fig.add_subplot()
    styles = ["-", "--", ":", "-."]
    for i, (name, values) in enumerate(series.items()):
        pts = [(t, v) for t, v in zip(times, values, strict=True) if v is not None]
        if pts:
            ax.plot(
                date2num([p[0] for p in pts]),
                [p[1] for p in pts],
                styles[i % len(styles)],
                label=name,
                linewidth=1.4,
            )
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=0.8, label=f"min effect {threshold:g}")
    for t, label in events:
        ax.axvline(
            float(date2num(t)),
            color="tab:red" if label.startswith("opened") else "tab:green",
            alpha=0.6,
            linewidth=1,
        )
        x = float(date2num(t))
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right", color="tab:red")  # fmt: skip
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(AutoDateFormatter(locator))
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if series or threshold is not None:
        ax.legend(fontsize=7, loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    out = io.StringIO()
    fig.savefig(out, format="svg")
    return out.getvalue()
