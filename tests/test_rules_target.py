"""Target mode's controller (governor.rules.target) and its online fit (governor.rules.fit), in closed loop."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from governor.model import Action, GpuInfo, GpuReading
from governor.policy import PowerPolicy, Rule, ThermalZone
from governor.rules.fit import FitState, ModelParams, observe, prior_params
from governor.rules.target import HOUR_S, RAISE_STEP_RATIO, TargetState, step_target, target_bounds
from tests.target_plant import CARD, TARGET, Loop


def whole_watts_in_range(loop: Loop) -> bool:
    """Every limit set is whole watts inside the card's [floor, ceiling]."""
    ceiling, floor = loop.bounds
    return all(d.to_w is not None and d.to_w == math.floor(d.to_w) and floor <= d.to_w <= ceiling for d in loop.changes)


class TestBounds:
    def test_default_floor_is_the_card_minimum(self) -> None:
        """With no floor configured, the bounds are (default limit, minimum limit)."""
        assert target_bounds(TARGET, CARD) == (200.0, 100.0)

    def test_percent_floor_and_clamping(self) -> None:
        """A percentage floor is of the default limit; one below the card's minimum is clamped to it."""
        assert target_bounds(replace(TARGET, floor_w="60%"), CARD) == (200.0, 120.0)
        assert target_bounds(replace(TARGET, floor_w=50.0), CARD) == (200.0, 100.0)

    def test_no_limits_known_leaves_the_gpu_alone(self) -> None:
        """A card reporting neither a default nor a maximum limit gets no bounds, and no decision."""
        bare = GpuInfo(index=0, uuid="GPU-bare", name="bare")
        assert target_bounds(TARGET, bare) == ()
        state, out = step_target(
            GpuReading(0, "GPU-bare", temperature_c=90.0, power_w=200.0), ThermalZone.HOT, ThermalZone.HOT,
            TARGET, (), TargetState(), 0.0,
        )  # fmt: skip
        assert out == [] and state == TargetState()


class TestSteadyLoad:
    def test_settles_below_the_target_and_stops_changing(self) -> None:
        """Under a steady load at the power cap in a 30 C room, the die never passes 75 C, the limit settles
        within a few changes, and the last two hours bring no change at all."""
        loop = Loop()
        loop.run(3 * 3600)
        assert max(loop.temperatures_c) <= 75.0
        assert 1 <= len(loop.changes) <= 4
        assert loop.changes_between(3600.0, 3 * 3600.0) == []
        assert whole_watts_in_range(loop)
        # It holds the die inside the deadband: as warm as the target allows, not needlessly cool.
        assert max(loop.temperatures_c[-600:]) >= 75.0 - TARGET.deadband_c

    def test_decision_says_why(self) -> None:
        """The first lowering says what the model predicted, at which limit, when and what it chose."""
        loop = Loop()
        loop.run(600)
        first = loop.changes[0]
        assert first.rule is Rule.POWER_TARGET_DOWN and first.threshold == 75.0
        assert first.reason.startswith("predicted ") and " > target 75 C: " in first.reason
        assert f": {first.to_w:g} W (fitted model " in first.reason

    def test_cool_card_is_left_alone(self) -> None:
        """A card that never nears the target is never touched (hands-off until first needed)."""
        loop = Loop(room_c=20.0, demand_w=150.0)
        loop.run(3600)
        assert loop.changes == [] and loop.state.limit_w is None


class TestDeadband:
    def test_inside_the_deadband_nothing_changes(self) -> None:
        """Settled in the band [target - deadband, target), a room 0.3 C cooler (still in the band) brings no
        change in an hour; 4 C cooler (out of it) brings a raise."""
        loop = Loop()
        loop.run(3600)
        settled = loop.temperatures_c[-1]
        assert 75.0 - TARGET.deadband_c <= settled < 75.0
        loop.room_c = 29.7
        loop.run(3600)
        assert loop.changes_between(3600.0, 7200.0) == []
        assert 75.0 - TARGET.deadband_c <= loop.temperatures_c[-1] < 75.0
        loop.room_c = 26.0
        loop.run(1800)
        assert [d.rule for d in loop.changes_between(7200.0, 9000.0)][:1] == [Rule.POWER_TARGET_UP]

    def test_wider_deadband_settles_lower(self) -> None:
        """The limit is chosen to settle half the deadband below the target: a wider band settles cooler."""
        narrow, wide = Loop(policy=replace(TARGET, deadband_c=1.0)), Loop(policy=replace(TARGET, deadband_c=6.0))
        narrow.run(2 * 3600)
        wide.run(2 * 3600)
        assert narrow.limit_w > wide.limit_w
        assert max(wide.temperatures_c[-600:]) < 75.0 - 2.0 < max(narrow.temperatures_c[-600:])


