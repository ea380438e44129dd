"""Adversarial review of target mode (governor.rules.target, its fit governor.rules.fit, their wiring in the
engine and the carry-over on reload): clocks that jump, readings that go missing or are absurd, ranges that
change, drivers that round and limits set by someone else."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest

from governor.carryover import carry_over
from governor.model import Action, Decision, GpuInfo, GpuReading
from governor.policy import GpuPolicy, PowerPolicy, Rule, ThermalPolicy, ThermalZone
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, evaluate_gpu, wanted_w
from governor.rules.fit import MAX_GAP_S, FitState, observe
from governor.rules.target import TargetState
from governor.sim.thermal import ThermalParams, ThermalState
from tests.helpers import H100
from tests.target_plant import CARD, RTX4070, TARGET

Z = ThermalZone
H100_PLANT = ThermalParams(r_die_c_per_w=0.02, c_die_j_per_c=75.0, r_sink_c_per_w=0.06, c_sink_j_per_c=1000.0)
"""An H100-sized heatsink: 0.08 C/W, 60 s; 700 W in a 30 C room settles at 86 C."""
SAME = object()
"""A reading field left as the plant and the card give it."""


def plan_for(gpu: GpuInfo = CARD, power: PowerPolicy = TARGET, thermal: ThermalPolicy | None = None) -> GpuPlan:
    """The plan the engine builds for ``gpu`` under ``power`` and ``thermal``."""
    return GpuPlan.build(gpu, GpuPolicy(thermal=thermal or ThermalPolicy(), power=power))


@dataclass
class Card:
    """One GPU in target mode driven through the engine (zones, reading checks, drift) a reading a second: a
    two-node plant drawing ``min(demand, enforced limit)``, whole-degree readings, and an enforced limit that
    follows every limit set as the driver stores it (clamped to the range, rounded to ``driver_step_w``)."""

    plan: GpuPlan
    enforced_w: float | None
    params: ThermalParams = RTX4070
    room_c: float = 30.0
    demand_w: float = 210.0
    driver_step_w: float = 0.0
    t_s: float = 0.0
    state: GpuRuleState = NEW_STATE
    decisions: list[Decision] = field(default_factory=list)
    temperatures_c: list[float] = field(default_factory=list)
    writes_w: list[float] = field(default_factory=list)
    plant: ThermalState | None = None

    def __post_init__(self) -> None:
        if self.plant is None:
            self.plant = ThermalState.at_steady_state(self.params, 1.0, 12.0, self.room_c)

    def tick(
        self, *, temperature_c: object = SAME, power_w: object = SAME, limit_w: object = SAME, gap_s: float = 0.0
    ) -> list[Decision]:
        """One second of the plant, then one reading ``gap_s`` seconds later than that; returns its decisions."""
        assert self.plant is not None
        enforced = self.enforced_w if self.enforced_w is not None else math.inf
        draw_w = max(12.0, min(self.demand_w, enforced))
        die_c = self.plant.step(draw_w, self.room_c)
        self.temperatures_c.append(die_c)
        self.t_s += 1.0 + gap_s
        info = self.plan.info
        now = GpuReading(
            index=info.index,
            uuid=info.uuid,
            temperature_c=float(round(die_c)) if temperature_c is SAME else temperature_c,  # type: ignore[arg-type]
            power_w=draw_w if power_w is SAME else power_w,  # type: ignore[arg-type]
            power_limit_w=self.enforced_w if limit_w is SAME else limit_w,  # type: ignore[arg-type]
            clock_event_reasons=0x4 if self.demand_w > enforced else 0,
        )
        self.state, out = evaluate_gpu(now, self.plan, self.state, self.t_s)
        for decision in out:
            if decision.action is Action.SET_POWER_LIMIT and decision.to_w is not None:
                low, high = info.power_limit_min_w or 0.0, info.power_limit_max_w or math.inf
                asked = min(max(decision.to_w, low), high)
                step = self.driver_step_w
                self.writes_w.append(asked)
                self.enforced_w = min(max(asked if step == 0 else round(asked / step) * step, low), high)
        self.decisions.extend(out)
        return out

    def run(self, seconds: int, **reading: object) -> list[Decision]:
        """``seconds`` ticks (each reading field given in ``reading`` replaced as in :meth:`tick`)."""
        out: list[Decision] = []
        for _ in range(seconds):
            out += self.tick(**reading)  # type: ignore[arg-type]
        return out

    @property
    def wanted(self) -> float | None:
        """The limit (W) target mode wants in force."""
        return wanted_w(self.state, self.plan)

    @property
    def target(self) -> TargetState:
        """The controller's state."""
        return self.state.target


