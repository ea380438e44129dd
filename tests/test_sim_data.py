"""Profiles and scenarios: the shipped files, loading by name or path, and errors that name file and key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from governor.config import ConfigError
from governor.sim import SimDataError, load_profile, load_scenario, render_profile, shipped_names
from governor.sim.scenario import GIB, PhaseTimeline
from governor.sim.thermal import steady_temperature_c

GOOD_PROFILE = """
name = "test-gpu"
gpu_name = "Test GPU"
memory_total_bytes = 8000000000
memory_reserved_bytes = 100000000
idle_power_w = 10.0
[power_limit]
min_w = 50.0
max_w = 150.0
default_w = 120.0
[temperature]
slowdown_c = 85.0
shutdown_c = 92.0
[thermal]
r_die_c_per_w = 0.05
c_die_j_per_c = 20.0
r_sink_c_per_w = 0.25
tau_sink_s = 50.0
ambient_c = 25.0
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def issue_keys(exc: pytest.ExceptionInfo[SimDataError]) -> set[str]:
    return {issue.key for issue in exc.value.issues}


class TestShippedProfiles:
    def test_h100_facts(self) -> None:
        """h100-80gb: 200-700 W, default 700 W, slowdown 89 C, shutdown 95 C, 80 GB, as the real card."""
        p = load_profile("h100-80gb")
        assert (p.power_limit_min_w, p.power_limit_max_w, p.power_limit_default_w) == (200.0, 700.0, 700.0)
        assert (p.temperature_slowdown_c, p.temperature_shutdown_c) == (89.0, 95.0)
        assert p.memory_total_bytes == 85520809984
        assert p.gpu_name == "NVIDIA H100 80GB HBM3"

    def test_rtx4070_facts(self) -> None:
        """rtx4070: 12 GB, default limit 200 W inside its range."""
        p = load_profile("rtx4070")
        assert p.memory_total_bytes // 2**20 == 12282
        assert p.power_limit_default_w == 200.0
        assert p.power_limit_min_w < 180.0 < p.power_limit_default_w <= p.power_limit_max_w
        assert p.gpu_name == "NVIDIA GeForce RTX 4070"

    def test_rtx4070_steady_temperatures_in_a_warm_room(self) -> None:
        """At 30 C ambient the RTX 4070 settles at 81-83 C at 200 W and 76-78 C at 180 W."""
        p = load_profile("rtx4070")
        assert 81.0 <= steady_temperature_c(p.thermal, 200.0, 30.0) <= 83.0
        assert 76.0 <= steady_temperature_c(p.thermal, 180.0, 30.0) <= 78.0

    def test_names_are_listed(self) -> None:
        """Both shipped profiles and all six shipped scenarios are found by name."""
        assert {"h100-80gb", "rtx4070"} <= set(shipped_names("profiles"))
        wanted = {"sustained-inference", "hot", "idle", "dual-inference-game", "leaky-process", "gpu-lost"}
        assert wanted <= set(shipped_names("scenarios"))
        for name in wanted:
            assert load_scenario(name).name == name


class TestProfileFiles:
    def test_load_by_path_with_tau(self, tmp_path: Path) -> None:
        """A profile loads from a path; a time constant tau_sink_s becomes C = tau / R."""
        p = load_profile(write(tmp_path, "mine.toml", GOOD_PROFILE))
        assert p.name == "test-gpu"
        assert p.thermal.c_sink_j_per_c == pytest.approx(200.0)
        assert p.source.endswith("mine.toml")

    def test_render_round_trips(self, tmp_path: Path) -> None:
        """render_profile writes TOML that loads back to the same profile (what calibrate --output needs)."""
        original = load_profile("h100-80gb")
        path = write(tmp_path, "out.toml", render_profile(original, "fitted from a trace\nRMSE 1.2 C"))
        again = load_profile(path)
        assert replace(again, source=original.source) == original
        assert Path(path).read_text().startswith("# fitted from a trace\n# RMSE 1.2 C\n")

    def test_unknown_name_lists_shipped_ones(self) -> None:
        """An unknown profile name is a ConfigError naming the key and the shipped names."""
        with pytest.raises(ConfigError) as exc:
            load_profile("rtx9090")
        text = str(exc.value)
        assert "simulation.profile" in text and "'rtx4070'" in text and "'rtx9090'" in text

    def test_missing_file(self, tmp_path: Path) -> None:
        """A profile path that does not exist names the file."""
        with pytest.raises(SimDataError, match=r"nope\.toml"):
            load_profile(str(tmp_path / "nope.toml"))

    def test_not_toml(self, tmp_path: Path) -> None:
        """A file that is not TOML is reported with its name and 'valid TOML'."""
        path = write(tmp_path, "bad.toml", "name = [")
        with pytest.raises(SimDataError, match=r"bad\.toml: expected valid TOML"):
            load_profile(path)

    def test_every_problem_is_reported_at_once(self, tmp_path: Path) -> None:
        """Several mistakes give one error listing each with its key, expected and got."""
        text = (
            GOOD_PROFILE.replace("default_w = 120.0", "default_w = 300.0")
            .replace("r_die_c_per_w = 0.05", "r_die_c_per_w = -1")
            .replace("tau_sink_s = 50.0", "tau_sink_s = 50.0\nc_sink_j_per_c = 9.0")
            .replace('gpu_name = "Test GPU"', 'gpu_name = "Test GPU"\nidle_powr_w = 3')
        )
        path = write(tmp_path, "broken.toml", text)
        with pytest.raises(SimDataError) as exc:
            load_profile(path)
        keys = issue_keys(exc)
        assert {
            "power_limit.default_w",
            "thermal.r_die_c_per_w",
            "thermal.c_sink_j_per_c",
            "idle_powr_w",
        } <= keys
        by_key = {i.key: i for i in exc.value.issues}
        assert by_key["power_limit.default_w"].got == "300"
        assert "between min_w 50 and max_w 150" in by_key["power_limit.default_w"].expected
        assert "did you mean 'idle_power_w'" in by_key["idle_powr_w"].got
        assert all(i.file == path for i in exc.value.issues)

    def test_missing_keys_are_named(self, tmp_path: Path) -> None:
        """An empty profile names every required key, each expected with 'got nothing'."""
        with pytest.raises(SimDataError) as exc:
            load_profile(write(tmp_path, "empty.toml", ""))
        assert {
            "name",
            "gpu_name",
            "memory_total_bytes",
            "power_limit",
            "temperature",
            "thermal",
        } <= issue_keys(exc)


