"""The thermal model fitted online to one GPU's own readings (pure, a few float operations a tick).

The model is the simulator's and ``calibrate``'s two-node model (:mod:`governor.sim.thermal`)
in its fast-die limit: the die node settles within a second or two (1.5 s on the RTX 4070
profile, 0.3 s on the H100 trace), so the die sits ``R_die * P`` above the heatsink, and
the heatsink is a first-order node::

    T_die  = T_sink + R_die * P
    T_sink -> T_amb + R_sink * P     with time constant tau (seconds)

How it is fitted (output error: the model's own heatsink, not the last reading, explains
each reading, so whole-degree readings do not bias it):

* **Every reading is a row** (a tick, 1 s by default). For each heatsink time constant of a
  grid (:data:`TAUS_S`, 2 s to 17 min, a factor 2 apart) a filter runs the heatsink's
  response to the power actually drawn, in watts: ``m_k -> P`` with time constant ``tau_k``,
  exact for a power held over the interval since the last reading. With it the model is
  linear: ``T = T_amb + R_die * (P - m_k) + R_total * m_k + s * e_k``, where ``e_k`` (1 at the
  start, decaying with ``tau_k``) carries how far from settled the heatsink was when the
  filters started (:data:`START_S` after the first reading, once the die has followed its
  power), and ``s`` is fitted too. Each reading adds to a few running sums per time
  constant, forgotten with time constant :data:`WINDOW_S`.
* **The room is taken out of the slopes.** The sums are of the signals *minus their running
  means over* :data:`HIGH_PASS_S` (a high-pass): a room that drifts over minutes adds nothing
  to them, and what a power step does within minutes is all they see. So a step in power is
  explained by the slopes, and a change of room cannot pose as one.
* **The refit** (once a block of :data:`BLOCK_S`): for every time constant, the 3 x 3 least
  squares for ``R_die`` (``>= 0``), ``R_total`` and ``s``, regularised toward the prior; the
  time constant whose fit leaves the least (penalised) error wins, refined between its
  neighbours. A few microseconds; nothing but the sums is stored.
* **The room** is what that model leaves unexplained, averaged over :data:`ROOM_S` (a
  minute): ``mean(T) - R_die * mean(P) - R_sink * mean(m) - s * mean(e)``. It is bounded to
  :data:`AMBIENT_RANGE_C` and never above the heatsink (``T - R_die * P``), which a card
  drawing power keeps above the room.

The prior, which holds until the data say otherwise: ``R_die + R_sink`` such that the
card's default limit heats it :data:`PRIOR_RISE_C` above the room, a quarter of it in the
die, tau :data:`PRIOR_TAU_S`, and the room where the first reading says it is under that
slope (:func:`prior_params`). It weighs little: a card under a constant load says where it
settles at that power, not how much cooler it would run at another, so the prior's slope
fills in until the power moves; one load step outweighs it. The time constant has a light
prior too (:data:`PRIOR_TAU_C2`), which only decides while the data cannot.

The fit is judged out of sample: at every block, the fitted model (once :data:`MIN_ROWS`
blocks are in) as it stood :data:`ERROR_HORIZON_S` seconds (12 blocks) earlier is run from
that block's measured temperature through the power that then really came, and its
prediction minus the measured block temperature is the 60-seconds-ahead prediction error
(exported as a metric; its root mean square is forgotten over :data:`WINDOW_S`). It
measures the model, not how predictable the load was. :func:`replay` runs a recorded
trace through this same fit and returns every such error.

Units: seconds, degrees Celsius, watts; R in C/W.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

BLOCK_S = 5.0
"""Readings are averaged over blocks of this many seconds: once a block the fit is solved again
and the prediction error scored."""
WINDOW_S = 900.0
"""Time constant (seconds) of the exponential forgetting of old readings: the fit's sliding window."""
HIGH_PASS_S = 180.0
"""The slopes are fitted to what changes faster than this time constant (seconds): a room that
drifts more slowly adds nothing to them."""
ROOM_S = 60.0
"""Time constant (seconds) over which the room is averaged."""
TAU_RATIO = 2.0
"""The heatsink time constants tried are this factor apart."""
TAUS_S = tuple(2.0 * TAU_RATIO**k for k in range(10))
"""The heatsink time constants (seconds) the fit tries: 2 s to 1024 s."""
PRIOR_DIE_S = 12.0
"""The prior on ``R_die`` weighs as much as this many seconds of readings whose power is half
the default limit away from its mean."""
PRIOR_TOTAL_S = 0.25
"""The same for ``R_total``: a quarter of a second, so a single load step outweighs it."""
PRIOR_TAU_C2 = 3.0
"""Penalty (C squared, against the fit's summed squared error) per squared e-fold of the
heatsink time constant away from the prior's: it picks the time constant while the data
cannot tell."""
MIN_ROWS = 6
"""Blocks (30 s) before the fit is trusted for predictions."""
PRIOR_RISE_C = 55.0
"""Prior: the card's default limit heats the die this far above the room when settled."""
PRIOR_TAU_S = 60.0
"""Prior heatsink time constant, seconds."""
PRIOR_DIE_SHARE = 0.25
"""Prior share of the die-to-room resistance in the die node."""
ERROR_HORIZON_S = 60.0
"""The prediction error is the model's error this many seconds ahead."""
ERROR_BLOCKS = round(ERROR_HORIZON_S / BLOCK_S)
MAX_GAP_S = 3 * BLOCK_S
"""A gap between readings longer than this starts the filters and the blocks afresh."""
START_S = BLOCK_S
"""The filters start this long after the first reading (or a gap): by then the die has settled on
its heatsink, so only the heatsink's own start needs fitting."""
AMBIENT_RANGE_C = (-10.0, 60.0)
"""The room the model may infer (C): a plausible room or server inlet."""


