"""Plots of replays and simulations: temperature with zone bands, power and limit, VRAM per
class, decision markers. matplotlib is optional (the ``plot`` extra) and imported only here,
only when a plot is asked for; it draws with the Agg backend into a file, never a window.
"""

from __future__ import annotations

import bisect
import importlib.util
import io
import math
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from governor.model import ThermalZone
from governor.safefile import write_atomic
from governor.whatif.common import EXIT_USAGE, WhatIfError
from governor.whatif.series import GpuSeries

MISSING_MESSAGE = "matplotlib is needed for --plot: pip install 'gpu-governor[plot]'"
MAX_POINTS = 4000
"""Points per line at most: longer series are reduced per bucket (max temperature, mean power)."""
GIB = 1024.0**3
ZONE_COLOURS = {
    ThermalZone.OPTIMAL: "#2ca02c",
    ThermalZone.WARNING: "#ffdd57",
    ThermalZone.HOT: "#ff9f1c",
    ThermalZone.THROTTLE: "#e4572e",
    ThermalZone.CRITICAL: "#8b0000",
}
MARK_STYLES = {  # rule -> (marker, colour, legend text)
    "power_step_down": ("v", "#1f77b4", "step down"),
    "power_step_up": ("^", "#2ca02c", "step up"),
    "power_critical": ("X", "#d62728", "critical jump"),
    "power_drift_reapply": ("D", "#9467bd", "drift re-applied"),
    "vram_over_budget": ("s", "#8c564b", "over budget"),
    "vram_enforce": ("P", "#d62728", "process signalled"),
    "vram_escalate": ("P", "#7f0000", "process killed"),
}


def require_matplotlib() -> None:
    """Raise WhatIfError with the install hint when matplotlib cannot be imported."""
    if importlib.util.find_spec("matplotlib") is None:
        raise WhatIfError(MISSING_MESSAGE, EXIT_USAGE)


def _reduce(t: array[float], values: array[float], how: str) -> tuple[list[float], list[float]]:
    """At most MAX_POINTS points: each bucket's first time and its max, mean or last value (NaN-aware)."""
    n = len(t)
    if n <= MAX_POINTS:
        return list(t), list(values)
    size = math.ceil(n / MAX_POINTS)
    xs: list[float] = []
    ys: list[float] = []
    for start in range(0, n, size):
        chunk = [v for v in values[start : start + size] if not math.isnan(v)]
        xs.append(t[start])
        if not chunk:
            ys.append(math.nan)
        elif how == "max":
            ys.append(max(chunk))
        elif how == "mean":
            ys.append(sum(chunk) / len(chunk))
        else:
            ys.append(chunk[-1])
    return xs, ys


def _time_unit(series: Sequence[GpuSeries]) -> tuple[float, str]:
    span = max((s.t_s[-1] - s.t_s[0] for s in series if len(s.t_s)), default=0.0)
    if span > 3 * 3600:
        return 3600.0, "h"
    if span > 600:
        return 60.0, "min"
    return 1.0, "s"


def _scaled(values: Sequence[float], unit: float) -> list[float]:
    return [v / unit for v in values]


def _zone_bands(ax: Any, zones: Sequence[tuple[ThermalZone, float]], low: float, high: float) -> None:
    """Shade each zone's temperature band between ``low`` and ``high`` C."""
    bounds = [(ThermalZone.OPTIMAL, -math.inf), *zones]
    for k, (zone, lower) in enumerate(bounds):
        upper = bounds[k + 1][1] if k + 1 < len(bounds) else math.inf
        a, b = max(lower, low), min(upper, high)
        if a < b:
            ax.axhspan(a, b, color=ZONE_COLOURS.get(zone, "#cccccc"), alpha=0.12, linewidth=0)
            ax.text(1.002, (a + b) / 2, zone.value, transform=ax.get_yaxis_transform(), fontsize=7, va="center")