SCENARIO = """
name = "s"
ambient_c = 28.0
[[phase]]
duration_s = 10
demand_w = 100
kind = "memory"
[[phase.gpu]]
index = 1
demand_fraction = 0.5
[[process]]
name = "p"
memory_gib = 1.5
growth_gib_per_s = 0.5
max_memory_gib = 2
"""


class TestScenarioFiles:
    def test_load_by_path(self, tmp_path: Path) -> None:
        """A scenario loads from a path; per-GPU overrides inherit the phase's kind; GiB convert to bytes."""
        s = load_scenario(write(tmp_path, "s.toml", SCENARIO))
        phase = s.phases[0]
        assert phase.load_for(0).demand_w == 100.0
        override = phase.load_for(1)
        assert (override.demand_fraction, override.kind) == (0.5, "memory")
        proc = s.processes[0]
        assert proc.memory_bytes == int(1.5 * GIB)
        assert proc.memory_at(0.5) == int(1.75 * GIB)
        assert proc.memory_at(100.0) == 2 * GIB
        assert s.highest_gpu_index() == 1

    def test_every_problem_is_reported_at_once(self, tmp_path: Path) -> None:
        """Bad kinds, double demands, backwards times and unknown faults are all named by key."""
        text = """
name = "bad"
[[phase]]
duration_s = 0
demand_w = 10
demand_fraction = 0.2
[[phase]]
duration_s = 5
demand_w = 10
kind = "quantum"
[[process]]
name = "p"
memory_bytes = 5
start_s = 10
end_s = 5
[[event]]
at_s = 1
gpu = 0
fault = "melted"
"""
        with pytest.raises(SimDataError) as exc:
            load_scenario(write(tmp_path, "bad.toml", text))
        keys = issue_keys(exc)
        assert {
            "phase[0].duration_s",
            "phase[0].demand_w",
            "phase[1].kind",
            "process[0].end_s",
            "event[0].fault",
        } <= keys

    def test_needs_a_phase(self, tmp_path: Path) -> None:
        """A scenario without phases is refused."""
        with pytest.raises(SimDataError) as exc:
            load_scenario(write(tmp_path, "none.toml", 'name = "x"\n'))
        assert "phase" in issue_keys(exc)

    def test_unknown_name(self) -> None:
        """An unknown scenario name names simulation.scenario and the shipped ones."""
        with pytest.raises(SimDataError, match=r"simulation\.scenario.*'hot'"):
            load_scenario("lukewarm")


class TestPhaseTimeline:
    def test_repeat_cycles(self, tmp_path: Path) -> None:
        """With repeat, phases start over after the last: 0-10 s a, 10-15 s b, 15-25 s a again."""
        text = '[[phase]]\nname="a"\nduration_s=10\ndemand_w=0\n[[phase]]\nname="b"\nduration_s=5\ndemand_w=0\n'
        timeline = PhaseTimeline(load_scenario(write(tmp_path, "r.toml", 'name="r"\n' + text)))
        assert timeline.phase_at(0.0) == (0, 10.0)
        assert timeline.phase_at(12.0) == (1, 15.0)
        assert timeline.phase_at(15.0) == (0, 25.0)
        assert timeline.phase_at(3 * 15.0 + 11.0) == (1, 60.0)

    def test_hold_keeps_the_last_phase(self, tmp_path: Path) -> None:
        """With repeat = false the last phase holds forever."""
        text = 'name="h"\nrepeat=false\n[[phase]]\nduration_s=10\ndemand_w=0\n'
        text += "[[phase]]\nduration_s=5\ndemand_w=0\n"
        timeline = PhaseTimeline(load_scenario(write(tmp_path, "h.toml", text)))
        assert timeline.phase_at(5.0) == (0, 10.0)
        assert timeline.phase_at(12.0)[0] == 1
        assert timeline.phase_at(1e6)[0] == 1
