"""Metrics built at scrape time: content, absent-not-zero, and promtool's lint."""

from __future__ import annotations

import gzip
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from governor.clock import VirtualClock
from governor.daemon import Daemon
from governor.httpserver import MetricsServer
from governor.metrics import Exposition, build_registry
from governor.model import GpuHealth, GpuReading, Snapshot
from tests.builders import scrape_after_ticks
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
