"""Class config for units: stop-unit and its keys, the deny list, user sessions, check-config's Restart= warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from governor.classes import config_warnings
from governor.cli import restart_warnings
from governor.config import ConfigError, load_config, parse_config, render_config
from governor.policy import ProcessAction, denied_by, denied_unit
from governor.units import UnitProperties

REPO = Path(__file__).resolve().parents[1]


def config_with(**klass: Any) -> dict[str, Any]:
    entry = {"name": "secondary", "budget": "3GiB", "action": "stop-unit", "match": {"unit": "comfyui.service"}}
    entry.update(klass)
    return {"vram": {"reserve": "2GiB"}, "class": [entry]}


def issues(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, "/etc/gpu-governor/governor.toml")
    return [str(issue) for issue in caught.value.issues]


class TestStopUnitKeys:
    def test_keys_parse_with_defaults(self) -> None:
        """stop-unit with resume keys parses; unset keys take their documented defaults."""
        config = parse_config(config_with(resume=True, resume_after_s=30.0), "t.toml")
        klass = config.vram.classes[0]
        assert klass.action is ProcessAction.STOP_UNIT and klass.enforced_action is ProcessAction.STOP_UNIT
        assert (klass.resume, klass.resume_after_s, klass.resume_after_max_s, klass.flap_window_s) == (
            True,
            30.0,
            3600.0,
            900.0,
        )
        assert (klass.restart_loop_count, klass.restart_loop_window_s) == (3, 600.0)

    def test_flap_window_is_bounded_by_what_the_resume_bookkeeping_keeps(self) -> None:
        """flap_window_s up to FLAP_WINDOW_MAX_S parses, one second more is refused: older resumes can be forgotten."""
        from governor.unitstate import FLAP_WINDOW_MAX_S

        config = parse_config(config_with(resume=True, flap_window_s=FLAP_WINDOW_MAX_S), "t.toml")
        assert config.vram.classes[0].flap_window_s == FLAP_WINDOW_MAX_S
        assert any("flap_window_s" in i for i in issues(config_with(resume=True, flap_window_s=FLAP_WINDOW_MAX_S + 1)))

    def test_render_round_trips(self) -> None:
        """check-config's output loads back to the same classes, unit keys included."""
        config = parse_config(config_with(resume=True, resume_after_s=5.0, flap_window_s=0.0), "t.toml")
        again = parse_config(__import__("tomllib").loads(render_config(config)), "t.toml")
        assert again.vram.classes == config.vram.classes

    def test_untrusted_only_stop_unit_is_observe(self) -> None:
        """A stop-unit class matching only on the process name is enforced as observe (and warned)."""
        config = parse_config(config_with(match={"name": "comfy*"}), "t.toml")
        assert config.vram.classes[0].enforced_action is ProcessAction.OBSERVE
        assert any("enforced as 'observe'" in w for w in config_warnings(config.vram))

    def test_resume_on_a_signal_class_is_warned(self) -> None:
        """resume = true does nothing on a terminate class: check-config says so."""
        config = parse_config(config_with(action="terminate", resume=True), "t.toml")
        assert any("only a stop-unit class is resumed" in w for w in config_warnings(config.vram))

    @pytest.mark.parametrize(
        ("klass", "key"),
        [
            ({"resume_after_s": -1.0}, "class[0].resume_after_s"),
            ({"resume_after_s": 100.0, "resume_after_max_s": 50.0}, "class[0].resume_after_max_s"),
            ({"restart_loop_count": 0}, "class[0].restart_loop_count"),
            ({"resume": "yes"}, "class[0].resume"),
            ({"budget": None}, "class[0].budget"),
        ],
    )
    def test_bad_values_name_file_and_key(self, klass: dict[str, Any], key: str) -> None:
        """A bad unit key is an error naming the file and the key."""
        document = config_with(**klass)
        if klass.get("budget", "") is None:
            del document["class"][0]["budget"]
        found = issues(document)
        assert any(line.startswith(f"/etc/gpu-governor/governor.toml: {key}:") for line in found), found


