"""The power ladder: hands-off start, debounce, dwell, interval, critical, clamping, hold, drift, engine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import pytest

from governor.config import GpuPolicy, PowerPolicy, ThermalPolicy
from governor.model import Action, Decision, GpuHealth, GpuInfo, ThermalZone
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, evaluate, evaluate_gpu
from governor.rules.power import LadderState, clamp_w, effective_ladder, step_power, target_w
from governor.rules.thermal import next_zone
from tests.helpers import CARD_200W, H100, reading, snapshot

Z = ThermalZone
POLICY = (
    PowerPolicy()
)  # ladder 100/90 % (200/180 W on CARD_200W), down at 75 C x3, up at 65 C for 60 s, 30 s between changes
LADDER = effective_ladder(POLICY.ladder_w, CARD_200W)
THREE = (400.0, 300.0, 200.0)
SET_RULES = {"power_step_down", "power_step_up", "power_critical", "power_drift_reapply"}


@dataclass
class Ladder:
    """Feeds readings through step_power, tracking the zone and an enforced limit that follows our sets."""

    policy: PowerPolicy = POLICY
    gpu: GpuInfo = CARD_200W
    enforced_w: float | None = 200.0
    check_drift: bool = True
    state: LadderState = field(default_factory=LadderState)
    zone: ThermalZone = Z.UNKNOWN
    decisions: list[Decision] = field(default_factory=list)

    @property
    def ladder(self) -> tuple[float, ...]:
        """The effective ladder of this GPU."""
        return effective_ladder(self.policy.ladder_w, self.gpu)

    def feed(self, t_s: float, temperature_c: float | None, apply: bool = True) -> list[Decision]:
        """One reading at ``t_s``; returns its decisions and, if ``apply``, enforces any set."""
        zone = next_zone(temperature_c, ThermalPolicy(), self.zone)
        r = reading(temperature_c, self.enforced_w, self.gpu)
        self.state, out = step_power(
            r, self.zone, zone, self.policy, self.ladder, self.state, t_s, check_drift=self.check_drift
        )
        self.zone = zone
        for d in out:
            if apply and d.action is Action.SET_POWER_LIMIT:
                assert isinstance(d.to_value, float)
                self.enforced_w = d.to_value
        self.decisions.extend(out)
        return out

    def series(self, points: Iterable[tuple[float, float | None]]) -> list[Decision]:
        """Feed (t_s, temperature) pairs; returns the decisions they produced."""
        out: list[Decision] = []
        for t, temp in points:
            out.extend(self.feed(t, temp))
        return out

    @property
    def target(self) -> float | None:
        """The governor's current target in watts."""
        return target_w(self.state, self.ladder)


def rules(decisions: Iterable[Decision]) -> list[str]:
    """The rule names of ``decisions`` in order."""
    return [d.rule for d in decisions]


def stepped_down(lad: Ladder, start_s: float = 0.0) -> float:
    """Drive ``lad`` through three hot readings (one step down); returns the time of the step."""
    lad.series([(start_s, 80.0), (start_s + 1, 80.0), (start_s + 2, 80.0)])
    return start_s + 2


class TestLadderShape:
    """clamp_w, effective_ladder and target_w."""

    def test_h100_clamps_180_to_200_and_merges(self) -> None:
        """On a 200-700 W H100 the default 200/180 W ladder becomes a single 200 W rung."""
        assert effective_ladder((200.0, 180.0), H100) == (200.0,)

    def test_rung_above_max_clamped(self) -> None:
        """A rung above the GPU's maximum becomes the maximum."""
        assert effective_ladder((800.0, 600.0), H100) == (700.0, 600.0)

    def test_duplicates_after_clamping_merged(self) -> None:
        """Several rungs clamped to the same value count once, order kept."""
        assert effective_ladder((900.0, 800.0, 500.0, 150.0, 100.0), H100) == (700.0, 500.0, 200.0)

    def test_clamp_single_values(self) -> None:
        """clamp_w keeps a value inside [min, max] and passes it through without facts."""
        assert clamp_w(180.0, H100) == 200.0
        assert clamp_w(750.0, H100) == 700.0
        assert clamp_w(350.0, H100) == 350.0
        assert clamp_w(180.0, None) == 180.0
        assert clamp_w(180.0, GpuInfo(index=0, uuid="u", name="n")) == 180.0

    def test_target_none_while_hands_off(self) -> None:
        """A never-stepped GPU has no target."""
        assert target_w(LadderState(), LADDER) is None

    def test_target_of_rung_beyond_ladder_is_lowest(self) -> None:
        """A rung index past a (shortened) ladder's end means its lowest rung."""
        assert target_w(LadderState(rung=5), (300.0, 250.0)) == 250.0


