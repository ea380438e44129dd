"""The node power budget (pure): several GPUs share one PSU or circuit.

After the per-GPU rules (ladder or target mode) have decided, :func:`apply_budget` caps
each GPU at its share of ``[node] power_budget_w`` and rewrites the tick's power-limit
decisions so that the sum of the limits the governor sets never exceeds the budget:

* **Shares.** The budget is split in proportion to ``power.budget_weight`` (weighted
  max-min fairness), each share at least the card's minimum limit and at most its
  *demand*: the limit its own rule allows when its power reached its limit since the last
  rebalance (it is held back), else its peak power then plus 10 % (at least 10 W) of
  headroom. What nobody wants is handed out by weight up to each GPU's own limit.
  ``share = "weight"`` ignores demand: a static split by weight.
* **Rebalancing** happens at most once per ``rebalance_interval_s``, and a new share is
  taken only when it moves by ``min_share_change_w`` or more; a GPU's own rule may always
  lower it further (its limit is the lower of its rule's and its share).
* **Never exceeded, in any order of writes.** A GPU's *committed* limit is the higher of
  its enforced limit and the last one the governor asked for (a failed write or a reading
  that lags cannot hide watts). Lowerings happen at once; a raise only takes watts that are
  free while every other GPU still counts at its committed limit, so a GPU being lowered in
  the same tick frees nothing until the next tick confirms it ("lower first"). Each write
  on its own, and every prefix of them, keeps the sum within the budget.
* A GPU the governor must not or cannot move (monitor-only, no reading, lost) keeps its
  committed limit and the others share what is left. A limit that cannot be read counts as
  the card's maximum.
* Until the budget first moves a GPU, that GPU's own limit (the one it had) is its ceiling:
  the budget never raises a card above the limit it found or its rule wants.

In dry run, nothing is applied: the committed limit is the one that would have been set.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from governor.model import Decision, GpuHealth, GpuReading, Snapshot
from governor.policy import Action, NodePolicy, Rule, format_seconds
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, wanted_w
from governor.rules.power import DRIFT_TOLERANCE_W

HEADROOM_RATIO = 0.10
"""A GPU below its limit is given its peak power plus this share of it..."""
HEADROOM_MIN_W = 10.0
"""... and at least this many watts."""
BINDING_RATIO = 0.03
"""Power within this share of the limit (or 3 W) counts as held back by it."""


@dataclass(frozen=True, slots=True)
class BudgetState:
    """What the budget remembers: each GPU's share (W), the limit it last asked for (W), the
    limit the GPU had before the budget first moved it (W), its peak power (W) and whether
    its power reached its limit since the last rebalance, and when that was (s). Keyed by
    GPU UUID, as sorted tuples of pairs (frozen)."""

    shares_w: tuple[tuple[str, float], ...] = ()
    set_w: tuple[tuple[str, float], ...] = ()
    own_w: tuple[tuple[str, float], ...] = ()
    peak_w: tuple[tuple[str, float], ...] = ()
    held_back: tuple[str, ...] = ()
    last_rebalance_s: float | None = None

    def set_for(self, uuid: str) -> float | None:
        """The limit (W) the budget last asked for on GPU ``uuid``, or None."""
        return dict(self.set_w).get(uuid)


@dataclass(frozen=True, slots=True)
class _Gpu:
    uuid: str
    reading: GpuReading | None
    min_w: float
    max_w: float
    wanted_w: float  # the most this GPU's own rule (or own limit) allows
    committed_w: float
    weight: float
    movable: bool


def _fill(budget_w: float, lows_w: list[float], highs_w: list[float], weights: list[float]) -> list[float]:
    """``clamp(level * weight, low, high)`` for each GPU, at the level whose total is ``budget_w`` (or
    every ``high`` when even they fit): weighted max-min fairness, found by bisection."""

    def at(level: float) -> list[float]:
        return [min(hi, max(lo, level * w)) for lo, hi, w in zip(lows_w, highs_w, weights)]

    if not highs_w or not math.isfinite(budget_w):  # no GPU to share among, or nothing to share
        return list(lows_w)
    if sum(highs_w) <= budget_w:
        return list(highs_w)
    if sum(lows_w) >= budget_w:
        return list(lows_w)
    low, high = 0.0, max(h / max(w, 1e-9) for h, w in zip(highs_w, weights))
    for _ in range(60):
        mid = (low + high) / 2.0
        if sum(at(mid)) > budget_w:
            high = mid
        else:
            low = mid
    return at(low)


def water_fill(
    budget_w: float, floors_w: list[float], demands_w: list[float], ceilings_w: list[float], weights: list[float]
) -> list[float]:
    """Shares (W) of ``budget_w`` in proportion to ``weights`` (weighted max-min fairness): each at least its
    floor and at most its demand; what the demands leave goes by weight up to each ceiling. Never more
    than the budget in total unless the floors alone exceed it (then the floors)."""
    demands = [max(f, min(d, c)) for f, d, c in zip(floors_w, demands_w, ceilings_w)]
    first = _fill(budget_w, floors_w, demands, weights)
    if sum(first) < budget_w - 1e-9:
        return _fill(budget_w, first, [max(a, c) for a, c in zip(first, ceilings_w)], weights)
    return first


def _demand(gpu: _Gpu, peak_w: float | None, held_back: bool, share: str) -> float:
    if share == "weight" or held_back or peak_w is None:
        return gpu.wanted_w
    return min(gpu.wanted_w, max(gpu.min_w, peak_w + max(HEADROOM_MIN_W, HEADROOM_RATIO * peak_w)))


def _decision(
    reading: GpuReading, t_s: float, reason: str, from_w: float | None, to_w: float, budget_w: float
) -> Decision:
    return Decision(
        t_s=t_s,
        gpu_index=reading.index,
        gpu_uuid=reading.uuid,
        rule=Rule.NODE_BUDGET,
        action=Action.SET_POWER_LIMIT,
        reason=reason,
        reading=reading.temperature_c,
        threshold=budget_w,
        from_w=from_w,
        to_w=to_w,
    )


def apply_budget(
    snapshot: Snapshot,
    plans: Mapping[str, GpuPlan],
    states: Mapping[str, GpuRuleState],
    decisions: list[Decision],
    policy: NodePolicy,
    state: BudgetState,
    *,
    unmovable: Collection[str] = (),
    dry_run: bool = False,
) -> tuple[BudgetState, list[Decision]]:
    """The tick's decisions with every GPU held to its share of the node budget (see the
    module docstring); unchanged when there is no budget. ``states`` are the per-GPU rule
    states after this tick's rules; ``unmovable`` names GPUs whose limit must stay."""
    budget = policy.power_budget_w
    if budget is None or not plans:
        return state, decisions
    t_s = snapshot.t_s
    readings = {r.uuid: r for r in snapshot.gpus}
    set_w, own_w, peak_w = dict(state.set_w), dict(state.own_w), dict(state.peak_w)
    held = set(state.held_back)
    gpus: list[_Gpu] = []
    for uuid in sorted(plans, key=lambda u: plans[u].info.index):
        plan = plans[uuid]
        info = plan.info
        reading = readings.get(uuid)
        max_w = info.power_limit_max_w or info.power_limit_default_w or budget
        min_w = min(info.power_limit_min_w or 0.0, max_w)
        enforced = None if reading is None else reading.power_limit_w
        if uuid not in own_w and enforced is not None:
            own_w[uuid] = enforced
        if dry_run:
            committed = set_w.get(uuid, enforced if enforced is not None else max_w)
        else:
            committed = max(enforced if enforced is not None else max_w, set_w.get(uuid, 0.0))
        rule_w = wanted_w(states.get(uuid, NEW_STATE), plan) if plan.policy.power.enabled else None
        own = own_w.get(uuid, max_w)
        wanted = min(own, rule_w) if rule_w is not None else own
        movable = (
            uuid not in unmovable
            and reading is not None
            and reading.health is not GpuHealth.LOST
            and plan.policy.power.enabled
            and bool(plan.ladder_w)
        )
        gpus.append(
            _Gpu(uuid, reading, min_w, max_w, max(min_w, wanted), committed, plan.policy.power.budget_weight, movable)
        )
        if reading is not None and reading.power_w is not None:
            peak_w[uuid] = max(peak_w.get(uuid, 0.0), reading.power_w)
            limit = enforced if enforced is not None else committed
            if reading.power_w >= limit - max(3.0, BINDING_RATIO * limit):
                held.add(uuid)

    shares = dict(state.shares_w)
    over = sum(g.committed_w for g in gpus) > budget + 1e-6
    due = state.last_rebalance_s is None or t_s - state.last_rebalance_s >= policy.rebalance_interval_s
    missing = any(g.uuid not in shares for g in gpus)
    last_rebalance = state.last_rebalance_s
    if due or over or missing:
        fresh = _shares(gpus, budget, peak_w, held, policy.share)
        moved = {u: w for u, w in fresh.items() if u not in shares or abs(w - shares[u]) >= policy.min_share_change_w}
        candidate = {**shares, **moved}
        candidate = {g.uuid: candidate[g.uuid] for g in gpus}
        shares = candidate if sum(candidate.values()) <= budget + 1e-6 else fresh
        last_rebalance = t_s
        peak_w, held = {}, set()

    finals: dict[str, float] = {}
    for g in gpus:
        if not g.movable:
            finals[g.uuid] = g.committed_w
            continue
        finals[g.uuid] = max(g.min_w, min(g.wanted_w, shares[g.uuid]))
    # Raises take only watts free while everyone counts at the committed limit.
    room = budget - sum(g.committed_w for g in gpus)
    for g in gpus:
        final = finals[g.uuid]
        if final > g.committed_w + DRIFT_TOLERANCE_W / 2:
            grant = max(0.0, min(final - g.committed_w, room))
            finals[g.uuid] = float(math.floor(g.committed_w + grant)) if grant < final - g.committed_w else final
            room -= max(0.0, finals[g.uuid] - g.committed_w)

    out = _rewrite(gpus, finals, decisions, budget, t_s, policy)
    new_set = dict(set_w)
    for g in gpus:
        if g.movable:
            new_set[g.uuid] = finals[g.uuid]
    new_state = replace(
        state,
        shares_w=tuple(sorted(shares.items())),
        set_w=tuple(sorted(new_set.items())),
        own_w=tuple(sorted(own_w.items())),
        peak_w=tuple(sorted(peak_w.items())),
        held_back=tuple(sorted(held)),
        last_rebalance_s=last_rebalance,
    )
    return new_state, out


