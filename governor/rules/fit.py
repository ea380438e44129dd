"""The thermal model fitted online to one GPU's own readings (pure, a few float operations a tick).

The model is the simulator's and ``calibrate``'s two-node model (:mod:`governor.sim.thermal`)
in its fast-die limit: the die node settles within a second or two (1.5 s on the RTX 4070
profile, 0.3 s on the H100 trace), far below the controller's time scale, so the die sits
``R_die * P`` above the heatsink, and the heatsink is a first-order node::

    T_die  = T_sink + R_die * P
    T_sink -> T_amb + R_sink * P     with time constant tau (seconds)

Readings are averaged over blocks of :data:`BLOCK_S` seconds (NVML's whole degrees and the
power's noise average out). Sampled once per block, the model is linear in its unknowns::

    T[j+1] = a * T[j] + b1 * P[j+1] + b0 * P[j] + c
    a = exp(-h / tau), b1 = R_die + (1 - a) * R_sink, b0 = -a * R_die, c = (1 - a) * T_amb

so each block adds one row to least-squares normal equations (a 4 x 4 matrix and a vector),
which are exponentially forgotten with time constant :data:`WINDOW_S` (a sliding window of
about 15 minutes), plus a fast room correction: the newest rows' mean residual over
:data:`BIAS_S` (a room that warms by 3 C shows within half a minute) and regularised toward a prior worth
:data:`PRIOR_ROWS` rows on the dynamics and the slope but not on the room (a card under a
constant load says where it settles at that power, not how much cooler it would run at
another: the prior's slope fills in until the power moves, and the room comes from the
data). Solving the 4 x 4 system once a block is the "refit": microseconds.

The prior: ``R_die + R_sink`` such that the card's default limit heats it
:data:`PRIOR_RISE_C` above the room, a quarter of it in the die, tau :data:`PRIOR_TAU_S`,
and the room where the first reading says it is under that slope.

The fit is judged out of sample: at every block, the fitted model (once :data:`MIN_ROWS`
rows are in) as it stood
:data:`ERROR_HORIZON_S` seconds (12 blocks) earlier is run from that block's measured
temperature through the power that then really came, and its prediction minus the measured
block temperature is the 60-seconds-ahead prediction error (exported as a metric; its
root mean square is forgotten over :data:`WINDOW_S`). It measures the model, not how
predictable the load was.

Units: seconds, degrees Celsius, watts; R in C/W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

BLOCK_S = 5.0
"""Readings are averaged over blocks of this many seconds; the fit takes one row per block."""
WINDOW_S = 900.0
"""Time constant (seconds) of the exponential forgetting of old rows: the fit's sliding window."""
PRIOR_ROWS = 12.0
"""The prior of the dynamics and the slope (a, b1, b0) weighs as much as this many rows (one
minute of blocks) of typical size. The room (c) has no prior: it comes from the data alone."""
BIAS_S = 30.0
"""Time constant (s) of the fast room correction: the mean of the newest rows' residuals, so
a room that warms shows in the model within half a minute, not a window."""
MIN_ROWS = 6
"""Rows (30 s of blocks) before the fit is trusted for predictions."""
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
"""A gap between readings longer than this starts the blocks afresh (no row spans it)."""
TAU_RANGE_S = (1.0, 1800.0)
AMBIENT_RANGE_C = (-30.0, 80.0)


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


def _theta(params: ModelParams, h_s: float) -> tuple[float, float, float, float]:
    """The row coefficients (a, b1, b0, c) of ``params`` for blocks of ``h_s`` seconds."""
    a = math.exp(-h_s / params.tau_s)
    return (
        a,
        params.r_die_c_per_w + (1.0 - a) * params.r_sink_c_per_w,
        -a * params.r_die_c_per_w,
        (1.0 - a) * params.ambient_c,
    )