class TestStepDown:
    """One rung down after debounce_samples consecutive hot readings."""

    def test_hands_off_while_cool(self) -> None:
        """A cool GPU is never touched: no decision and no target, whatever its limit."""
        lad = Ladder(enforced_w=215.0)
        assert lad.series([(float(t), 60.0) for t in range(200)]) == []
        assert lad.state.rung is None
        assert not lad.state.governed

    def test_debounce_needs_consecutive_samples(self) -> None:
        """Two hot readings change nothing; the third steps 200 -> 180 W on a 200 W card."""
        lad = Ladder()
        assert lad.series([(0.0, 75.0), (1.0, 80.0)]) == []
        (d,) = lad.feed(2.0, 76.0)
        assert d.rule == "power_step_down"
        assert d.action is Action.SET_POWER_LIMIT
        assert (d.from_value, d.to_value, d.threshold, d.reading) == (200.0, 180.0, 75.0, 76.0)
        assert lad.target == 180.0

    @pytest.mark.parametrize("between", [74.9, 70.0, 60.0])
    def test_non_hot_sample_resets_debounce(self, between: float) -> None:
        """A reading below step_down_at_c between hot ones restarts the count."""
        lad = Ladder()
        assert lad.series([(0.0, 80.0), (1.0, 80.0), (2.0, between), (3.0, 80.0), (4.0, 80.0)]) == []
        assert rules(lad.feed(5.0, 80.0)) == ["power_step_down"]

    def test_missing_sample_holds_debounce(self) -> None:
        """A missing reading between hot ones neither counts nor restarts the count: the third hot reading steps."""
        lad = Ladder()
        lad.series([(0.0, 80.0), (1.0, 80.0), (2.0, None)])
        assert "power_step_down" not in rules(lad.decisions)
        assert rules(lad.feed(3.0, 80.0)) == ["power_step_down"]

    def test_first_step_lands_below_enforced_limit(self) -> None:
        """On an H100 at 700 W the first step goes to the highest rung below 700 W, not further."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=700.0)
        stepped_down(lad)
        (d,) = [d for d in lad.decisions if d.rule == "power_step_down"]
        assert (d.from_value, d.to_value) == (700.0, 400.0)

    def test_first_step_skips_rungs_at_or_above_enforced(self) -> None:
        """With the enforced limit at 300 W, the first step goes to 200 W, never up to 400 W."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=300.0)
        stepped_down(lad)
        assert lad.target == 200.0

    def test_no_step_when_already_below_every_rung(self) -> None:
        """A GPU already limited below the lowest rung stays hands-off however hot it runs."""
        lad = Ladder(enforced_w=150.0)
        assert lad.series([(float(t), 90.0 - (t % 2)) for t in range(10)]) == []
        assert lad.state.rung is None

    def test_one_rung_at_a_time(self) -> None:
        """Staying hot walks down one rung per debounce run, interval permitting."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE, min_change_interval_s=0.0), gpu=H100, enforced_w=700.0)
        lad.series([(float(t), 80.0) for t in range(9)])
        steps = [(d.from_value, d.to_value) for d in lad.decisions if d.rule == "power_step_down"]
        assert steps == [(700.0, 400.0), (400.0, 300.0), (300.0, 200.0)]
        assert [d.t_s for d in lad.decisions if d.rule == "power_step_down"] == [2.0, 5.0, 8.0]

    def test_min_change_interval_respected(self) -> None:
        """After a step at t=2, the next step down waits until t=32 even while hot throughout."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=700.0)
        lad.series([(float(t), 80.0) for t in range(40)])
        assert [d.t_s for d in lad.decisions if d.rule == "power_step_down"] == [2.0, 32.0]

    def test_lowest_rung_is_the_floor(self) -> None:
        """At the lowest rung, more heat gives no further decision."""
        lad = Ladder(policy=replace(POLICY, min_change_interval_s=0.0))
        lad.series([(float(t), 80.0) for t in range(30)])
        assert rules(lad.decisions) == ["power_step_down"]
        assert lad.target == 180.0


