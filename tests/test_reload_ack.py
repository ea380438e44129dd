"""The reload handshake (governor.reloadack): ``gpu-governor reload --pid`` returns once the daemon has
acknowledged a reload that began after its SIGHUP, exits 3 when the file was refused, 10 when no
acknowledgement comes; the daemon writes the acknowledgement after READY=1 and the metrics.

Fake daemons are real processes (``python -c``) that answer with the real :class:`ReloadAcks`,
refuse, die, or never answer; the real daemon (``python -m governor run --simulate``) is driven
through the real command for the races: a reload already under way, a SIGHUP storm.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor import cli
from governor.clock import VirtualClock
from governor.config import Config, load_config
from governor.errors import EXIT_CONFIG, EXIT_NO_RELOAD, EXIT_OK, EXIT_USAGE, UnusableFile
from governor.notify import Notifier
from governor.reloadack import (
    ACK_FILE,
    DEFAULT_RUNTIME_DIR,
    DEFAULT_TIMEOUT_S,
    ReloadAcks,
    ack_directory,
    monotonic_us,
    read_ack,
)
from governor.waiting import RELOAD, VirtualWaiter, settle
from tests.builders import build_daemon
from tests.scripted import ScriptedBackend
from tests.support import free_port, scrape, wait_for

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "gpu-governor.service"

FAKE_DAEMON = textwrap.dedent(
    """\
    import os, signal, sys, time
    from governor.notify import Notifier
    from governor.reloadack import ReloadAcks

    mode, runtime_dir = sys.argv[1], sys.argv[2]
    acks = ReloadAcks(runtime_dir, Notifier(), lambda: None, None)
    if mode == "ignore":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    if mode == "under-way":
        acks.begin()  # a reload that began before the command's SIGHUP, still under way
    print("ready", flush=True)
    if mode == "ignore":
        time.sleep(600)
    signal.sigwait({signal.SIGHUP})
    if mode == "die":
        os._exit(0)
    if mode == "under-way":
        acks.refused(["an older file: refused"], "")  # the reload under way ends: not the command's
        time.sleep(0.3)
        acks.begin()  # the reload the SIGHUP asked for
        acks.applied("")
    elif mode == "apply":
        acks.begin()
        acks.applied("")
    elif mode == "refuse":
        acks.begin()
        acks.refused(["/etc/gpu-governor/governor.toml: thermal.hot_c: expected a number, got 'very'"], "")
    time.sleep(600)
    """
)


class FakeDaemon:
    """A process that answers a SIGHUP the way ``mode`` says, acknowledging in ``runtime_dir``."""

    def __init__(self, mode: str, runtime_dir: Path, environ: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"} | (environ or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAKE_DAEMON, mode, str(runtime_dir)],
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(autouse=True)
def outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    """No $RUNTIME_DIRECTORY (pytest run from a unit would have one) unless a test sets it."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Any]:
    made: list[FakeDaemon] = []

    def start(mode: str, runtime_dir: Path = tmp_path, environ: dict[str, str] | None = None) -> FakeDaemon:
        made.append(FakeDaemon(mode, runtime_dir, environ))
        return made[-1]

    yield start
    for daemon in made:
        daemon.close()


