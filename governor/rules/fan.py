"""The fan rule (pure): cooling before capping.

Three modes (:class:`governor.policy.FanMode`):

* ``auto``: the card's own control; the rule decides nothing.
* ``curve``: every controlled fan follows the policy's temperature -> percent curve
  (linear between points, flat beyond the ends). A rise applies at once; a fan is lowered
  only when the curve, read ``hysteresis_c`` degrees above the temperature, still gives
  less than its present target, so a reading that wobbles does not make the fans hunt.
* ``assist``: the power rule's partner. At or above ``raise_at_c`` the governor takes the
  fans over at the speed the card was running them (the highest fan) and raises them by
  ``step_percent`` at most every ``step_interval_s`` toward the noise ceiling
  ``max_percent``. :attr:`FanStep.headroom` tells the power rule whether the fans can still
  cool: while they are below the ceiling, and for ``settle_s`` after they reached it, the
  power ladder's step down waits. At or below ``lower_at_c`` the fans come down a step at a
  time and go back to the card's automatic control once they are at or below the speed
  they were taken over at.

A gap in the readings (a reading more than ``max_gap_s`` after the last one, as on the power
ladder: :mod:`governor.rules.gaps`) starts both of the rule's times over at that reading: the
settle time at the ceiling and a fan's time off its target count only readings.

Every target is clamped to the noise ceiling and the card's range and rounded to a whole
percent (NVML's unit). A missing temperature hands the fans back to the card, whose own
control has a sensor of its own. A fan that does not follow its target (the measured speed
stays more than ``follow_tolerance_percent`` off for ``follow_timeout_s``) is handed back
to the card and the GPU's fans are left alone from then on (``handed_back``), reported
once. The follow check is off in dry run, where no target was ever set.

Decisions: :attr:`~governor.policy.Action.SET_FAN_SPEED` with ``fan`` and
``from_percent``/``to_percent``, and :attr:`~governor.policy.Action.SET_FAN_AUTO` (``to_percent``
None) to hand a fan back. Time comes from the snapshot only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from governor.model import Decision, GpuInfo, GpuReading, fast_init
from governor.policy import Action, FanMode, FanPolicy, Rule, format_seconds
from governor.rules.gaps import DEFAULT_MAX_GAP_S, after_gap


@dataclass(frozen=True, slots=True)
class FanState:
    """What the fan rule remembers about one GPU between ticks.

    ``targets`` is the speed (percent) the governor set per fan index; empty while the
    card's own control runs the fans. ``taken_from_percent``: the speed the card ran
    them at when assist took over; ``ceiling_since_s``: when assist reached the ceiling;
    ``off_target_since_s``: since when a fan reads away from its target; ``handed_back``:
    why the governor gave the fans up for good (None while it may drive them);
    ``last_read_s``: the last reading while one of those two times runs (None otherwise).
    """

    targets: tuple[tuple[int, float], ...] = ()
    last_change_s: float | None = None
    taken_from_percent: float | None = None
    ceiling_since_s: float | None = None
    off_target_since_s: float | None = None
    handed_back: str | None = None
    last_read_s: float | None = None


@dataclass(frozen=True, slots=True)
class FanPlan:
    """A GPU's fans resolved once per config: the fan indexes the governor drives (empty:
    none it can), the card's speed range in percent, and why there are none (None when
    there are)."""

    fans: tuple[int, ...] = ()
    min_percent: float = 0.0
    max_percent: float = 100.0
    no_fans: str | None = None

    @classmethod
    def build(cls, info: GpuInfo, policy: FanPolicy) -> FanPlan:
        """Which fans ``policy`` drives on ``info``'s card; why none when it has none NVML can set."""
        count = info.fan_count
        low = info.fan_speed_min_percent if info.fan_speed_min_percent is not None else 0.0
        high = info.fan_speed_max_percent if info.fan_speed_max_percent is not None else 100.0
        if count is None:
            return cls(no_fans="the GPU reports no fans NVML can drive (fan count: not supported)")
        if count == 0:
            return cls(no_fans="the GPU has no fans")
        fans = tuple(f for f in (policy.fans or range(count)) if f < count)
        if not fans:
            return cls(no_fans=f"none of fan.fans {list(policy.fans)} exists on this GPU ({count} fans)")
        return cls(fans=fans, min_percent=low, max_percent=high)


@fast_init
@dataclass(frozen=True, slots=True)
class FanStep:
    """One tick of the fan rule: the new state, its decisions, and ``headroom``: True while
    assist can still cool the card (the power ladder's step down waits)."""

    state: FanState
    decisions: list[Decision]
    headroom: bool


def curve_percent(curve: tuple[tuple[float, float], ...], temperature_c: float) -> float:
    """The speed in percent the curve gives at ``temperature_c`` (linear between points, flat beyond)."""
    first_c, first_p = curve[0]
    if temperature_c <= first_c:
        return first_p
    for (lo_c, lo_p), (hi_c, hi_p) in itertools.pairwise(curve):
        if temperature_c <= hi_c:
            return lo_p + (hi_p - lo_p) * (temperature_c - lo_c) / (hi_c - lo_c)
    return curve[-1][1]


