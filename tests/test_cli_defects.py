"""Issue 11's reproduced CLI defects, each run as a user runs it: a real process, real files, loopback only."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from governor.cli import EXIT_BROKEN_PIPE, EXIT_CONFIG, EXIT_USAGE
from governor.config import DEFAULT_CONFIG_PATH, Config
from governor.sim.profiles import load_profile
from tests.support import free_port, scrape, wait_for

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534

HEAT_COOL = """\
name = "heat-cool"
description = "Five minutes at the power cap, then five at a tenth of it, in a 30 C room."
ambient_c = 30.0
repeat = false

[[phase]]
name = "burn"
duration_s = 300.0
demand_fraction = 1.0
kind = "compute"

[[phase]]
name = "cool"
duration_s = 300.0
demand_fraction = 0.1
kind = "compute"
"""

PRESSURE_AND_LOSS = """\
name = "pressure-and-loss"
description = "A process fills the card from 30 s to 90 s; the GPU is lost at 120 s and back at 180 s."
ambient_c = 25.0
repeat = false

[[phase]]
name = "work"
duration_s = 3600.0
demand_fraction = 0.5
kind = "compute"

[[process]]
name = "filler"
memory_gib = 11.5
start_s = 30.0
end_s = 90.0

[[event]]
at_s = 120.0
gpu = 0
fault = "lost"

[[event]]
at_s = 180.0
gpu = 0
fault = "none"
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can read (pytest's tmp_path is root-only), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="gg-cli-defects-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def gg(*args: str, timeout_s: float = 120.0, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m governor ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "governor", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
        input=stdin,
        check=False,
    )


def sim_config(folder: Path, scenario: str, time_scale: float, extra: str = "") -> Path:
    """A config file selecting ``scenario`` (a TOML text) on the rtx4070 at ``time_scale``."""
    scenario_path = folder / "scenario.toml"
    scenario_path.write_text(scenario)
    config = folder / "sim.toml"
    config.write_text(
        f'{extra}[simulation]\nprofile = "rtx4070"\nscenario = "{scenario_path}"\ntime_scale = {time_scale}\n'
    )
    for path in (scenario_path, config):
        path.chmod(0o644)
    return config


def json_events(text: str) -> list[dict[str, object]]:
    """The JSON log lines in ``text``."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@contextlib.contextmanager
def reachable_by_others(*paths: Path) -> Iterator[None]:
    """Let other users traverse (o+x) every directory down to ``paths`` while the body runs: a
    checkout or venv under a private directory (``mktemp -d`` is 0700) would otherwise keep
    uid 65534 from the code under test. Modes are put back afterwards."""
    changed: list[tuple[Path, int]] = []
    try:
        for path in paths:
            for directory in [path, *path.parents]:
                mode = stat.S_IMODE(directory.stat().st_mode)
                if not mode & stat.S_IXOTH and directory.stat().st_uid == os.geteuid():
                    directory.chmod(mode | stat.S_IXOTH)
                    changed.append((directory, mode))
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)


def as_nobody() -> list[str]:
    """The command prefix that drops to uid/gid 65534 when we are root (CI), else nothing."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is needed to drop root")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