def plot_series(
    path: Path, title: str, series: Sequence[GpuSeries], primary: GpuSeries, *, show_target: bool = False
) -> None:
    """Write a PNG to ``path``: every series' temperature and limit, and ``primary``'s power,
    VRAM per class and decisions (and its target limit with ``show_target``: in a replay,
    what the governor would have set). The PNG is written to a new file renamed over ``path``
    (mode 0644): a symlink planted there is replaced, never followed. Raises WhatIfError when
    matplotlib is missing or the file cannot be written."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    unit, unit_name = _time_unit(series)
    fig = Figure(figsize=(12, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_p, ax_v = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2, 2))
    fig.suptitle(title, fontsize=11)

    temps = [v for s in series for v in s.temperature_c if not math.isnan(v)]
    low = min(temps, default=20.0) - 5.0
    high = max([*temps, *(c for _, c in primary.zones[:2])], default=90.0) + 5.0
    _zone_bands(ax_t, primary.zones, low, high)
    for s in series:
        xs, ys = _reduce(s.t_s, s.temperature_c, "max")
        style = "--" if s.label.startswith("no governor") else "-"
        width = 1.4 if s is primary else 0.9
        ax_t.plot(_scaled(xs, unit), ys, style, linewidth=width, label=s.label)
    for rule, (marker, colour, text) in MARK_STYLES.items():
        marks = [m for m in primary.marks if m.rule == rule]
        if not marks:
            continue
        xs_m = [m.t_s / unit for m in marks]
        ys_m = [_value_at(primary, m.t_s) for m in marks]
        count = primary.mark_counts.get(rule, len(marks))  # every decision, also those a long run thinned out
        ax_t.scatter(xs_m, ys_m, marker=marker, color=colour, s=36, zorder=5, label=f"{text} ({count})")
    ax_t.set_ylim(low, high)
    ax_t.set_ylabel("temperature (C)")
    ax_t.legend(loc="upper left", fontsize=7, ncol=3)
    ax_t.grid(alpha=0.3)

    xs, ys = _reduce(primary.t_s, primary.power_w, "mean")
    ax_p.plot(_scaled(xs, unit), ys, linewidth=0.6, color="#7f7f7f", label=f"{primary.label} power")
    for s in series:
        if all(math.isnan(v) for v in s.limit_w):
            continue
        xs, ys = _reduce(s.t_s, s.limit_w, "last")
        ax_p.step(_scaled(xs, unit), ys, where="post", linewidth=1.2, label=f"{s.label} limit")
    if show_target and not all(math.isnan(v) for v in primary.target_w):
        xs, ys = _reduce(primary.t_s, primary.target_w, "last")
        ax_p.step(_scaled(xs, unit), ys, ":", where="post", linewidth=1.6, label=f"{primary.label} would-be limit")
    ax_p.set_ylabel("power (W)")
    ax_p.legend(loc="upper left", fontsize=7, ncol=3)
    ax_p.grid(alpha=0.3)

    if primary.vram_bytes:
        names = sorted(primary.vram_bytes)
        columns = [_reduce(primary.t_s, primary.vram_bytes[n], "max") for n in names]
        xs = columns[0][0]
        ax_v.stackplot(_scaled(xs, unit), *[[v / GIB for v in ys] for _, ys in columns], labels=names, alpha=0.8)
        ax_v.legend(loc="upper left", fontsize=7, ncol=4)
    else:
        ax_v.text(0.5, 0.5, "no process data", transform=ax_v.transAxes, ha="center", va="center", color="#7f7f7f")
    ax_v.set_ylabel("VRAM by class (GiB)")
    ax_v.set_xlabel(f"time ({unit_name})")
    ax_v.grid(alpha=0.3)
    image = io.BytesIO()
    fig.savefig(image, format="png")
    try:  # a new file renamed over the path: a symlink planted there is replaced, never followed
        write_atomic(path, image.getvalue(), mode=0o644)
    except OSError as exc:
        raise WhatIfError(f"cannot write the plot to {path}: {exc.strerror or exc}", EXIT_USAGE) from None


def _value_at(s: GpuSeries, t_s: float) -> float:
    """The series' temperature at the last tick at or before ``t_s`` (for placing a marker)."""
    k = max(0, bisect.bisect_right(s.t_s, t_s) - 1)
    return s.temperature_c[k] if len(s.temperature_c) else math.nan
