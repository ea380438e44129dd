"""SIGTERM, and kill -9 then a restart, both leave the fans under the card's automatic control again.

The real daemon (``python -m governor run --simulate``) on a hot simulated RTX 4070 at 20x
speed, fan assist on, its "hardware" in a state file: the fans it sets are written there
(``manual_fans_percent``), as a real card would keep them in manual control after a crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from governor.fanstate import FAN_STATE_FILE_NAME
from tests.support import free_port, scrape, wait_for

REPO = Path(__file__).resolve().parents[1]
SIM_UUID = "GPU-sim-rtx4070-0"


class Daemon:
    """``python -m governor run --simulate`` as a child, its JSON log collected."""

    def __init__(self, tmp_path: Path, config: Path, name: str) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "governor", "run", "--simulate", "--log-format", "json", "--config", str(config),
                 "--listen", f"127.0.0.1:{self.port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )  # fmt: skip

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def ready(self) -> bool:
        """The metrics say ready."""
        try:
            return "gpu_governor_ready 1.0" in scrape(self.port, timeout_s=5)
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


def config(tmp_path: Path, mode: str = "assist") -> Path:
    """A hot simulated GPU (20x time) with fan ``mode``, its hardware state in tmp_path/hw.json."""
    path = tmp_path / f"{mode}.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\nruntime_dir = ""\npoll_interval_s = 0.1\n'
        f'[simulation]\nscenario = "hot"\ntime_scale = 20.0\nstate_file = "{tmp_path / "hw.json"}"\n'
        f'[fan]\nmode = "{mode}"\nmax_percent = 75.0\n'
    )
    return path


def manual_fans(tmp_path: Path) -> dict[str, float]:
    """The fans the simulated card runs by hand (percent by GPU UUID); empty: the card's own control."""
    hw = tmp_path / "hw.json"
    if not hw.exists():
        return {}
    fans: dict[str, float] = json.loads(hw.read_text()).get("manual_fans_percent", {})
    return fans


def start(tmp_path: Path, daemons: list[Daemon], name: str, mode: str = "assist") -> Daemon:
    daemon = Daemon(tmp_path, config(tmp_path, mode), name)
    daemons.append(daemon)
    wait_for(daemon.ready, 60, f"{name} ready")
    return daemon


def fan_events(daemon: Daemon) -> list[tuple[str, str, str]]:
    return [(e["event"], e["rule"], e["outcome"]) for e in daemon.events() if e["event"].startswith("fan_")]


def test_sigterm_hands_the_fans_back(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The hot card's fans are taken over (manual on the "hardware"); SIGTERM exits 0 with them back on auto."""
    daemon = start(tmp_path, daemons, "first")
    wait_for(lambda: SIM_UUID in manual_fans(tmp_path), 60, "fans taken over")
    assert json.loads((tmp_path / "state" / FAN_STATE_FILE_NAME).read_text())["manual_fans"] == {SIM_UUID: 2}
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(20) == 0
    assert manual_fans(tmp_path) == {}
    restored = [e for e in fan_events(daemon) if e[0] == "fan_control_restored"]
    assert restored == [("fan_control_restored", "restore_on_stop", "applied")] * 2


def test_kill_9_then_restart_hands_the_fans_back(tmp_path: Path, daemons: list[Daemon]) -> None:
    """kill -9 leaves the fans manual; the next start hands them back before its first tick (in auto mode
    they then stay with the card; in assist mode only the rule takes them again, after the hand-back)."""
    crashed = start(tmp_path, daemons, "crashed")
    wait_for(lambda: SIM_UUID in manual_fans(tmp_path), 60, "fans taken over")
    crashed.proc.kill()
    crashed.proc.wait(20)
    assert SIM_UUID in manual_fans(tmp_path)  # the crash left them in manual control

    auto = start(tmp_path, daemons, "restarted-auto", mode="auto")
    assert manual_fans(tmp_path) == {}
    assert fan_events(auto) == [("fan_control_restored", "restore_after_crash", "applied")] * 2
    assert json.loads((tmp_path / "state" / FAN_STATE_FILE_NAME).read_text())["manual_fans"] == {}
    auto.proc.send_signal(signal.SIGTERM)
    assert auto.proc.wait(20) == 0

    again = start(tmp_path, daemons, "assist-again")
    wait_for(lambda: SIM_UUID in manual_fans(tmp_path), 60, "fans taken over again")
    again.proc.kill()
    again.proc.wait(20)
    last = start(tmp_path, daemons, "restarted-assist")
    wait_for(lambda: any(e[0] == "fan_speed_set" for e in fan_events(last)), 60, "assist takes the fans again")
    events = fan_events(last)
    assert events[:2] == [("fan_control_restored", "restore_after_crash", "applied")] * 2
    last.proc.send_signal(signal.SIGTERM)
    assert last.proc.wait(20) == 0
    assert manual_fans(tmp_path) == {}
