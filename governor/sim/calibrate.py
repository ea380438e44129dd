"""Fit the thermal model to a recorded trace: pure Python, no numpy at runtime.

The fit is output-error: parameters are chosen so that the model, driven by the
recorded power and started at the first recorded temperature, reproduces the recorded
temperatures with the least root-mean-square error (RMSE, in C). It runs in two stages:

1. :func:`fit_first_order` - a linear least-squares fit (hand-written 3x3 normal
   equations) of ``T[k+1] = a*T[k] + b*P[k+1] + c``, turned into ``R``, ``C`` and
   ``T_amb`` of a single node. Cheap, and the starting point of stage 2.
2. :func:`fit_thermal` - Nelder-Mead over the two-node parameters
   (``log R_die, log C_die, log R_sink, log C_sink, T_amb``; logs keep them positive),
   restarted from its best point until it stops improving.

Power convention: NVML's power reading averages the window before it, so the
interval ``(t[k], t[k+1]]`` is driven by ``power_w[k+1]``. On the H100 trace this
halves the error of the opposite convention. The heatsink starts in quasi-equilibrium
with the die (:func:`governor.sim.thermal.sink_for_die_c`).

Units: seconds, degrees Celsius, watts; ``R`` in C/W, ``C`` in J/C.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from governor.sim.profiles import AMBIENT_RANGE_C, C_RANGE_J_PER_C, R_RANGE_C_PER_W, GpuProfile
from governor.sim.thermal import StepMatrix, ThermalParams, sink_for_die_c, step_matrix
from governor.trace import Trace


class ThermalSample(NamedTuple):
    """One observation: time in seconds, die temperature in C, board power in W."""

    t_s: float
    temperature_c: float
    power_w: float


@dataclass(frozen=True, slots=True)
class FitResult:
    """A two-node fit: parameters, the fitted ambient in C, RMSE in C over ``n`` samples."""

    params: ThermalParams
    ambient_c: float
    rmse_c: float
    n: int
    evaluations: int


@dataclass(frozen=True, slots=True)
class FirstOrderFit:
    """A single-node fit (``C dT/dt = P - (T - T_amb)/R``) and its simulated RMSE in C."""

    r_c_per_w: float
    c_j_per_c: float
    ambient_c: float
    rmse_c: float
    n: int

    @property
    def tau_s(self) -> float:
        """Time constant in seconds (R * C)."""
        return self.r_c_per_w * self.c_j_per_c


@dataclass(frozen=True, slots=True)
class SplitValidation:
    """Fit on the samples before a split, judged on the samples after it.

    ``predict_rmse_c``: the model restarted at the first held-out sample's measured
    temperature. ``continued_rmse_c``: the model run from the very start with no
    measured temperature after ``t0``, scored on the held-out samples only.
    """

    fit: FitResult
    split_t_s: float
    n_predicted: int
    predict_rmse_c: float
    continued_rmse_c: float


def samples_from_trace(trace: Trace, gpu_index: int | None = None) -> list[ThermalSample]:
    """The (time, temperature, power) samples of one GPU of ``trace`` (the lowest index by
    default); samples missing a temperature or a power are left out."""
    if gpu_index is None:
        gpu_index = min(trace.samples)
    if gpu_index not in trace.samples:
        raise ValueError(f"{trace.source}: no samples for GPU {gpu_index}")
    out = []
    for sample in trace.samples[gpu_index]:
        temp = sample.reading.temperature_c
        power = sample.reading.power_w
        if temp is not None and power is not None:
            out.append(ThermalSample(sample.t_s, float(temp), float(power)))
    return out


def rmse(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Root-mean-square difference of two equally long series (C for temperatures)."""
    if len(predicted) != len(measured) or not measured:
        raise ValueError("rmse: expected two non-empty series of the same length")
    total = 0.0
    for p, m in zip(predicted, measured):
        total += (p - m) * (p - m)
    return math.sqrt(total / len(measured))


