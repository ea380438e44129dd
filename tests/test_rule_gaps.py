"""Gaps in the readings: the ladder's debounce and dwell and the fans' settle and follow times count only readings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from governor.config import Config, GpuPolicy, PowerPolicy, SimulationConfig
from governor.core import build_plans
from governor.model import Action
from governor.policy import FanMode, FanPolicy, Rule, ThermalZone
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, evaluate_gpu
from governor.rules.fan import FanPlan, FanState, FanStep, step_fan
from governor.rules.gaps import max_gap_s
from governor.rules.power import LadderState
from governor.trace import device_record, read_trace, sample_record, write_records
from governor.whatif.replay import replay_trace
from tests.helpers import CARD_200W, FAN_CARD, fan_reading, reading

POWER = PowerPolicy(debounce_samples=2, min_change_interval_s=0.0)  # 200 -> 180 W at 75 C x2, up at 65 C for 60 s
HOT_C, COOL_C = 78.0, 60.0
STEPPED_DOWN = GpuRuleState(zone=ThermalZone.OPTIMAL, ladder=LadderState(rung=1, last_change_s=-1000.0))
"""A card on the 180 W rung since long ago: the next step is up, after 60 s of cool readings."""
FANS = FAN_CARD
ASSIST = FanPolicy(mode=FanMode.ASSIST, max_percent=75.0, raise_at_c=70.0, lower_at_c=62.0)


class Card:
    """The 200 W card fed through the engine (:func:`evaluate_gpu`), its enforced limit following every set."""

    def __init__(self, poll_interval_s: float = 1.0, state: GpuRuleState = NEW_STATE) -> None:
        self.plan = GpuPlan.build(CARD_200W, GpuPolicy(power=POWER), poll_interval_s)
        self.state = state
        self.enforced_w = 200.0 if state.ladder.rung is None else self.plan.ladder_w[state.ladder.rung]

    def read(self, t_s: float, temperature_c: float | None) -> list[Rule]:
        """One reading at ``t_s``; the power rules it fired."""
        self.state, decisions = evaluate_gpu(reading(temperature_c, self.enforced_w), self.plan, self.state, t_s)
        for d in decisions:
            if d.action is Action.SET_POWER_LIMIT:
                assert isinstance(d.to_value, float)
                self.enforced_w = d.to_value
        return [d.rule for d in decisions if d.rule.startswith("power")]

    def first_step_up(self, times: range) -> float | None:
        """The first time in ``times`` (one cool reading each) with a step up; None if none."""
        for t in times:
            if Rule.POWER_STEP_UP in self.read(float(t), COOL_C):
                return float(t)
        return None


class TestLadder:
    def test_hot_readings_an_hour_apart_do_not_step_down(self) -> None:
        """Debounce 2: a hot reading, an hour of nothing, a hot reading is one hot reading; the next one steps down."""
        card = Card()
        assert card.read(0.0, HOT_C) == []
        assert card.read(3600.0, HOT_C) == [] and card.state.ladder.hot_samples == 1
        assert card.read(3601.0, HOT_C) == [Rule.POWER_STEP_DOWN]

    def test_a_minute_of_missing_temperatures_restarts_the_hot_run(self) -> None:
        """NVML failing every tick for a minute is a gap too; a few missing readings still hold the run."""
        card = Card()
        card.read(0.0, HOT_C)
        missing = [card.read(float(t), None) for t in range(1, 60)]
        assert missing[0] == [Rule.POWER_HOLD] and not any(missing[1:])
        assert card.read(60.0, HOT_C) == [] and card.state.ladder.hot_samples == 1
        short = Card()
        short.read(0.0, HOT_C)
        for t in range(1, 11):
            short.read(float(t), None)
        assert short.read(11.0, HOT_C) == [Rule.POWER_STEP_DOWN]

    def test_a_cool_run_across_a_gap_waits_the_whole_dwell_again(self) -> None:
        """Cool from t=0 to 10, nothing until t=130 (past the 60 s dwell): the step up waits 60 s from t=130."""
        card = Card(state=STEPPED_DOWN)
        assert card.first_step_up(range(0, 11)) is None
        assert card.read(130.0, COOL_C) == [] and card.state.ladder.cool_since_s == 130.0
        assert card.first_step_up(range(131, 300)) == 190.0

    def test_a_gap_up_to_the_limit_keeps_the_runs_and_past_it_restarts_them(self) -> None:
        """15 s without a reading (the limit at a 1 s poll) or a clock going back keeps both runs; 15.5 s does not."""
        at_limit, past = Card(), Card()
        at_limit.read(0.0, HOT_C)
        past.read(0.0, HOT_C)
        assert at_limit.read(15.0, HOT_C) == [Rule.POWER_STEP_DOWN]
        assert past.read(15.5, HOT_C) == []
        backwards = Card()
        backwards.read(100.0, HOT_C)
        assert backwards.read(50.0, HOT_C) == [Rule.POWER_STEP_DOWN]  # the clock is trusted only forward: no gap
        cool_at_limit, cool_past = Card(state=STEPPED_DOWN), Card(state=STEPPED_DOWN)
        cool_at_limit.read(0.0, COOL_C)
        cool_past.read(0.0, COOL_C)
        cool_at_limit.read(15.0, COOL_C)
        cool_past.read(15.5, COOL_C)
        assert cool_at_limit.state.ladder.cool_since_s == 0.0 and cool_at_limit.first_step_up(range(16, 200)) == 60.0
        assert cool_past.state.ladder.cool_since_s == 15.5 and cool_past.first_step_up(range(16, 200)) == 76.0

    def test_the_limit_scales_with_the_poll_interval(self) -> None:
        """Polling every 10 s, readings 30 s apart (3 polls) are one run, 30.5 s apart are not; at 1 s, 15 s is."""
        assert (max_gap_s(1.0), max_gap_s(5.0), max_gap_s(10.0)) == (15.0, 15.0, 30.0)
        plans = build_plans(Config(poll_interval_s=10.0), [CARD_200W])
        assert plans[CARD_200W.uuid].max_gap_s == 30.0
        slow, slower, fast = Card(poll_interval_s=10.0), Card(poll_interval_s=10.0), Card()
        for card in (slow, slower, fast):
            card.read(0.0, HOT_C)
        assert slow.read(30.0, HOT_C) == [Rule.POWER_STEP_DOWN]
        assert slower.read(30.5, HOT_C) == []
        assert fast.read(30.0, HOT_C) == []

    def test_a_faster_simulated_clock_scales_the_limit(self) -> None:
        """`run --simulate` at time_scale 60 reads once a wall second, 60 simulated seconds apart: that is the
        interval the plans and the units' rule take, so no reading is a gap (before, the ladder never stepped)."""
        config = Config(backend="simulated", simulation=SimulationConfig(time_scale=60.0))
        assert config.reading_interval_s == 60.0
        assert build_plans(config, [CARD_200W])[CARD_200W.uuid].max_gap_s == 180.0
        assert Config(simulation=SimulationConfig(time_scale=60.0)).reading_interval_s == 1.0  # NVML: wall time

    def test_an_idle_cards_steady_tick_keeps_its_state(self) -> None:
        """Only a run that counts remembers its last reading: a cool card on the top rung keeps its state object."""
        card = Card()
        card.read(0.0, COOL_C)
        before = card.state
        assert card.read(1.0, COOL_C) == [] and card.state is before and before.ladder.last_read_s is None
        hot = Card()
        hot.read(0.0, HOT_C)
        assert hot.state.ladder.last_read_s == 0.0


