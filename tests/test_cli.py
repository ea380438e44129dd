"""The command line as a user runs it: real processes, real signals, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor.cli import EXIT_CONFIG, EXIT_NO_DRIVER, main
from tests.support import free_port, require_tool, scrape, wait_for

REPO = Path(__file__).resolve().parents[1]


class Daemon:
    """``python -m governor run ...`` as a child process, its JSON log lines collected."""

    def __init__(self, args: list[str], tmp_path: Path) -> None:
        self.log_path = tmp_path / "daemon.log"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "governor", "run", "--log-format", "json", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()
        return code


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    running: list[Daemon] = []
    yield running
    for d in running:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def start_simulated(tmp_path: Path, daemons: list[Daemon]) -> tuple[Daemon, int]:
    """`run --simulate` with a state directory in ``tmp_path``, once its metrics answer; (daemon, port)."""
    port = free_port()
    config = tmp_path / "g.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    d = Daemon(["--simulate", "--config", str(config), "--listen", f"127.0.0.1:{port}"], tmp_path)
    daemons.append(d)
    wait_for(lambda: "gpu_governor_gpu_temperature_celsius" in scrape(port), 10.0, "metrics")
    return d, port


class TestRun:
    def test_simulate_serves_metrics_that_promtool_accepts(self, tmp_path: Path, daemons: list[Daemon]) -> None:
        """`run --simulate` serves metrics on loopback soon after start; promtool finds nothing to lint."""
        d, port = start_simulated(tmp_path, daemons)
        body = scrape(port)
        assert 'gpu_governor_build_info{backend="simulated"' in body
        promtool = require_tool("promtool")
        lint = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, check=False)
        assert (lint.returncode, lint.stdout, lint.stderr) == (0, "", "")
        assert d.stop() == 0

    def test_sighup_keeps_old_config_when_invalid_and_applies_a_valid_one(
        self, tmp_path: Path, daemons: list[Daemon]
    ) -> None:
        """SIGHUP: a broken file keeps the old thresholds (error logged); a valid one applies next tick."""
        port = free_port()
        config = tmp_path / "g.toml"
        base = f'state_dir = "{tmp_path / "state"}"\npoll_interval_s = 0.2\n'
        config.write_text(base + "[thermal]\nwarning_c = 70.0\n")
        d = Daemon(["--simulate", "--config", str(config), "--listen", f"127.0.0.1:{port}"], tmp_path)
        daemons.append(d)
        warning = 'gpu_governor_gpu_thermal_zone_threshold_celsius{gpu="0",uuid="GPU-sim-rtx4070-0",zone="warning"}'
        wait_for(lambda: f"{warning} 70.0" in scrape(port), 10.0, "first scrape")

        config.write_text(base + "[thermal]\nwarning_c = 90.0\n")  # above hot_c: invalid
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "gpu_governor_config_last_reload_successful 0.0" in scrape(port), 10.0, "failed reload")
        assert f"{warning} 70.0" in scrape(port)
        failed = [e for e in d.events() if e["event"] == "config_reload_failed"]
        assert len(failed) == 1 and failed[0]["level"] == "error"
        errors = failed[0]["errors"]
        assert isinstance(errors, list) and any("thermal.hot_c" in str(err) for err in errors)

        config.write_text(base + "[thermal]\nwarning_c = 60.0\n")
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: f"{warning} 60.0" in scrape(port), 10.0, "new threshold")
        assert "gpu_governor_config_last_reload_successful 1.0" in scrape(port)
        assert d.stop() == 0

    def test_sigterm_restores_the_original_limit_and_exits_0(self, tmp_path: Path, daemons: list[Daemon]) -> None:
        """A hot simulated GPU is stepped down; SIGTERM puts the original 200 W back and exits 0."""
        port = free_port()
        hw = tmp_path / "hw.json"
        config = tmp_path / "g.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\npoll_interval_s = 0.1\n'
            f'[simulation]\nscenario = "hot"\ntime_scale = 20.0\nstate_file = "{hw}"\n'
        )
        d = Daemon(["--simulate", "--config", str(config), "--listen", f"127.0.0.1:{port}"], tmp_path)
        daemons.append(d)
        target = 'gpu_governor_gpu_power_limit_watts{gpu="0",uuid="GPU-sim-rtx4070-0"} 180.0'
        wait_for(lambda: target in scrape(port), 30.0, "step down to 180 W")
        assert d.stop() == 0
        limits = json.loads(hw.read_text())
        assert list(limits["power_limits_w"].values()) == [200.0]
        assert any(e["event"] == "power_limit_restored" for e in d.events())
        saved = json.loads((tmp_path / "state" / "original-limits.json").read_text())
        assert saved["original_power_limits_w"] == {}

    def test_dry_run_changes_nothing_on_the_simulated_gpu(self, tmp_path: Path, daemons: list[Daemon]) -> None:
        """Under --dry-run the hot GPU keeps 200 W and the would-be change is logged."""
        port = free_port()
        hw = tmp_path / "hw.json"
        config = tmp_path / "g.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\npoll_interval_s = 0.1\n'
            f'[simulation]\nscenario = "hot"\ntime_scale = 20.0\nstate_file = "{hw}"\n'
        )
        d = Daemon(["--simulate", "--dry-run", "--config", str(config), "--listen", f"127.0.0.1:{port}"], tmp_path)
        daemons.append(d)
        wait_for(lambda: any(e["event"] == "power_limit_would_set" for e in d.events()), 30.0, "would set")
        assert 'gpu_governor_gpu_power_limit_watts{gpu="0",uuid="GPU-sim-rtx4070-0"} 200.0' in scrape(port)
        assert d.stop() == 0
        assert not hw.exists() or list(json.loads(hw.read_text())["power_limits_w"].values()) in ([], [200.0])

    def test_port_in_use_does_not_stop_run(self, tmp_path: Path) -> None:
        """A metrics port already taken: `run` still starts governing (ready), logs metrics_listen_failed naming
        the address once, and a SIGTERM then stops it with exit code 0."""
        log = tmp_path / "run.log"
        with socket.socket() as taken, log.open("w") as err:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            argv = ["run", "--simulate", "--listen", f"127.0.0.1:{port}", "--log-format", "json"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "governor", *argv],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
                env={**os.environ, "GG_TEST": "1"},
            )
            try:
                wait_for(lambda: '"governor_ready"' in log.read_text(), 60, "the governor to be ready")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=60) == 0
            finally:
                proc.kill()
                proc.wait()
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        failed = [e for e in events if e["event"] == "metrics_listen_failed"]
        assert len(failed) == 1 and f"cannot listen for metrics on 127.0.0.1:{port}" in failed[0]["error"]
        assert "in use" in failed[0]["error"] and "governor_stopped" in [e["event"] for e in events]


class TestCommands:
    @pytest.mark.usefixtures("no_nvidia_driver")
    def test_no_driver_points_at_simulate(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without an NVIDIA driver `run` exits 4 with one line pointing at --simulate."""
        code = main(["run", "--listen", "127.0.0.1:0"])
        err = capsys.readouterr().err
        assert code == EXIT_NO_DRIVER
        assert "no NVIDIA driver found; try --simulate" in err

    def test_check_config_accepts_the_reference(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The shipped reference config and both examples pass check-config."""
        for path in (
            "config/governor.toml",
            "config/examples/rtx4070.toml",
            "config/examples/h100-server.toml",
        ):
            assert main(["check-config", str(REPO / path)]) == 0, path
        assert "[power]" in capsys.readouterr().out

    @pytest.mark.parametrize(
        ("body", "key"),
        [
            ("poll_intervall_s = 1.0\n", "poll_intervall_s"),
            ("[power]\ndebounce_samples = 'three'\n", "power.debounce_samples"),
            ("[power]\nstep_up_at_c = 80.0\n", "power.step_up_at_c"),
        ],
    )
    def test_check_config_rejects_with_file_and_key(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, key: str
    ) -> None:
        """A misspelt key, a wrong type and step-up >= step-down each exit 3 naming file and key path."""
        path = tmp_path / "bad.toml"
        path.write_text(body)
        assert main(["check-config", str(path)]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert f"{path}: {key}: expected" in err
        assert "Traceback" not in err

    def test_status_prints_a_table_from_a_running_daemon(self, tmp_path: Path, daemons: list[Daemon]) -> None:
        """`status --url` shows the GPU's temperature, zone, power and limit from the daemon's metrics."""
        d, port = start_simulated(tmp_path, daemons)
        result = subprocess.run(
            [sys.executable, "-m", "governor", "status", "--url", f"http://127.0.0.1:{port}/metrics"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
        assert "NVIDIA GeForce RTX 4070" in result.stdout and "200 W" in result.stdout
        assert d.stop() == 0

    def test_status_unreachable_is_one_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`status` against a closed port exits 7 with one line."""
        assert main(["status", "--url", f"http://127.0.0.1:{free_port()}/metrics"]) == 7
        assert "cannot reach the governor" in capsys.readouterr().err

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--version prints the package version."""
        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert "gpu-governor 0.1.0" in capsys.readouterr().out
