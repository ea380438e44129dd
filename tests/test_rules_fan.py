"""The fan rule (pure) and its gate on the power ladder: curve, assist, hand-backs, headroom."""

from __future__ import annotations

from dataclasses import replace

from governor.model import Action, GpuReading
from governor.policy import FanMode, FanPolicy, GpuPolicy, PowerPolicy, Rule, ThermalZone
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate_gpu
from governor.rules.fan import FanPlan, FanState, curve_percent, step_fan
from governor.rules.power import LadderState, step_power
from tests.helpers import FAN_CARD, fan_reading

CARD = FAN_CARD
ASSIST = FanPolicy(mode=FanMode.ASSIST, max_percent=75.0, raise_at_c=70.0, lower_at_c=62.0)
CURVE = FanPolicy(mode=FanMode.CURVE, max_percent=90.0, curve=((50.0, 30.0), (70.0, 50.0), (80.0, 80.0)))


def targets(state: FanState) -> dict[int, float]:
    return dict(state.targets)


class TestPlan:
    def test_no_fans_is_a_reason_not_an_error(self) -> None:
        """A fan count NVML cannot give (a data-center board) or zero fans leaves nothing to drive, with why."""
        unsupported = FanPlan.build(replace(CARD, fan_count=None), ASSIST)
        none = FanPlan.build(replace(CARD, fan_count=0), ASSIST)
        assert unsupported.fans == () and "not supported" in (unsupported.no_fans or "")
        assert none.fans == () and none.no_fans == "the GPU has no fans"

    def test_fans_selects_existing_indexes(self) -> None:
        """fans = [] is every fan; [1, 5] on a two-fan card is fan 1 only."""
        assert FanPlan.build(CARD, ASSIST).fans == (0, 1)
        assert FanPlan.build(CARD, replace(ASSIST, fans=(1, 5))).fans == (1,)


class TestCurve:
    def test_interpolates_and_is_flat_beyond_the_ends(self) -> None:
        """Linear between points, the first speed below the first point, the last above the last."""
        curve = CURVE.curve
        assert curve_percent(curve, 20.0) == 30.0
        assert curve_percent(curve, 60.0) == 40.0
        assert curve_percent(curve, 75.0) == 65.0
        assert curve_percent(curve, 99.0) == 80.0

    def test_rises_at_once_and_lowers_only_past_the_hysteresis(self) -> None:
        """60 -> 75 C raises both fans to 65 %; at 73 C (within 3 C) they stay; at 71 C they drop to 62 %."""
        plan = FanPlan.build(CARD, CURVE)
        first = step_fan(fan_reading(60.0), plan, CURVE, FanState(), 0.0)
        assert targets(first.state) == {0: 40.0, 1: 40.0} and [d.fan for d in first.decisions] == [0, 1]
        assert all(d.action is Action.SET_FAN_SPEED and d.rule is Rule.FAN_CURVE for d in first.decisions)
        up = step_fan(fan_reading(75.0), plan, CURVE, first.state, 1.0)
        assert targets(up.state) == {0: 65.0, 1: 65.0}
        held = step_fan(fan_reading(73.0), plan, CURVE, up.state, 2.0)
        assert held.decisions == [] and targets(held.state) == {0: 65.0, 1: 65.0}
        down = step_fan(fan_reading(71.0), plan, CURVE, held.state, 3.0)
        assert targets(down.state) == {0: 62.0, 1: 62.0}  # the curve at 71 + 3 C
        assert not (first.headroom or up.headroom or down.headroom)  # curve never holds the power ladder

    def test_clamped_to_the_ceiling_and_the_card(self) -> None:
        """A curve point at 95 % is cut to the 75 % ceiling; one under the card's 30 % minimum is raised to it."""
        policy = replace(CURVE, max_percent=75.0, curve=((40.0, 10.0), (80.0, 95.0)))
        plan = FanPlan.build(CARD, policy)
        assert targets(step_fan(fan_reading(90.0), plan, policy, FanState(), 0.0).state)[0] == 75.0
        assert targets(step_fan(fan_reading(30.0), plan, policy, FanState(), 0.0).state)[0] == 30.0