def reload(pid: int, runtime_dir: Path | None, timeout_s: float = 30.0) -> tuple[int, str]:
    """``gpu-governor reload --pid PID`` through the real command line: (exit code, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["reload", "--pid", str(pid), "--timeout", str(timeout_s)]
    argv += [] if runtime_dir is None else ["--runtime-dir", str(runtime_dir)]
    code = cli.main(argv, out, err)
    assert out.getvalue() == "", "an applied reload prints nothing"
    return code, err.getvalue()


def write_ack(path: Path, **fields: Any) -> None:
    document = {"pid": 1, "reload": 1, "began_monotonic_us": 0, "result": "applied", "errors": []} | fields
    path.write_text(json.dumps(document))
    path.chmod(0o600)


class TestAgainstFakeDaemons:
    def test_an_applied_reload_exits_0(self, fake: Any, tmp_path: Path) -> None:
        """A daemon that acknowledges the reload as applied: exit 0, nothing printed."""
        daemon = fake("apply")
        assert reload(daemon.pid, tmp_path) == (EXIT_OK, "")
        assert read_ack(tmp_path / ACK_FILE).pid == daemon.pid

    def test_a_refused_reload_exits_3_with_the_daemons_errors(self, fake: Any, tmp_path: Path) -> None:
        """A daemon that refuses the file: exit 3, its errors printed as config errors, the old config kept."""
        daemon = fake("refuse")
        code, err = reload(daemon.pid, tmp_path)
        assert code == EXIT_CONFIG
        lines = err.splitlines()
        assert lines[0] == f"gpu-governor: reload: process {daemon.pid} refused the new configuration and keeps " + (
            "running the old one"
        )
        assert lines[1] == (
            "gpu-governor: config error: /etc/gpu-governor/governor.toml: thermal.hot_c: expected a number, got 'very'"
        )

    def test_a_daemon_that_dies_fails_at_once_not_at_the_timeout(self, fake: Any, tmp_path: Path) -> None:
        """A daemon that exits on the SIGHUP without acknowledging: exit 10 saying it exited (timeout 300 s unused)."""
        daemon = fake("die")
        code, err = reload(daemon.pid, tmp_path, timeout_s=300)
        assert code == EXIT_NO_RELOAD
        assert f"process {daemon.pid} exited before it finished the reload" in err

    def test_a_daemon_that_never_answers_times_out_with_exit_10(self, fake: Any, tmp_path: Path) -> None:
        """A daemon that ignores SIGHUP: exit 10 after --timeout, saying the SIGHUP stays queued."""
        daemon = fake("ignore")
        code, err = reload(daemon.pid, tmp_path, timeout_s=0.5)
        assert code == EXIT_NO_RELOAD
        assert f"process {daemon.pid} did not acknowledge the reload within 0.5 s" in err
        assert f"{tmp_path / ACK_FILE} does not exist" in err
        assert daemon.proc.poll() is None, "a SIGHUP the daemon ignores must not kill it"

    def test_a_reload_under_way_when_the_command_starts_is_not_taken(self, fake: Any, tmp_path: Path) -> None:
        """The reload under way ends refused after the SIGHUP: not this command's; the next one (applied) is."""
        daemon = fake("under-way")
        assert reload(daemon.pid, tmp_path) == (EXIT_OK, "")
        assert read_ack(tmp_path / ACK_FILE).reload == 2

    def test_an_acknowledgement_left_from_before_the_signal_is_not_taken(self, fake: Any, tmp_path: Path) -> None:
        """An applied acknowledgement of this PID that began before the SIGHUP: still waiting, then exit 10."""
        daemon = fake("ignore")
        write_ack(tmp_path / ACK_FILE, pid=daemon.pid, reload=7, began_monotonic_us=monotonic_us())
        code, err = reload(daemon.pid, tmp_path, timeout_s=0.5)
        assert code == EXIT_NO_RELOAD
        assert "acknowledges only reload 7, which began before the signal" in err

    def test_an_acknowledgement_of_another_process_is_not_taken(self, fake: Any, tmp_path: Path) -> None:
        """An acknowledgement naming another PID (an earlier daemon's), even from the future, is not taken."""
        daemon = fake("ignore")
        write_ack(tmp_path / ACK_FILE, pid=daemon.pid + 1, began_monotonic_us=monotonic_us() + 10**12)
        code, err = reload(daemon.pid, tmp_path, timeout_s=0.5)
        assert code == EXIT_NO_RELOAD
        assert f"names PID {daemon.pid + 1}, not {daemon.pid}" in err

    def test_a_planted_acknowledgement_is_refused_unread(self, fake: Any, tmp_path: Path) -> None:
        """A group-writable file claiming an applied reload from the future: refused, exit 10 naming why."""
        daemon = fake("ignore")
        path = tmp_path / ACK_FILE
        write_ack(path, pid=daemon.pid, began_monotonic_us=monotonic_us() + 10**12)
        path.chmod(0o620)
        code, err = reload(daemon.pid, tmp_path, timeout_s=0.5)
        assert code == EXIT_NO_RELOAD
        assert "writable by group or others (refused unread)" in err

    def test_under_systemd_both_sides_meet_in_runtime_directory(
        self, fake: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """$RUNTIME_DIRECTORY set for both, as systemd does: the daemon acknowledges there, the command looks there."""
        unit_dir = tmp_path / "unit"
        unit_dir.mkdir()
        daemon = fake("apply", tmp_path / "private", {"RUNTIME_DIRECTORY": str(unit_dir)})
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(unit_dir))
        assert reload(daemon.pid, None) == (EXIT_OK, "")
        assert read_ack(unit_dir / ACK_FILE).pid == daemon.pid

    def test_no_such_process_exits_10(self, tmp_path: Path) -> None:
        """A PID with no process: exit 10 at once, asking whether the daemon runs."""
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        code, err = reload(proc.pid, tmp_path)
        assert code == EXIT_NO_RELOAD
        assert f"no process {proc.pid}" in err