class TestStepUp:
    """One rung up after dwell_s at or below step_up_at_c."""

    def test_step_up_after_dwell(self) -> None:
        """Cool from t=40 steps back up at t=100 (60 s dwell), not at t=99."""
        lad = Ladder()
        stepped_down(lad)
        assert lad.series([(float(t), 60.0) for t in range(40, 100)]) == []
        (d,) = lad.feed(100.0, 60.0)
        assert d.rule == "power_step_up"
        assert (d.from_value, d.to_value, d.threshold) == (180.0, 200.0, 65.0)
        assert lad.target == 200.0

    def test_step_up_threshold_inclusive(self) -> None:
        """A reading of exactly step_up_at_c counts as cool."""
        lad = Ladder()
        stepped_down(lad)
        lad.series([(float(t), 65.0) for t in range(40, 101)])
        assert rules(lad.decisions)[-1] == "power_step_up"

    @pytest.mark.parametrize("warm", [65.1, 74.0, 80.0])
    def test_warm_sample_restarts_dwell(self, warm: float) -> None:
        """A reading above step_up_at_c during the dwell restarts it."""
        lad = Ladder()
        stepped_down(lad)
        lad.series([(float(t), 60.0) for t in range(40, 90)])
        lad.feed(90.0, warm)
        assert lad.series([(float(t), 60.0) for t in range(91, 151)]) == []
        assert rules(lad.feed(151.0, 60.0)) == ["power_step_up"]

    def test_dwell_restarts_after_each_step(self) -> None:
        """Walking up a three-rung ladder needs a full dwell per rung, though the interval is shorter."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE, min_change_interval_s=0.0), gpu=H100, enforced_w=700.0)
        lad.series([(float(t), 80.0) for t in range(9)])  # down to 200 W at t=8
        lad.series([(float(t), 50.0) for t in range(10, 200)])
        ups = [(d.t_s, d.to_value) for d in lad.decisions if d.rule == "power_step_up"]
        assert ups == [(70.0, 300.0), (130.0, 400.0)]

    def test_step_up_respects_min_change_interval(self) -> None:
        """With no dwell, the step up still waits min_change_interval_s after the step down."""
        lad = Ladder(policy=replace(POLICY, dwell_s=0.0))
        at = stepped_down(lad)
        lad.series([(at + dt, 50.0) for dt in range(1, 30)])
        assert "power_step_up" not in rules(lad.decisions)
        assert rules(lad.feed(at + 30, 50.0)) == ["power_step_up"]

    def test_never_above_the_top_rung(self) -> None:
        """Back at the top rung the governor stays there; it never returns to hands-off."""
        lad = Ladder()
        stepped_down(lad)
        lad.series([(float(t), 40.0) for t in range(10, 400)])
        assert rules(lad.decisions) == ["power_step_down", "power_step_up"]
        assert lad.state.rung == 0

    def test_hands_off_cool_gpu_never_steps_up(self) -> None:
        """A GPU the governor never stepped gets no step up however long it stays cool."""
        lad = Ladder(enforced_w=150.0)
        assert lad.series([(float(t), 30.0) for t in range(0, 500, 10)]) == []


class TestCritical:
    """Entering the critical zone drops straight to the lowest rung."""

    def test_jump_ignores_debounce(self) -> None:
        """A first reading at 95 C jumps to the lowest rung in one decision."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=700.0)
        lad.feed(0.0, 60.0)
        (d,) = lad.feed(1.0, 95.0)
        assert d.rule == "power_critical"
        assert d.action is Action.SET_POWER_LIMIT
        assert (d.from_value, d.to_value) == (700.0, 200.0)

    def test_jump_ignores_min_change_interval(self) -> None:
        """A step down at t=2 does not delay a critical jump at t=3."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=700.0)
        stepped_down(lad)
        assert rules(lad.feed(3.0, 96.0)) == ["power_critical"]
        assert lad.target == 200.0

    def test_no_repeat_while_critical(self) -> None:
        """Staying critical gives no further decision."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=700.0)
        lad.series([(0.0, 96.0), (1.0, 97.0), (2.0, 99.0), (40.0, 99.0)])
        assert rules(lad.decisions) == ["power_critical"]

    def test_no_decision_when_already_lowest(self) -> None:
        """Entering critical at the lowest rung already gives no power decision."""
        lad = Ladder()
        stepped_down(lad)
        assert lad.feed(3.0, 96.0) == []

    def test_never_raises_an_external_lower_limit(self) -> None:
        """Entering critical with the enforced limit already below the lowest rung does not raise it."""
        lad = Ladder(enforced_w=150.0)
        out = lad.series([(0.0, 60.0), (1.0, 96.0), (2.0, 97.0)])
        assert not [d for d in out if d.action is Action.SET_POWER_LIMIT]