@dataclass(frozen=True, slots=True)
class ModelParams:
    """The fast-die two-node model: heatsink time constant (s), resistances (C/W), room (C)."""

    tau_s: float
    r_die_c_per_w: float
    r_sink_c_per_w: float
    ambient_c: float

    @property
    def r_total_c_per_w(self) -> float:
        """Die-to-room resistance in C/W: the settled rise per watt."""
        return self.r_die_c_per_w + self.r_sink_c_per_w

    def steady_c(self, power_w: float) -> float:
        """Where the die settles (C) at a constant ``power_w``."""
        return self.ambient_c + power_w * self.r_total_c_per_w

    def power_for_c(self, temperature_c: float) -> float:
        """The constant power (W) at which the die settles at ``temperature_c``."""
        return (temperature_c - self.ambient_c) / self.r_total_c_per_w

    def predict_c(self, die_c: float, power_now_w: float, power_w: float, after_s: float) -> float:
        """The die (C) ``after_s`` seconds from now, at ``die_c`` drawing ``power_now_w`` now,
        if the power is ``power_w`` from now on."""
        sink = die_c - self.r_die_c_per_w * power_now_w
        sink_inf = self.ambient_c + self.r_sink_c_per_w * power_w
        return sink_inf + (sink - sink_inf) * math.exp(-after_s / self.tau_s) + self.r_die_c_per_w * power_w


def prior_params(default_w: float, temperature_c: float, power_w: float) -> ModelParams:
    """The prior for a card whose default limit is ``default_w`` (W), first read at
    ``temperature_c`` drawing ``power_w`` (taken as settled)."""
    r_total = PRIOR_RISE_C / max(default_w, 1.0)
    return ModelParams(
        tau_s=PRIOR_TAU_S,
        r_die_c_per_w=PRIOR_DIE_SHARE * r_total,
        r_sink_c_per_w=(1.0 - PRIOR_DIE_SHARE) * r_total,
        ambient_c=temperature_c - r_total * power_w,
    )


@dataclass(frozen=True, slots=True)
class Block:
    """The block being filled: first and last reading's times (s), sums of temperature (C) and
    power (W), and the count. Kept apart from :class:`FitState` so a tick builds only this."""

    start_s: float
    end_s: float
    temp_sum: float
    power_sum: float
    n: int


