"""Target mode (pure): hold the die at or below ``target_c`` with a continuous power limit.

A model-based controller on the thermal model fitted online to the GPU's own readings
(:mod:`governor.rules.fit`). Each tick:

* The reading joins the fit (temperature and power both present).
* A reading in the critical zone sets the floor at once, whatever else holds (the power reading
  too: the jump needs the temperature only), as long as the limit is above it (a jump that was
  refused, or held under another tool's lower limit, is taken as soon as it can be).
* A missing temperature or power holds the limit (one ``power_hold`` decision).
* **Lower** when the die reads ``target_c`` or more (NVML's whole degrees: a reading equal
  to the target may be half a degree over it) or the model predicts it above ``target_c``
  within ``horizon_s`` seconds at the limit in force (at the power the GPU draws now when
  the limit is not what holds it back): to the highest whole-watt limit at which the model
  settles ``deadband_c / 2`` below the target (less by the measured excess when the die is
  already over it). Until the first lowering the GPU is hands-off: its limit is not touched.
* **Raise** only while the limit binds (the GPU draws what the limit allows, or NVML
  reports the software power cap) and both the model (where the limit in force settles)
  and the reading are more than ``deadband_c`` below the target, for ``dwell_s`` seconds
  of readings in a row (a gap in them, a stalled daemon, starts the run over), never in the
  critical zone nor over a lower limit set outside the governor: to the same settling
  limit, by at most :data:`RAISE_STEP_RATIO` of the default limit per raise, and never
  above the default limit. Lazy when releasing, like the ladder.
* Until the fit has 30 s of data (:data:`governor.rules.fit.MIN_ROWS`), only a reading
  above the target lowers the limit, and nothing raises it.
* At most one change per ``min_change_interval_s`` (except the critical jump, and a
  lowering while the die reads the target or more and is hotter than at the last change), and a
  raise only while it and a lowering after it still fit in ``max_changes_per_hour`` changes
  in the last hour (the rate limit; a needed lowering is never held back by it).
* Drift: a higher enforced limit (a driver reload, another tool) gets our limit re-applied
  once; a lower one, set outside the governor, is reported and left alone. A limit the driver
  stores rounded to its own step is what the governor put in force, as on the ladder
  (:func:`governor.rules.power.settle`): no drift, and the limit the predictions start from.
* The snapshot clock is trusted only forward, and a limit outside a range that narrowed is
  clamped into it (:func:`_rebased`).

Limits are whole watts clamped to ``[floor, the card's default limit]`` (NVML's range). A
steady load settles: once the limit holds the die inside the deadband, neither rule fires.

Every change says why, in the ladder's style: "predicted 81.2 C at 200 W in 120 s > target
78 C: 184 W".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from governor.model import Decision, GpuInfo, GpuReading
from governor.policy import Action, PowerPolicy, Rule, ThermalZone, format_seconds
from governor.rules.fit import MAX_GAP_S, Block, FitState, ModelParams, observe
from governor.rules.gaps import after_gap
from governor.rules.power import DRIFT_TOLERANCE_W, clamp_w, held_lower, power_decision, rung_w, settled_drift

HOUR_S = 3600.0
POWER_SMOOTHING_S = 5.0
"""Time constant (s) of the smoothing of the power reading the predictions start from."""
SW_POWER_CAP = 0x4
"""NVML clock event reason: the software power cap holds the clocks back."""
RAISE_STEP_RATIO = 0.10
"""One raise moves the limit up by at most this share of the card's default limit: a model
fitted at one power level knows its slope least, so it is trusted a step at a time."""


def binding_margin_w(limit_w: float) -> float:
    """How far below ``limit_w`` (W) the power may be while the limit still binds: 3 W or 3 %."""
    return max(3.0, 0.03 * limit_w)


@dataclass(frozen=True, slots=True)
class TargetState:
    """One GPU's controller, carried from tick to tick: the limit it set (None: hands-off),
    the online fit, when it last changed the limit and every change of the last hour
    (seconds) and the die then (C), the start of the current run of headroom at a binding limit, the smoothed
    power (W) and when it was read, whether it holds for a missing reading or has seen
    the current drift, and what the driver made of the last change (W: the enforced limit when it
    was decided, until read back; the limit it stored, when it rounded it)."""

    limit_w: float | None = None
    fit: FitState = field(default_factory=FitState)
    block: Block | None = None
    last_change_s: float | None = None
    changes_s: tuple[float, ...] = ()
    headroom_since_s: float | None = None
    power_w: float | None = None
    power_t_s: float | None = None
    holding: bool = False
    drift_seen: bool = False
    changed_at_c: float = math.inf
    settle_from_w: float | None = None
    granted_w: float | None = None

    @property
    def governed(self) -> bool:
        """True once the controller has set a limit on this GPU."""
        return self.limit_w is not None


def target_bounds(policy: PowerPolicy, gpu: GpuInfo) -> tuple[float, ...]:
    """(ceiling, floor) in watts for ``gpu``: its default limit (its maximum when NVML gives no
    default) and the configured floor (watts or a percentage of the default; the card's
    minimum when not set), both clamped to its allowed range. Empty when the card reports no
    limit to start from: the GPU is left alone."""
    ceiling = gpu.power_limit_default_w if gpu.power_limit_default_w is not None else gpu.power_limit_max_w
    if ceiling is None:
        return ()
    ceiling = clamp_w(ceiling, gpu)
    if policy.floor_w is not None:
        floor = rung_w(policy.floor_w, gpu)
        if floor is None:
            return ()
    elif gpu.power_limit_min_w is not None:
        floor = gpu.power_limit_min_w
    else:
        return ()
    floor = min(clamp_w(floor, gpu), ceiling)
    return (ceiling, floor)


def describe_model(fit: FitState) -> str:
    """The model in force and its recent error, for a decision's reason."""
    model = fit.params
    if model is None:
        return "no model yet"
    source = "fitted" if fit.fitted is not None else "prior"
    text = (
        f"{source} model {model.r_total_c_per_w:.3g} C/W, room {model.ambient_c:.1f} C, "
        f"tau {format_seconds(round(model.tau_s))}"
    )
    if fit.error_c is not None:
        text += f", 60-s prediction error {fit.error_c:+.1f} C"
    return text


