"""Time series of one GPU through a replay or a simulation: what the plots and summaries read.

Values are kept in ``array('d')`` (8 bytes each): a day at 1 Hz is 86 400 points per
series. A missing value is NaN.
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


@dataclass
class GpuSeries:
    """One GPU over time, one point per tick.

    ``t_s`` seconds since the start; ``temperature_c`` degrees C; ``power_w`` draw,
    ``limit_w`` the enforced limit and ``target_w`` the governor's target, watts (NaN
    while hands-off); ``vram_bytes`` bytes per process class; ``zones`` the thermal zone
    thresholds (zone, lower bound in C) drawn as bands; ``marks`` the decisions.
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

    def add(
        self,
        t_s: float,
        temperature_c: float | None,
        power_w: float | None,
        limit_w: float | None,
        target_w: float | None,
        vram_bytes: dict[str, int] | None = None,
    ) -> None:
        """Append one tick; a class seen for the first time gets zeros for the ticks before."""
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

    def mark(self, decision: Decision) -> None:
        """Record a decision as a timeline mark."""
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
