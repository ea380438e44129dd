"""Review of the simulator and the what-if commands: calibration on real and awkward traces,
physical bounds of the simulated power, safe output files, and replay agreeing with the daemon."""

from __future__ import annotations

import io
import math
import os
import statistics
from pathlib import Path

import pytest

from governor.backends.simulated import SimulatedBackend
from governor.cli import main
from governor.clock import VirtualClock
from governor.model import Decision, GpuInfo, GpuReading
from governor.policy import Action, Rule
from governor.sim.calibrate import (
    ThermalSample,
    fit_thermal,
    predict,
    samples_from_trace,
    validate_split,
)
from governor.sim.profiles import load_profile, parse_profile
from governor.sim.scenario import parse_scenario
from governor.sim.thermal import ThermalParams, steady_temperature_c
from governor.trace import device_record, read_trace, sample_record, write_records
from governor.whatif.series import GpuSeries

DATA = Path(__file__).resolve().parent / "data"
H100_TRACE = DATA / "h100-load.jsonl"
H200_TRACE = DATA / "h200-steps.jsonl"

TRUE = ThermalParams(r_die_c_per_w=0.03, c_die_j_per_c=20.0, r_sink_c_per_w=0.025, c_sink_j_per_c=700.0)
TRUE_AMBIENT_C = 33.0
CARD = GpuInfo(
    index=0,
    uuid="GPU-review-0",
    name="Review Card",
    power_limit_min_w=200.0,
    power_limit_max_w=700.0,
    power_limit_default_w=700.0,
    temperature_slowdown_c=89.0,
    temperature_shutdown_c=95.0,
    memory_total_bytes=80 * 1024**3,
    driver_version="test",
)