class TestReadAck:
    def test_a_symbolic_link_is_refused(self, tmp_path: Path) -> None:
        """A link to a valid acknowledgement elsewhere is refused: the daemon never writes one."""
        write_ack(tmp_path / "elsewhere.json")
        (tmp_path / ACK_FILE).symlink_to(tmp_path / "elsewhere.json")
        with pytest.raises(UnusableFile, match="symbolic link"):
            read_ack(tmp_path / ACK_FILE)

    def test_a_file_of_another_owner_is_refused(self, tmp_path: Path) -> None:
        """A file owned by another uid than the reader's is refused unread."""
        path = tmp_path / ACK_FILE
        write_ack(path)
        with pytest.raises(UnusableFile, match=f"owned by uid {os.geteuid()}, not {os.geteuid() + 1}"):
            read_ack(path, euid=os.geteuid() + 1)

    def test_a_huge_file_is_refused_unread(self, tmp_path: Path) -> None:
        """More than 64 KiB is refused without being read."""
        path = tmp_path / ACK_FILE
        path.write_text(" " * (64 * 1024 + 1))
        path.chmod(0o600)
        with pytest.raises(UnusableFile, match="more than the 65536 allowed"):
            read_ack(path)

    @pytest.mark.parametrize(
        ("fields", "why"),
        [
            ({"pid": "1"}, "pid: expected a whole number"),
            ({"pid": True}, "pid: expected a whole number"),
            ({"began_monotonic_us": -1}, "began_monotonic_us: expected a whole number >= 0"),
            ({"result": "maybe"}, "result: expected applied or refused"),
            ({"result": "refused", "errors": []}, "errors: expected some for result refused"),
            ({"errors": ["x"]}, "errors: expected none for result applied"),
            ({"errors": [1]}, "errors: expected a list of strings"),
        ],
    )
    def test_a_field_of_the_wrong_kind_is_refused(self, tmp_path: Path, fields: dict[str, Any], why: str) -> None:
        """Every field is checked; the error names the field and what was expected."""
        write_ack(tmp_path / ACK_FILE, **fields)
        with pytest.raises(UnusableFile, match=re.escape(why)):
            read_ack(tmp_path / ACK_FILE)

    def test_a_file_that_is_not_json_is_refused(self, tmp_path: Path) -> None:
        """Torn or foreign content is an unusable file, not a crash."""
        path = tmp_path / ACK_FILE
        path.write_text('{"pid": 12')
        path.chmod(0o600)
        with pytest.raises(UnusableFile, match="not JSON"):
            read_ack(path)


