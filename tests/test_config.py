"""Config: defaults, validation (every issue at once), per-GPU overrides, loading, trust, rendering."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from governor.config import (
    MAX_CONFIG_BYTES,
    SCHEMA,
    Config,
    ConfigError,
    ConfigIssue,
    FanMode,
    FanPolicy,
    GpuOverride,
    LoggingConfig,
    MetricsConfig,
    NodePolicy,
    PowerPolicy,
    SimulationConfig,
    ThermalPolicy,
    check_resolved,
    check_trust,
    load_config,
    parse_config,
    read_small_file,
    render_config,
)
from governor.model import GpuInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

FULL_TOML = """
poll_interval_s = 2.5
dry_run = true
backend = "simulated"
state_dir = "/tmp/gg-state"
runtime_dir = "/tmp/gg-run"
wait_for_driver = true

[metrics]
enabled = false
listen_address = "0.0.0.0"
port = 9999
allow_remote = true
web_config_file = "/etc/gpu-governor/web-config.yml"
tls_cert_file = "/etc/gpu-governor/tls/cert.pem"
tls_key_file = "/etc/gpu-governor/tls/key.pem"
tls_client_ca_file = "/etc/gpu-governor/tls/ca.pem"
basic_auth_username = "prometheus"
basic_auth_password_hash = "scrypt$32768$8$1$nf8cNElAnspmXOQf0twKaQ==$4ReUqs7/VdrlgVndwOx5/CP1q/gijwoyXI0vy350Jw8="

[logging]
format = "journal"
level = "debug"

[simulation]
profile = "h100-80gb"
gpu_count = 4
scenario = "hot"
seed = 42
ambient_c = 30.0
state_file = "/tmp/sim.json"
time_scale = 10.0
processes_file = "/tmp/sim-processes.json"

[thermal]
warning_c = 60.0
hot_c = 70.0
throttle_c = 80.0
critical_c = 90.0
hysteresis_c = 2.0

[power]
enabled = false
ladder_w = [300.0, 250.0, 200.0]
allow_deep_cap = true
step_down_at_c = 78.0
step_up_at_c = 60.0
debounce_samples = 5
dwell_s = 120.0
min_change_interval_s = 10.0
flap_window_s = 600.0
dwell_max_s = 960.0
backoff_decay_s = 1800.0
mode = "target"
target_c = 72.0
floor_w = "60%"
deadband_c = 2.5
horizon_s = 90.0
max_changes_per_hour = 6
budget_weight = 2.0

[node]
power_budget_w = 900.0
rebalance_interval_s = 30.0
share = "weight"
min_share_change_w = 8.0

[fan]
mode = "curve"
max_percent = 80.0
fans = [0, 1]
curve = [[40.0, 30.0], [75.0, 80.0]]
hysteresis_c = 4.0
raise_at_c = 72.0
lower_at_c = 60.0
step_percent = 5.0
step_interval_s = 2.0
settle_s = 90.0
follow_tolerance_percent = 15.0
follow_timeout_s = 45.0

[[gpu]]
index = 0
uuid = "GPU-abc"
name = "*H100*"
thermal = { warning_c = 65.0 }
power = { ladder_w = [700.0, 500.0], step_down_at_c = 80.0 }
"""


def issues_of(data: dict[str, Any], source: str = "test.toml") -> tuple[ConfigIssue, ...]:
    """The issues parse_config reports for ``data`` (fails the test when it accepts it)."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source)
    return caught.value.issues


def keys_of(issues: tuple[ConfigIssue, ...]) -> list[str]:
    """The key paths of ``issues``, in report order."""
    return [i.key for i in issues]


def write(tmp_path: Path, text: str | bytes, name: str = "governor.toml") -> Path:
    """Write a config file into ``tmp_path`` and return its path."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def gpu(index: int = 0, uuid: str = "GPU-0000", name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    """A GPU's static facts for override matching."""
    return GpuInfo(index=index, uuid=uuid, name=name)