class TestMissingTemperature:
    """A missing temperature holds the limit."""

    def test_one_hold_decision(self) -> None:
        """The first missing reading gives one power_hold and marks holding; repeats stay silent."""
        lad = Ladder()
        stepped_down(lad)
        (d,) = lad.feed(3.0, None)
        assert d.rule == "power_hold"
        assert d.action is Action.NONE
        assert (d.from_value, d.to_value) == (180.0, 180.0)
        assert lad.state.holding
        assert lad.series([(float(t), None) for t in range(4, 200)]) == []
        assert lad.target == 180.0

    def test_hold_when_hands_off_reports_enforced(self) -> None:
        """Holding a never-stepped GPU reports its enforced limit and chooses no target."""
        lad = Ladder(enforced_w=210.0)
        (d,) = lad.feed(0.0, None)
        assert (d.from_value, d.to_value) == (210.0, 210.0)
        assert lad.state.rung is None

    def test_reading_clears_holding(self) -> None:
        """A real reading after a gap ends holding, and a later gap is reported again."""
        lad = Ladder()
        lad.series([(0.0, None), (1.0, 60.0)])
        assert not lad.state.holding
        assert rules(lad.feed(2.0, None)) == ["power_hold"]

    def test_missing_restarts_dwell(self) -> None:
        """A gap in the cool run restarts the dwell: no step up until 60 s of real cool readings."""
        lad = Ladder()
        stepped_down(lad)
        lad.series([(float(t), 60.0) for t in range(40, 95)])
        lad.feed(95.0, None)
        lad.series([(float(t), 60.0) for t in range(96, 156)])
        assert "power_step_up" not in rules(lad.decisions)
        assert rules(lad.feed(156.0, 60.0)) == ["power_step_up"]


class TestDrift:
    """The enforced limit drifting away from the target."""

    def governed(self, check_drift: bool = True) -> Ladder:
        """A 200 W card stepped down to 180 W."""
        lad = Ladder(check_drift=check_drift)
        stepped_down(lad)
        return lad

    def test_higher_enforced_reapplied_once_per_drift(self) -> None:
        """An enforced limit above target gives one power_drift_reapply, not one per tick."""
        lad = self.governed()
        lad.enforced_w = 250.0
        (d,) = lad.feed(10.0, 70.0, apply=False)
        assert d.rule == "power_drift_reapply"
        assert d.action is Action.SET_POWER_LIMIT
        assert (d.from_value, d.to_value) == (250.0, 180.0)
        assert lad.series([(float(t), 70.0) for t in range(11, 20)]) == []

    def test_new_drift_after_recovery_reapplied_again(self) -> None:
        """After the limit came back, a second drift is re-applied again."""
        lad = self.governed()
        lad.enforced_w = 250.0
        lad.feed(10.0, 70.0)  # re-applied: enforced back at 180
        assert lad.feed(11.0, 70.0) == []
        lad.enforced_w = 240.0
        assert rules(lad.feed(12.0, 70.0)) == ["power_drift_reapply"]

    def test_lower_enforced_reported_once_never_fought(self) -> None:
        """An enforced limit below target is reported once as external and never re-applied."""
        lad = self.governed()
        lad.enforced_w = 150.0
        (d,) = lad.feed(10.0, 70.0)
        assert d.rule == "power_drift_external_lower"
        assert d.action is Action.NONE
        assert (d.from_value, d.to_value) == (150.0, 180.0)
        assert lad.series([(float(t), 70.0) for t in range(11, 100)]) == []
        assert lad.enforced_w == 150.0

    def test_step_down_never_raises_an_external_lower_limit(self) -> None:
        """A step down while another tool holds the limit below the next rung does not raise it."""
        lad = Ladder(policy=replace(POLICY, ladder_w=THREE), gpu=H100, enforced_w=700.0)
        stepped_down(lad)  # target 400 W
        lad.enforced_w = 250.0
        lad.series([(float(t), 80.0) for t in range(10, 60)])
        assert lad.enforced_w == 250.0
        assert not [d for d in lad.decisions[1:] if d.action is Action.SET_POWER_LIMIT]

    def test_within_tolerance_is_no_drift(self) -> None:
        """An enforced limit within 1 W of the target is not drift."""
        lad = self.governed()
        lad.enforced_w = 180.9
        assert lad.feed(10.0, 70.0) == []

    def test_drift_check_off(self) -> None:
        """With check_drift=False (dry-run) drift is neither re-applied nor reported."""
        lad = self.governed(check_drift=False)
        for enforced in (250.0, 150.0):
            lad.enforced_w = enforced
            assert lad.feed(10.0, 70.0) == []

    def test_hands_off_has_no_drift(self) -> None:
        """A GPU without a target has nothing to drift from."""
        lad = Ladder(enforced_w=333.0)
        assert lad.feed(0.0, 70.0) == []


