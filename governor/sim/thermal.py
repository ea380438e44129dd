"""A two-node lumped thermal model of a GPU: die and heatsink, cooled by ambient air.

::

    C_die  dT_die/dt  = P - (T_die - T_sink) / R_die
    C_sink dT_sink/dt = (T_die - T_sink) / R_die - (T_sink - T_amb) / R_sink

``P`` is the board power in watts, temperatures are degrees Celsius, ``R_*`` are
thermal resistances in C/W and ``C_*`` heat capacities in J/C. The die node is what
NVML reports as the GPU temperature. Under a constant power the die settles at
``T_amb + P * (R_die + R_sink)``.

The two-node form was chosen over a single node because it fits the real H100 trace
twice as well: at a load step the die jumps by ``P * R_die`` within a second or two
(the fast node) and then follows the heatsink (the slow node); see docs/simulation.md.

Integration is exact for a power held constant over a step (the matrix exponential
of the 2x2 system), so any step length is stable, however small ``C_die`` is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ThermalParams:
    """Thermal constants of one GPU: resistances in C/W, heat capacities in J/C."""

    r_die_c_per_w: float
    c_die_j_per_c: float
    r_sink_c_per_w: float
    c_sink_j_per_c: float

    def __post_init__(self) -> None:
        for name in ("r_die_c_per_w", "c_die_j_per_c", "r_sink_c_per_w", "c_sink_j_per_c"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ThermalParams.{name}: expected a number > 0, got {value!r}")

    @property
    def r_total_c_per_w(self) -> float:
        """Die-to-ambient resistance in C/W: the steady-state rise per watt."""
        return self.r_die_c_per_w + self.r_sink_c_per_w

    @property
    def tau_die_s(self) -> float:
        """Time constant of the die node alone, seconds (R_die * C_die)."""
        return self.r_die_c_per_w * self.c_die_j_per_c

    @property
    def tau_sink_s(self) -> float:
        """Time constant of the heatsink node alone, seconds (R_sink * C_sink)."""
        return self.r_sink_c_per_w * self.c_sink_j_per_c


def steady_temperature_c(params: ThermalParams, power_w: float, ambient_c: float) -> float:
    """Die temperature in C that a constant ``power_w`` settles at in ``ambient_c``."""
    return ambient_c + power_w * params.r_total_c_per_w


def sink_for_die_c(params: ThermalParams, die_c: float, power_w: float) -> float:
    """The heatsink temperature in C for which a die at ``die_c`` drawing ``power_w`` is in
    quasi-equilibrium (the fast node settled): ``die_c - power_w * R_die``."""
    return die_c - power_w * params.r_die_c_per_w


@dataclass(frozen=True, slots=True)
class StepMatrix:
    """The exact one-step transition of the model for a step of ``dt_s`` seconds.

    With ``x = (T_die - T_amb, T_sink - T_amb)`` and its steady state
    ``x_inf = (P * R_total, P * R_sink)``: ``x' = x_inf + E @ (x - x_inf)``.
    """

    dt_s: float
    e11: float
    e12: float
    e21: float
    e22: float


def step_matrix(params: ThermalParams, dt_s: float) -> StepMatrix:
    """``E = expm(A * dt_s)`` for the model's 2x2 system matrix ``A``, computed in closed form."""
    if dt_s < 0 or not math.isfinite(dt_s):
        raise ValueError(f"dt_s: expected seconds >= 0, got {dt_s!r}")
    a = 1.0 / (params.r_die_c_per_w * params.c_die_j_per_c)
    b = 1.0 / (params.r_die_c_per_w * params.c_sink_j_per_c)
    c = 1.0 / (params.r_sink_c_per_w * params.c_sink_j_per_c)
    # A = [[-a, a], [b, -(b + c)]]; real eigenvalues s +- q, both negative.
    s = -(a + b + c) / 2.0
    q = math.sqrt(max(s * s - a * c, 0.0))
    e_fast = math.exp((s - q) * dt_s)
    e_slow = math.exp((s + q) * dt_s)
    ch = (e_slow + e_fast) / 2.0  # e^{s dt} cosh(q dt)
    sh = (e_slow - e_fast) / (2.0 * q) if q > 1e-12 else dt_s * math.exp(s * dt_s)  # e^{s dt} sinh(q dt)/q
    # E = ch * I + sh * (A - s I)
    return StepMatrix(
        dt_s=dt_s,
        e11=ch + sh * (-a - s),
        e12=sh * a,
        e21=sh * b,
        e22=ch + sh * (-(b + c) - s),
    )


class ThermalState:
    """The die and heatsink temperatures of one GPU, advanced in fixed steps of ``dt_s``.

    The step matrix is computed once; each :meth:`step` is a handful of float
    operations and allocates nothing.
    """

    __slots__ = (
        "die_c",
        "e11",
        "e12",
        "e21",
        "e22",
        "params",
        "r_sink_c_per_w",
        "r_total_c_per_w",
        "sink_c",
        "step_s",
    )

    def __init__(self, params: ThermalParams, step_s: float, die_c: float, sink_c: float) -> None:
        self.params = params
        self.step_s = step_s
        m = step_matrix(params, step_s)
        self.e11, self.e12, self.e21, self.e22 = m.e11, m.e12, m.e21, m.e22
        self.r_total_c_per_w = params.r_total_c_per_w
        self.r_sink_c_per_w = params.r_sink_c_per_w
        self.die_c = die_c
        self.sink_c = sink_c

    @classmethod
    def at_steady_state(cls, params: ThermalParams, step_s: float, power_w: float, ambient_c: float) -> ThermalState:
        """A GPU that has drawn ``power_w`` in ``ambient_c`` long enough to settle."""
        return cls(
            params,
            step_s,
            ambient_c + power_w * params.r_total_c_per_w,
            ambient_c + power_w * params.r_sink_c_per_w,
        )

    def step(self, power_w: float, ambient_c: float) -> float:
        """Advance one step of ``step_s`` seconds at ``power_w``; returns the new die temperature in C."""
        inf_die = power_w * self.r_total_c_per_w
        inf_sink = power_w * self.r_sink_c_per_w
        d_die = self.die_c - ambient_c - inf_die
        d_sink = self.sink_c - ambient_c - inf_sink
        self.die_c = ambient_c + inf_die + self.e11 * d_die + self.e12 * d_sink
        self.sink_c = ambient_c + inf_sink + self.e21 * d_die + self.e22 * d_sink
        return self.die_c
