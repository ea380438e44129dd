"""Adversarial review of the thermal zones and the power ladder: cards other than the RTX 4070,
clocks that go backwards, readings that go missing, ranges that change and drivers that round."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from governor.actuator import Actuator
from governor.backends.nvml import NvmlBackend
from governor.clock import VirtualClock
from governor.config import parse_config, parse_toml
from governor.core import Governor, open_originals
from governor.model import Action, Decision, GpuInfo, GpuReading, Outcome, Snapshot
from governor.policy import GpuPolicy, PowerPolicy, Rule, ThermalPolicy, ThermalZone
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, evaluate_gpu, wanted_w
from governor.state import OriginalLimits
from tests.builders import step_ticks
from tests.fake_pynvml import FakeGpu, FakeNvml
from tests.helpers import CARD_200W, H100, RecordingBackend, reading, snapshot

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "config" / "governor.toml"
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"

Z = ThermalZone
THREE_RUNGS = PowerPolicy(ladder_w=("100%", "90%", "80%"))  # 200/180/160 W on a 200 W card, 700/630/560 W on an H100
FIXED_70W = GpuInfo(
    index=2,
    uuid="GPU-t4-fixed",
    name="NVIDIA Tesla T4 (fixed limit)",
    power_limit_min_w=70.0,
    power_limit_max_w=70.0,
    power_limit_default_w=70.0,
)
"""A card whose minimum limit equals its maximum: one rung, whatever the ladder says."""


def plan_for(gpu: GpuInfo, power: PowerPolicy = THREE_RUNGS, thermal: ThermalPolicy | None = None) -> GpuPlan:
    """The plan the engine builds for ``gpu`` under ``power`` and ``thermal``."""
    return GpuPlan.build(gpu, GpuPolicy(thermal=thermal or ThermalPolicy(), power=power))


@dataclass
class Card:
    """One GPU driven through the engine tick by tick; its enforced limit follows every limit the rules
    set, as the driver stores it (rounded to ``driver_step_w`` when that is not 0)."""

    plan: GpuPlan
    enforced_w: float | None
    driver_step_w: float = 0.0
    state: GpuRuleState = NEW_STATE
    decisions: list[Decision] = field(default_factory=list)

    def tick(self, t_s: float, temperature_c: float | None, *, dry_run: bool = False) -> list[Decision]:
        """One reading at ``t_s``; returns its decisions and carries out every limit set."""
        info = self.plan.info
        now = GpuReading(index=info.index, uuid=info.uuid, temperature_c=temperature_c, power_limit_w=self.enforced_w)
        self.state, out = evaluate_gpu(now, self.plan, self.state, t_s, dry_run=dry_run)
        for decision in out:
            if decision.action is Action.SET_POWER_LIMIT and decision.to_w is not None and not dry_run:
                step = self.driver_step_w
                stored = decision.to_w if step == 0 else round(decision.to_w / step) * step
                self.enforced_w = min(max(stored, info.power_limit_min_w or 0.0), info.power_limit_max_w or stored)
        self.decisions.extend(out)
        return out

    def run(self, start_s: float, temperatures: Sequence[float | None]) -> list[Decision]:
        """One reading a second from ``start_s``; every decision."""
        out: list[Decision] = []
        for i, temperature in enumerate(temperatures):
            out += self.tick(start_s + i, temperature)
        return out

    @property
    def wanted(self) -> float | None:
        """The limit (W) the ladder wants in force."""
        return wanted_w(self.state, self.plan)


def power_rules(decisions: list[Decision]) -> list[Rule]:
    """The power rules among ``decisions``, in order."""
    return [d.rule for d in decisions if d.rule is not Rule.THERMAL_ZONE]


# ----------------------------------------------------------------------------- the critical zone


class TestCriticalZone:
    def test_still_critical_above_the_floor_goes_to_the_floor(self) -> None:
        """A GPU still in the critical zone whose ladder is not at the floor (its drop was refused and undone)
        goes straight to the floor on the next critical reading, not one debounced rung at a time."""
        card = Card(plan_for(CARD_200W), enforced_w=200.0, state=GpuRuleState(zone=Z.CRITICAL))
        out = card.tick(100.0, 97.0)
        assert power_rules(out) == [Rule.POWER_CRITICAL]
        assert card.wanted == 160.0

    def test_critical_drop_held_by_a_lower_outside_limit_follows_once_it_is_lifted(self) -> None:
        """Entering critical under another tool's lower limit changes nothing; once that limit is lifted while the
        card is still critical, the ladder drops straight to its floor."""
        card = Card(plan_for(H100), enforced_w=500.0)  # another tool holds it under the 560 W floor
        card.run(0.0, [90.0, 97.0, 97.0])
        assert Rule.POWER_CRITICAL not in power_rules(card.decisions)
        card.enforced_w = 700.0  # the other tool lets go
        out = card.tick(3.0, 97.0)
        assert power_rules(out) == [Rule.POWER_CRITICAL]
        assert card.enforced_w == 560.0

    def test_optimal_to_critical_in_one_tick(self) -> None:
        """A jump from optimal to critical in one reading reports one zone change and drops a hands-off ladder
        straight to its floor, skipping the debounce and every zone between."""
        card = Card(plan_for(H100), enforced_w=700.0)
        card.tick(0.0, 50.0)
        out = card.tick(1.0, 96.0)
        zones = [(d.from_zone, d.to_zone) for d in out if d.rule is Rule.THERMAL_ZONE]
        assert zones == [(Z.OPTIMAL, Z.CRITICAL)]
        assert power_rules(out) == [Rule.POWER_CRITICAL]
        assert card.enforced_w == 560.0

    def test_no_step_up_over_a_lower_outside_limit(self) -> None:
        """A limit set lower by another tool is never fought: a cool card waits under it instead of stepping up
        over it, and steps up once that tool lets go."""
        power = replace(THREE_RUNGS, dwell_s=5.0, min_change_interval_s=0.0)
        card = Card(plan_for(CARD_200W, power), enforced_w=200.0)
        card.run(0.0, [90.0] * 4)  # debounced step down to 180 W
        assert card.enforced_w == 180.0
        card.enforced_w = 150.0  # another tool sets 150 W
        out = card.run(4.0, [50.0] * 30)
        assert Rule.POWER_STEP_UP not in power_rules(out) and card.enforced_w == 150.0
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER in power_rules(out)
        card.enforced_w = 180.0  # it lets go
        out = card.run(34.0, [50.0] * 10)
        assert Rule.POWER_STEP_UP in power_rules(out) and card.enforced_w == 200.0

    def test_no_step_up_while_the_zone_is_still_critical(self) -> None:
        """With a wide hysteresis the critical zone outlasts the ladder's step-up threshold: no step up while the
        card is still in the critical zone (nor a drop back to the floor on the next tick: no flapping)."""
        thermal = ThermalPolicy(warning_c=50.0, hot_c=55.0, throttle_c=60.0, critical_c=66.0, hysteresis_c=10.0)
        power = replace(THREE_RUNGS, step_down_at_c=64.0, step_up_at_c=60.0, dwell_s=5.0, min_change_interval_s=0.0)
        card = Card(plan_for(CARD_200W, power, thermal), enforced_w=200.0)
        card.tick(0.0, 70.0)  # critical: straight to the floor
        out = card.run(1.0, [58.0] * 20)  # below step_up_at_c, still critical (not below 66 - 10)
        assert card.state.zone is Z.CRITICAL
        assert Rule.POWER_STEP_UP not in power_rules(out)
        assert card.enforced_w == 160.0


# ----------------------------------------------------------------------------- the snapshot clock


class TestClock:
    def test_a_clock_gone_backwards_does_not_block_a_step_down(self) -> None:
        """After the snapshot clock jumps back an hour (a replay started again, a clock reset), a hot card still
        steps down within the debounce and one minimum interval, not an hour later."""
        card = Card(plan_for(CARD_200W), enforced_w=200.0)
        card.run(3600.0, [80.0, 80.0, 80.0])  # one rung down at t=3602
        assert card.enforced_w == 180.0
        out = card.run(10.0, [80.0] * 40)  # the clock restarts at 10 s
        assert Rule.POWER_STEP_DOWN in power_rules(out)
        assert card.enforced_w == 160.0

    def test_a_clock_gone_backwards_does_not_stretch_the_dwell(self) -> None:
        """After the clock jumps back an hour, a cool card steps up after about one dwell (and the minimum
        interval), not once the clock has caught up with where it was."""
        card = Card(plan_for(CARD_200W), enforced_w=200.0)
        card.run(3600.0, [80.0, 80.0, 80.0, 60.0, 60.0])
        assert card.enforced_w == 180.0
        out = card.run(10.0, [60.0] * 200)
        assert Rule.POWER_STEP_UP in power_rules(out)
        assert card.enforced_w == 200.0

    def test_a_clock_gone_backwards_is_no_flap(self) -> None:
        """A step down after the clock jumped back from a step up does not back the dwell off: the release
        did not last a negative time."""
        power = replace(THREE_RUNGS, dwell_s=10.0, min_change_interval_s=0.0)
        card = Card(plan_for(CARD_200W, power), enforced_w=200.0)
        card.run(5000.0, [80.0] * 3 + [60.0] * 12)  # down at 5002, up at 5013: last_up_s = 5013
        assert card.state.ladder.last_up_s is not None and card.enforced_w == 200.0
        card.run(100.0, [80.0] * 3)  # clock back to 100 s, hot: one rung down
        assert card.enforced_w == 180.0
        assert card.state.ladder.backoff == 0


# ----------------------------------------------------------------------------- missing readings


class TestMissingReadings:
    def test_an_intermittent_sensor_still_steps_down(self) -> None:
        """A hot card whose temperature is missing every third tick still steps down: a missing reading holds
        the run of hot readings (it neither counts nor resets it)."""
        card = Card(plan_for(CARD_200W), enforced_w=200.0)
        card.run(0.0, [80.0, 80.0, None] * 20)
        assert Rule.POWER_STEP_DOWN in power_rules(card.decisions)
        assert card.enforced_w is not None and card.enforced_w < 200.0

    def test_missing_readings_change_no_limit(self) -> None:
        """A governed card whose readings go missing for a minute changes no limit meanwhile (one hold decision)."""
        card = Card(plan_for(CARD_200W), enforced_w=200.0)
        card.run(0.0, [80.0, 80.0, 80.0])
        before = card.enforced_w
        out = card.run(3.0, [None] * 60)
        assert power_rules(out) == [Rule.POWER_HOLD]
        assert card.enforced_w == before

    def test_zone_hysteresis_survives_a_missing_reading(self) -> None:
        """A card in the critical zone whose reading goes missing for a tick and comes back at 93 C (above
        95 - 3 C) is still critical: the gap does not erase the hysteresis."""
        card = Card(plan_for(H100), enforced_w=700.0)
        card.run(0.0, [96.0, None])
        zones = []
        for t_s, temperature_c in ((2.0, 93.0), (3.0, 91.0)):
            card.tick(t_s, temperature_c)
            zones.append(card.state.zone)
        assert zones == [Z.CRITICAL, Z.THROTTLE]
        reasons = [d.reason for d in card.decisions if d.rule is Rule.THERMAL_ZONE]
        assert reasons[-2:] == [
            "temperature 93 C not below 92 C (threshold - hysteresis): still critical",
            "temperature 91 C < 92 C (threshold - hysteresis)",
        ]


# ----------------------------------------------------------------------------- ranges


class TestRanges:
    def test_a_ladder_that_shrank_under_the_rung_does_not_crash(self) -> None:
        """A card stepped to its third rung whose range then narrows to one value (min == max, one rung left)
        steps up without an error, and wants that one limit."""
        card = Card(plan_for(CARD_200W), enforced_w=200.0)
        card.run(0.0, [80.0] * 3 + [80.0] * 40)  # down to 160 W (rung 2)
        assert card.state.ladder.rung == 2
        fixed = replace(CARD_200W, power_limit_min_w=170.0, power_limit_max_w=170.0, power_limit_default_w=170.0)
        card.plan = plan_for(fixed)
        card.enforced_w = 170.0
        out = card.run(100.0, [50.0] * 200)
        assert card.wanted == 170.0
        assert [d for d in out if d.action is Action.SET_POWER_LIMIT] == []

    def test_fixed_limit_card_never_moves(self) -> None:
        """A card whose minimum limit equals its maximum gets no limit change, hot, critical or cool."""
        card = Card(plan_for(FIXED_70W), enforced_w=70.0)
        card.run(0.0, [80.0] * 40 + [97.0] * 5 + [50.0] * 200)
        assert [d for d in card.decisions if d.action is Action.SET_POWER_LIMIT and d.to_w != d.from_w] == []


# ----------------------------------------------------------------------------- driver rounding


class TestDriverRounding:
    @pytest.mark.parametrize(("gpu", "step_w"), [(CARD_200W, 25.0), (H100, 50.0), (H100, 30.0)])
    def test_a_rounded_limit_is_no_drift(self, gpu: GpuInfo, step_w: float) -> None:
        """A driver that stores a limit rounded to a coarser step than asked gives neither a re-apply nor a report
        of a limit 'set outside the governor', down the ladder and back up."""
        card = Card(plan_for(gpu), enforced_w=gpu.power_limit_default_w, driver_step_w=step_w)
        card.run(0.0, [80.0] * 100 + [50.0] * 400)
        rules = power_rules(card.decisions)
        assert Rule.POWER_STEP_DOWN in rules and Rule.POWER_STEP_UP in rules
        assert Rule.POWER_DRIFT_REAPPLY not in rules
        assert Rule.POWER_DRIFT_EXTERNAL_LOWER not in rules

    def test_a_real_drift_after_rounding_is_still_handled(self) -> None:
        """After a rounded step, another tool raising the limit is re-applied once and one lowering it is
        reported once."""
        card = Card(plan_for(H100), enforced_w=700.0, driver_step_w=50.0)
        card.run(0.0, [80.0] * 3 + [72.0] * 3)  # 630 W asked, 650 W stored
        assert card.enforced_w == 650.0
        card.enforced_w = 700.0
        assert power_rules(card.run(10.0, [72.0] * 3)) == [Rule.POWER_DRIFT_REAPPLY]
        assert card.enforced_w == 650.0
        card.enforced_w = 400.0
        assert power_rules(card.run(20.0, [72.0] * 3)) == [Rule.POWER_DRIFT_EXTERNAL_LOWER]

    def test_the_governor_writes_once_per_rung_on_a_rounding_driver(self, tmp_path: Path) -> None:
        """Over NVML, an H100 whose driver keeps limits in 50 W steps is written once per rung change (no re-apply),
        and no limit is reported as set outside the governor."""
        gpu = FakeGpu(uuid=UUID0, temperature_c=80)
        fake = FakeNvml([gpu])
        clock = VirtualClock()
        doc: dict[str, Any] = dict(parse_toml(SHIPPED.read_bytes(), str(SHIPPED)))
        doc.update(state_dir=str(tmp_path / "state"), runtime_dir="", dry_run=False)
        config = parse_config(doc, str(SHIPPED))
        governor = Governor(config, NvmlBackend(clock, nvml=fake), open_originals(config))
        writes: list[int] = []
        setter = fake.nvmlDeviceSetPowerManagementLimit

        def rounding(handle: Any, limit_mw: int) -> None:
            writes.append(limit_mw)
            setter(handle, round(limit_mw / 50_000) * 50_000)

        fake.nvmlDeviceSetPowerManagementLimit = rounding  # type: ignore[method-assign]
        results = step_ticks(governor, clock, 60)
        gpu.temperature_c = 50
        results += step_ticks(governor, clock, 200)
        rules = [r.decision.rule for r in results]
        assert writes == [630_000, 700_000]
        assert Rule.POWER_DRIFT_REAPPLY not in rules and Rule.POWER_DRIFT_EXTERNAL_LOWER not in rules


# ----------------------------------------------------------------------------- the actuator's originals


def set_limit(gpu: GpuInfo, to_w: float) -> Decision:
    """A step-down decision to ``to_w`` watts for ``gpu``."""
    return Decision(
        t_s=0.0,
        gpu_index=gpu.index,
        gpu_uuid=gpu.uuid,
        rule=Rule.POWER_STEP_DOWN,
        action=Action.SET_POWER_LIMIT,
        reason="test",
        to_w=to_w,
    )


def at(enforced_w: float, gpu: GpuInfo = CARD_200W) -> Snapshot:
    """A snapshot of ``gpu`` enforcing ``enforced_w`` watts."""
    return snapshot(1.0, [reading(70.0, enforced_w, gpu)])


class TestRangeChangeKeepsTheOriginal:
    def test_a_range_that_shrinks_under_the_saved_original_keeps_it(self, tmp_path: Path) -> None:
        """A card whose maximum drops below the original the governor saved (200 W) keeps that original: it is no
        corrupt entry, no warning is raised, and once the range is back the stop restores 200 W."""
        backend = RecordingBackend()
        originals = OriginalLimits(tmp_path)
        actuator = Actuator(backend, originals, [CARD_200W])
        (first,) = actuator.apply([set_limit(CARD_200W, 180.0)], at(200.0))
        assert first.outcome is Outcome.APPLIED and originals.get(CARD_200W.uuid) == 200.0
        narrow = replace(CARD_200W, power_limit_max_w=190.0)
        actuator.set_gpus([narrow])
        (second,) = actuator.apply([set_limit(narrow, 170.0)], at(180.0, narrow))
        assert second.outcome is Outcome.APPLIED
        assert originals.get(CARD_200W.uuid) == 200.0
        assert originals.drain_warnings() == []
        actuator.set_gpus([CARD_200W])
        restored = actuator.restore(at(170.0), 2.0, "restore_on_stop")
        assert [r.outcome for r in restored] == [Outcome.APPLIED]
        assert backend.calls[-1] == (CARD_200W.uuid, 200.0)
