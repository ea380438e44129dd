"""The lifecycle under faults: no GPU is left at a limit the governor lowered, however its run changes or ends."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor import listener
from governor.clock import VirtualClock
from governor.config import Config, MetricsConfig
from governor.daemon import Daemon
from governor.errors import EXIT_BIND, CliError, ListenUnavailable
from governor.listener import bind_error, metrics_factory
from tests.builders import build_daemon
from tests.scripted import ScriptedBackend
from tests.support import NotifyListener

UUID = "GPU-test-0"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


def hot_daemon(
    tmp_path: Path, temperature_c: list[float], **options: Any
) -> tuple[Daemon, ScriptedBackend, VirtualClock]:
    """A daemon on one scripted 200 W GPU at ``temperature_c[0]`` °C (changeable), its state under tmp_path."""
    clock = VirtualClock()
    backend = ScriptedBackend(clock, lambda t, i: temperature_c[0])
    config = Config(state_dir=str(tmp_path / "state"))
    return build_daemon(config, backend, clock, **options), backend, clock


def tick(daemon: Daemon, clock: VirtualClock, seconds: int) -> None:
    """One tick per virtual second."""
    for _ in range(seconds):
        clock.advance(1.0)
        daemon.tick()


class TestDryRunReload:
    def test_reload_into_dry_run_restores_the_limits_it_lowered(self, tmp_path: Path) -> None:
        """A reload that turns dry_run on puts back the limit the enforcing run lowered; the stop then leaves 200 W."""
        path = tmp_path / "governor.toml"
        path.write_text("dry_run = true\n")
        os.utime(path, (0, 0))  # settled long ago: read at once
        dry = Config(state_dir=str(tmp_path / "state"), dry_run=True)
        daemon, backend, clock = hot_daemon(tmp_path, [95.0], config_path=path, load=lambda p: dry)
        daemon.start()
        tick(daemon, clock, 3)
        assert backend.limits_w[UUID] == 180.0
        with capture_logs() as logs:
            assert daemon.reload()
        assert daemon.config.dry_run
        assert backend.limits_w[UUID] == 200.0
        assert any(e["event"] == "power_limit_restored" and e["outcome"] == "applied" for e in logs)
        tick(daemon, clock, 5)
        daemon.stop()
        assert backend.limits_w[UUID] == 200.0
        saved = json.loads((tmp_path / "state" / "original-limits.json").read_text())
        assert saved["original_power_limits_w"] == {}

    def test_reload_out_of_dry_run_applies_the_ladder(self, tmp_path: Path) -> None:
        """A reload from dry run to enforcing sets the limit the dry run only logged."""
        path = tmp_path / "governor.toml"
        path.write_text("dry_run = false\n")
        os.utime(path, (0, 0))
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 95.0)
        config = Config(state_dir=str(tmp_path / "state"), dry_run=True)
        daemon = build_daemon(config, backend, clock, config_path=path, load=lambda p: replace(config, dry_run=False))
        daemon.start()
        tick(daemon, clock, 3)
        assert backend.sets == []
        assert daemon.reload()
        tick(daemon, clock, 3)
        assert backend.limits_w[UUID] == 180.0
        daemon.stop()
        assert backend.limits_w[UUID] == 200.0


class TestFailedStart:
    def test_bind_failure_after_the_first_step_restores_the_limit(self, tmp_path: Path) -> None:
        """A metrics port that cannot be bound (exit 6) after the first step lowered a limit leaves the GPU at 200 W."""

        def cannot_bind(source: object) -> object:
            raise CliError("cannot listen for metrics on 127.0.0.1:1: Address already in use", EXIT_BIND)

        daemon, backend, _ = hot_daemon(tmp_path, [95.0], metrics_server_factory=cannot_bind)
        with pytest.raises(CliError) as raised:
            daemon.run()
        assert raised.value.exit_code == EXIT_BIND
        assert backend.sets[0] == (UUID, 180.0)  # the critical zone stepped down at once
        assert backend.limits_w[UUID] == 200.0
        assert backend.closed


class TestMetricsPortTaken:
    def test_a_taken_port_does_not_stop_the_governing_and_is_bound_once_free(self, tmp_path: Path) -> None:
        """With the metrics port held by another process's socket, the daemon starts and governs (95 C steps
        200 W down), logs metrics_listen_failed once, and serves /metrics on a tick RETRY_S after the port
        came free."""
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        factory = metrics_factory(MetricsConfig(listen_address="127.0.0.1", port=port), "test")
        daemon, backend, clock = hot_daemon(tmp_path, [95.0], metrics_server_factory=factory)
        try:
            with capture_logs() as logs:
                daemon.start()
                tick(daemon, clock, int(listener.RETRY_S) + 2)  # the port still taken: tried again, failed again
            assert backend.limits_w[UUID] == 180.0
            failed = [e for e in logs if e["event"] == "metrics_listen_failed"]
            assert len(failed) == 1 and "in use" in failed[0]["error"]
            assert daemon.listener.server is None and daemon.listener.unavailable is not None
            squatter.close()
            with capture_logs() as logs:
                tick(daemon, clock, int(listener.RETRY_S))
            assert [e["event"] for e in logs].count("metrics_listening") == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
                body = answer.read().decode()
            assert "gpu_governor_gpu_power_limit_watts" in body
        finally:
            squatter.close()
            daemon.stop()
        assert backend.limits_w[UUID] == 200.0

    def test_a_retry_that_fails_otherwise_is_logged_once_and_tried_again(self, tmp_path: Path) -> None:
        """After the start, a retry failing with an error waiting cannot clear (permission, a broken web config)
        is logged once, not every tick, governing goes on, and the endpoint is bound once the error is gone."""

        class Served:
            def close(self) -> None:
                """Nothing to release."""

        errors: list[Exception] = [
            ListenUnavailable("cannot listen for metrics on 127.0.0.1:9: Address already in use"),
            CliError("cannot listen for metrics on 127.0.0.1:9: Permission denied", EXIT_BIND),
            CliError("cannot listen for metrics on 127.0.0.1:9: Permission denied", EXIT_BIND),
        ]

        def factory(source: object) -> Served:
            if errors:
                raise errors.pop(0)
            return Served()

        daemon, backend, clock = hot_daemon(tmp_path, [95.0], metrics_server_factory=factory)
        with capture_logs() as logs:
            daemon.start()
            tick(daemon, clock, 4 * int(listener.RETRY_S) + 2)
        failed = [e["error"] for e in logs if e["event"] == "metrics_listen_failed"]
        assert len(failed) == 2 and "in use" in failed[0] and "Permission denied" in failed[1]
        assert not [e for e in logs if e["event"] in ("observer_failed", "tick_failed")]
        assert isinstance(daemon.listener.server, Served) and backend.limits_w[UUID] == 180.0
        daemon.stop()

    def test_only_errors_waiting_can_clear_are_tried_again(self) -> None:
        """A port in use and an address not on the host yet are retried (ListenUnavailable); no permission for a
        port under 1024 is an error of exit 6 that ends the start (as TestFailedStart shows)."""
        error = bind_error(OSError(errno.EACCES, "Permission denied"), "127.0.0.1:80")
        assert not isinstance(error, ListenUnavailable) and error.exit_code == EXIT_BIND
        assert isinstance(bind_error(OSError(errno.EADDRNOTAVAIL, "not available"), "10.9.9.9:1"), ListenUnavailable)


class TestStateFileRemoved:
    def test_state_dir_removed_at_runtime_is_written_again(self, tmp_path: Path) -> None:
        """A state directory deleted while a GPU is lowered is written again next tick: a crash loses no original."""
        temperature = [95.0]
        daemon, backend, clock = hot_daemon(tmp_path, temperature)
        daemon.start()
        tick(daemon, clock, 2)
        assert backend.limits_w[UUID] == 180.0
        shutil.rmtree(tmp_path / "state")
        with capture_logs() as logs:
            tick(daemon, clock, 1)
        saved = json.loads((tmp_path / "state" / "original-limits.json").read_text())
        assert saved["original_power_limits_w"] == {UUID: 200.0}
        assert any("original-limits.json" in str(e.get("detail", "")) for e in logs if e["log_level"] == "warning")
        # a crash now (no stop): the next run restores the original
        temperature[0] = 50.0
        again = build_daemon(Config(state_dir=str(tmp_path / "state")), backend, clock)
        again.start()
        assert backend.limits_w[UUID] == 200.0

    def test_state_file_replaced_at_runtime_is_written_back(self, tmp_path: Path) -> None:
        """A saved-originals file replaced under the running daemon (forged originals) is put back to what it saved."""
        daemon, _, clock = hot_daemon(tmp_path, [95.0])
        daemon.start()
        tick(daemon, clock, 2)
        path = tmp_path / "state" / "original-limits.json"
        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps({"version": 2, "original_power_limits_w": {UUID: 120.0}}))
        os.replace(forged, path)
        tick(daemon, clock, 1)
        assert json.loads(path.read_text())["original_power_limits_w"] == {UUID: 200.0}


class TestSignals:
    def test_sigterm_twice_is_one_clean_stop(self, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
        """A second SIGTERM right after the first (kill twice) still ends the run with exit 0 and STOPPING=1."""
        socket_path = tmp_path / "notify.sock"
        listener = NotifyListener(socket_path)
        config = tmp_path / "governor.toml"
        config.write_text(
            f'poll_interval_s = 0.1\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
            "[metrics]\nenabled = false\n"
        )
        env = {**os.environ, "NOTIFY_SOCKET": str(socket_path), "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config)]
        daemon = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children.append(daemon)
        try:
            listener.until(lambda m: "READY=1" in m)
            daemon.send_signal(signal.SIGTERM)
            time.sleep(0.01)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
            listener.until(lambda m: "STOPPING=1" in m)
        finally:
            listener.sock.close()
