"""One dry run: `--dry-run` and top-level `dry_run = true` cover power limits and process signals;
a finer `dry_run = false` cannot turn an action back on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.actuator import Actuator
from governor.backends.simulated import SimulatedBackend, build_simulated_backend
from governor.cli import _apply_run_flags, build_parser
from governor.clock import VirtualClock
from governor.config import Config, SimulationConfig, load_config
from governor.daemon import Daemon, VirtualWaiter
from governor.model import Action, Decision, Outcome, Rule, Snapshot
from governor.notify import Notifier
from governor.state import OriginalLimits

GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent
SLEEPER = "import time\nprint('ready', flush=True)\ntime.sleep(120)"

CLASSES = f"""
[vram]
reserve = "1GiB"
cooldown_s = 1.0
dry_run = false

[[class]]
name = "batch"
budget = "3GiB"
priority = 10
action = "terminate"
grace_s = 2.0
kill_after_s = 2.0
dry_run = false
match = {{ cmdline = "dry-run-victim-marker", user = "{os.getuid()}" }}
"""


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A real process that would be over its class budget once attached."""
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, "dry-run-victim-marker"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def run_over_budget(config: Config, child: subprocess.Popen[bytes], seconds: int) -> list[MutableMapping[str, Any]]:
    """A daemon on a simulated RTX 4070 with ``child`` attached at 4 GiB, stepped ``seconds`` virtual seconds."""
    clock = VirtualClock()
    backend: SimulatedBackend = build_simulated_backend(SimulationConfig(profile="rtx4070", scenario="idle"), clock)
    daemon = Daemon(config, backend, clock, waiter=VirtualWaiter(clock), notifier=Notifier())
    daemon.start()
    backend.attach_process(0, child.pid, 4 * GiB)
    try:
        with capture_logs() as logs:
            for _ in range(seconds):
                clock.advance(1.0)
                daemon.tick()
                time.sleep(0.02)  # a real signal would land meanwhile
    finally:
        daemon.stop()
    return logs