def _changed(state: TargetState, limit_w: float, t_s: float, temperature_c: float, reading: GpuReading) -> TargetState:
    """``state`` after setting ``limit_w`` at ``t_s`` with the die at ``temperature_c``: the drift check
    starts over and the next reading of the enforced limit shows what the driver made of it."""
    recent = tuple(c for c in state.changes_s if t_s - c < HOUR_S)
    return replace(
        state,
        limit_w=limit_w,
        last_change_s=t_s,
        changes_s=(*recent, t_s),
        headroom_since_s=None,
        drift_seen=False,
        changed_at_c=temperature_c,
        settle_from_w=reading.power_limit_w,
    )


def _rebased(state: TargetState, t_s: float, ceiling_w: float, floor_w: float) -> TargetState:
    """``state`` made consistent with this tick, as the ladder's: a limit outside ``[floor_w, ceiling_w]``
    (the card's range narrowed) is clamped into it, and what the driver stored for it forgotten; times
    after ``t_s`` (the snapshot clock went backwards: a replay started over, a clock reset) are taken as
    ``t_s``, so the minimum interval, the dwell and the hourly count go on from now instead of waiting
    for the old clock; a run of headroom ends at a gap in the readings longer than
    :data:`~governor.rules.fit.MAX_GAP_S` (a stalled daemon: time nobody read is no dwell). ``state``
    itself when nothing needs it (every steady tick)."""
    limit, change, since, read = state.limit_w, state.last_change_s, state.headroom_since_s, state.power_t_s
    changes = state.changes_s
    stale = since is not None and (since > t_s or read is None or read > t_s or after_gap(read, t_s, MAX_GAP_S))
    if (
        (limit is None or floor_w <= limit <= ceiling_w)
        and (change is None or change <= t_s)
        and (not changes or changes[-1] <= t_s)
        and not stale
    ):
        return state
    clamped = None if limit is None else min(max(limit, floor_w), ceiling_w)
    moved = clamped != limit  # what the driver stored for the old limit says nothing of this one
    return replace(
        state,
        limit_w=clamped,
        settle_from_w=None if moved else state.settle_from_w,
        granted_w=None if moved else state.granted_w,
        last_change_s=None if change is None else min(change, t_s),
        changes_s=tuple(min(c, t_s) for c in changes),
        headroom_since_s=None if stale else since,
    )


def changes_in_last_hour(state: TargetState, t_s: float) -> int:
    """Limit changes the controller made in the hour up to ``t_s``."""
    return sum(1 for c in state.changes_s if t_s - c < HOUR_S)