class TestAssist:
    def run(self, temps: list[tuple[float, float]]) -> list[tuple[float, FanState, bool]]:
        """(t, state, headroom) after each (t, temperature), from the card's control; fans read at target."""
        plan = FanPlan.build(CARD, ASSIST)
        state = FanState()
        out = []
        for t, temp in temps:
            measured = tuple(dict(state.targets).get(f, 45.0) for f in (0, 1))
            step = step_fan(fan_reading(temp, measured), plan, ASSIST, state, t)
            state = step.state
            out.append((t, state, step.headroom))
        return out

    def test_card_control_until_raise_at(self) -> None:
        """Below raise_at_c the card keeps its fans and the power ladder is not held."""
        ((_, state, headroom),) = self.run([(0.0, 69.0)])
        assert state.targets == () and headroom is False

    def test_takes_over_from_the_measured_speed_and_raises_step_by_step(self) -> None:
        """At 70 C: 45 % -> 55 %, then +10 % every 5 s up to the 75 % ceiling; headroom while below it."""
        steps = self.run([(0.0, 71.0), (1.0, 72.0), (5.0, 72.0), (10.0, 72.0), (15.0, 72.0)])
        assert [max(dict(s.targets).values()) for _, s, _ in steps] == [55.0, 55.0, 65.0, 75.0, 75.0]
        assert steps[0][1].taken_from_percent == 45.0
        assert all(headroom for _, _, headroom in steps)  # at the ceiling: still settling

    def test_ceiling_holds_the_ladder_for_settle_s_only(self) -> None:
        """At the ceiling since t=10 (read every 10 s) the headroom lasts until t=70 (settle_s 60) and is gone after."""
        at_ceiling = [(float(t), 74.0) for t in range(20, 70, 10)]
        temps = [(0.0, 71.0), (5.0, 72.0), (10.0, 72.0), *at_ceiling, (69.0, 76.0), (70.0, 76.0), (80.0, 76.0)]
        steps = self.run(temps)
        assert steps[2][1].ceiling_since_s == 10.0
        assert [h for _, _, h in steps] == [True] * 9 + [False, False]

    def test_lowers_and_hands_back_when_cool(self) -> None:
        """At 62 C and below the fans come down 10 % every 5 s, and go back to the card at the speed taken over at."""
        up = self.run([(0.0, 71.0), (5.0, 72.0), (10.0, 72.0)])
        state = up[-1][1]
        plan = FanPlan.build(CARD, ASSIST)
        t, decisions = 20.0, []
        while state.targets and t < 100.0:
            step = step_fan(fan_reading(60.0, tuple(dict(state.targets).values())), plan, ASSIST, state, t)
            state = step.state
            decisions.extend(step.decisions)
            t += 5.0
        speeds = [d.to_percent for d in decisions if d.fan == 0]
        assert speeds == [65.0, 55.0, None]  # 45 % was where the card ran them: handed back there
        assert decisions[-1].action is Action.SET_FAN_AUTO and decisions[-1].rule is Rule.FAN_RELEASE

    def test_no_takeover_when_the_card_already_runs_above_the_ceiling(self) -> None:
        """Fans the card runs at 80 % (over the 75 % ceiling) are left alone and the ladder is not held."""
        plan = FanPlan.build(CARD, ASSIST)
        step = step_fan(fan_reading(80.0, (80.0, 80.0)), plan, ASSIST, FanState(), 0.0)
        assert step.decisions == [] and step.headroom is False

    def test_missing_temperature_hands_the_fans_back(self) -> None:
        """No temperature: every fan the governor set goes back to the card's own control."""
        state = self.run([(0.0, 71.0)])[0][1]
        step = step_fan(fan_reading(None), FanPlan.build(CARD, ASSIST), ASSIST, state, 1.0)
        assert [d.action for d in step.decisions] == [Action.SET_FAN_AUTO, Action.SET_FAN_AUTO]
        assert step.state.targets == () and step.headroom is False

    def test_blocked_or_fanless_decides_nothing(self) -> None:
        """Fans the actuator gave up on, or a board without fans, get no decision and hold nothing."""
        hot = fan_reading(80.0)
        blocked = step_fan(hot, FanPlan.build(CARD, ASSIST), ASSIST, FanState(), 0.0, blocked=True)
        fanless = step_fan(hot, FanPlan.build(replace(CARD, fan_count=None), ASSIST), ASSIST, FanState(), 0.0)
        assert (blocked.decisions, blocked.headroom) == ([], False)
        assert (fanless.decisions, fanless.headroom) == ([], False)