class TestGlobalDryRun:
    def test_top_level_dry_run_covers_process_signals(self, tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
        """Top-level dry_run beats [vram]/class dry_run = false: the child lives, SIGTERM and SIGKILL only logged."""
        path = tmp_path / "governor.toml"
        path.write_text(f'dry_run = true\nstate_dir = "{tmp_path}"\nruntime_dir = ""\n' + CLASSES)
        config = load_config(path, enforce_trust=False)
        logs = run_over_budget(config, child, 12)
        assert child.poll() is None
        would = [e for e in logs if e["event"] == "process_would_signal"]
        assert [e["signal"] for e in would] == ["SIGTERM", "SIGKILL"]
        assert all(e["outcome"] == "dry_run" and e["pid"] == child.pid for e in would)
        assert not any(e["event"] == "process_signalled" for e in logs)

    def test_cli_dry_run_flag_covers_process_signals(self, tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
        """`run --simulate --dry-run` as the CLI parses it: the over-budget child survives, would-signal logged."""
        path = tmp_path / "governor.toml"
        path.write_text(f'state_dir = "{tmp_path}"\nruntime_dir = ""\n' + CLASSES)
        args = build_parser().parse_args(["run", "--simulate", "--dry-run", "--config", str(path)])
        config = _apply_run_flags(load_config(path, enforce_trust=False), args)
        assert config.dry_run is True and config.vram.dry_run is False
        logs = run_over_budget(config, child, 12)
        assert child.poll() is None
        assert any(e["event"] == "process_would_signal" and e["signal"] == "SIGTERM" for e in logs)
        assert not any(e["event"] == "process_signalled" for e in logs)

    def test_without_dry_run_the_same_child_is_signalled(self, tmp_path: Path, child: subprocess.Popen[bytes]) -> None:
        """Control: the same config without the global dry run really sends SIGTERM (the test above can fail)."""
        path = tmp_path / "governor.toml"
        path.write_text(f'state_dir = "{tmp_path}"\nruntime_dir = ""\n' + CLASSES)
        logs = run_over_budget(load_config(path, enforce_trust=False), child, 6)
        assert child.wait(timeout=10) == -signal.SIGTERM
        assert any(e["event"] == "process_signalled" for e in logs)

    def test_actuator_dry_run_refuses_every_signal(self, tmp_path: Path) -> None:
        """The actuator under the global dry run never signals, even for a decision not marked dry."""
        sent: list[int] = []

        def signaller(pid: int, start: int, signum: int) -> str | None:
            sent.append(pid)
            return None

        actuator = Actuator(None, OriginalLimits(str(tmp_path)), [], dry_run=True, signaller=signaller)  # type: ignore[arg-type]
        decision = Decision(
            t_s=0.0,
            gpu_index=0,
            gpu_uuid="GPU-x",
            rule=Rule.VRAM_ENFORCE,
            action=Action.SIGNAL_KILL,
            reason="test",
            pid=os.getpid(),
            process_start_time=1,
            process_class="batch",
            dry_run=False,
        )
        (result,) = actuator.apply([decision], Snapshot(0.0, 0.0, ()))
        assert result.outcome is Outcome.DRY_RUN and sent == []


class TestRealDaemonProcess:
    def test_reload_keeps_the_command_line_dry_run(self, tmp_path: Path) -> None:
        """A SIGHUP to a `run --dry-run` daemon whose file says nothing of dry_run leaves it dry."""
        from tests.support import free_port, scrape, wait_for

        path = tmp_path / "governor.toml"
        path.write_text(f'state_dir = "{tmp_path}/state"\nruntime_dir = ""\npoll_interval_s = 0.2\n')
        port = free_port()
        listen = ["--listen", f"127.0.0.1:{port}", "--log-format", "json"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "governor", "run", "--simulate", "--dry-run", "--config", str(path), *listen],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: "gpu_governor_ready 1" in scrape(port, 5.0), 60, "the daemon to be ready")
            path.write_text(path.read_text() + "[thermal]\nwarning_c = 68.0\n")
            past = time.time() - 5
            os.utime(path, (past, past))
            proc.send_signal(signal.SIGHUP)
            wait_for(
                lambda: 'gpu_governor_config_reloads_total{result="success"} 1.0' in scrape(port, 5.0), 60, "reload"
            )
            # The thresholds are per-GPU values: they follow at the first tick after the reload.
            wait_for(lambda: 'zone="warning"} 68.0' in scrape(port, 5.0), 60, "the new threshold")
            assert 'dry_run="true"' in scrape(port, 5.0)  # the new file is in force, the flag with it
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0

    def test_dry_run_daemon_changes_no_limit(self, tmp_path: Path) -> None:
        """A real `run --simulate --dry-run` on the hot scenario logs would-set limits and never sets one."""
        state_file = tmp_path / "hw.json"
        path = tmp_path / "governor.toml"
        path.write_text(
            f'state_dir = "{tmp_path}/state"\nruntime_dir = ""\npoll_interval_s = 0.1\n'
            '[metrics]\nenabled = false\n[simulation]\nscenario = "hot"\ntime_scale = 100.0\n'
            f'state_file = "{state_file}"\n'
            "[power]\ndebounce_samples = 1\nmin_change_interval_s = 0.0\n"
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "governor",
                "run",
                "--simulate",
                "--dry-run",
                "--config",
                str(path),
                "--log-format",
                "json",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        events: list[dict[str, object]] = []
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("{"):
                    events.append(json.loads(line))
                    if events[-1]["event"] == "power_limit_would_set":
                        break
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        names = [e["event"] for e in events]
        assert "power_limit_would_set" in names, names
        assert next(e for e in events if e["event"] == "governor_starting")["dry_run"] is True
        assert "power_limit_stepped" not in names
        # The simulator saves its hardware state on every limit set: nothing was set.
        assert not state_file.exists()
        assert proc.returncode == 0


def test_config_replace_keeps_dry_run_global() -> None:
    """A Config with dry_run = true keeps its per-feature keys as written (they only add, never lift)."""
    config = replace(Config(), dry_run=True)
    assert config.dry_run and not config.vram.dry_run