def ceiling_percent(plan: FanPlan, policy: FanPolicy) -> float:
    """The highest speed the governor sets: the noise ceiling within the card's range."""
    return float(round(max(plan.min_percent, min(policy.max_percent, plan.max_percent))))


def _clamp(percent: float, plan: FanPlan, policy: FanPolicy) -> float:
    return float(round(max(plan.min_percent, min(percent, ceiling_percent(plan, policy)))))


def _measured(reading: GpuReading) -> dict[int, float]:
    """Measured speed per fan in percent (the slow telemetry read); empty when unknown."""
    telemetry = reading.telemetry
    if telemetry is None or not telemetry.fan_speed_ratios:
        return {}
    return {fan: ratio * 100.0 for fan, ratio in telemetry.fan_speed_ratios}


def _decision(
    reading: GpuReading,
    t_s: float,
    rule: Rule,
    fan: int,
    reason: str,
    *,
    from_percent: float | None,
    to_percent: float | None,
    threshold: float | None = None,
) -> Decision:
    return Decision(
        t_s=t_s,
        gpu_index=reading.index,
        gpu_uuid=reading.uuid,
        rule=rule,
        action=Action.SET_FAN_SPEED if to_percent is not None else Action.SET_FAN_AUTO,
        reason=reason,
        reading=reading.temperature_c,
        threshold=threshold,
        fan=fan,
        from_percent=from_percent,
        to_percent=to_percent,
    )


def _set_all(
    reading: GpuReading,
    plan: FanPlan,
    state: FanState,
    percent: float,
    t_s: float,
    rule: Rule,
    reason: str,
    threshold: float | None,
) -> tuple[FanState, list[Decision]]:
    """Every controlled fan to ``percent``: a decision for each whose target changes."""
    before = dict(state.targets)
    measured = _measured(reading)
    decisions = [
        _decision(
            reading,
            t_s,
            rule,
            fan,
            reason,
            from_percent=before.get(fan, measured.get(fan)),
            to_percent=percent,
            threshold=threshold,
        )
        for fan in plan.fans
        if before.get(fan) != percent
    ]
    if not decisions:
        return state, []
    targets = tuple((fan, percent) for fan in plan.fans)
    return replace(state, targets=targets, last_change_s=t_s, off_target_since_s=None), decisions


def _release(
    reading: GpuReading, state: FanState, t_s: float, rule: Rule, reason: str
) -> tuple[FanState, list[Decision]]:
    """Hand every fan the governor set back to the card's automatic control."""
    decisions = [
        _decision(reading, t_s, rule, fan, reason, from_percent=percent, to_percent=None)
        for fan, percent in state.targets
    ]
    return replace(state, targets=(), last_change_s=t_s, taken_from_percent=None, ceiling_since_s=None,
                   off_target_since_s=None), decisions  # fmt: skip


def _not_following(
    reading: GpuReading, policy: FanPolicy, state: FanState, t_s: float
) -> tuple[FanState, list[Decision]] | None:
    """The fans handed back for good when one stayed off its target too long; None while they follow."""
    measured = _measured(reading)
    off = [
        (fan, target, measured[fan])
        for fan, target in state.targets
        if fan in measured and abs(measured[fan] - target) > policy.follow_tolerance_percent
    ]
    if not off:
        return None if state.off_target_since_s is None else (replace(state, off_target_since_s=None), [])
    since = state.off_target_since_s if state.off_target_since_s is not None else t_s
    if t_s - since < policy.follow_timeout_s:
        return (state if since == state.off_target_since_s else replace(state, off_target_since_s=since)), []
    fan, target, read = off[0]
    why = (
        f"fan {fan} reads {read:.0f} % for {format_seconds(t_s - since)}, target {target:.0f} % "
        f"(tolerance {policy.follow_tolerance_percent:g} %)"
    )
    state, decisions = _release(reading, state, t_s, Rule.FAN_NOT_FOLLOWING, why + ": handed back to the card")
    return replace(state, handed_back=f"a fan did not follow: {why}"), decisions