class TestDisabled:
    """power.enabled = false."""

    def test_no_decisions(self) -> None:
        """A disabled ladder decides nothing, hot, critical or missing."""
        lad = Ladder(policy=replace(POLICY, enabled=False))
        assert lad.series([(0.0, 80.0), (1.0, 80.0), (2.0, 80.0), (3.0, 99.0), (4.0, None)]) == []


def plan(gpu: GpuInfo = CARD_200W, power: PowerPolicy = POLICY) -> GpuPlan:
    """A plan for ``gpu`` with default thermal policy."""
    return GpuPlan.build(gpu, GpuPolicy(power=power))


class TestEngine:
    """evaluate(): thermal then power for every GPU of a snapshot."""

    def run(self, points: Iterable[tuple[float, float]], enforced_w: float = 200.0) -> list[Decision]:
        """Evaluate a series for the 200 W card, enforcing every set; returns all decisions."""
        plans = {CARD_200W.uuid: plan()}
        states: dict[str, GpuRuleState] = {}
        out: list[Decision] = []
        for t, temp in points:
            states, decisions = evaluate(snapshot(t, [reading(temp, enforced_w)]), plans, states)
            for d in decisions:
                if d.action is Action.SET_POWER_LIMIT:
                    assert isinstance(d.to_value, float)
                    enforced_w = d.to_value
            out.extend(decisions)
        return out

    def test_classic_200w_card(self) -> None:
        """Rising past 75 C steps 200 -> 180 W; after 60 s at <= 65 C it returns to 200 W; nothing else."""
        rising = [(float(t), 60.0 + t) for t in range(20)]  # 60..79 C
        hot = [(float(t), 78.0) for t in range(20, 60)]
        cooling = [(float(t), 64.0) for t in range(60, 200)]
        sets = [d for d in self.run(rising + hot + cooling) if d.action is Action.SET_POWER_LIMIT]
        assert [(d.rule, d.from_value, d.to_value) for d in sets] == [
            ("power_step_down", 200.0, 180.0),
            ("power_step_up", 180.0, 200.0),
        ]
        assert sets[0].t_s == 17.0  # 75, 76, 77 C at t=15, 16, 17
        assert sets[1].t_s == 120.0  # cool from t=60, dwell 60 s

    def test_noisy_series_does_not_flap(self) -> None:
        """A noisy series around 70 C between long hot and cool phases gives exactly one step each way."""
        noise = [0.0, 4.9, -4.0, 5.5, -5.5, 2.0, -3.0, 6.0, -6.0, 1.0]
        hot = [(float(t), 79.0 + noise[t % 10]) for t in range(0, 100)]  # 73.0 .. 85.0 C
        middle = [(float(t), 70.0 + noise[t % 10]) for t in range(100, 300)]  # 64.0 .. 76.0 C, never 3 in a row >= 75
        cool = [(float(t), 58.0 + noise[t % 10]) for t in range(300, 500)]  # 52 .. 64 C
        sets = [d.rule for d in self.run(hot + middle + cool) if d.action is Action.SET_POWER_LIMIT]
        assert sets == ["power_step_down", "power_step_up"]

    def test_lost_gpu_gets_no_power_decision(self) -> None:
        """A LOST GPU gets only its zone change; its ladder state is kept untouched."""
        ladder = LadderState(rung=1, last_change_s=0.0)
        states = {CARD_200W.uuid: GpuRuleState(zone=Z.HOT, ladder=ladder)}
        lost = reading(None, None, health=GpuHealth.LOST)
        new, decisions = evaluate(snapshot(100.0, [lost]), {CARD_200W.uuid: plan()}, states)
        assert rules(decisions) == ["thermal_zone"]
        assert new[CARD_200W.uuid] == GpuRuleState(zone=Z.UNKNOWN, ladder=ladder, last_known_zone=Z.HOT)

    def test_lost_gpu_with_stale_hot_reading(self) -> None:
        """Even with a hot temperature, a LOST GPU gets no power decision."""
        states = {CARD_200W.uuid: GpuRuleState(zone=Z.HOT, ladder=LadderState(hot_samples=5))}
        lost = reading(99.0, 200.0, health=GpuHealth.LOST)
        _, decisions = evaluate(snapshot(1.0, [lost]), {CARD_200W.uuid: plan()}, states)
        assert all(d.rule == "thermal_zone" for d in decisions)

    def test_dry_run_skips_drift(self) -> None:
        """evaluate(dry_run=True) reports no drift for a governed GPU whose limit never moved."""
        states = {CARD_200W.uuid: GpuRuleState(zone=Z.WARNING, ladder=LadderState(rung=1, last_change_s=0.0))}
        snap = snapshot(5.0, [reading(72.0, 200.0)])
        _, wet = evaluate(snap, {CARD_200W.uuid: plan()}, states)
        _, dry = evaluate(snap, {CARD_200W.uuid: plan()}, states, dry_run=True)
        assert rules(wet) == ["power_drift_reapply"]
        assert dry == []

    def test_gpu_without_plan_skipped_and_states_kept(self) -> None:
        """A GPU with no plan gets no decision; states of GPUs absent from the snapshot are kept."""
        other = GpuRuleState(zone=Z.HOT)
        states = {"GPU-gone": other}
        new, decisions = evaluate(snapshot(0.0, [reading(99.0)]), {}, states)
        assert decisions == []
        assert new == {"GPU-gone": other}

    def test_gpus_are_independent(self) -> None:
        """Each GPU steps on its own readings and its own clamped ladder."""
        plans = {CARD_200W.uuid: plan(), H100.uuid: plan(H100)}
        states: dict[str, GpuRuleState] = {}
        out: list[Decision] = []
        for t in range(3):
            snap = snapshot(float(t), [reading(80.0, 200.0), reading(50.0, 700.0, H100)])
            states, decisions = evaluate(snap, plans, states)
            out.extend(decisions)
        power = [d for d in out if d.rule.startswith("power")]
        assert [(d.gpu_uuid, d.to_value) for d in power] == [(CARD_200W.uuid, 180.0)]
        assert states[H100.uuid].ladder.rung is None

    def test_plan_clamps_ladder(self) -> None:
        """GpuPlan.build resolves percent rungs against the default limit, watts against the range."""
        assert plan(H100).ladder_w == (700.0, 630.0)
        assert plan(H100, replace(POLICY, ladder_w=(200.0, 180.0))).ladder_w == (200.0,)

    def test_evaluate_gpu_passes_previous_zone(self) -> None:
        """Entering critical via evaluate_gpu uses the stored zone as previous and jumps to the floor."""
        p = plan(H100, replace(POLICY, ladder_w=THREE))
        state = GpuRuleState(zone=Z.THROTTLE)
        new, decisions = evaluate_gpu(reading(95.0, 700.0, H100), p, state, 1.0)
        assert rules(decisions) == ["thermal_zone", "power_critical"]
        assert new.zone is Z.CRITICAL
        assert target_w(new.ladder, p.ladder_w) == 200.0

    def test_steady_tick_keeps_the_state_itself(self) -> None:
        """A tick on which no rule changes anything returns the rule state itself; one that changes it, a new one."""
        p = plan()
        state, _ = evaluate_gpu(reading(50.0), p, NEW_STATE, 1.0)  # first reading: zone unknown -> optimal
        assert state is not NEW_STATE and state.zone is Z.OPTIMAL
        steady, decisions = evaluate_gpu(reading(50.0), p, state, 2.0)
        assert decisions == [] and steady is state
        hot, _ = evaluate_gpu(reading(80.0), p, state, 3.0)
        assert hot is not state and hot.ladder.hot_samples == 1
        assert GpuRuleState() == NEW_STATE  # the shared first state is never changed in place
