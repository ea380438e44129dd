"""Configuration reload on a running service, reviewed adversarially: each test is a reload
bug found by the review (or a contract the review checked), driven through a real Service
on a virtual clock."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor import logsetup
from governor.backends.simulated import build_simulated_backend
from governor.clock import VirtualClock
from governor.config import (
    Config,
    GpuOverride,
    LoggingConfig,
    MetricsConfig,
    SimulationConfig,
    load_config,
    parse_config,
)
from governor.daemon import RELOAD, STOP, Daemon, VirtualWaiter
from governor.policy import NodePolicy, PowerPolicy
from tests.builders import SLEEPER, GiB, build_daemon, classes_toml, spawn, wait_exit
from tests.scripted import ScriptedBackend

UUID = "GPU-test-0"
DEEP = PowerPolicy(ladder_w=(200.0, 180.0, 160.0, 140.0), debounce_samples=1, min_change_interval_s=0.0)
"""A four-rung ladder that steps down at every hot reading (200 W card, range 100-220 W)."""


def settled_file(tmp_path: Path) -> Path:
    """A config file last changed long ago (a reload reads it at once); the tests' loaders ignore its text."""
    path = tmp_path / "governor.toml"
    path.write_text("# the loader under test returns the config\n")
    os.utime(path, (0, 0))
    return path


def stepped_down(tmp_path: Path, config: Config, loaded: list[Config]) -> tuple[Daemon, ScriptedBackend, VirtualClock]:
    """A started daemon on one hot (80 C) scripted GPU stepped down to its ladder's floor; a reload loads
    ``loaded[0]``."""
    clock = VirtualClock()
    temperature = [80.0]
    backend = ScriptedBackend(clock, lambda t, i: temperature[0])
    backend.temperature = temperature  # type: ignore[attr-defined]
    daemon = build_daemon(config, backend, clock, config_path=settled_file(tmp_path), load=lambda p: loaded[0])
    daemon.start()
    ticks(daemon, clock, 4)
    return daemon, backend, clock


def ticks(daemon: Daemon, clock: VirtualClock, seconds: int) -> None:
    """One tick per virtual second."""
    for _ in range(seconds):
        clock.advance(1.0)
        daemon.tick()


def base(tmp_path: Path, **fields: Any) -> Config:
    """A config with its state under tmp_path, no process table, and ``fields``."""
    return Config(state_dir=str(tmp_path / "state"), runtime_dir="", **fields)