class TestRateLimit:
    def test_raises_respect_the_hourly_budget_and_step(self) -> None:
        """A room that cools over hours gives many chances to raise: never more changes in any hour than
        max_changes_per_hour, no raise larger than a tenth of the default limit, no change closer than
        min_change_interval_s to the last."""
        loop = Loop(room_c=38.0)
        loop.run(1800)
        for room in (36.0, 33.0, 30.0, 27.0, 24.0, 21.0):
            loop.room_c = room
            loop.run(1800)
        raises = [d for d in loop.changes if d.rule is Rule.POWER_TARGET_UP]
        assert len(raises) >= 3
        assert all(d.to_w - d.from_w <= RAISE_STEP_RATIO * 200.0 + 1e-9 for d in raises)  # type: ignore[operator]
        times = [d.t_s for d in loop.changes]
        assert all(sum(1 for u in times if t <= u < t + HOUR_S) <= TARGET.max_changes_per_hour for t in times)
        assert all(b - a >= TARGET.min_change_interval_s for a, b in itertools.pairwise(times))
        assert max(loop.temperatures_c) <= 75.0

    def test_no_raise_that_cannot_leave_room_for_a_correction(self) -> None:
        """With max_changes_per_hour = 2 a raise needs an hour with no change at all before it."""
        loop = Loop(policy=replace(TARGET, max_changes_per_hour=2), room_c=36.0)
        loop.run(1200)
        loop.room_c = 24.0
        loop.run(3 * 3600)
        raises = [d for d in loop.changes if d.rule is Rule.POWER_TARGET_UP]
        assert raises
        for up in raises:
            assert not any(0 < up.t_s - d.t_s < HOUR_S for d in loop.changes if d is not up)


class TestAntiWindup:
    def test_limit_does_not_creep_while_it_does_not_bind(self) -> None:
        """A long light phase after a hot one raises nothing: a limit the card does not reach is left where it
        is, so the heavy load returns to the limit that held it, not to a wound-up one."""
        loop = Loop()
        loop.run(1800)
        held = loop.limit_w
        loop.demand_w = 60.0
        loop.run(3 * 3600)
        assert loop.limit_w == held and loop.changes_between(1800.0, 1800.0 + 3 * 3600) == []
        loop.demand_w = 210.0
        loop.run(1800)
        assert max(loop.temperatures_c) <= 75.0

    def test_saturated_at_the_floor_it_recovers_at_once(self) -> None:
        """Pinned at the floor for hours by a room too hot for any limit, the controller makes no more changes
        there, and raises within minutes once the room cools: nothing accumulated while saturated."""
        loop = Loop(room_c=55.0)  # 100 W settles at 81 C: the target cannot be held
        loop.run(2 * 3600)
        assert loop.limit_w == 100.0
        pinned = len(loop.changes)
        loop.run(2 * 3600)
        assert len(loop.changes) == pinned
        loop.room_c = 25.0
        loop.run(600)
        ups = loop.changes_between(4 * 3600.0, 4 * 3600.0 + 600)
        assert ups and ups[0].rule is Rule.POWER_TARGET_UP


