"""What a reload carries over into the governor built from the new config (pure, no I/O).

Rule states carry over a reload, but a state only means something against the plan it was
made under:

* the power rule's position: a ladder ``rung`` indexes the old ladder, a target-mode limit
  lies between the old bounds. When a GPU's resolved ladder (or target bounds), its power
  mode or ``power.enabled`` changed, its position is mapped onto the new plan by the limit
  the old plan wanted: the highest new rung at or below it (a reload never raises a hot
  GPU's limit), the new floor when it is below every rung, in target mode the limit held
  within the new bounds; with power governing turned off, the GPU's saved original. Where
  that limit differs from the wanted one a :class:`Reclamp` says what to set, at once:
  left to the next tick, a limit under the new floor would read as set by someone else,
  and a rung past the end of a shorter ladder would fail every tick.
* the node power budget: a reload that removes ``[node] power_budget_w`` lifts the shares it
  set; each GPU goes to what its own rule wants, or (hands-off) to the limit it had before
  the budget first moved it, instead of staying at its last share until the stop.
VRAM escalation needs nothing here: a signal a dry run only logged is marked so in the VRAM
rule's own state (``Offender.dry_run``), and counts as never sent once the class enforces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from governor.model import Decision, GpuReading
from governor.policy import Rule
from governor.rules.engine import GpuPlan, GpuRuleState, wanted_w
from governor.rules.power import DRIFT_TOLERANCE_W, LadderState, power_decision
from governor.rules.target import TargetState


@dataclass(frozen=True, slots=True)
class Reclamp:
    """A limit (W) a reload moves a GPU to, with the rule and the reason its decision carries."""

    to_w: float
    rule: Rule
    reason: str

    def decision(self, reading: GpuReading, t_s: float) -> Decision:
        """The set-limit decision for ``reading``'s GPU at ``t_s``."""
        return power_decision(reading, t_s, self.rule, self.reason, from_w=reading.power_limit_w, to_w=self.to_w)


def _shape(plan: GpuPlan) -> tuple[bool, bool, tuple[float, ...]]:
    """What the power rule's position depends on: enabled, target mode, the resolved ladder (bounds)."""
    power = plan.policy.power
    return power.enabled, power.target_mode, plan.ladder_w


def carry_power(
    state: GpuRuleState, old: GpuPlan, new: GpuPlan, original_w: float | None
) -> tuple[GpuRuleState, Reclamp | None]:
    """``state`` mapped from ``old`` onto ``new`` (see the module docstring) and the limit to set, if any.

    ``original_w`` is the GPU's saved original limit (W), where power governing turned off sends it."""
    if _shape(old) == _shape(new):
        return state, None
    wanted = wanted_w(state, old) if old.policy.power.enabled and old.ladder_w else None
    if wanted is None:  # hands-off under the old plan: nothing was set, nothing to map
        return state, None
    old_granted = state.target.granted_w if old.policy.power.target_mode else state.ladder.granted_w
    power, bounds = new.policy.power, new.ladder_w
    was_target = old.policy.power.target_mode
    if not power.enabled or not bounds:
        state = replace(state, ladder=LadderState(), target=TargetState(fit=state.target.fit))
        if original_w is None:
            return state, None
        limit = original_w
        why = f"power limits no longer governed on this GPU: back to its original {original_w:g} W"
    elif power.target_mode:
        ceiling, floor = bounds
        limit = min(max(wanted, floor), ceiling)
        target = state.target if was_target else TargetState()
        state = replace(state, ladder=LadderState(), target=replace(target, limit_w=limit, drift_seen=False))
        why = f"new target bounds {floor:g}-{ceiling:g} W"
    else:
        rung = next((i for i, w in enumerate(bounds) if w <= wanted + DRIFT_TOLERANCE_W), len(bounds) - 1)
        ladder = LadderState() if was_target else state.ladder
        limit = bounds[rung]
        state = replace(
            state,
            ladder=replace(ladder, rung=rung, drift_seen=False),
            target=TargetState(fit=state.target.fit) if was_target else state.target,
        )
        why = "new ladder " + "/".join(f"{w:g}" for w in bounds) + f" W: rung {rung}"
    held = old_granted if old_granted is not None else wanted
    if abs(limit - wanted) <= DRIFT_TOLERANCE_W:
        return _settling(state, new, old_granted, None), None
    state = _settling(state, new, None, held)
    if power.enabled and power.target_mode:
        rule = Rule.POWER_TARGET_DOWN if limit < wanted else Rule.POWER_TARGET_UP
    else:
        rule = Rule.POWER_STEP_DOWN if limit < wanted else Rule.POWER_STEP_UP
    return state, Reclamp(limit, rule, f"config reloaded: the limit was {wanted:g} W; {why}")


