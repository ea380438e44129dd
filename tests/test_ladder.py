"""The card-aware power ladder: percent rungs, the deep-cap refusal per GPU, check-config's
ladder display, and the acceptance runs (H100 hot inlet, RTX 4070 seed) through `simulate`."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from governor.backends.simulated import SimulatedBackend
from governor.cli import main
from governor.clock import VirtualClock
from governor.config import Config, ConfigError, PowerPolicy, check_resolved, load_config, parse_config, render_config
from governor.daemon import Daemon, VirtualWaiter
from governor.model import GpuInfo
from governor.notify import Notifier
from governor.rules.power import effective_ladder
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.whatif.simulate import SimSetup, compare
from tests.helpers import H100

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent

RTX4070 = GpuInfo(
    index=1,
    uuid="GPU-4070",
    name="NVIDIA GeForce RTX 4070",
    power_limit_min_w=100.0,
    power_limit_max_w=220.0,
    power_limit_default_w=200.0,
)


def write(tmp_path: Path, text: str, name: str = "governor.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestRungs:
    def test_built_in_default_fits_each_card(self) -> None:
        """The built-in ladder is 200 -> 180 W on an RTX 4070 and 700 -> 630 W on an H100."""
        ladder = PowerPolicy().ladder_w
        assert effective_ladder(ladder, RTX4070) == (200.0, 180.0)
        assert effective_ladder(ladder, H100) == (700.0, 630.0)

    def test_percent_rungs_are_clamped_to_the_range(self) -> None:
        """A percentage below the card's minimum limit is clamped to it and merged with its neighbour."""
        assert effective_ladder(("100%", "40%", "20%"), H100) == (700.0, 280.0, 200.0)
        assert effective_ladder(("100%", "45%", "40%"), RTX4070) == (200.0, 100.0)

    def test_no_default_falls_back_to_max_then_to_hands_off(self) -> None:
        """Without a default limit percentages use the maximum; with neither the ladder is empty (hands-off)."""
        no_default = replace(H100, power_limit_default_w=None)
        assert effective_ladder(("100%", "90%"), no_default) == (700.0, 630.0)
        unknown = replace(no_default, power_limit_max_w=None)
        assert effective_ladder(("100%", "90%"), unknown) == ()

    @pytest.mark.parametrize(
        ("ladder", "needle"),
        [
            (["100%", 180.0], "not mixed"),
            (["90%", "100%"], "strictly descending"),
            (["100%", "5%"], "between 10% and 100%"),
            (["120%"], "between 10% and 100%"),
            (["ninety%"], "percentage such as"),
            (["90 percent"], "percentage such as"),
        ],
    )
    def test_bad_rungs_are_refused(self, ladder: list[object], needle: str) -> None:
        """Mixed, ascending, out-of-range or unreadable rungs are errors naming power.ladder_w."""
        with pytest.raises(ConfigError) as caught:
            parse_config({"power": {"ladder_w": ladder}}, "f.toml")
        (issue,) = caught.value.issues
        assert issue.key.startswith("power.ladder_w") and needle in issue.expected

    def test_rendered_percent_ladder_reads_back_identically(self, tmp_path: Path) -> None:
        """check-config's rendering of a relative ladder loads back to the same config."""
        config = parse_config({"power": {"ladder_w": ["100%", "92.5%", "80%"]}}, "f.toml")
        path = write(tmp_path, render_config(config))
        again = load_config(path, enforce_trust=False)
        assert again.power == config.power and again.power.ladder_w == ("100%", "92.5%", "80%")
        assert render_config(again).splitlines()[1:] == render_config(config).splitlines()[1:]