def step_fan(
    reading: GpuReading,
    plan: FanPlan,
    policy: FanPolicy,
    state: FanState,
    t_s: float,
    *,
    blocked: bool = False,
    check_follow: bool = True,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> FanStep:
    """Advance one GPU's fan control by one reading (see the module docstring).

    ``blocked``: the actuator cannot drive this GPU's fans (monitor-only); the rule then
    decides nothing and reports no headroom. ``check_follow`` is off in dry run. ``max_gap_s``:
    a reading more than this long (s) after the last one starts the settle and follow times over.
    """
    if blocked or not plan.fans:
        # The actuator gave these fans up (or there are none): nothing to drive, nothing held.
        return FanStep(replace(state, targets=()) if state.targets else state, [], False)
    if policy.mode is FanMode.AUTO or state.handed_back is not None:
        if state.targets:  # the mode was switched to auto by a reload
            state, decisions = _release(reading, state, t_s, Rule.FAN_RELEASE, "fan mode auto: back to the card")
            return FanStep(state, decisions, False)
        return FanStep(state, [], False)
    temperature = reading.temperature_c
    if temperature is None:
        if not state.targets:
            return FanStep(state, [], False)
        state, decisions = _release(
            reading, state, t_s, Rule.FAN_RELEASE, "temperature reading missing: fans back to the card's control"
        )
        return FanStep(state, decisions, False)
    if after_gap(state.last_read_s, t_s, max_gap_s):  # time nobody read: both times start over at this reading
        state = replace(state, ceiling_since_s=None, off_target_since_s=None)
    if check_follow and state.targets:
        handed = _not_following(reading, policy, state, t_s)
        if handed is not None:
            state, decisions = handed
            if decisions:
                return _stamped(FanStep(state, decisions, False), t_s)
    if policy.mode is FanMode.CURVE:
        state, decisions = _curve(reading, plan, policy, state, t_s, temperature)
        return _stamped(FanStep(state, decisions, False), t_s)
    return _stamped(_assist(reading, plan, policy, state, t_s, temperature), t_s)


def _stamped(step: FanStep, t_s: float) -> FanStep:
    """``step`` after a reading at ``t_s``: its state remembers it while the settle or the follow time
    runs, and forgets any earlier one otherwise (a steady tick keeps ``step`` itself)."""
    state = step.state
    read = t_s if state.ceiling_since_s is not None or state.off_target_since_s is not None else None
    if state.last_read_s == read:
        return step
    return FanStep(replace(state, last_read_s=read), step.decisions, step.headroom)


def _curve(
    reading: GpuReading, plan: FanPlan, policy: FanPolicy, state: FanState, t_s: float, temperature: float
) -> tuple[FanState, list[Decision]]:
    want = _clamp(curve_percent(policy.curve, temperature), plan, policy)
    current = max((p for _, p in state.targets), default=None)
    if current is not None and want < current:
        want = _clamp(curve_percent(policy.curve, temperature + policy.hysteresis_c), plan, policy)
        if want >= current:
            return state, []
        reason = f"temperature {temperature:g} C: curve gives {want:g} % ({policy.hysteresis_c:g} C hysteresis)"
    else:
        reason = f"temperature {temperature:g} C: curve gives {want:g} %"
    return _set_all(reading, plan, state, want, t_s, Rule.FAN_CURVE, reason, None)


def _assist(
    reading: GpuReading, plan: FanPlan, policy: FanPolicy, state: FanState, t_s: float, temperature: float
) -> FanStep:
    ceiling = ceiling_percent(plan, policy)
    interval_ok = state.last_change_s is None or t_s - state.last_change_s >= policy.step_interval_s
    current = max((p for _, p in state.targets), default=None)
    decisions: list[Decision] = []
    if temperature >= policy.raise_at_c:
        if current is None:
            measured = [p for fan, p in _measured(reading).items() if fan in plan.fans]
            start = max(measured) if measured else plan.min_percent
            if start >= ceiling:
                return FanStep(state, [], False)  # the card already runs them at the ceiling or above
            want = _clamp(start + policy.step_percent, plan, policy)
            reason = (
                f"temperature {temperature:g} C >= {policy.raise_at_c:g} C: fans taken over at {start:.0f} % and "
                f"raised toward the {ceiling:g} % ceiling before any power step down"
            )
            state, decisions = _set_all(reading, plan, state, want, t_s, Rule.FAN_ASSIST, reason, policy.raise_at_c)
            state = replace(state, taken_from_percent=float(round(start)))
        elif current < ceiling and interval_ok:
            want = _clamp(current + policy.step_percent, plan, policy)
            reason = (
                f"temperature {temperature:g} C >= {policy.raise_at_c:g} C: fans up toward the {ceiling:g} % ceiling"
            )
            state, decisions = _set_all(reading, plan, state, want, t_s, Rule.FAN_ASSIST, reason, policy.raise_at_c)
    elif temperature <= policy.lower_at_c and current is not None and interval_ok:
        floor = state.taken_from_percent if state.taken_from_percent is not None else plan.min_percent
        want = _clamp(current - policy.step_percent, plan, policy)
        if want <= floor or want >= current:
            reason = f"temperature {temperature:g} C <= {policy.lower_at_c:g} C: fans back to the card's control"
            state, decisions = _release(reading, state, t_s, Rule.FAN_RELEASE, reason)
        else:
            reason = f"temperature {temperature:g} C <= {policy.lower_at_c:g} C: fans down to {want:g} %"
            state, decisions = _set_all(reading, plan, state, want, t_s, Rule.FAN_ASSIST, reason, policy.lower_at_c)
    current = max((p for _, p in state.targets), default=None)
    if current is None:
        return FanStep(replace(state, ceiling_since_s=None) if state.ceiling_since_s is not None else state,
                       decisions, False)  # fmt: skip
    if current < ceiling:
        if state.ceiling_since_s is not None:
            state = replace(state, ceiling_since_s=None)
        return FanStep(state, decisions, True)
    since = state.ceiling_since_s
    if since is None:
        since = t_s
        state = replace(state, ceiling_since_s=t_s)
    return FanStep(state, decisions, t_s - since < policy.settle_s)