def _params(theta: tuple[float, ...] | list[float], h_s: float) -> ModelParams | None:
    """Physical parameters of row coefficients, or None when they describe no heated, cooled body."""
    a, b1, b0, c = theta
    if not 0.0 < a < 1.0:
        return None
    tau = -h_s / math.log(a)
    r_die = max(0.0, -b0 / a)
    r_sink = (b1 - r_die) / (1.0 - a)
    ambient = c / (1.0 - a)
    if not (TAU_RANGE_S[0] <= tau <= TAU_RANGE_S[1] and r_sink > 0.0):
        return None
    if not AMBIENT_RANGE_C[0] <= ambient <= AMBIENT_RANGE_C[1]:
        return None
    return ModelParams(tau, r_die, r_sink, ambient)


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Solve the n x n system ``m x = v`` (Gaussian elimination, partial pivoting); None if singular."""
    n = len(v)
    a = [[*row, rhs] for row, rhs in zip(m, v)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            for k in range(col, n + 1):
                a[r][k] -= f * a[col][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][k] * x[k] for k in range(r + 1, n))) / a[r][r]
    return x


_PAIRS = tuple((i, j) for i in range(4) for j in range(i, 4))


@dataclass(frozen=True, slots=True)
class Block:
    """The block being filled: first and last reading's times (s), sums of temperature (C) and
    power (W), and the count. Kept apart from :class:`FitState` so a tick builds only this."""

    start_s: float
    end_s: float
    temp_sum: float
    power_sum: float
    n: int


@dataclass(frozen=True, slots=True)
class FitState:
    """The online fit of one GPU, carried in its rule state (it changes once a block).

    The last complete block's means
    (C, W); the forgotten normal equations (upper triangle of X'X, X'y, total weight, row
    count); the prior and the latest valid fit (None until one is); the last
    :data:`ERROR_BLOCKS` blocks with the fit as it stood then; and the latest 60-s-ahead
    prediction error (C, predicted minus measured) with its forgotten mean square.
    """

    last_block: tuple[float, float] | None = None
    xtx: tuple[float, ...] = (0.0,) * 10
    xty: tuple[float, ...] = (0.0,) * 4
    rows: int = 0
    prior: ModelParams | None = None
    fitted: ModelParams | None = None
    history: tuple[tuple[float, float, ModelParams], ...] = ()
    error_c: float | None = None
    error_ms_c2: float | None = None
    power_scale_w: float = 100.0
    bias_c: float = 0.0

    @property
    def params(self) -> ModelParams | None:
        """The model in force: the latest valid fit, else the prior (None before any reading)."""
        return self.fitted if self.fitted is not None else self.prior

    @property
    def ready(self) -> bool:
        """True once the fit has :data:`MIN_ROWS` rows and a valid solution: predictions may be acted on."""
        return self.fitted is not None and self.rows >= MIN_ROWS

    @property
    def error_rms_c(self) -> float | None:
        """Root mean square of the recent 60-s-ahead prediction errors (C), None before the first."""
        return None if self.error_ms_c2 is None else math.sqrt(self.error_ms_c2)


def observe(
    fit: FitState, block: Block | None, t_s: float, temperature_c: float, power_w: float, default_w: float
) -> tuple[FitState, Block]:
    """``fit`` and the current ``block`` after one reading at ``t_s`` (die ``temperature_c``, board
    ``power_w``) of a card whose default limit is ``default_w`` (W): the reading joins the block,
    and when the block is complete its row joins the fit, which is solved again and scores the
    prediction it made 60 s ago."""
    if fit.prior is None:
        fit = replace(
            fit, prior=prior_params(default_w, temperature_c, power_w), power_scale_w=max(default_w / 2.0, 1.0)
        )
    if block is None or t_s - block.end_s > MAX_GAP_S or t_s < block.end_s:
        # First reading, or a gap (missing readings, a suspended host): no row spans it.
        if block is not None and (fit.last_block is not None or fit.history):
            fit = replace(fit, last_block=None, history=())
        return fit, Block(t_s, t_s, temperature_c, power_w, 1)
    if t_s - block.start_s < BLOCK_S:
        return fit, Block(block.start_s, t_s, block.temp_sum + temperature_c, block.power_sum + power_w, block.n + 1)
    means = (block.temp_sum / block.n, block.power_sum / block.n)
    return _close_block(fit, means, t_s - block.start_s), Block(t_s, t_s, temperature_c, power_w, 1)


def _close_block(fit: FitState, block: tuple[float, float], h_s: float) -> FitState:
    """Add the row ending in ``block`` (mean C, mean W), refit, score the old prediction."""
    temp, power = block
    previous = fit.last_block
    if previous is None:
        return replace(fit, last_block=block)
    keep = math.exp(-h_s / WINDOW_S)
    x = (previous[0], power, previous[1], 1.0)
    xtx = tuple(keep * s + x[i] * x[j] for s, (i, j) in zip(fit.xtx, _PAIRS))
    xty = tuple(keep * s + x[i] * temp for i, s in enumerate(fit.xty))
    theta = _refit(xtx, xty, fit, h_s)
    bias = fit.bias_c
    fitted = fit.fitted
    if theta is not None:
        residual = temp - sum(t * xi for t, xi in zip(theta, x))
        keep_bias = math.exp(-h_s / BIAS_S)
        bias = keep_bias * bias + (1.0 - keep_bias) * residual
        a, b1, b0, c = theta
        fitted = _params((a, b1, b0, c + bias), h_s) or fit.fitted
    error_c, error_ms = fit.error_c, fit.error_ms_c2
    history = fit.history
    if len(history) >= ERROR_BLOCKS:
        predicted = _run(history[0], [p for _, p, _ in history[1:]] + [power], h_s)
        error_c = predicted - temp
        error_ms = error_c * error_c if error_ms is None else keep * error_ms + (1.0 - keep) * error_c * error_c
        history = history[1:]
    # Only a fitted model's predictions are scored: the prior is a guess, not the model.
    history = (*history, (temp, power, fitted)) if fitted is not None and fit.rows + 1 >= MIN_ROWS else ()
    return replace(
        fit,
        last_block=block,
        xtx=xtx,
        xty=xty,
        rows=fit.rows + 1,
        fitted=fitted,
        history=history,
        error_c=error_c,
        error_ms_c2=error_ms,
        bias_c=bias,
    )


def _run(start: tuple[float, float, ModelParams], powers: list[float], h_s: float) -> float:
    """The die (C) after ``powers`` (one per block of ``h_s`` seconds), from a block's measured
    temperature and power under the model of that block."""
    temp, power, model = start
    for next_power in powers:
        temp = model.predict_c(temp, power, next_power, h_s)
        power = next_power
    return temp


def _refit(xtx: tuple[float, ...], xty: tuple[float, ...], fit: FitState, h_s: float) -> list[float] | None:
    """Solve the regularised normal equations for the row coefficients (a, b1, b0, c); None if singular."""
    prior = fit.prior
    assert prior is not None
    theta0 = _theta(prior, h_s)
    scale_t = 50.0
    scales = (scale_t, fit.power_scale_w, fit.power_scale_w)
    m = [[0.0] * 4 for _ in range(4)]
    for s, (i, j) in zip(xtx, _PAIRS):
        m[i][j] = m[j][i] = s
    m[3][3] += 1e-6  # numerical safety only
    v = list(xty)
    for k in range(3):  # a, b1, b0; the room (c) is left to the data
        ridge = PRIOR_ROWS * scales[k] * scales[k]
        m[k][k] += ridge
        v[k] += ridge * theta0[k]
    return _solve(m, v)
