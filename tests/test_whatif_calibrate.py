"""`gpu-governor calibrate`: fits written traces back to known parameters, checks, profiles, errors."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from governor.cli import main
from governor.model import GpuInfo, GpuReading
from governor.sim.calibrate import predict
from governor.sim.profiles import load_profile
from governor.sim.thermal import ThermalParams
from governor.trace import device_record, sample_record, write_records

TRUE = ThermalParams(r_die_c_per_w=0.05, c_die_j_per_c=30.0, r_sink_c_per_w=0.2, c_sink_j_per_c=300.0)
TRUE_AMBIENT_C = 28.0
CARD = GpuInfo(
    index=0,
    uuid="GPU-synthetic-0",
    name="Synthetic Card",
    power_limit_min_w=100.0,
    power_limit_max_w=220.0,
    power_limit_default_w=200.0,
    temperature_slowdown_c=90.0,
    temperature_shutdown_c=95.0,
    memory_total_bytes=12 * 1024**3,
    driver_version="test",
)


def power_at(i: int, shift: int) -> float:
    """A load pattern: idle, busy with a wobble, half load, idle; ``shift`` moves it in time."""
    k = (i + shift) % 400
    if 20 <= k < 160:
        return 190.0 + 6.0 * math.sin(k / 4.0)
    if 220 <= k < 280:
        return 120.0
    return 12.0


def write_trace(path: Path, shift: int = 0, gpus: int = 1, seconds: int = 400) -> None:
    """A 1 Hz trace in the trace format whose temperatures the two-node model with TRUE produced."""
    t = [float(i) for i in range(seconds)]
    power = [power_at(i, shift) for i in range(seconds)]
    temps = predict(TRUE, t, power, TRUE_AMBIENT_C + power[0] * TRUE.r_total_c_per_w, TRUE_AMBIENT_C)
    records = []
    for g in range(gpus):
        info = GpuInfo(**{**{f: getattr(CARD, f) for f in CARD.__dataclass_fields__}, "index": g, "uuid": f"GPU-s-{g}"})
        records.append(device_record(info, 1.0, "synthetic"))
    for i in range(seconds):
        for g in range(gpus):
            reading = GpuReading(
                index=g,
                uuid=f"GPU-s-{g}",
                temperature_c=temps[i],
                power_w=power[i],
                power_limit_w=200.0,
                memory_used_bytes=300 * 1024**2,
                memory_total_bytes=CARD.memory_total_bytes,
                utilization_gpu_ratio=0.0 if power[i] < 20 else 1.0,
                clock_event_reasons=0x1 if power[i] < 20 else 0,
                processes=(),
            )
            records.append(sample_record(t[i], reading))
    with open(path, "w", encoding="utf-8") as handle:
        write_records(handle, records)


def run(*argv: str) -> tuple[int, str, str]:
    """Run the CLI; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class TestCalibrate:
    def test_recovers_known_parameters_through_the_cli(self, tmp_path: Path) -> None:
        """A trace the model itself produced is fitted back (within 2 %) into a profile that loads."""
        trace, profile_path = tmp_path / "card.jsonl", tmp_path / "my-card.toml"
        write_trace(trace)
        code, out, err = run("calibrate", str(trace), "--output", str(profile_path))
        assert (code, err) == (0, "")
        assert "fit RMSE 0.0" in out
        profile = load_profile(str(profile_path))
        fitted = profile.thermal
        assert fitted.r_die_c_per_w == pytest.approx(TRUE.r_die_c_per_w, rel=0.02)
        assert fitted.r_sink_c_per_w == pytest.approx(TRUE.r_sink_c_per_w, rel=0.02)
        assert fitted.c_sink_j_per_c == pytest.approx(TRUE.c_sink_j_per_c, rel=0.02)
        assert fitted.c_die_j_per_c == pytest.approx(TRUE.c_die_j_per_c, rel=0.02)
        assert profile.ambient_c == pytest.approx(TRUE_AMBIENT_C, abs=0.05)
        assert (profile.name, profile.gpu_name, profile.power_limit_default_w) == ("my-card", "Synthetic Card", 200.0)
        assert profile.idle_power_w == 12.0

    def test_check_reports_the_error_on_another_trace(self, tmp_path: Path) -> None:
        """--check predicts a differently shaped trace of the same card with a near-zero RMSE."""
        first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        write_trace(first)
        write_trace(second, shift=130)
        code, out, _ = run("calibrate", str(first), "--check", str(second))
        assert code == 0
        (line,) = [x for x in out.splitlines() if "check RMSE" in x]
        assert float(line.split()[2]) < 0.05
        assert str(second) in line

    def test_written_profile_runs_a_simulation(self, tmp_path: Path) -> None:
        """The profile calibrate writes is accepted by simulate --profile."""
        trace, profile_path = tmp_path / "card.jsonl", tmp_path / "card.toml"
        write_trace(trace)
        assert run("calibrate", str(trace), "-o", str(profile_path))[0] == 0
        code, out, _ = run("simulate", "--profile", str(profile_path), "--scenario", "idle", "--duration", "2m")
        assert code == 0
        assert "Synthetic Card (profile card)" in out

    def test_every_gpu_fitted_and_output_needs_a_choice(self, tmp_path: Path) -> None:
        """With two GPUs both are fitted; --output without --gpu is a one-line usage error, with --gpu it works."""
        trace = tmp_path / "two.jsonl"
        write_trace(trace, gpus=2, seconds=300)
        code, out, _ = run("calibrate", str(trace))
        assert code == 0 and "gpu0 (" in out and "gpu1 (" in out
        code, out, err = run("calibrate", str(trace), "--output", str(tmp_path / "p.toml"))
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "--gpu" in err
        assert run("calibrate", str(trace), "--gpu", "1", "--output", str(tmp_path / "p.toml"))[0] == 0


class TestCalibrateErrors:
    def test_missing_trace_is_one_line(self, tmp_path: Path) -> None:
        """A trace that does not exist: one line naming it on stderr, exit code 2."""
        code, out, err = run("calibrate", str(tmp_path / "nope.jsonl"))
        assert (code, out) == (2, "")
        assert err.count("\n") == 1
        assert err.startswith("gpu-governor: ") and "nope.jsonl" in err and "cannot open" in err

    def test_malformed_trace_is_one_line(self, tmp_path: Path) -> None:
        """A file that is not a trace: one line naming the file and line, exit code 2."""
        bad = tmp_path / "bad.jsonl"
        bad.write_text("not json\n", encoding="utf-8")
        code, _, err = run("calibrate", str(bad))
        assert code == 2 and err.count("\n") == 1 and f"{bad}:1" in err

    def test_unknown_gpu_is_one_line(self, tmp_path: Path) -> None:
        """--gpu naming a GPU the trace lacks: one line listing the GPUs it has."""
        trace = tmp_path / "card.jsonl"
        write_trace(trace, seconds=50)
        code, _, err = run("calibrate", str(trace), "--gpu", "3")
        assert code == 2 and err.count("\n") == 1 and "GPUs with samples: 0" in err