def settled(card: Card | None = None, seconds: int = 3600) -> Card:
    """``card`` (a 200 W card under a load above its limit in a 30 C room by default) after ``seconds``: the
    controller has lowered the limit and holds the die inside the deadband."""
    card = card or Card(plan_for(), enforced_w=200.0)
    card.run(seconds)
    assert card.target.governed and card.target.fit.ready
    return card


def power_rules(decisions: list[Decision]) -> list[Rule]:
    """The power rules among ``decisions``, in order."""
    return [d.rule for d in decisions if d.rule is not Rule.THERMAL_ZONE]


def changes(decisions: list[Decision]) -> list[Decision]:
    """The limit changes among ``decisions``."""
    return [d for d in decisions if d.action is Action.SET_POWER_LIMIT]


# ----------------------------------------------------------------------------- the critical zone


class TestCriticalZone:
    def test_critical_without_a_power_reading_goes_to_the_floor(self) -> None:
        """A card that reports no power draw (NotSupported) still goes to the floor when it enters the critical
        zone: the jump needs the temperature only."""
        card = Card(plan_for(), enforced_w=200.0)
        card.run(60, power_w=None)
        card.room_c = 80.0
        out = card.run(600, power_w=None)
        assert Rule.POWER_CRITICAL in power_rules(out)
        assert card.enforced_w == 100.0

    def test_still_critical_above_the_floor_goes_to_the_floor(self) -> None:
        """A GPU still in the critical zone whose limit is above the floor (its drop was refused and undone) goes
        to the floor on the next critical reading, without waiting out the minimum interval."""
        card = settled()
        limit = card.target.limit_w
        assert limit is not None and limit > 100.0
        target = replace(card.target, last_change_s=card.t_s, changed_at_c=97.0)
        card.state = replace(card.state, zone=Z.CRITICAL, target=target)
        out = card.tick(temperature_c=97.0)
        assert power_rules(out) == [Rule.POWER_CRITICAL]
        assert card.wanted == 100.0

    def test_critical_drop_held_by_a_lower_outside_limit_follows_once_it_is_lifted(self) -> None:
        """Entering critical under another tool's limit below the floor changes nothing; once that limit is lifted
        while the card is still critical, the limit goes straight to the floor."""
        card = settled(Card(plan_for(power=replace(TARGET, floor_w="60%")), enforced_w=200.0), 600)
        card.enforced_w = 110.0  # another tool, under the 120 W floor
        card.room_c = 90.0
        card.run(120)
        assert card.state.zone is Z.CRITICAL
        assert Rule.POWER_CRITICAL not in power_rules(card.decisions)
        card.enforced_w = 200.0  # the other tool lets go
        out = card.tick()
        assert power_rules(out) == [Rule.POWER_CRITICAL]
        assert card.enforced_w == 120.0

    def test_no_raise_while_the_zone_is_still_critical(self) -> None:
        """With a wide hysteresis the critical zone outlasts the raise threshold: no raise while the card is still
        critical, and so no drop back to the floor either (no flapping)."""
        thermal = ThermalPolicy(warning_c=60.0, hot_c=70.0, throttle_c=75.0, critical_c=82.0, hysteresis_c=20.0)
        card = Card(plan_for(power=replace(TARGET, target_c=78.0), thermal=thermal), enforced_w=200.0)
        card.room_c = 75.0
        card.run(600)
        assert card.state.zone is Z.CRITICAL and card.enforced_w == 100.0
        card.room_c = 40.0  # 100 W settles at 66 C
        out = card.run(1800)
        assert card.state.zone is Z.CRITICAL  # below 78 - 3 C, not below 82 - 20 C
        assert max(card.temperatures_c[-600:]) < 75.0
        assert power_rules(out) == []
        assert card.enforced_w == 100.0


# ----------------------------------------------------------------------------- the snapshot clock


