"""The simulated GPU's telemetry: clocks under power capping, pstate, memory temperature, fans,
clock-event seconds, XID events from a scenario, ECC by profile, and the [telemetry] profile table."""

from __future__ import annotations

from pathlib import Path

import pytest

from governor.backends.simulated import SimulatedBackend
from governor.clock import VirtualClock
from governor.model import GpuReading, GpuTelemetry
from governor.sim import SimDataError, load_profile, render_profile
from governor.sim._schema import read_toml
from governor.sim.profiles import GpuProfile, parse_profile
from governor.sim.scenario import Load, Phase, Scenario, ScenarioEvent, load_scenario, parse_scenario
from governor.sim.workload import PERF_EXPONENTS

H100 = load_profile("h100-80gb")
RTX = load_profile("rtx4070")


def scenario(demand_w: float, *, events: tuple[ScenarioEvent, ...] = (), ambient_c: float = 25.0) -> Scenario:
    return Scenario(
        name="test",
        description="",
        phases=(Phase("only", 3600.0, Load(demand_w, None, "compute", PERF_EXPONENTS["compute"], 1.0)),),
        events=events,
        ambient_c=ambient_c,
        repeat=False,
        power_noise_w=0.0,
    )


def run(
    profile: GpuProfile, sc: Scenario, seconds: float, limit_w: float | None = None
) -> tuple[SimulatedBackend, GpuReading]:
    clock = VirtualClock()
    backend = SimulatedBackend(profile, sc, clock)
    if limit_w is not None:
        backend.set_power_limit(backend.gpus()[0].uuid, limit_w)
    clock.advance(seconds)
    return backend, backend.read().gpus[0]


def telemetry(reading: GpuReading) -> GpuTelemetry:
    assert reading.telemetry is not None
    return reading.telemetry


class TestClocksAndState:
    def test_sm_clock_falls_with_the_power_limit(self) -> None:
        """Uncapped the SM clock is the profile's maximum; each lower limit gives a lower clock, above idle."""
        clocks: list[float] = []
        for limit_w in (700.0, 500.0, 300.0):
            _, reading = run(H100, scenario(650.0), 30.0, limit_w)
            assert reading.sm_clock_mhz is not None
            clocks.append(reading.sm_clock_mhz)
        assert clocks[0] == H100.telemetry.sm_clock_max_mhz
        assert clocks[0] > clocks[1] > clocks[2] > H100.telemetry.sm_clock_idle_mhz

    def test_idle_clocks_and_pstate_by_profile(self) -> None:
        """Idle: the H100 stays in P0 with HBM at full clock; the RTX 4070 drops to P8 and 405 MHz memory."""
        _, h100 = run(H100, scenario(0.0), 10.0)
        _, rtx = run(RTX, scenario(0.0), 10.0)
        assert (telemetry(h100).pstate, telemetry(h100).memory_clock_mhz) == (0, 2619.0)
        assert (telemetry(rtx).pstate, telemetry(rtx).memory_clock_mhz) == (8, 405.0)
        assert (h100.sm_clock_mhz, rtx.sm_clock_mhz) == (345.0, 210.0)
        _, busy = run(RTX, scenario(150.0), 10.0)
        assert (telemetry(busy).pstate, telemetry(busy).memory_clock_mhz) == (0, 10501.0)

    def test_memory_temperature_follows_the_thermal_model(self) -> None:
        """The H100's memory temperature lies between ambient and the die and rises with load; RTX: absent."""
        _, idle = run(H100, scenario(0.0), 600.0)
        _, busy = run(H100, scenario(650.0), 600.0)
        idle_mem, busy_mem = telemetry(idle).memory_temperature_c, telemetry(busy).memory_temperature_c
        assert idle_mem is not None and busy_mem is not None and busy.temperature_c is not None
        assert 25.0 < idle_mem < busy_mem <= busy.temperature_c
        _, rtx = run(RTX, scenario(150.0), 60.0)
        assert telemetry(rtx).memory_temperature_c is None

    def test_fans_spin_up_with_temperature(self) -> None:
        """The RTX 4070's two fans report a ratio in 0.3-1 that grows with the die temperature; the H100 has none."""
        _, cool = run(RTX, scenario(0.0), 600.0)
        _, hot = run(RTX, scenario(250.0, ambient_c=35.0), 600.0)
        cool_fans, hot_fans = telemetry(cool).fan_speed_ratios, telemetry(hot).fan_speed_ratios
        assert cool_fans is not None and hot_fans is not None
        assert [fan for fan, _ in hot_fans] == [0, 1]
        assert 0.3 <= cool_fans[0][1] < hot_fans[0][1] <= 1.0
        _, h100 = run(H100, scenario(0.0), 10.0)
        assert telemetry(h100).fan_speed_ratios is None

    def test_ecc_by_profile(self) -> None:
        """The H100 reports ECC counts and remapped rows, all zero; the RTX 4070 reports none (absent, not zero)."""
        _, h100 = run(H100, scenario(0.0), 1.0)
        _, rtx = run(RTX, scenario(0.0), 1.0)
        assert telemetry(h100).ecc_errors is not None
        assert {count for *_, count in telemetry(h100).ecc_errors or ()} == {0}
        assert (telemetry(h100).remapped_rows_uncorrectable, telemetry(h100).row_remap_failed) == (0, False)
        assert telemetry(rtx).ecc_errors is None and telemetry(rtx).remapped_rows_correctable is None