Filter = tuple[float, float, float, float, float, float, float, float, float, float, float, float, float]
"""One heatsink time constant's state: the filter ``m`` (W) and the start transient ``e`` (1 at
the start, decaying with the time constant); the means of both over :data:`HIGH_PASS_S` and over
:data:`ROOM_S`; and the forgotten sums (weighted by seconds) of the high-passed products ``m*m``,
``m*P``, ``m*T``, ``e*e``, ``e*P``, ``e*T``, ``e*m``."""


@dataclass(frozen=True, slots=True)
class FitState:
    """The online fit of one GPU, carried in its rule state.

    The time of the last reading in the filters (s); the means of temperature (C) and power
    (W) over :data:`ROOM_S`; the forgotten sums of the high-passed ``P * P``, ``P * T`` and
    ``T * T``; one :data:`Filter` per time constant of :data:`TAUS_S`; the last complete
    block's means (C, W) and the count of complete blocks (``rows``); the prior and the
    latest fit (None until one is); the last :data:`ERROR_BLOCKS` blocks with the fit as it
    stood then; the latest 60-s-ahead prediction error (C, predicted minus measured), its
    forgotten mean square and how many have been scored.
    """

    last_t_s: float | None = None
    start_s: float = 0.0
    means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    sums: tuple[float, float, float] = (0.0, 0.0, 0.0)
    filters: tuple[Filter, ...] = ()
    last_block: tuple[float, float] | None = None
    rows: int = 0
    prior: ModelParams | None = None
    fitted: ModelParams | None = None
    history: tuple[tuple[float, float, ModelParams], ...] = ()
    error_c: float | None = None
    error_ms_c2: float | None = None
    scored: int = 0
    power_scale_w: float = 100.0

    @property
    def params(self) -> ModelParams | None:
        """The model in force: the latest valid fit, else the prior (None before any reading)."""
        return self.fitted if self.fitted is not None else self.prior

    @property
    def ready(self) -> bool:
        """True once the fit has :data:`MIN_ROWS` blocks and a valid solution: predictions may be acted on."""
        return self.fitted is not None and self.rows >= MIN_ROWS

    @property
    def error_rms_c(self) -> float | None:
        """Root mean square of the recent 60-s-ahead prediction errors (C), None before the first."""
        return None if self.error_ms_c2 is None else math.sqrt(self.error_ms_c2)


def observe(
    fit: FitState, block: Block | None, t_s: float, temperature_c: float, power_w: float, default_w: float
) -> tuple[FitState, Block]:
    """``fit`` and the current ``block`` after one reading at ``t_s`` (die ``temperature_c``, board
    ``power_w``) of a card whose default limit is ``default_w`` (W): the reading moves the filters
    and the sums and joins the block; when the block is complete the fit is solved again and
    scores the prediction it made 60 s ago."""
    if fit.prior is None:
        fit = replace(
            fit, prior=prior_params(default_w, temperature_c, power_w), power_scale_w=max(default_w / 2.0, 1.0)
        )
    fit = _reading(fit, t_s, temperature_c, power_w)
    if block is None or t_s - block.end_s > MAX_GAP_S or t_s < block.end_s:
        # First reading, or a gap (missing readings, a stalled daemon): no block spans it.
        if block is not None and (fit.last_block is not None or fit.history):
            fit = replace(fit, last_block=None, history=())
        return fit, Block(t_s, t_s, temperature_c, power_w, 1)
    if t_s - block.start_s < BLOCK_S:
        return fit, Block(block.start_s, t_s, block.temp_sum + temperature_c, block.power_sum + power_w, block.n + 1)
    means = (block.temp_sum / block.n, block.power_sum / block.n)
    return _close_block(fit, means, t_s - block.start_s), Block(t_s, t_s, temperature_c, power_w, 1)