class TestClock:
    def test_a_clock_gone_back_an_hour_does_not_hold_a_lowering(self) -> None:
        """After the snapshot clock jumps back an hour, a die reading the target (no hotter than at the last change)
        is lowered after one minimum interval, not once the clock has caught up: the last change counts as now."""
        card = settled()
        card.state = replace(card.state, target=replace(card.target, last_change_s=card.t_s, changed_at_c=77.0))
        card.t_s -= 3600.0
        card.room_c = 32.0  # 168 W now settles at 75.7 C
        start = card.t_s
        out = changes(card.run(1200))
        assert out and out[0].rule is Rule.POWER_TARGET_DOWN
        assert out[0].t_s - start <= TARGET.min_change_interval_s + 60.0
        assert max(card.temperatures_c[-300:]) < 75.0

    @pytest.mark.parametrize("back_s", [3600.0, 86400.0])
    def test_a_clock_gone_back_does_not_hold_raises_past_an_hour(self, back_s: float) -> None:
        """After the clock jumps back (an hour, a day), a room that cools gets its raise within an hour and a
        few minutes: changes stamped after now count as made now, not for as long as the clock takes to catch
        up."""
        card = settled()
        card.t_s -= back_s
        card.room_c = 24.0
        start = card.t_s
        out = changes(card.run(4200))
        ups = [d for d in out if d.rule is Rule.POWER_TARGET_UP]
        assert ups and ups[0].t_s - start <= 3600.0 + 600.0
        assert all(c <= card.t_s for c in card.target.changes_s)

    def test_a_suspend_is_no_dwell(self) -> None:
        """A run of headroom under way before the host sleeps for ten hours does not raise the limit at the first
        reading after: the dwell counts readings, not the time nobody looked."""
        card = settled()
        card.room_c = 24.0
        for _ in range(600):
            card.tick()
            if card.target.headroom_since_s is not None:
                break
        assert card.target.headroom_since_s is not None
        card.run(5)
        out = card.tick(gap_s=36000.0)
        assert power_rules(out) == []
        ups = [d for d in card.run(600) if d.rule is Rule.POWER_TARGET_UP]
        assert ups and ups[0].t_s - (card.t_s - 600) >= TARGET.dwell_s


# ----------------------------------------------------------------------------- gaps and missing readings


class TestGaps:
    @pytest.mark.parametrize("how", ["gap", "missing temperature", "missing power", "clock back"])
    def test_a_gap_does_not_poison_the_fit(self, how: str) -> None:
        """Twenty seconds without a reading (a stalled tick, a sensor gone for a while, a clock reset) in a steady
        load change no limit afterwards: the fit starts afresh without the last start's transient, so its room
        stays where it was instead of jumping to the top of its range."""
        card = settled()
        limit, room = card.wanted, card.target.fit.params
        assert room is not None
        if how == "gap":
            card.tick(gap_s=20.0)
        elif how == "clock back":
            card.t_s -= 3600.0
        elif how == "missing temperature":
            card.run(20, temperature_c=None)
        else:
            card.run(20, power_w=None)
        out = card.run(1800)
        assert changes(out) == []
        assert card.wanted == limit
        fitted = card.target.fit.params
        assert fitted is not None and abs(fitted.ambient_c - room.ambient_c) < 2.0

    def test_a_gap_keeps_what_the_fit_learnt(self) -> None:
        """After a gap the fit starts from the model it had learnt: a minute later its rise per watt is within 5 %
        of it and its room within 1.5 C."""
        fit, block = FitState(), None
        plant = ThermalState.at_steady_state(RTX4070, 1.0, 12.0, 30.0)
        t_s = 0.0
        for demand in (200.0, 60.0, 200.0):
            for _ in range(600):
                t_s += 1.0
                fit, block = observe(fit, block, t_s, float(round(plant.step(demand, 30.0))), demand, 200.0)
        before = fit.params
        t_s += 4 * MAX_GAP_S
        for _ in range(60):
            t_s += 1.0
            fit, block = observe(fit, block, t_s, float(round(plant.step(200.0, 30.0))), 200.0, 200.0)
        after = fit.params
        assert before is not None and after is not None
        assert abs(after.r_total_c_per_w - before.r_total_c_per_w) <= 0.05 * before.r_total_c_per_w
        assert abs(after.ambient_c - before.ambient_c) < 1.5

    def test_an_intermittent_sensor_still_lowers(self) -> None:
        """A card whose temperature is missing every other tick still lowers its limit when the room warms, and
        its die never passes the target by more than a degree."""
        card = settled()
        card.room_c = 36.0
        out: list[Decision] = []
        for i in range(1800):
            out += card.tick(temperature_c=None if i % 2 else SAME)
        assert Rule.POWER_TARGET_DOWN in power_rules(out)
        assert card.wanted is not None and card.wanted < 160.0
        assert max(card.temperatures_c[-1200:]) < 76.0

    def test_missing_readings_change_no_limit(self) -> None:
        """A governed card whose temperature and power go missing for ten minutes changes no limit meanwhile,
        even in a room that warms: one hold decision."""
        card = settled()
        limit = card.enforced_w
        card.room_c = 40.0
        out = card.run(600, temperature_c=None, power_w=None)
        assert power_rules(out) == [Rule.POWER_HOLD]
        assert card.enforced_w == limit