class TestCommandLine:
    @pytest.mark.parametrize("pid", ["1", "0", "-5", "abc", "", "99999999"])
    def test_a_pid_that_cannot_be_the_daemon_is_a_usage_error(self, pid: str, capsys: Any) -> None:
        """--pid must be a process ID above 1 (init is never the daemon): exit 2, nothing signalled."""
        with pytest.raises(SystemExit) as exited:
            cli.main(["reload", "--pid", pid])
        assert exited.value.code == EXIT_USAGE
        assert "expected the daemon's process ID" in capsys.readouterr().err

    @pytest.mark.parametrize("timeout", ["0", "-1", "nan", "3601", "soon"])
    def test_a_bad_timeout_is_a_usage_error(self, timeout: str, capsys: Any) -> None:
        """--timeout must be seconds above 0, at most an hour."""
        with pytest.raises(SystemExit) as exited:
            cli.main(["reload", "--pid", "2", "--timeout", timeout])
        assert exited.value.code == EXIT_USAGE
        assert "expected seconds above 0" in capsys.readouterr().err

    def test_defaults_match_the_daemon_and_the_unit(self) -> None:
        """Defaults: the config's runtime_dir; a timeout below TimeoutStartSec= (systemd's limit for ExecReload=)."""
        args = cli.build_parser().parse_args(["reload", "--pid", "2"])
        assert args.runtime_dir is None and Config().runtime_dir == DEFAULT_RUNTIME_DIR
        assert args.timeout == DEFAULT_TIMEOUT_S
        unit = UNIT.read_text()
        start = re.search(r"^TimeoutStartSec=(\d+)s$", unit, re.M)
        assert start is not None and args.timeout < int(start.group(1))

    def test_the_unit_reloads_through_the_command(self) -> None:
        """ExecReload= waits for the acknowledgement (not kill -HUP); Type= stays notify, which systemd 252 knows."""
        unit = UNIT.read_text()
        assert re.findall(r"^ExecReload=(.*)$", unit, re.M) == ["/usr/bin/gpu-governor reload --pid $MAINPID"]
        assert re.findall(r"^Type=(.*)$", unit, re.M) == ["notify"]


class TestAckDirectory:
    @pytest.mark.parametrize(
        ("environ", "expected"),
        [
            ({}, "/fallback"),
            ({"RUNTIME_DIRECTORY": "/run/gpu-governor"}, "/run/gpu-governor"),
            ({"RUNTIME_DIRECTORY": "/run/a:/run/b"}, "/run/a"),
            ({"RUNTIME_DIRECTORY": ""}, "/fallback"),
            ({"RUNTIME_DIRECTORY": "relative/dir"}, "/fallback"),
        ],
    )
    def test_systemds_directory_first_then_the_fallback(self, environ: dict[str, str], expected: str) -> None:
        """$RUNTIME_DIRECTORY's first absolute entry wins; empty or relative falls back."""
        assert ack_directory("/fallback", environ) == expected

    def test_under_systemd_even_an_empty_runtime_dir_acknowledges(self, tmp_path: Path) -> None:
        """runtime_dir = "" (no process table) under systemd: ExecReload= still gets its acknowledgement."""
        acks = ReloadAcks("", Notifier(), lambda: None, None, environ={"RUNTIME_DIRECTORY": str(tmp_path)})
        acks.begin()
        acks.applied("")
        assert read_ack(tmp_path / ACK_FILE).applied


# --------------------------------------------------------------------------- the daemon's side


class Recorder(Notifier):
    """A notifier that records what it would send and whether the acknowledgement existed then."""

    def __init__(self, ack: Path) -> None:
        super().__init__()
        self.ack = ack
        self.sent: list[tuple[str, bool]] = []

    def _send(self, message: str) -> None:
        self.sent.append((message.split("\n", 1)[0], self.ack.exists()))


