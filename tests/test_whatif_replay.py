"""`gpu-governor replay`: a hand-made trace through the rules, decision by decision."""

from __future__ import annotations

import io
from pathlib import Path

from governor.cli import main
from governor.config import Config, load_config
from governor.model import Action, ThermalZone
from governor.rules.engine import GpuPlan, GpuRuleState, evaluate
from governor.trace import read_trace
from governor.whatif.common import NOT_A_PID, NameInspector
from governor.whatif.replay import render_replay, replay_trace
from tests.builders import REPLAY_CARD, GiB, replay_temperature_at, write_trace

GIB = GiB
CARD = REPLAY_CARD
temperature_at = replay_temperature_at
CONFIG = """
[[class]]
name = "leaky"
budget = "3GiB"
action = "terminate"
grace_s = 5.0
match = { name = "leaky" }

[[class]]
name = "daemon"
budget = "1GiB"
match = { unit = "thing.service" }
"""


def config(tmp_path: Path) -> Config:
    """The test config: a 3 GiB 'leaky' class matched by name, and a class matched by unit."""
    path = tmp_path / "replay.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_config(path, enforce_trust=False)


class TestReplay:
    def test_exact_timeline(self, tmp_path: Path) -> None:
        """Zones, one step down after three hot samples, the step up after the 60 s dwell, one budget report."""
        write_trace(tmp_path / "t.jsonl")
        result = replay_trace(read_trace(tmp_path / "t.jsonl"), config(tmp_path))
        timeline = [(d.t_s, d.rule, d.from_value, d.to_value) for d in result.decisions]
        assert timeline == [
            (0.0, "thermal_zone", "unknown", "optimal"),
            (5.0, "thermal_zone", "optimal", "warning"),
            (7.0, "power_step_down", 200.0, 180.0),
            (8.0, "thermal_zone", "warning", "hot"),
            (9.0, "thermal_zone", "hot", "optimal"),
            (20.0, "vram_over_budget", "leaky", "none"),
            (69.0, "power_step_up", 180.0, 200.0),
        ]
        report = result.decisions[5]
        assert (report.pid, report.process_class, report.action) == (100, "leaky", Action.NONE)

    def test_matches_the_rules_run_directly(self, tmp_path: Path) -> None:
        """Replay decides exactly what engine.evaluate decides on the same snapshots with name-only facts."""
        write_trace(tmp_path / "t.jsonl")
        trace = read_trace(tmp_path / "t.jsonl")
        cfg = config(tmp_path)
        result = replay_trace(trace, cfg)
        plans = {CARD.uuid: GpuPlan.build(trace.devices[0].info, cfg.policy_for(trace.devices[0].info))}
        classifier = NameInspector(NOT_A_PID)
        states: dict[str, GpuRuleState] = {}
        direct = []
        for snapshot in trace.snapshots():
            facts = {p.pid: classifier.facts(p.pid, p.name, cfg.vram) for r in snapshot.gpus for p in r.processes or ()}
            states, decided = evaluate(snapshot, plans, states, dry_run=True, vram=cfg.vram, facts=facts)
            direct.extend(decided)
        assert list(result.decisions) == direct
        assert classifier.facts(100, "leaky", cfg.vram).start_time is None

    def test_summary(self, tmp_path: Path) -> None:
        """Time in each zone, two would-be limit changes, one violation of 61 s, two would-be sets."""
        write_trace(tmp_path / "t.jsonl")
        (gpu,) = replay_trace(read_trace(tmp_path / "t.jsonl"), config(tmp_path)).gpus
        assert dict(gpu.zone_s) == {ThermalZone.OPTIMAL: 77.0, ThermalZone.WARNING: 3.0, ThermalZone.HOT: 1.0}
        assert gpu.limit_changes == 2
        (violation,) = gpu.violations
        assert (violation.pid, violation.klass, violation.peak_bytes, violation.over_s) == (100, "leaky", 4 * GIB, 61.0)
        assert gpu.actions == (
            ("set_power_limit (power_step_down)", 1),
            ("set_power_limit (power_step_up)", 1),
        )

    def test_notes_classes_a_trace_cannot_match(self, tmp_path: Path) -> None:
        """A class that matches on unit is named in a note: a trace holds process names only."""
        write_trace(tmp_path / "t.jsonl")
        text = render_replay(replay_trace(read_trace(tmp_path / "t.jsonl"), config(tmp_path)))
        assert "class daemon matches on unit" in text
        assert "open loop" in text


class TestReplayCli:
    def test_prints_timeline_and_summary(self, tmp_path: Path) -> None:
        """The command prints every decision line and the per-GPU summary, exit code 0."""
        write_trace(tmp_path / "t.jsonl")
        (tmp_path / "c.toml").write_text(CONFIG, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        code = main(["replay", str(tmp_path / "t.jsonl"), "--config", str(tmp_path / "c.toml")], out=out, err=err)
        text = out.getvalue()
        assert (code, err.getvalue()) == (0, "")
        assert "decisions (7):" in text
        step = next(line for line in text.splitlines() if "power_step_down" in line)
        assert "t=      7.0 s" in step and "would set 200 -> 180 W" in step
        assert "time in zone: optimal 77 s (95.1 %), warning 3 s (3.7 %), hot 1 s (1.2 %)" in text
        assert "would-be limit changes: 2" in text
        assert "pid 100 (leaky), class leaky: up to 4GiB > budget 3GiB, over for 61 s from t=20 s" in text

    def test_missing_trace_is_one_line(self, tmp_path: Path) -> None:
        """A missing trace: one line on stderr, exit code 2, nothing on stdout."""
        out, err = io.StringIO(), io.StringIO()
        code = main(["replay", str(tmp_path / "none.jsonl")], out=out, err=err)
        assert (code, out.getvalue()) == (2, "")
        assert err.getvalue().count("\n") == 1 and "none.jsonl" in err.getvalue()

    def test_bad_config_is_a_config_error(self, tmp_path: Path) -> None:
        """An invalid --config is reported like check-config does: exit code 3."""
        write_trace(tmp_path / "t.jsonl")
        (tmp_path / "bad.toml").write_text("[power]\ndwell_s = -1\n", encoding="utf-8")
        err = io.StringIO()
        code = main(["replay", str(tmp_path / "t.jsonl"), "--config", str(tmp_path / "bad.toml")], io.StringIO(), err)
        assert code == 3 and "power.dwell_s" in err.getvalue()