# ----------------------------------------------------------------------------- hostile readings


class TestHostileReadings:
    @pytest.mark.parametrize("power_w", [math.nan, math.inf, -50.0, 1e200])
    def test_an_absurd_power_reading_is_missing(self, power_w: float) -> None:
        """A power draw no card gives (NaN, infinite, negative, 1e200 W) is a missing reading: a hold, no change,
        and nothing of it in the fit (whose sums stay finite)."""
        card = settled()
        before = card.target.fit
        out = card.tick(power_w=power_w)
        assert power_rules(out) == [Rule.POWER_HOLD]
        assert card.target.fit == before
        card.run(600)
        assert all(math.isfinite(s) for s in card.target.fit.sums)

    def test_an_absurd_power_reading_does_not_freeze_the_fit(self) -> None:
        """After one reading of 1e200 W the fit still follows the room: its room moves with a room 8 C warmer."""
        card = settled()
        card.tick(power_w=1e200)
        room = card.target.fit.params
        card.room_c = 38.0
        card.run(3600)
        later = card.target.fit.params
        assert room is not None and later is not None and later.ambient_c > room.ambient_c + 4.0

    @pytest.mark.parametrize("limit_w", [0.0, -5.0, math.nan])
    def test_an_absurd_enforced_limit_does_not_block_the_critical_drop(self, limit_w: float) -> None:
        """An enforced limit read as 0 W, negative or NaN is a missing one: it is no lower limit set by someone
        else, so a room that heats the card past the critical zone still takes its limit down to the floor (and
        nothing is reported as drift)."""
        card = settled(seconds=600)
        card.room_c = 80.0
        out = card.run(600, limit_w=limit_w)
        assert Rule.POWER_TARGET_DOWN in power_rules(out)
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER not in power_rules(out)
        assert card.enforced_w == 100.0

    @pytest.mark.parametrize("temperature_c", [math.nan, math.inf, -40.0, 0.0, 255.0])
    def test_an_absurd_temperature_holds(self, temperature_c: float) -> None:
        """A temperature no sensor reads holds the limit (one hold decision) and leaves the fit as it was."""
        card = settled()
        before = card.target.fit
        out = card.run(30, temperature_c=temperature_c)
        assert power_rules(out) == [Rule.POWER_HOLD]
        assert card.target.fit == before

    def test_a_constant_temperature_leaves_the_prior(self) -> None:
        """Ten hours of one temperature at one power leave the fit finite at its prior, and a load step after
        them is learnt: the rise per watt comes within 10 % of the plant's."""
        fit, block = FitState(), None
        for t in range(36000):
            fit, block = observe(fit, block, float(t), 60.0, 150.0, 200.0)
        model, prior = fit.params, fit.prior
        assert fit.ready and model is not None and prior is not None and all(math.isfinite(s) for s in fit.sums)
        assert math.isclose(model.r_total_c_per_w, prior.r_total_c_per_w) and math.isclose(model.tau_s, prior.tau_s)
        assert math.isclose(model.ambient_c, prior.ambient_c)
        plant = ThermalState.at_steady_state(RTX4070, 1.0, 150.0, 60.0 - 150.0 * RTX4070.r_total_c_per_w)
        room = 60.0 - 150.0 * RTX4070.r_total_c_per_w
        t_s = 36000.0
        for demand in (60.0, 200.0, 100.0):
            for _ in range(600):
                t_s += 1.0
                fit, block = observe(fit, block, t_s, float(round(plant.step(demand, room))), demand, 200.0)
        assert fit.params is not None
        assert abs(fit.params.r_total_c_per_w - RTX4070.r_total_c_per_w) <= 0.1 * RTX4070.r_total_c_per_w