class TestDefaults:
    """The defaults a file without keys gets."""

    def test_documented_default_values(self) -> None:
        """Config() carries the documented defaults: 70/80/85/95 C zones, a 100/90 % ladder, port 9847."""
        c = Config()
        assert c.thermal == ThermalPolicy(70.0, 80.0, 85.0, 95.0, 3.0)
        assert c.power.ladder_w == ("100%", "90%") and c.power.allow_deep_cap is False
        assert (c.power.step_down_at_c, c.power.step_up_at_c) == (75.0, 65.0)
        assert (c.power.debounce_samples, c.power.dwell_s, c.power.min_change_interval_s) == (3, 60.0, 30.0)
        assert c.power.enabled is True
        assert c.metrics == MetricsConfig(True, "127.0.0.1", 9847)
        assert c.logging == LoggingConfig("auto", "info")
        assert (c.poll_interval_s, c.dry_run, c.backend) == (1.0, False, "nvml")
        assert c.gpus == ()

    def test_empty_document_is_defaults(self) -> None:
        """An empty document validates to Config() with only the source changed."""
        assert parse_config({}, "empty.toml") == replace(Config(), source="empty.toml")

    def test_shipped_reference_file_is_the_defaults(self) -> None:
        """The fully commented config/governor.toml loads to exactly the built-in defaults."""
        path = REPO / "config" / "governor.toml"
        if not path.exists():
            pytest.skip("config/governor.toml not present")
        assert load_config(path, enforce_trust=False) == replace(Config(), source=str(path))


class TestKeys:
    """Every documented key is accepted and converted; unknown keys are named."""

    def test_every_documented_key_accepted(self, tmp_path: Path) -> None:
        """A file setting every key to a non-default value loads with each value in place."""
        c = load_config(write(tmp_path, FULL_TOML), enforce_trust=False)
        assert (c.poll_interval_s, c.dry_run, c.backend, c.state_dir, c.runtime_dir) == (
            2.5,
            True,
            "simulated",
            "/tmp/gg-state",
            "/tmp/gg-run",
        )
        assert c.metrics == MetricsConfig(
            False,
            "0.0.0.0",
            9999,
            True,
            "/etc/gpu-governor/web-config.yml",
            "/etc/gpu-governor/tls/cert.pem",
            "/etc/gpu-governor/tls/key.pem",
            "/etc/gpu-governor/tls/ca.pem",
            "prometheus",
            "scrypt$32768$8$1$nf8cNElAnspmXOQf0twKaQ==$4ReUqs7/VdrlgVndwOx5/CP1q/gijwoyXI0vy350Jw8=",
        )
        assert c.logging == LoggingConfig("journal", "debug")
        assert c.simulation == SimulationConfig(
            "h100-80gb", 4, "hot", 42, 30.0, "/tmp/sim.json", 10.0, "/tmp/sim-processes.json"
        )
        assert c.thermal == ThermalPolicy(60.0, 70.0, 80.0, 90.0, 2.0)
        assert c.power == PowerPolicy(
            (300.0, 250.0, 200.0), 78.0, 60.0, 5, 120.0, 10.0, False, 600.0, 960.0, 1800.0, True,
            "target", 72.0, "60%", 2.5, 90.0, 6, 2.0,
        )  # fmt: skip
        assert c.node == NodePolicy(900.0, 30.0, "weight", 8.0)
        assert c.fan == FanPolicy(
            FanMode.CURVE, 80.0, (0, 1), ((40.0, 30.0), (75.0, 80.0)), 4.0, 72.0, 60.0, 5.0, 2.0, 90.0, 15.0, 45.0
        )
        assert c.gpus == (
            GpuOverride(
                0,
                "GPU-abc",
                "*H100*",
                {"warning_c": 65.0},
                {"ladder_w": (700.0, 500.0), "step_down_at_c": 80.0},
            ),
        )

    def test_full_file_covers_the_schema(self) -> None:
        """The every-key fixture names every key of the schema, so a new key cannot go untested."""
        doc = tomllib.loads(FULL_TOML)
        for name, spec in SCHEMA.items():
            assert name in doc
            if isinstance(spec, dict):
                assert set(spec) == set(doc[name])

    def test_integer_accepted_where_float_expected(self) -> None:
        """An integer for a float key (dwell_s = 60) is converted to float."""
        c = parse_config({"power": {"dwell_s": 60}}, "f")
        assert c.power.dwell_s == 60.0
        assert isinstance(c.power.dwell_s, float)

    def test_unknown_top_level_key_gets_did_you_mean(self) -> None:
        """A misspelt top-level key is reported with the closest known key."""
        (issue,) = issues_of({"poll_intervals": 1.0})
        assert issue.key == "poll_intervals"
        assert "did you mean 'poll_interval_s'" in issue.got

    def test_unknown_section_key_gets_did_you_mean(self) -> None:
        """A misspelt key inside a section is named by its full path with a suggestion."""
        (issue,) = issues_of({"power": {"step_down_c": 80.0}})
        assert issue.key == "power.step_down_c"
        assert "did you mean 'step_down_at_c'" in issue.got
        assert "step_down_at_c" in issue.expected

    def test_unknown_key_without_close_match(self) -> None:
        """A key like nothing known is reported without a suggestion."""
        (issue,) = issues_of({"thermal": {"zzzzzz": 1}})
        assert issue.key == "thermal.zzzzzz"
        assert "did you mean" not in issue.got

    def test_unknown_override_key(self) -> None:
        """An unknown key inside [[gpu]] is named with its array index."""
        (issue,) = issues_of({"gpu": [{"index": 0, "powr": {}}]})
        assert issue.key == "gpu[0].powr"
        assert "did you mean 'power'" in issue.got


