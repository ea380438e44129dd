"""The policy module and its seams: what the rules may import, the str enums, typed decisions."""

from __future__ import annotations

import ast
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
import structlog

import governor.model
from governor.logsetup import configure, get_logger
from governor.model import Decision
from governor.policy import Action, ProcessAction, ProcessClass, ProcessMatch, Rule, ThermalZone

GOVERNOR = Path(governor.model.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (function bodies and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.level:
                raise AssertionError(f"{path}: relative import of {node.module}")
            found.add(node.module)
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """The names ``path`` imports from ``module``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == module:
            names.update(alias.name for alias in node.names)
    return names


def outside_stdlib(modules: set[str]) -> set[str]:
    """The modules that are not part of Python's standard library."""
    return {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}


class TestImports:
    """The rules read policies, not the config loader; policy and schema do no I/O."""

    def test_rules_import_only_model_and_policy(self) -> None:
        """Every rules module imports only the stdlib, governor.model, governor.policy and sibling rules."""
        rules = sorted((GOVERNOR / "rules").glob("*.py"))
        assert len(rules) >= 4
        # ProcessFacts moves into governor.model in issue 13's errors part; until then the
        # rules may take that one name from governor.processes, and only while model lacks it.
        interim = set() if hasattr(governor.model, "ProcessFacts") else {"governor.processes"}
        for path in rules:
            modules = outside_stdlib(imported_modules(path))
            extra = {m for m in modules if m not in {"governor.model", "governor.policy"}}
            extra = {m for m in extra if not m.startswith("governor.rules.")} - interim
            assert not extra, f"{path.name} imports {sorted(extra)}"
            if "governor.processes" in modules:
                assert imported_names(path, "governor.processes") == {"ProcessFacts"}, path.name

    def test_policy_and_schema_do_no_io(self) -> None:
        """governor.policy and governor.schema import nothing that reads files, sockets or processes."""
        io_modules = {"os", "io", "pathlib", "socket", "subprocess", "shutil", "tempfile", "ssl", "tomllib", "json"}
        policy = imported_modules(GOVERNOR / "policy.py")
        schema = imported_modules(GOVERNOR / "schema.py")
        assert not (policy | schema) & io_modules
        assert outside_stdlib(policy) <= {"regex", "governor.durations"}
        assert outside_stdlib(schema) <= {"governor.policy", "governor.errors"}  # errors: types only, no I/O
        for path in (GOVERNOR / "policy.py", GOVERNOR / "schema.py"):
            calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
            assert not [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "open"], path.name

    def test_config_and_classes_do_not_import_each_other(self) -> None:
        """classes.py never imports config.py (config reads classes through parse_vram only): no cycle."""
        assert "governor.config" not in imported_modules(GOVERNOR / "classes.py")
        assert imported_names(GOVERNOR / "config.py", "governor.classes") <= {"parse_vram", "MATCH_KEYS", "render_size"}

    def test_old_import_paths_still_work(self) -> None:
        """The names that moved to governor.policy/schema are the same objects at their old homes."""
        import governor.classes
        import governor.config
        import governor.policy
        import governor.schema

        for name in ("ThermalPolicy", "PowerPolicy", "GpuPolicy", "Rung", "percent_of", "VramPolicy"):
            assert getattr(governor.config, name) is getattr(governor.policy, name), name
        for name in ("ProcessClass", "ProcessMatch", "VramPolicy", "format_size", "clip", "MATCH_KEYS", "ACTIONS"):
            assert getattr(governor.classes, name) is getattr(governor.policy, name), name
        for name in ("Action", "ThermalZone", "ZONES_BY_SEVERITY", "Rule"):
            assert getattr(governor.model, name) is getattr(governor.policy, name), name
        assert governor.config.ConfigIssue is governor.schema.ConfigIssue
        assert governor.config.Key is governor.schema.Key


class TestStrEnums:
    """Rule, Action, ThermalZone and ProcessAction compare, hash and print as their names."""

    def test_compare_hash_and_format_as_the_value(self) -> None:
        """A member equals its value, finds a dict entry keyed by it, and prints as it."""
        for member in (Rule.THERMAL_ZONE, Action.SET_POWER_LIMIT, ThermalZone.HOT, ProcessAction.KILL):
            assert member == member.value
            assert {member.value: 1}.get(member) == 1
            assert str(member) == f"{member}" == member.value
            assert json.dumps({"k": member}) == json.dumps({"k": member.value})
        assert Rule.POWER_STEP_UP.startswith("power")

    def test_every_rule_a_decision_names(self) -> None:
        """The rules' names are the ones the log, metrics and docs already use."""
        assert {r.value for r in Rule} == {
            "thermal_zone",
            "power_hold",
            "power_critical",
            "power_step_down",
            "power_step_up",
            "power_target_down",
            "power_target_up",
            "node_budget",
            "power_drift_reapply",
            "power_drift_external_lower",
            "vram_over_budget",
            "vram_enforce",
            "vram_escalate",
            "vram_kill_ineffective",
            "vram_kill_given_up",
            "fan_curve",
            "fan_assist",
            "fan_release",
            "fan_not_following",
            "restore_on_stop",
            "restore_after_crash",
            "unit_resume",
            "unit_restart_loop",
        }

    @pytest.fixture
    def _reset_structlog(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Configure logging in a test and leave structlog's defaults behind."""
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        yield
        structlog.reset_defaults()

    @pytest.mark.usefixtures("_reset_structlog")
    @pytest.mark.parametrize("log_format", ["json", "journal", "console"])
    def test_log_lines_identical_to_plain_strings(self, log_format: str) -> None:
        """An event with enum values renders exactly as the same event with their plain names did."""
        rendered = []
        for rule, action, zone in (
            (Rule.THERMAL_ZONE, Action.NONE, ThermalZone.HOT),
            ("thermal_zone", "none", "hot"),
        ):
            buffer = io.StringIO()
            configure(log_format, "info", stream=buffer)
            get_logger(gpu=0).info("thermal_zone_changed", rule=rule, action=action, to_zone=zone)
            rendered.append(re.sub(r"\d{4}-\d\d-\d\d[ T][\d:.]+Z?", "TIME", buffer.getvalue()))
        assert rendered[0] == rendered[1]
        assert "thermal_zone" in rendered[0]


def decision(**changes: object) -> Decision:
    """A decision of GPU 0 at t=1 s with ``changes``."""
    base: dict[str, object] = {
        "t_s": 1.0,
        "gpu_index": 0,
        "gpu_uuid": "GPU-0",
        "rule": Rule.POWER_STEP_DOWN,
        "action": Action.SET_POWER_LIMIT,
        "reason": "test",
    }
    base.update(changes)
    return Decision(**base)  # type: ignore[arg-type]


class TestTypedDecision:
    """Decision carries typed changes; the old untyped pair is derived from them."""

    def test_no_extra_field(self) -> None:
        """The unused ``extra`` field is gone and the typed fields are there."""
        names = {f.name for f in fields(Decision)}
        assert "extra" not in names
        assert {"from_w", "to_w", "from_zone", "to_zone", "process_name"} <= names

    def test_power_change_in_watts(self) -> None:
        """A power decision's from/to values are its watts."""
        d = decision(from_w=200.0, to_w=180.0)
        assert (d.from_value, d.to_value) == (200.0, 180.0)

    def test_zone_change_as_names(self) -> None:
        """A zone decision's from/to values are the zone names (plain strings), as the log wrote them."""
        d = decision(rule=Rule.THERMAL_ZONE, action=Action.NONE, from_zone=ThermalZone.UNKNOWN, to_zone=ThermalZone.HOT)
        assert (d.from_value, d.to_value) == ("unknown", "hot")
        assert type(d.to_value) is str

    def test_process_decision_names_process_and_action(self) -> None:
        """A process decision's from value is the process name and its to value the action's name."""
        d = decision(rule=Rule.VRAM_ENFORCE, action=Action.SIGNAL_TERM, pid=42, process_name="python3")
        assert (d.from_value, d.to_value) == ("python3", "sigterm")


class TestProcessClass:
    """ProcessClass holds a ProcessAction whatever it was given."""

    def test_action_name_becomes_the_enum(self) -> None:
        """A class built with the action's name holds the enum member."""
        klass = ProcessClass("batch", ProcessMatch(user="1000"), 1, action="kill")  # type: ignore[arg-type]
        assert klass.action is ProcessAction.KILL

    def test_unknown_action_refused(self) -> None:
        """An action name that is not observe, terminate or kill is a ValueError."""
        with pytest.raises(ValueError, match="ProcessAction"):
            ProcessClass("batch", action="stop")  # type: ignore[arg-type]

    def test_untrusted_only_class_observes(self) -> None:
        """A killing class matched only on the process's own name is enforced as observe."""
        klass = ProcessClass("x", ProcessMatch(name="python3"), 1, action=ProcessAction.KILL)
        assert klass.enforced_action is ProcessAction.OBSERVE