# ----------------------------------------------------------------------------- ranges


class TestRanges:
    def test_a_range_that_narrows_under_the_limit_clamps_it(self) -> None:
        """A card whose maximum drops below the limit target mode set wants the new maximum, and its enforced limit
        there is not reported as set by someone else."""
        card = settled()
        assert card.wanted is not None and card.wanted > 160.0
        narrow = replace(CARD, power_limit_max_w=160.0, power_limit_default_w=160.0)
        card.plan = plan_for(narrow)
        card.enforced_w = 160.0
        out = card.run(600)
        assert card.wanted is not None and card.wanted <= 160.0
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER not in power_rules(out)

    def test_a_floor_that_rises_above_the_limit_clamps_it(self) -> None:
        """A card whose minimum rises above the limit target mode set wants the new minimum, and never asks for a
        limit below it."""
        card = settled()
        assert card.wanted is not None and card.wanted < 175.0
        card.plan = plan_for(replace(CARD, power_limit_min_w=175.0))
        card.enforced_w = 175.0
        out = card.run(600)
        assert card.wanted == 175.0
        assert [d for d in out if d.to_w is not None and d.to_w < 175.0 and d.action is Action.SET_POWER_LIMIT] == []
        assert Rule.POWER_DRIFT_REAPPLY not in power_rules(out)

    def test_a_range_that_narrows_under_a_rounded_limit_forgets_it(self) -> None:
        """On a driver that rounds, a maximum that drops below the limit it stored leaves no trace of that stored
        limit: the new maximum in force is no limit set by someone else."""
        card = Card(plan_for(H100), enforced_w=700.0, params=H100_PLANT, demand_w=750.0, driver_step_w=50.0)
        card.run(1800)
        assert card.target.granted_w is not None and card.target.granted_w > 500.0
        card.plan = plan_for(replace(H100, power_limit_max_w=500.0, power_limit_default_w=500.0))
        card.enforced_w = 500.0
        out = card.run(600)
        assert card.wanted is not None and card.wanted <= 500.0
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER not in power_rules(out)

    def test_a_fixed_limit_card_never_moves(self) -> None:
        """A card whose minimum limit equals its maximum gets no limit change, hot, critical or cool."""
        fixed = replace(CARD, power_limit_min_w=150.0, power_limit_max_w=150.0, power_limit_default_w=150.0)
        card = Card(plan_for(fixed), enforced_w=150.0, room_c=40.0)
        card.run(1800)
        card.room_c = 90.0
        card.run(600)
        card.room_c = 20.0
        card.run(1800)
        assert [d for d in changes(card.decisions) if d.to_w != d.from_w] == []
        assert card.enforced_w == 150.0


# ----------------------------------------------------------------------------- driver rounding


class TestDriverRounding:
    @pytest.mark.parametrize("step_w", [50.0, 30.0, 25.0, 10.0])
    def test_a_rounded_limit_is_no_drift(self, step_w: float) -> None:
        """An H100 whose driver stores limits rounded to a coarser step than asked gives neither a re-apply nor a
        report of a limit 'set outside the governor', through lowerings and raises, and its limit is written
        at most once a minimum interval."""
        card = Card(plan_for(H100), enforced_w=700.0, params=H100_PLANT, demand_w=750.0, driver_step_w=step_w)
        card.run(3600)
        card.room_c = 22.0
        card.run(3600)
        card.room_c = 34.0
        card.run(3600)
        rules = power_rules(card.decisions)
        assert Rule.POWER_TARGET_DOWN in rules and Rule.POWER_TARGET_UP in rules
        assert Rule.POWER_DRIFT_REAPPLY not in rules
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER not in rules
        assert len(card.writes_w) <= 3 * 3600 / TARGET.min_change_interval_s

    def test_a_real_drift_after_rounding_is_still_handled(self) -> None:
        """After a rounded change, another tool raising the limit is re-applied once and one lowering it is reported
        once."""
        card = Card(plan_for(H100), enforced_w=700.0, params=H100_PLANT, demand_w=750.0, driver_step_w=50.0)
        card.run(1800)
        ours = card.enforced_w
        assert ours is not None and ours < 700.0
        card.demand_w = ours - 10.0  # a lighter load: the other tool's limit does not heat the die
        card.run(60)
        card.enforced_w = 700.0
        out = card.run(3)
        assert power_rules(out) == [Rule.POWER_DRIFT_REAPPLY] and card.enforced_w == ours
        card.enforced_w = 300.0
        assert power_rules(card.run(3)) == [Rule.POWER_DRIFT_EXTERNAL_LOWER]


