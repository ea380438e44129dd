"""Hostile and broken config files never crash a real daemon (issue 12, items 3, 8, 9, 10).

Each test runs `python -m governor run --simulate` as a real process, feeds it a file
(deep nesting, a 5000-digit integer, 50k unknown keys, a torn file, a writer replacing
the file during a SIGHUP storm) and checks through its real metrics endpoint that it is
alive, reports the reload as failed and keeps the old config in force. Signals sent
during start-up are queued, never fatal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.support import free_port, scrape, wait_for

REPO = Path(__file__).resolve().parent.parent
WARNING_METRIC = re.compile(r'gpu_governor_gpu_thermal_zone_threshold_celsius\{[^}]*zone="warning"[^}]*\} (\S+)')


def base_config(tmp_path: Path, warning_c: float = 71.0) -> str:
    """A valid config whose warning threshold shows which file is in force."""
    return (
        f'state_dir = "{tmp_path}/state"\nruntime_dir = ""\npoll_interval_s = 0.2\n[thermal]\nwarning_c = {warning_c}\n'
    )


class Governor:
    """A real `gpu-governor run --simulate` process with its metrics on a loopback port."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.path = tmp_path / "governor.toml"
        self.path.write_text(text)
        self.port = free_port()
        self.log = (tmp_path / "daemon.log").open("w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "governor",
                "run",
                "--simulate",
                "--config",
                str(self.path),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-format",
                "json",
            ],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> None:
        wait_for(lambda: "gpu_governor_ready 1" in scrape(self.port, 5.0), 60, "the daemon to be ready")

    def metric(self, pattern: str | re.Pattern[str]) -> float:
        match = re.search(pattern, scrape(self.port, 10.0))
        assert match is not None, pattern
        return float(match.group(1))

    def reload_ok(self) -> float:
        return self.metric(re.compile(r"^gpu_governor_config_last_reload_successful (\S+)", re.MULTILINE))

    def reloads(self, result: str) -> float:
        found = re.search(rf'gpu_governor_config_reloads_total\{{result="{result}"\}} (\S+)', scrape(self.port, 10.0))
        return 0.0 if found is None else float(found.group(1))

    def warning_c(self) -> float:
        return self.metric(WARNING_METRIC)

    def output(self) -> str:
        self.log.flush()
        return (self.path.parent / "daemon.log").read_text()

    def replace(self, text: str | bytes) -> None:
        """Replace the file atomically (write, then rename), as the docs ask."""
        tmp = self.path.with_name(".governor.toml.new")
        tmp.write_bytes(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, self.path)
        past = time.time() - 5  # no settle wait needed: the file is complete
        os.utime(self.path, (past, past))

    def hup_and_wait_failed(self) -> None:
        before = self.reloads("failure")
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.reloads("failure") > before, 60, "a failed reload")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()


@pytest.fixture
def governor(tmp_path: Path) -> Iterator[Governor]:
    gov = Governor(tmp_path, base_config(tmp_path))
    try:
        gov.ready()
        assert gov.warning_c() == 71.0 and gov.reload_ok() == 1.0
        yield gov
    finally:
        if gov.proc.poll() is None:
            gov.proc.kill()
            gov.proc.wait()


def assert_refused_and_alive(gov: Governor) -> None:
    """Alive, the reload reported as failed, the old config (warning 71 C) in force, no traceback."""
    assert gov.proc.poll() is None
    assert gov.reload_ok() == 0.0
    assert gov.warning_c() == 71.0
    assert "Traceback" not in gov.output()


HOSTILE = {
    "nested 100k deep": "x = " + "[" * 100_000 + "]" * 100_000 + "\n",
    "5000-digit integer": "poll_interval_s = " + "9" * 5000 + "\n",
    "huge integer in a table": "[thermal]\nwarning_c = " + "7" * 5000 + "\n",
}


