"""All rules for one tick: thermal zones, the fans, then the power ladder (or target mode), for every GPU.

The fan rule runs before the power rule: in ``assist`` mode its headroom (the fans can
still cool the card) holds the ladder's step down (:func:`governor.rules.power.step_power`'s
``cooling_headroom``). Target mode is not held: its controller sets the limit the
temperature needs, with whatever cooling the fans give at the time.

Pure: ``evaluate(snapshot, policies, states)`` returns new states and decisions and
changes nothing. A lost GPU keeps its state untouched and gets no decision but the
zone change to ``unknown``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from governor.model import (
    Decision,
    GpuHealth,
    GpuInfo,
    GpuReading,
    ProcessFacts,
    Snapshot,
    plausible_c,
    plausible_draw_w,
    plausible_w,
)
from governor.policy import GpuPolicy, ThermalZone, VramPolicy
from governor.rules.fan import FanPlan, FanState, step_fan
from governor.rules.gaps import DEFAULT_MAX_GAP_S, max_gap_s
from governor.rules.power import LadderState, effective_ladder, step_power, target_w
from governor.rules.target import TargetState, step_target, target_bounds
from governor.rules.thermal import evaluate_zone, thresholds
from governor.rules.vram import Offender, ProcessKey, VramState, evaluate_vram, signalled_processes


@dataclass(frozen=True, slots=True)
class GpuRuleState:
    """Everything the rules remember about one GPU between ticks."""

    zone: ThermalZone = ThermalZone.UNKNOWN
    ladder: LadderState = field(default_factory=LadderState)
    # The zone before the temperature went missing (while ``zone`` is unknown): the hysteresis goes on
    # from it when the reading comes back.
    last_known_zone: ThermalZone = ThermalZone.UNKNOWN
    vram: VramState = field(default_factory=VramState)
    target: TargetState = field(default_factory=TargetState)
    fan: FanState = field(default_factory=FanState)


NEW_STATE = GpuRuleState()
"""The rule state of a GPU the rules have not seen yet: one shared instance (it is frozen, and
building one costs more than all the rules of a steady tick)."""


@dataclass(frozen=True, slots=True)
class GpuPlan:
    """A GPU's policy resolved against its facts: what the rules need, computed once per config.

    ``ladder_w`` holds the resolved ladder; in target mode, (ceiling, floor) in watts. ``max_gap_s``:
    the longest time (s) between two readings of one run of the ladder or the fans, for the poll
    interval in force (:func:`governor.rules.gaps.max_gap_s`)."""

    info: GpuInfo
    policy: GpuPolicy
    ladder_w: tuple[float, ...]
    zone_thresholds_c: tuple[tuple[ThermalZone, float], ...]
    fan: FanPlan = field(default_factory=FanPlan)
    max_gap_s: float = DEFAULT_MAX_GAP_S

    @classmethod
    def build(cls, info: GpuInfo, policy: GpuPolicy, poll_interval_s: float = 1.0) -> GpuPlan:
        """Resolve the ladder (or target mode's bounds) against the GPU's allowed power range, and its fans;
        ``poll_interval_s``: the seconds between two readings (the config's ``poll_interval_s``)."""
        power = policy.power
        return cls(
            info=info,
            policy=policy,
            ladder_w=target_bounds(power, info) if power.target_mode else effective_ladder(power.ladder_w, info),
            zone_thresholds_c=thresholds(policy.thermal),
            fan=FanPlan.build(info, policy.fan),
            max_gap_s=max_gap_s(poll_interval_s),
        )


def finite_reading(reading: GpuReading) -> GpuReading:
    """``reading`` with a temperature no sensor can read (:func:`~governor.model.plausible_c`: NaN,
    0 C, 255 C ...), a power draw no card gives (:func:`~governor.model.plausible_draw_w`: NaN,
    infinite, negative, 10 kW or more) or an enforced limit no card has
    (:func:`~governor.model.plausible_w`: 0 W, negative ...) as None: a value no backend should give
    reads as missing (the rules hold; an absurd draw never reaches the fit, an absurd limit never
    reads as one set lower by someone else), never as a number to compute with."""
    temperature, power, limit = reading.temperature_c, reading.power_w, reading.power_limit_w
    temperature_ok = temperature is None or plausible_c(temperature)
    power_ok = power is None or plausible_draw_w(power)
    limit_ok = limit is None or plausible_w(limit)
    if temperature_ok and power_ok and limit_ok:
        return reading
    return replace(
        reading,
        temperature_c=temperature if temperature_ok else None,
        power_w=power if power_ok else None,
        power_limit_w=limit if limit_ok else None,
    )


def evaluate_gpu(
    reading: GpuReading,
    plan: GpuPlan,
    state: GpuRuleState,
    t_s: float,
    *,
    dry_run: bool = False,
    vram: VramPolicy | None = None,
    facts: Mapping[int, ProcessFacts] | None = None,
    stopped_units: frozenset[str] = frozenset(),
    fans_blocked: bool = False,
    cap_w: float | None = None,
    signalled: Mapping[ProcessKey, Offender] | None = None,
) -> tuple[GpuRuleState, list[Decision]]:
    """Run the thermal rule, the fans, the power ladder and the VRAM budgets for one GPU reading.

    ``dry_run`` is the global dry run: drift and fan-follow checks are off (the target was
    never applied) and every process decision is marked dry whatever ``[vram]`` or its class
    says; the actuator, under the same flag, takes no action of any kind. ``fans_blocked``:
    the actuator cannot drive this GPU's fans. ``cap_w``: the highest limit (W) the actuator
    writes on this GPU (its saved original), for the power rule's drift check. ``signalled``: the
    processes any GPU's VRAM rule already signalled (:func:`governor.rules.vram.signalled_processes`).
    """
    reading = finite_reading(reading)
    decisions: list[Decision] = []
    zone, zone_decision = evaluate_zone(reading, plan.policy.thermal, state.zone, t_s, last_known=state.last_known_zone)
    if zone is not ThermalZone.UNKNOWN:
        last_known = ThermalZone.UNKNOWN  # kept only through a gap
    else:
        last_known = state.last_known_zone if state.zone is ThermalZone.UNKNOWN else state.zone
    if zone_decision is not None:
        decisions.append(zone_decision)
    if reading.health is GpuHealth.LOST:
        return replace(state, zone=zone, last_known_zone=last_known), decisions
    fans = step_fan(
        reading,
        plan.fan,
        plan.policy.fan,
        state.fan,
        t_s,
        blocked=fans_blocked,
        check_follow=not dry_run,
        max_gap_s=plan.max_gap_s,
    )
    decisions.extend(fans.decisions)
    ladder, target = state.ladder, state.target
    if plan.policy.power.target_mode:
        target, power_decisions = step_target(
            reading,
            state.zone,
            zone,
            plan.policy.power,
            plan.ladder_w,
            target,
            t_s,
            check_drift=not dry_run,
            cap_w=cap_w,
        )
    else:
        ladder, power_decisions = step_power(
            reading,
            state.zone,
            zone,
            plan.policy.power,
            plan.ladder_w,
            state.ladder,
            t_s,
            check_drift=not dry_run,
            cooling_headroom=fans.headroom,
            cap_w=cap_w,
            max_gap_s=plan.max_gap_s,
        )
    decisions.extend(power_decisions)
    vram_state = state.vram
    if vram is not None and facts is not None:
        if dry_run and not vram.dry_run:
            # One dry run: the global one covers process signals too; a class's own
            # dry_run = false cannot turn them back on.
            vram = replace(vram, dry_run=True)
        vram_state, vram_decisions = evaluate_vram(reading, facts, vram, state.vram, t_s, stopped_units, signalled)
        decisions.extend(vram_decisions)
    fan = fans.state
    steady = zone is state.zone and ladder is state.ladder and target is state.target
    if steady and vram_state is state.vram and fan is state.fan and last_known is state.last_known_zone:
        return state, decisions  # every rule kept its state: so does the GPU (no copy of it)
    return (
        GpuRuleState(zone=zone, ladder=ladder, last_known_zone=last_known, vram=vram_state, target=target, fan=fan),
        decisions,
    )


def rearm_drift(state: GpuRuleState) -> GpuRuleState:
    """The state with the power rule's drift check armed again: the next tick re-applies the limit
    the rule wants if the enforced one is above it (once), as for a fresh drift. For a GPU whose
    writes were refused while it was monitor-only and that is governed again."""
    return replace(
        state, ladder=replace(state.ladder, drift_seen=False), target=replace(state.target, drift_seen=False)
    )


def wanted_w(state: GpuRuleState, plan: GpuPlan) -> float | None:
    """The limit (W) the GPU's power rule wants in force, or None while hands-off."""
    if plan.policy.power.target_mode:
        return state.target.limit_w
    return target_w(state.ladder, plan.ladder_w)


def evaluate(
    snapshot: Snapshot,
    plans: Mapping[str, GpuPlan],
    states: Mapping[str, GpuRuleState],
    *,
    dry_run: bool = False,
    vram: VramPolicy | None = None,
    facts: Mapping[int, ProcessFacts] | None = None,
    stopped_units: frozenset[str] = frozenset(),
    fans_blocked: Collection[str] = (),
    caps_w: Mapping[str, float] | None = None,
) -> tuple[dict[str, GpuRuleState], list[Decision]]:
    """Run every rule on every GPU of ``snapshot`` (keyed by UUID); GPUs without a plan are skipped.

    ``facts`` (pid -> ProcessFacts) comes from :class:`governor.processes.ProcessInspector`;
    without it the VRAM rule does not run. ``stopped_units``: units the governor stopped and
    has not resumed (never stopped again). ``fans_blocked``: UUIDs of GPUs whose fans the
    actuator cannot drive. ``caps_w``: UUID -> the highest limit (W) the actuator writes on that
    GPU (:meth:`governor.actuator.Actuator.caps_w`), for the power rules' drift check.

    A process on several GPUs is signalled once: each GPU's VRAM rule sees the signals the
    others sent it, in earlier ticks or earlier in this one.
    """
    new_states = dict(states)
    decisions: list[Decision] = []
    signalled = None
    if vram is not None and facts is not None:  # only a state that remembers offenders can have signalled one
        remembering = [s.vram for s in states.values() if s.vram.offenders]
        signalled = signalled_processes(remembering) if remembering else {}
    for reading in snapshot.gpus:
        plan = plans.get(reading.uuid)
        if plan is None:
            continue
        state = states.get(reading.uuid, NEW_STATE)
        new_states[reading.uuid], gpu_decisions = evaluate_gpu(
            reading,
            plan,
            state,
            snapshot.t_s,
            dry_run=dry_run,
            vram=vram,
            facts=facts,
            stopped_units=stopped_units,
            fans_blocked=reading.uuid in fans_blocked,
            cap_w=None if not caps_w else caps_w.get(reading.uuid),
            signalled=signalled,
        )
        decisions.extend(gpu_decisions)
        if signalled is not None and new_states[reading.uuid].vram is not state.vram:
            signalled = signalled_processes((new_states[reading.uuid].vram,), signalled)
    return new_states, decisions