class TestClockEventSeconds:
    def test_seconds_accumulate_per_reason(self) -> None:
        """Idle time counts as gpu_idle, capped time as sw_power_cap, both in simulated seconds."""
        _, idle = run(RTX, scenario(0.0), 40.0)
        _, capped = run(RTX, scenario(300.0), 40.0)
        idle_s, capped_s = dict(idle.clock_event_s or ()), dict(capped.clock_event_s or ())
        assert idle_s["gpu_idle"] == pytest.approx(40.0) and idle_s["sw_power_cap"] == 0.0
        assert capped_s["sw_power_cap"] == pytest.approx(40.0) and capped_s["gpu_idle"] == 0.0

    def test_thermal_seconds_count_only_the_hot_steps(self) -> None:
        """sw_thermal_slowdown seconds grow once the die reaches the slowdown temperature, and not before."""
        clock = VirtualClock()
        backend = SimulatedBackend(RTX, scenario(300.0, ambient_c=45.0), clock)
        backend.set_power_limit(backend.gpus()[0].uuid, 220.0)
        seconds = []
        for _ in range(12):
            clock.advance(30.0)
            reading = backend.read().gpus[0]
            seconds.append(dict(reading.clock_event_s or ())["sw_thermal_slowdown"])
        assert seconds[0] == 0.0
        assert seconds[-1] > 0.0
        assert seconds == sorted(seconds)
        assert seconds[-1] - seconds[-2] == pytest.approx(30.0, abs=0.5)  # at the slowdown temperature by then


class TestXidFromScenario:
    def test_xid_event_counted_and_xid_48_counts_uncorrected_ecc(self) -> None:
        """An xid event reports one XID of that code from its time on; XID 48 also counts an uncorrected ECC error."""
        events = (ScenarioEvent(10.0, 0, None, 48), ScenarioEvent(20.0, 0, None, 13))
        clock = VirtualClock()
        backend = SimulatedBackend(H100, scenario(0.0, events=events), clock)
        clock.advance(5.0)
        before = backend.read().gpus[0]
        clock.advance(20.0)
        after = backend.read().gpus[0]
        assert telemetry(before).xid_errors == ()
        assert ("uncorrected", "aggregate", 0) in (telemetry(before).ecc_errors or ())
        assert telemetry(after).xid_errors == ((13, 1), (48, 1))
        assert ("uncorrected", "aggregate", 1) in (telemetry(after).ecc_errors or ())

    def test_lost_gpu_keeps_its_xid_count(self) -> None:
        """A GPU lost right after an XID 79 reads LOST but still carries the count."""
        events = (ScenarioEvent(5.0, 0, None, 79), ScenarioEvent(5.0, 0, "lost"))
        _, reading = run(H100, scenario(300.0, events=events), 10.0)
        assert telemetry(reading).xid_errors == ((79, 1),)

    def test_scenario_file_with_xid_events(self, tmp_path: Path) -> None:
        """[[event]] with xid = CODE loads; fault and xid together, or an XID over 999, are refused naming the key."""
        good = tmp_path / "x.toml"
        good.write_text(
            'name = "x"\n[[phase]]\nduration_s = 10.0\ndemand_w = 0.0\n[[event]]\nat_s = 1.0\ngpu = 0\nxid = 79\n'
        )
        assert load_scenario(str(good)).events == (ScenarioEvent(1.0, 0, None, 79),)
        base = {"name": "x", "phase": [{"duration_s": 10.0, "demand_w": 0.0}]}
        with pytest.raises(SimDataError, match=r"event\[0\]\.fault"):
            parse_scenario({**base, "event": [{"at_s": 1.0, "gpu": 0, "xid": 79, "fault": "lost"}]}, "s.toml")
        with pytest.raises(SimDataError, match=r"event\[0\]\.xid"):
            parse_scenario({**base, "event": [{"at_s": 1.0, "gpu": 0, "xid": 1000}]}, "s.toml")


class TestProfileTable:
    def test_render_round_trips_the_telemetry(self, tmp_path: Path) -> None:
        """render_profile writes [telemetry] and loads back to the same profile."""
        for profile in (H100, RTX):
            path = tmp_path / f"{profile.name}.toml"
            path.write_text(render_profile(profile))
            loaded = load_profile(str(path))
            assert loaded.telemetry == profile.telemetry

    def test_bad_telemetry_values_are_refused_naming_the_key(self, tmp_path: Path) -> None:
        """An idle pstate over 15, an unknown key or an idle clock above the maximum names the file and key."""
        path = tmp_path / "p.toml"
        path.write_text(render_profile(RTX))
        data = read_toml(path)
        data["telemetry"] = {"idle_pstate": 16, "sm_clock_idle_mhz": 3000.0, "bogus": 1}
        with pytest.raises(SimDataError) as info:
            parse_profile(data, "p.toml")
        text = str(info.value)
        for key in ("telemetry.idle_pstate", "telemetry.sm_clock_idle_mhz", "telemetry.bogus"):
            assert key in text, text