class TestHostileReload:
    @pytest.mark.parametrize("name", list(HOSTILE))
    def test_hostile_file_is_refused(self, governor: Governor, tmp_path: Path, name: str) -> None:
        """Deep nesting or a 5000-digit integer: reload refused, daemon alive, old config in force."""
        governor.replace(base_config(tmp_path, 65.0) + HOSTILE[name])
        governor.hup_and_wait_failed()
        assert_refused_and_alive(governor)
        assert governor.stop() == 0

    def test_50k_unknown_keys_print_a_bounded_error(self, governor: Governor, tmp_path: Path) -> None:
        """50k unknown keys: refused; the logged error shows at most 20 problems and counts the rest."""
        junk = "".join(f"k{i} = 1\n" for i in range(50_000))
        governor.replace(base_config(tmp_path, 65.0) + junk)
        size_before = len(governor.output())
        governor.hup_and_wait_failed()
        assert_refused_and_alive(governor)
        logged = governor.output()[size_before:]
        failed = [line for line in logged.splitlines() if "config_reload_failed" in line]
        assert len(failed) == 1 and len(failed[0]) < 20_000, len(failed[0])
        assert "49980 more problem(s) not shown" in failed[0]
        assert governor.stop() == 0

    def test_torn_file_with_implausible_threshold_is_refused(self, governor: Governor, tmp_path: Path) -> None:
        """A file cut off after `warning_c = 7` (of 70) is refused: 7 C is outside 30-120 C."""
        full = base_config(tmp_path, 70.0) + "hot_c = 80.0\n"
        governor.replace(full[: full.index("warning_c = 7") + len("warning_c = 7")])
        governor.hup_and_wait_failed()
        assert_refused_and_alive(governor)
        assert "between 30 and 120 C" in governor.output()
        assert governor.stop() == 0

    def test_reload_waits_for_a_slow_writer(self, governor: Governor, tmp_path: Path) -> None:
        """SIGHUP while a writer is halfway: the reload waits until the file settles and applies the whole file."""
        final = base_config(tmp_path, 66.0) + "hot_c = 79.0\n"
        half = final[: final.index("warning_c = 6") + len("warning_c = 6")]
        with governor.path.open("w") as handle:  # in place, not atomic: the case the settle wait is for
            handle.write(half)
            handle.flush()
            governor.proc.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            handle.write(final[len(half) :])
        before = governor.reloads("success")
        wait_for(lambda: governor.reloads("success") > before, 60, "the reload")
        assert governor.warning_c() == 66.0 and governor.reload_ok() == 1.0
        assert governor.reloads("failure") == 0
        assert governor.stop() == 0

    def test_unlink_and_create_during_a_sighup_storm(self, governor: Governor, tmp_path: Path) -> None:
        """A writer unlinking and re-creating the file during 200 SIGHUPs never kills the daemon."""
        stop = threading.Event()

        def writer() -> None:
            text = base_config(tmp_path, 72.0)
            while not stop.is_set():
                with contextlib.suppress(FileNotFoundError):
                    governor.path.unlink()
                governor.path.write_text(text)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            for _ in range(200):
                governor.proc.send_signal(signal.SIGHUP)
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(timeout=10)
        governor.replace(base_config(tmp_path, 72.0))
        before = governor.reloads("success")
        governor.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: governor.reloads("success") > before, 60, "a reload after the storm")
        assert governor.proc.poll() is None and "Traceback" not in governor.output()
        assert governor.warning_c() == 72.0
        assert governor.stop() == 0


class TestHostileStart:
    @pytest.mark.parametrize("name", list(HOSTILE))
    def test_hostile_file_at_start_exits_3(self, tmp_path: Path, name: str) -> None:
        """At start a hostile file is exit 3 with one line on stderr, never a traceback."""
        path = tmp_path / "governor.toml"
        path.write_text(base_config(tmp_path) + HOSTILE[name])
        done = subprocess.run(
            [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(path)],
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert done.returncode == 3, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr

    def test_50k_unknown_keys_at_start_print_21_lines(self, tmp_path: Path) -> None:
        """check-config on 50k unknown keys prints 20 problems and a count, not megabytes."""
        path = tmp_path / "governor.toml"
        path.write_text("".join(f"k{i} = 1\n" for i in range(50_000)))
        done = subprocess.run(
            [sys.executable, "-m", "governor", "check-config", str(path)],
            capture_output=True,
            check=False,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 3 and len(lines) == 21 and "49980 more" in lines[-1]


HELD_MASK = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGTERM - 1))
"""SIGHUP and SIGTERM in /proc/PID/status SigBlk: the daemon holds them from the start of `run`."""