class TestRecordThenCalibrate:
    def test_recovers_the_profiles_thermal_constants(self, tmp_path: Path) -> None:
        """`record --simulate` of a heat-then-cool run (100x) has real times; calibrate recovers R, tau within 10 %."""
        config = sim_config(tmp_path, HEAT_COOL, 100.0)
        trace = tmp_path / "t.jsonl"
        started = time.monotonic()
        rec = gg("record", "--simulate", "--config", str(config), "--duration", "10m", "--output", str(trace))
        assert rec.returncode == 0, rec.stderr
        assert time.monotonic() - started < 90  # 600 simulated seconds at 100x, with generous headroom
        times = [r["t"] for r in map(json.loads, trace.read_text().splitlines()) if r["record"] == "sample"]
        assert times[0] == 0.0 and 595.0 <= times[-1] < 600.0
        assert all(b > a for a, b in itertools.pairwise(times))
        cal = gg("calibrate", str(trace))
        assert cal.returncode == 0, cal.stderr
        fitted = {name: float(value) for name, value in re.findall(r"(\w+_c_per_w|tau_\w+)\s+([\d.]+)", cal.stdout)}
        truth = load_profile("rtx4070").thermal
        assert fitted["r_die_c_per_w"] == pytest.approx(truth.r_die_c_per_w, rel=0.10)
        assert fitted["r_sink_c_per_w"] == pytest.approx(truth.r_sink_c_per_w, rel=0.10)
        assert fitted["tau_die"] == pytest.approx(truth.tau_die_s, rel=0.10)
        assert fitted["tau_sink"] == pytest.approx(truth.tau_sink_s, rel=0.10)
        replay = gg("replay", str(trace))
        assert replay.returncode == 0, replay.stderr
        replayed = re.search(r"gpu0 \(.*\), ([\d.]+) s:", replay.stdout)
        assert replayed is not None and 590.0 <= float(replayed.group(1)) <= 610.0, replay.stdout  # was 0 s

    def test_decision_reasons_use_one_precision(self, tmp_path: Path) -> None:
        """Replayed decisions write durations as whole seconds (or one decimal below 10 s), never 60.0122 s."""
        config = sim_config(tmp_path, HEAT_COOL, 100.0)
        trace = tmp_path / "t.jsonl"
        assert (
            gg("record", "--simulate", "--config", str(config), "--duration", "600", "-o", str(trace)).returncode == 0
        )
        replay = gg("replay", str(trace))
        decisions = [line for line in replay.stdout.splitlines() if line.startswith("  t=")]
        step_up = [line for line in decisions if "power_step_up" in line]
        assert step_up and re.search(r"for \d+ s \(dwell 60 s\)", step_up[0]), decisions
        durations = [m for line in decisions for m in re.findall(r"(\d+(?:\.\d+)?) s\b", line.split("  ", 4)[-1])]
        assert durations and all(re.fullmatch(r"\d+|\d\.\d", d) for d in durations), durations


