"""Metrics built at scrape time: content, absent-not-zero, and promtool's lint."""

from __future__ import annotations

import gzip
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from governor.clock import VirtualClock
from governor.core import class_usage
from governor.daemon import Daemon
from governor.httpserver import MetricsServer
from governor.metrics import Exposition, build_registry
from governor.model import GpuHealth, GpuReading, ProcessReading, Snapshot
from governor.policy import VramPolicy
from tests.builders import full_exposition, scrape_after_ticks
from tests.scripted import ScriptedBackend
from tests.support import require_tool

MakeDaemon = Callable[..., tuple[Daemon, ScriptedBackend, VirtualClock]]


class TestCollector:
    def test_nothing_before_the_first_tick(self) -> None:
        """Before anything is published the governor's families are absent, not zero."""
        body = generate_latest(build_registry(lambda: None)).decode()
        assert "gpu_governor" not in body

    def test_each_gpu_has_its_own_series(self, tmp_path: Path) -> None:
        """Two GPUs give two temperature series and only the hot one gets a target limit."""
        _, body = scrape_after_ticks(tmp_path, 5)
        assert 'gpu_governor_gpu_temperature_celsius{gpu="0",uuid="GPU-test-0"} 80.0' in body
        assert 'gpu_governor_gpu_temperature_celsius{gpu="1",uuid="GPU-test-1"} 50.0' in body
        assert 'gpu_governor_gpu_power_limit_target_watts{gpu="0"' in body
        assert 'gpu_governor_gpu_power_limit_target_watts{gpu="1"' not in body
        assert 'gpu_governor_gpu_thermal_zone_threshold_celsius{gpu="0",uuid="GPU-test-0",zone="critical"} 95.0' in body

    def test_missing_reading_is_absent_not_zero(self, tmp_path: Path) -> None:
        """A GPU whose temperature is None has no temperature sample at all, and a lost GPU shows health lost."""
        daemon, _ = scrape_after_ticks(tmp_path, 1)
        assert daemon.published is not None and daemon.published.snapshot is not None
        snap = daemon.published.snapshot
        lost = GpuReading(index=1, uuid="GPU-test-1", health=GpuHealth.LOST, error="GPU is lost")
        degraded = replace(snap.gpus[0], temperature_c=None, health=GpuHealth.DEGRADED)
        state = replace(daemon.published, snapshot=Snapshot(snap.t_s, snap.wall_time_s, (degraded, lost)))
        body = generate_latest(build_registry(lambda: state)).decode()
        assert "gpu_governor_gpu_temperature_celsius{" not in body
        assert 'gpu_governor_gpu_health{gpu="1",gpu_governor_gpu_health="lost",uuid="GPU-test-1"} 1.0' in body
        assert 'gpu_governor_gpu_health{gpu="0",gpu_governor_gpu_health="degraded",uuid="GPU-test-0"} 1.0' in body
        assert 'gpu_governor_gpu_power_watts{gpu="1"' not in body

    def test_unread_process_list_gives_no_process_count(self, tmp_path: Path) -> None:
        """A GPU whose process list was not read (lost, or NVML could not list it) has no unclassified-process
        count; one whose list was read empty has a count of 0."""
        daemon, _ = scrape_after_ticks(tmp_path, 1)
        assert daemon.published is not None and daemon.published.snapshot is not None
        snap = daemon.published.snapshot
        listed_empty = replace(snap.gpus[0], processes=())
        lost = GpuReading(index=1, uuid="GPU-test-1", health=GpuHealth.LOST, error="GPU is lost")
        state = replace(daemon.published, snapshot=Snapshot(snap.t_s, snap.wall_time_s, (listed_empty, lost)))
        body = generate_latest(build_registry(lambda: state)).decode()
        assert 'gpu_governor_unclassified_processes{gpu="0",uuid="GPU-test-0"} 0.0' in body
        assert 'gpu_governor_unclassified_processes{gpu="1"' not in body
        unlisted = replace(snap.gpus[0], processes=None)
        state = replace(daemon.published, snapshot=Snapshot(snap.t_s, snap.wall_time_s, (unlisted, lost)))
        body = generate_latest(build_registry(lambda: state)).decode()
        assert "gpu_governor_unclassified_processes{" not in body

    def test_unreported_process_vram_gives_no_class_sum(self, tmp_path: Path) -> None:
        """A class with a process whose VRAM NVML did not report has no VRAM sum (not one counting it as 0);
        its process count stays, and a class whose processes all reported has its sum."""
        daemon, _ = scrape_after_ticks(tmp_path, 1)
        assert daemon.published is not None
        published = daemon.published

        def scrape(*used: int | None) -> str:
            processes = tuple(ProcessReading(100 + i, size) for i, size in enumerate(used))
            classes, unclassified, _ = class_usage(processes, {}, VramPolicy(), False)
            gpu = replace(published.gpus[0], classes=classes, unclassified_processes=unclassified)
            state = replace(published, gpus=(gpu, *published.gpus[1:]))
            return generate_latest(build_registry(lambda: state)).decode()

        series = '{class="unclassified",gpu="0",uuid="GPU-test-0"}'
        body = scrape(2**30, None)
        assert f"gpu_governor_class_vram_used_bytes{series}" not in body
        assert f"gpu_governor_class_processes{series} 2.0" in body
        assert f"gpu_governor_class_vram_used_bytes{series} 3.221225472e+09" in scrape(2**30, 2**31)