class TestDenyList:
    @pytest.mark.parametrize(
        ("unit", "entry"),
        [
            ("sshd.service", "sshd.service"),
            ("*.service", "gpu-governor.service"),
            ("*", "gpu-governor.service"),
            ("systemd-journald.service", "systemd-*"),
            ("dbus-broker.service", "dbus*"),
            ("gdm.service", "gdm.service"),
            ("user@1000.service", "user@*.service"),
            ("getty@tty1.service", "getty@*.service"),
            ("init.scope", "init.scope"),
        ],
    )
    def test_acting_class_naming_a_denied_unit_is_an_error(self, unit: str, entry: str) -> None:
        """terminate, kill and stop-unit classes may not name a deny-listed unit: the error names file, key, entry."""
        assert denied_by(unit) == entry
        for action in ("terminate", "kill", "stop-unit"):
            found = issues(config_with(action=action, match={"unit": unit}))
            assert any(
                line.startswith("/etc/gpu-governor/governor.toml: class[0].match.unit:") and repr(entry) in line
                for line in found
            ), found

    def test_observe_and_protected_classes_may_name_them(self) -> None:
        """Watching sshd's VRAM is fine: an observe or protected class is no error."""
        parse_config(config_with(action="observe", match={"unit": "sshd.service"}), "t.toml")
        parse_config(config_with(action="terminate", protected=True, match={"unit": "*"}), "t.toml")

    def test_named_units_are_not_denied(self) -> None:
        """The workloads a workstation runs are not on the list."""
        for unit in ("comfyui.service", "llama-server.service", "llama-*.service", "ollama.service"):
            assert denied_by(unit) is None and denied_unit(unit) is None
        assert denied_unit("systemd-logind.service") == "systemd-*"

    @pytest.mark.parametrize(
        ("match", "key"),
        [
            ({"unit": "session-*.scope"}, "class[0].match.unit"),
            ({"slice": "user.slice"}, "class[0].match.slice"),
            ({"slice": "user-1000.slice"}, "class[0].match.slice"),
            ({"unit": "app.service", "user_units": True}, "class[0].match.user_units"),
        ],
    )
    def test_stop_unit_never_names_user_sessions(self, match: dict[str, Any], key: str) -> None:
        """stop-unit on a user session's units (or user units) is an error naming the key."""
        found = issues(config_with(match=match))
        assert any(line.startswith(f"/etc/gpu-governor/governor.toml: {key}:") for line in found), found

    def test_default_class_cannot_stop_units(self) -> None:
        """[vram.default] with stop-unit would stop any unknown process's unit: an error."""
        found = issues({"vram": {"default": {"action": "stop-unit", "budget": "1GiB"}}})
        assert any("vram.default.action" in line for line in found), found


class TestRestartWarnings:
    def test_warns_for_a_restarting_unit_of_a_signal_class(self) -> None:
        """A terminate class on a Restart=always unit gets a check-config warning naming unit and Restart=."""
        config = parse_config(config_with(action="terminate", match={"unit": "llama-*.service"}), "t.toml")
        found = {
            "llama-*.service": [
                UnitProperties("llama-a.service", "loaded", "active", "always", 0),
                UnitProperties("llama-b.service", "loaded", "active", "no", 0),
            ]
        }
        warnings = restart_warnings(config.vram, lambda patterns: found)
        assert len(warnings) == 1
        assert "llama-a.service" in warnings[0] and "Restart=always" in warnings[0] and "stop-unit" in warnings[0]

    def test_on_failure_is_undone_only_by_sigkill(self) -> None:
        """Restart=on-failure: a terminate class (SIGTERM, then SIGKILL) is warned; nothing for stop-unit."""
        props = {"x.service": [UnitProperties("x.service", "loaded", "active", "on-failure", 0)]}
        terminate = parse_config(config_with(action="terminate", match={"unit": "x.service"}), "t.toml")
        stop = parse_config(config_with(match={"unit": "x.service"}), "t.toml")
        assert len(restart_warnings(terminate.vram, lambda p: props)) == 1
        assert restart_warnings(stop.vram, lambda p: props) == []

    def test_silent_when_systemd_does_not_answer(self) -> None:
        """No system bus (None from the lookup): no warning, no error."""
        config = parse_config(config_with(action="kill", match={"unit": "x.service"}), "t.toml")
        assert restart_warnings(config.vram, lambda patterns: None) == []


def test_workstation_example_validates() -> None:
    """config/examples/workstation-gaming.toml loads: the seed's split, secondary resumed, primary never stopped."""
    path = REPO / "config" / "examples" / "workstation-gaming.toml"
    config = load_config(path, enforce_trust=False)
    vram = config.vram
    assert vram.reserve_bytes == 2 * 2**30
    by_name = {c.name: c for c in vram.classes}
    assert by_name["primary"].budget_bytes == 6 * 2**30 and by_name["secondary"].budget_bytes == 3 * 2**30
    assert by_name["secondary"].enforced_action is ProcessAction.STOP_UNIT and by_name["secondary"].resume
    assert by_name["primary"].enforced_action is ProcessAction.OBSERVE
    assert by_name["interactive"].protected and by_name["interactive"].match.slice == "user.slice"
    desktop = 2**30
    assert (
        by_name["primary"].budget_bytes + by_name["secondary"].budget_bytes + vram.reserve_bytes + desktop == 12 * 2**30
    )
    assert config_warnings(vram) == []
