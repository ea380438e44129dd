"""The shipped monitoring: alert rules (promtool), the Grafana dashboard, the Kubernetes manifests."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.config import load_config
from governor.metrics import build_registry
from governor.model import CLOCK_EVENT_REASONS, ZONES_BY_SEVERITY, GpuHealth, Outcome
from governor.observers import PROCESS_ACTION_NAMES
from governor.policy import Action, Rule
from tests.builders import full_exposition, full_mig_gpu, mig_daemon, scripted_daemon
from tests.support import require_tool

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = REPO / "packaging" / "prometheus"
RULES = PROMETHEUS_DIR / "gpu-governor-alerts.yml"
RULES_TEMPLATE = PROMETHEUS_DIR / "gpu-governor-alerts.yml.in"
ALERTS_GENERATOR = PROMETHEUS_DIR / "generate_alerts.py"
RULE_TESTS = PROMETHEUS_DIR / "gpu-governor-alerts.test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DCGM_RULES = PROMETHEUS_DIR / "gpu-governor-dcgm-rules.yml"
DCGM_RULE_TESTS = PROMETHEUS_DIR / "gpu-governor-dcgm-rules.test.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "gpu-governor.json"
GENERATOR = REPO / "packaging" / "grafana" / "generate_dashboard.py"
KUBERNETES_DIR = REPO / "packaging" / "kubernetes"

HOST_LEVEL_METRICS = frozenset(
    {
        "gpu_governor_build_info",
        "gpu_governor_config_last_reload_successful",
        "gpu_governor_ready",
        "gpu_governor_start_timestamp_seconds",
        "gpu_governor_last_poll_timestamp_seconds",
        "gpu_governor_tick_duration_seconds_bucket",
        "gpu_governor_state_write_errors_total",
        "gpu_governor_class_vram_budget_bytes",
        "gpu_governor_process_actions_total",
    }
)
"""The governor's metrics without a gpu label (all others are filtered by $gpu on the dashboard)."""

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
VARIABLE_VALUES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "job": "gpu-governor",
    "instance": "127.0.0.1:9847",
    "gpu": "0|1",
}
"""Values for the dashboard's variables, regex-safe where they land in =~ matchers."""
SCRAPE_TARGET = {"instance": VARIABLE_VALUES["instance"], "job": VARIABLE_VALUES["job"]}
"""The labels Prometheus adds to what it scrapes from a governor the variables select."""


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, check=False, cwd=cwd
    )


def recording_rules() -> dict[str, str]:
    """Record name -> expression (one line) of the shipped dcgm-exporter join rules."""
    rules = {}
    for block in re.split(r"^\s+- record: ", DCGM_RULES.read_text(), flags=re.MULTILINE)[1:]:
        name, rest = block.split("\n", 1)
        expr = rest.split("expr:", 1)[1].removeprefix(" >-")
        rules[name.strip()] = " ".join(line.strip() for line in expr.strip().splitlines())
    return rules


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def annotation_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(annotation name, PromQL expression) of every Prometheus annotation query."""
    return [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if a.get("expr")]


def substitute(expr: str, values: dict[str, str] = VARIABLE_VALUES) -> str:
    """The expression with the dashboard's template variables replaced by concrete values."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule in the shipped rules file."""
    parts = re.split(r"^\s+- alert: ", RULES.read_text(), flags=re.MULTILINE)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def alert_exprs() -> list[tuple[str, str]]:
    """(alert name, expression) of every shipped alert, read through promtool-free text parsing."""
    exprs = []
    for name, block in alert_blocks().items():
        match = re.search(r"\n\s+expr: (?:>-\n)?(.*?)\n\s+(?:for|labels):", block, flags=re.DOTALL)
        assert match, f"no expr found for {name}"
        exprs.append((name, " ".join(line.strip() for line in match.group(1).splitlines())))
    return exprs