class TestPromtool:
    def test_promtool_check_metrics_prints_nothing(self, tmp_path: Path) -> None:
        """`promtool check metrics` on a real scrape (decisions, two GPUs) prints nothing and exits 0."""
        promtool = require_tool("promtool")
        _, body = scrape_after_ticks(tmp_path, 10)
        result = subprocess.run(
            [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == "" and result.stderr == ""

    @pytest.mark.parametrize("profile", ["h100-80gb", "rtx4070"])
    def test_promtool_is_silent_on_the_telemetry(self, tmp_path: Path, profile: str) -> None:
        """`promtool check metrics` on a full exposition with every telemetry family prints nothing."""
        promtool = require_tool("promtool")
        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=full_exposition(tmp_path, profile),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == "" and result.stderr == ""


class TestStatusTable:
    def test_status_shows_the_last_power_decision_per_gpu(self, tmp_path: Path) -> None:
        """`status` shows each GPU's last power decision with watts, age and reason (GPU 1 has none)."""
        from governor.status import parse_status, render_status

        daemon, body = scrape_after_ticks(tmp_path, 5)
        assert 'gpu_governor_gpu_last_power_decision_info{from_watts="200",gpu="0",outcome="applied"' in body
        assert daemon.published is not None
        record = daemon.published.gpus[0].last_power
        assert record is not None
        text = render_status(parse_status(body), now_s=record.wall_s + 42)
        assert (
            "GPU 0 last power decision: 200 W -> 180 W 42 s ago: temperature 80 C >= 75 C for 3 consecutive samples"
            in text
        )
        assert "GPU 1 last power decision: -" in text

    def test_a_later_zone_change_does_not_hide_the_power_step(self, make_daemon: MakeDaemon) -> None:
        """A zone change after the step down is the newest decision, yet the last power decision stays the step."""
        from governor.status import parse_status

        daemon, _, clock = make_daemon(lambda t, i: 80.0 if t < 6 else 86.0)
        daemon.start()
        for _ in range(10):
            clock.advance(1.0)
            daemon.tick()
        assert daemon.published is not None
        gpu = daemon.published.gpus[0]
        assert gpu.last_decision is not None and gpu.last_decision.rule == "thermal_zone"
        power = parse_status(generate_latest(build_registry(lambda: daemon.published)).decode()).gpus["0"].last_power
        assert power is not None and (power.rule, power.from_w, power.to_w) == ("power_step_down", 200.0, 180.0)


def _governor_lines(body: bytes) -> list[str]:
    """The exposition without the process collector's lines (their values move between renderings)."""
    return [line for line in body.decode().splitlines() if "gpu_governor_" in line]


class TestExposition:
    def test_same_text_as_the_registry(self, tmp_path: Path) -> None:
        """The cached exposition is the text prometheus-client renders from build_registry, family for family."""
        daemon, body = scrape_after_ticks(tmp_path, 5)
        cached = Exposition(lambda: daemon.published).bytes()
        assert _governor_lines(cached) == _governor_lines(body.encode())
        assert b"process_resident_memory_bytes" in cached
        assert 'gpu_governor_gpu_temperature_celsius{gpu="0",uuid="GPU-test-0"} 80.0' in cached.decode()

    def test_rendered_once_per_published_state(self, tmp_path: Path) -> None:
        """Scrapes of one state render it once; a newly published state renders again."""
        daemon, _ = scrape_after_ticks(tmp_path, 2)
        state = [daemon.published]
        exposition = Exposition(lambda: state[0])
        first = exposition.bytes()
        assert exposition.bytes() is first and exposition.bytes() is first
        assert exposition.renders == 1
        assert daemon.published is not None
        state[0] = replace(daemon.published, tick_count=daemon.published.tick_count + 1)
        second = exposition.bytes()
        assert exposition.renders == 2 and second != first

    def test_concurrent_scrapes_render_once(self, tmp_path: Path) -> None:
        """Eight threads asking for a new state at once get the same bytes from one rendering."""
        daemon, _ = scrape_after_ticks(tmp_path, 2)
        exposition = Exposition(lambda: daemon.published)
        barrier = threading.Barrier(8)
        bodies: list[bytes] = []

        def scrape() -> None:
            barrier.wait()
            bodies.append(exposition.bytes())

        threads = [threading.Thread(target=scrape) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(bodies) == 8 and all(body is bodies[0] for body in bodies)
        assert exposition.renders == 1

    def test_served_formats(self, tmp_path: Path) -> None:
        """Over HTTP: text by default, gzip if accepted, OpenMetrics when asked, HEAD's length; name[] is uncached."""
        daemon, _ = scrape_after_ticks(tmp_path, 3)
        exposition = Exposition(lambda: daemon.published)
        server = MetricsServer("127.0.0.1", 0, exposition)
        try:

            def get(headers: dict[str, str], query: str = "", method: str = "GET") -> tuple[dict[str, str], bytes]:
                request = urllib.request.Request(server.url + query, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=10) as response:
                    return dict(response.headers), response.read()

            headers, plain = get({})
            assert headers["Content-Type"].startswith("text/plain") and b"gpu_governor_ready 1.0" in plain
            headers, zipped = get({"Accept-Encoding": "gzip"})
            assert headers["Content-Encoding"] == "gzip" and gzip.decompress(zipped) == plain
            headers, refused = get({"Accept-Encoding": "gzip;q=0, identity"})  # gzip not acceptable
            assert "Content-Encoding" not in headers and refused == plain
            headers, open_metrics = get({"Accept": "application/openmetrics-text; version=1.0.0"})
            assert headers["Content-Type"].startswith("application/openmetrics-text")
            assert open_metrics.endswith(b"# EOF\n")
            headers, empty = get({}, method="HEAD")
            assert empty == b"" and headers["Content-Length"] == str(len(plain))
            assert exposition.renders == 2  # text and OpenMetrics; gzip compresses the text rendering
            headers, _ = get({}, "?name[]=gpu_governor_ready")  # prometheus-client's own app, uncached
            assert headers["Content-Type"].startswith("text/plain") and exposition.renders == 2
        finally:
            server.close()

    def test_the_daemons_registry_is_served_cached(self, tmp_path: Path) -> None:
        """A MetricsServer given build_registry's registry (as `run` builds it) renders each state once,
        while another registry is rendered per scrape."""
        daemon, _ = scrape_after_ticks(tmp_path, 2)
        server = MetricsServer("127.0.0.1", 0, build_registry(lambda: daemon.published))
        plain = MetricsServer("127.0.0.1", 0, CollectorRegistry())
        try:
            bodies = []
            for _ in range(3):
                with urllib.request.urlopen(server.url, timeout=10) as response:
                    bodies.append(response.read())
            assert server.exposition is not None and server.exposition.renders == 1
            assert bodies[0] == bodies[1] == bodies[2] and b"gpu_governor_ready 1.0" in bodies[0]
            assert plain.exposition is None
        finally:
            server.close()
            plain.close()


class TestLabels:
    @pytest.mark.parametrize("profile", ["h100-80gb", "rtx4070"])
    def test_every_per_gpu_family_carries_uuid(self, tmp_path: Path, profile: str) -> None:
        """In a full exposition every sample of every family that has a ``gpu`` label also has the GPU's ``uuid``."""
        body = full_exposition(tmp_path, profile)
        per_gpu: set[str] = set()
        missing = []
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if "gpu" not in sample.labels:
                    continue
                per_gpu.add(family.name)
                if sample.labels.get("uuid") != f"GPU-sim-{profile}-{sample.labels['gpu']}":
                    missing.append((sample.name, sample.labels))
        assert missing == []
        # the walk saw the families of the issue, each with samples (not an empty pass)
        expected = {
            "gpu_governor_decisions",
            "gpu_governor_actions",
            "gpu_governor_gpu_read_errors",
            "gpu_governor_gpu_xid_errors",
            "gpu_governor_gpu_clock_event_seconds",
            "gpu_governor_gpu_sm_clock_hertz",
            "gpu_governor_gpu_memory_clock_hertz",
            "gpu_governor_gpu_pstate",
            "gpu_governor_process_vram_used_bytes",
            "gpu_governor_gpu_temperature_celsius",
        }
        if profile == "h100-80gb":
            expected |= {"gpu_governor_gpu_ecc_errors", "gpu_governor_gpu_remapped_rows"}
            expected |= {"gpu_governor_gpu_memory_temperature_celsius", "gpu_governor_gpu_row_remap_pending"}
        else:
            expected |= {"gpu_governor_gpu_fan_speed_ratio"}
        assert expected <= per_gpu, expected - per_gpu

    def test_no_sample_carries_a_label_prometheus_sets_on_the_target(self, tmp_path: Path) -> None:
        """No exposed label is named job or instance: Prometheus renames those (exported_instance) or, with
        honor_labels, lets them replace the target's own, losing which host a series came from."""
        body = full_exposition(tmp_path, "rtx4070")
        clashes = [
            (sample.name, label)
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            for label in sample.labels
            if label in ("job", "instance")
        ]
        assert clashes == []
        assert "gpu_governor_daemon_info{" in body and 'instance_id="' in body


class TestTelemetryMetrics:
    def test_h100_exposition_in_base_units(self, tmp_path: Path) -> None:
        """Clocks in Hz, XIDs by code, uncorrected ECC counted from the XID 48, no fan series without fans."""
        body = full_exposition(tmp_path, "h100-80gb")
        assert 'gpu_governor_gpu_xid_errors_total{gpu="0",uuid="GPU-sim-h100-80gb-0",xid="48"} 1.0' in body
        assert 'gpu_governor_gpu_xid_errors_total{gpu="1"' not in body
        assert (
            'gpu_governor_gpu_ecc_errors_total{gpu="0",scope="volatile",type="uncorrected",'
            'uuid="GPU-sim-h100-80gb-0"} 1.0' in body
        )
        assert 'gpu_governor_gpu_memory_clock_hertz{gpu="0",uuid="GPU-sim-h100-80gb-0"} 2.619e+09' in body
        assert 'gpu_governor_gpu_pstate{gpu="0",uuid="GPU-sim-h100-80gb-0"} 0.0' in body
        assert "gpu_governor_gpu_fan_speed_ratio{" not in body
        sm = metric_value(body, 'gpu_governor_gpu_sm_clock_hertz{gpu="0",uuid="GPU-sim-h100-80gb-0"}')
        assert 345e6 < sm < 1980e6, "capped at 700 W of a 910 W demand: below the boost clock"
        capped = metric_value(
            body, 'gpu_governor_gpu_clock_event_seconds_total{gpu="0",reason="sw_power_cap",uuid="GPU-sim-h100-80gb-0"}'
        )
        assert 55.0 <= capped <= 61.0, "power-capped the whole minute"

    def test_rtx4070_has_no_ecc_or_memory_temperature_series(self, tmp_path: Path) -> None:
        """On a GeForce profile ECC, remapped rows and memory temperature are absent (NotSupported), never 0."""
        body = full_exposition(tmp_path, "rtx4070")
        for name in ("ecc_errors_total", "remapped_rows", "row_remap_pending", "memory_temperature_celsius"):
            assert f"gpu_governor_gpu_{name}{{" not in body, name
        assert 'gpu_governor_gpu_fan_speed_ratio{fan="1",gpu="0",uuid="GPU-sim-rtx4070-0"}' in body


def metric_value(body: str, series: str) -> float:
    """The value of one exact series line of an exposition."""
    (line,) = [line for line in body.splitlines() if line.startswith(series + " ")]
    return float(line.split()[-1])