class TestLadderChangedOnReload:
    def test_shorter_ladder_then_cooling_steps_up_without_failing(self, tmp_path: Path) -> None:
        """A GPU on rung 3 reloaded onto a 2-rung ladder steps up when cool instead of failing every tick."""
        config = base(tmp_path, power=DEEP)
        loaded = [replace(config, power=replace(DEEP, ladder_w=(200.0, 190.0), dwell_s=5.0))]
        daemon, backend, clock = stepped_down(tmp_path, config, loaded)
        assert backend.limits_w[UUID] == 140.0
        assert daemon.reload()
        backend.temperature[0] = 50.0  # type: ignore[attr-defined]
        ticks(daemon, clock, 30)  # an exception here is the bug: every later tick would fail alike
        assert backend.limits_w[UUID] == 200.0
        daemon.stop()

    def test_limit_below_the_new_floor_is_raised_to_it_at_once(self, tmp_path: Path) -> None:
        """140 W under a new ladder whose floor is 190 W is set to 190 W at once, never reported as set by others."""
        config = base(tmp_path, power=DEEP)
        loaded = [replace(config, power=replace(DEEP, ladder_w=(200.0, 190.0)))]
        daemon, backend, clock = stepped_down(tmp_path, config, loaded)
        with capture_logs() as logs:
            assert daemon.reload()
            assert backend.limits_w[UUID] == 190.0
            ticks(daemon, clock, 5)
        assert not [e for e in logs if e["event"] == "power_limit_external_lower"]
        assert daemon.published is not None and daemon.published.gpus[0].target_w == backend.limits_w[UUID] == 190.0
        daemon.stop()
        assert backend.limits_w[UUID] == 200.0

    def test_limit_between_new_rungs_goes_to_the_rung_below(self, tmp_path: Path) -> None:
        """160 W under a new ladder 200/170/150 W is set to 150 W (never raised on a reload while hot)."""
        config = base(tmp_path, power=DEEP)
        loaded = [replace(config, power=replace(DEEP, ladder_w=(200.0, 170.0, 150.0)))]
        daemon, backend, clock = stepped_down(tmp_path, config, loaded)
        backend.temperature[0] = 70.0  # type: ignore[attr-defined] # between step_up and step_down: holds
        ticks(daemon, clock, 1)
        daemon.governor.states[UUID] = replace(
            daemon.governor.states[UUID], ladder=replace(daemon.governor.states[UUID].ladder, rung=2)
        )
        backend.set_power_limit(UUID, 160.0)  # rung 2 of the old ladder, in force
        assert daemon.reload()
        assert backend.limits_w[UUID] == 150.0
        ticks(daemon, clock, 3)
        assert daemon.published is not None and daemon.published.gpus[0].target_w == 150.0
        daemon.stop()

    def test_power_governing_turned_off_puts_the_original_back(self, tmp_path: Path) -> None:
        """A reload with power.enabled = false while stepped down restores the original limit, not 140 W for ever."""
        config = base(tmp_path, power=DEEP)
        loaded = [replace(config, power=replace(DEEP, enabled=False))]
        daemon, backend, clock = stepped_down(tmp_path, config, loaded)
        assert daemon.reload()
        assert backend.limits_w[UUID] == 200.0
        ticks(daemon, clock, 5)
        assert backend.limits_w[UUID] == 200.0
        daemon.stop()

    def test_removed_gpu_override_reclamps_to_the_default_ladder(self, tmp_path: Path) -> None:
        """A [[gpu]] override's deep ladder removed while its GPU sits at 140 W: the GPU moves to the default floor."""
        override = GpuOverride(
            index=0, uuid=None, name=None, thermal={}, power={"ladder_w": (200.0, 180.0, 160.0, 140.0)}
        )
        fast = PowerPolicy(debounce_samples=1, min_change_interval_s=0.0, dwell_s=5.0)
        config = base(tmp_path, power=fast, gpus=(override,))
        loaded = [replace(config, gpus=())]
        daemon, backend, clock = stepped_down(tmp_path, config, loaded)
        assert backend.limits_w[UUID] == 140.0
        assert daemon.reload()
        assert backend.limits_w[UUID] == 180.0  # the default ladder 100% / 90% of 200 W
        backend.temperature[0] = 50.0  # type: ignore[attr-defined]
        ticks(daemon, clock, 20)
        assert backend.limits_w[UUID] == 200.0
        daemon.stop()

    def test_switch_to_target_mode_holds_the_limit_within_the_new_bounds(self, tmp_path: Path) -> None:
        """140 W from the ladder under target mode with a 150 W floor is set to 150 W, the controller's limit."""
        config = base(tmp_path, power=DEEP)
        loaded = [replace(config, power=replace(DEEP, mode="target", target_c=85.0, floor_w=150.0))]
        daemon, backend, _ = stepped_down(tmp_path, config, loaded)
        assert daemon.reload()
        assert backend.limits_w[UUID] == 150.0
        assert daemon.governor.states[UUID].target.limit_w == 150.0
        daemon.stop()

    def test_unchanged_ladder_is_left_alone(self, tmp_path: Path) -> None:
        """A reload that changes no ladder writes no limit: the rung and its limit stay."""
        config = base(tmp_path, power=DEEP)
        loaded = [replace(config, thermal=replace(config.thermal, warning_c=69.0))]
        daemon, backend, _ = stepped_down(tmp_path, config, loaded)
        sets = list(backend.sets)
        assert daemon.reload()
        assert backend.sets == sets and daemon.governor.states[UUID].ladder.rung == 3
        daemon.stop()


class TestLogLevelOnReload:
    def test_the_services_own_logger_follows_the_reloaded_level(self, tmp_path: Path) -> None:
        """After a reload to level "error" the service's own info events (a step down) are no longer written."""
        stream = io.StringIO()
        logsetup.configure("json", "info", stream)
        config = base(tmp_path, power=DEEP, logging=LoggingConfig(format="json", level="info"))
        loaded = [replace(config, logging=LoggingConfig(format="json", level="error"))]
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 80.0 if t >= 10 else 50.0)
        daemon = build_daemon(config, backend, clock, config_path=settled_file(tmp_path), load=lambda p: loaded[0])
        daemon.start()
        assert '"governor_ready"' in stream.getvalue()
        assert daemon.reload()
        ticks(daemon, clock, 12)
        assert backend.limits_w[UUID] < 200.0  # it stepped down...
        assert "power_limit_stepped" not in stream.getvalue()  # ...and said so only at the level asked for
        daemon.stop()

    def test_debug_events_appear_after_a_reload_to_debug(self, tmp_path: Path) -> None:
        """A reload to level "debug" lets the service's own debug events through."""
        stream = io.StringIO()
        logsetup.configure("json", "info", stream)
        config = base(tmp_path)
        loaded = [replace(config, logging=LoggingConfig(format="json", level="debug"))]
        clock = VirtualClock()
        daemon = build_daemon(
            config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=settled_file(tmp_path)
        )
        daemon._load = lambda p: loaded[0]
        daemon.start()
        daemon.log.debug("probe_before_reload")
        assert daemon.reload()
        daemon.log.debug("probe_after_reload")
        text = stream.getvalue()
        assert "probe_before_reload" not in text and "probe_after_reload" in text
        daemon.stop()