def _reading(fit: FitState, t_s: float, temperature_c: float, power_w: float) -> FitState:
    """``fit`` after one reading: the filters run over the time since the last one and the sums
    take the reading. The first reading, or one after a gap, starts the filters at ``power_w`` and
    the start transient at 1 (and so does every reading of the next :data:`START_S`): how far the
    heatsink then was from settled is fitted too. After a gap the sums start over, with the model
    learnt so far as the prior: the start transient has one fitted offset, the last start's, and
    charged to this start it would move the room by tens of degrees."""
    last = fit.last_t_s
    fresh = last is None or t_s < last or t_s - last > MAX_GAP_S or not fit.filters
    if fresh and fit.filters:
        fit = replace(fit, prior=fit.params, sums=(0.0, 0.0, 0.0), filters=())
    if last is None or fresh or t_s - fit.start_s < START_S:
        learnt = [f[6:] for f in fit.filters] if fit.filters else [(0.0,) * 7] * len(TAUS_S)
        restarted = tuple((power_w, 1.0, power_w, 1.0, power_w, 1.0, *sums) for sums in learnt)
        return replace(
            fit,
            last_t_s=t_s,
            start_s=t_s if fresh else fit.start_s,
            means=(temperature_c, power_w, temperature_c, power_w),
            filters=restarted,
        )
    h = t_s - last
    if h <= 0.0:  # the same instant again: no time for the heatsink to move
        return fit
    keep = math.exp(-h / WINDOW_S)
    slow = 1.0 - math.exp(-h / HIGH_PASS_S)
    room = 1.0 - math.exp(-h / ROOM_S)
    hp_t, hp_p, room_t, room_p = fit.means
    hp_t += slow * (temperature_c - hp_t)
    hp_p += slow * (power_w - hp_p)
    room_t += room * (temperature_c - room_t)
    room_p += room * (power_w - room_p)
    y_t, y_p = temperature_c - hp_t, power_w - hp_p
    spp, spt, stt = fit.sums
    sums = (keep * spp + h * y_p * y_p, keep * spt + h * y_p * y_t, keep * stt + h * y_t * y_t)
    filters: list[Filter] = []
    for tau, old in zip(TAUS_S, fit.filters):
        m0, e0, hp_m0, hp_e0, room_m0, room_e0, smm, smp, smt, see, sep, set_, sem = old
        a = math.exp(-h / tau)
        m = power_w + (m0 - power_w) * a
        e = e0 * a
        hp_m = hp_m0 + slow * (m - hp_m0)
        hp_e = hp_e0 + slow * (e - hp_e0)
        y_m, y_e = m - hp_m, e - hp_e
        hy_m, hy_e = h * y_m, h * y_e
        filters.append(
            (
                m,
                e,
                hp_m,
                hp_e,
                room_m0 + room * (m - room_m0),
                room_e0 + room * (e - room_e0),
                keep * smm + hy_m * y_m,
                keep * smp + hy_m * y_p,
                keep * smt + hy_m * y_t,
                keep * see + hy_e * y_e,
                keep * sep + hy_e * y_p,
                keep * set_ + hy_e * y_t,
                keep * sem + hy_e * y_m,
            )
        )
    return replace(fit, last_t_s=t_s, means=(hp_t, hp_p, room_t, room_p), sums=sums, filters=tuple(filters))


def _close_block(fit: FitState, block: tuple[float, float], h_s: float) -> FitState:
    """Refit at the end of ``block`` (mean C, mean W) and score the prediction made 60 s before it."""
    temp, power = block
    fitted = _refit(fit, temp, power) or fit.fitted
    error_c, error_ms, scored = fit.error_c, fit.error_ms_c2, fit.scored
    history = fit.history
    if len(history) >= ERROR_BLOCKS:
        keep = math.exp(-h_s / WINDOW_S)
        predicted = _run(history[0], [p for _, p, _ in history[1:]] + [power], h_s)
        error_c = predicted - temp
        error_ms = error_c * error_c if error_ms is None else keep * error_ms + (1.0 - keep) * error_c * error_c
        scored += 1
        history = history[1:]
    # Only a fitted model's predictions are scored: the prior is a guess, not the model.
    history = (*history, (temp, power, fitted)) if fitted is not None and fit.rows + 1 >= MIN_ROWS else ()
    return replace(
        fit,
        last_block=block,
        rows=fit.rows + 1,
        fitted=fitted,
        history=history,
        error_c=error_c,
        error_ms_c2=error_ms,
        scored=scored,
    )