def check_exprs_with_promtool(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on a file holding each expression as a recording rule (parses the PromQL)."""
    lines = ["groups:", "  - name: parse-check", "    rules:"]
    for i, expr in enumerate(exprs):
        lines += [f"      - record: parse_check_{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "exprs.yml"
    path.write_text("\n".join(lines) + "\n")
    return promtool("check", "rules", path)


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Sample and family names a real scrape of a governed two-GPU host exposes."""
    daemon, _, clock = scripted_daemon(tmp_path, lambda t, i: 90.0 if i == 0 else 50.0, gpu_count=2)
    daemon.start()
    for _ in range(5):
        clock.advance(1.0)
        daemon.tick()
    body = generate_latest(build_registry(lambda: daemon.published)).decode()
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def declared_metric_names() -> set[str]:
    """Metric names governor/metrics.py declares (a family with no sample yet is not in a scrape)."""
    source = (REPO / "governor" / "metrics.py").read_text()
    names = {f"gpu_governor_{n}" for n in re.findall(r'(?:_gauge\(\s*|f"\{PREFIX\}_)"?(\w+)"', source)}
    counters = re.findall(r'CounterMetricFamily\(\s*f"\{PREFIX\}_(\w+)"', source)
    return names | {f"gpu_governor_{n}_total" for n in counters}


def load_module(path: Path) -> Any:
    """Import a script of packaging/ as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metric_names_in(expr: str) -> set[str]:
    """Names of the governor's and the process collector's metrics an expression selects."""
    return set(re.findall(r"\b(?:gpu_governor|process)_\w+", expr))


def expr_test(body: str, names: set[str], counts: list[tuple[str, int]]) -> str:
    """A `promtool test rules` file: the samples of ``names`` in ``body`` (a scrape, as Prometheus
    would store it from the target the dashboard's variables select) held for 5 minutes, and each
    expression of ``counts`` expected to give that one value at 2m."""
    lines = ["evaluation_interval: 1m", "tests:", "  - interval: 1m", "    input_series:"]
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in names:
                matchers = ",".join(f'{k}="{v}"' for k, v in {**sample.labels, **SCRAPE_TARGET}.items())
                lines += [f"      - series: '{sample.name}{{{matchers}}}'", f"        values: '{sample.value:.0f}x5'"]
    lines.append("    promql_expr_test:")
    for expr, value in counts:
        lines += [f"      - expr: {json.dumps(expr)}", "        eval_time: 2m", "        exp_samples:"]
        lines += ["          - labels: '{}'", f"            value: {value}"]
    return "\n".join(lines) + "\n"


class TestAlertRules:
    def test_promtool_check_rules_is_clean(self) -> None:
        """`promtool check rules` accepts the shipped rules with no warning."""
        result = promtool("check", "rules", RULES)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout
        assert "WARNING" not in (result.stdout + result.stderr).upper()

    def test_promtool_unit_tests_pass(self) -> None:
        """`promtool test rules` passes every firing and not-firing case."""
        result = subprocess.run(
            [require_tool("promtool"), "test", "rules", RULE_TESTS.name],
            cwd=PROMETHEUS_DIR,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_unit_tests_catch_a_broken_rule(self, tmp_path: Path) -> None:
        """A rule whose expression is broken (throttle alert never true) makes `promtool test rules` fail."""
        rules = RULES.read_text()
        broken = 'gpu_governor_gpu_thermal_zone{gpu_governor_gpu_thermal_zone="throttle"} == 1'
        assert broken in rules
        (tmp_path / RULES.name).write_text(rules.replace(broken, broken.replace("== 1", "== 2")))
        shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
        result = subprocess.run(
            [require_tool("promtool"), "test", "rules", RULE_TESTS.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode != 0
        assert "GpuGovernorGpuThrottleZone" in result.stdout + result.stderr

    def test_every_alert_is_tested_firing_and_not_firing(self) -> None:
        """Each alert has at least one unit-test case expecting it to fire and one expecting silence."""
        firing: set[str] = set()
        silent: set[str] = set()
        lines = RULE_TESTS.read_text().splitlines()
        for i, line in enumerate(lines):
            match = re.match(r"\s+alertname: (\w+)$", line)
            if match is None:
                continue
            following = lines[i + 1].strip()
            if following == "exp_alerts: []":
                silent.add(match.group(1))
            elif following == "exp_alerts:" and "exp_labels" in lines[i + 2]:
                firing.add(match.group(1))
        alerts = set(alert_blocks())
        assert len(alerts) >= 15
        assert alerts - firing == set(), "alerts never tested firing"
        assert alerts - silent == set(), "alerts never tested silent"

    def test_every_alert_has_severity_summary_and_description(self) -> None:
        """Each alert carries a known severity and a summary and description (what happened, what to do)."""
        for name, block in alert_blocks().items():
            assert name.startswith("GpuGovernor"), name
            assert re.search(r"severity: (critical|warning|info)\n", block), name
            assert "summary: " in block, name
            description = block.split("description: >-", 1)
            assert len(description) == 2, name
            assert len(description[1].split("- alert:")[0].split()) >= 25, f"{name}: description too short"

    def test_alerts_cover_the_issue(self) -> None:
        """The shipped alerts watch zones, availability, staleness, the power floor, VRAM, NVML, config."""
        alerts = alert_blocks()
        text = "\n".join(alerts.values())
        for needle in (
            'gpu_governor_gpu_thermal_zone="throttle"',
            'gpu_governor_gpu_thermal_zone="critical"',
            'up{job="gpu-governor"} == 0',
            'absent(up{job="gpu-governor"})',
            "gpu_governor_last_poll_timestamp_seconds",
            "gpu_governor_gpu_power_ladder_floor_watts",
            "gpu_governor_class_over_budget_processes",
            'action=~"sigterm|sigkill"',
            'gpu_governor_decisions_total{rule=~"vram_kill_ineffective|vram_kill_given_up"}',
            "gpu_governor_gpu_read_errors_total",
            'gpu_governor_gpu_health="lost"',
            "gpu_governor_config_last_reload_successful == 0",
            "gpu_governor_gpu_monitor_only == 1",
        ):
            assert needle in text, needle

    def test_hardware_alerts_cover_issue_14(self) -> None:
        """XID, uncorrectable ECC, row remapping and sustained thermal/power throttling each have an alert."""
        alerts = alert_blocks()
        expected = {
            "GpuGovernorGpuXidErrors": "increase(gpu_governor_gpu_xid_errors_total[",
            "GpuGovernorGpuEccUncorrectable": 'gpu_governor_gpu_ecc_errors_total{type="uncorrected"}',
            "GpuGovernorGpuRowRemapFailed": "gpu_governor_gpu_row_remap_failed == 1",
            "GpuGovernorGpuRowRemapPending": "gpu_governor_gpu_row_remap_pending == 1",
            "GpuGovernorGpuThermalThrottling": 'rate(gpu_governor_gpu_clock_event_seconds_total{reason=~"sw_thermal',
            "GpuGovernorGpuPowerThrottling": 'rate(gpu_governor_gpu_clock_event_seconds_total{reason="sw_power_cap"}',
        }
        for name, needle in expected.items():
            assert needle in alerts[name], name
        for name in ("GpuGovernorGpuThermalThrottling", "GpuGovernorGpuPowerThrottling"):
            assert re.search(r"\n\s+for: \d+m\n", alerts[name]), f"{name} must be sustained (for:)"
        assert (
            "unless on (instance, job, gpu) gpu_governor_gpu_power_limit_target_watts"
            in alerts["GpuGovernorGpuPowerThrottling"]
        ), "a power cap the governor set itself must not fire the power alert"

    def test_mig_pressure_alert_mirrors_the_gpu_pressure_alert(self) -> None:
        """GpuGovernorMigVramPressure watches each MIG instance's pressure with the GPU alert's threshold,
        `for:` and severity, and names the instance; the GPU alert leaves GPUs read per instance to it."""
        alerts = dict(alert_exprs())
        blocks = alert_blocks()
        gpu, mig = alerts["GpuGovernorVramPressure"], alerts["GpuGovernorMigVramPressure"]
        comparison = gpu.split(" unless ")[0].removeprefix("gpu_governor_gpu_memory_pressure")
        assert comparison == " == 1"
        assert mig == f"gpu_governor_mig_instance_memory_pressure{comparison}"
        assert gpu.endswith("unless on (instance, job, gpu, uuid) gpu_governor_mig_instance_memory_pressure")

        def setting(name: str, key: str) -> str:
            match = re.search(rf"\n\s+{key}: (\S+)\n", blocks[name])
            assert match, (name, key)
            return match.group(1)

        for key in ("for", "severity"):
            assert setting("GpuGovernorMigVramPressure", key) == setting("GpuGovernorVramPressure", key)
        summary = re.search(r"summary: (.*)", blocks["GpuGovernorMigVramPressure"])
        assert summary and "{{ $labels.mig_uuid }}" in summary.group(1) and "{{ $labels.gpu }}" in summary.group(1)

    def test_shipped_alerts_are_the_generator_default(self) -> None:
        """gpu-governor-alerts.yml is generate_alerts.py's output for the default selector job="gpu-governor"."""
        generator = load_module(ALERTS_GENERATOR)
        assert generator.DEFAULT_JOB_SELECTOR == 'job="gpu-governor"'
        assert generator.render() == RULES.read_text()
        assert "@JOB_SELECTOR@" in RULES_TEMPLATE.read_text()
        assert "@" not in RULES.read_text().replace("@example", "")

    def test_generator_command_line_writes_the_selector(self, tmp_path: Path) -> None:
        """`generate_alerts.py --job-selector ... -o FILE` writes rules selecting `up` by those matchers."""
        out = tmp_path / "alerts.yml"
        result = subprocess.run(
            [sys.executable, str(ALERTS_GENERATOR), "--job-selector", 'job=~"gpu-.*", env="prod"', "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        text = out.read_text()
        assert 'up{job=~"gpu-.*", env="prod"} == 0' in text
        assert 'absent(up{job=~"gpu-.*", env="prod"})' in text
        assert 'job="gpu-governor"' not in text
        assert promtool("check", "rules", out).returncode == 0

    @pytest.mark.parametrize(
        "selector",
        [
            "",
            "gpu-governor",
            'job="a"} or vector(1) #',
            'job="a"\n  - alert: X',
            "job='a'",
            'job=="a"',
            '{job="a"}',
            'job="a",\n env="b"',
        ],
    )
    def test_generator_refuses_what_is_not_label_matchers(self, selector: str) -> None:
        """A selector that is not a list of label matchers (empty, bare word, PromQL or YAML injection) is refused."""
        generator = load_module(ALERTS_GENERATOR)
        with pytest.raises(ValueError, match="--job-selector: expected label matchers"):
            generator.render(selector)
        result = subprocess.run(
            [sys.executable, str(ALERTS_GENERATOR), "--job-selector", selector],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2 and result.stdout == "" and "--job-selector" in result.stderr

    def test_promtool_with_another_job_selector(self, tmp_path: Path) -> None:
        """Rules generated for job="gpu-nodes",env="prod" fire for that job's targets and ignore job gpu-governor;
        the default rules do not fire for them (the selector is really used)."""
        generator = load_module(ALERTS_GENERATOR)
        (tmp_path / "custom.yml").write_text(generator.render('job="gpu-nodes",env="prod"'))
        shutil.copy(RULES, tmp_path / "default.yml")
        labels = '{severity: critical, instance: "host-a:9847", job: gpu-nodes, env: prod}'
        down = f"""
  - name: down
    interval: 1m
    input_series:
      - series: 'up{{instance="host-a:9847",job="gpu-nodes",env="prod"}}'
        values: '0x10'
      - series: 'up{{instance="host-b:9847",job="gpu-governor"}}'
        values: '0x10'
    alert_rule_test:
      - eval_time: 1m
        alertname: GpuGovernorDown
        exp_alerts: []
      - eval_time: 3m
        alertname: GpuGovernorDown
        exp_alerts:
          - exp_labels: {labels}
            exp_annotations:
              summary: "gpu-governor on host-a:9847 cannot be scraped"
              description: "Prometheus has failed to scrape host-a:9847 for 2 minutes, so nothing governs this host's \
GPUs or nothing reports on them. On the host run `systemctl status gpu-governor` and `journalctl -u gpu-governor -p \
warning`; check that the metrics address (metrics.listen_address, port 9847) is reachable from Prometheus."
      - eval_time: 11m
        alertname: GpuGovernorAbsent
        exp_alerts: []
  - name: absent
    interval: 1m
    input_series:
      - series: 'up{{instance="host-b:9847",job="gpu-governor"}}'
        values: '1x20'
    alert_rule_test:
      - eval_time: 11m
        alertname: GpuGovernorAbsent
        exp_alerts:
          - exp_labels: {{severity: warning, job: gpu-nodes, env: prod}}
            exp_annotations:
              summary: "No gpu-governor target is known to Prometheus"
              description: "Prometheus has had no target matching up{{job=\\"gpu-nodes\\",env=\\"prod\\"}} for 10 \
minutes: the scrape job, its file_sd targets file or the Kubernetes discovery lost every host. Check the scrape \
configuration and the targets page of Prometheus."
"""
        for rules in ("custom.yml", "default.yml"):
            (tmp_path / f"{rules}.test.yml").write_text(f"rule_files: [{rules}]\nevaluation_interval: 1m\ntests:{down}")
        custom = subprocess.run(
            [require_tool("promtool"), "test", "rules", "custom.yml.test.yml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert custom.returncode == 0, custom.stdout + custom.stderr
        default = subprocess.run(
            [require_tool("promtool"), "test", "rules", "default.yml.test.yml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert default.returncode != 0
        assert "GpuGovernorDown" in default.stdout + default.stderr

    def test_scrape_config_example_is_valid(self) -> None:
        """`promtool check config` accepts the example scrape config, including its rule file."""
        result = promtool("check", "config", SCRAPE_CONFIG)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "gpu-governor-alerts.yml" in result.stdout
        text = SCRAPE_CONFIG.read_text()
        assert "job_name: gpu-governor" in text
        assert "file_sd_configs" in text


class TestDcgmJoinRules:
    def test_promtool_check_and_unit_tests_pass(self) -> None:
        """`promtool check rules` accepts the join rules and `promtool test rules` passes on both exporters' series."""
        check = promtool("check", "rules", DCGM_RULES)
        assert check.returncode == 0 and "WARNING" not in (check.stdout + check.stderr).upper(), check.stdout
        result = promtool("test", "rules", DCGM_RULE_TESTS.name, cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout

    def test_every_rule_is_tested(self) -> None:
        """Each recorded series is the expr of at least one promql_expr_test with expected samples."""
        tests = DCGM_RULE_TESTS.read_text()
        rules = recording_rules()
        assert len(rules) >= 10
        for name in rules:
            assert re.search(rf"- expr: {re.escape(name)}\n\s+eval_time: \S+\n\s+exp_samples:\n\s+- labels:", tests), (
                name
            )

    def test_synthetic_series_are_labelled_as_each_exporter_labels_them(self) -> None:
        """dcgm-exporter series carry UUID, gpu, device, modelName, Hostname and a :9400 instance; the
        governor's carry uuid and gpu on :9847; and the two number the same GPU differently."""
        tests = DCGM_RULE_TESTS.read_text()
        for line in re.findall(r"series: '(DCGM_FI_DEV_\w+\{.*\})'", tests):
            for label in ("UUID=", "gpu=", "device=", "modelName=", "Hostname=", ':9400"'):
                assert label in line, (label, line)
            assert "uuid=" not in line
        governor = re.findall(r"series: '(gpu_governor_\w+\{.*\})'", tests)
        assert governor and all('uuid="' in s and 'gpu="' in s and ':9847"' in s for s in governor)
        assert 'gpu="1",UUID="GPU-aaaa"' in tests and 'gpu="0",uuid="GPU-aaaa"' in tests

    def test_joins_go_by_uuid_not_by_instance_and_gpu(self, tmp_path: Path) -> None:
        """The same rules joined on (gpu) instead of (uuid) fail the unit tests: the test data tells them apart."""
        broken = DCGM_RULES.read_text().replace(
            'max by (uuid) (label_replace(DCGM_FI_DEV_GPU_TEMP{UUID!=""}, "uuid", "$1", "UUID", "(.+)"))',
            'max by (uuid) (label_replace(DCGM_FI_DEV_GPU_TEMP{UUID!=""}, "uuid", "GPU-aaaa", "gpu", "0"))',
        )
        assert broken != DCGM_RULES.read_text()
        (tmp_path / DCGM_RULES.name).write_text(broken)
        shutil.copy(DCGM_RULE_TESTS, tmp_path / DCGM_RULE_TESTS.name)
        result = promtool("test", "rules", DCGM_RULE_TESTS.name, cwd=tmp_path)
        assert result.returncode != 0
        assert "dcgm_minus_governor" in result.stdout + result.stderr

    def test_rules_use_dcgm_default_counters_and_governor_metrics_only(self, tmp_path: Path) -> None:
        """Every DCGM field used is in dcgm-exporter's default counters; every governor metric is in a scrape."""
        default_counters = {
            "DCGM_FI_DEV_SM_CLOCK",
            "DCGM_FI_DEV_MEM_CLOCK",
            "DCGM_FI_DEV_MEMORY_TEMP",
            "DCGM_FI_DEV_GPU_TEMP",
            "DCGM_FI_DEV_POWER_USAGE",
            "DCGM_FI_DEV_XID_ERRORS",
        }
        exprs = " ".join(recording_rules().values())
        assert set(re.findall(r"DCGM_FI_\w+", exprs)) <= default_counters
        raw = [re.sub(r"\b\w*:[\w:]+", "", expr) for expr in recording_rules().values()]  # recorded names out
        used = set().union(*map(metric_names_in, raw))
        assert "gpu_governor_gpu_thermal_zone" in used
        assert used <= exported_metric_names(tmp_path)


class TestDashboard:
    def test_importable_into_current_grafana(self) -> None:
        """Fixed uid, a recent schemaVersion, a title, panels, no __inputs needing a choice at import."""
        dashboard = load_dashboard()
        assert dashboard["uid"] == "gpu-governor"
        assert dashboard["schemaVersion"] >= 39
        assert dashboard["title"]
        assert "__inputs" not in dashboard
        assert "id" not in dashboard or dashboard["id"] is None
        assert len(list(panels(dashboard))) >= 20

    def test_datasource_is_a_variable_never_a_fixed_uid(self) -> None:
        """Every panel and target uses ${datasource}, a variable of type datasource limited to Prometheus."""
        dashboard = load_dashboard()
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"

        def walk(node: Any) -> Iterator[Any]:
            if isinstance(node, dict):
                if "datasource" in node:
                    yield node["datasource"]
                for value in node.values():
                    yield from walk(value)
            elif isinstance(node, list):
                for value in node:
                    yield from walk(value)

        refs = list(walk(dashboard))
        assert refs
        assert all(ref == DATASOURCE for ref in refs), [ref for ref in refs if ref != DATASOURCE]
        for panel in panels(dashboard):
            if panel["type"] != "row":
                assert panel["datasource"] == DATASOURCE, panel["title"]
                assert panel["targets"], panel["title"]
                assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]

    def test_templated_by_host_and_gpu(self) -> None:
        """Job, host and GPU variables exist; every query filters by job and host, per-GPU ones by GPU."""
        dashboard = load_dashboard()
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        for name in ("job", "instance", "gpu"):
            assert variables[name]["type"] == "query"
            assert variables[name]["datasource"] == DATASOURCE
        assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
        for title, expr in dashboard_queries(dashboard) + annotation_queries(dashboard):
            for selector in re.findall(r"\b\w+\{[^}]*\}", expr):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, (title, selector)
                metric = selector.split("{", 1)[0]
                if metric.startswith("gpu_governor_") and metric not in HOST_LEVEL_METRICS:
                    assert 'gpu=~"$gpu"' in selector, (title, selector)

    def test_layout_has_unique_ids_and_no_overlap(self) -> None:
        """Panel ids are unique and no two panels share a grid cell within the 24-column grid."""
        dashboard = load_dashboard()
        ids = [p["id"] for p in panels(dashboard)]
        assert len(ids) == len(set(ids))
        cells: dict[tuple[int, int], str] = {}
        for panel in panels(dashboard):
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]

    def test_has_the_panels_the_issue_asks_for(self) -> None:
        """Temperature with zone thresholds, power vs limits, zone timeline, VRAM vs budget and reserve,
        decisions and actions, tick quantiles, read errors and poll age."""
        by_title = {p["title"]: p for p in panels(load_dashboard())}

        def exprs(title: str) -> str:
            return "\n".join(t["expr"] for t in by_title[title]["targets"])

        assert "gpu_governor_gpu_thermal_zone_threshold_celsius" in exprs("Temperature and zone thresholds")
        assert by_title["Thermal zone"]["type"] == "state-timeline"
        power = exprs("Power draw vs enforced and target limit")
        for metric in (
            "gpu_governor_gpu_power_watts",
            "gpu_governor_gpu_power_limit_watts",
            "gpu_governor_gpu_power_limit_target_watts",
        ):
            assert metric in power
        vram = exprs("VRAM per class vs budget and reserve")
        for metric in (
            "gpu_governor_class_vram_used_bytes",
            "gpu_governor_class_vram_budget_bytes",
            "gpu_governor_gpu_vram_reserve_bytes",
        ):
            assert metric in vram
        assert "gpu_governor_decisions_total" in exprs("Decisions per minute by rule")
        assert "gpu_governor_actions_total" in exprs("Power-limit actions per minute by outcome")
        assert "histogram_quantile(0.99" in exprs("Tick duration")
        assert "gpu_governor_gpu_read_errors_total" in exprs("NVML read errors per minute")
        assert "gpu_governor_last_poll_timestamp_seconds" in exprs("Age of last poll")

    def test_decisions_are_annotations_on_the_time_series_panels(self) -> None:
        """A dashboard-wide annotation (shown on every time-series panel) marks each decision at its own time,
        titled by rule, from the last-decision timestamp and info series, on the ${datasource} variable."""
        dashboard = load_dashboard()
        (annotation,) = [a for a in dashboard["annotations"]["list"] if a["name"] == "Governor decisions"]
        assert annotation["enable"] is True and annotation["datasource"] == DATASOURCE
        assert "filter" not in annotation or annotation["filter"] is None  # no panel filter: every panel
        assert annotation["useValueForTime"] is True
        assert "gpu_governor_gpu_last_decision_timestamp_seconds{" in annotation["expr"]
        assert "* 1000" in annotation["expr"]  # Grafana wants milliseconds
        assert "group_left (rule, from, to) gpu_governor_gpu_last_decision_info{" in annotation["expr"]
        assert annotation["titleFormat"] == "{{rule}}"
        assert "{{from}}" in annotation["textFormat"] and "{{to}}" in annotation["textFormat"]
        assert any(p["type"] == "timeseries" for p in panels(dashboard))

    def test_has_panels_for_the_issue_14_telemetry(self) -> None:
        """Clocks, clock-event seconds rate, XID, ECC and row remapping, memory temperature, fan and pstate."""
        by_title = {p["title"]: p for p in panels(load_dashboard())}

        def exprs(title: str) -> str:
            return "\n".join(t["expr"] for t in by_title[title]["targets"])

        clocks = exprs("SM and memory clocks")
        assert "gpu_governor_gpu_sm_clock_hertz" in clocks and "gpu_governor_gpu_memory_clock_hertz" in clocks
        assert "rate(gpu_governor_gpu_clock_event_seconds_total{" in exprs("Time slowed down, by reason")
        assert "increase(gpu_governor_gpu_xid_errors_total{" in exprs("XID errors")
        assert "sum by (instance, gpu, xid)" in exprs("XID errors")
        assert "increase(gpu_governor_gpu_ecc_errors_total{" in exprs("ECC errors")
        remap = exprs("Remapped memory rows")
        for metric in ("remapped_rows", "row_remap_pending", "row_remap_failed"):
            assert f"gpu_governor_gpu_{metric}" in remap
        assert "gpu_governor_gpu_memory_temperature_celsius" in exprs("Memory temperature")
        assert "gpu_governor_gpu_fan_speed_ratio" in exprs("Fan speed")
        assert "gpu_governor_gpu_pstate" in exprs("Performance state")
        assert by_title["Time slowed down, by reason"]["fieldConfig"]["defaults"]["unit"] == "percentunit"
        assert by_title["SM and memory clocks"]["fieldConfig"]["defaults"]["unit"] == "hertz"

    def test_mig_panels_answer_on_a_real_mig_scrape(self, tmp_path: Path) -> None:
        """The MIG row's queries, run by promtool on the series a daemon on a fake GPU in MIG mode (two
        instances) really exports, return one series per GPU (mode) and per instance (memory, pressure),
        with every label their legends name."""
        body, _ = mig_daemon(tmp_path, full_mig_gpu())
        by_title = {p["title"]: p for p in panels(load_dashboard())}
        expected = {"MIG mode": [1], "MIG instance memory used vs total": [2, 2], "MIG instance memory pressure": [2]}
        targets: list[tuple[dict[str, Any], int]] = []
        for title, counts in expected.items():
            assert len(by_title[title]["targets"]) == len(counts), title
            targets += zip(by_title[title]["targets"], counts, strict=True)
        exprs = [target["expr"] for target, _ in targets]
        used = set().union(*(metric_names_in(expr) for expr in exprs))
        assert used == {
            "gpu_governor_gpu_mig_mode",
            "gpu_governor_mig_instance_memory_used_bytes",
            "gpu_governor_mig_instance_memory_total_bytes",
            "gpu_governor_mig_instance_memory_pressure",
        }
        labels = scraped_labels([body])
        assert label_problems(exprs, labels) == []
        for target, _ in targets:
            carried = set().union(*(labels[name] for name in metric_names_in(target["expr"])))
            assert set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"])) <= carried | TARGET_LABELS, target
        series_counts = [(f"count({substitute(target['expr'])})", n) for target, n in targets]
        (tmp_path / "mig.test.yml").write_text(expr_test(body, used, series_counts))
        result = promtool("test", "rules", "mig.test.yml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_expression_parses(self, tmp_path: Path) -> None:
        """Every dashboard query, variables substituted, parses as PromQL (promtool check rules)."""
        dashboard = load_dashboard()
        queries = [substitute(expr) for _, expr in dashboard_queries(dashboard) + annotation_queries(dashboard)]
        assert not any("$" in q for q in queries)
        result = check_exprs_with_promtool(queries, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(queries)} rules found" in result.stdout

    def test_the_parse_check_rejects_bad_promql(self, tmp_path: Path) -> None:
        """The promtool-based parse check fails on an expression with unbalanced parentheses."""
        result = check_exprs_with_promtool(["up", "sum by (instance (up)"], tmp_path)
        assert result.returncode != 0

    def test_uses_only_metrics_the_governor_exports(self, tmp_path: Path) -> None:
        """Every metric the dashboard and alerts select is in a real scrape or declared by governor/metrics.py.

        Issue 14's telemetry (clocks, clock-event seconds, XID, ECC, row remapping, memory
        temperature, fan, pstate: docs/monitoring.md) is declared by the telemetry branch; on
        the ops branch alone this test fails on those names, and passes once both are merged."""
        known = exported_metric_names(tmp_path) | declared_metric_names()
        dashboard = load_dashboard()
        exprs = [e for _, e in dashboard_queries(dashboard) + annotation_queries(dashboard) + alert_exprs()]
        used = set().union(*(metric_names_in(expr) for expr in exprs))
        assert "gpu_governor_gpu_temperature_celsius" in used
        assert "gpu_governor_tick_duration_seconds_bucket" in used
        assert used - known == set()

    def test_generator_reproduces_the_json(self) -> None:
        """generate_dashboard.py (grafana-foundation-sdk) produces exactly the shipped JSON."""
        pytest.importorskip("grafana_foundation_sdk")
        spec = importlib.util.spec_from_file_location("generate_dashboard", GENERATOR)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.build() == load_dashboard()


SELECTOR = re.compile(r"\b((?:gpu_governor|process)_\w+)\s*\{([^}]*)\}")
"""A metric selected with label matchers: its name and the matchers."""
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TARGET_LABELS = frozenset({"job", "instance", "le"})
"""Labels Prometheus adds (job, instance) or a histogram's buckets carry (le)."""
KNOWN_VALUES = {
    "reason": {name for _, name in CLOCK_EVENT_REASONS},
    "outcome": {o.value for o in Outcome} | {"reported"},
    "action": {a.value for a in Action} | set(PROCESS_ACTION_NAMES.values()),
    "gpu_governor_gpu_thermal_zone": {z.value for z in ZONES_BY_SEVERITY},
    "gpu_governor_gpu_health": {h.value for h in GpuHealth},
    "zone": {z.value for z in ZONES_BY_SEVERITY},
    "rule": {r.value for r in Rule},
}
"""Every value the daemon can give these labels (a matcher on another value never matches)."""


def scraped_labels(bodies: list[str]) -> dict[str, set[str]]:
    """Sample name -> the label names its samples carry, over ``bodies`` (text expositions)."""
    labels: dict[str, set[str]] = {}
    for body in bodies:
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def label_problems(exprs: list[str], labels: dict[str, set[str]]) -> list[str]:
    """What in ``exprs`` selects a label the metric does not carry, a value the daemon never gives
    that label, or groups by a label none of the expression's metrics carry."""
    problems = []
    for expr in exprs:
        for name, matchers in SELECTOR.findall(expr):
            for label, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS:
                    continue
                if name in labels and label not in labels[name]:
                    problems.append(f"{name} has no label {label}: {expr}")
                alternatives = set(value.split("|")) if re.fullmatch(r"[\w|]+", value) else set()
                if label in KNOWN_VALUES and alternatives - KNOWN_VALUES[label]:
                    problems.append(f"{label} is never {sorted(alternatives - KNOWN_VALUES[label])}: {expr}")
        names = metric_names_in(expr)
        if not names <= labels.keys():  # a metric the scrape lacks: its labels are unknown here
            continue
        carried = set().union(*(labels[name] for name in names))
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                if label not in TARGET_LABELS and label not in carried:
                    problems.append(f"no metric carries {label}: {expr}")
    return problems


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The labels of every sample in full expositions of an H100 and an RTX 4070 host (fans)."""
    return scraped_labels(
        [full_exposition(tmp_path_factory.mktemp(profile), profile) for profile in ("h100-80gb", "rtx4070")]
    )


class TestLabelsUsed:
    def test_dashboard_and_alerts_use_labels_the_metrics_carry(self, labels: dict[str, set[str]]) -> None:
        """Every label the dashboard and the alerts match on or group by is one the metric carries in a
        real scrape, and every value they match is one the daemon gives (else the query never matches)."""
        dashboard = load_dashboard()
        exprs = [e for _, e in dashboard_queries(dashboard) + annotation_queries(dashboard) + alert_exprs()]
        checked = [name for expr in exprs for name, _ in SELECTOR.findall(expr) if name in labels]
        assert len(checked) > 50
        assert label_problems(exprs, labels) == []

    def test_the_label_check_catches_a_wrong_label_and_value(self, labels: dict[str, set[str]]) -> None:
        """A selector on a label the metric lacks, a value never given, and a grouping by a label none
        carries are each reported."""
        problems = label_problems(
            [
                'gpu_governor_gpu_temperature_celsius{gpu_index="0"}',
                'gpu_governor_actions_total{outcome="error"}',
                "sum by (gpu_name) (gpu_governor_gpu_power_watts)",
                'sum by (gpu, uuid) (gpu_governor_gpu_thermal_zone{gpu_governor_gpu_thermal_zone="hot"})',
            ],
            labels,
        )
        assert [problem.split(":")[0] for problem in problems] == [
            "gpu_governor_gpu_temperature_celsius has no label gpu_index",
            "outcome is never ['error']",
            "no metric carries gpu_name",
        ]


def configmap_governor_toml() -> str:
    """The governor.toml embedded in the DaemonSet's ConfigMap (a `|` block indented by 4)."""
    text = (KUBERNETES_DIR / "gpu-governor.yaml").read_text()
    block = text.split("  governor.toml: |\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines) + "\n"


class TestKubernetes:
    def test_manifests_pass_kubernetes_schema_validation(self) -> None:
        """Every object in gpu-governor.yaml validates strictly against the Kubernetes OpenAPI schemas."""
        validate = pytest.importorskip("kubernetes_validate")
        yaml = importlib.import_module("yaml")
        documents = [d for d in yaml.safe_load_all((KUBERNETES_DIR / "gpu-governor.yaml").read_text()) if d]
        kinds = {d["kind"] for d in documents}
        assert {"DaemonSet", "ConfigMap", "Service"} <= kinds
        version = validate.latest_version()
        for document in documents:
            validate.validate(document, version, strict=True)

    def test_schema_validation_rejects_a_broken_daemonset(self) -> None:
        """The validator catches a DaemonSet whose hostPID is a string."""
        validate = pytest.importorskip("kubernetes_validate")
        yaml = importlib.import_module("yaml")
        documents = yaml.safe_load_all((KUBERNETES_DIR / "gpu-governor.yaml").read_text())
        daemonset = next(d for d in documents if d and d["kind"] == "DaemonSet")
        daemonset["spec"]["template"]["spec"]["hostPID"] = "yes"
        with pytest.raises(validate.ValidationError):
            validate.validate(daemonset, validate.latest_version(), strict=True)

    def test_daemonset_has_what_a_gpu_node_needs(self) -> None:
        """Host PIDs, device access, GPU-node selector, metrics port, scrape annotations, 0444 config."""
        text = (KUBERNETES_DIR / "gpu-governor.yaml").read_text()
        for needle in (
            "kind: DaemonSet",
            "hostPID: true",
            "privileged: true",
            "runAsUser: 0",
            "NVIDIA_VISIBLE_DEVICES",
            "nvidia.com/gpu.present",
            "containerPort: 9847",
            'prometheus.io/scrape: "true"',
            'prometheus.io/port: "9847"',
            "defaultMode: 0444",
            "path: /var/lib/gpu-governor",
        ):
            assert needle in text, needle
        assert "fsGroup" not in text.replace("pod fsGroup", "")

    def test_servicemonitor_selects_the_service_port(self) -> None:
        """The ServiceMonitor selects the Service's labels and scrapes its named metrics port."""
        monitor = (KUBERNETES_DIR / "servicemonitor.yaml").read_text()
        service = (KUBERNETES_DIR / "gpu-governor.yaml").read_text().split("kind: Service\n", 1)[1]
        assert "apiVersion: monitoring.coreos.com/v1" in monitor
        assert "kind: ServiceMonitor" in monitor
        assert "app.kubernetes.io/name: gpu-governor" in monitor
        assert "- port: metrics" in monitor and "- name: metrics" in service
        assert "app.kubernetes.io/name: gpu-governor" in service

    def test_configmap_holds_a_valid_governor_config(self, tmp_path: Path) -> None:
        """The ConfigMap's governor.toml passes the governor's own validation and listens beyond loopback."""
        path = tmp_path / "governor.toml"
        path.write_text(configmap_governor_toml())
        config = load_config(path, enforce_trust=False)
        assert config.backend == "nvml"
        assert config.metrics.listen_address == "0.0.0.0"
        assert config.metrics.port == 9847
        assert config.state_dir == "/var/lib/gpu-governor"