def settling_limit_w(model: ModelParams, settle_c: float, ceiling_w: float, floor_w: float) -> float:
    """The highest whole-watt limit in ``[floor_w, ceiling_w]`` at which ``model`` settles at or
    below ``settle_c``."""
    watts = model.power_for_c(settle_c)
    if not math.isfinite(watts):
        return floor_w
    return min(ceiling_w, max(floor_w, float(math.floor(watts))))


def _smoothed(state: TargetState, power_w: float, t_s: float) -> float:
    """The smoothed power (W) after a reading of ``power_w`` at ``t_s``."""
    previous, at = state.power_w, state.power_t_s
    if previous is None or at is None or t_s <= at or t_s - at > 3 * POWER_SMOOTHING_S:
        return power_w
    keep = math.exp(-(t_s - at) / POWER_SMOOTHING_S)
    return keep * previous + (1.0 - keep) * power_w


def step_target(
    reading: GpuReading,
    previous_zone: ThermalZone,
    zone: ThermalZone,
    policy: PowerPolicy,
    bounds: tuple[float, ...],
    state: TargetState,
    t_s: float,
    *,
    check_drift: bool = True,
    cap_w: float | None = None,
) -> tuple[TargetState, list[Decision]]:
    """Advance one GPU's controller by one reading; returns the new state and its decisions.

    ``bounds`` is (ceiling, floor) from :func:`target_bounds` (empty: left alone); ``zone``
    and ``previous_zone`` are this tick's and the last tick's thermal zones. ``check_drift``
    is off in dry run, where the limit was never applied; ``cap_w`` is the highest limit (W)
    the actuator writes on this GPU, for the drift check (:func:`~governor.rules.power.drift`).
    """
    if not policy.enabled or not bounds:
        return state, []
    ceiling, floor = bounds
    state = _rebased(state, t_s, ceiling, floor)
    temperature, power = reading.temperature_c, reading.power_w
    if temperature is not None and power is not None:
        fit, block = observe(state.fit, state.block, t_s, temperature, power, ceiling)
        smooth_w = _smoothed(state, power, t_s)
        state = replace(state, fit=fit, block=block, power_w=smooth_w, power_t_s=t_s)
    enforced = reading.power_limit_w
    current = state.limit_w
    from_w = current if current is not None else enforced

    # Every critical reading above the floor, not only the one entering the zone, and with or without a
    # power reading: a jump that was refused (and undone) or held under another tool's lower limit is
    # taken as soon as it can be.
    if (
        temperature is not None
        and zone is ThermalZone.CRITICAL
        and current != floor
        and not _would_raise(floor, reading)
    ):
        entered = "entered" if previous_zone is not ThermalZone.CRITICAL else "in"
        reason = f"{entered} critical zone at {temperature:g} C: straight to the floor {floor:g} W"
        return _changed(state, floor, t_s, temperature, reading), [
            power_decision(reading, t_s, Rule.POWER_CRITICAL, reason, from_w=from_w, to_w=floor)
        ]

    if temperature is None or power is None:
        if state.headroom_since_s is not None:
            state = replace(state, headroom_since_s=None)
        if state.holding:
            return state, []
        missing = "temperature" if temperature is None else "power"
        held = power_decision(
            reading,
            t_s,
            Rule.POWER_HOLD,
            f"{missing} reading missing: holding the power limit",
            action=Action.NONE,
            from_w=from_w,
            to_w=from_w,
        )
        return replace(state, holding=True), [held]
    if state.holding:
        state = replace(state, holding=False)

    model = state.fit.params
    if model is None:  # pragma: no cover - a reading with both values always leaves a prior
        return state, []
    # The limit in force: ours (as the driver stored it, once read back), else the card's.
    granted = state.granted_w if state.settle_from_w is None else None
    if current is None:
        in_force = enforced if enforced is not None else ceiling
    else:
        in_force = granted if granted is not None else current
    smooth = state.power_w if state.power_w is not None else power
    binding = smooth >= in_force - binding_margin_w(in_force) or bool((reading.clock_event_reasons or 0) & SW_POWER_CAP)
    future_w = in_force if binding else min(smooth, in_force)
    ready = state.fit.ready
    # Until the fit has data, only the reading itself can ask for a lowering.
    predicted = model.predict_c(temperature, smooth, future_w, policy.horizon_s) if ready else temperature
    target = policy.target_c
    settle_c = target - policy.deadband_c / 2.0
    interval_ok = state.last_change_s is None or t_s - state.last_change_s >= policy.min_change_interval_s

    # NVML reads whole degrees: a reading equal to the target may be half a degree above it.
    at_target = temperature >= target
    if at_target or predicted > target:
        if state.headroom_since_s is not None:
            state = replace(state, headroom_since_s=None)
        # Aggressive when hot: a die at the target and hotter than at the last change does
        # not wait out the minimum interval.
        interval_ok = interval_ok or (at_target and temperature > state.changed_at_c)
        wanted = settling_limit_w(model, settle_c, ceiling, floor)
        if not ready:
            wanted = min(wanted, in_force)
        if at_target:
            # The die is at the target already: the model is behind; take off the excess too.
            correction = (temperature - settle_c) / model.r_total_c_per_w
            wanted = max(floor, min(wanted, float(math.floor(min(smooth, in_force) - correction))))
        # Below what is in force and below what we asked (a driver that rounds up is not asked again).
        below = in_force if current is None else min(in_force, current)
        if interval_ok and wanted < below - DRIFT_TOLERANCE_W / 2 and not _would_raise(wanted, reading):
            if at_target:
                why = f"temperature {temperature:g} C >= target {target:g} C"
            else:
                why = (
                    f"predicted {predicted:.1f} C at {future_w:g} W in {format_seconds(policy.horizon_s)} "
                    f"> target {target:g} C"
                )
            reason = f"{why}: {wanted:g} W ({describe_model(state.fit)})"
            return _changed(state, wanted, t_s, temperature, reading), [
                power_decision(
                    reading, t_s, Rule.POWER_TARGET_DOWN, reason, threshold=target, from_w=from_w, to_w=wanted
                )
            ]
    elif (
        current is not None
        and current < ceiling
        and binding
        and ready
        and zone is not ThermalZone.CRITICAL  # the floor holds while the critical zone does
        and not held_lower(reading, in_force, cap_w)
    ):
        settles_c = model.steady_c(in_force)
        # Settled: the die is where the model says the power it draws now settles, so the
        # model is right here and now (not in the first minutes of a burst from cool).
        settled = abs(temperature - model.steady_c(smooth)) <= policy.deadband_c / 2.0
        if settled and settles_c < target - policy.deadband_c and temperature <= target - policy.deadband_c:
            since = state.headroom_since_s if state.headroom_since_s is not None else t_s
            if state.headroom_since_s is None:
                state = replace(state, headroom_since_s=since)
            step_cap = min(ceiling, float(math.floor(current + RAISE_STEP_RATIO * ceiling)))
            wanted = settling_limit_w(model, settle_c, step_cap, floor)
            rate_ok = changes_in_last_hour(state, t_s) + 2 <= policy.max_changes_per_hour
            if t_s - since >= policy.dwell_s and interval_ok and rate_ok and wanted > current + DRIFT_TOLERANCE_W / 2:
                reason = (
                    f"settles at {settles_c:.1f} C at {in_force:g} W, more than {policy.deadband_c:g} C "
                    f"below target {target:g} C for {format_seconds(t_s - since)}: {wanted:g} W "
                    f"({describe_model(state.fit)})"
                )
                return _changed(state, wanted, t_s, temperature, reading), [
                    power_decision(
                        reading, t_s, Rule.POWER_TARGET_UP, reason, threshold=target, from_w=current, to_w=wanted
                    )
                ]
        elif state.headroom_since_s is not None:
            state = replace(state, headroom_since_s=None)
    elif state.headroom_since_s is not None:
        state = replace(state, headroom_since_s=None)

    if check_drift:
        return _drift(reading, state, t_s, cap_w)
    return state, []


def _would_raise(watts: float, reading: GpuReading) -> bool:
    """True when setting ``watts`` would raise the enforced limit (set lower by someone else)."""
    enforced = reading.power_limit_w
    return enforced is not None and watts > enforced + DRIFT_TOLERANCE_W


def _drift(
    reading: GpuReading, state: TargetState, t_s: float, cap_w: float | None
) -> tuple[TargetState, list[Decision]]:
    """Re-apply our limit once per drift; report (never fight) a lower out-of-band limit; a limit the driver
    rounded is no drift (the ladder's check: :func:`~governor.rules.power.settled_drift`)."""
    kept = (state.drift_seen, state.settle_from_w, state.granted_w)
    now, decisions = settled_drift(reading, state.limit_w, kept, t_s, cap_w)
    if now is not kept:
        state = replace(state, drift_seen=now[0], settle_from_w=now[1], granted_w=now[2])
    return state, decisions