def _run(start: tuple[float, float, ModelParams], powers: list[float], h_s: float) -> float:
    """The die (C) after ``powers`` (one per block of ``h_s`` seconds), from a block's measured
    temperature and power under the model of that block."""
    temp, power, model = start
    for next_power in powers:
        temp = model.predict_c(temp, power, next_power, h_s)
        power = next_power
    return temp


Candidate = tuple[float, int, float, float, float]
"""One time constant's fit: penalised squared error (C^2 s), its index in :data:`TAUS_S`, R_die,
R_sink (C/W), and the heatsink's start offset from settled (C, the start transient's factor)."""


def _candidate(fit: FitState, k: int, prior: ModelParams) -> Candidate | None:
    """The regularised least-squares fit for the time constant ``TAUS_S[k]``; None when it
    describes no heated body (``R_sink <= 0``) or the system is singular."""
    spp, spt, stt = fit.sums
    smm, smp, smt, see, sep, set_, sem = fit.filters[k][6:]
    # Regressors: u = P - m (slope R_die), v = m (slope R_total), e (the start's offset).
    suu, suv, sue, svv, sve = spp - 2.0 * smp + smm, smp - smm, sep - sem, smm, sem
    sut, svt = spt - smt, smt
    scale2 = fit.power_scale_w * fit.power_scale_w
    lam_d, lam_t = PRIOR_DIE_S * scale2, PRIOR_TOTAL_S * scale2
    d0, t0 = prior.r_die_c_per_w, prior.r_total_c_per_w
    see += 1e-9  # a start transient long forgotten leaves the offset at 0
    solved = _solve3((suu + lam_d, suv, sue, svv + lam_t, sve, see), (sut + lam_d * d0, svt + lam_t * t0, set_))
    if solved is None:
        return None
    r_die, r_total, offset = solved
    if r_die < 0.0:  # the die cannot cool when the power rises: R_die = 0, the 2 x 2 rest
        det = (svv + lam_t) * see - sve * sve
        if det <= 0.0:
            return None
        r_die = 0.0
        r_total = ((svt + lam_t * t0) * see - set_ * sve) / det
        offset = ((svv + lam_t) * set_ - sve * (svt + lam_t * t0)) / det
    r_sink = r_total - r_die
    if not r_sink > 0.0:
        return None
    error = stt - 2.0 * (r_die * sut + r_total * svt + offset * set_)
    error += r_die * r_die * suu + r_total * r_total * svv + offset * offset * see
    error += 2.0 * (r_die * r_total * suv + r_die * offset * sue + r_total * offset * sve)
    error += lam_d * (r_die - d0) ** 2 + lam_t * (r_total - t0) ** 2
    error += PRIOR_TAU_C2 * math.log(TAUS_S[k] / prior.tau_s) ** 2
    return (error, k, r_die, r_sink, offset)


def _solve3(
    m: tuple[float, float, float, float, float, float], v: tuple[float, float, float]
) -> tuple[float, float, float] | None:
    """Solve the symmetric 3 x 3 system (upper triangle ``m`` = a11 a12 a13 a22 a23 a33) for ``v``
    by Cramer's rule; None when it is singular."""
    a11, a12, a13, a22, a23, a33 = m
    c11 = a22 * a33 - a23 * a23
    c12 = a13 * a23 - a12 * a33
    c13 = a12 * a23 - a13 * a22
    det = a11 * c11 + a12 * c12 + a13 * c13
    if not abs(det) > 1e-300 or not math.isfinite(det):
        return None
    c22 = a11 * a33 - a13 * a13
    c23 = a12 * a13 - a11 * a23
    c33 = a11 * a22 - a12 * a12
    b1, b2, b3 = v
    return (
        (c11 * b1 + c12 * b2 + c13 * b3) / det,
        (c12 * b1 + c22 * b2 + c23 * b3) / det,
        (c13 * b1 + c23 * b2 + c33 * b3) / det,
    )


