"""The one schema engine: keys, tables, bounded messages, and the files that use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from governor.config import ConfigError, parse_config
from governor.schema import ConfigIssue, Issues, Key, Table, between, convert, describe, section, shown
from governor.sim.scenario import parse_scenario
from governor.trace import TraceError, read_trace


def found(issues: Issues) -> list[str]:
    """The issues collected, as the lines a user reads."""
    return [str(i) for i in issues.issues]


class TestKey:
    """convert(): one value checked against one Key."""

    def test_wrong_type_names_the_kind(self) -> None:
        """A value of the wrong type is reported with the key's meaning and its kind, and its own type."""
        out = Issues("f.toml")
        assert convert(Key("float", "seconds", between(0.0, 10.0)), "ten", "a.b", out) is None
        assert found(out) == ["f.toml: a.b: expected seconds (a number), got 'ten' (str)"]

    def test_check_says_what_was_expected(self) -> None:
        """A value of the right type that fails the check is reported with the check's words."""
        out = Issues("f.toml")
        assert convert(Key("int", "a port", between(0, 65535)), 70000, "port", out) is None
        assert found(out) == ["f.toml: port: expected a value between 0 and 65535, got 70000 (int)"]

    def test_array_items_reported_at_their_index(self) -> None:
        """Every bad item of an array is reported at path[i]; a good array comes back as a tuple."""
        key = Key("array", "numbers", item=lambda v: v if isinstance(v, int) else None, item_expected="an integer")
        out = Issues("f.toml")
        assert convert(key, [1, "x", 3, None], "xs", out) is None
        assert [i.key for i in out.issues] == ["xs[1]", "xs[3]"]
        assert convert(key, [1, 2], "xs", Issues("f.toml")) == (1, 2)

    def test_section_reports_unknown_keys_in_place(self) -> None:
        """A section converts known keys and names an unknown one with the closest known key."""
        out = Issues("f.toml")
        result = section({"dwell_s": 5, "dwel_s": 6}, {"dwell_s": Key("float", "seconds")}, "power.", out)
        assert result == {"dwell_s": 5.0}
        assert out.issues == [
            ConfigIssue(
                "f.toml",
                "power.dwel_s",
                "one of the known keys: dwell_s",
                "unknown key 'dwel_s' (did you mean 'dwell_s'?)",
            )
        ]

    def test_raise_if_any_raises_the_callers_error(self) -> None:
        """An Issues built with an error type raises it with every issue; without problems it raises nothing."""
        out = Issues("f.toml", ConfigError)
        out.raise_if_any()
        out.add("a", "b", "c")
        out.add("d", "e", "f")
        with pytest.raises(ConfigError) as caught:
            out.raise_if_any()
        assert len(caught.value.issues) == 2


class TestBoundedMessages:
    """Found values are shown bounded, whatever a hostile file holds."""

    def test_describe_is_bounded(self) -> None:
        """A huge integer, a long list and deep nesting are described in a few words."""
        assert describe(10**5000) == "an integer of about 5000 digits (int)"
        assert describe(list(range(1000))) == "a list of 1000 items"
        assert len(describe("x" * 10_000)) <= 70
        deep: list[object] = []
        for _ in range(100_000):
            deep = [deep]
        assert "nested too deeply" in describe(deep)

    def test_shown_never_raises(self) -> None:
        """The repr-only form used by class and size messages is bounded too."""
        assert shown(10**5000) == "an integer of about 5000 digits"
        assert len(shown("y" * 10_000)) == 60


class TestTable:
    """Table: a document read key by key (profiles and scenarios)."""

    def test_number_range_and_missing(self) -> None:
        """A number out of range says the span; a required missing one says nothing was found."""
        out = Issues("s.toml")
        table = Table({"a": 7.0}, "phase[0]", out)
        assert table.number("a", "seconds", lo=0.0, hi=5.0) is None
        assert table.number("b", "watts") is None
        assert found(out) == [
            "s.toml: phase[0].a: expected seconds, at least 0 and at most 5, got 7.0 (float)",
            "s.toml: phase[0].b: expected watts (a number), got nothing",
        ]

    def test_finish_names_keys_nobody_asked_for(self) -> None:
        """Keys no reader asked for are reported with the closest asked-for key."""
        out = Issues("s.toml")
        table = Table({"name": "x", "nmae": "y"}, "", out)
        assert table.string("name", "a name") == "x"
        table.finish()
        assert [i.got for i in out.issues] == ["unknown key 'nmae' (did you mean 'name'?)"]

    def test_choices(self) -> None:
        """A string outside its choices is told the choices."""
        out = Issues("s.toml")
        assert Table({"fault": "melt"}, "event[0]", out).string("fault", "a fault", choices=("lost", "none")) is None
        assert found(out) == ["s.toml: event[0].fault: expected one of 'lost', 'none', got 'melt' (str)"]


class TestUsers:
    """Config, scenarios and traces report through the engine."""

    def test_config_and_scenario_speak_alike(self) -> None:
        """A bad boolean reads the same way in a config and in a scenario."""
        with pytest.raises(ConfigError) as config:
            parse_config({"dry_run": "yes"}, "g.toml")
        assert str(config.value.issues[0]) == "g.toml: dry_run: expected true or false, got 'yes' (str)"
        with pytest.raises(ConfigError) as scenario:
            parse_scenario({"name": "s", "repeat": "yes", "phase": [{"duration_s": 1, "demand_w": 1}]}, "s.toml")
        assert str(scenario.value.issues[0]) == (
            "s.toml: repeat: expected whether the phases start over after the last one (true or false), got 'yes' (str)"
        )

    def test_trace_huge_integer_is_an_error_not_a_crash(self, tmp_path: Path) -> None:
        """A JSON integer too big for a float is a TraceError naming the field (math.isfinite overflowed before)."""
        path = tmp_path / "t.jsonl"
        device = {"record": "device", "gpu": 0, "uuid": "GPU-t", "name": "T", "interval_s": 1.0}
        sample = '{"record": "sample", "t": 0.0, "gpu": 0, "temperature_c": 1' + "0" * 400 + "}"
        path.write_text(json.dumps(device) + "\n" + sample + "\n")
        with pytest.raises(TraceError, match=r":2: field 'temperature_c': expected a number, got an integer of about"):
            read_trace(path)

    def test_trace_header_strings_checked(self, tmp_path: Path) -> None:
        """A device record whose driver is not a string is refused at its line, naming the field."""
        path = tmp_path / "t.jsonl"
        path.write_text(json.dumps({"record": "device", "gpu": 0, "driver": [550]}) + "\n")
        with pytest.raises(TraceError, match=r":1: field 'driver': expected a string, got \[550\] \(list\)"):
            read_trace(path)
