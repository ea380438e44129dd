"""The simulated GPU's fans: the speed they run at and what it does to the heatsink.

Under the card's own control the fans report the profile's ``auto_curve`` and the
heatsink keeps its calibrated resistance (the thermal constants describe a card under its
own control). Set by hand, the fans move toward the set speed with the time constant
``response_s``, and the heatsink resistance follows the speed they run at:
``r_sink * (reference_percent / speed) ** airflow_exponent`` (governor.sim.profiles.SimFan;
docs/simulation.md, "Fans"). The step matrices of the thermal model are cached per half
percent of speed.
"""

from __future__ import annotations

import itertools
import math

from governor.sim.profiles import SimFan
from governor.sim.thermal import ThermalParams, ThermalState, step_matrix

_Matrix = tuple[float, float, float, float, float, float]  # e11, e12, e21, e22, r_total, r_sink


class FanDrive:
    """The fans of one simulated GPU with a fan model; not thread-safe on its own."""

    __slots__ = ("_curve", "_follow", "_matrices", "model", "params", "percent", "set_percent", "step_s")

    def __init__(self, model: SimFan, params: ThermalParams, step_s: float, die_c: float) -> None:
        self.model = model
        self.params = params
        self.step_s = step_s
        self.set_percent: float | None = None  # None: the card's own control
        self.percent = model.auto_percent(die_c)  # the speed the fans run at now
        self._matrices: dict[float, _Matrix] = {}
        curve = model.auto_curve
        self._curve = (
            curve[0][0],
            curve[0][1],
            tuple(
                (lo_c, lo_p, hi_c, hi_p - lo_p, hi_c - lo_c) for (lo_c, lo_p), (hi_c, hi_p) in itertools.pairwise(curve)
            ),
            curve[-1][1],
        )
        self._follow = 1.0 - math.exp(-step_s / model.response_s) if model.response_s > 0 else 1.0

    @property
    def manual(self) -> bool:
        """True while the fans run at a speed set by hand."""
        return self.set_percent is not None

    def set(self, percent: float | None, thermal: ThermalState) -> None:
        """Run at ``percent`` from now on (None: back to the card's control and the calibrated heatsink)."""
        self.set_percent = percent
        if percent is None:
            self._install(-1.0, thermal)

    def step(self, thermal: ThermalState, stuck: bool) -> None:
        """One sub-step of a hand-set speed: the fans move toward it (not when ``stuck``) and the
        heatsink resistance follows the speed they run at."""
        if self.set_percent is None:
            return
        model = self.model
        target = max(model.min_percent, min(self.set_percent, model.max_percent))
        if not stuck:
            self.percent += (target - self.percent) * self._follow
        self._install(round(self.percent * 2.0) / 2.0, thermal)

    def follow_auto(self, die_c: float, stuck: bool) -> None:
        """Under the card's control the fans run at its curve's speed (unless ``stuck``): the
        model's ``auto_percent``, with the curve's segments worked out once."""
        if stuck:
            return
        first_c, first_p, segments, last_p = self._curve
        if die_c <= first_c:
            self.percent = first_p
            return
        for lo_c, lo_p, hi_c, rise_p, span_c in segments:
            if die_c <= hi_c:
                self.percent = lo_p + rise_p * (die_c - lo_c) / span_c
                return
        self.percent = last_p

    def _install(self, key: float, thermal: ThermalState) -> None:
        """The step matrix for speed ``key`` (percent; below 0: calibrated) into ``thermal``."""
        cached = self._matrices.get(key)
        if cached is None:
            t = self.params
            r_sink = t.r_sink_c_per_w if key < 0 else self.model.r_sink_c_per_w(t.r_sink_c_per_w, key)
            m = step_matrix(ThermalParams(t.r_die_c_per_w, t.c_die_j_per_c, r_sink, t.c_sink_j_per_c), self.step_s)
            cached = self._matrices[key] = (m.e11, m.e12, m.e21, m.e22, t.r_die_c_per_w + r_sink, r_sink)
        thermal.e11, thermal.e12, thermal.e21, thermal.e22, thermal.r_total_c_per_w, thermal.r_sink_c_per_w = cached
