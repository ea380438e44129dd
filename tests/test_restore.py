"""`gpu-governor restore`: what a governor that did not stop cleanly left changed is put back, with no daemon running.

The GPUs are the fake NVML (tests/fake_pynvml.py) behind the real NvmlBackend: a governor lowers a hot
card's limit and takes its fans, then "crashes" (it is dropped without its stop), and the command
runs through ``governor.cli.main`` as a person or the unit's ``ExecStopPost=`` would. The last
class runs the real daemon as a child on the simulated backend and kills it with SIGKILL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor import cli
from governor import units as units_module
from governor.backends import Backend
from governor.backends.nvml import NvmlBackend
from governor.clock import RealClock, VirtualClock
from governor.config import Config, FanMode, FanPolicy, PowerPolicy
from governor.core import Governor
from governor.errors import EXIT_BUSY, EXIT_NO_DRIVER, EXIT_NOT_RESTORED, EXIT_OK, StateDirBusy
from governor.fanstate import FAN_STATE_FILE_NAME
from governor.restore import restore_leftovers, service_context
from governor.rules.units import PRESSURE, StoppedUnit
from governor.state import STATE_FILE_NAME, OriginalLimits
from governor.statelock import LOCK_FILE_NAME, hold_for_daemon, try_lock
from governor.units import SystemdUnits, UnitCall
from governor.unitstate import FILE_NAME as STOPPED_UNITS_FILE
from governor.unitstate import StoppedUnitsStore
from governor.waiting import STOP, VirtualWaiter
from tests.fake_pynvml import NVML_ERROR_DRIVER_NOT_LOADED, FakeGpu, FakeNvml
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[1]
UUID0 = "GPU-00000000-0000-0000-0000-000000000000"
DEFAULT_MW = 200_000
POWER = PowerPolicy(ladder_w=("100%", "90%"), min_change_interval_s=0.0, debounce_samples=1)
CURVE = FanPolicy(mode=FanMode.CURVE, max_percent=75.0)


def hot_card(**fields: Any) -> FakeGpu:
    """A hot two-fan consumer card (200 W default, range 100-220 W) whose fans the card runs at 45 %."""
    values: dict[str, Any] = {
        "uuid": UUID0,
        "name": "NVIDIA GeForce RTX 4070",
        "temperature_c": 84,
        "enforced_limit_mw": DEFAULT_MW,
        "requested_limit_mw": DEFAULT_MW,
        "limit_min_mw": 100_000,
        "limit_max_mw": 220_000,
        "limit_default_mw": DEFAULT_MW,
        "fans": [45, 45],
    }
    values.update(fields)
    return FakeGpu(**values)


def crash_after_changes(state: Path, nvml: FakeNvml) -> None:
    """A governor on ``nvml`` lowers the card's limit and sets its fans by hand, then is dropped without its
    stop, as a process killed with SIGKILL would be: the changes stay on the card and in ``state``."""
    clock = VirtualClock()
    backend = NvmlBackend(clock, nvml=nvml, telemetry_refresh_s=1.0)
    config = Config(state_dir=str(state), runtime_dir="", power=POWER, fan=CURVE)
    governor = Governor(config, backend, OriginalLimits(state))
    gpu = nvml.gpus[0]
    for t in range(1, 30):
        clock.advance_to(float(t))
        governor.step(governor.read(), clock.wall())
        if gpu.enforced_limit_mw < DEFAULT_MW and gpu.fan_policies:
            return
    raise AssertionError(f"the governor changed nothing: limit {gpu.enforced_limit_mw} mW, fans {gpu.fan_policies}")


def write_config(tmp_path: Path, state: Path, extra: str = "") -> Path:
    """A root-owned 0644 config naming ``state`` and logging JSON lines."""
    path = tmp_path / "governor.toml"
    path.write_text(f'state_dir = "{state}"\nruntime_dir = ""\n{extra}\n[logging]\nformat = "json"\n')
    path.chmod(0o644)
    return path


def run_restore(config: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, list[dict[str, Any]], str]:
    """``gpu-governor restore --config CONFIG FLAGS``: its exit code, JSON log events and other stderr lines."""
    code = cli.main(["restore", "--config", str(config), *flags])
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    other = "\n".join(line for line in err.splitlines() if not line.startswith("{"))
    return code, events, other


def files(state: Path) -> dict[str, bytes]:
    """Every file of the state directory but the lock, by name, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(state.iterdir()) if p.is_file() and p.name != LOCK_FILE_NAME}


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """The fake NVML with one hot card, installed as ``pynvml`` for the command's own NvmlBackend."""
    fake = FakeNvml([hot_card()])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


