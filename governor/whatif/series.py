"""Time series of one GPU through a replay or a simulation: what the plots and summaries read.

Values are kept in ``array('d')`` (8 bytes each), at most MAX_POINTS per series: a longer
run is thinned as it goes (GpuSeries), so a simulated year takes no more memory than a day.
A missing value is NaN.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

from governor.model import Decision, ThermalZone

NAN = math.nan


@dataclass(frozen=True, slots=True)
class Mark:
    """A decision on the timeline: time in seconds, its rule and a one-line description."""

    t_s: float
    rule: str
    text: str


MAX_POINTS = 20_000
"""Points a series keeps at most (even): a longer run is thinned (see GpuSeries)."""
MAX_MARKS = 10_000
"""Decision marks a series keeps at most; every decision is still counted (``mark_counts``)."""


def _nanmax(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else max(a, b)


def _nanmean(a: float, b: float) -> float:
    return b if math.isnan(a) else a if math.isnan(b) else (a + b) / 2.0


@dataclass
class GpuSeries:
    """One GPU over time, one point per tick, up to ``max_points`` points.

    ``t_s`` seconds since the start; ``temperature_c`` degrees C; ``power_w`` draw,
    ``limit_w`` the enforced limit and ``target_w`` the governor's target, watts (NaN
    while hands-off); ``vram_bytes`` bytes per process class; ``zones`` the thermal zone
    thresholds (zone, lower bound in C) drawn as bands; ``marks`` the decisions.

    Memory is bounded, whatever the run's length: once ``max_points`` points are held,
    neighbouring points are merged in pairs and each point stands for twice as many ticks
    from then on (``ticks_per_point``): the first tick's time, the highest temperature and
    VRAM, the mean power, the last limit and target. So a year at 1 Hz keeps the peak, the
    energy-weighted picture and the final limits in a few hundred kilobytes. Likewise at most
    ``max_marks`` marks are kept (every other one dropped when full), while ``mark_counts``
    counts every decision by rule.
    """

    label: str
    gpu_index: int
    zones: tuple[tuple[ThermalZone, float], ...] = ()
    t_s: array[float] = field(default_factory=lambda: array("d"))
    temperature_c: array[float] = field(default_factory=lambda: array("d"))
    power_w: array[float] = field(default_factory=lambda: array("d"))
    limit_w: array[float] = field(default_factory=lambda: array("d"))
    target_w: array[float] = field(default_factory=lambda: array("d"))
    vram_bytes: dict[str, array[float]] = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
    mark_counts: dict[str, int] = field(default_factory=dict)
    max_points: int = MAX_POINTS
    max_marks: int = MAX_MARKS
    ticks_per_point: int = field(default=1, init=False)
    _last_ticks: int = field(default=0, init=False, repr=False)  # ticks merged into the last point so far
    _last_powers: int = field(default=0, init=False, repr=False)  # of which with a power reading
    _marks_seen: int = field(default=0, init=False, repr=False)
    _mark_stride: int = field(default=1, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_points < 2 or self.max_points % 2:
            raise ValueError(f"max_points: expected an even number of 2 or more, got {self.max_points}")
        if self.max_marks < 2:
            raise ValueError(f"max_marks: expected 2 or more, got {self.max_marks}")

    def add(
        self,
        t_s: float,
        temperature_c: float | None,
        power_w: float | None,
        limit_w: float | None,
        target_w: float | None,
        vram_bytes: dict[str, int] | None = None,
    ) -> None:
        """Append one tick (merged into the last point once the series has been thinned)."""
        if self.ticks_per_point > 1 and self._last_ticks < self.ticks_per_point:
            self._merge_last(temperature_c, power_w, limit_w, target_w, vram_bytes)
            return
        if len(self.t_s) >= self.max_points:
            self._thin()
        self._append(t_s, temperature_c, power_w, limit_w, target_w, vram_bytes)
        self._last_ticks = 1
        self._last_powers = 0 if power_w is None else 1

    def _append(
        self,
        t_s: float,
        temperature_c: float | None,
        power_w: float | None,
        limit_w: float | None,
        target_w: float | None,
        vram_bytes: dict[str, int] | None,
    ) -> None:
        """Append one point; a class seen for the first time gets zeros for the points before."""
        n = len(self.t_s)
        self.t_s.append(t_s)
        self.temperature_c.append(NAN if temperature_c is None else temperature_c)
        self.power_w.append(NAN if power_w is None else power_w)
        self.limit_w.append(NAN if limit_w is None else limit_w)
        self.target_w.append(NAN if target_w is None else target_w)
        columns = self.vram_bytes
        if not vram_bytes:
            for column in columns.values():
                column.append(0.0)
            return
        if vram_bytes.keys() == columns.keys():  # the same classes as before: one value each
            for name, used in vram_bytes.items():
                columns[name].append(float(used))
            return
        for name, used in vram_bytes.items():
            found = columns.get(name)
            if found is None:
                found = columns[name] = array("d", bytes(8 * n))
            found.append(float(used))
        for column in columns.values():
            if len(column) == n:
                column.append(0.0)

    def _merge_last(
        self,
        temperature_c: float | None,
        power_w: float | None,
        limit_w: float | None,
        target_w: float | None,
        vram_bytes: dict[str, int] | None,
    ) -> None:
        """Fold one tick into the last point: highest temperature and VRAM, mean power, last limit and target."""
        self._last_ticks += 1
        if temperature_c is not None:
            self.temperature_c[-1] = _nanmax(self.temperature_c[-1], temperature_c)
        if power_w is not None:
            self._last_powers += 1
            mean = self.power_w[-1]
            self.power_w[-1] = power_w if math.isnan(mean) else mean + (power_w - mean) / self._last_powers
        self.limit_w[-1] = NAN if limit_w is None else limit_w
        self.target_w[-1] = NAN if target_w is None else target_w
        for name, used in (vram_bytes or {}).items():
            column = self.vram_bytes.get(name)
            if column is None:
                column = self.vram_bytes[name] = array("d", bytes(8 * len(self.t_s)))
            column[-1] = max(column[-1], float(used))

    def _thin(self) -> None:
        """Merge neighbouring points in pairs (every point is whole here): each stands for twice the ticks."""
        n = len(self.t_s) - len(self.t_s) % 2

        def pairs(values: array[float]) -> tuple[array[float], array[float]]:
            return values[0:n:2], values[1:n:2]

        self.t_s = self.t_s[0:n:2]
        self.temperature_c = array("d", map(_nanmax, *pairs(self.temperature_c)))
        self.power_w = array("d", map(_nanmean, *pairs(self.power_w)))
        self.limit_w = self.limit_w[1:n:2]
        self.target_w = self.target_w[1:n:2]
        for name, column in self.vram_bytes.items():
            self.vram_bytes[name] = array("d", map(max, *pairs(column)))
        self.ticks_per_point *= 2

    def mark(self, decision: Decision) -> None:
        """Record a decision as a timeline mark (every one counted; at most ``max_marks`` kept)."""
        self.mark_counts[decision.rule] = self.mark_counts.get(decision.rule, 0) + 1
        seen = self._marks_seen
        self._marks_seen = seen + 1
        if seen % self._mark_stride:
            return
        if len(self.marks) >= self.max_marks:
            self.marks = self.marks[::2]
            self._mark_stride *= 2
            if seen % self._mark_stride:
                return
        self.marks.append(Mark(decision.t_s, decision.rule, describe_change(decision)))


def describe_change(d: Decision) -> str:
    """What a decision changes, in a few words: ``200 -> 180 W``, ``optimal -> warning``, ``pid 7 SIGTERM``,
    ``fan 0 55 % -> auto``."""
    if d.pid is not None:
        name = f" ({d.from_value})" if d.from_value else ""
        what = "over budget" if d.rule == "vram_over_budget" else str(d.to_value)
        return f"pid {d.pid}{name}: {what}"
    if d.rule == "thermal_zone":
        return f"{d.from_value} -> {d.to_value}"
    if d.fan is not None:
        before = "?" if d.from_percent is None else f"{d.from_percent:g} %"
        after = "auto" if d.to_percent is None else f"{d.to_percent:g} %"
        return f"fan {d.fan} {before} -> {after}"
    if isinstance(d.from_value, float) or isinstance(d.to_value, float):
        before = "?" if d.from_value is None else f"{d.from_value:g}"
        after = "?" if d.to_value is None else f"{d.to_value:g}"
        return f"{before} -> {after} W"
    return d.action.value
