"""Properties of target mode in closed loop over any card, room, load and valid policy.

Each example drives a random two-node plant (any rise per watt, time constant, room and limit
range) through a hot phase, a cooler one and a window of missing readings; each property counts
the examples in which its branch happened (a lowering, a raise, a hold while governed) and
fails when that share is below MIN_SHARE.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from governor.model import GpuInfo
from governor.policy import PowerPolicy, Rule, ThermalZone
from governor.rules.target import HOUR_S
from governor.sim.thermal import ThermalParams
from tests.support import Branch
from tests.target_plant import Loop

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
MIN_SHARE = 0.2


@dataclass(frozen=True)
class Case:
    """A card, its plant, a policy, and the run: hot room, then cooler, readings missing in a window."""

    loop: Loop
    hot_s: int
    cool_room_c: float
    cool_s: int
    missing: tuple[float, float]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Any plausible card and valid target-mode policy, in a room that makes the controller work."""
    default_w = float(draw(st.integers(150, 700)))
    gpu = GpuInfo(
        index=0,
        uuid="GPU-prop",
        name="prop",
        power_limit_min_w=round(default_w * draw(st.floats(0.3, 0.7))),
        power_limit_max_w=round(default_w * draw(st.floats(1.0, 1.2))),
        power_limit_default_w=default_w,
    )
    rise_c = draw(st.floats(35.0, 65.0))  # at the default limit
    r_total = rise_c / default_w
    share = draw(st.floats(0.1, 0.5))
    tau_s = draw(st.floats(15.0, 120.0))
    params = ThermalParams(
        share * r_total, 1.5 / (share * r_total), (1 - share) * r_total, tau_s / ((1 - share) * r_total)
    )
    target = draw(st.floats(60.0, 88.0))
    # A room where the default limit overshoots the target by 2-12 C: the controller must act.
    room = target + draw(st.floats(2.0, 12.0)) - rise_c
    policy = PowerPolicy(
        mode="target",
        target_c=target,
        deadband_c=draw(st.floats(1.0, 5.0)),
        horizon_s=draw(st.sampled_from([30.0, 120.0, 300.0])),
        max_changes_per_hour=draw(st.integers(2, 8)),
        min_change_interval_s=draw(st.sampled_from([0.0, 30.0, 120.0])),
        dwell_s=draw(st.sampled_from([0.0, 60.0, 300.0])),
    )
    loop = Loop(policy=policy, gpu=gpu, params=params, room_c=room, demand_w=default_w * 1.1, limit_w=default_w)
    start = float(draw(st.integers(600, 2400)))
    return Case(
        loop=loop,
        hot_s=draw(st.integers(1200, 2400)),
        cool_room_c=room - draw(st.floats(4.0, 15.0)),
        cool_s=draw(st.integers(1800, 3000)),
        missing=(start, start + draw(st.integers(30, 300))),
    )


def run(case: Case) -> Loop:
    """Run the case: the hot room, then the cooler one; readings missing in the window."""
    loop = case.loop
    lo, hi = case.missing
    loop.missing = lambda t: ("temperature" if int(t) % 2 else "power") if lo <= t < hi else None
    loop.run(case.hot_s)
    loop.room_c = case.cool_room_c
    loop.run(case.cool_s)
    return loop


class TestTargetProperties:
    lowered = Branch("the controller lowered the limit")
    raised = Branch("the controller raised the limit")
    held = Branch("readings went missing while the controller governed")

    @SETTINGS
    @given(cases())
    def test_closed_loop_properties(self, case: Case) -> None:
        """In one closed-loop run: (1) every limit set is whole watts between the floor (the card's minimum) and
        its default limit; (2) while a temperature or power reading is missing no limit is set and the hold is
        reported; (3) a raise comes only with room in the hourly budget for it and one correction, at least
        min_change_interval_s after the last change, with the die more than deadband_c under the target, by at
        most a tenth of the default limit; (4) two changes closer than min_change_interval_s only when the
        later one lowers a die reading the target or more and hotter than at the earlier change."""
        loop = run(case)
        policy = loop.policy
        ceiling, floor = loop.bounds
        for d in loop.changes:
            assert d.to_w is not None and d.to_w == math.floor(d.to_w) and floor <= d.to_w <= ceiling
        self.lowered.saw(any(d.rule is Rule.POWER_TARGET_DOWN for d in loop.changes))

        lo, hi = case.missing
        inside = [d for d in loop.decisions if lo <= d.t_s < hi]
        assert [d for d in inside if d.to_w is not None and d.rule is not Rule.POWER_HOLD] == []
        governed_before = any(d.t_s < lo for d in loop.changes)
        if governed_before:
            assert len([d for d in inside if d.rule is Rule.POWER_HOLD]) >= 1
        self.held.saw(governed_before)

        raises = [d for d in loop.changes if d.rule is Rule.POWER_TARGET_UP]
        for up in raises:
            earlier = [d.t_s for d in loop.changes if d.t_s < up.t_s]
            assert sum(1 for t in earlier if up.t_s - t < HOUR_S) + 2 <= policy.max_changes_per_hour
            assert not earlier or up.t_s - earlier[-1] >= policy.min_change_interval_s
            assert up.reading is not None and up.reading <= policy.target_c - policy.deadband_c
            assert up.from_w is not None and up.to_w is not None
            assert up.to_w - up.from_w <= 0.1 * (loop.gpu.power_limit_default_w or 0.0) + 1e-9
        self.raised.saw(bool(raises))

        for a, b in itertools.pairwise(loop.changes):
            if b.t_s - a.t_s < policy.min_change_interval_s and b.rule is not Rule.POWER_CRITICAL:
                assert b.rule is Rule.POWER_TARGET_DOWN
                assert b.reading is not None and a.reading is not None
                assert b.reading >= policy.target_c and b.reading > a.reading

    @classmethod
    def teardown_class(cls) -> None:
        """Each property's branch happened often enough to mean something."""
        cls.lowered.require(MIN_SHARE)
        cls.raised.require(MIN_SHARE)
        cls.held.require(MIN_SHARE)


def test_critical_zone_always_reaches_the_floor() -> None:
    """Whatever the controller did before, entering the critical zone sets the floor at that very reading."""
    for t_enter in (10, 400, 1800):
        loop = Loop()
        loop.run(t_enter)
        loop.run(1, zone=ThermalZone.CRITICAL)
        assert loop.limit_w == loop.bounds[1] and loop.changes[-1].rule is Rule.POWER_CRITICAL