class TestReplay:
    def test_a_trace_recorded_every_20_s_has_no_gap_every_sample(self, tmp_path: Path) -> None:
        """Replay reckons gaps from the trace's own interval: 3 hot samples 20 s apart step down (debounce 3)."""
        records = [device_record(CARD_200W, 20.0, "slow")]
        for k, temperature_c in enumerate((60.0, 78.0, 78.0, 78.0, 60.0)):
            records.append(sample_record(20.0 * k, reading(temperature_c)))
        with open(tmp_path / "slow.jsonl", "w", encoding="utf-8") as handle:
            write_records(handle, records)
        result = replay_trace(read_trace(tmp_path / "slow.jsonl"), Config())
        assert [(d.t_s, d.rule) for d in result.decisions if d.rule.startswith("power")] == [
            (60.0, Rule.POWER_STEP_DOWN)
        ]


class TestFans:
    def assist(self, times: list[float], state: FanState | None = None) -> list[FanStep]:
        """Assist at 72 C at each time from ``state`` (the card's control when None), the fans reading their
        targets (45 % where the card runs them)."""
        plan = FanPlan.build(FANS, ASSIST)
        state = FanState() if state is None else state
        steps = []
        for t in times:
            measured = tuple(dict(state.targets).get(f, 45.0) for f in (0, 1))
            step = step_fan(fan_reading(72.0, (measured[0], measured[1])), plan, ASSIST, state, t)
            state = step.state
            steps.append(step)
        return steps

    def test_the_settle_time_at_the_ceiling_starts_over_after_a_gap(self) -> None:
        """At the ceiling since t=10, nothing read from t=30 to t=200: the ladder is held again until t=260."""
        steps = self.assist([0.0, 5.0, 10.0, 20.0, 30.0, 200.0])
        assert steps[2].state.ceiling_since_s == 10.0 and steps[-1].headroom
        assert steps[-1].state.ceiling_since_s == 200.0
        after = self.assist([float(t) for t in range(210, 280, 10)], steps[-1].state)
        assert [s.headroom for s in after] == [True] * 5 + [False, False]

    def test_the_time_off_target_starts_over_after_a_gap(self) -> None:
        """A fan 15 % off its target at t=1 and t=10, then nothing until t=100: handed back at 130, 30 s later."""
        plan = FanPlan.build(FANS, ASSIST)
        state = step_fan(fan_reading(71.0, (45.0, 45.0)), plan, ASSIST, FanState(), 0.0).state
        policy = replace(ASSIST, step_interval_s=1000.0)  # no further raise in this test
        handed: list[float] = []
        for t in (1.0, 10.0, 100.0, 110.0, 120.0, 130.0):
            step = step_fan(fan_reading(72.0, (40.0, 40.0)), plan, policy, state, t)
            state = step.state
            handed += [d.t_s for d in step.decisions if d.rule is Rule.FAN_NOT_FOLLOWING]
        assert handed == [130.0, 130.0]  # both fans, once

    def test_the_engine_gives_the_fans_the_plans_limit(self) -> None:
        """Polling every 10 s, 25 s without a reading is no gap for the settle time (it is at the 1 s default)."""
        for poll_s, since_s in ((10.0, 10.0), (1.0, 35.0)):
            plan = GpuPlan.build(FANS, GpuPolicy(fan=ASSIST), poll_s)
            state = GpuRuleState()
            for t in (0.0, 5.0, 10.0, 35.0):
                measured = tuple(dict(state.fan.targets).get(f, 45.0) for f in (0, 1))
                state, _ = evaluate_gpu(fan_reading(72.0, (measured[0], measured[1])), plan, state, t)
            assert state.fan.ceiling_since_s == since_s
