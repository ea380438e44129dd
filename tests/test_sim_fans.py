"""The simulator's fan model, its profile table, and fan assist on the seed scenario (issue 17's acceptance)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from governor.backends import SetLimitFailed, SetLimitRefused
from governor.backends.simulated import SimulatedBackend
from governor.clock import VirtualClock
from governor.config import load_config, parse_toml
from governor.policy import FanPolicy
from governor.sim._schema import SimDataError
from governor.sim.profiles import SimFan, load_profile, parse_profile, render_profile
from governor.sim.scenario import load_scenario
from governor.whatif.fanbench import run_fan_policy

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "examples" / "rtx4070-fan.toml"
UUID = "GPU-sim-rtx4070-0"


def steady_die_c(percent: float | None, hours: float = 0.5) -> float:
    """The die temperature after ``hours`` of the hot scenario's load at 200 W with the fans at ``percent``."""
    clock = VirtualClock()
    backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("hot"), clock)
    if percent is not None:
        backend.set_fan_speed(UUID, 0, round(percent))
    clock.advance(hours * 3600.0)
    return backend.die_temperature_c(0)


class TestFanModel:
    def test_more_airflow_lowers_the_steady_temperature(self) -> None:
        """At 200 W in a 35 C room: 87 C under the card's control, cooler at 75 % and 100 %, hotter at 30 %."""
        auto, at_75, at_100, at_30 = (steady_die_c(p) for p in (None, 75.0, 100.0, 30.0))
        assert auto == pytest.approx(35.0 + 200.0 * 0.26, abs=0.3)  # the calibrated resistance, untouched
        assert at_100 < at_75 < auto < at_30
        fan = load_profile("rtx4070").fan
        assert fan is not None
        assert at_75 == pytest.approx(35.0 + 200.0 * (0.06 + fan.r_sink_c_per_w(0.20, 75.0)), abs=0.3)

    def test_fans_reach_a_set_speed_with_their_time_constant_and_report_it(self) -> None:
        """Set to 80 %, the reported speed is on its way after 1 s and there after 20 s; auto goes back to the curve."""
        clock = VirtualClock()
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("hot"), clock)

        def reported() -> float:
            telemetry = backend.read().gpus[0].telemetry
            assert telemetry is not None and telemetry.fan_speed_ratios is not None
            return telemetry.fan_speed_ratios[0][1]

        before = reported()
        backend.set_fan_speed(UUID, 0, 80)
        clock.advance(1.0)
        assert before < reported() < 0.80
        clock.advance(20.0)
        assert reported() == pytest.approx(0.80, abs=0.01)
        backend.set_fan_auto(UUID, 0)
        clock.advance(1.0)
        fan = load_profile("rtx4070").fan
        assert fan is not None
        assert reported() == pytest.approx(fan.auto_percent(backend.die_temperature_c(0)) / 100.0, abs=0.02)

    def test_a_stuck_fan_keeps_its_speed(self) -> None:
        """With the fan_stuck fault a set speed is accepted but the fans do not move."""
        clock = VirtualClock()
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("hot"), clock)
        clock.advance(5.0)
        backend.inject_fault(0, "fan_stuck")
        telemetry = backend.read().gpus[0].telemetry
        assert telemetry is not None and telemetry.fan_speed_ratios is not None
        before = telemetry.fan_speed_ratios[0][1]
        backend.set_fan_speed(UUID, 0, 90)
        clock.advance(30.0)
        after = backend.read().gpus[0].telemetry
        assert after is not None and after.fan_speed_ratios is not None and after.fan_speed_ratios[0][1] == before

    def test_refusals_as_nvml_gives_them(self) -> None:
        """No [fan] model (the H100): NotSupported; the fan_control_refused fault: no permission; a speed out of
        range or a fan that does not exist: invalid argument."""
        h100 = SimulatedBackend(load_profile("h100-80gb"), load_scenario("idle"), VirtualClock())
        with pytest.raises(SetLimitRefused, match="Not Supported"):
            h100.set_fan_speed("GPU-sim-h100-80gb-0", 0, 70)
        assert h100.gpus()[0].fan_count is None
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("idle"), VirtualClock())
        with pytest.raises(SetLimitFailed):
            backend.set_fan_speed(UUID, 0, 20)  # under the 30 % minimum
        with pytest.raises(SetLimitFailed):
            backend.set_fan_speed(UUID, 2, 50)  # two fans: 0 and 1
        backend.inject_fault(0, "fan_control_refused")
        with pytest.raises(SetLimitRefused, match="Insufficient Permissions"):
            backend.set_fan_speed(UUID, 0, 50)

    def test_the_state_file_keeps_manual_fans_across_a_restart(self, tmp_path: Path) -> None:
        """A set speed is written to the hardware state file; a new backend on it starts with the fans manual."""
        hw = tmp_path / "hw.json"
        first = SimulatedBackend(load_profile("rtx4070"), load_scenario("hot"), VirtualClock(), state_file=hw)
        first.set_fan_speed(UUID, 0, 70)
        assert json.loads(hw.read_text())["manual_fans_percent"] == {UUID: 70.0}
        clock = VirtualClock()
        second = SimulatedBackend(load_profile("rtx4070"), load_scenario("hot"), clock, state_file=hw)
        clock.advance(30.0)
        telemetry = second.read().gpus[0].telemetry
        assert telemetry is not None and telemetry.fan_speed_ratios == ((0, 0.70), (1, 0.70))
        second.set_fan_auto(UUID, 0)
        assert "manual_fans_percent" not in json.loads(hw.read_text())