def run(*argv: str) -> tuple[int, str, str]:
    """Run the CLI; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def load_power(t_s: float) -> float:
    """Idle, a 690 W load, idle, a half load, idle: a pattern that pins the thermal constants down."""
    k = t_s % 600.0
    if 40.0 <= k < 280.0:
        return 690.0
    if 400.0 <= k < 460.0:
        return 350.0
    return 72.0


def synthetic(interval_s: float, seconds: float = 600.0) -> list[ThermalSample]:
    """Samples every ``interval_s`` of the two-node model with TRUE driven by load_power."""
    t = [k * interval_s for k in range(int(seconds / interval_s) + 1)]
    power = [load_power(x) for x in t]
    temps = predict(TRUE, t, power, TRUE_AMBIENT_C + 72.0 * TRUE.r_total_c_per_w, TRUE_AMBIENT_C)
    return [ThermalSample(a, b, c) for a, b, c in zip(t, temps, power)]


def write_samples(path: Path, samples: list[ThermalSample]) -> None:
    """``samples`` as a one-GPU trace; samples under 100 W are flagged idle (0x1)."""
    records = [device_record(CARD, 1.0, "synthetic")]
    for s in samples:
        reading = GpuReading(
            index=0,
            uuid=CARD.uuid,
            temperature_c=s.temperature_c,
            power_w=s.power_w,
            power_limit_w=700.0,
            memory_used_bytes=500 * 1024**2,
            memory_total_bytes=CARD.memory_total_bytes,
            clock_event_reasons=0x1 if s.power_w < 100.0 else 0x4,
            processes=(),
        )
        records.append(sample_record(s.t_s, reading))
    with open(path, "w", encoding="utf-8") as handle:
        write_records(handle, records)


class TestCalibrationOnRealTraces:
    def test_the_h200_trace_is_fitted(self) -> None:
        """The real H200 trace (die follows power within a sample) gives a model, not a refusal."""
        samples = samples_from_trace(read_trace(H200_TRACE))
        fit = fit_thermal(samples)
        assert fit.rmse_c < 1.5
        loaded = [s for s in samples if s.power_w > 600.0]
        plateau_c = statistics.fmean(s.temperature_c for s in loaded[len(loaded) // 2 :])
        settle_c = steady_temperature_c(fit.params, statistics.fmean(s.power_w for s in loaded), fit.ambient_c)
        assert abs(settle_c - plateau_c) < 3.0

    def test_the_h200_model_predicts_held_out_data(self) -> None:
        """Fitted on the first half of the H200 trace, the model predicts the second half within 3 C RMSE."""
        check = validate_split(samples_from_trace(read_trace(H200_TRACE)), 0.5)
        assert check.predict_rmse_c < 3.0 and check.continued_rmse_c < 3.0

    def test_calibrate_cli_writes_a_loadable_h200_profile(self, tmp_path: Path) -> None:
        """`calibrate --output` on the H200 trace writes a profile that loads back."""
        out = tmp_path / "h200.toml"
        code, _, err = run("calibrate", str(H200_TRACE), "--output", str(out))
        assert code == 0, err
        assert load_profile(str(out)).gpu_name == "NVIDIA H200"


class TestCalibrationRefusesWhatCannotBeFitted:
    @pytest.mark.parametrize(("start_s", "end_s"), [(0.0, 15.0), (190.0, 1e9)], ids=["idle-head", "idle-tail"])
    def test_idle_only_data_is_refused(self, start_s: float, end_s: float) -> None:
        """Only idle samples of the real H100 (a few watts of wobble) are refused, not fitted into
        a model whose room is far below freezing."""
        samples = [s for s in samples_from_trace(read_trace(H100_TRACE)) if start_s <= s.t_s < end_s]
        with pytest.raises(ValueError, match="load"):
            fit_thermal(samples)

    def test_a_load_from_the_first_sample_on_is_refused(self) -> None:
        """A trace that only heats under one load (one idle sample, then the cap) is refused: it
        pins T_amb + P * R down but not the room and R apart (a fit gave a 5 C room)."""
        samples = [s for s in synthetic(1.0) if 39.0 <= s.t_s < 280.0]
        assert samples[0].power_w == 72.0 and samples[1].power_w == 690.0
        with pytest.raises(ValueError, match="load"):
            fit_thermal(samples)

    def test_idle_only_trace_is_one_line_from_the_cli(self, tmp_path: Path) -> None:
        """`calibrate` on an all-idle trace exits 2 with one line naming the trace, no profile written."""
        trace = tmp_path / "idle.jsonl"
        samples = [s for s in samples_from_trace(read_trace(H100_TRACE)) if s.t_s >= 190.0]
        write_samples(trace, samples)
        out = tmp_path / "idle.toml"
        code, _, err = run("calibrate", str(trace), "--output", str(out))
        assert code == 2 and err.count("\n") == 1 and str(trace) in err
        assert not out.exists()


class TestCalibrationSamplingIntervals:
    @pytest.mark.parametrize("interval_s", [0.25, 5.0, 10.0])
    def test_any_regular_interval_is_fitted(self, interval_s: float) -> None:
        """A trace recorded every 0.25 s, 5 s or 10 s (record --interval) is fitted back to its
        steady-state rise, not refused for having no pairs 0.5-2 s apart."""
        fit = fit_thermal(synthetic(interval_s))
        assert fit.params.r_total_c_per_w == pytest.approx(TRUE.r_total_c_per_w, rel=0.03)
        assert fit.ambient_c == pytest.approx(TRUE_AMBIENT_C, abs=0.5)

    def test_duplicate_timestamps_and_gaps_are_fitted(self) -> None:
        """Repeated timestamps and a 30 s gap leave the fit on the true constants."""
        samples = synthetic(1.0)
        samples = samples[:100] + [samples[99]] * 3 + samples[100:300] + samples[330:]
        fit = fit_thermal(samples)
        assert fit.params.r_total_c_per_w == pytest.approx(TRUE.r_total_c_per_w, rel=0.03)

    def test_a_single_sample_is_refused_with_a_reason(self) -> None:
        """One sample is refused saying how many are needed."""
        with pytest.raises(ValueError, match="at least"):
            fit_thermal(synthetic(1.0)[:1])


PROFILE_BASE = {
    "memory_total_bytes": 24 * 1024**3,
    "memory_reserved_bytes": 300 * 1024**2,
    "temperature": {"slowdown_c": 87.0, "shutdown_c": 92.0},
}


def profile_of(name: str, idle_w: float, min_w: float, max_w: float, r_c_per_w: float) -> dict[str, object]:
    """A profile document for a card with no fan of ``max_w`` watts."""
    return {
        **PROFILE_BASE,
        "name": name,
        "gpu_name": f"Review {name}",
        "idle_power_w": idle_w,
        "power_limit": {"min_w": min_w, "max_w": max_w, "default_w": max_w},
        "thermal": {
            "r_die_c_per_w": r_c_per_w / 4,
            "tau_die_s": 0.5,
            "r_sink_c_per_w": 3 * r_c_per_w / 4,
            "tau_sink_s": 30.0,
            "ambient_c": 30.0,
        },
    }


CARDS = {
    "l4-70w": profile_of("l4", 16.0, 40.0, 72.0, 0.6),
    "b200-1000w": profile_of("b200", 140.0, 200.0, 1000.0, 0.04),
    "fixed-limit": profile_of("fixed", 10.0, 150.0, 150.0, 0.3),
}


class TestSimulatedPowerStaysPhysical:
    @pytest.mark.parametrize("card", sorted(CARDS))
    def test_noise_never_lifts_power_above_the_limit(self, card: str) -> None:
        """With loud power noise and a load far above the cap, no reading draws more than the
        enforced limit (nor the card's maximum), and the energy never exceeds limit x time."""
        profile = parse_profile(CARDS[card], card)
        scenario = parse_scenario(
            {
                "name": "loud",
                "power_noise_w": 30.0,
                "repeat": False,
                "phase": [{"duration_s": 10.0, "demand_w": 0.0}, {"duration_s": 1e6, "demand_fraction": 3.0}],
            },
            "loud",
        )
        clock = VirtualClock(start_s=0.0)
        backend = SimulatedBackend(profile, scenario, clock, seed=7)
        powers = []
        for k in range(1, 601):
            clock.advance_to(float(k))
            reading = backend.read().gpus[0]
            assert reading.power_w is not None and reading.power_limit_w is not None
            powers.append(reading.power_w)
            assert 0.0 <= reading.power_w <= reading.power_limit_w <= profile.power_limit_max_w
        stats = backend.stats(0)
        assert 0.0 < stats.energy_j <= profile.power_limit_max_w * stats.elapsed_s
        assert statistics.median(powers[60:]) == profile.power_limit_default_w  # held at the cap, not below it

    def test_the_die_settles_at_the_models_steady_state(self) -> None:
        """Without noise, a constant load leaves the die at T_amb + P * R_total after many time constants."""
        profile = parse_profile(CARDS["l4-70w"], "l4")
        scenario = parse_scenario(
            {"name": "flat", "power_noise_w": 0.0, "phase": [{"duration_s": 1e6, "demand_w": 60.0}]}, "flat"
        )
        clock = VirtualClock(start_s=0.0)
        backend = SimulatedBackend(profile, scenario, clock)
        clock.advance_to(600.0)
        backend.read()
        expected = steady_temperature_c(profile.thermal, 60.0, profile.ambient_c)
        assert backend.die_temperature_c(0) == pytest.approx(expected, abs=0.01)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of another user's that a planted symlink points at."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


class TestOutputsNeverFollowAPlantedSymlink:
    def test_calibrate_output(self, tmp_path: Path, victim: Path) -> None:
        """`calibrate --output` over a symlink replaces the link with the profile; its target is untouched."""
        out = tmp_path / "profile.toml"
        out.symlink_to(victim)
        code, _, err = run("calibrate", str(H100_TRACE), "--output", str(out))
        assert code == 0, err
        assert victim.read_text() == "precious\n"
        assert not out.is_symlink() and load_profile(str(out)).gpu_name == "NVIDIA H100 80GB HBM3"

    def test_calibrate_output_over_a_dangling_symlink(self, tmp_path: Path) -> None:
        """A symlink to a file that does not exist yet is not followed to create it."""
        target = tmp_path / "created-elsewhere.toml"
        out = tmp_path / "profile.toml"
        out.symlink_to(target)
        code, _, err = run("calibrate", str(H100_TRACE), "--output", str(out))
        assert code == 0, err
        assert not target.exists() and not out.is_symlink()

    @pytest.mark.skipif(
        __import__("importlib.util").util.find_spec("matplotlib") is None, reason="matplotlib not installed"
    )
    def test_replay_plot(self, tmp_path: Path, victim: Path) -> None:
        """`replay --plot` over a symlink replaces the link with the PNG; its target is untouched."""
        out = tmp_path / "plot.png"
        out.symlink_to(victim)
        code, _, err = run("replay", str(H100_TRACE), "--plot", str(out))
        assert code == 0, err
        assert victim.read_text() == "precious\n"
        assert not out.is_symlink() and out.read_bytes()[:4] == b"\x89PNG"

    def test_written_profile_is_readable_by_others(self, tmp_path: Path) -> None:
        """The profile is written world-readable (0644), like any file a user asks for, whatever the umask did."""
        out = tmp_path / "profile.toml"
        code, _, err = run("calibrate", str(H100_TRACE), "--output", str(out))
        assert code == 0, err
        assert os.stat(out).st_mode & 0o777 == 0o644


DEEP_CAP = "[power]\nladder_w = [200.0, 180.0]\nstep_down_at_c = 50.0\nstep_up_at_c = 40.0\n"


class TestReplayAgreesWithTheDaemon:
    def test_replay_refuses_a_ladder_the_daemon_refuses(self, tmp_path: Path) -> None:
        """A 200 W ladder on a 700 W H100 trace is refused by replay as by simulate (the daemon's
        deep-cap check), instead of showing a 700 -> 200 W cut the daemon would never make."""
        config = tmp_path / "deep.toml"
        config.write_text(DEEP_CAP)
        code_sim, _, err_sim = run(
            "simulate", "--profile", "h100-80gb", "--scenario", "hot", "--duration", "30", "--config", str(config)
        )
        code, out, err = run("replay", str(H100_TRACE), "--config", str(config))
        assert code_sim != 0 and "allow_deep_cap" in err_sim
        assert code == code_sim and "allow_deep_cap" in err and "700 -> 200" not in out

    def test_replay_notes_a_ladder_above_the_cards_range(self, tmp_path: Path) -> None:
        """A ladder written for a bigger card, clamped to one rung on this one, is named in a note."""
        config = tmp_path / "big.toml"
        config.write_text("[power]\nladder_w = [900.0, 800.0]\n")
        code, out, err = run("replay", str(H100_TRACE), "--config", str(config))
        assert code == 0, err
        assert "note:" in out and "700" in out and "one rung" in out


class TestSimulateArguments:
    def test_more_gpus_than_a_simulation_has_are_refused(self) -> None:
        """--gpus above the 64 GPUs [simulation] gpu_count allows is refused at once, naming --gpus."""
        code, out, err = run(
            "simulate", "--profile", "h100-80gb", "--scenario", "hot", "--duration", "5", "--gpus", "65"
        )
        assert code == 2 and "--gpus" in err and out == ""

    def test_a_duration_below_one_physics_step_is_refused(self) -> None:
        """A run shorter than one 0.5 s physics step (it would report no energy and no throughput) is refused."""
        code, out, err = run("simulate", "--profile", "h100-80gb", "--scenario", "hot", "--duration", "0.3s")
        assert code == 2 and "--duration" in err and out == ""


class TestSeriesMemoryIsBounded:
    def test_a_long_run_keeps_a_bounded_number_of_points(self) -> None:
        """A year of ticks does not keep every tick: the series stays under its point cap and keeps
        the hottest temperature, the mean power, the first time and the last limit."""
        series = GpuSeries(label="long", gpu_index=0)
        n = 300_000
        for k in range(n):
            hot = k == 123_457
            series.add(float(k), 95.0 if hot else 50.0 + (k % 7), 100.0 + (k % 2) * 100.0, 300.0 + k // 100_000, None)
        assert len(series.t_s) <= series.max_points
        assert len(series.t_s) == len(series.temperature_c) == len(series.power_w) == len(series.limit_w)
        assert max(series.temperature_c) == 95.0
        assert series.t_s[0] == 0.0 and series.limit_w[-1] == 302.0
        assert statistics.fmean(series.power_w) == pytest.approx(150.0, rel=1e-3)
        assert all(math.isnan(v) for v in series.target_w)

    def test_marks_are_bounded_and_every_decision_counted(self) -> None:
        """A flapping policy's decisions over a long run keep at most max_marks marks, spread over
        the whole run, and mark_counts counts every one."""
        series = GpuSeries(label="marks", gpu_index=0)
        n = 50_000
        for k in range(n):
            rule = Rule.POWER_STEP_DOWN if k % 2 else Rule.POWER_STEP_UP
            series.mark(Decision(float(k), 0, "GPU-0", rule, Action.SET_POWER_LIMIT, "test", from_w=300.0, to_w=250.0))
        assert len(series.marks) <= series.max_marks
        assert series.mark_counts == {"power_step_down": n // 2, "power_step_up": n // 2}
        assert series.marks[0].t_s == 0.0 and series.marks[-1].t_s > 0.9 * n

    def test_vram_columns_stay_aligned(self) -> None:
        """Per-class VRAM columns keep one value per point after the series is thinned."""
        series = GpuSeries(label="vram", gpu_index=0)
        for k in range(50_000):
            vram = {"train": 4 * 1024**3} if k >= 25_000 else None
            series.add(float(k), 50.0, 100.0, 300.0, 300.0, vram)
        assert len(series.vram_bytes["train"]) == len(series.t_s) <= series.max_points
        assert series.vram_bytes["train"][0] == 0.0 and series.vram_bytes["train"][-1] == 4 * 1024**3
