"""The daemon loop: schedule, decisions end to end, dry-run, restore, notify, metrics."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.clock import RealClock, VirtualClock
from governor.config import Config, PowerPolicy, load_config
from governor.daemon import Daemon, PipeWaiter
from governor.httpserver import MetricsServer
from governor.metrics import build_registry
from governor.notify import Notifier
from tests.builders import StopAt
from tests.scripted import ScriptedBackend
from tests.support import NotifyListener


def hot_then_cool(hot_from: float, cool_from: float, hot_c: float = 80.0, cool_c: float = 60.0) -> Callable[..., float]:
    """A script: 50 C, then hot_c from hot_from, then cool_c from cool_from."""

    def script(t: float, _: int) -> float:
        if t < hot_from:
            return 50.0
        return hot_c if t < cool_from else cool_c

    return script


def make_daemon(
    tmp_path: Path, script: Callable[[float, int], float | None], stop_s: float, **config: Any
) -> tuple[Daemon, ScriptedBackend, VirtualClock]:
    clock = VirtualClock()
    backend = ScriptedBackend(clock, script)
    cfg = Config(state_dir=str(tmp_path / "state"), **config)
    daemon = Daemon(cfg, backend, clock, waiter=StopAt(clock, stop_s), notifier=Notifier())
    return daemon, backend, clock


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


class TestLoop:
    def test_steps_down_when_hot_and_back_up_after_dwell(self, tmp_path: Path) -> None:
        """A 200 W GPU held at 80 C steps to 180 W after the debounce and returns to 200 W after cooling."""
        daemon, backend, _ = make_daemon(tmp_path, hot_then_cool(10, 100), stop_s=300)
        with capture_logs() as logs:
            assert daemon.run() == 0
        stepped = [e for e in logs if e["event"] == "power_limit_stepped"]
        assert [(e["from_w"], e["to_w"]) for e in stepped] == [(200.0, 180.0), (180.0, 200.0)]
        assert stepped[0]["rule"] == "power_step_down" and stepped[0]["temperature_c"] == 80.0
        # debounce: three consecutive hot samples at t=10, 11, 12
        down_t = next(d for d in [e for e in logs if e.get("rule") == "power_step_down"])
        assert down_t["outcome"] == "applied"
        assert backend.sets == [("GPU-test-0", 180.0), ("GPU-test-0", 200.0)]

    def test_ticks_follow_a_drift_free_schedule(self, tmp_path: Path) -> None:
        """Ticks land on start + k * interval, one per interval."""
        daemon, backend, _ = make_daemon(tmp_path, lambda t, i: 50.0, stop_s=100, poll_interval_s=2.0)
        daemon.run()
        # start read + 50 ticks (t = 2 .. 100) + final read at stop
        assert backend.reads == 52
        assert daemon.published is not None and daemon.published.tick_count == 50

    def test_dry_run_changes_nothing_and_logs_would_set(self, tmp_path: Path) -> None:
        """Under dry-run the backend is never written and every would-be change is logged."""
        daemon, backend, _ = make_daemon(tmp_path, hot_then_cool(10, 100), stop_s=300, dry_run=True)
        with capture_logs() as logs:
            daemon.run()
        assert backend.sets == []
        would = [e for e in logs if e["event"] == "power_limit_would_set"]
        assert [(e["from_w"], e["to_w"]) for e in would] == [(200.0, 180.0), (180.0, 200.0)]
        assert all(e["outcome"] == "dry_run" for e in would)

    def test_stop_restores_the_original_limit(self, tmp_path: Path) -> None:
        """A stop while stepped down puts the original 200 W back and clears the saved state."""
        daemon, backend, _ = make_daemon(tmp_path, hot_then_cool(10, 10_000), stop_s=60)
        daemon.run()
        assert backend.sets == [("GPU-test-0", 180.0), ("GPU-test-0", 200.0)]
        saved = json.loads((tmp_path / "state" / "original-limits.json").read_text())
        assert saved["original_power_limits_w"] == {}
        assert backend.closed

    def test_leftover_limit_of_a_crash_is_restored_at_start(self, tmp_path: Path) -> None:
        """Saved originals found at start (a crash) are restored before governing."""
        state = tmp_path / "state"
        state.mkdir()
        (state / "original-limits.json").write_text(json.dumps({"original_power_limits_w": {"GPU-test-0": 200.0}}))
        daemon, backend, _ = make_daemon(tmp_path, lambda t, i: 50.0, stop_s=5)
        backend.limits_w["GPU-test-0"] = 180.0
        with capture_logs() as logs:
            daemon.run()
        assert backend.sets[0] == ("GPU-test-0", 200.0)
        assert any(e["event"] == "power_limit_restored" and e["rule"] == "restore_after_crash" for e in logs)

    def test_missing_temperature_holds_and_warns(self, tmp_path: Path) -> None:
        """A GPU whose temperature vanishes while stepped down keeps its limit and logs a warning."""

        def script(t: float, _: int) -> float | None:
            return 80.0 if t < 40 else None

        daemon, backend, _ = make_daemon(tmp_path, script, stop_s=400)
        with capture_logs() as logs:
            daemon.run()
        assert backend.sets == [("GPU-test-0", 180.0), ("GPU-test-0", 200.0)]  # down, then restore on stop
        held = [e for e in logs if e["event"] == "power_limit_held"]
        assert len(held) == 1 and held[0]["log_level"] == "warning"

    def test_refused_limit_marks_gpu_monitor_only_once(self, tmp_path: Path) -> None:
        """A permission error marks the GPU monitor-only, logged once, never retried every tick."""
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 90.0, refuse=True)
        cfg = Config(state_dir=str(tmp_path / "state"), power=PowerPolicy(ladder_w=(200.0, 180.0, 160.0)))
        daemon = Daemon(cfg, backend, clock, waiter=StopAt(clock, 200), notifier=Notifier())
        with capture_logs() as logs:
            daemon.run()
        assert [e["event"] for e in logs].count("gpu_monitor_only") == 1
        assert [e["event"] for e in logs].count("power_limit_set_failed") == 1
        assert daemon.published is not None and daemon.published.gpus[0].monitor_only


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    listen = NotifyListener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    yield listen
    listen.sock.close()


class TestNotify:
    def test_ready_watchdog_status_reloading_stopping_in_order(self, tmp_path: Path, listener: NotifyListener) -> None:
        """READY, WATCHDOG and STATUS, then RELOADING/READY on reload, then STOPPING arrive in order."""
        config_path = tmp_path / "governor.toml"
        config_path.write_text(f'state_dir = "{tmp_path / "state"}"\npoll_interval_s = 0.05\n')
        clock = RealClock()
        config = load_config(config_path, enforce_trust=False)
        backend = ScriptedBackend(clock, lambda t, i: 50.0)
        daemon = Daemon(
            config,
            backend,
            clock,
            config_path=config_path,
            waiter=PipeWaiter(clock),
            load=lambda p: load_config(p, enforce_trust=False),
        )
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            listener.until(lambda m: "READY=1" in m)
            listener.until(lambda m: m == "WATCHDOG=1")
            daemon.request_reload()
            listener.until(lambda m: "RELOADING=1" in m)
            listener.until(lambda m: "READY=1" in m)
            daemon.request_stop()
            listener.until(lambda m: m == "STOPPING=1")
        finally:
            daemon.request_stop()
            thread.join(10)
        kinds: list[str] = []
        for message in listener.messages:
            for line in message.splitlines():
                key = line.split("=", 1)[0]
                if not kinds or kinds[-1] != key:
                    kinds.append(key)
        assert kinds[0] == "READY" and "STATUS" in kinds
        first = {k: kinds.index(k) for k in ("READY", "WATCHDOG", "RELOADING", "STOPPING")}
        assert first["READY"] < first["WATCHDOG"] < first["RELOADING"] < first["STOPPING"]
        assert "READY" in kinds[first["RELOADING"] :]
        ready_msg = next(m for m in listener.messages if m.startswith("READY=1"))
        assert "STATUS=governing 1 GPU(s): gpu0 50C optimal 200W" in ready_msg
        assert not thread.is_alive()

    def test_poll_interval_longer_than_the_watchdog_still_pings(self, tmp_path: Path, listener: NotifyListener) -> None:
        """poll_interval_s 60 under WatchdogSec=2s: WATCHDOG=1 keeps coming between ticks (else systemd kills it)."""
        config_path = tmp_path / "governor.toml"
        config_path.write_text(f'state_dir = "{tmp_path / "state"}"\npoll_interval_s = 60.0\n')
        clock = RealClock()
        config = load_config(config_path, enforce_trust=False)
        backend = ScriptedBackend(clock, lambda t, i: 50.0)
        daemon = Daemon(config, backend, clock, config_path=config_path, waiter=PipeWaiter(clock))
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            listener.until(lambda m: "READY=1" in m)
            for _ in range(3):  # WATCHDOG_USEC=2 s: one ping a second, while the next tick is a minute away
                listener.until(lambda m: m == "WATCHDOG=1")
                listener.messages.clear()
        finally:
            daemon.request_stop()
            thread.join(10)
        assert not thread.is_alive()


class TestMetricsEndpoint:
    def test_scrape_shows_readings_zone_and_decisions(self, tmp_path: Path) -> None:
        """After a step down the endpoint shows temperature, enforced and target limit, zone and the decision count."""
        daemon, _, _ = make_daemon(tmp_path, hot_then_cool(0, 10_000), stop_s=20)
        daemon.run()
        server = MetricsServer("127.0.0.1", 0, build_registry(lambda: daemon.published))
        try:
            body = urllib.request.urlopen(server.url, timeout=5).read().decode()
        finally:
            server.close()
        assert 'gpu_governor_gpu_temperature_celsius{gpu="0",uuid="GPU-test-0"} 80.0' in body
        assert 'gpu_governor_gpu_power_limit_target_watts{gpu="0",uuid="GPU-test-0"} 180.0' in body
        assert (
            'gpu_governor_gpu_thermal_zone{gpu="0",gpu_governor_gpu_thermal_zone="hot",uuid="GPU-test-0"} 1.0' in body
        )
        assert (
            'gpu_governor_decisions_total{action="set_power_limit",gpu="0",'
            'rule="power_step_down",uuid="GPU-test-0"} 1.0' in body
        )
        assert "gpu_governor_tick_duration_seconds_count" in body