def predict(
    params: ThermalParams,
    t_s: Sequence[float],
    power_w: Sequence[float],
    t0_c: float,
    ambient_c: float,
) -> list[float]:
    """Die temperatures in C at times ``t_s`` for the board power ``power_w`` (W) measured
    at those times, starting at ``t0_c`` at ``t_s[0]`` in ``ambient_c``.

    The interval ``(t_s[k], t_s[k+1]]`` is driven by ``power_w[k+1]``; integration is exact
    for that held power, so uneven intervals (dropped samples) need no special care.
    """
    n = len(t_s)
    if n != len(power_w):
        raise ValueError("predict: t_s and power_w must have the same length")
    if n == 0:
        return []
    r_total = params.r_total_c_per_w
    r_sink = params.r_sink_c_per_w
    die = t0_c - ambient_c
    sink = sink_for_die_c(params, t0_c, power_w[0]) - ambient_c
    matrices: dict[float, StepMatrix] = {}
    out = [t0_c]
    previous_t = t_s[0]
    for k in range(1, n):
        t = t_s[k]
        dt = round(t - previous_t, 4)
        previous_t = t
        if dt < 0:
            raise ValueError(f"predict: times must not go back (t_s[{k}] = {t})")
        m = matrices.get(dt)
        if m is None:
            m = matrices[dt] = step_matrix(params, dt)
        p = power_w[k]
        inf_die = p * r_total
        inf_sink = p * r_sink
        d_die = die - inf_die
        d_sink = sink - inf_sink
        die = inf_die + m.e11 * d_die + m.e12 * d_sink
        sink = inf_sink + m.e21 * d_die + m.e22 * d_sink
        out.append(die + ambient_c)
    return out


def predict_first_order(
    r_c_per_w: float,
    c_j_per_c: float,
    ambient_c: float,
    t_s: Sequence[float],
    power_w: Sequence[float],
    t0_c: float,
) -> list[float]:
    """Like :func:`predict`, for a single node with resistance ``r_c_per_w`` and capacity ``c_j_per_c``."""
    tau = r_c_per_w * c_j_per_c
    out = [t0_c]
    temp = t0_c
    for k in range(1, len(t_s)):
        target = ambient_c + r_c_per_w * power_w[k]
        temp = target + (temp - target) * math.exp(-(t_s[k] - t_s[k - 1]) / tau)
        out.append(temp)
    return out


