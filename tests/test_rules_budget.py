"""The node power budget (governor.rules.budget): shares, rebalancing, and the sum that is never exceeded."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governor.model import Action, Decision, GpuInfo, GpuReading, Snapshot
from governor.policy import GpuPolicy, NodePolicy, PowerPolicy, Rule, ThermalPolicy
from governor.rules.budget import BudgetState, apply_budget, water_fill
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate
from tests.support import Branch

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)
MIN_SHARE = 0.2


def card(index: int, min_w: float = 100.0, max_w: float = 220.0, default_w: float = 200.0) -> GpuInfo:
    """A GPU with the given limit range."""
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="card",
        power_limit_min_w=min_w,
        power_limit_max_w=max_w,
        power_limit_default_w=default_w,
    )


@dataclass
class Node:
    """GPUs under one budget; every SET decision is written (or fails) one at a time, in order."""

    gpus: list[GpuInfo]
    node: NodePolicy
    power: PowerPolicy = field(default_factory=PowerPolicy)
    enforced: dict[str, float] | None = None
    states: dict[str, GpuRuleState] | None = None
    budget: BudgetState = field(default_factory=BudgetState)

    def __post_init__(self) -> None:
        if self.enforced is None:
            self.enforced = {g.uuid: g.power_limit_default_w or 0.0 for g in self.gpus}
        self.states = {}
        self.plans = {g.uuid: GpuPlan.build(g, GpuPolicy(ThermalPolicy(), self.power)) for g in self.gpus}

    def total(self) -> float:
        """The sum of the enforced limits (W)."""
        assert self.enforced is not None
        return sum(self.enforced.values())

    def tick(
        self, t_s: float, demands_w: list[float], temps_c: list[float], fails: list[bool] | None = None
    ) -> list[tuple[Decision, float, float]]:
        """One tick; returns (decision, sum before, sum after) for every write made."""
        assert self.enforced is not None and self.states is not None
        readings = tuple(
            GpuReading(
                index=g.index,
                uuid=g.uuid,
                temperature_c=temps_c[i],
                power_w=min(demands_w[i], self.enforced[g.uuid]),
                power_limit_w=self.enforced[g.uuid],
            )
            for i, g in enumerate(self.gpus)
        )
        snapshot = Snapshot(t_s=t_s, wall_time_s=t_s, gpus=readings)
        self.states, decisions = evaluate(snapshot, self.plans, self.states)
        self.budget, decisions = apply_budget(snapshot, self.plans, self.states, decisions, self.node, self.budget)
        writes = []
        for k, d in enumerate(decisions):
            if d.action is not Action.SET_POWER_LIMIT or d.to_w is None:
                continue
            before = self.total()
            if not (fails and k < len(fails) and fails[k]):
                self.enforced[d.gpu_uuid] = d.to_w
            writes.append((d, before, self.total()))
        return writes


class TestWaterFill:
    def test_floors_then_demand_by_weight_then_ceilings(self) -> None:
        """Each GPU gets its floor, the rest goes by weight up to demand, leftovers by weight up to the ceiling."""
        shares = water_fill(300.0, [100.0, 100.0], [220.0, 60.0], [200.0, 200.0], [1.0, 1.0])
        assert shares == [200.0, 100.0]
        shares = water_fill(400.0, [100.0, 100.0], [220.0, 220.0], [220.0, 220.0], [3.0, 1.0])
        assert shares == pytest.approx([220.0, 180.0])
        assert water_fill(300.0, [50.0, 50.0], [300.0, 300.0], [300.0, 300.0], [2.0, 1.0]) == pytest.approx(
            [200.0, 100.0]
        )
        assert sum(water_fill(350.0, [100.0] * 3, [300.0] * 3, [300.0] * 3, [1.0, 2.0, 3.0])) <= 350.0 + 1e-9

    def test_floors_above_the_budget_give_the_floors(self) -> None:
        """When the floors alone exceed the budget, each GPU gets its floor (check-config refuses that budget)."""
        assert water_fill(150.0, [100.0, 100.0], [200.0, 200.0], [200.0, 200.0], [1.0, 1.0]) == [100.0, 100.0]


class TestBudget:
    def test_a_ladder_step_a_fraction_of_a_watt_over_the_share_is_held_to_it(self) -> None:
        """A rung 0.4 W above a GPU's share (90 % of 126 W = 113.4 W against 113 W) is written as the share:
        the sum never passes the budget, not even by less than the drift tolerance (found by hypothesis)."""
        cards = [card(0, 50.0, 113.0, 113.0), card(1, 50.0, 126.0, 126.0)]
        node = Node(
            cards,
            NodePolicy(power_budget_w=226.0, rebalance_interval_s=1.0, min_share_change_w=0.0),
            PowerPolicy(ladder_w=("100%", "90%", "80%")),
            enforced={"GPU-0": 113.0, "GPU-1": 113.0},
        )
        raised = []
        for t in range(1, 71):
            writes = node.tick(float(t), [0.0, 0.0], [40.0, 78.0] if t <= 3 else [40.0, 40.0])
            raised += [d for d, before, after in writes if after > before]
            assert node.total() <= 226.0
        assert [(d.rule, d.to_w) for d in raised] == [(Rule.POWER_STEP_UP, 113.0)]
        assert "its share allows 113 W" in raised[0].reason

    def test_start_over_budget_lowers_at_once(self) -> None:
        """Two 200 W cards on a 300 W budget are lowered to 150 W each at the first tick, before any heat."""
        node = Node([card(0), card(1)], NodePolicy(power_budget_w=300.0))
        writes = node.tick(0.0, [210.0, 210.0], [40.0, 40.0])
        assert [(d.gpu_index, d.to_w) for d, _, _ in writes] == [(0, 150.0), (1, 150.0)]
        assert all(d.rule is Rule.NODE_BUDGET and "node budget 300 W" in d.reason for d, _, _ in writes)
        assert node.total() == 300.0

    def test_busy_card_gets_what_the_idle_one_leaves_lower_first(self) -> None:
        """The idle card's share shrinks to its minimum; when the loads swap, the next rebalance lowers the card
        that went idle first and raises the one that got busy a tick later."""
        node = Node([card(0), card(1)], NodePolicy(power_budget_w=300.0, rebalance_interval_s=30.0))
        first = node.tick(0.0, [210.0, 40.0], [40.0, 40.0])
        assert [(d.gpu_index, d.to_w) for d, _, _ in first] == [(1, 100.0)]
        assert node.enforced == {"GPU-0": 200.0, "GPU-1": 100.0}
        lowered = node.tick(30.0, [40.0, 210.0], [40.0, 40.0])
        assert [(d.gpu_index, d.to_w) for d, _, _ in lowered] == [(0, 100.0)]
        raised = node.tick(31.0, [40.0, 210.0], [40.0, 40.0])
        assert [(d.gpu_index, d.to_w) for d, _, _ in raised] == [(1, 200.0)]
        assert node.total() == 300.0

    def test_rebalances_no_more_often_than_the_interval(self) -> None:
        """Shares move at most once per rebalance_interval_s, however the demand moves in between."""
        node = Node([card(0), card(1)], NodePolicy(power_budget_w=300.0, rebalance_interval_s=120.0))
        times = []
        for t in range(0, 1200):
            busy = (t // 200) % 2
            for d, _, _ in node.tick(float(t), [210.0 if busy else 30.0, 30.0 if busy else 210.0], [40.0, 40.0]):
                if d.rule is Rule.NODE_BUDGET and d.to_w is not None and d.from_w is not None and d.to_w < d.from_w:
                    times.append(t)
        assert len(times) >= 3
        assert all(b - a >= 120 for a, b in itertools.pairwise(times))

    def test_weight_split_is_static(self) -> None:
        """share = "weight" splits by weight alone: 2:1 weights give 200 W and 100 W whatever the demand."""
        power = PowerPolicy()
        node = Node([card(0), card(1)], NodePolicy(power_budget_w=300.0, share="weight"), power)
        node.plans["GPU-0"] = GpuPlan.build(card(0), GpuPolicy(ThermalPolicy(), replace(power, budget_weight=2.0)))
        for t in range(0, 300):
            node.tick(float(t), [20.0, 210.0], [40.0, 40.0])
        assert node.enforced == {"GPU-0": 200.0, "GPU-1": 100.0}

    def test_budget_never_raises_above_the_rule(self) -> None:
        """A hot card whose ladder stepped down keeps its rung even when the budget has watts to spare."""
        node = Node([card(0), card(1)], NodePolicy(power_budget_w=400.0))
        for t in range(0, 10):
            node.tick(float(t), [210.0, 210.0], [80.0, 40.0])
        assert node.enforced == {"GPU-0": 180.0, "GPU-1": 200.0}

    def test_no_budget_changes_nothing(self) -> None:
        """Without power_budget_w the decisions pass through untouched."""
        node = Node([card(0), card(1)], NodePolicy())
        assert node.tick(0.0, [210.0, 210.0], [40.0, 40.0]) == []


@st.composite
def nodes(draw: st.DrawFn) -> tuple[Node, list[tuple[float, list[float], list[float], list[bool]]]]:
    """A node of 2-4 GPUs with any ranges, weights and a feasible budget, and a series of ticks. About half
    the nodes are built to move their demand (:func:`moving_demand`), so that writes which raise a limit
    happen by construction and not only by luck of the draw."""
    n = draw(st.integers(2, 4))
    gpus = []
    for i in range(n):
        low = float(draw(st.integers(50, 200)))
        high = low + float(draw(st.integers(50, 500)))
        gpus.append(card(i, low, high, high))
    floors = sum(g.power_limit_min_w or 0.0 for g in gpus)
    ceilings = sum(g.power_limit_max_w or 0.0 for g in gpus)
    budget = float(draw(st.integers(int(floors), int(ceilings))))
    policy = NodePolicy(
        power_budget_w=budget,
        rebalance_interval_s=float(draw(st.sampled_from([1, 10, 60]))),
        share=draw(st.sampled_from(["demand", "weight"])),
        min_share_change_w=float(draw(st.sampled_from([0, 5, 20]))),
    )
    power = PowerPolicy(ladder_w=("100%", "90%", "80%"))
    start = {
        g.uuid: float(draw(st.integers(int(g.power_limit_min_w or 0), int(g.power_limit_max_w or 0)))) for g in gpus
    }
    node = Node(gpus, policy, power, enforced=start)
    for g in gpus:
        weight = draw(st.sampled_from([0.25, 1.0, 4.0]))
        gpu_policy = GpuPolicy(ThermalPolicy(), replace(power, budget_weight=weight))
        # Ticks come up to 30 s apart: a daemon polling every 10 s, to which 30 s is no gap in the readings.
        node.plans[g.uuid] = GpuPlan.build(g, gpu_policy, 10.0)
    if draw(st.booleans()):
        return moving_demand(draw, gpus, policy, power)
    ticks = []
    t = 0.0
    demands = [0.0] * n
    for _ in range(draw(st.integers(20, 60))):
        t += float(draw(st.sampled_from([1, 5, 30])))
        if draw(st.booleans()):
            demands = [float(draw(st.integers(0, int(g.power_limit_max_w or 0) + 50))) for g in gpus]
        temps = [float(draw(st.sampled_from([40, 60, 78, 90]))) for _ in gpus]
        fails = draw(st.lists(st.booleans(), min_size=0, max_size=8))
        ticks.append((t, demands, temps, fails))
    return node, ticks


def moving_demand(
    draw: st.DrawFn, gpus: list[GpuInfo], policy: NodePolicy, power: PowerPolicy
) -> tuple[Node, list[tuple[float, list[float], list[float], list[bool]]]]:
    """A fresh node (every card at its maximum) under a budget well inside its range, shared by demand: a
    cool first card busy, then (after at least one rebalance interval) a cool second card busy instead,
    whose share, and limit, the budget then raises (every write succeeds: a failed lowering holds the
    raise back, which the drawn nodes cover)."""
    floors = sum(g.power_limit_min_w or 0.0 for g in gpus)
    ceilings = sum(g.power_limit_max_w or 0.0 for g in gpus)
    quarter = (ceilings - floors) / 4.0
    budget = float(draw(st.integers(int(floors + quarter), int(ceilings - quarter))))
    policy = replace(policy, power_budget_w=budget, share="demand", min_share_change_w=0.0)
    node = Node(gpus, policy, power, enforced={g.uuid: g.power_limit_max_w or 0.0 for g in gpus})
    for g in gpus:
        node.plans[g.uuid] = GpuPlan.build(g, GpuPolicy(ThermalPolicy(), power), 10.0)
    busy = [(g.power_limit_max_w or 0.0) + 50.0 for g in gpus]
    first = [busy[0]] + [0.0] * (len(gpus) - 1)
    second = [0.0, busy[1]] + [0.0] * (len(gpus) - 2)
    step_s = float(draw(st.sampled_from([1, 5])))
    swap_s = policy.rebalance_interval_s + 5.0
    ticks: Ticks = []
    t = 0.0
    while t < 2 * swap_s + 10.0:
        t += step_s
        ticks.append((t, first if t <= swap_s else second, [40.0] * len(gpus), []))
    return node, ticks


Ticks = list[tuple[float, list[float], list[float], list[bool]]]


class TestBudgetProperties:
    def test_sum_never_exceeded_by_a_write(self) -> None:
        """Over any demands, weights, ranges and failed writes: no write that raises a limit leaves the sum of
        limits above the budget, and once within the budget the node stays within it, write by write."""
        raised = Branch("a write raised a limit")
        started_over = Branch("the node started over its budget")

        @SETTINGS
        @given(nodes())
        def check(case: tuple[Node, Ticks]) -> None:
            node, ticks = case
            budget = node.node.power_budget_w
            assert budget is not None
            started_over.saw(node.total() > budget)
            within = node.total() <= budget + 1e-6
            wrote_up = False
            for t, demands, temps, fails in ticks:
                for d, before, after in node.tick(t, demands, temps, fails):
                    if after > before + 1e-9:
                        wrote_up = True
                        assert after <= budget + 1e-6, f"{d.reason}: {before:g} -> {after:g} W over {budget:g} W"
                    if within:
                        assert after <= budget + 1e-6
                    within = within or after <= budget + 1e-6
            raised.saw(wrote_up)

        check()
        raised.require(MIN_SHARE)
        started_over.require(MIN_SHARE)

    @SETTINGS
    @given(nodes())
    def test_within_budget_after_the_first_tick_when_writes_succeed(self, case: tuple[Node, Ticks]) -> None:
        """With every write succeeding, the sum of limits is within the budget after the first tick, at every tick,
        and every limit stays inside its card's range."""
        node, ticks = case
        budget = node.node.power_budget_w
        assert budget is not None and node.enforced is not None
        for t, demands, temps, _ in ticks:
            node.tick(t, demands, temps)
            assert node.total() <= budget + 1e-6
            for g in node.gpus:
                assert (g.power_limit_min_w or 0.0) - 1e-9 <= node.enforced[g.uuid] <= (g.power_limit_max_w or 0.0)
