"""The seed case end to end: a simulated RTX 4070 under sustained inference in a warm room."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from structlog.testing import capture_logs

from governor.backends.simulated import build_simulated_backend
from governor.clock import VirtualClock
from governor.config import Config, SimulationConfig
from governor.daemon import Daemon
from governor.metrics import build_registry
from governor.notify import Notifier
from tests.builders import StopAt

CYCLE_S = 900.0  # the scenario: 600 s serving at the power cap, 300 s quiet


def run_cycles(tmp_path: Path, cycles: int, *, dry_run: bool = False) -> tuple[Daemon, list[MutableMapping[str, Any]]]:
    clock = VirtualClock()
    sim = SimulationConfig(profile="rtx4070", scenario="sustained-inference", seed=1)
    backend = build_simulated_backend(sim, clock)
    config = Config(state_dir=str(tmp_path), backend="simulated", simulation=sim, dry_run=dry_run)
    daemon = Daemon(config, backend, clock, waiter=StopAt(clock, cycles * CYCLE_S - 1), notifier=Notifier())
    with capture_logs() as logs:
        assert daemon.run() == 0
    return daemon, logs


class TestSustainedInference:
    def test_steps_200_to_180_when_hot_and_back_after_cooling(self, tmp_path: Path) -> None:
        """The first cycle steps 200 -> 180 W past 75 C and back once below 65 C for the dwell; the next step
        down, soon after, backs the dwell off past the 280 s a quiet phase gives: the card then stays at 180 W."""
        _, logs = run_cycles(tmp_path, 3)
        steps = [e for e in logs if e["event"] == "power_limit_stepped"]
        assert [(e["from_w"], e["to_w"]) for e in steps] == [(200.0, 180.0), (180.0, 200.0), (200.0, 180.0)]
        for down in steps[::2]:
            assert down["rule"] == "power_step_down" and float(down["temperature_c"]) >= 75.0
        up = steps[1]
        assert up["rule"] == "power_step_up" and float(up["temperature_c"]) <= 65.0
        assert all(e["outcome"] == "applied" for e in steps)
        # The first step up waits the configured 60 s dwell; the quick step down after it backs
        # the next dwell off until it outlasts that release (480 s), longer than a quiet phase.
        assert "(dwell 60 s)" in str(up["reason"])
        assert "next step up after 480 s of cool" in str(steps[2]["reason"])

    def test_steps_show_in_the_metrics(self, tmp_path: Path) -> None:
        """The decisions counter and the enforced limit reflect every step."""
        daemon, _ = run_cycles(tmp_path, 2)
        body = generate_latest(build_registry(lambda: daemon.published)).decode()
        assert (
            'gpu_governor_decisions_total{action="set_power_limit",gpu="0",'
            'rule="power_step_down",uuid="GPU-sim-rtx4070-0"} 2.0' in body
        )
        assert (
            'gpu_governor_decisions_total{action="set_power_limit",gpu="0",'
            'rule="power_step_up",uuid="GPU-sim-rtx4070-0"} 1.0' in body
        )
        # The run ends with the daemon stopped: its restore is a decision and an applied action too.
        assert (
            'gpu_governor_decisions_total{action="set_power_limit",gpu="0",'
            'rule="restore_on_stop",uuid="GPU-sim-rtx4070-0"} 1.0' in body
        )
        assert (
            'gpu_governor_actions_total{action="set_power_limit",gpu="0",'
            'outcome="applied",uuid="GPU-sim-rtx4070-0"} 4.0' in body
        )

    def test_dry_run_leaves_the_gpu_at_200_w(self, tmp_path: Path) -> None:
        """Under dry-run the simulated GPU stays at 200 W while every would-be step is logged."""
        daemon, logs = run_cycles(tmp_path, 1, dry_run=True)
        would = [(e["from_w"], e["to_w"]) for e in logs if e["event"] == "power_limit_would_set"]
        assert would == [(200.0, 180.0), (180.0, 200.0)]
        assert daemon.snapshot is not None
        assert daemon.snapshot.gpus[0].power_limit_w == 200.0