class TestSafety:
    def test_critical_goes_to_the_floor_at_once(self) -> None:
        """Entering the critical zone sets the floor at the next reading, even right after another change."""
        loop = Loop()
        loop.run(300)
        assert loop.changes, "the controller lowered the limit once already"
        loop.run(1, zone=ThermalZone.CRITICAL)
        last = loop.changes[-1]
        assert last.rule is Rule.POWER_CRITICAL and last.to_w == 100.0 and last.t_s == loop.t_s
        loop.run(60, zone=ThermalZone.CRITICAL)
        assert loop.changes[-1] is last  # staying critical changes nothing more

    def test_custom_floor_is_where_critical_goes(self) -> None:
        """A configured floor ("60%") is the critical target, not the card's minimum."""
        loop = Loop(policy=replace(TARGET, floor_w="60%"))
        loop.run(5, zone=ThermalZone.CRITICAL)
        assert [d.to_w for d in loop.changes] == [120.0]

    @pytest.mark.parametrize("missing", ["temperature", "power"])
    def test_missing_reading_holds(self, missing: str) -> None:
        """A missing temperature or power holds the limit: one power_hold decision, no change, for as long as
        it is missing, even while the die heats."""
        loop = Loop(missing=lambda t: missing if 300 <= t < 1500 else None)
        loop.run(299)
        before = (loop.limit_w, len(loop.changes))
        loop.run(1200)
        holds = [d for d in loop.decisions if d.rule is Rule.POWER_HOLD]
        assert len(holds) == 1 and holds[0].action is Action.NONE and missing in holds[0].reason
        assert (loop.limit_w, len(loop.changes)) == before

    def test_over_target_lowers_even_with_a_wrong_model(self) -> None:
        """A die at the target lowers the limit by the excess even when the model (fitted in a cooler room)
        says the limit is fine: the room jumped by 6 C at once."""
        loop = Loop()
        loop.run(1800)
        loop.room_c = 36.0
        loop.run(600)
        late = loop.changes_between(1800.0, 2400.0)
        assert late and all(d.rule is Rule.POWER_TARGET_DOWN for d in late)
        assert max(loop.temperatures_c[-120:]) <= 75.0

    def test_dry_run_never_checks_drift(self) -> None:
        """In dry run (limits never applied) the controller reports would-be limits and no drift."""
        loop = Loop(enforce=False)
        loop.run(1800)
        assert loop.changes and all(d.rule is not Rule.POWER_DRIFT_REAPPLY for d in loop.decisions)
        assert loop.limit_w == 200.0

    def test_drift_above_is_reapplied_once(self) -> None:
        """An enforced limit raised behind the governor's back gets the controller's limit re-applied once."""
        loop = Loop()
        loop.run(900)
        ours = loop.limit_w
        loop.limit_w = 200.0  # someone else
        loop.run(5)
        reapplied = [d for d in loop.decisions if d.rule is Rule.POWER_DRIFT_REAPPLY]
        assert len(reapplied) == 1 and reapplied[0].to_w == ours and loop.limit_w == ours


class TestFit:
    def test_recovers_the_plant(self) -> None:
        """After a load at two power levels the fitted model's rise per watt is within 5 % of the plant's
        (0.26 C/W), its room within 1 C of 30 C and its heatsink time constant within 10 % of 60 s; 60 s
        ahead it predicts a steady load to 0.1 C (the error is largest in the minute after a power step)."""
        loop = Loop(policy=replace(TARGET, target_c=110.0))  # never acts: an open-loop fit
        for demand in (200.0, 60.0, 200.0, 120.0):
            loop.demand_w = demand
            loop.run(600)
        fit = loop.state.fit
        assert fit.ready and fit.fitted is not None
        assert abs(fit.fitted.r_total_c_per_w - 0.26) <= 0.013
        assert abs(fit.fitted.ambient_c - 30.0) <= 1.0
        assert abs(fit.fitted.tau_s - 60.0) <= 6.0
        assert fit.error_c is not None and abs(fit.error_c) < 0.1
        assert fit.error_rms_c is not None and 0.0 < fit.error_rms_c < 1.5

    def test_prior_before_data(self) -> None:
        """The first reading gives a prior (55 C over the room at the default limit) and no fit yet."""
        fit, block = observe(FitState(), None, 0.0, 40.0, 50.0, 200.0)
        assert block.n == 1 and fit.fitted is None and not fit.ready and fit.params == prior_params(200.0, 40.0, 50.0)
        assert fit.params is not None and math.isclose(fit.params.steady_c(200.0) - fit.params.ambient_c, 55.0)

    def test_a_gap_starts_afresh(self) -> None:
        """A gap longer than three blocks adds no row spanning it (its rows count stays)."""
        fit, block = FitState(), None
        for t in range(0, 60):
            fit, block = observe(fit, block, float(t), 50.0 + t / 10, 150.0, 200.0)
        rows = fit.rows
        assert rows > 0 and fit.last_block is not None
        fit, block = observe(fit, block, 600.0, 40.0, 20.0, 200.0)
        fit, block = observe(fit, block, 601.0, 40.0, 20.0, 200.0)
        assert fit.rows == rows and fit.last_block is None and fit.history == () and block.start_s == 600.0

    def test_model_prediction_closed_form(self) -> None:
        """predict_c at time 0 jumps the die by R_die x the power step, and tends to the settled value."""
        m = ModelParams(tau_s=60.0, r_die_c_per_w=0.06, r_sink_c_per_w=0.2, ambient_c=30.0)
        assert math.isclose(m.predict_c(70.0, 150.0, 200.0, 0.0), 70.0 + 0.06 * 50.0)
        assert math.isclose(m.predict_c(70.0, 150.0, 200.0, 1e6), m.steady_c(200.0))
        assert math.isclose(m.power_for_c(m.steady_c(173.0)), 173.0)


def test_policy_type_default_is_the_ladder() -> None:
    """Without mode = "target" the power policy is the ladder's."""
    assert not PowerPolicy().target_mode and TARGET.target_mode
