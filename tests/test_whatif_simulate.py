"""`gpu-governor simulate`: the daemon on a simulated GPU, deterministic per seed, compared to no governor."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

from governor.cli import main
from governor.config import Config, PowerPolicy
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.whatif.common import WhatIfError, format_duration, parse_duration, without_governor
from governor.whatif.progress import Progress
from governor.whatif.simulate import SimSetup, busiest_window, compare, render_comparison, run_policy


def setup(scenario: str = "sustained-inference", duration_s: float = 3600.0, seed: int = 0, gpus: int = 1) -> SimSetup:
    """An RTX 4070 running ``scenario``."""
    return SimSetup(load_profile("rtx4070"), load_scenario(scenario), duration_s, seed=seed, gpu_count=gpus)


def numbers(s: SimSetup) -> list[tuple[object, ...]]:
    """Every reported number of a default-config comparison, per run and GPU."""
    c = compare(s, [Config(source="defaults")], ["defaults"])
    return [
        (g.peak_c, g.seconds_above, g.limit_changes, g.work_s, g.energy_j, run.decision_counts)
        for run in (c.baseline, *c.runs)
        for g in run.gpus
    ]


class TestDeterminism:
    def test_same_seed_same_numbers(self) -> None:
        """Two runs with one seed report exactly the same numbers."""
        assert numbers(setup(seed=3)) == numbers(setup(seed=3))

    def test_other_seed_other_noise(self) -> None:
        """Another seed changes the power noise, so energy and peak temperature differ."""
        a, b = numbers(setup(seed=3)), numbers(setup(seed=4))
        assert a[1][4] != b[1][4]  # energy of the governed run
        assert a[0][0] != b[0][0]  # peak without governor


class TestOutcomes:
    def test_governor_against_no_governor(self) -> None:
        """On the warm-room scenario the defaults stay below 80 C where no governor passes it, for ~1 % of work."""
        c = compare(setup(duration_s=2700.0), [Config(source="defaults")], ["defaults"])
        base, governed = c.baseline.gpus[0], c.runs[0].gpus[0]
        above = dict(governed.seconds_above)
        assert c.thresholds_c == (70.0, 75.0, 80.0, 85.0, 95.0)
        assert base.peak_c > 80.0 > governed.peak_c
        assert dict(base.seconds_above)[80.0] > 0 and above[80.0] == 0
        # 200 -> 180 -> 200 in the first cycle, 200 -> 180 in the second; the backoff then holds 180 W.
        assert base.limit_changes == 0 and governed.limit_changes == 3
        assert 0.95 < governed.work_s / base.work_s < 1.0
        assert governed.energy_j < base.energy_j

    def test_naive_rule_changes_more(self) -> None:
        """The naive rule (no debounce, dwell or backoff) changes the limit more often than the defaults."""
        naive = Config(
            source="naive",
            power=PowerPolicy(debounce_samples=1, dwell_s=0.0, min_change_interval_s=0.0, flap_window_s=0.0),
        )
        c = compare(setup(duration_s=3 * 3600.0), [naive, Config(source="defaults")], ["naive", "defaults"])
        (n,), (d,) = c.runs[0].gpus, c.runs[1].gpus
        assert n.limit_changes == 24 and d.limit_changes < n.limit_changes
        assert d.peak_c <= n.peak_c + 0.5

    def test_lost_gpu_reported(self) -> None:
        """On gpu-lost, GPU 1 is reported lost at 120 s and GPU 0 goes on."""
        run = run_policy(setup("gpu-lost", 300.0, gpus=2), Config(), "defaults", (75.0,))
        assert [g.lost_at_s for g in run.gpus] == [None, 120.0]
        assert run.gpus[0].work_s > 2 * run.gpus[1].work_s

    def test_no_governor_turns_overrides_off_too(self) -> None:
        """The baseline disables the ladder in [[gpu]] overrides and VRAM enforcement as well."""
        from governor.config import parse_config

        cfg = parse_config({"gpu": [{"index": 0, "power": {"enabled": True}}]}, "f")
        off = without_governor(cfg)
        assert not off.power.enabled and not off.vram.enabled
        assert off.gpus[0].power["enabled"] is False

    def test_table(self) -> None:
        """The table has a row per policy with every threshold column and the throughput against no governor."""
        c = compare(setup(duration_s=600.0), [Config(source="defaults")], ["defaults"])
        text = render_comparison(c)
        header = next(line for line in text.splitlines() if line.startswith("policy"))
        assert header.split()[:3] == ["policy", "peak", "C"]
        for column in (">70 C s", ">75 C s", ">80 C s", ">85 C s", ">95 C s", "changes/h", "throughput", "energy kWh"):
            assert column in header
        rows = [line for line in text.splitlines() if line.endswith(tuple("0123456789")) and "%" in line]
        assert len(rows) == 2 and rows[0].split()[-3:-1] == ["100.0", "%"]


class TestDurations:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("24h", 86400.0), ("90m", 5400.0), ("3600s", 3600.0), ("3600", 3600.0), ("1h30m", 5400.0), ("1.5d", 129600.0)],
    )
    def test_accepted(self, text: str, seconds: float) -> None:
        """Hours, minutes, seconds, days, bare seconds and combinations are read as seconds."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "abc", "10x", "h", "-5m", "0s", "400d", "5 m s"])
    def test_rejected(self, text: str) -> None:
        """Anything else, zero and more than a year are errors that name the option."""
        with pytest.raises(WhatIfError, match="--duration"):
            parse_duration(text)

    def test_formatted_back(self) -> None:
        """Durations print compactly."""
        formatted = [format_duration(s) for s in (86400.0, 5400.0, 90.0, 30.0, 0.5)]
        assert formatted == ["24h", "1h30m", "1m30s", "30s", "0.5s"]

    def test_busiest_window(self) -> None:
        """The busiest hour counts changes in any 3600 s, not per clock hour."""
        assert busiest_window([]) == 0
        assert busiest_window([0.0, 3599.0, 3600.0, 3700.0, 9000.0]) == 3


