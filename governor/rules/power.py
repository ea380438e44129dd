"""The power-limit ladder (pure): aggressive when hot, lazy when releasing.

* One rung down after ``debounce_samples`` consecutive readings at or above
  ``step_down_at_c``.
* One rung up only after the temperature stayed at or below ``step_up_at_c`` for
  ``dwell_s`` seconds (the dwell restarts after each step up), and never while the thermal
  zone (with its hysteresis) is still ``throttle`` or ``critical``.
* Never more than one change per ``min_change_interval_s``, except that a reading in
  the critical zone drops straight to the lowest rung (every such reading until the
  ladder is there: a refused drop is taken again).
* The snapshot clock is trusted only forward: a time stored after this tick's (the
  clock went backwards) counts as now.
* A rung is watts or a percentage of the card's default limit ("90%": 180 W on a
  200 W RTX 4070, 630 W on a 700 W H100); every rung is then clamped to the GPU's
  allowed range, so a 180 W rung on an H100 (200-700 W) becomes 200 W (and an
  absolute ladder that deep is refused at load unless ``allow_deep_cap``).
* A missing temperature holds the current limit: never a step up on no data. It holds the
  run of hot readings too (neither counted nor reset) and ends the run of cool ones.
* A gap in the readings: a temperature reading more than ``max_gap_s`` after the last one
  (:func:`governor.rules.gaps.max_gap_s`: 3 polls, at least 15 s; a frozen or stalled
  daemon, a GPU lost and back, NVML failing every tick) starts both runs over at that reading,
  so neither the debounce nor the dwell counts time nobody read.
* Anti-flap backoff (lazy when releasing, as thermald): a step down (or critical
  jump) within ``flap_window_s`` of the last step up doubles the dwell before the
  next step up - and keeps doubling it until it is longer than the release lasted (the
  time from that step up to this step down), so the next release outlasts the pause
  that fooled the last one - up to ``dwell_max_s``; every ``backoff_decay_s`` without a
  limit change halves it again. A load that cycles faster than the card cools settles on
  the lower rung instead of stepping down and up every cycle.
* Drift: when the enforced limit differs from the governor's target, the target is
  re-applied once per drift if the enforced limit is higher; an out-of-band limit
  that is lower than ours (another tool, a BMC) is reported and never fought. A driver that
  stores a limit rounded to its own step: the enforced limit read right after a change, moved
  toward the target and within ``ROUNDING_MAX_RATIO`` of it, is what the governor put in force.

Until its first step down the governor is hands-off (``rung`` is None): it does not
touch a cool GPU's limit at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from governor.model import Decision, GpuInfo, GpuReading
from governor.policy import Action, PowerPolicy, Rule, Rung, ThermalZone, format_seconds, percent_of
from governor.rules.gaps import DEFAULT_MAX_GAP_S, after_gap

DRIFT_TOLERANCE_W = 1.0
"""Enforced and target limits closer than this (watts) are the same limit."""
ROUNDING_MAX_RATIO = 0.1
"""The farthest (as a fraction of the target) the driver may store a limit from the one asked, rounding
it to its own step, for the enforced limit read back right after a change to count as that change."""


@dataclass(frozen=True, slots=True)
class LadderState:
    """Where one GPU stands on its ladder, carried from tick to tick."""

    rung: int | None = None  # index into the effective ladder; None: never stepped (hands-off)
    hot_samples: int = 0  # consecutive readings >= step_down_at_c
    cool_since_s: float | None = None  # start of the current run of readings <= step_up_at_c
    last_change_s: float | None = None
    holding: bool = False  # temperature missing: holding the limit
    drift_seen: bool = False  # the current drift was already handled
    last_up_s: float | None = None  # time of the last step up (a step down soon after is a flap)
    backoff: int = 0  # dwell doublings in force as of last_change_s (before decay)
    settle_from_w: float | None = None  # enforced limit (W) when the last change was decided, until read back
    granted_w: float | None = None  # the limit (W) the driver stored for the last target read back, when it rounded it
    last_read_s: float | None = None  # the last temperature reading while a run counts (_counting); else None

    @property
    def governed(self) -> bool:
        """True once the governor has chosen a limit for this GPU."""
        return self.rung is not None


def clamp_w(limit_w: float, gpu: GpuInfo | None) -> float:
    """Clamp a limit in watts to the GPU's allowed range (NVML refuses anything outside)."""
    if gpu is None:
        return limit_w
    if gpu.power_limit_max_w is not None:
        limit_w = min(limit_w, gpu.power_limit_max_w)
    if gpu.power_limit_min_w is not None:
        limit_w = max(limit_w, gpu.power_limit_min_w)
    return limit_w