def _refit(fit: FitState, temp: float, power: float) -> ModelParams | None:
    """The best model over the time constants, at the end of a block at ``temp`` (C) and ``power``
    (W); None before any reading has moved the filters."""
    prior = fit.prior
    if prior is None or not fit.filters:
        return None
    candidates = [c for k in range(len(TAUS_S)) if (c := _candidate(fit, k, prior)) is not None]
    if not candidates:
        return None
    best = min(candidates)
    error, k, r_die, r_sink, _ = best
    tau = TAUS_S[k]
    room = _room(fit, best)
    by_k = {c[1]: c for c in candidates}
    below, above = by_k.get(k - 1), by_k.get(k + 1)
    if below is not None and above is not None:
        # The parabola through the three errors (in log tau) has its minimum this many steps off.
        curvature = below[0] - 2.0 * error + above[0]
        if curvature > 0.0:
            offset = max(-0.5, min(0.5, 0.5 * (below[0] - above[0]) / curvature))
            other = above if offset > 0.0 else below
            share = abs(offset)
            tau *= TAU_RATIO**offset
            r_die += share * (other[2] - r_die)
            r_sink += share * (other[3] - r_sink)
            room += share * (_room(fit, other) - room)
    room = min(room, temp - r_die * power)  # the heatsink is never cooler than the room
    room = max(AMBIENT_RANGE_C[0], min(AMBIENT_RANGE_C[1], room))
    return ModelParams(tau, r_die, r_sink, room)


def _room(fit: FitState, candidate: Candidate) -> float:
    """The room (C) that ``candidate`` leaves unexplained over :data:`ROOM_S`."""
    _, k, r_die, r_sink, offset = candidate
    _, _, mean_t, mean_p = fit.means
    mean_m, mean_e = fit.filters[k][4:6]
    return mean_t - r_die * mean_p - r_sink * mean_m - offset * mean_e


@dataclass(frozen=True, slots=True)
class Replay:
    """A recorded trace run through the online fit: every 60-s-ahead prediction error scored
    (C, predicted minus measured), the room of the model in force at every block once it was
    ready (C), and the fit at the end."""

    errors_c: tuple[float, ...]
    rooms_c: tuple[float, ...]
    final: FitState

    @property
    def mean_abs_c(self) -> float | None:
        """Mean absolute prediction error (C), None when none was scored."""
        return sum(abs(e) for e in self.errors_c) / len(self.errors_c) if self.errors_c else None

    @property
    def rms_c(self) -> float | None:
        """Root mean square prediction error (C), None when none was scored."""
        return math.sqrt(sum(e * e for e in self.errors_c) / len(self.errors_c)) if self.errors_c else None

    @property
    def max_abs_c(self) -> float | None:
        """Largest absolute prediction error (C), None when none was scored."""
        return max((abs(e) for e in self.errors_c), default=None)


def replay(samples: Iterable[tuple[float, float | None, float | None]], default_w: float) -> Replay:
    """Run ``samples`` (time s, die C, board W; in time order) of one card whose default limit is
    ``default_w`` (W) through :func:`observe`, as target mode does each tick (a sample missing
    either value is skipped, as the governor skips it)."""
    fit, block = FitState(), None
    errors: list[float] = []
    rooms: list[float] = []
    for t_s, temperature_c, power_w in samples:
        if temperature_c is None or power_w is None:
            continue
        rows, scored = fit.rows, fit.scored
        fit, block = observe(fit, block, t_s, temperature_c, power_w, default_w)
        if fit.scored != scored and fit.error_c is not None:
            errors.append(fit.error_c)
        if fit.rows != rows and fit.ready and fit.fitted is not None:
            rooms.append(fit.fitted.ambient_c)
    return Replay(tuple(errors), tuple(rooms), fit)