class StormWaiter(VirtualWaiter):
    """SIGHUPs arrive without a pause until ``storm_end_s``: every wait returns a reload after
    0.3 virtual seconds (the time a reload of a large config takes); the loop stops at ``stop_s``."""

    def __init__(self, clock: VirtualClock, storm_end_s: float, stop_s: float) -> None:
        super().__init__(clock)
        self.clock = clock
        self.storm_end_s = storm_end_s
        self.stop_s = stop_s
        self.hups = 0

    def wait(self, deadline_s: float) -> list[str]:
        """A reload while the storm lasts, then ordinary waiting, then a stop."""
        if self.clock.monotonic() < self.storm_end_s:
            self.clock.advance(0.3)
            self.hups += 1
            return [RELOAD]
        if deadline_s > self.stop_s:
            return [STOP]
        return super().wait(deadline_s)


class TestSighupStorm:
    def test_ticks_go_on_through_a_sustained_storm_and_the_last_file_applies(self, tmp_path: Path) -> None:
        """A SIGHUP storm for 30 s still ticks about every second; the file as of the last SIGHUP is in force."""
        clock = VirtualClock()
        waiter = StormWaiter(clock, storm_end_s=30.0, stop_s=40.0)
        config = base(tmp_path)

        def load(path: Path) -> Config:  # the file keeps changing during the storm: warning_c follows the clock
            return replace(config, thermal=replace(config.thermal, warning_c=60.0 + min(clock.monotonic(), 30.0) / 10))

        daemon = build_daemon(
            config, ScriptedBackend(clock, lambda t, i: 50.0), clock, waiter=waiter, config_path=settled_file(tmp_path)
        )
        daemon._load = load
        daemon.reload_settle_s = 0.0
        assert daemon.run() == 0
        assert waiter.hups >= 90
        assert daemon.published is not None and daemon.published.tick_count >= 35  # ~1 Hz through the storm
        assert daemon.config.thermal.warning_c == pytest.approx(63.0, abs=0.05)


class TestRestartOnlyKeys:
    def test_runtime_dir_change_is_reported_and_the_running_one_kept(self, tmp_path: Path) -> None:
        """runtime_dir (checked only at start, pinned by RuntimeDirectory=) changed on reload is reported, not taken."""
        config = base(tmp_path)
        elsewhere = tmp_path / "world-writable"
        elsewhere.mkdir(mode=0o777)
        elsewhere.chmod(0o777)
        loaded = [replace(config, runtime_dir=str(elsewhere))]
        clock = VirtualClock()
        daemon = build_daemon(
            config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=settled_file(tmp_path)
        )
        daemon._load = lambda p: loaded[0]
        daemon.start()
        with capture_logs() as logs:
            assert daemon.reload()
        assert daemon.config.runtime_dir == ""
        needs = [e for e in logs if e["event"] == "config_change_needs_restart"]
        assert [e["key"] for e in needs] == ["runtime_dir"]
        ticks(daemon, clock, 2)
        assert not (elsewhere / "processes.json").exists()
        daemon.stop()

    def test_wait_for_driver_change_is_reported(self, tmp_path: Path) -> None:
        """wait_for_driver (read once, when the backend opens) changed on reload is reported as needing a restart."""
        config = base(tmp_path)
        clock = VirtualClock()
        daemon = build_daemon(
            config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=settled_file(tmp_path)
        )
        daemon._load = lambda p: replace(config, wait_for_driver=True)
        daemon.start()
        with capture_logs() as logs:
            assert daemon.reload()
        assert [e["key"] for e in logs if e["event"] == "config_change_needs_restart"] == ["wait_for_driver"]
        daemon.stop()

    def test_the_report_names_the_file_the_key_and_both_values(self, tmp_path: Path) -> None:
        """A changed metrics port is reported with the file, metrics.port, the value kept and the one asked for."""
        config = base(tmp_path)
        path = settled_file(tmp_path)
        clock = VirtualClock()
        daemon = build_daemon(config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=path)
        daemon._load = lambda p: replace(config, source=str(p), metrics=MetricsConfig(port=9999))
        daemon.start()
        with capture_logs() as logs:
            assert daemon.reload()
        (needs,) = [e for e in logs if e["event"] == "config_change_needs_restart"]
        assert needs["config"] == str(path) and needs["key"] == "metrics.port"
        assert needs["running"] == config.metrics.port and needs["requested"] == 9999
        assert needs["log_level"] == "warning"
        assert daemon.config.metrics.port == config.metrics.port
        daemon.stop()