class FakeTty(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        """Pretend to be a terminal."""
        return True


class TestProgress:
    def test_terminal_gets_carriage_return_percentages(self) -> None:
        """On a terminal each whole percent is written once after a carriage return, then erased."""
        stream = FakeTty()
        progress = Progress(stream)
        progress.start("simulating defaults", 200.0)
        for t in range(201):
            progress.update(float(t))
        progress.finish()
        text = stream.getvalue()
        assert text.count("\r") == 101 + 2  # 0..100 %, then the line erased between two carriage returns
        assert "\rsimulating defaults:  50%" in text and "\rsimulating defaults: 100%" in text
        assert text.endswith("\r") and "\n" not in text

    def test_nothing_when_not_a_terminal(self) -> None:
        """A pipe or file gets nothing at all."""
        stream = io.StringIO()
        progress = Progress(stream)
        progress.start("x", 10.0)
        progress.update(5.0)
        progress.finish()
        assert stream.getvalue() == ""

    def test_simulate_command_shows_progress_on_a_terminal_only(self) -> None:
        """The simulate command writes progress to a terminal stderr and nothing to a captured one."""
        argv = ["simulate", "--profile", "rtx4070", "--scenario", "idle", "--duration", "5m"]
        tty, plain = FakeTty(), io.StringIO()
        assert main(argv, out=io.StringIO(), err=tty) == 0
        assert main(argv, out=io.StringIO(), err=plain) == 0
        assert "\rsimulating no governor:" in tty.getvalue() and "\rsimulating defaults: 100%" in tty.getvalue()
        assert plain.getvalue() == ""


class TestSimulateCli:
    def run(self, *argv: str) -> tuple[int, str, str]:
        """Run the CLI; (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        return main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()

    def test_compare_side_by_side(self, tmp_path: Path) -> None:
        """--compare adds one row per config, labelled by file name, after the no-governor row."""
        (tmp_path / "slow.toml").write_text("[power]\ndwell_s = 120.0\n", encoding="utf-8")
        code, out, err = self.run(
            "simulate",
            "--profile",
            "rtx4070",
            "--scenario",
            "hot",
            "--duration",
            "10m",
            "--compare",
            str(tmp_path / "slow.toml"),
        )
        assert (code, err) == (0, "")
        labels = [line.split()[0] for line in out.splitlines() if "%" in line]
        assert labels == ["no", "defaults", "slow"]

    def test_bad_duration_is_one_line(self) -> None:
        """A duration that cannot be read: one line on stderr, exit code 2."""
        code, out, err = self.run("simulate", "--profile", "rtx4070", "--scenario", "idle", "--duration", "ten")
        assert (code, out) == (2, "")
        assert err == "gpu-governor: --duration: expected a duration such as 24h, 90m or 3600s, got 'ten'\n"

    def test_unknown_scenario_is_a_config_error(self) -> None:
        """A scenario name that is not shipped is reported with the shipped names, exit code 3."""
        code, _, err = self.run("simulate", "--profile", "rtx4070", "--scenario", "nope", "--duration", "1m")
        assert code == 3 and "sustained-inference" in err

    def test_too_few_gpus_for_the_scenario(self) -> None:
        """--gpus 1 on a scenario that names GPU 1 is an error naming how many it needs."""
        code, _, err = self.run(
            "simulate", "--profile", "rtx4070", "--scenario", "gpu-lost", "--duration", "1m", "--gpus", "1"
        )
        assert code == 3 and "gpu_count = 2" in err


def test_dry_run_config_still_governs() -> None:
    """A config with dry_run = true is simulated acting: a what-if run always acts on its simulated GPU."""
    s = setup(duration_s=900.0)
    run = run_policy(s, replace(Config(), dry_run=True), "dry", (80.0,))
    assert run.gpus[0].limit_changes == 2