class TestRestoresWhatACrashLeft:
    def test_puts_back_the_lowered_limit_and_the_fans_and_clears_them(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """After a crash the card is back at 200 W with both fans under its own control, both entries are
        cleared as the daemon's restore clears them, each step is logged, and the exit code is 0."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        gpu = nvml.gpus[0]
        lowered_w = gpu.enforced_limit_mw / 1000
        code, events, other = run_restore(write_config(tmp_path, state), capsys)
        assert (code, other) == (EXIT_OK, "")
        assert gpu.enforced_limit_mw == DEFAULT_MW and gpu.fan_policies == {} and gpu.fans == [45, 45]
        assert json.loads((state / STATE_FILE_NAME).read_text())["original_power_limits_w"] == {}
        assert json.loads((state / FAN_STATE_FILE_NAME).read_text())["manual_fans"] == {}
        limit = [e for e in events if e["event"] == "power_limit_restored"]
        assert [(e["uuid"], e["from_w"], e["to_w"], e["outcome"], e["rule"]) for e in limit] == [
            (UUID0, lowered_w, 200.0, "applied", "restore_after_crash")
        ]
        fans = [(e["fan"], e["outcome"]) for e in events if e["event"] == "fan_control_restored"]
        assert fans == [(0, "applied"), (1, "applied")]
        (done,) = [e for e in events if e["event"] == "restore_finished"]
        assert (done["restored"], done["unchanged"]) == (3, 0)

    def test_a_second_run_finds_nothing_and_opens_no_driver(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Once restored (or after a clean stop) the command touches no GPU: NVML is not even initialised;
        --quiet then logs nothing at all, as the unit's ExecStopPost= does."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        config = write_config(tmp_path, state)
        assert run_restore(config, capsys)[0] == EXIT_OK
        inits = nvml.calls["nvmlInit"]
        code, events, _ = run_restore(config, capsys)
        assert code == EXIT_OK and [e["event"] for e in events] == ["restore_nothing_recorded"]
        code, events, other = run_restore(config, capsys, "--quiet")
        assert (code, events, other) == (EXIT_OK, [], "")
        assert nvml.calls["nvmlInit"] == inits

    def test_a_gpu_that_is_gone_stays_recorded_and_exits_11(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A recorded GPU the driver no longer lists cannot be put back: its entry is kept for the next
        start, restore_incomplete names it, and the exit code is 11."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        nvml.gpus[0] = hot_card(uuid="GPU-11111111-1111-1111-1111-111111111111")  # another card in its slot
        code, events, _ = run_restore(write_config(tmp_path, state), capsys)
        assert code == EXIT_NOT_RESTORED
        assert UUID0 in json.loads((state / STATE_FILE_NAME).read_text())["original_power_limits_w"]
        assert UUID0 in json.loads((state / FAN_STATE_FILE_NAME).read_text())["manual_fans"]
        (incomplete,) = [e for e in events if e["event"] == "restore_incomplete"]
        assert any(UUID0 in left for left in incomplete["left"]) and "GPU not present" in incomplete["detail"]

    def test_without_a_driver_exits_4_and_keeps_everything(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Something recorded but no NVIDIA driver: exit 4, one line saying nothing was restored, files untouched."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        before = files(state)
        nvml.init_error = NVML_ERROR_DRIVER_NOT_LOADED
        code, _, other = run_restore(write_config(tmp_path, state), capsys)
        assert code == EXIT_NO_DRIVER and "nothing restored" in other
        assert files(state) == before


class TestCorruptStateFiles:
    @pytest.mark.parametrize("kind", ["garbage", "fifo"])
    def test_a_bad_file_is_set_aside_and_every_gpu_is_put_back(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str], kind: str
    ) -> None:
        """Unreadable state files (garbage, a FIFO) never crash the command: each is kept as .corrupt with a
        warning, and, as at a start, the card below its default gets the default back and its fans go back."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        for name in (STATE_FILE_NAME, FAN_STATE_FILE_NAME):
            (state / name).unlink()
            if kind == "fifo":
                os.mkfifo(state / name)
            else:
                (state / name).write_bytes(b'{"version": 2, "original_power_limits_w": {"GPU-x": "lots"')
        gpu = nvml.gpus[0]
        assert gpu.enforced_limit_mw < DEFAULT_MW and gpu.fan_policies
        code, events, other = run_restore(write_config(tmp_path, state), capsys)
        assert (code, other) == (EXIT_OK, "")
        assert gpu.enforced_limit_mw == DEFAULT_MW and gpu.fan_policies == {}
        names = {e["event"] for e in events}
        assert {"state_unreadable", "fan_state_unreadable", "power_limit_restored", "restore_finished"} <= names
        assert (state / (STATE_FILE_NAME + ".corrupt")).exists()
        assert (state / (FAN_STATE_FILE_NAME + ".corrupt")).exists()


class TestRefusesWhileADaemonRuns:
    def test_a_held_state_directory_is_left_alone_with_exit_10(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """While another process holds governor.lock the command changes nothing, opens no driver,
        names the holder's PID and exits 10; once the lock is free it restores."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        before, inits = files(state), nvml.calls["nvmlInit"]
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from governor.statelock import try_lock\n"
             f"lock = try_lock({str(state)!r}); print('held', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            code, events, other = run_restore(write_config(tmp_path, state), capsys)
            assert code == EXIT_BUSY and events == []
            assert f"held by gpu-governor process {holder.pid}" in other and "nothing restored" in other
            assert files(state) == before and nvml.calls["nvmlInit"] == inits
            assert nvml.gpus[0].enforced_limit_mw < DEFAULT_MW
        finally:
            holder.kill()
            holder.wait(10)
        assert run_restore(write_config(tmp_path, state), capsys)[0] == EXIT_OK
        assert nvml.gpus[0].enforced_limit_mw == DEFAULT_MW


class TestDryRun:
    @pytest.mark.parametrize("how", ["flag", "config"])
    def test_says_what_it_would_put_back_and_changes_nothing(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str], how: str
    ) -> None:
        """--dry-run, or dry_run = true in the config: the would-set events for the limit and both fans, the
        card and the state files exactly as the crash left them, exit 0."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        gpu = nvml.gpus[0]
        limit_mw, policies = gpu.enforced_limit_mw, dict(gpu.fan_policies)
        before = files(state)
        config = write_config(tmp_path, state, "dry_run = true" if how == "config" else "")
        code, events, _ = run_restore(config, capsys, *(["--dry-run"] if how == "flag" else []))
        assert code == EXIT_OK
        assert (gpu.enforced_limit_mw, gpu.fan_policies) == (limit_mw, policies)
        assert files(state) == before
        would = [(e["event"], e.get("to_w"), e.get("fan")) for e in events if e["event"].endswith("_would_set")]
        assert would == [("power_limit_would_set", 200.0, None), ("fan_would_set", None, 0), ("fan_would_set", None, 1)]
        (done,) = [e for e in events if e["event"] == "restore_dry_run_finished"]
        assert done["would"] == 3

    def test_a_card_already_at_its_original_keeps_its_record(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A dry run clears no record, not even of a card already back at its original (found on the H200:
        the dry run emptied original-limits.json); the live run then clears it, writing nothing."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        gpu = nvml.gpus[0]
        gpu.enforced_limit_mw = DEFAULT_MW  # someone put the original back by hand
        before = files(state)
        code, events, _ = run_restore(write_config(tmp_path, state, "dry_run = true"), capsys)
        assert code == EXIT_OK and files(state) == before
        (limit,) = [e for e in events if e["event"] == "power_limit_restored"]
        assert limit["outcome"] == "unchanged"
        code, _, _ = run_restore(write_config(tmp_path, state), capsys)
        assert code == EXIT_OK and gpu.enforced_limit_mw == DEFAULT_MW
        assert json.loads((state / STATE_FILE_NAME).read_text())["original_power_limits_w"] == {}


class TestWithoutABackend:
    def test_nothing_recorded_opens_no_backend(self, tmp_path: Path) -> None:
        """An empty or missing state directory, or a simulation whose state lives in memory, ends at once
        without opening the backend."""

        def never(config: Config) -> Backend:
            raise AssertionError("the backend was opened")

        for config in (
            Config(state_dir=str(tmp_path / "missing"), runtime_dir=""),
            Config(state_dir=str(tmp_path), runtime_dir=""),
            Config(state_dir=str(tmp_path), runtime_dir="", backend="simulated"),
        ):
            with capture_logs() as logs:
                assert restore_leftovers(config, never, RealClock(), _logger()) == EXIT_OK
            assert [e["event"] for e in logs] == ["restore_nothing_recorded"], config

    def test_systemd_context_is_kept_bounded_and_only_as_text(self) -> None:
        """SERVICE_RESULT, EXIT_CODE and EXIT_STATUS are taken as logged context, cut to 64 characters."""
        got = service_context({"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "K" * 500, "X": "y"})
        assert got == {"service_result": "signal", "exit_code": "killed", "exit_status": "K" * 64}


UNIT_CLASSES = """
[[class]]
name = "secondary"
budget = "3GiB"
priority = 50
action = "stop-unit"
resume = true
match = { slice = "system.slice", unit = "comfyui.service" }

[[class]]
name = "batch"
budget = "2GiB"
priority = 40
action = "stop-unit"
match = { slice = "system.slice", unit = "batch.service" }
"""
"""Two stop-unit classes: comfyui.service is resumed by the governor once there is room, batch.service never."""


def stop_units(state: Path) -> bytes:
    """Record comfyui.service and batch.service as stopped by the governor (its own store); the file's bytes."""
    state.mkdir(exist_ok=True)
    StoppedUnitsStore(state).save(
        {
            unit: StoppedUnit(unit, klass, PRESSURE, (UUID0,), 1_700_000_000.0, 60.0)
            for unit, klass in (("comfyui.service", "secondary"), ("batch.service", "batch"))
        }
    )
    return (state / STOPPED_UNITS_FILE).read_bytes()


@pytest.fixture
def systemd_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every StartUnit/StopUnit on the real system-bus manager, and every bus connection, recorded and refused."""
    calls: list[tuple[str, str]] = []

    def refused(verb: str) -> Any:
        def call(self: SystemdUnits, unit: str) -> UnitCall:
            calls.append((verb, unit))
            return UnitCall(False, error="refused by the test")

        return call

    def connect(address: str | None) -> Any:
        calls.append(("connect", str(address)))
        raise ConnectionRefusedError("no bus in this test")

    monkeypatch.setattr(SystemdUnits, "start_unit", refused("start"))
    monkeypatch.setattr(SystemdUnits, "stop_unit", refused("stop"))
    monkeypatch.setattr(units_module, "_connect_system_bus", connect)
    return calls


class TestUnitsTheGovernorStopped:
    def test_are_named_and_left_stopped_when_nothing_else_is_recorded(
        self,
        tmp_path: Path,
        nvml: FakeNvml,
        capsys: pytest.CaptureFixture[str],
        systemd_calls: list[tuple[str, str]],
    ) -> None:
        """A crash that changed no limit but left two units stopped: restore opens no driver, starts no unit, keeps
        the list for the next start and says so (units_left_stopped, warning), naming which one the next start
        resumes; before, it said only that nothing was recorded."""
        state = tmp_path / "state"
        before = stop_units(state)
        inits = nvml.calls["nvmlInit"]
        code, events, other = run_restore(write_config(tmp_path, state, UNIT_CLASSES), capsys)
        assert (code, other) == (EXIT_OK, "")
        assert systemd_calls == [] and nvml.calls["nvmlInit"] == inits
        assert (state / STOPPED_UNITS_FILE).read_bytes() == before
        (left,) = [e for e in events if e["event"] == "units_left_stopped"]
        assert left["level"] == "warning" and left["units"] == ["batch.service", "comfyui.service"]
        assert left["effect"].startswith("gpu-governor restore starts no unit")
        assert "the next start of the governor resumes comfyui.service when there is room" in left["effect"]
        assert "batch.service: its class does not resume it" in left["effect"]

    @pytest.mark.parametrize("dry_run", [False, True])
    def test_are_left_stopped_beside_a_restored_limit(
        self,
        tmp_path: Path,
        nvml: FakeNvml,
        capsys: pytest.CaptureFixture[str],
        systemd_calls: list[tuple[str, str]],
        dry_run: bool,
    ) -> None:
        """With a lowered limit recorded too: the limit is put back (or, in a dry run, would be), the units are
        named once, none is started and their list is unchanged either way."""
        state = tmp_path / "state"
        crash_after_changes(state, nvml)
        before = stop_units(state)
        flags = ["--dry-run"] if dry_run else []
        code, events, _ = run_restore(write_config(tmp_path, state, UNIT_CLASSES), capsys, *flags)
        assert code == EXIT_OK and systemd_calls == []
        assert (nvml.gpus[0].enforced_limit_mw < DEFAULT_MW) is dry_run
        assert (state / STOPPED_UNITS_FILE).read_bytes() == before
        names = [e["event"] for e in events]
        assert names.count("units_left_stopped") == 1
        assert names[-1] == ("restore_dry_run_finished" if dry_run else "restore_finished")

    @pytest.mark.parametrize(("result", "said"), [("success", False), ("signal", True), (None, True)])
    def test_quiet_names_them_unless_systemd_saw_a_clean_stop(
        self,
        tmp_path: Path,
        nvml: FakeNvml,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
        result: str | None,
        said: bool,
    ) -> None:
        """--quiet (ExecStopPost=): after a clean stop (SERVICE_RESULT=success, the daemon named the units itself)
        nothing is logged; after a killed run (signal), or run by hand with --quiet, the units are named."""
        state = tmp_path / "state"
        stop_units(state)
        if result is None:
            monkeypatch.delenv("SERVICE_RESULT", raising=False)
        else:
            monkeypatch.setenv("SERVICE_RESULT", result)
        code, events, other = run_restore(write_config(tmp_path, state, UNIT_CLASSES), capsys, "--quiet")
        assert (code, other) == (EXIT_OK, "")
        assert [e["event"] for e in events] == (["units_left_stopped"] if said else [])

    def test_a_daemon_holding_the_state_directory_gets_exit_10_and_no_report(
        self, tmp_path: Path, nvml: FakeNvml, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The lock comes first: while held, exit 10 and not a word about the units the daemon governs."""
        state = tmp_path / "state"
        before = stop_units(state)
        held = try_lock(state)
        try:
            code, events, _ = run_restore(write_config(tmp_path, state, UNIT_CLASSES), capsys)
        finally:
            held.release()
        assert (code, events) == (EXIT_BUSY, [])
        assert (state / STOPPED_UNITS_FILE).read_bytes() == before


class TestStateLock:
    def test_the_lock_file_is_never_followed_through_a_symlink(self, tmp_path: Path) -> None:
        """A planted governor.lock symlink is refused (OSError), and its target is not created."""
        (tmp_path / LOCK_FILE_NAME).symlink_to(tmp_path / "target")
        with pytest.raises(OSError, match="symbolic link"):
            try_lock(tmp_path)
        assert not (tmp_path / "target").exists()

    def test_a_second_holder_is_refused_until_the_first_lets_go(self, tmp_path: Path) -> None:
        """try_lock while held raises StateDirBusy (exit 10) naming this PID; after release it succeeds."""
        first = try_lock(tmp_path)
        with pytest.raises(StateDirBusy) as busy:
            try_lock(tmp_path)
        assert busy.value.exit_code == EXIT_BUSY and busy.value.holder_pid == os.getpid()
        first.release()
        try_lock(tmp_path).release()

    def test_a_starting_daemon_waits_then_refuses_with_exit_10(self, tmp_path: Path) -> None:
        """A daemon whose state directory stays held logs state_dir_busy once, then raises StateDirBusy."""
        config = Config(state_dir=str(tmp_path / "state"), runtime_dir="")
        held = try_lock(tmp_path / "state", create_dir=True)
        clock = VirtualClock()
        try:
            with capture_logs() as logs, pytest.raises(StateDirBusy) as busy:
                hold_for_daemon(config, VirtualWaiter(clock), clock, _logger(), wait_s=5.0)
        finally:
            held.release()
        assert busy.value.exit_code == EXIT_BUSY and "for more than 5 s" in str(busy.value)
        assert [e["event"] for e in logs] == ["state_dir_busy"] and clock.monotonic() >= 5.0

    def test_a_stop_while_waiting_ends_the_wait(self, tmp_path: Path) -> None:
        """SIGTERM during the wait: no lock, ``stopped``, so the daemon exits 0 without starting."""
        config = Config(state_dir=str(tmp_path / "state"), runtime_dir="")
        held = try_lock(tmp_path / "state", create_dir=True)
        clock = VirtualClock()
        waiter = VirtualWaiter(clock)
        waiter.put(STOP)
        try:
            hold = hold_for_daemon(config, waiter, clock, _logger(), wait_s=60.0)
        finally:
            held.release()
        assert hold.stopped and hold.lock is None

    def test_a_free_state_directory_is_held_until_released(self, tmp_path: Path) -> None:
        """hold_for_daemon takes the lock of a free state directory (creating it) and keeps it until released."""
        config = Config(state_dir=str(tmp_path / "state"), runtime_dir="")
        clock = VirtualClock()
        with hold_for_daemon(config, VirtualWaiter(clock), clock, _logger()) as hold:
            assert hold.lock is not None and not hold.stopped
            with pytest.raises(StateDirBusy):
                try_lock(tmp_path / "state")
        try_lock(tmp_path / "state").release()


def _logger() -> Any:
    import structlog

    return structlog.get_logger()


# ------------------------------------------------------------------------- the real daemon, killed


SIM_UUID = "GPU-sim-rtx4070-0"


@pytest.fixture
def daemon_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(20)


def hardware(tmp_path: Path) -> dict[str, Any]:
    """The simulated card's "hardware": its power limits and the fans it runs by hand."""
    path = tmp_path / "state" / "hw.json"
    return json.loads(path.read_text()) if path.exists() else {}


class TestAfterSigkill:
    def test_restore_refuses_while_the_daemon_runs_and_restores_after_kill_9(
        self, tmp_path: Path, daemon_procs: list[subprocess.Popen[bytes]]
    ) -> None:
        """The real daemon on a hot simulated card lowers its limit and takes its fans; `restore` refuses
        (exit 10) while it runs; after SIGKILL `restore --simulate` puts the limit and the fans back (exit 0)."""
        state = tmp_path / "state"
        config = tmp_path / "sim.toml"
        config.write_text(
            f'state_dir = "{state}"\nruntime_dir = ""\npoll_interval_s = 0.1\n'
            f'[metrics]\nenabled = false\n[simulation]\nscenario = "hot"\ntime_scale = 20.0\n'
            f'state_file = "{state / "hw.json"}"\n[fan]\nmode = "curve"\nmax_percent = 75.0\n'
            '[logging]\nformat = "json"\n'
        )
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        command = [sys.executable, "-m", "governor"]
        daemon = subprocess.Popen(
            [*command, "run", "--simulate", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=env,
        )  # fmt: skip
        daemon_procs.append(daemon)

        def changed() -> bool:
            hw = hardware(tmp_path)
            return hw.get("power_limits_w", {}).get(SIM_UUID, 200.0) < 200.0 and SIM_UUID in hw.get(
                "manual_fans_percent", {}
            )

        wait_for(changed, 60, "the daemon to lower the limit and take the fans")
        restore = [*command, "restore", "--simulate", "--config", str(config)]
        refused = subprocess.run(restore, capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False)
        assert refused.returncode == EXIT_BUSY, refused.stderr
        assert f"process {daemon.pid}" in refused.stderr
        daemon.kill()
        daemon.wait(20)
        lowered = hardware(tmp_path)
        assert lowered["power_limits_w"][SIM_UUID] < 200.0 and SIM_UUID in lowered["manual_fans_percent"]
        done = subprocess.run(restore, capture_output=True, text=True, cwd=REPO, env=env, timeout=60, check=False)
        assert done.returncode == EXIT_OK, done.stderr
        hw = hardware(tmp_path)
        assert hw["power_limits_w"][SIM_UUID] == 200.0 and "manual_fans_percent" not in hw
        events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
        assert events.count("fan_control_restored") == 2 and "power_limit_restored" in events
        assert json.loads((state / STATE_FILE_NAME).read_text())["original_power_limits_w"] == {}