def rung_w(rung: Rung, gpu: GpuInfo) -> float | None:
    """One rung in watts for ``gpu``: watts as they are, a percentage of the card's default
    limit (its maximum when NVML gives no default), rounded to a milliwatt; None when the
    card reports neither."""
    if not isinstance(rung, str):
        return rung
    base_w = gpu.power_limit_default_w if gpu.power_limit_default_w is not None else gpu.power_limit_max_w
    if base_w is None:
        return None
    return round(base_w * percent_of(rung) / 100.0, 3)


def effective_ladder(ladder_w: tuple[Rung, ...], gpu: GpuInfo) -> tuple[float, ...]:
    """The configured ladder resolved for ``gpu`` (percent rungs against its default limit),
    clamped to its allowed range, with repeated rungs merged. Empty when relative rungs
    cannot be resolved (no default and no maximum limit known): the GPU is left alone."""
    rungs: list[float] = []
    for rung in ladder_w:
        watts = rung_w(rung, gpu)
        if watts is None:
            return ()
        watts = clamp_w(watts, gpu)
        if not rungs or watts < rungs[-1]:
            rungs.append(watts)
    return tuple(rungs)


def target_w(state: LadderState, ladder: tuple[float, ...]) -> float | None:
    """The limit in watts the governor wants in force, or None while hands-off."""
    if state.rung is None:
        return None
    return ladder[min(state.rung, len(ladder) - 1)]


def _max_backoff(policy: PowerPolicy) -> int:
    """The doublings after which the dwell reaches ``dwell_max_s`` (0 when there is no dwell)."""
    if policy.dwell_s <= 0.0:
        return 0
    level = 0
    while policy.dwell_s * (1 << level) < policy.dwell_max_s and level < 30:
        level += 1
    return level