def _holds(pid: int) -> bool:
    """True when ``pid`` blocks SIGHUP and SIGTERM (/proc/PID/status SigBlk)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16) & HELD_MASK == HELD_MASK
    return False


def _stopped(pid: int) -> bool:
    """True once ``pid`` is stopped by SIGSTOP (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def start_and_freeze_while_held(tmp_path: Path, attempts: int = 3) -> Governor:
    """A governor stopped (SIGSTOP) at an instant it holds SIGHUP and SIGTERM: still starting up.

    The hold lasts from the start of `run` until the waiter's handlers are in place, about 60 ms on
    a fast machine, so the hold is watched closely (every 0.5 ms) and the process frozen there; a
    signal sent now is certain to arrive during start-up, however fast the machine. A process
    that released them between the look and the stop is discarded and a new one started."""
    for attempt in range(attempts):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        gov = Governor(run_dir, base_config(run_dir))
        pid = gov.proc.pid
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and gov.proc.poll() is None:
            with contextlib.suppress(OSError):
                if _holds(pid):
                    os.kill(pid, signal.SIGSTOP)
                    wait_for(partial(_stopped, pid), 10.0, "the daemon to stop")
                    if _holds(pid):
                        return gov
                    break  # released just before the stop: too late for this one
            time.sleep(0.0005)
        os.kill(pid, signal.SIGCONT)
        gov.stop()
    raise AssertionError(f"no governor was caught holding its signals in {attempts} attempts")


class TestEarlySignals:
    def test_early_sighup_is_queued(self, tmp_path: Path) -> None:
        """A SIGHUP during start-up (imports, config, backend) is a reload once running, never fatal."""
        gov = start_and_freeze_while_held(tmp_path)
        try:
            assert "governor_ready" not in gov.output()  # still starting
            gov.proc.send_signal(signal.SIGHUP)
            os.kill(gov.proc.pid, signal.SIGCONT)
            gov.ready()
            assert gov.proc.poll() is None
            wait_for(lambda: gov.reloads("success") >= 1, 60, "the queued reload")
        finally:
            os.kill(gov.proc.pid, signal.SIGCONT)
            code = gov.stop()
        assert code == 0

    def test_early_sigterm_is_a_clean_stop(self, tmp_path: Path) -> None:
        """A SIGTERM during start-up stops the daemon cleanly (exit 0, stop logged), not by the signal."""
        gov = start_and_freeze_while_held(tmp_path)
        assert "governor_ready" not in gov.output()
        gov.proc.send_signal(signal.SIGTERM)
        os.kill(gov.proc.pid, signal.SIGCONT)
        code = gov.proc.wait(timeout=60)
        output = gov.output()
        gov.log.close()
        assert code == 0
        assert "governor_stopped" in output


@pytest.mark.skipif(os.geteuid() != 0, reason="the trust rules apply to a governor running as root")
class TestSwappableParents:
    """Files the root daemon reads must sit below directories only root may change."""

    @pytest.fixture
    def open_dir(self, tmp_path: Path) -> Path:
        """A directory anyone may write (no sticky bit), holding a root-owned config and web-config."""
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        (shared / "governor.toml").write_text("poll_interval_s = 2.0\n")
        (shared / "web-config.yml").write_text("tls_server_config: {}\n")
        return shared

    def test_a_config_below_a_world_writable_directory_is_refused(self, open_dir: Path) -> None:
        """Its writer could swap the config for a link to any root-owned file: a config error naming that directory."""
        from governor.config import ConfigError, load_config

        with pytest.raises(ConfigError) as refused:
            load_config(open_dir / "governor.toml")
        assert f"its parent {open_dir} is writable by group or others" in str(refused.value)

    def test_a_web_config_below_a_world_writable_directory_is_refused(self, open_dir: Path) -> None:
        """The same rule for the web-config file (and so for the TLS files it names)."""
        from governor.config import ConfigError
        from governor.webconfig import read_web_config

        with pytest.raises(ConfigError) as refused:
            read_web_config(open_dir / "web-config.yml", trust_euid=0)
        assert f"its parent {open_dir} is writable by group or others" in str(refused.value)

    def test_a_sticky_directory_is_fine(self, open_dir: Path) -> None:
        """A sticky directory (like /tmp) lets no one else rename a root-owned entry: the files are used."""
        from governor.config import load_config

        open_dir.chmod(0o1777)
        assert load_config(open_dir / "governor.toml").poll_interval_s == 2.0