class TestDeepCap:
    def test_absolute_ladder_far_below_default_is_refused_naming_the_gpu(self) -> None:
        """[200, 180] W on a 700 W H100 is an error naming index, name, uuid, default limit and every fix."""
        config = parse_config({"power": {"ladder_w": [200.0, 180.0]}}, "f.toml")
        assert check_resolved(config, [RTX4070]) == []
        (issue,) = check_resolved(config, [H100, RTX4070])
        text = str(issue)
        for needle in ("GPU 0", H100.name, H100.uuid, "700 W", '"100%"', "[[gpu]]", "power.allow_deep_cap = true"):
            assert needle in text, needle

    def test_opt_in_override_and_relative_ladder_are_accepted(self) -> None:
        """allow_deep_cap, a [[gpu]] ladder for the card, or a relative ladder each clear the refusal."""
        base = {"ladder_w": [200.0, 180.0]}
        opt_in = parse_config({"power": {**base, "allow_deep_cap": True}}, "f.toml")
        override = parse_config({"power": base, "gpu": [{"name": "*H100*", "power": {"ladder_w": [700.0]}}]}, "f")
        relative = parse_config({"power": {"ladder_w": ["100%", "50%"]}}, "f.toml")
        for config in (opt_in, override, relative):
            assert check_resolved(config, [H100, RTX4070]) == []

    def test_start_exits_3_with_one_line(self, tmp_path: Path) -> None:
        """`run --simulate h100-80gb` with an RTX-sized absolute ladder exits 3 with one line, never caps."""
        path = write(tmp_path, f'state_dir = "{tmp_path}/s"\nruntime_dir = ""\n[power]\nladder_w = [200.0, 180.0]\n')
        done = subprocess.run(
            [sys.executable, "-m", "governor", "run", "--simulate", "h100-80gb", "--config", str(path)],
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 3
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "700 W" in lines[0] and "allow_deep_cap" in lines[0], done.stderr

    def test_reload_is_refused_and_old_ladder_kept(self, tmp_path: Path) -> None:
        """A reload to a deep absolute ladder on an H100 is refused; the relative ladder stays in force."""
        from governor.backends.simulated import build_simulated_backend
        from governor.config import SimulationConfig

        clock = VirtualClock()
        backend = build_simulated_backend(SimulationConfig(profile="h100-80gb", scenario="idle"), clock)
        path = write(tmp_path, "[power]\nstep_down_at_c = 75.0\n")
        config = replace(load_config(path, enforce_trust=False), state_dir=str(tmp_path), runtime_dir="")
        daemon = Daemon(config, backend, clock, config_path=path, waiter=VirtualWaiter(clock), notifier=Notifier())
        daemon.reload_settle_s = 0.0
        daemon.start()
        try:
            path.write_text("[power]\nladder_w = [200.0, 180.0]\n")
            with capture_logs() as logs:
                assert daemon.reload() is False
            (failed,) = [e for e in logs if e["event"] == "config_reload_failed"]
            assert "allow_deep_cap" in failed["errors"][0]
            (plan,) = daemon.governor.plans.values()
            assert plan.ladder_w == (700.0, 630.0)
        finally:
            daemon.stop()

    def test_gpu_appearing_after_start_gets_no_deep_cap(self, tmp_path: Path) -> None:
        """With --wait-for-driver an H100 that appears late under a deep absolute ladder is logged and left uncapped."""
        from governor.backends import BackendUnavailable
        from governor.backends.deferred import DeferredBackend
        from governor.backends.simulated import build_simulated_backend
        from governor.config import SimulationConfig

        clock = VirtualClock()
        attempts = []

        def factory() -> SimulatedBackend:
            attempts.append(clock.monotonic())
            if len(attempts) == 1:
                raise BackendUnavailable("driver not loaded yet")
            return build_simulated_backend(SimulationConfig(profile="h100-80gb", scenario="hot-inlet-training"), clock)

        backend = DeferredBackend(factory, clock, name="simulated")
        config = replace(
            parse_config({"power": {"ladder_w": [200.0, 180.0], "debounce_samples": 1}}, "f.toml"),
            state_dir=str(tmp_path),
            runtime_dir="",
        )
        daemon = Daemon(config, backend, clock, waiter=VirtualWaiter(clock), notifier=Notifier())
        with capture_logs() as logs:
            daemon.start()
            for _ in range(400):
                clock.advance(1.0)
                daemon.tick()
            daemon.stop()
        assert any(e["event"] == "config_contradiction" and "allow_deep_cap" in e["detail"] for e in logs)
        assert not any(e["event"] == "power_limit_stepped" for e in logs)
        (plan,) = daemon.governor.plans.values()
        assert plan.policy.power.enabled is False


class TestCheckConfigLadder:
    def test_shows_the_ladder_per_profile(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """check-config --profile shows each profile's ladder in comments; the output still loads identically."""
        path = write(tmp_path, "[power]\nstep_down_at_c = 76.0\n")
        assert main(["check-config", str(path), "--profile", "h100-80gb", "--profile", "rtx4070"]) == 0
        out = capsys.readouterr().out
        assert "h100-80gb (NVIDIA H100 80GB HBM3, default 700 W, range 200 W-700 W): 700 -> 630 W" in out
        assert "rtx4070 (NVIDIA GeForce RTX 4070, default 200 W, range 100 W-220 W): 200 -> 180 W" in out
        rendered = write(tmp_path, out, "rendered.toml")
        assert tomllib.loads(out) == tomllib.loads(render_config(load_config(rendered, enforce_trust=False)))

    def test_all_profiles_and_the_refusal_are_shown(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """--profile all lists every built-in profile and marks the one a deep absolute ladder is refused on."""
        path = write(tmp_path, "[power]\nladder_w = [200.0, 180.0]\n")
        assert main(["check-config", str(path), "--profile", "all"]) == 0
        out = capsys.readouterr().out
        assert "h100-80gb" in out and "rtx4070" in out
        refused = [line for line in out.splitlines() if "REFUSED" in line]
        assert len(refused) == 1 and "700 W" in refused[0]

    def test_real_gpus_from_the_driver(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a driver (a fake pynvml) check-config shows each real GPU's ladder and exits 3 on a deep cap."""
        from tests.fake_pynvml import FakeGpu, FakeNvml

        monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([FakeGpu(uuid="GPU-real-h100")]))
        relative = write(tmp_path, "# defaults\n")
        assert main(["check-config", str(relative)]) == 0
        out = capsys.readouterr().out
        assert "the GPUs the NVIDIA driver reports" in out
        assert "GPU 0 GPU-real-h100 (NVIDIA H100 80GB HBM3, default 700 W, range 200 W-700 W): 700 -> 630 W" in out
        deep = write(tmp_path, "[power]\nladder_w = [200.0, 180.0]\n", "deep.toml")
        assert main(["check-config", str(deep)]) == 3
        err = capsys.readouterr().err
        assert "GPU-real-h100" in err and "allow_deep_cap" in err

    def test_without_a_driver_says_so_and_shows_profiles(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """With no NVIDIA driver, check-config says so and falls back to the built-in profiles."""
        try:
            import pynvml

            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
            pytest.skip("an NVIDIA driver is present here")
        except (ImportError, pynvml.NVMLError):
            pass
        path = write(tmp_path, "# defaults\n")
        assert main(["check-config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "no NVIDIA driver answered" in out and "h100-80gb" in out and "rtx4070" in out


class TestAcceptance:
    def test_h100_hot_inlet_keeps_throughput_and_steps_gently(self) -> None:
        """simulate, H100 in a 44 C inlet past 75 C at 700 W: defaults keep >= 90 % and first step to >= 630 W."""
        setup = SimSetup(load_profile("h100-80gb"), load_scenario("hot-inlet-training"), 3600.0)
        comparison = compare(setup, [Config(source="defaults")], ["defaults"])
        base, (run,) = comparison.baseline, comparison.runs
        assert dict(base.gpus[0].seconds_above)[75.0] > 600  # the scenario really crosses the step-down
        ratio = run.gpus[0].work_s / base.gpus[0].work_s
        limits = [w for w in run.series[0].limit_w if w == w]
        first_step = next(w for w in limits if w < 700.0 - 1.0)
        assert ratio >= 0.90, ratio
        assert 630.0 - 0.5 <= first_step < 700.0, first_step
        assert dict(run.decision_counts).get("power_step_down", 0) >= 1

    def test_hot_inlet_scenario_does_what_the_docs_say(self) -> None:
        """hot-inlet-training on h100-80gb: past 75 C within 3 min at 700 W, settling near 81 C (docs/simulation.md)."""
        setup = SimSetup(load_profile("h100-80gb"), load_scenario("hot-inlet-training"), 1800.0)
        baseline = compare(setup, [Config(source="defaults")], ["defaults"]).baseline
        series = baseline.series[0]
        first_hot = next(t for t, c in zip(series.t_s, series.temperature_c, strict=True) if c >= 75.0)
        assert first_hot <= 180.0, first_hot
        assert 79.5 <= series.temperature_c[-1] <= 82.5
        assert {round(w) for w in series.limit_w if w == w} == {700}

    def test_rtx4070_seed_benchmark_unchanged(self) -> None:
        """The seed case (rtx4070, sustained-inference) still steps 200 -> 180 W and spends 0 s above 80 C."""
        setup = SimSetup(load_profile("rtx4070"), load_scenario("sustained-inference"), 4 * 3600.0)
        comparison = compare(setup, [Config(source="defaults")], ["defaults"])
        (run,) = comparison.runs
        limits = {round(w, 3) for w in run.series[0].limit_w if w == w}
        assert limits == {200.0, 180.0}
        assert dict(run.gpus[0].seconds_above)[80.0] == 0
        assert dict(comparison.baseline.gpus[0].seconds_above)[80.0] > 0