class TestDryRunSignalsOnReload:
    def test_a_process_only_would_have_been_signalled_gets_sigterm_first(
        self, tmp_path: Path, children: list[subprocess.Popen[bytes]]
    ) -> None:
        """A SIGTERM only logged in dry run was never sent: after a reload to enforcing, SIGTERM comes first."""
        toml = {**classes_toml(), "dry_run": True}
        parsed = parse_config(toml, "test.toml")
        clock = VirtualClock()
        backend = build_simulated_backend(SimulationConfig(profile="rtx4070", scenario="idle"), clock)
        config = Config(state_dir=str(tmp_path), runtime_dir="", vram=parsed.vram, backend="simulated", dry_run=True)
        daemon = build_daemon(
            config, backend, clock, config_path=settled_file(tmp_path), load=lambda p: replace(config, dry_run=False)
        )
        child = spawn(children, SLEEPER, "secondary-marker")
        backend.attach_process(0, child.pid, 4 * GiB)  # over its class's 3 GiB
        daemon.start()
        with capture_logs() as logs:
            ticks(daemon, clock, 14)  # grace 10 s: a dry-run SIGTERM
        assert any(e.get("action") == "sigterm" and e.get("outcome") == "dry_run" for e in logs)
        assert child.poll() is None
        assert daemon.reload()
        with capture_logs() as logs:
            ticks(daemon, clock, 15)  # kill_after 5 s, cooldown 5 s
        real = [e["action"] for e in logs if e.get("outcome") == "applied" and e.get("pid") == child.pid]
        assert real[:1] == ["sigterm"]
        assert wait_exit(child) == -signal.SIGTERM
        daemon.stop()


class TestNotifyOnReload:
    def test_failed_reload_sends_reloading_with_monotonic_usec_then_ready_with_status(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A refused reload still sends RELOADING=1 + MONOTONIC_USEC, then READY=1 with a STATUS= line."""
        sent: list[str] = []
        config = base(tmp_path)
        clock = VirtualClock()
        daemon = build_daemon(
            config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=settled_file(tmp_path)
        )
        monkeypatch.setattr(daemon.notifier, "_send", sent.append)
        daemon.start()
        sent.clear()
        path = tmp_path / "governor.toml"
        path.write_text("[thermal]\nwarning_c = 'hot'\n")
        os.utime(path, (0, 0))
        assert daemon.reload() is False
        assert sent[0].startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert int(sent[0].split("MONOTONIC_USEC=")[1]) > 0
        assert sent[1].startswith("READY=1\nSTATUS=")
        daemon.stop()


class TestNodeBudgetRemovedOnReload:
    def test_shares_are_lifted_when_the_budget_goes(self, tmp_path: Path) -> None:
        """Two cool GPUs held at 150 W shares of a 300 W budget go back to 200 W when a reload removes the budget."""
        config = base(tmp_path, node=NodePolicy(power_budget_w=300.0))
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 50.0, gpu_count=2)
        daemon = build_daemon(
            config,
            backend,
            clock,
            config_path=settled_file(tmp_path),
            load=lambda p: replace(config, node=NodePolicy()),
        )
        daemon.start()
        ticks(daemon, clock, 3)
        assert set(backend.limits_w.values()) == {150.0}
        assert daemon.reload()
        ticks(daemon, clock, 5)
        assert set(backend.limits_w.values()) == {200.0}
        daemon.stop()


class TestConfigReplacedBySomethingElse:
    def test_a_fifo_in_the_configs_place_is_never_opened(self, tmp_path: Path) -> None:
        """A symlink to a FIFO is refused from its status alone: never opened, so a waiting writer stays blocked."""
        path = tmp_path / "governor.toml"
        path.write_text("[thermal]\nwarning_c = 65.0\n")
        config = load_config(path)
        clock = VirtualClock()
        daemon = build_daemon(config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=path)
        daemon.reload_settle_s = 0.0
        daemon.start()
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        path.unlink()
        path.symlink_to(fifo)
        opened = threading.Event()

        def writer() -> None:  # open() of a FIFO for writing returns only once someone opens it for reading
            with open(fifo, "wb"):
                opened.set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        time.sleep(0.3)  # the writer is blocked in open() by now
        try:
            with capture_logs() as logs:
                assert daemon.reload() is False
            assert not opened.wait(0.5)
            (failed,) = [e for e in logs if e["event"] == "config_reload_failed"]
            assert any(str(path) in err and "regular file" in err for err in failed["errors"])
            assert daemon.config.thermal.warning_c == 65.0
        finally:
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # a still-blocked writer's open() returns
            thread.join(10)
        daemon.stop()