class TestDaemonSide:
    def daemon(self, tmp_path: Path, runtime_dir: str, loaded: list[Config]) -> Any:
        clock = VirtualClock()
        path = tmp_path / "governor.toml"
        path.write_text("# the test's loader returns the config\n")
        os.utime(path, (0, 0))
        config = Config(state_dir=str(tmp_path / "state"), runtime_dir=runtime_dir)
        notifier = Recorder(Path(runtime_dir or tmp_path) / ACK_FILE)
        daemon = build_daemon(
            config,
            ScriptedBackend(clock, lambda t, i: 50.0),
            clock,
            notifier=notifier,
            config_path=path,
            load=lambda p: loaded[0],
        )
        daemon.start()
        daemon.tick()
        return daemon

    def test_an_applied_reload_is_acknowledged_after_ready_and_the_metrics(self, tmp_path: Path) -> None:
        """RELOADING=1, the metrics current, READY=1, then reload.json: applied, this PID, begun at RELOADING."""
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        daemon = self.daemon(tmp_path, str(run), [Config(state_dir=str(tmp_path / "state"), runtime_dir=str(run))])
        daemon.notifier.sent.clear()
        assert dict(daemon.published.config_reloads) == {}  # published now: only a republish can show the reload
        before = monotonic_us()
        assert daemon.reload()
        assert daemon.notifier.sent == [("RELOADING=1", False), ("READY=1", False)]
        ack = read_ack(run / ACK_FILE)
        assert (ack.pid, ack.reload, ack.applied) == (os.getpid(), 1, True)
        assert before <= ack.began_monotonic_us <= monotonic_us()
        assert oct((run / ACK_FILE).stat().st_mode & 0o777) == oct(0o600)
        assert dict(daemon.published.config_reloads) == {"success": 1}, "published before the acknowledgement"

    def test_a_refused_reload_is_acknowledged_with_its_errors(self, tmp_path: Path) -> None:
        """A file the governor cannot follow is refused: reload.json says refused, with the daemon's error lines."""
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        daemon = self.daemon(tmp_path, str(run), [Config(state_dir=str(tmp_path / "state"), runtime_dir=str(run))])
        daemon.config_path = tmp_path / "missing.toml"
        daemon._load = load_config  # the real loader, on a file that is not there
        assert dict(daemon.published.config_reloads) == {}  # published now: only a republish can show the reload
        assert not daemon.reload()
        ack = read_ack(run / ACK_FILE)
        assert not ack.applied and ack.pid == os.getpid()
        assert any(str(tmp_path / "missing.toml") in line for line in ack.errors), ack.errors
        assert dict(daemon.published.config_reloads) == {"failure": 1}
        assert daemon.notifier.sent[-1] == ("READY=1", False), "READY=1 goes before the acknowledgement"

    def test_without_a_runtime_dir_nothing_is_written(self, tmp_path: Path) -> None:
        """runtime_dir empty (a what-if run): no acknowledgement, no error, the reload applies."""
        daemon = self.daemon(tmp_path, "", [Config(state_dir=str(tmp_path / "state"), runtime_dir="")])
        with capture_logs() as logs:
            assert daemon.reload()
        assert not [e for e in logs if e["event"] == "reload_ack_failed"]
        assert not (tmp_path / ACK_FILE).exists()

    def test_an_unwritable_acknowledgement_is_a_warning_and_the_reload_stands(self, tmp_path: Path) -> None:
        """runtime_dir turned into a file: reload_ack_failed (warning) names the path; the new config is in force."""
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        new = Config(state_dir=str(tmp_path / "state"), runtime_dir=str(run), poll_interval_s=2.0)
        daemon = self.daemon(tmp_path, str(run), [new])
        shutil.rmtree(run)  # processes.json is there too
        run.write_text("not a directory")
        with capture_logs() as logs:
            assert daemon.reload()
        failed = [e for e in logs if e["event"] == "reload_ack_failed"]
        assert failed and failed[0]["log_level"] == "warning" and failed[0]["path"] == str(run / ACK_FILE)
        assert daemon.config.poll_interval_s == 2.0

    def test_a_missing_runtime_dir_is_only_a_debug_event(self, tmp_path: Path) -> None:
        """The runtime directory gone (outside systemd, nobody made one): reload_ack_failed at debug level only."""
        run = tmp_path / "run"
        run.mkdir(mode=0o700)
        daemon = self.daemon(tmp_path, str(run), [Config(state_dir=str(tmp_path / "state"), runtime_dir=str(run))])
        shutil.rmtree(run)  # processes.json is there too
        with capture_logs() as logs:
            assert daemon.reload()
        assert [e["log_level"] for e in logs if e["event"] == "reload_ack_failed"] == ["debug"]

    def test_a_sighup_while_the_file_settles_gets_a_reload_of_its_own(self, tmp_path: Path) -> None:
        """A RELOAD that arrives during the settle wait is queued again when it ends, not swallowed."""
        clock = VirtualClock()
        path = tmp_path / "governor.toml"
        path.write_text("x = 1\n")  # just written: the reload waits for it to settle

        class SighupOnce(VirtualWaiter):
            def __init__(self) -> None:
                super().__init__(clock)
                self.sent = False

            def wait(self, deadline_s: float) -> list[str]:
                if not self.sent:
                    self.sent = True
                    clock.advance_to(deadline_s)
                    return [RELOAD]
                return super().wait(deadline_s)

        waiter = SighupOnce()
        assert settle(path, clock, waiter, settle_s=0.5, max_s=5.0)
        assert waiter.wait(clock.monotonic() + 1.0) == [RELOAD]

    def test_a_settle_without_a_sighup_queues_nothing(self, tmp_path: Path) -> None:
        """No SIGHUP while settling: nothing is queued (no reload loop)."""
        clock = VirtualClock()
        path = tmp_path / "governor.toml"
        path.write_text("x = 1\n")
        waiter = VirtualWaiter(clock)
        assert settle(path, clock, waiter, settle_s=0.5, max_s=5.0)
        assert waiter.wait(clock.monotonic() + 1.0) == []