class TestNotFollowing:
    def test_a_fan_off_target_for_the_timeout_is_handed_back_once(self) -> None:
        """Target 55 %, the fan reads 40 % (15 % off, tolerance 10 %) for 30 s: every fan goes back to the
        card, once, then nothing more."""
        plan = FanPlan.build(CARD, ASSIST)
        state = step_fan(fan_reading(71.0), plan, ASSIST, FanState(), 0.0).state
        policy = replace(ASSIST, step_interval_s=1000.0)  # no further raise in this test
        decisions = []
        for t in (1.0, 10.0, 20.0, 31.0, 40.0, 50.0):
            step = step_fan(fan_reading(72.0, (40.0, 40.0)), plan, policy, state, t)
            state = step.state
            decisions.extend(step.decisions)
        assert [d.rule for d in decisions] == [Rule.FAN_NOT_FOLLOWING, Rule.FAN_NOT_FOLLOWING]
        assert decisions[0].t_s == 31.0 and "fan 0 reads 40 %" in decisions[0].reason
        assert state.handed_back is not None and state.targets == ()

    def test_the_check_is_off_in_dry_run(self) -> None:
        """In dry run the fans never got the target, so not reading it is no failure."""
        plan = FanPlan.build(CARD, ASSIST)
        policy = replace(ASSIST, step_interval_s=1000.0)
        state = step_fan(fan_reading(71.0), plan, policy, FanState(), 0.0, check_follow=False).state
        step = step_fan(fan_reading(72.0, (40.0, 40.0)), plan, policy, state, 100.0, check_follow=False)
        assert step.decisions == [] and step.state.handed_back is None


class TestPowerGate:
    LADDER = (200.0, 180.0)
    POWER = PowerPolicy(ladder_w=LADDER, debounce_samples=3, min_change_interval_s=0.0)

    def test_headroom_holds_the_step_down_and_restarts_the_hot_run(self) -> None:
        """Hot readings with headroom never step down; once it is gone, debounce_samples more are needed."""
        state = LadderState()
        for t in range(5):
            state, decisions = step_power(
                GpuReading(1, CARD.uuid, temperature_c=78.0, power_limit_w=200.0),
                ThermalZone.WARNING,
                ThermalZone.WARNING,
                self.POWER,
                self.LADDER,
                state,
                float(t),
                cooling_headroom=True,
            )
            assert decisions == [] and state.hot_samples == 0
        for t in range(5, 8):
            state, decisions = step_power(
                GpuReading(1, CARD.uuid, temperature_c=78.0, power_limit_w=200.0),
                ThermalZone.WARNING,
                ThermalZone.WARNING,
                self.POWER,
                self.LADDER,
                state,
                float(t),
            )
        assert [d.rule for d in decisions] == [Rule.POWER_STEP_DOWN] and state.rung == 1

    def test_critical_drops_to_the_floor_whatever_the_fans(self) -> None:
        """Entering the critical zone goes straight to the lowest rung even with fan headroom."""
        _, decisions = step_power(
            GpuReading(1, CARD.uuid, temperature_c=96.0, power_limit_w=200.0),
            ThermalZone.THROTTLE,
            ThermalZone.CRITICAL,
            self.POWER,
            self.LADDER,
            LadderState(),
            0.0,
            cooling_headroom=True,
        )
        assert [d.rule for d in decisions] == [Rule.POWER_CRITICAL]

    def test_engine_raises_the_fans_before_any_power_step(self) -> None:
        """In assist mode a card held at 78 C gets its fans to the ceiling first; the power steps down only
        after settle_s at the ceiling; in auto mode the power steps down within debounce_samples."""

        def run(fan: FanPolicy) -> list[tuple[float, Rule]]:
            plan = GpuPlan.build(CARD, GpuPolicy(power=self.POWER, fan=fan))
            state = GpuRuleState()
            seen: list[tuple[float, Rule]] = []
            for t in range(0, 120):
                measured = tuple(dict(state.fan.targets).get(f, 45.0) for f in (0, 1))
                state, decisions = evaluate_gpu(fan_reading(78.0, measured), plan, state, float(t))
                seen += [(float(t), d.rule) for d in decisions if d.rule is not Rule.THERMAL_ZONE]
            return seen

        assisted = run(ASSIST)
        fans_at_ceiling = max(t for t, rule in assisted if rule is Rule.FAN_ASSIST)
        (step_down,) = [t for t, rule in assisted if rule is Rule.POWER_STEP_DOWN]
        assert fans_at_ceiling == 10.0 and step_down == fans_at_ceiling + ASSIST.settle_s + 2
        assert [t for t, rule in run(FanPolicy()) if rule is Rule.POWER_STEP_DOWN] == [2.0]

    def test_headroom_never_blocks_a_ladder_that_is_not_assisted(self) -> None:
        """A GPU whose fans the actuator gave up on steps down as if there were no fan rule."""
        plan = GpuPlan.build(CARD, GpuPolicy(power=self.POWER, fan=ASSIST))
        state, rules = GpuRuleState(), []
        for t in range(4):
            state, decisions = evaluate_gpu(fan_reading(78.0), plan, state, float(t), fans_blocked=True)
            rules += [d.rule for d in decisions]
        assert Rule.POWER_STEP_DOWN in rules and not any(str(r).startswith("fan") for r in rules)