# ----------------------------------------------------------------------------- limits set by someone else


class TestOutsideLimits:
    def test_no_raise_over_a_lower_outside_limit(self) -> None:
        """Another tool's limit below target mode's is left alone: a room that cools brings no raise, which would
        write over it, until that tool lets go."""
        card = settled()
        card.enforced_w = 140.0
        card.room_c = 24.0
        out = card.run(3600)
        assert power_rules(out) == [Rule.POWER_DRIFT_EXTERNAL_LOWER]
        assert card.enforced_w == 140.0

    def test_a_tool_that_keeps_raising_the_limit_is_fought_once(self) -> None:
        """Another tool that puts the default limit back every tick gets at most one re-apply per limit target mode
        sets (not a write every tick), and the die's heat is still answered by lowerings."""
        card = settled()
        writes = len(card.writes_w)
        card.room_c = 33.0
        out: list[Decision] = []
        for _ in range(1800):
            card.enforced_w = 200.0
            out += card.tick()
        reapplies = [d for d in out if d.rule is Rule.POWER_DRIFT_REAPPLY]
        lowerings = [d for d in out if d.rule is Rule.POWER_TARGET_DOWN]
        assert lowerings and 1 <= len(reapplies) <= len(lowerings) + 1
        assert len(card.writes_w) - writes == len(reapplies) + len(lowerings)
        assert len(card.writes_w) - writes <= 2 * (1 + 1800 / TARGET.min_change_interval_s)


# ----------------------------------------------------------------------------- reload


class TestReload:
    def test_a_reload_onto_a_higher_floor_under_a_rounding_driver_is_no_drift(self) -> None:
        """A reload that raises target mode's floor above its limit on a driver that rounds sets the new floor once;
        the limit the driver stores for it is no drift."""
        card = Card(plan_for(H100), enforced_w=700.0, params=H100_PLANT, demand_w=750.0, driver_step_w=50.0)
        card.run(1800)
        limit = card.wanted
        assert limit is not None and limit < 630.0
        new = plan_for(H100, replace(TARGET, floor_w=630.0))
        states, reclamps = carry_over({H100.uuid: card.state}, {H100.uuid: card.plan}, {H100.uuid: new}, {})
        card.plan, card.state = new, states[H100.uuid]
        assert reclamps[H100.uuid].to_w == 630.0
        card.enforced_w = 650.0  # 630 W as the driver stores it
        out = card.run(60)
        assert Rule.POWER_DRIFT_REAPPLY not in power_rules(out)
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER not in power_rules(out)

    def test_a_reload_onto_a_shorter_ladder_under_a_rounding_driver_is_no_drift(self) -> None:
        """A ladder held on a rounded rung (630 W stored as 650 W) that a reload moves to a new rung (600 W, stored
        as 600 W) reports no limit 'set outside the governor'."""
        ladder = PowerPolicy(ladder_w=("100%", "90%", "80%"))
        old = plan_for(H100, ladder)
        state = GpuRuleState()
        enforced = 700.0
        t_s = 0.0
        for temperature in (80.0, 80.0, 80.0, 72.0):
            t_s += 1.0
            state, out = evaluate_gpu(
                GpuReading(H100.index, H100.uuid, temperature_c=temperature, power_limit_w=enforced), old, state, t_s
            )
            enforced = 650.0 if changes(out) else enforced
        assert state.ladder.granted_w == 650.0
        new = plan_for(H100, PowerPolicy(ladder_w=(700.0, 600.0)))
        states, reclamps = carry_over({H100.uuid: state}, {H100.uuid: old}, {H100.uuid: new}, {})
        assert reclamps[H100.uuid].to_w == 600.0
        state, out = evaluate_gpu(
            GpuReading(H100.index, H100.uuid, temperature_c=72.0, power_limit_w=600.0), new, states[H100.uuid], 10.0
        )
        assert power_rules(out) == []