def _solve3(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Solve a 3x3 linear system by Gaussian elimination with partial pivoting."""
    a = [[*row, rhs] for row, rhs in zip(m, v)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, 3):
            f = a[r][col] / a[col][col]
            for c in range(col, 4):
                a[r][c] -= f * a[col][c]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (a[r][3] - sum(a[r][c] * x[c] for c in range(r + 1, 3))) / a[r][r]
    return x


MIN_LOAD_STEP_W = 20.0
"""The least spread (W) between the low and high power of a trace that can be calibrated on."""
MIN_LOAD_STEP_RATIO = 0.2
"""... and the least spread as a share of the high power: an idle wobble of a few watts pins
neither the room nor the resistance down (it fits a room far below freezing)."""
LOAD_QUANTILE = 0.05
"""The low and high power are the 5th and 95th percentile: a lone spike is not a load."""


def _check(samples: Sequence[ThermalSample], minimum: int) -> None:
    """ValueError unless ``samples`` can pin the model down: enough of them, and power at (at
    least) two clearly different levels, each held for a part of the trace."""
    if len(samples) < minimum:
        raise ValueError(f"calibration: expected at least {minimum} samples, got {len(samples)}")
    powers = sorted(s.power_w for s in samples)
    if powers[-1] - powers[0] < 1.0:
        raise ValueError("calibration: the power never changes by 1 W or more; nothing to fit")
    k = int(LOAD_QUANTILE * (len(powers) - 1))
    low_w, high_w = powers[k], powers[-1 - k]
    needed_w = max(MIN_LOAD_STEP_W, MIN_LOAD_STEP_RATIO * high_w)
    if high_w - low_w < needed_w:
        raise ValueError(
            f"calibration: expected idle and a sustained load (power apart by at least {needed_w:.0f} W), "
            f"got power between {low_w:.1f} and {high_w:.1f} W for most of the trace; "
            "record the GPU going from idle to load and back"
        )


def _typical_interval_s(samples: Sequence[ThermalSample]) -> float:
    """The median interval between samples with time between them (s); 0 when there is none."""
    steps = sorted(b.t_s - a.t_s for a, b in itertools.pairwise(samples) if b.t_s > a.t_s)
    return steps[len(steps) // 2] if steps else 0.0


def fit_first_order(samples: Sequence[ThermalSample]) -> FirstOrderFit:
    """Least-squares single-node fit from pairs of consecutive samples half to twice the
    trace's typical interval apart (whatever it was recorded at: 0.25 s, 1 s, 10 s).

    When the temperature follows the power within one interval (a water-cooled H200: the
    regression's ``a`` is not in (0, 1)), the single node is its steady state instead,
    ``T = T_amb + R * P`` by least squares, with a time constant of ten intervals: only a
    start for :func:`fit_thermal`, which finds the real ones.
    """
    _check(samples, 4)
    typical_s = _typical_interval_s(samples)
    if typical_s <= 0.0:
        raise ValueError(f"calibration: expected samples spread over time, got all at t = {samples[0].t_s:g} s")
    # Normal equations of T[k+1] = a*T[k] + b*P[k+1] + c, and the mean step length.
    sums = [[0.0] * 3 for _ in range(3)]
    rhs = [0.0] * 3
    total_dt = 0.0
    pairs = 0
    for prev, cur in itertools.pairwise(samples):
        dt = cur.t_s - prev.t_s
        if not 0.5 * typical_s <= dt <= 2.0 * typical_s:
            continue
        row = (prev.temperature_c, cur.power_w, 1.0)
        for i in range(3):
            rhs[i] += row[i] * cur.temperature_c
            for j in range(3):
                sums[i][j] += row[i] * row[j]
        total_dt += dt
        pairs += 1
    solution = _solve3(sums, rhs) if pairs >= 3 else None
    if solution is not None and 0.0 < solution[0] < 1.0 and solution[1] > 0:
        a, b, c = solution
        mean_dt = total_dt / pairs
        tau = -mean_dt / math.log(a)
        r = b / (1.0 - a)
        ambient = c / (1.0 - a)
    else:
        r, ambient = _steady_fit(samples)
        tau = 10.0 * typical_s
    t = [s.t_s for s in samples]
    p = [s.power_w for s in samples]
    measured = [s.temperature_c for s in samples]
    predicted = predict_first_order(r, tau / r, ambient, t, p, measured[0])
    return FirstOrderFit(r, tau / r, ambient, rmse(predicted, measured), len(samples))


def _steady_fit(samples: Sequence[ThermalSample]) -> tuple[float, float]:
    """(R in C/W, T_amb in C) of ``T = T_amb + R * P`` by least squares; ValueError when the
    temperature does not rise with the power."""
    n = len(samples)
    mean_p = sum(s.power_w for s in samples) / n
    mean_t = sum(s.temperature_c for s in samples) / n
    spread = sum((s.power_w - mean_p) ** 2 for s in samples)
    r = sum((s.power_w - mean_p) * (s.temperature_c - mean_t) for s in samples) / spread
    if not r > 0:
        raise ValueError("calibration: the temperature does not rise with the power; not a heated, cooled body")
    return r, mean_t - r * mean_p


def nelder_mead(
    f: Callable[[list[float]], float],
    x0: Sequence[float],
    steps: Sequence[float],
    *,
    max_evaluations: int = 3000,
    tolerance: float = 1e-10,
) -> tuple[list[float], float, int]:
    """Minimise ``f`` from ``x0`` (initial simplex offsets ``steps``): returns (x, f(x), evaluations).

    Standard coefficients (reflection 1, expansion 2, contraction 0.5, shrink 0.5); stops
    when the simplex's function values differ by less than ``tolerance``.
    """
    n = len(x0)
    simplex = [list(x0)]
    for i in range(n):
        point = list(x0)
        point[i] += steps[i]
        simplex.append(point)
    values = [f(p) for p in simplex]
    evaluations = n + 1
    while evaluations < max_evaluations:
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if values[-1] - values[0] <= tolerance:
            break
        centroid = [sum(p[i] for p in simplex[:-1]) / n for i in range(n)]
        worst = simplex[-1]
        reflected = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(reflected)
        evaluations += 1
        if fr < values[0]:
            expanded = [c + 2.0 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(expanded)
            evaluations += 1
            if fe < fr:
                simplex[-1], values[-1] = expanded, fe
            else:
                simplex[-1], values[-1] = reflected, fr
            continue
        if fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
            continue
        if fr < values[-1]:
            contracted = [c + 0.5 * (r - c) for c, r in zip(centroid, reflected)]
        else:
            contracted = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
        fc = f(contracted)
        evaluations += 1
        if fc < min(fr, values[-1]):
            simplex[-1], values[-1] = contracted, fc
            continue
        best = simplex[0]
        for i in range(1, n + 1):
            simplex[i] = [b + 0.5 * (x - b) for b, x in zip(best, simplex[i])]
            values[i] = f(simplex[i])
        evaluations += n
    i_best = min(range(n + 1), key=values.__getitem__)
    return simplex[i_best], values[i_best], evaluations


_DIE_TAU_STARTS_S = (0.1, 1.0, 5.0)
"""Starting guesses for the die node's time constant, seconds."""


def _params(u: Sequence[float]) -> ThermalParams:
    return ThermalParams(math.exp(u[0]), math.exp(u[1]), math.exp(u[2]), math.exp(u[3]))


def fit_thermal(samples: Sequence[ThermalSample], *, max_restarts: int = 8) -> FitResult:
    """Fit the two-node model to ``samples`` (time-ordered); see the module docstring."""
    _check(samples, 8)
    first = fit_first_order(samples)
    t = [s.t_s for s in samples]
    p = [s.power_w for s in samples]
    measured = [s.temperature_c for s in samples]
    t0 = measured[0]

    # The search stays within what a profile accepts (R_RANGE_C_PER_W, C_RANGE_J_PER_C): a die
    # faster than the sampling drives C_die toward 0, and its floor predicts the same.
    r_lo, r_hi = math.log(R_RANGE_C_PER_W[0]), math.log(R_RANGE_C_PER_W[1])
    c_lo, c_hi = math.log(C_RANGE_J_PER_C[0]), math.log(C_RANGE_J_PER_C[1])
    bounds = ((r_lo, r_hi), (c_lo, c_hi), (r_lo, r_hi), (c_lo, c_hi))

    def objective(u: list[float]) -> float:
        if any(not lo <= x <= hi for x, (lo, hi) in zip(u, bounds)):
            return math.inf
        return rmse(predict(_params(u), t, p, t0, u[4]), measured)

    # Start: most of R in the heatsink, which carries the single node's time constant. The
    # die's time constant is often shorter than the sampling interval, where the error
    # surface has a second, shallower valley (C_die -> 0); several starts avoid it.
    r_die = 0.3 * first.r_c_per_w
    r_sink = 0.7 * first.r_c_per_w
    c_sink = first.tau_s / r_sink
    best_u: list[float] = []
    best = math.inf
    evaluations = 0
    for tau_die_s in _DIE_TAU_STARTS_S:
        u = [
            math.log(r_die),
            math.log(tau_die_s / r_die),
            math.log(r_sink),
            math.log(c_sink),
            first.ambient_c,
        ]
        value = math.inf
        for _ in range(max_restarts):
            u_new, value_new, used = nelder_mead(objective, u, [0.5, 0.5, 0.5, 0.5, 2.0])
            evaluations += used
            improved = value_new < value - 1e-7
            if value_new <= value:
                u, value = u_new, value_new
            if not improved:
                break
        if value < best:
            best_u, best = u, value
    u = best_u
    result = FitResult(_params(u), u[4], best, len(samples), evaluations)
    _check_plausible(result)
    return result


def _check_plausible(fit: FitResult) -> None:
    """ValueError when the fitted constants lie outside what a profile accepts
    (governor.sim.profiles: resistances, capacities, a room of -20 to 60 C): the trace did not
    pin them down, and a profile written from them would not load."""
    p = fit.params
    problems = []
    lo_amb, hi_amb = AMBIENT_RANGE_C
    if not lo_amb <= fit.ambient_c <= hi_amb:
        problems.append(f"a room of {fit.ambient_c:.1f} C (expected {lo_amb:g} to {hi_amb:g} C)")
    lo_r, hi_r = R_RANGE_C_PER_W
    lo_c, hi_c = C_RANGE_J_PER_C
    for name, value, lo, hi in (
        ("r_die_c_per_w", p.r_die_c_per_w, lo_r, hi_r),
        ("r_sink_c_per_w", p.r_sink_c_per_w, lo_r, hi_r),
        ("c_die_j_per_c", p.c_die_j_per_c, lo_c, hi_c),
        ("c_sink_j_per_c", p.c_sink_j_per_c, lo_c, hi_c),
    ):
        if not lo <= value <= hi:
            problems.append(f"{name} {value:.3g} (expected {lo:g} to {hi:g})")
    if problems:
        raise ValueError(
            "calibration: the fit gives an implausible model, " + ", ".join(problems) + "; "
            "the trace does not pin the thermal constants down: record idle, a sustained load and the cool-down"
        )


def validate_split(samples: Sequence[ThermalSample], fraction: float = 0.5) -> SplitValidation:
    """Fit on the first ``fraction`` of the samples (by count), predict the rest."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a value between 0 and 1, got {fraction}")
    cut = int(len(samples) * fraction)
    train, held_out = samples[:cut], samples[cut:]
    if len(held_out) < 2:
        raise ValueError("calibration: too few samples after the split")
    fit = fit_thermal(train)
    t = [s.t_s for s in held_out]
    p = [s.power_w for s in held_out]
    measured = [s.temperature_c for s in held_out]
    restarted = predict(fit.params, t, p, measured[0], fit.ambient_c)
    everything = predict(
        fit.params,
        [s.t_s for s in samples],
        [s.power_w for s in samples],
        samples[0].temperature_c,
        fit.ambient_c,
    )
    return SplitValidation(
        fit=fit,
        split_t_s=held_out[0].t_s,
        n_predicted=len(held_out),
        predict_rmse_c=rmse(restarted, measured),
        continued_rmse_c=rmse(everything[cut:], measured),
    )


def profile_from_trace(trace: Trace, fit: FitResult, name: str, gpu_index: int | None = None) -> GpuProfile:
    """A profile for the GPU recorded in ``trace`` (its device facts) with the thermal
    constants of ``fit``; idle power is the median power of the samples NVML flagged idle
    (clock event reason 0x1). ValueError names any fact the trace lacks.

    With :func:`governor.sim.profiles.render_profile` this is what ``calibrate --output``
    writes.
    """
    if gpu_index is None:
        gpu_index = min(trace.devices)
    info = trace.devices[gpu_index].info
    idle = sorted(
        s.reading.power_w
        for s in trace.samples.get(gpu_index, ())
        if s.reading.power_w is not None and (s.reading.clock_event_reasons or 0) & 0x1
    )
    facts = {
        "power_limit_min_w": info.power_limit_min_w,
        "power_limit_max_w": info.power_limit_max_w,
        "power_limit_default_w": info.power_limit_default_w,
        "temperature_slowdown_c": info.temperature_slowdown_c,
        "temperature_shutdown_c": info.temperature_shutdown_c,
        "memory_total_bytes": info.memory_total_bytes,
    }
    missing = [key for key, value in facts.items() if value is None]
    if not idle:
        missing.append("idle samples (clock_event_reasons 0x1)")
    if missing:
        raise ValueError(f"{trace.source}: GPU {gpu_index}: the trace lacks " + ", ".join(missing))
    assert info.power_limit_min_w is not None and info.power_limit_max_w is not None
    assert info.power_limit_default_w is not None and info.memory_total_bytes is not None
    assert info.temperature_slowdown_c is not None and info.temperature_shutdown_c is not None
    reserved = min(
        (s.reading.memory_used_bytes for s in trace.samples.get(gpu_index, ()) if s.reading.memory_used_bytes),
        default=0,
    )
    return GpuProfile(
        name=name,
        gpu_name=info.name,
        memory_total_bytes=info.memory_total_bytes,
        memory_reserved_bytes=reserved,
        idle_power_w=round(idle[len(idle) // 2], 1),
        power_limit_min_w=info.power_limit_min_w,
        power_limit_max_w=info.power_limit_max_w,
        power_limit_default_w=info.power_limit_default_w,
        temperature_slowdown_c=info.temperature_slowdown_c,
        temperature_shutdown_c=info.temperature_shutdown_c,
        thermal=fit.params,
        ambient_c=round(fit.ambient_c, 2),
        source=trace.source,
    )