def backoff_level(policy: PowerPolicy, state: LadderState, t_s: float) -> int:
    """Dwell doublings in force at ``t_s``: the stored level, halved once per
    ``backoff_decay_s`` seconds since the last limit change."""
    if state.backoff == 0 or state.last_change_s is None:
        return state.backoff
    calm_s = max(0.0, t_s - state.last_change_s)
    return max(0, state.backoff - int(calm_s // policy.backoff_decay_s))


def effective_dwell_s(policy: PowerPolicy, state: LadderState, t_s: float) -> float:
    """Seconds of cool needed at ``t_s`` before a step up: ``dwell_s`` doubled per backoff
    level, capped at ``dwell_max_s`` (never below ``dwell_s``)."""
    level = backoff_level(policy, state, t_s)
    if level == 0:
        return policy.dwell_s
    return max(policy.dwell_s, min(policy.dwell_s * (1 << level), policy.dwell_max_s))


def _after_step_down(policy: PowerPolicy, state: LadderState, t_s: float) -> tuple[int, str]:
    """The backoff level after a step down at ``t_s`` and a note for the reason ("" if no flap)."""
    level = backoff_level(policy, state, t_s)
    since_up = None if state.last_up_s is None else t_s - state.last_up_s
    if policy.flap_window_s <= 0.0 or since_up is None or since_up > policy.flap_window_s:
        return level, ""
    # The release lasted since_up before the load came back: the next one waits longer than
    # that (and at least twice as long as the last dwell), or it would flap on the same pause.
    level += 1
    while policy.dwell_s * (1 << level) < since_up and level < 30:
        level += 1
    level = min(level, _max_backoff(policy))
    dwell = effective_dwell_s(policy, replace(state, backoff=level, last_change_s=t_s), t_s)
    return (
        level,
        f"; {format_seconds(since_up)} after the last step up: next step up after {format_seconds(dwell)} of cool",
    )


def power_decision(
    reading: GpuReading,
    t_s: float,
    rule: Rule,
    reason: str,
    *,
    action: Action = Action.SET_POWER_LIMIT,
    threshold: float | None = None,
    from_w: float | None = None,
    to_w: float | None = None,
) -> Decision:
    """A power-limit decision about ``reading``'s GPU at ``t_s`` (limits in watts), its reading
    the GPU's temperature (C); shared by the ladder and target mode."""
    return Decision(
        t_s=t_s,
        gpu_index=reading.index,
        gpu_uuid=reading.uuid,
        rule=rule,
        action=action,
        reason=reason,
        reading=reading.temperature_c,
        threshold=threshold,
        from_w=from_w,
        to_w=to_w,
    )


def _would_raise(watts: float, reading: GpuReading) -> bool:
    """True when setting ``watts`` would raise the enforced limit (set lower by someone else)."""
    enforced = reading.power_limit_w
    return enforced is not None and watts > enforced + DRIFT_TOLERANCE_W


def held_lower(reading: GpuReading, in_force_w: float, cap_w: float | None) -> bool:
    """True when the enforced limit is below ours (``in_force_w``, W, at most ``cap_w``): set lower outside
    the governor, it is left alone, and a raise would write over it (the ladder's step up, target mode's
    raise)."""
    enforced = reading.power_limit_w
    ours = in_force_w if cap_w is None else min(in_force_w, cap_w)
    return enforced is not None and enforced < ours - DRIFT_TOLERANCE_W


def _first_rung_below(ladder: tuple[float, ...], limit_w: float | None) -> int | None:
    """Index of the highest rung below the enforced limit (where a first step down lands)."""
    if limit_w is None:
        return 0
    for i, watts in enumerate(ladder):
        if watts < limit_w - DRIFT_TOLERANCE_W:
            return i
    return None


def _cooled(state: LadderState, cool_since_s: float | None = None) -> LadderState:
    """``state`` with no hot run and its cool run starting at ``cool_since_s``: ``state`` itself
    when it already is so (the common, steady tick), a copy otherwise."""
    if state.hot_samples == 0 and state.cool_since_s == cool_since_s:
        return state
    return replace(state, hot_samples=0, cool_since_s=cool_since_s)


def _counting(state: LadderState) -> bool:
    """True while a run counts toward a change: hot readings toward a step down, or cool ones toward
    a step up (a rung above this one to release). Only then does a gap in the readings matter, so only
    then is the last reading's time kept: an idle GPU's steady tick changes nothing."""
    return state.hot_samples > 0 or (state.cool_since_s is not None and state.rung is not None and state.rung > 0)


def _stamped(state: LadderState, t_s: float) -> LadderState:
    """``state`` after a temperature reading at ``t_s``: remembering it while a run counts, forgetting
    any earlier one otherwise; ``state`` itself when that already holds."""
    read = t_s if _counting(state) else None
    return state if state.last_read_s == read else replace(state, last_read_s=read)


def _rebased(state: LadderState, t_s: float, lowest: int) -> LadderState:
    """``state`` made consistent with this tick: a rung past the ladder's floor (the ladder shrank: a
    narrower power range, a reload with fewer rungs) is the floor, and times after ``t_s`` (the snapshot
    clock went backwards: a replay started over, a clock reset) are taken as ``t_s``, so the minimum
    interval and the dwell count from now instead of waiting for the old clock, the last reading is no
    gap, and the last step up, of unknown age, is no flap. ``state`` itself when nothing needs it (every
    steady tick)."""
    rung, cool, change, up = state.rung, state.cool_since_s, state.last_change_s, state.last_up_s
    read = state.last_read_s
    if (
        (rung is None or rung <= lowest)
        and (cool is None or cool <= t_s)
        and (change is None or change <= t_s)
        and (up is None or up <= t_s)
        and (read is None or read <= t_s)
    ):
        return state
    return replace(
        state,
        rung=None if rung is None else min(rung, lowest),
        cool_since_s=None if cool is None else min(cool, t_s),
        last_change_s=None if change is None else min(change, t_s),
        last_up_s=None if up is None or up > t_s else up,
        last_read_s=None if read is None else min(read, t_s),
    )


def _changed(state: LadderState, reading: GpuReading) -> LadderState:
    """``state`` as a limit change is decided: the drift check starts over and the next reading of the
    enforced limit shows what the driver made of the request (:func:`settle`)."""
    return replace(state, drift_seen=False, settle_from_w=reading.power_limit_w)


def step_power(
    reading: GpuReading,
    previous_zone: ThermalZone,
    zone: ThermalZone,
    policy: PowerPolicy,
    ladder: tuple[float, ...],
    state: LadderState,
    t_s: float,
    *,
    check_drift: bool = True,
    cooling_headroom: bool = False,
    cap_w: float | None = None,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> tuple[LadderState, list[Decision]]:
    """Advance one GPU's ladder by one reading; returns the new state and its decisions.

    ``zone`` is this tick's thermal zone and ``previous_zone`` the last tick's (from
    :mod:`governor.rules.thermal`); entering ``critical`` overrides debounce and the
    minimum interval. ``check_drift`` is off in
    dry-run, where the target was never applied. ``cooling_headroom`` (fan assist,
    :mod:`governor.rules.fan`): the fans can still cool the card, so a step down waits and
    the run of hot readings starts over (entering critical still drops to the floor).
    ``cap_w``: the highest limit (W) the actuator writes on this GPU (its saved original), for the
    drift check (:func:`drift`). ``max_gap_s``: a temperature reading more than this long (s) after
    the last one starts the runs of hot and cool readings over (:mod:`governor.rules.gaps`; the
    GPU's plan has it for the poll interval in force).
    """
    if not policy.enabled or not ladder:
        return state, []
    lowest = len(ladder) - 1
    state = _rebased(state, t_s, lowest)
    critical = zone is ThermalZone.CRITICAL
    temperature = reading.temperature_c
    current_w = target_w(state, ladder)
    from_w = current_w if current_w is not None else reading.power_limit_w

    if temperature is None:  # no reading: no count either way; the run of hot readings is held, the cool run ends
        if state.holding:
            return (state if state.cool_since_s is None else replace(state, cool_since_s=None)), []
        held = power_decision(
            reading,
            t_s,
            Rule.POWER_HOLD,
            "temperature reading missing: holding the power limit",
            action=Action.NONE,
            from_w=from_w,
            to_w=from_w,
        )
        return replace(state, cool_since_s=None, holding=True), [held]
    if state.holding:
        state = replace(state, holding=False)
    if after_gap(state.last_read_s, t_s, max_gap_s):  # time nobody read: both runs start over at this reading
        state = replace(state, hot_samples=0, cool_since_s=None)

    interval_ok = state.last_change_s is None or t_s - state.last_change_s >= policy.min_change_interval_s

    if critical and state.rung != lowest and not _would_raise(ladder[lowest], reading):
        # Every critical reading above the floor, not only the one entering the zone: a drop that was
        # refused (and undone) or held under another tool's lower limit is taken as soon as it can be.
        level, note = _after_step_down(policy, state, t_s)
        state = _stamped(
            replace(
                _changed(state, reading),
                rung=lowest,
                hot_samples=0,
                cool_since_s=None,
                last_change_s=t_s,
                backoff=level,
            ),
            t_s,
        )
        entered = "entered" if previous_zone is not ThermalZone.CRITICAL else "in"
        reason = f"{entered} critical zone at {temperature:g} C: straight to the lowest rung{note}"
        return state, [power_decision(reading, t_s, Rule.POWER_CRITICAL, reason, from_w=from_w, to_w=ladder[lowest])]

    if cooling_headroom and temperature >= policy.step_down_at_c:
        state = _cooled(state)  # cooling before capping
    elif temperature >= policy.step_down_at_c:
        hot = state.hot_samples + 1
        state = replace(state, hot_samples=hot, cool_since_s=None)
        if hot >= policy.debounce_samples and interval_ok:
            below = _first_rung_below(ladder, reading.power_limit_w) if state.rung is None else state.rung + 1
            if below is not None and below <= lowest and not _would_raise(ladder[below], reading):
                level, note = _after_step_down(policy, state, t_s)
                state = _stamped(
                    replace(_changed(state, reading), rung=below, hot_samples=0, last_change_s=t_s, backoff=level), t_s
                )
                reason = (
                    f"temperature {temperature:g} C >= {policy.step_down_at_c:g} C for {hot} consecutive samples{note}"
                )
                return state, [
                    power_decision(
                        reading,
                        t_s,
                        Rule.POWER_STEP_DOWN,
                        reason,
                        threshold=policy.step_down_at_c,
                        from_w=from_w,
                        to_w=ladder[below],
                    )
                ]
    elif temperature <= policy.step_up_at_c:
        cool_since = state.cool_since_s if state.cool_since_s is not None else t_s
        state = _cooled(state, cool_since)
        cooled_s = t_s - cool_since
        rung = state.rung
        releasable = zone.severity < ThermalZone.THROTTLE.severity  # never up while throttle or critical holds
        # The dwell is computed only with a rung to release (most cool ticks have none).
        if (
            rung is not None
            and rung > 0
            and interval_ok
            and releasable
            and cooled_s >= (dwell_s := effective_dwell_s(policy, state, t_s))
            and not held_lower(reading, ladder[rung] if state.granted_w is None else state.granted_w, cap_w)
        ):
            up = rung - 1
            level = backoff_level(policy, state, t_s)
            state = _stamped(  # the cool run counts on while a rung above is left
                replace(
                    _changed(state, reading), rung=up, cool_since_s=t_s, last_change_s=t_s, last_up_s=t_s, backoff=level
                ),
                t_s,
            )
            dwell_text = f"dwell {format_seconds(dwell_s)}"
            if dwell_s != policy.dwell_s:
                dwell_text += f": {format_seconds(policy.dwell_s)} backed off after flapping"
            reason = (
                f"temperature <= {policy.step_up_at_c:g} C for {format_seconds(cooled_s)} ({dwell_text}), "
                f"now {temperature:g} C"
            )
            return state, [
                power_decision(
                    reading,
                    t_s,
                    Rule.POWER_STEP_UP,
                    reason,
                    threshold=policy.step_up_at_c,
                    from_w=from_w,
                    to_w=ladder[up],
                )
            ]
    else:
        state = _cooled(state)
    state = _stamped(state, t_s)

    if check_drift:
        return _drift(reading, state, ladder, t_s, cap_w)
    return state, []


def settle(
    settle_from_w: float | None, granted_w: float | None, enforced_w: float | None, target_w: float | None
) -> tuple[float | None, float | None]:
    """``(settle_from_w, granted_w)`` after a reading of the enforced limit ``enforced_w`` (W), shared by the
    ladder and target mode. ``settle_from_w``: the enforced limit when a change to ``target_w`` was decided,
    until the first reading after it settles the change; ``granted_w``: the limit the driver stored for the
    last target (None: the target itself). A driver that stores a limit rounded to its own step moves the
    enforced limit toward the target but a little off it (at most ROUNDING_MAX_RATIO of the target away), or,
    asked for a target that rounds to the step it already granted, leaves it there: either way that limit is
    what the governor put in force, not a drift."""
    if settle_from_w is None or enforced_w is None:
        return settle_from_w, granted_w
    granted = None
    if target_w is not None:
        off = abs(enforced_w - target_w)
        moved_toward = off < abs(settle_from_w - target_w)
        same_step = granted_w is not None and max(abs(enforced_w - granted_w), abs(settle_from_w - granted_w)) <= (
            DRIFT_TOLERANCE_W
        )
        if DRIFT_TOLERANCE_W < off <= ROUNDING_MAX_RATIO * target_w and (moved_toward or same_step):
            granted = enforced_w
    return None, granted


DriftState = tuple[bool, float | None, float | None]
"""What a power rule keeps for its drift check: whether the current drift was handled, and
:func:`settle`'s ``settle_from_w`` and ``granted_w`` (W)."""


def settled_drift(
    reading: GpuReading, target: float | None, kept: DriftState, t_s: float, cap_w: float | None
) -> tuple[DriftState, list[Decision]]:
    """The drift check of the ladder and target mode with what the driver made of the last change: the first
    reading after it settles it (:func:`settle`, against ``target`` W held to ``cap_w``), then :func:`drift`.
    Returns what to keep (``kept`` itself when nothing changed) and the decisions."""
    seen, settle_from, granted = kept
    if settle_from is not None:
        capped = target if cap_w is None or target is None else min(target, cap_w)
        settle_from, granted = settle(settle_from, granted, reading.power_limit_w, capped)
    now_seen, decisions = drift(reading, target, seen, t_s, cap_w, granted_w=granted)
    if now_seen == seen and settle_from == kept[1] and granted == kept[2]:
        return kept, decisions
    return (now_seen, settle_from, granted), decisions


def _drift(
    reading: GpuReading, state: LadderState, ladder: tuple[float, ...], t_s: float, cap_w: float | None
) -> tuple[LadderState, list[Decision]]:
    """Re-apply our target once per drift; report (never fight) a lower out-of-band limit."""
    kept = (state.drift_seen, state.settle_from_w, state.granted_w)
    now, decisions = settled_drift(reading, target_w(state, ladder), kept, t_s, cap_w)
    if now is not kept:
        state = replace(state, drift_seen=now[0], settle_from_w=now[1], granted_w=now[2])
    return state, decisions


def drift(
    reading: GpuReading,
    target: float | None,
    seen: bool,
    t_s: float,
    cap_w: float | None = None,
    *,
    granted_w: float | None = None,
) -> tuple[bool, list[Decision]]:
    """The drift check shared by the ladder and target mode: when the enforced limit has moved
    off ``target`` (W) by more than DRIFT_TOLERANCE_W, re-apply a higher one once, and report a
    lower one (set outside the governor: never fought). ``seen``: a drift was already handled;
    returns the new ``seen`` and the decisions. ``cap_w``: the highest limit (W) the actuator
    writes on this GPU (its saved original); a target above it is compared as ``cap_w``, since
    that is what the governor itself put in force (a step up capped at the card's own limit is
    no out-of-band limit). ``granted_w``: the limit (W) the driver stored when asked for
    ``target`` (it rounds to its own step); the enforced limit is compared with it, and a
    re-apply still asks for ``target``."""
    enforced = reading.power_limit_w
    if target is None or enforced is None:
        return seen, []
    if cap_w is not None and target > cap_w:
        target = cap_w
    held = target if granted_w is None else granted_w
    if abs(enforced - held) <= DRIFT_TOLERANCE_W:
        return False, []
    if seen:
        return True, []
    if enforced > held:
        stored = "" if held == target else f" (stored by the driver as {held:g} W)"
        reason = f"enforced limit {enforced:g} W drifted above target {target:g} W{stored}: re-applying once"
        return True, [power_decision(reading, t_s, Rule.POWER_DRIFT_REAPPLY, reason, from_w=enforced, to_w=target)]
    stored = "" if held == target else f" (stored by the driver as {held:g} W)"
    reason = f"enforced limit {enforced:g} W is below target {target:g} W{stored}, set outside the governor: left alone"
    return True, [
        power_decision(
            reading, t_s, Rule.POWER_DRIFT_EXTERNAL_LOWER, reason, action=Action.NONE, from_w=enforced, to_w=target
        )
    ]