# --------------------------------------------------------------------------- against the real daemon


def config_text(tmp_path: Path, step_down_at_c: float, runtime_dir: bool = True) -> str:
    """A valid config; its step_down_at_c shows in the config_reloaded event of the reload that read it."""
    run = f'runtime_dir = "{tmp_path}/run"\n' if runtime_dir else ""
    return f'state_dir = "{tmp_path}/state"\n{run}poll_interval_s = 0.2\n[power]\nstep_down_at_c = {step_down_at_c}\n'


class RealDaemon:
    """``gpu-governor run --simulate`` as a real process, its runtime_dir under ``tmp_path``."""

    def __init__(self, tmp_path: Path, environ: dict[str, str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.runtime_dir = environ is None  # under "systemd" (environ) the config names none, as the e2e tests'
        (tmp_path / "run").mkdir(mode=0o700)
        self.path = tmp_path / "governor.toml"
        self.write(75.0)
        self.port = free_port()
        self.log = (tmp_path / "daemon.log").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(self.path),
             "--listen", f"127.0.0.1:{self.port}", "--log-format", "json"],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(environ or {})},
        )  # fmt: skip
        try:
            wait_for(lambda: "gpu_governor_ready 1" in scrape(self.port, 5.0), 60, "the daemon to be ready")
        except BaseException:
            self.proc.kill()
            self.close()
            raise

    def write(self, step_down_at_c: float, settled: bool = True) -> None:
        self.path.write_text(config_text(self.tmp_path, step_down_at_c, self.runtime_dir))
        if settled:
            os.utime(self.path, (time.time() - 5, time.time() - 5))

    def reloads(self, result: str) -> float:
        found = re.search(rf'gpu_governor_config_reloads_total\{{result="{result}"\}} (\S+)', scrape(self.port, 10.0))
        return 0.0 if found is None else float(found.group(1))

    def applied(self) -> list[float]:
        """The step_down_at_c of every config_reloaded event so far, in order."""
        self.log.flush()
        lines = (self.tmp_path / "daemon.log").read_text().splitlines()
        events = [json.loads(line) for line in lines if line.startswith("{")]
        return [e["step_down_at_c"] for e in events if e.get("event") == "config_reloaded"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def real(tmp_path: Path) -> Iterator[RealDaemon]:
    daemon = RealDaemon(tmp_path)
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
        daemon.log.close()


class TestAgainstTheRealDaemon:
    def test_applied_then_refused_and_the_metrics_are_current_on_return(self, real: RealDaemon, tmp_path: Path) -> None:
        """exit 0, the success counted as it returns; a broken file: exit 3 naming the key, the failure counted."""
        success = real.reloads("success")
        real.write(74.0)
        assert reload(real.proc.pid, tmp_path / "run") == (EXIT_OK, "")
        assert real.reloads("success") == success + 1
        failure = real.reloads("failure")
        real.path.write_text(config_text(tmp_path, 74.0) + 'step_up_at_c = "warm"\n')
        code, err = reload(real.proc.pid, tmp_path / "run")
        assert code == EXIT_CONFIG
        assert f"gpu-governor: config error: {real.path}" in err
        assert real.reloads("failure") == failure + 1
        assert real.proc.poll() is None

    def test_a_reload_asked_for_while_another_settles_reads_the_newer_file(
        self, real: RealDaemon, tmp_path: Path
    ) -> None:
        """A SIGHUP while another's reload settles: the command returns after a reload that read its file (72)."""
        stop = threading.Event()

        def toucher() -> None:  # the file keeps changing for 1.5 s: the first reload waits
            end = time.monotonic() + 1.5
            while time.monotonic() < end and not stop.is_set():
                os.utime(real.path)
                time.sleep(0.05)

        real.write(73.0, settled=False)
        thread = threading.Thread(target=toucher)
        thread.start()
        try:
            real.proc.send_signal(signal.SIGHUP)  # someone else's reload
            time.sleep(0.3)
            real.write(72.0, settled=False)
            assert reload(real.proc.pid, tmp_path / "run") == (EXIT_OK, "")
            assert real.applied()[-1] == 72.0
            assert read_ack(tmp_path / "run" / ACK_FILE).reload >= 2
        finally:
            stop.set()
            thread.join()

    def test_a_simulation_under_systemd_acknowledges_in_its_runtime_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`run --simulate` keeps runtime_dir private, yet under systemd the command finds its acknowledgement."""
        unit_dir = tmp_path / "run"
        daemon = RealDaemon(tmp_path, {"RUNTIME_DIRECTORY": str(unit_dir)})
        try:
            monkeypatch.setenv("RUNTIME_DIRECTORY", str(unit_dir))
            daemon.write(74.0)
            assert reload(daemon.proc.pid, None) == (EXIT_OK, "")
            assert daemon.applied() == [74.0]
        finally:
            daemon.close()

    def test_commands_during_a_sighup_storm_each_get_a_reload(self, real: RealDaemon, tmp_path: Path) -> None:
        """Four commands at once while 100 other SIGHUPs arrive: each exits 0; the daemon lives."""
        stop = threading.Event()
        codes: list[int] = []

        def storm() -> None:
            for _ in range(100):
                if stop.is_set():
                    return
                real.proc.send_signal(signal.SIGHUP)
                time.sleep(0.01)

        def command() -> None:
            codes.append(reload(real.proc.pid, tmp_path / "run")[0])

        threads = [threading.Thread(target=storm), *(threading.Thread(target=command) for _ in range(4))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        stop.set()
        assert codes == [EXIT_OK] * 4
        assert real.proc.poll() is None