def _shares(
    gpus: list[_Gpu], budget: float, peak_w: Mapping[str, float], held: set[str], share: str
) -> dict[str, float]:
    """Whole-watt shares of what the unmovable GPUs leave of ``budget``."""
    fixed = sum(g.committed_w for g in gpus if not g.movable)
    movable = [g for g in gpus if g.movable]
    raw = water_fill(
        budget - fixed,
        [g.min_w for g in movable],
        [_demand(g, peak_w.get(g.uuid), g.uuid in held, share) for g in movable],
        [g.wanted_w for g in movable],
        [g.weight for g in movable],
    )
    out = {g.uuid: g.committed_w for g in gpus if not g.movable}
    for g, watts in zip(movable, raw):
        out[g.uuid] = max(g.min_w, float(math.floor(watts + 1e-9)))
    return out


def _rewrite(
    gpus: list[_Gpu],
    finals: Mapping[str, float],
    decisions: list[Decision],
    budget: float,
    t_s: float,
    policy: NodePolicy,
) -> list[Decision]:
    """The decisions with power limits held to ``finals``: lowerings first, then everything
    else in order, then raises; a drift report about a limit the budget set is dropped."""
    by_gpu = {g.uuid: g for g in gpus}
    lowers: list[Decision] = []
    others: list[Decision] = []
    raises: list[Decision] = []
    decided: set[str] = set()
    for decision in decisions:
        d = decision
        g = by_gpu.get(d.gpu_uuid)
        if g is None or not g.movable:
            others.append(d)
            continue
        final = finals[g.uuid]
        if d.rule is Rule.POWER_DRIFT_EXTERNAL_LOWER and d.from_w is not None and abs(d.from_w - final) <= 1.0:
            continue  # the budget set that lower limit, not someone else
        if d.action is Action.SET_POWER_LIMIT and d.to_w is not None:
            decided.add(g.uuid)
            if d.to_w > final:  # strictly: even a fraction of a watt over the share would pass the budget
                d = replace(d, to_w=final, reason=f"{d.reason}; node budget {budget:g} W: its share allows {final:g} W")
            if final < g.committed_w - DRIFT_TOLERANCE_W / 2:
                lowers.append(d)
            elif final > g.committed_w + DRIFT_TOLERANCE_W / 2:
                raises.append(d)
            else:
                others.append(d)
            continue
        others.append(d)
    for g in gpus:
        if not g.movable or g.uuid in decided or g.reading is None:
            continue
        final = finals[g.uuid]
        enforced = g.reading.power_limit_w
        in_force = g.committed_w if enforced is None else enforced
        if final < g.committed_w - DRIFT_TOLERANCE_W / 2:
            reason = (
                f"node budget {budget:g} W: share {final:g} W by demand and weight "
                f"(rebalanced at most every {format_seconds(policy.rebalance_interval_s)})"
            )
            lowers.append(_decision(g.reading, t_s, reason, in_force, final, budget))
        elif final > g.committed_w + DRIFT_TOLERANCE_W / 2:
            reason = f"node budget {budget:g} W: share {final:g} W, watts the others left free"
            raises.append(_decision(g.reading, t_s, reason, in_force, final, budget))
    return [*lowers, *others, *raises]