class TestValues:
    """Wrong types and out-of-range values."""

    @pytest.mark.parametrize(
        ("data", "key", "expected_part"),
        [
            ({"poll_interval_s": "fast"}, "poll_interval_s", "a number"),
            ({"poll_interval_s": True}, "poll_interval_s", "a number"),
            ({"dry_run": "yes"}, "dry_run", "true or false"),
            ({"dry_run": 1}, "dry_run", "true or false"),
            ({"metrics": {"port": 9847.0}}, "metrics.port", "an integer"),
            ({"power": {"debounce_samples": 2.5}}, "power.debounce_samples", "an integer"),
            ({"power": {"ladder_w": 200.0}}, "power.ladder_w", "an array"),
            ({"state_dir": 5}, "state_dir", "a string"),
            ({"metrics": 5}, "metrics", "a table"),
            ({"gpu": {"index": 0}}, "gpu", "array of tables"),
            ({"gpu": [5]}, "gpu[0]", "a table"),
        ],
    )
    def test_wrong_type(self, data: dict[str, Any], key: str, expected_part: str) -> None:
        """A value of the wrong type is reported at its key with what was expected and what was found."""
        (issue,) = issues_of(data)
        assert issue.key == key
        assert expected_part in issue.expected
        assert issue.file == "test.toml"
        assert issue.got

    def test_wrong_type_names_got_value_and_type(self) -> None:
        """The 'got' part shows the value and its type."""
        (issue,) = issues_of({"poll_interval_s": "fast"})
        assert issue.got == "'fast' (str)"

    @pytest.mark.parametrize(
        ("data", "key"),
        [
            ({"poll_interval_s": 0.0}, "poll_interval_s"),
            ({"poll_interval_s": 3601.0}, "poll_interval_s"),
            ({"metrics": {"port": 70000}}, "metrics.port"),
            ({"metrics": {"port": -1}}, "metrics.port"),
            ({"thermal": {"hysteresis_c": 31.0}}, "thermal.hysteresis_c"),
            ({"power": {"debounce_samples": 0}}, "power.debounce_samples"),
            ({"power": {"dwell_s": -1.0}}, "power.dwell_s"),
            ({"simulation": {"gpu_count": 0}}, "simulation.gpu_count"),
            ({"backend": "cuda"}, "backend"),
            ({"logging": {"level": "verbose"}}, "logging.level"),
            ({"logging": {"format": "xml"}}, "logging.format"),
            ({"poll_interval_s": float("inf")}, "poll_interval_s"),
            ({"poll_interval_s": float("nan")}, "poll_interval_s"),
        ],
    )
    def test_out_of_range(self, data: dict[str, Any], key: str) -> None:
        """A value outside its allowed range or set is reported at its key."""
        (issue,) = issues_of(data)
        assert issue.key == key

    def test_range_issue_says_the_range(self) -> None:
        """An out-of-range port names the allowed bounds and the value found."""
        (issue,) = issues_of({"metrics": {"port": 70000}})
        assert issue.expected == "a value between 0 and 65535"
        assert issue.got == "70000 (int)"

    def test_huge_integer_is_an_issue_not_a_crash(self) -> None:
        """An integer too large for a float is reported as an issue, not an OverflowError."""
        issues = issues_of({"poll_interval_s": 10**400, "power": {"ladder_w": [10**400]}})
        assert keys_of(issues) == ["poll_interval_s", "power.ladder_w[0]"]

    @pytest.mark.parametrize(
        ("ladder", "key"),
        [
            ([], "power.ladder_w"),
            ([180.0, 200.0], "power.ladder_w"),
            ([200.0, 200.0], "power.ladder_w"),
            ([200.0, -5.0], "power.ladder_w"),
            ([200.0, "x"], "power.ladder_w[1]"),
            ([200.0, True], "power.ladder_w[1]"),
        ],
    )
    def test_bad_ladder(self, ladder: list[Any], key: str) -> None:
        """An empty, non-descending, non-positive or non-numeric ladder is refused at the right key."""
        (issue,) = issues_of({"power": {"ladder_w": ladder}})
        assert issue.key == key