class TestPrivateSimulation:
    def test_non_root_quick_start_hot_scenario_no_errors(self, shared_dir: Path) -> None:
        """As uid 65534, 10 simulated minutes of `hot` (60x) log no error, write nothing system-wide, and clean up."""
        hot = (REPO / "governor" / "data" / "scenarios" / "hot.toml").read_text()
        config = sim_config(shared_dir, hot, 60.0)
        xdg = shared_dir / "xdg"
        xdg.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(xdg, NOBODY, NOBODY)
        before = {p: p.exists() for p in (Path(Config().state_dir), Path(Config().runtime_dir))}
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        env["XDG_RUNTIME_DIR"] = str(xdg)
        cmd = [*as_nobody(), sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--log-format", "json"]
        reach = contextlib.ExitStack()
        reach.enter_context(reachable_by_others(REPO, Path(sys.prefix)))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        try:
            wait_for(lambda: "gpu_governor_gpu_temperature_celsius" in scrape(port), 20.0, "metrics")
            private = list(xdg.iterdir())
            assert [p.name for p in private] == [f"gpu-governor-sim-{proc.pid}"]
            assert stat.S_IMODE(private[0].stat().st_mode) == 0o700
            time.sleep(10.5)  # 10 simulated minutes at 60x
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reach.close()
        events = json_events(out)
        assert proc.returncode == 0, out
        assert [e for e in events if e.get("level") in ("error", "critical")] == []
        assert any(e["event"] == "power_limit_stepped" for e in events), [e["event"] for e in events]
        assert list(xdg.iterdir()) == []  # the private directory is gone
        assert {p: p.exists() for p in before} == before  # nothing created under /var/lib or /run

    def test_without_xdg_runtime_dir_a_temp_dir_is_used_and_a_named_directory_kept(self, tmp_path: Path) -> None:
        """No XDG_RUNTIME_DIR: a fresh temp dir (under TMPDIR), removed on exit; a runtime_dir the file sets is kept."""
        own = tmp_path / "own-run"
        config = sim_config(
            tmp_path, (REPO / "governor/data/scenarios/idle.toml").read_text(), 1.0, f'runtime_dir = "{own}"\n'
        )
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env["TMPDIR"] = str(tmp_path)
        cmd = [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config), "--log-format", "json"]
        proc = subprocess.Popen(
            [*cmd, "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            wait_for((own / "processes.json").exists, 20.0, "the process table in the named runtime_dir")
            assert len(list(tmp_path.glob("gpu-governor-sim-*"))) == 1
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, out
        assert list(tmp_path.glob("gpu-governor-sim-*")) == []
        assert (own / "processes.json").exists()


class TestEvents:
    def test_pressure_and_lost_gpu_are_logged_at_their_levels(self, tmp_path: Path) -> None:
        """Pressure begin/end and GPU recovered are warnings, GPU lost an error; --log-level warning drops info."""
        extra = f'state_dir = "{tmp_path / "state"}"\npoll_interval_s = 0.2\n'
        config = sim_config(tmp_path, PRESSURE_AND_LOSS, 30.0, extra=extra)
        port = free_port()
        cmd = [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config), "--log-format", "json"]
        cmd += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            wait_for(lambda: "gpu_governor_gpu_temperature_celsius" in scrape(port), 20.0, "metrics")
            time.sleep(7.5)  # past 180 simulated seconds at 30x
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        events = json_events(out)
        wanted = ("memory_pressure_began", "memory_pressure_ended", "gpu_lost", "gpu_recovered")
        seen = [(e["event"], e["level"]) for e in events if e["event"] in wanted]
        assert seen == [
            ("memory_pressure_began", "warning"),
            ("memory_pressure_ended", "warning"),
            ("gpu_lost", "error"),
            ("gpu_recovered", "warning"),
        ], out
        assert {e["level"] for e in events} <= {"warning", "error"}  # --log-level warning
        assert not any(e["event"] == "governor_ready" for e in events)


class TestNoTraceback:
    def test_every_subcommand_with_stdout_closed_early(self, tmp_path: Path) -> None:
        """Every subcommand, its reader gone before it writes: no traceback, exit 0 or 141 (SIGPIPE's code)."""
        config = sim_config(tmp_path, HEAT_COOL, 100.0, extra=f'state_dir = "{tmp_path / "state"}"\n')
        trace = tmp_path / "t.jsonl"
        assert (
            gg("record", "--simulate", "--config", str(config), "--duration", "400", "-o", str(trace)).returncode == 0
        )  # the burn and the cool-down: calibrate refuses a load alone (it cannot tell the room from R)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}

        def closed_stdout(args: list[str], stdin: str = "") -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                [sys.executable, "-m", "governor", *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=REPO,
                env=env,
            )
            assert proc.stdout is not None and proc.stdin is not None
            proc.stdout.close()  # the reader goes away before a line is written
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
            proc.stdin = proc.stdout = None  # so communicate() reads stderr alone
            return proc

        daemon = closed_stdout(["run", "--simulate", "--config", str(config), "--listen", f"127.0.0.1:{port}"])
        try:
            wait_for(lambda: "gpu_governor_gpu_temperature_celsius" in scrape(port), 20.0, "metrics")
            commands: list[tuple[list[str], str]] = [
                (["--help"], ""),
                (["--version"], ""),
                (["run", "--help"], ""),
                (["check-config", str(REPO / "config" / "governor.toml")], ""),
                (["status", "--url", f"http://127.0.0.1:{port}/metrics"], ""),
                (
                    [
                        "record",
                        "--simulate",
                        "--config",
                        str(config),
                        "--duration",
                        "30",
                        "-o",
                        str(tmp_path / "r.jsonl"),
                    ],
                    "",
                ),
                (["calibrate", str(trace)], ""),
                (["replay", str(trace)], ""),
                (["simulate", "--profile", "rtx4070", "--scenario", "idle", "--duration", "10m"], ""),
                (["hash-password"], "correct horse\n"),
            ]
            for args, stdin in commands:
                proc = closed_stdout(args, stdin)
                _, err = proc.communicate(timeout=120)
                assert b"Traceback" not in err, (args, err.decode())
                assert b"Exception ignored" not in err, (args, err.decode())
                # argparse's own --help/--version output ignores write errors, and exits 0
                allowed = (0, EXIT_BROKEN_PIPE) if "--help" in args or "--version" in args else (EXIT_BROKEN_PIPE,)
                assert proc.returncode in allowed, (args, proc.returncode, err.decode())
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            _, daemon_err = daemon.communicate(timeout=20)
        assert b"Traceback" not in daemon_err
        assert daemon.returncode == 0

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (
                ["record", "--output", "/nonexistent/x.jsonl", "--simulate"],
                "--output: cannot write /nonexistent/x.jsonl",
            ),
            (["record", "--output", "{tmp}/x.jsonl", "--duration", "-1"], "--duration: expected a duration"),
            (["record", "--output", "{tmp}/x.jsonl", "--interval", "0"], "--interval: expected more than 0 s"),
            (["record", "--output", "{tmp}", "--simulate"], "--output: cannot write {tmp}: it is a directory"),
            (["calibrate", "{tmp}/t.jsonl", "--output", "/nonexistent/p.toml"], "--output: cannot write"),
            (["replay", "{tmp}/t.jsonl", "--plot", "/nonexistent/p.png"], "--plot: cannot write /nonexistent/p.png"),
            (
                [
                    "simulate",
                    "--profile",
                    "rtx4070",
                    "--scenario",
                    "hot",
                    "--duration",
                    "24h",
                    "--plot",
                    "/nonexistent/p.png",
                ],
                "--plot: cannot write /nonexistent/p.png",
            ),
        ],
    )
    def test_bad_input_is_one_line_at_once(self, tmp_path: Path, args: list[str], message: str) -> None:
        """A bad path or duration is refused before any work, in one line naming the option, exit 2."""
        (tmp_path / "t.jsonl").write_text("")
        started = time.monotonic()
        result = gg(*(a.replace("{tmp}", str(tmp_path)) for a in args))
        assert time.monotonic() - started < 30  # a 24 h simulation would take far longer
        assert result.returncode == EXIT_USAGE
        assert result.stdout == ""
        assert result.stderr.startswith("gpu-governor: " + message.replace("{tmp}", str(tmp_path))), result.stderr
        assert result.stderr.count("\n") == 1

    def test_record_takes_durations_like_simulate(self, tmp_path: Path) -> None:
        """`record --duration 10m` is accepted (the simulate parser) and records 600 simulated seconds."""
        config = sim_config(tmp_path, HEAT_COOL, 100.0)
        result = gg("record", "--simulate", "--config", str(config), "--duration", "10m", "-o", str(tmp_path / "x"))
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"wrote (\d+) samples to .*\n", result.stdout), result.stdout
        samples = [json.loads(line) for line in (tmp_path / "x").read_text().splitlines()[1:]]
        assert 300 <= len(samples) <= 600  # one per simulated second; a tick missed under load is skipped
        assert 590.0 <= samples[-1]["t"] < 600.0


class TestMessages:
    def test_listen_error_names_the_flag(self) -> None:
        """A non-loopback --listen is blamed on --listen, not on 'built-in defaults'."""
        port = free_port()
        result = gg("run", "--simulate", "--listen", f"0.0.0.0:{port}", timeout_s=30)
        assert result.returncode == EXIT_CONFIG
        assert result.stderr.startswith(f"gpu-governor: config error: --listen 0.0.0.0:{port}: metrics.listen_address")
        assert "built-in defaults" not in result.stderr

    def test_check_config_without_a_path_checks_what_run_uses(self) -> None:
        """`check-config` alone checks /etc/gpu-governor/governor.toml, or the built-in defaults, and says which."""
        result = gg("check-config")
        assert result.returncode == 0, result.stderr
        first = result.stdout.splitlines()[0]
        if DEFAULT_CONFIG_PATH.exists():
            assert first == f"# effective configuration from {DEFAULT_CONFIG_PATH}"
        else:
            assert first == f"# effective configuration from built-in defaults ({DEFAULT_CONFIG_PATH} not found)"
