"""Target mode and the node budget end to end: the shipped examples through the real loop in the simulator."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import replace
from pathlib import Path

from prometheus_client import generate_latest

from governor.backends.simulated import build_simulated_backend
from governor.cli import main
from governor.clock import VirtualClock
from governor.config import Config, SimulationConfig, check_resolved, load_config
from governor.daemon import Daemon
from governor.metrics import build_registry
from governor.notify import Notifier
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.whatif.simulate import SimSetup, compare
from tests.builders import StopAt

REPO = Path(__file__).resolve().parents[1]
TARGET_EXAMPLE = REPO / "config" / "examples" / "rtx4070-target.toml"
BUDGET_EXAMPLE = REPO / "config" / "examples" / "workstation-node-budget.toml"


def example(path: Path) -> Config:
    """A shipped example, loaded as the daemon would (minus the root-ownership check)."""
    return load_config(path, enforce_trust=False)


class TestExamples:
    def test_examples_fit_their_cards(self) -> None:
        """Both examples load and ask nothing an RTX 4070 (one, or two for the budget) cannot do."""
        backend = build_simulated_backend(SimulationConfig(profile="rtx4070", gpu_count=2), VirtualClock())
        target, budget = example(TARGET_EXAMPLE), example(BUDGET_EXAMPLE)
        assert target.power.target_mode and target.power.target_c == 75.0
        assert budget.node.power_budget_w == 300.0 and budget.power.target_mode
        assert check_resolved(target, backend.gpus()[:1]) == []
        assert check_resolved(budget, backend.gpus()) == []

    def test_check_config_shows_target_mode_and_no_deep_cap(self) -> None:
        """check-config names target mode and its limit range per card; an absolute ladder left in a
        target-mode file is no deep cap on an H100 (target mode never sets more than the default)."""
        out, err = io.StringIO(), io.StringIO()
        assert main(["check-config", str(TARGET_EXAMPLE), "--profile", "all"], out=out, err=err) == 0
        text = out.getvalue()
        assert (
            "rtx4070 (NVIDIA GeForce RTX 4070, default 200 W, range 100 W-220 W): target mode: at or below 75 C" in text
        )
        assert "h100-80gb" in text and "limit 200-700 W" in text
        backend = build_simulated_backend(SimulationConfig(profile="h100-80gb"), VirtualClock())
        config = example(TARGET_EXAMPLE)
        config = replace(config, power=replace(config.power, ladder_w=(200.0, 180.0)))
        assert check_resolved(config, backend.gpus()) == []

    def test_budget_below_the_minimums_is_refused(self) -> None:
        """A 150 W budget for two cards whose minimum limits add up to 200 W is a contradiction, named."""
        backend = build_simulated_backend(SimulationConfig(profile="rtx4070", gpu_count=2), VirtualClock())
        config = example(BUDGET_EXAMPLE)
        config = replace(config, node=replace(config.node, power_budget_w=150.0))
        issues = check_resolved(config, backend.gpus())
        assert [i.key for i in issues] == ["node.power_budget_w"] and "at least 200 W" in issues[0].expected


class TestSeedValidation:
    def test_rtx4070_target_meets_the_seed_validation(self) -> None:
        """rtx4070-target.toml on the seed's sustained inference (3 h): 0 s above 75 C, at least 95 % of the
        no-governor throughput, never a limit above 200 W, at most 4 changes in any hour."""
        setup = SimSetup(load_profile("rtx4070"), load_scenario("sustained-inference"), 3 * 3600.0, seed=0)
        c = compare(setup, [example(TARGET_EXAMPLE)], ["target"])
        base, run = c.baseline.gpus[0], c.runs[0]
        g = run.gpus[0]
        assert dict(g.seconds_above)[75.0] == 0.0 < dict(base.seconds_above)[75.0]
        assert g.work_s >= 0.95 * base.work_s
        assert g.busiest_hour_changes <= 4
        assert max(run.series[0].limit_w) <= 200.0
        assert run.decision_counts and dict(run.decision_counts).get("power_target_down", 0) >= 1


class TestNodeBudget:
    def test_budget_holds_and_beats_a_static_split(self) -> None:
        """workstation-node-budget.toml on two GPUs taking turns (one cycle, 105 min): the sum of the limits
        never goes above 300 W after any write, and the two do more work than under a static 150/150 split."""
        setup = SimSetup(load_profile("rtx4070"), load_scenario("node-budget-pair"), 6300.0, seed=0, gpu_count=2)
        demand = example(BUDGET_EXAMPLE)
        static = replace(demand, node=replace(demand.node, share="weight"))
        c = compare(setup, [demand, static], ["demand", "static"])
        by_demand, by_weight = c.runs
        assert by_demand.limit_sum_max_w is not None and by_demand.limit_sum_max_w <= 300.0
        assert by_weight.limit_sum_max_w is not None and by_weight.limit_sum_max_w <= 300.0
        assert c.baseline.limit_sum_max_w == 400.0  # no governor: both cards at their 200 W default
        work = sum(g.work_s for g in by_demand.gpus)
        assert work > sum(g.work_s for g in by_weight.gpus)


class TestSimulateJson:
    def test_document_has_the_issue_fields(self) -> None:
        """`simulate --json` prints one document whose policies carry name, peak_c, seconds_above_c (threshold
        as text -> seconds), changes_per_hour, busiest_hour_changes, throughput_ratio and energy_kwh."""
        out, err = io.StringIO(), io.StringIO()
        args = ["simulate", "--profile", "rtx4070", "--scenario", "sustained-inference", "--duration", "30m"]
        args += ["--config", str(TARGET_EXAMPLE), "--json"]
        assert main(args, out=out, err=err) == 0
        doc = json.loads(out.getvalue())
        names = [p["name"] for p in doc["policies"]]
        assert names[0] == "no governor" and len(names) == 2
        for policy in doc["policies"]:
            for key in ("peak_c", "changes_per_hour", "busiest_hour_changes", "throughput_ratio", "energy_kwh"):
                assert isinstance(policy[key], (int, float)), key
            assert set(policy["seconds_above_c"]) >= {"75", "80"}
            assert all(isinstance(s, float) for s in policy["seconds_above_c"].values())
            assert 0.0 <= policy["throughput_ratio"] <= 1.0
        base, target = doc["policies"]
        assert base["throughput_ratio"] == 1.0 and base["seconds_above_c"]["75"] > 0
        assert target["seconds_above_c"]["75"] == 0.0 and target["peak_c"] < base["peak_c"]


class TestModelMetrics:
    def test_prediction_error_is_exported(self, tmp_path: Path) -> None:
        """A target-mode daemon exports the model's 60-s prediction error and fit per GPU; a ladder one does not."""
        for mode, present in (("target", True), ("ladder", False)):
            clock = VirtualClock()
            sim = SimulationConfig(profile="rtx4070", scenario="sustained-inference", seed=1)
            config = Config(state_dir=str(tmp_path / mode), backend="simulated", simulation=sim)
            config = replace(config, power=replace(config.power, mode=mode))
            backend = build_simulated_backend(sim, clock)
            daemon = Daemon(config, backend, clock, waiter=StopAt(clock, 900.0), notifier=Notifier())
            assert daemon.run() == 0
            body = generate_latest(build_registry(functools.partial(getattr, daemon, "published"))).decode()
            for family in (
                "gpu_governor_gpu_model_prediction_error_celsius{",
                "gpu_governor_gpu_model_prediction_rmse_celsius{",
                'gpu_governor_gpu_model_fitted{gpu="0",uuid=',
            ):
                assert (family in body) is present, (mode, family)