class TestContradictions:
    """Values that are valid alone but contradict each other."""

    @pytest.mark.parametrize("up", [75.0, 80.0])
    def test_step_up_not_below_step_down(self, up: float) -> None:
        """step_up_at_c >= step_down_at_c is reported at power.step_up_at_c naming step_down_at_c."""
        (issue,) = issues_of({"power": {"step_up_at_c": up}})
        assert issue.key == "power.step_up_at_c"
        assert "step_down_at_c" in issue.expected
        assert issue.got == f"{up:g}"

    def test_thermal_thresholds_must_increase(self) -> None:
        """hot_c at or below warning_c is reported at thermal.hot_c."""
        (issue,) = issues_of({"thermal": {"hot_c": 70.0}})
        assert issue.key == "thermal.hot_c"
        assert "thermal.warning_c" in issue.expected

    def test_every_thermal_inversion_reported(self) -> None:
        """A fully reversed threshold list reports each out-of-order pair."""
        issues = issues_of({"thermal": {"warning_c": 99.0, "hot_c": 90.0, "throttle_c": 80.0, "critical_c": 70.0}})
        assert keys_of(issues) == ["thermal.hot_c", "thermal.throttle_c", "thermal.critical_c"]

    def test_all_issues_reported_at_once(self, tmp_path: Path) -> None:
        """A file with many problems reports every one, each naming the file, key, expectation and value."""
        text = """
poll_interval_s = "x"
colour = 1
[metrics]
port = 99999
[thermal]
hot_c = 60.0
[power]
ladder_w = [100.0, 150.0]
step_up_at_c = 90.0
[[gpu]]
power = { dwell_s = -1 }
"""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            load_config(path, enforce_trust=False)
        issues = caught.value.issues
        assert sorted(keys_of(issues)) == sorted(
            [
                "poll_interval_s",
                "colour",
                "metrics.port",
                "thermal.hot_c",
                "power.ladder_w",
                "power.step_up_at_c",
                "gpu[0].power.dwell_s",
                "gpu[0]",
            ]
        )
        for issue in issues:
            assert issue.file == str(path)
            assert issue.expected and issue.got
        message = str(caught.value)
        assert message.count("\n") == len(issues) - 1
        assert f"{path}: metrics.port: expected" in message