def _settling(state: GpuRuleState, plan: GpuPlan, granted_w: float | None, settle_from_w: float | None) -> GpuRuleState:
    """``state`` with ``plan``'s power rule's record of what the driver made of the last change (W): the
    limit it stored for the one kept (``granted_w``), or, for a limit the reload sets, the one in force
    before it (``settle_from_w``), so that the next reading shows what the driver made of the new one
    (:func:`governor.rules.power.settle`): a limit it rounds is no drift, before or after the reload."""
    power = plan.policy.power
    if not power.enabled or not plan.ladder_w:
        return state
    if power.target_mode:
        return replace(state, target=replace(state.target, granted_w=granted_w, settle_from_w=settle_from_w))
    return replace(state, ladder=replace(state.ladder, granted_w=granted_w, settle_from_w=settle_from_w))


def lift_budget(state: GpuRuleState, plan: GpuPlan, share_w: float, own_w: float | None) -> Reclamp | None:
    """The limit for a GPU whose budget share (``share_w``, W) a reload lifted: its rule's wanted limit,
    else ``own_w`` (the limit before the budget moved it, W); None when that is in force or unknown."""
    wanted = wanted_w(state, plan) if plan.policy.power.enabled and plan.ladder_w else None
    limit = wanted if wanted is not None else own_w
    if limit is None or abs(limit - share_w) <= DRIFT_TOLERANCE_W:
        return None
    rule = Rule.POWER_STEP_UP if limit > share_w else Rule.POWER_STEP_DOWN
    return Reclamp(limit, rule, f"config reloaded: no node power budget any more: its {share_w:g} W share lifted")


def carry_over(
    states: Mapping[str, GpuRuleState],
    old_plans: Mapping[str, GpuPlan],
    new_plans: Mapping[str, GpuPlan],
    originals_w: Mapping[str, float],
    lifted: tuple[Mapping[str, float], Mapping[str, float]] = ({}, {}),
) -> tuple[dict[str, GpuRuleState], dict[str, Reclamp]]:
    """Every GPU's rule state carried from the old plans onto the new ones, and the limits to set now
    (by GPU UUID). ``originals_w``: the saved original limits (W); ``lifted``: when the reload removed
    the node budget, the shares it had set and the limits the GPUs had before it (W, by UUID)."""
    shares_w, own_w = lifted
    carried: dict[str, GpuRuleState] = {}
    reclamps: dict[str, Reclamp] = {}
    for uuid, before in states.items():
        state, old, new = before, old_plans.get(uuid), new_plans.get(uuid)
        if old is not None and new is not None:
            state, reclamp = carry_power(before, old, new, originals_w.get(uuid))
            if reclamp is not None:
                reclamps[uuid] = reclamp
            share_w = shares_w.get(uuid)
            lift = None if share_w is None else lift_budget(state, new, share_w, own_w.get(uuid, originals_w.get(uuid)))
            if lift is not None:
                reclamps[uuid] = lift
        carried[uuid] = state
    return carried, reclamps