class TestProfileTable:
    def test_round_trips_through_render(self) -> None:
        """The rtx4070's [fan] table renders and loads back unchanged."""
        profile = load_profile("rtx4070")
        assert profile.fan == SimFan(30.0, 100.0, 50.0, 0.6, 3.0, profile.fan.auto_curve if profile.fan else ())

        again = parse_profile(parse_toml(render_profile(profile).encode(), "again"), "again")
        assert again == replace(profile, source="again")

    def test_bad_values_are_named(self) -> None:
        """A falling auto curve, min above max and a [fan] on a fanless board are each reported with their key."""
        text = render_profile(load_profile("rtx4070"))
        bad = text.replace("min_percent = 30.0", "min_percent = 90.0").replace(
            "max_percent = 100.0", "max_percent = 50.0"
        )
        bad = bad.replace("auto_curve = [[40.0, 30.0]", "auto_curve = [[40.0, 99.0]")
        fanless = text.replace("fans = 2", "fans = 0")
        for body, key in ((bad, "fan.min_percent"), (bad, "fan.auto_curve"), (fanless, "fan")):
            with pytest.raises(SimDataError) as caught:
                parse_profile(parse_toml(body.encode(), "bad.toml"), "bad.toml")
            assert key in {issue.key for issue in caught.value.issues}


class TestAcceptance:
    def test_example_keeps_the_seed_scenario_below_75_c_with_more_work(self) -> None:
        """rtx4070-fan.toml on sustained-inference (2 simulated hours): never above 75 C, at the full 200 W,
        with more work done than the same config with power only (which passes 75 C on 180 W)."""
        profile, scenario = load_profile("rtx4070"), load_scenario("sustained-inference")
        config = load_config(EXAMPLE, enforce_trust=False)
        assist = run_fan_policy(profile, scenario, config, "fan assist", 7200.0)
        power = run_fan_policy(profile, scenario, replace(config, fan=FanPolicy()), "power only", 7200.0)
        assert assist.peak_c < 75.0 and assist.seconds_above == 0.0 and assist.lowest_limit_w == 200.0
        assert power.seconds_above > 0.0 and power.lowest_limit_w == 180.0
        assert assist.work_s > power.work_s
        assert assist.peak_fan_percent == 75.0  # the noise ceiling, never more
        print(
            f"ACCEPTANCE fan assist: peak {assist.peak_c:.2f} C, work {assist.work_s:.0f} s vs power only "
            f"{power.peak_c:.2f} C, {power.seconds_above:.0f} s > 75 C, work {power.work_s:.0f} s"
        )


class TestWhatIf:
    def test_simulate_runs_fan_assist_and_its_baseline_leaves_the_fans_alone(self) -> None:
        """`simulate` with the fan example: fan decisions marked on the timeline ("fan 0 ... -> auto" included);
        the no-governor baseline makes none."""
        from governor.whatif.simulate import SimSetup, compare

        setup = SimSetup(load_profile("rtx4070"), load_scenario("sustained-inference"), 1800.0)
        c = compare(setup, [load_config(EXAMPLE, enforce_trust=False)], ["fan assist"])
        (run,) = c.runs
        marks = [m for m in run.series[0].marks if str(m.rule).startswith("fan")]
        assert any(m.text.startswith("fan 0 ") and m.text.endswith("-> auto") for m in marks)
        assert not any(rule.startswith("fan") for rule, _ in c.baseline.decision_counts)