class TestOverrides:
    """[[gpu]] overrides: selection, order, contradictions."""

    DATA: dict[str, Any] = {  # noqa: RUF012 - read-only fixture
        "gpu": [
            {"name": "*h100*", "power": {"ladder_w": [700.0, 500.0]}},
            {"index": 1, "thermal": {"warning_c": 60.0}},
            {"uuid": "gpu-BBBB", "power": {"ladder_w": [400.0]}},
            {"name": "*H100*", "index": 2, "power": {"dwell_s": 5.0}},
        ]
    }

    def test_no_match_keeps_defaults(self) -> None:
        """A GPU no override selects gets the top-level policy."""
        policy = parse_config(self.DATA, "f").policy_for(gpu(index=7, uuid="GPU-x", name="RTX 4070"))
        assert policy.thermal == ThermalPolicy()
        assert policy.power == PowerPolicy()

    def test_name_glob_is_case_insensitive(self) -> None:
        """A lower-case glob selects a GPU whose name is upper-case."""
        policy = parse_config(self.DATA, "f").policy_for(gpu(index=7))
        assert policy.power.ladder_w == (700.0, 500.0)

    def test_by_index(self) -> None:
        """An index selector selects only that index."""
        config = parse_config(self.DATA, "f")
        assert config.policy_for(gpu(index=1, name="RTX")).thermal.warning_c == 60.0
        assert config.policy_for(gpu(index=0, name="RTX")).thermal.warning_c == 70.0

    def test_by_uuid_case_insensitive(self) -> None:
        """A uuid selector matches exactly, ignoring case."""
        config = parse_config(self.DATA, "f")
        assert config.policy_for(gpu(uuid="GPU-bbbb", name="RTX")).power.ladder_w == (400.0,)
        assert config.policy_for(gpu(uuid="GPU-bbbbb", name="RTX")).power.ladder_w == ("100%", "90%")

    def test_later_override_wins(self) -> None:
        """When two overrides set the same key the later one in the file wins."""
        policy = parse_config(self.DATA, "f").policy_for(gpu(index=3, uuid="GPU-BBBB"))
        assert policy.power.ladder_w == (400.0,)

    def test_overrides_merge_keys(self) -> None:
        """Keys set by different matching overrides all apply; untouched keys keep the top level."""
        data = {"power": {"debounce_samples": 7}, **self.DATA}
        policy = parse_config(data, "f").policy_for(gpu(index=2))
        assert policy.power.ladder_w == (700.0, 500.0)
        assert policy.power.dwell_s == 5.0
        assert policy.power.debounce_samples == 7

    def test_all_selectors_must_match(self) -> None:
        """An override with name and index selects only GPUs matching both."""
        config = parse_config(self.DATA, "f")
        assert config.policy_for(gpu(index=2, name="RTX 4070")).power.dwell_s == 60.0
        assert config.policy_for(gpu(index=3)).power.dwell_s == 60.0

    def test_override_without_selector(self) -> None:
        """A [[gpu]] table with no index, uuid or name is refused."""
        (issue,) = issues_of({"gpu": [{"power": {"dwell_s": 1.0}}]})
        assert issue.key == "gpu[0]"
        assert "selector" in issue.got

    def test_override_contradiction_with_top_level(self) -> None:
        """An override raising step_up_at_c to the top-level step_down_at_c is a contradiction at its path."""
        (issue,) = issues_of({"gpu": [{"index": 0, "power": {"step_up_at_c": 75.0}}]})
        assert issue.key == "gpu[0].power.step_up_at_c"

    def test_override_step_down_below_top_level_step_up(self) -> None:
        """An override lowering step_down_at_c below the inherited step_up_at_c is reported there."""
        (issue,) = issues_of({"gpu": [{"index": 0, "power": {"step_down_at_c": 60.0}}]})
        assert issue.key == "gpu[0].power.step_up_at_c"
        assert "(60 C)" in issue.expected

    def test_override_thermal_contradiction(self) -> None:
        """An override moving critical_c below throttle_c is reported under the override."""
        (issue,) = issues_of({"gpu": [{"index": 0, "thermal": {"critical_c": 84.0}}]})
        assert issue.key == "gpu[0].thermal.critical_c"

    def test_override_bad_ladder(self) -> None:
        """An override ladder that is not descending is reported under the override."""
        (issue,) = issues_of({"gpu": [{"name": "*", "power": {"ladder_w": [100.0, 200.0]}}]})
        assert issue.key == "gpu[0].power.ladder_w"

    def test_bad_selector_type(self) -> None:
        """A string index is reported at gpu[N].index."""
        issues = issues_of({"gpu": [{"index": "0"}]})
        assert "gpu[0].index" in keys_of(issues)

    def test_top_level_contradiction_reported_once(self) -> None:
        """A top-level contradiction is not repeated for each override that leaves it alone."""
        issues = issues_of({"power": {"step_up_at_c": 80.0}, "gpu": [{"index": 0, "power": {"dwell_s": 1.0}}]})
        assert keys_of(issues) == ["power.step_up_at_c"]


class TestLoad:
    """Reading a file: every failure is a ConfigError naming the file."""

    def refused(self, path: Path) -> ConfigIssue:
        """The single issue load_config raises for ``path``."""
        with pytest.raises(ConfigError) as caught:
            load_config(path, enforce_trust=False)
        (issue,) = caught.value.issues
        assert issue.file == str(path)
        return issue

    def test_missing_file(self, tmp_path: Path) -> None:
        """A path that does not exist says 'no such file'."""
        assert self.refused(tmp_path / "nope.toml").got == "no such file"

    def test_directory(self, tmp_path: Path) -> None:
        """A directory is refused as not a regular file."""
        issue = self.refused(tmp_path)
        assert issue.expected == "a regular file"
        assert "directory" in issue.got

    def test_nul_bytes(self, tmp_path: Path) -> None:
        """A file with NUL bytes is refused as binary data."""
        assert "NUL" in self.refused(write(tmp_path, b"poll_interval_s = 1.0\x00\x00")).got

    def test_invalid_utf8(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are refused with the offset of the first bad byte."""
        issue = self.refused(write(tmp_path, b"state_dir = '\xff'"))
        assert issue.expected == "UTF-8 text"
        assert "offset 13" in issue.got

    def test_invalid_toml(self, tmp_path: Path) -> None:
        """A TOML syntax error is refused with the parser's message."""
        issue = self.refused(write(tmp_path, "poll_interval_s = = 1\n"))
        assert issue.expected == "valid TOML"
        assert "line 1" in issue.got

    def test_duplicate_key_is_a_toml_error(self, tmp_path: Path) -> None:
        """A key set twice is a TOML error, not silently last-wins."""
        issue = self.refused(write(tmp_path, "dry_run = true\ndry_run = false\n"))
        assert issue.expected == "valid TOML"

    def test_too_large(self, tmp_path: Path) -> None:
        """A file over 1 MiB is refused even when it is valid TOML."""
        text = "# " + "x" * MAX_CONFIG_BYTES + "\n"
        assert "at most" in self.refused(write(tmp_path, text)).expected

    def test_exactly_max_size_accepted(self, tmp_path: Path) -> None:
        """A file of exactly 1 MiB of comments is still read."""
        text = "#" + "x" * (MAX_CONFIG_BYTES - 2) + "\n"
        path = write(tmp_path, text)
        assert path.stat().st_size == MAX_CONFIG_BYTES
        assert load_config(path, enforce_trust=False).poll_interval_s == 1.0

    def test_symlink_to_dev_zero(self, tmp_path: Path) -> None:
        """A symlink to /dev/zero is refused as not a regular file instead of read forever."""
        link = tmp_path / "zero.toml"
        link.symlink_to("/dev/zero")
        assert self.refused(link).expected.startswith("a regular file")

    def test_fifo_refused_without_blocking(self, tmp_path: Path) -> None:
        """A named pipe with no writer is refused at once instead of blocking the open."""
        fifo = tmp_path / "pipe.toml"
        os.mkfifo(fifo)
        assert self.refused(fifo).expected == "a regular file"

    def test_symlink_to_regular_file_is_read(self, tmp_path: Path) -> None:
        """A symlink to a regular file (configuration management) is followed and read."""
        target = write(tmp_path, "dry_run = true\n", "real.toml")
        link = tmp_path / "link.toml"
        link.symlink_to(target)
        assert load_config(link, enforce_trust=False).dry_run is True

    def test_symlink_to_untrusted_file_is_refused_as_root(self, tmp_path: Path) -> None:
        """The trust checks apply to the file a symlink reaches: a group-writable target is refused."""
        target = write(tmp_path, "dry_run = true\n", "real.toml")
        target.chmod(0o664)
        link = tmp_path / "link.toml"
        link.symlink_to(target)
        with pytest.raises(ConfigError) as info:
            read_small_file(link, trust_euid=0)  # checked as if running as root
        assert "writable" in str(info.value.issues[0])

    def test_source_is_the_path(self, tmp_path: Path) -> None:
        """The loaded config remembers the path it came from."""
        path = write(tmp_path, "# all defaults\n")
        assert load_config(str(path), enforce_trust=False).source == str(path)

    def test_empty_file_is_refused_but_comments_mean_defaults(self, tmp_path: Path) -> None:
        """An empty (truncated) file is an error; a file of only comments loads as all defaults."""
        with pytest.raises(ConfigError, match="an empty file"):
            load_config(write(tmp_path, "  \n"), enforce_trust=False)
        assert load_config(write(tmp_path, "# nothing to change\n"), enforce_trust=False).poll_interval_s == 1.0


class TestTrust:
    """check_trust: as root, only a root-owned file writable only by root is used."""

    def make(self, tmp_path: Path, uid: int, mode: int) -> Path:
        """A config file owned by ``uid`` with permission bits ``mode``."""
        if os.geteuid() != 0:
            pytest.skip("needs root to chown")
        path = write(tmp_path, "dry_run = true\n")
        os.chown(path, uid, 0)
        path.chmod(mode)
        return path

    def test_root_owned_0644_accepted(self, tmp_path: Path) -> None:
        """A root-owned 0644 file passes the trust check and loads with trust enforced."""
        path = self.make(tmp_path, 0, 0o644)
        check_trust(path, euid=0)
        assert load_config(path).dry_run is True

    def test_not_root_owned_refused(self, tmp_path: Path) -> None:
        """A file owned by another uid is refused, naming the owner."""
        path = self.make(tmp_path, 1234, 0o644)
        with pytest.raises(ConfigError) as caught:
            check_trust(path, euid=0)
        (issue,) = caught.value.issues
        assert issue.file == str(path)
        assert "owned by uid 1234" in issue.got

    @pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
    def test_group_or_other_writable_refused(self, tmp_path: Path, mode: int) -> None:
        """A root-owned file writable by group or others is refused, naming the mode."""
        path = self.make(tmp_path, 0, mode)
        with pytest.raises(ConfigError) as caught:
            check_trust(path, euid=0)
        assert f"mode {mode:o}" in caught.value.issues[0].got

    def test_both_problems_named(self, tmp_path: Path) -> None:
        """A foreign-owned, world-writable file names both problems in one issue."""
        path = self.make(tmp_path, 1234, 0o666)
        with pytest.raises(ConfigError) as caught:
            check_trust(path, euid=0)
        got = caught.value.issues[0].got
        assert "owned by uid 1234" in got
        assert "writable by group or others" in got

    def test_not_checked_when_not_root(self, tmp_path: Path) -> None:
        """A non-root daemon does not apply the trust check."""
        path = self.make(tmp_path, 1234, 0o666)
        check_trust(path, euid=1000)

    def test_load_config_enforces_trust(self, tmp_path: Path) -> None:
        """load_config refuses an untrusted file when running as root."""
        path = self.make(tmp_path, 1234, 0o644)
        with pytest.raises(ConfigError):
            load_config(path)


class TestRender:
    """render_config writes TOML that loads back to the same Config."""

    def round_trip(self, tmp_path: Path, config: Config) -> Config:
        """Render ``config``, load the text back, and return it with the original source."""
        path = write(tmp_path, render_config(config), "rendered.toml")
        return replace(load_config(path, enforce_trust=False), source=config.source)

    def test_defaults_round_trip(self, tmp_path: Path) -> None:
        """The default config renders to TOML that loads back equal."""
        assert self.round_trip(tmp_path, Config()) == Config()

    def test_full_config_with_overrides_round_trips(self, tmp_path: Path) -> None:
        """A config using every key and several [[gpu]] overrides loads back equal, overrides in order."""
        original = parse_config(
            {
                **tomllib.loads(FULL_TOML),
                "gpu": [
                    {"index": 0, "power": {"ladder_w": [700.0, 500.0]}},
                    {"uuid": 'GPU-a"b\\c', "thermal": {"warning_c": 60.0, "hysteresis_c": 1.5}},
                    {"name": "*H100*", "index": 3},
                ],
            },
            "src.toml",
        )
        back = self.round_trip(tmp_path, original)
        assert back == original
        assert [g.index for g in back.gpus] == [0, None, 3]

    def test_control_characters_in_strings_round_trip(self, tmp_path: Path) -> None:
        """Strings with newlines, tabs and control characters render as valid TOML and load back equal."""
        original = replace(
            Config(),
            state_dir="/var/lib/a\nb\tc\x01d\x7fe",
            gpus=(GpuOverride(None, None, "odd\nname", {}, {"dwell_s": 1.0}),),
        )
        assert self.round_trip(tmp_path, original) == original

    def test_unset_optional_is_omitted(self) -> None:
        """An unset optional value (simulation.ambient_c) is left out rather than rendered."""
        assert "ambient_c" not in render_config(Config())

    def test_source_with_newline_cannot_inject_keys(self, tmp_path: Path) -> None:
        """A source path containing a newline stays inside the header comment."""
        original = replace(Config(), source="/etc/x\ndry_run = true")
        text = render_config(original)
        assert len(text.splitlines()[0]) > len("# effective configuration from /etc/x")
        assert self.round_trip(tmp_path, original) == original

    def test_source_named_in_header(self) -> None:
        """The rendered text says where the configuration came from."""
        text = render_config(replace(Config(), source="/etc/x.toml"))
        assert text.splitlines()[0] == "# effective configuration from /etc/x.toml"


class TestTargetModePollInterval:
    """Target mode's thermal model needs a reading at least every 5 s."""

    def test_a_slow_poll_with_target_mode_is_refused_naming_both_keys(self) -> None:
        """poll_interval_s = 20 with power.mode = "target" is refused on power.mode, saying the limit and the
        way out (before, every 20 s reading was a gap to the fit: the limit was never raised)."""
        (issue,) = issues_of({"poll_interval_s": 20.0, "power": {"mode": "target", "target_c": 70.0}})
        assert issue.key == "power.mode"
        assert "at most 5 s with target mode on" in issue.expected and 'mode = "ladder"' in issue.expected
        assert issue.got == 'mode = "target" with readings 20 s apart'

    @pytest.mark.parametrize("poll_s", [0.5, 1.0, 5.0])
    def test_a_poll_the_fit_can_follow_is_accepted(self, poll_s: float) -> None:
        """Target mode at a poll of 5 s or faster loads."""
        config = parse_config({"poll_interval_s": poll_s, "power": {"mode": "target", "target_c": 70.0}}, "f")
        assert config.power.target_mode and config.poll_interval_s == poll_s

    def test_the_ladder_takes_any_poll(self) -> None:
        """The ladder has no such limit: a 60 s poll loads."""
        assert parse_config({"poll_interval_s": 60.0}, "f").poll_interval_s == 60.0

    def test_target_mode_from_a_gpu_override_is_checked_against_the_poll(self) -> None:
        """A [[gpu]] override that turns target mode on under a 20 s poll is a contradiction for that GPU."""
        data = {"poll_interval_s": 20.0, "gpu": [{"index": 0, "power": {"mode": "target", "target_c": 70.0}}]}
        config = parse_config(data, "f")
        (issue,) = check_resolved(config, [gpu(index=0)])
        assert issue.key.endswith("power.mode") and "at most 5 s with target mode on" in issue.expected
        assert check_resolved(config, [gpu(index=1)]) == []

    def test_target_mode_on_a_fast_simulated_clock_is_a_contradiction(self) -> None:
        """`run --simulate` at time_scale 60 reads 60 simulated seconds apart: too far for target mode."""
        data = {"backend": "simulated", "simulation": {"time_scale": 60.0}, "power": {"mode": "target"}}
        config = parse_config(data, "f")
        (issue,) = check_resolved(config, [gpu(index=0)])
        assert issue.key.endswith("power.mode") and issue.got == 'mode = "target" with readings 60 s apart'
