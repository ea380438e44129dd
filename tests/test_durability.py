"""Issue 12, items 4, 5 and 7: the original limit is never lost, bad state files never stop the start,
temporary files never follow a planted symlink, and others-writable state directories are refused as root."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.actuator import Actuator
from governor.backends.simulated import SimulatedBackend
from governor.clock import VirtualClock
from governor.config import Config, ConfigError, SimulationConfig
from governor.daemon import Daemon, check_state_dirs
from governor.model import Action, Decision, GpuInfo, Outcome, Rule
from governor.notify import Notifier
from governor.safefile import MAX_STATE_BYTES, UnusableFile, read_bounded, read_json, write_atomic
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.state import STATE_FILE_NAME, OriginalLimits
from tests.builders import StopAt
from tests.helpers import CARD_200W, RecordingBackend, reading, snapshot
from tests.scripted import ScriptedBackend
from tests.support import free_port, scrape, wait_for

REPO = Path(__file__).resolve().parents[1]
SIM_UUID = "GPU-sim-rtx4070-0"
LIMIT_METRIC = f'gpu_governor_gpu_power_limit_watts{{gpu="0",uuid="{SIM_UUID}"}}'
SAVED_METRIC = f'gpu_governor_gpu_original_limit_saved{{gpu="0",uuid="{SIM_UUID}"}}'
CORRUPT = STATE_FILE_NAME + ".corrupt"


def need_root(what: str) -> None:
    """Skip when not root, unless CI demands system tests (GG_REQUIRE_SYSTEM_TESTS), where it fails."""
    if os.geteuid() == 0:
        return
    if os.environ.get("GG_REQUIRE_SYSTEM_TESTS"):
        pytest.fail(f"{what} needs root, and GG_REQUIRE_SYSTEM_TESTS is set")
    pytest.skip(f"{what} needs root")


def set_to(watts: float, gpu: GpuInfo = CARD_200W) -> Decision:
    """A decision asking for ``watts`` on ``gpu``."""
    return Decision(1.0, gpu.index, gpu.uuid, Rule.POWER_STEP_DOWN, Action.SET_POWER_LIMIT, "test", to_w=watts)


def write_state(state_dir: Path, text: str) -> None:
    """Put ``text`` as the originals file in ``state_dir``."""
    state_dir.mkdir(exist_ok=True)
    (state_dir / STATE_FILE_NAME).write_text(text)


def finishes(action: Callable[[], object], within_s: float = 10.0) -> object:
    """Run ``action`` on a thread and fail the test if it has not returned within ``within_s`` (a FIFO would block)."""
    box: list[object] = []
    thread = threading.Thread(target=lambda: box.append(action()), daemon=True)
    thread.start()
    thread.join(within_s)
    assert not thread.is_alive(), f"still running after {within_s} s"
    assert box, "raised instead of returning"
    return box[0]


# ----------------------------------------------------------------------------- hostile files


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _huge_int(path: Path) -> None:
    path.write_text('{"original_power_limits_w": {"GPU-a": ' + "9" * 5000 + "}}")


def _overflowing_int(path: Path) -> None:
    path.write_text('{"original_power_limits_w": {"GPU-a": 1' + "0" * 400 + "}}")


def _deep(path: Path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


def _oversized(path: Path) -> None:
    path.write_text(" " * (MAX_STATE_BYTES + 1) + "{}")


def _directory(path: Path) -> None:
    path.mkdir()


HOSTILE: dict[str, Callable[[Path], None]] = {
    "fifo": _fifo,
    "symlink_to_dev_zero": _dev_zero,
    "huge_int": _huge_int,
    "overflowing_int": _overflowing_int,
    "deep_nesting": _deep,
    "oversized": _oversized,
    "directory": _directory,
}


class TestSafeFile:
    @pytest.mark.parametrize("case", sorted(set(HOSTILE) - {"overflowing_int"}))  # that one is valid JSON
    def test_hostile_file_is_refused_quickly(self, tmp_path: Path, case: str) -> None:
        """Each hostile file is refused by read_json within seconds with an UnusableFile naming it."""
        path = tmp_path / "state.json"
        HOSTILE[case](path)

        def attempt() -> str:
            try:
                read_json(path)
            except UnusableFile as exc:
                return str(exc)
            return "accepted"

        message = finishes(attempt)
        assert message != "accepted"
        assert str(path) in str(message)

    def test_missing_file_is_file_not_found(self, tmp_path: Path) -> None:
        """A missing file raises FileNotFoundError, not UnusableFile: the caller treats it as empty."""
        with pytest.raises(FileNotFoundError):
            read_bounded(tmp_path / "nothing")

    def test_write_atomic_makes_a_private_regular_file(self, tmp_path: Path) -> None:
        """write_atomic leaves exactly one regular 0600 file with the content, and no temporary file."""
        target = tmp_path / "x.json"
        write_atomic(target, b"one")
        write_atomic(target, b"two")
        info = target.lstat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert target.read_bytes() == b"two"
        assert os.listdir(tmp_path) == ["x.json"]

    def test_write_atomic_replaces_a_symlink_without_following_it(self, tmp_path: Path) -> None:
        """A symlink planted at the target is replaced by the new file; what it pointed at is untouched."""
        victim = tmp_path / "victim"
        victim.write_text("root's file")
        target = tmp_path / "x.json"
        target.symlink_to(victim)
        write_atomic(target, b"new")
        assert victim.read_text() == "root's file"
        assert not target.is_symlink() and target.read_bytes() == b"new"


# ----------------------------------------------------------------------------- originals: validation


class TestOriginalsValidation:
    @pytest.mark.parametrize(
        ("case", "text"),
        [
            ("true_as_1_w", '{"original_power_limits_w": {"GPU-200w": true}}'),
            ("string_150", '{"original_power_limits_w": {"GPU-200w": "150"}}'),
            ("5000_w_out_of_range", '{"original_power_limits_w": {"GPU-200w": 5000}}'),
            ("out_of_range_low", '{"original_power_limits_w": {"GPU-200w": 1}}'),
            ("infinite", '{"original_power_limits_w": {"GPU-200w": 1e999}}'),
            ("not_json", "{torn"),
        ],
    )
    def test_bad_entry_restores_the_default_not_the_lowered_limit(self, tmp_path: Path, case: str, text: str) -> None:
        """A bad saved original is never used: the GPU left at 180 W by a crashed run gets its 200 W default back."""
        write_state(tmp_path, text)
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        results = act.restore(snapshot(1.0, [reading(50.0, 180.0)]), 1.0, "restore_after_crash")
        assert backend.calls == [(CARD_200W.uuid, 200.0)], case
        assert [r.outcome for r in results] == [Outcome.APPLIED]
        assert (tmp_path / CORRUPT).exists()
        assert act.originals.items() == []  # restored and forgotten

    def test_bad_entry_later_change_records_the_default(self, tmp_path: Path) -> None:
        """With the saved original bad, a step down from 180 W records 200 W (the default) as the original."""
        write_state(tmp_path, '{"original_power_limits_w": {"GPU-200w": "150"}}')
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        (result,) = act.apply([set_to(160.0)], snapshot(1.0, [reading(80.0, 180.0)]))
        assert result.outcome is Outcome.APPLIED
        assert OriginalLimits(tmp_path).get(CARD_200W.uuid) == 200.0

    def test_limit_the_governor_set_is_never_the_original(self, tmp_path: Path) -> None:
        """An enforced limit equal to the recorded last-set limit, even above the default, is not taken as original."""
        doc = {
            "version": 2,
            "original_power_limits_w": {"GPU-200w": True},
            "last_set_power_limits_w": {"GPU-200w": 210},
        }
        write_state(tmp_path, json.dumps(doc))
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        act.restore(snapshot(1.0, [reading(50.0, 210.0)]), 1.0, "restore_after_crash")
        assert backend.calls == [(CARD_200W.uuid, 200.0)]

    def test_without_a_marker_the_enforced_limit_is_the_original(self, tmp_path: Path) -> None:
        """With no bad file ever seen, an administrator's own lower limit (150 W) is the original and kept."""
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        assert act.restore(snapshot(1.0, [reading(50.0, 150.0)]), 1.0, "restore_after_crash") == []
        act.apply([set_to(140.0)], snapshot(2.0, [reading(80.0, 150.0)]))
        assert act.originals.get(CARD_200W.uuid) == 150.0

    def test_corrupt_marker_outlives_the_run_that_found_it(self, tmp_path: Path) -> None:
        """After a bad file was set aside, a later run (no entry, .corrupt present) still restores the default."""
        write_state(tmp_path, "[1, 2")
        OriginalLimits(tmp_path)  # the run that found it, then crashed before changing anything
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        act.restore(snapshot(1.0, [reading(50.0, 180.0)]), 1.0, "restore_after_crash")
        assert backend.calls == [(CARD_200W.uuid, 200.0)]

    def test_valid_entries_survive_a_bad_neighbour(self, tmp_path: Path) -> None:
        """One bad entry keeps the other GPU's good original, on disk at once, and the bad file is kept aside."""
        write_state(tmp_path, '{"original_power_limits_w": {"GPU-h100": 650, "GPU-200w": "x"}}')
        OriginalLimits(tmp_path)
        saved = json.loads((tmp_path / STATE_FILE_NAME).read_text())
        assert saved["original_power_limits_w"] == {"GPU-h100": 650.0}
        assert json.loads((tmp_path / CORRUPT).read_text())["original_power_limits_w"]["GPU-200w"] == "x"

    def test_version_1_file_is_read(self, tmp_path: Path) -> None:
        """Today's format (version 1, no last-set limits) loads without a warning."""
        write_state(tmp_path, '{"version": 1, "original_power_limits_w": {"GPU-200w": 200.0}}')
        store = OriginalLimits(tmp_path)
        assert (store.items(), store.load_warning) == ([("GPU-200w", 200.0)], None)
        assert not (tmp_path / CORRUPT).exists()

    def test_restore_clamps_to_the_current_range(self, tmp_path: Path) -> None:
        """A saved original a fraction above today's maximum (220.4 W on a 220 W card) is restored as 220 W."""
        write_state(tmp_path, '{"original_power_limits_w": {"GPU-200w": 220.4}}')
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(tmp_path), (CARD_200W,))
        act.restore(snapshot(1.0, [reading(50.0, 180.0)]), 1.0, "restore_on_stop")
        assert backend.calls == [(CARD_200W.uuid, 220.0)]

    def test_entry_rejected_by_range_is_logged_by_the_daemon(self, tmp_path: Path) -> None:
        """A saved 5000 W on a 100-220 W GPU gives a state_entry_rejected warning and the 200 W default at start."""
        state = tmp_path / "state"
        write_state(state, '{"original_power_limits_w": {"GPU-test-0": 5000}}')
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 50.0)
        backend.limits_w["GPU-test-0"] = 180.0
        config = Config(state_dir=str(state), runtime_dir="")
        daemon = Daemon(config, backend, clock, waiter=StopAt(clock, 3), notifier=Notifier())
        with capture_logs() as logs:
            assert daemon.run() == 0
        assert backend.sets[0] == ("GPU-test-0", 200.0)
        rejected = [e for e in logs if e["event"] == "state_entry_rejected"]
        assert len(rejected) == 1 and "5000 W is outside" in str(rejected[0]["detail"])


# ----------------------------------------------------------------------------- originals: durability


class TestHandsOffUntilSaved:
    def blocked(self, tmp_path: Path) -> Path:
        """A state directory that cannot be created (its parent is a regular file)."""
        (tmp_path / "blocker").write_text("a file where a directory should be")
        return tmp_path / "blocker" / "state"

    def test_unsaved_original_means_no_change(self, tmp_path: Path) -> None:
        """When the original cannot be saved the set is refused, says why, and the GPU is listed hands-off."""
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(self.blocked(tmp_path)), (CARD_200W,))
        (result,) = act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        assert result.outcome is Outcome.REFUSED
        assert "original limit 200 W not saved" in (result.detail or "")
        assert backend.calls == []
        assert CARD_200W.uuid in act.hands_off

    def test_retried_and_applied_once_the_save_works(self, tmp_path: Path) -> None:
        """The next wanted change retries the save; once it works the limit is set and hands-off ends."""
        state = self.blocked(tmp_path)
        backend = RecordingBackend(infos=(CARD_200W,))
        act = Actuator(backend, OriginalLimits(state), (CARD_200W,))
        act.apply([set_to(180.0)], snapshot(1.0, [reading(80.0, 200.0)]))
        (tmp_path / "blocker").unlink()
        (result,) = act.apply([set_to(180.0)], snapshot(2.0, [reading(80.0, 200.0)]))
        assert result.outcome is Outcome.APPLIED
        assert act.hands_off == {}
        saved = json.loads((state / STATE_FILE_NAME).read_text())
        assert saved["original_power_limits_w"] == {CARD_200W.uuid: 200.0}
        assert saved["last_set_power_limits_w"] == {CARD_200W.uuid: 180.0}

    def test_metric_says_why(self, tmp_path: Path) -> None:
        """gpu_governor_gpu_original_limit_saved is 0 while hands-off, and 1 once a change was saved."""
        from prometheus_client import generate_latest

        from governor.metrics import build_registry

        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 80.0)
        config = Config(state_dir=str(self.blocked(tmp_path)), runtime_dir="")
        daemon = Daemon(config, backend, clock, waiter=StopAt(clock, 30), notifier=Notifier())
        daemon.start()
        for _ in range(10):
            clock.advance(1.0)
            daemon.tick()
        body = generate_latest(build_registry(lambda: daemon.published)).decode()
        assert 'gpu_governor_gpu_original_limit_saved{gpu="0",uuid="GPU-test-0"} 0.0' in body
        (tmp_path / "blocker").unlink()
        for _ in range(10):
            clock.advance(1.0)
            daemon.tick()
        body = generate_latest(build_registry(lambda: daemon.published)).decode()
        assert 'gpu_governor_gpu_original_limit_saved{gpu="0",uuid="GPU-test-0"} 1.0' in body
        assert backend.sets == [("GPU-test-0", 180.0)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 64 KiB tmpfs (mode 0700) mounted under tmp_path and filled to the last byte: (mount point, filler)."""
    need_root("mounting a tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):  # unbuffered: the first ENOSPC ends the loop
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(OSError):
            (mount / "probe").write_bytes(b"x" * 4096)
        yield mount, filler
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


CAPPED_GOVERNOR = (
    "import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
    "runpy.run_module('governor', run_name='__main__', alter_sys=True)"
)
"""``python -m governor`` with its address space capped at 4 GiB: a regression that reads /dev/zero fails fast."""


class GovernorProcess:
    """``python -m governor run --simulate`` as a child (address space capped at 4 GiB), JSON log collected."""

    def __init__(self, tmp_path: Path, config: Path, name: str, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log_path = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-c", CAPPED_GOVERNOR, "run", "--simulate", "--log-format", "json"),
                    *("--config", str(config), "--listen", f"127.0.0.1:{self.port}", *extra),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    def metrics(self) -> str:
        """One scrape of the metrics endpoint."""
        return scrape(self.port, timeout_s=5)

    def kill9(self) -> None:
        """SIGKILL, as a crash: nothing is restored."""
        self.proc.kill()
        self.proc.wait(20)

    def terminate(self) -> int:
        """SIGTERM and the exit code (the stop restores the originals)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def close(self) -> None:
        """Make sure the child is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)


@pytest.fixture
def governors() -> Iterator[list[GovernorProcess]]:
    started: list[GovernorProcess] = []
    yield started
    for g in started:
        g.close()


def sim_config(tmp_path: Path, state_dir: Path, hw: Path, runtime_dir: str = "") -> Path:
    """A config for a hot simulated GPU (20x time) whose hardware state lives in ``hw``."""
    path = tmp_path / "g.toml"
    path.write_text(
        f'state_dir = "{state_dir}"\nruntime_dir = "{runtime_dir}"\npoll_interval_s = 0.1\n'
        f'[simulation]\nscenario = "hot"\ntime_scale = 20.0\nstate_file = "{hw}"\n'
    )
    return path


def hw_limit(hw: Path) -> float | None:
    """The simulated GPU's power limit as its hardware-state file holds it (None: never written)."""
    if not hw.exists():
        return None
    limits: dict[str, float] = json.loads(hw.read_text())["power_limits_w"]
    return limits.get(SIM_UUID)


class TestDiskFull:
    def test_disk_full_kill_9_restart_restores_200_w(
        self, tmp_path: Path, small_disk: tuple[Path, Path], governors: list[GovernorProcess]
    ) -> None:
        """Disk full: the hot GPU stays at 200 W (metric 0); kill -9; restart with space: stepped; stop gives 200 W."""
        state_dir, filler = small_disk
        hw = tmp_path / "hw.json"
        config = sim_config(tmp_path, state_dir, hw)
        started = time.monotonic()

        full = GovernorProcess(tmp_path, config, "full")
        governors.append(full)
        wait_for(lambda: f"{SAVED_METRIC} 0.0" in full.metrics(), 60, "hands-off because the original cannot be saved")
        time.sleep(1.0)  # 10 more ticks that all want 180 W
        assert f"{LIMIT_METRIC} 200.0" in full.metrics()
        assert hw_limit(hw) in (None, 200.0)
        events = [e["event"] for e in full.events()]
        assert events.count("original_limit_unsaved") == 1 and "state_write_failed" in events
        full.kill9()
        assert hw_limit(hw) in (None, 200.0)

        filler.unlink()
        freed = GovernorProcess(tmp_path, config, "freed")
        governors.append(freed)
        wait_for(lambda: f"{LIMIT_METRIC} 180.0" in freed.metrics(), 60, "step down to 180 W once space is free")
        assert f"{SAVED_METRIC} 1.0" in freed.metrics()
        saved = json.loads((state_dir / STATE_FILE_NAME).read_text())
        assert saved["original_power_limits_w"] == {SIM_UUID: 200.0}
        freed.kill9()
        assert hw_limit(hw) == 180.0  # the crash left the lowered limit on the "hardware"

        again = GovernorProcess(tmp_path, config, "again")
        governors.append(again)
        wait_for(lambda: "gpu_governor_ready 1.0" in again.metrics(), 30, "ready after the second crash")
        assert again.terminate() == 0
        assert hw_limit(hw) == 200.0
        assert any(e["event"] == "power_limit_restored" for e in again.events())
        print(f"DURABILITY disk_full_kill9_restart: three runs in {time.monotonic() - started:.1f} s; 200 W restored")


# ----------------------------------------------------------------------------- bad state files at start


class TestBadStateFilesAtStart:
    @pytest.mark.parametrize("case", sorted(HOSTILE))
    def test_originals_file_never_stops_the_store(self, tmp_path: Path, case: str) -> None:
        """Each hostile originals file gives an empty store and a warning within seconds, and is set aside."""
        HOSTILE[case](tmp_path / STATE_FILE_NAME)
        store = finishes(lambda: OriginalLimits(tmp_path))
        assert isinstance(store, OriginalLimits)
        assert store.items() == []
        assert store.load_warning is not None and STATE_FILE_NAME in store.load_warning
        assert os.path.lexists(tmp_path / CORRUPT)

    @pytest.mark.parametrize("case", sorted(HOSTILE))
    def test_hardware_state_file_never_stops_the_backend(self, tmp_path: Path, case: str) -> None:
        """Each hostile hw.json lets the simulated backend open at default limits, with a warning, set aside."""
        hw = tmp_path / "hw.json"
        HOSTILE[case](hw)

        def open_backend() -> SimulatedBackend:
            return SimulatedBackend(load_profile("rtx4070"), load_scenario("idle"), VirtualClock(), state_file=hw)

        backend = finishes(open_backend)
        assert isinstance(backend, SimulatedBackend)
        assert backend.read().gpus[0].power_limit_w == 200.0
        assert backend.state_warning is not None and str(hw) in backend.state_warning
        assert os.path.lexists(tmp_path / "hw.json.corrupt")

    def test_hardware_state_with_overflowing_limits_opens_at_defaults(self, tmp_path: Path) -> None:
        """A well-formed hw.json whose limits are 401-digit integers (known and unknown GPU) opens at 200 W."""
        hw = tmp_path / "hw.json"
        huge = "1" + "0" * 400
        hw.write_text(
            '{"format": "gpu-governor-simulated-hardware", "version": 1, "power_limits_w": '
            f'{{"{SIM_UUID}": {huge}, "GPU-elsewhere": {huge}}}}}'
        )
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("idle"), VirtualClock(), state_file=hw)
        assert backend.read().gpus[0].power_limit_w == 200.0
        assert backend.state_warning is not None and SIM_UUID in backend.state_warning
        backend.set_power_limit(SIM_UUID, 180.0)
        assert json.loads(hw.read_text())["power_limits_w"] == {SIM_UUID: 180.0}

    @pytest.mark.parametrize(("originals", "hardware"), [("fifo", "symlink_to_dev_zero"), ("deep_nesting", "huge_int")])
    def test_daemon_starts_and_stops_cleanly(
        self, tmp_path: Path, governors: list[GovernorProcess], originals: str, hardware: str
    ) -> None:
        """A real daemon with a hostile originals file and hw.json becomes ready, warns, and exits 0 on SIGTERM."""
        state_dir = tmp_path / "state"
        state_dir.mkdir(mode=0o700)
        hw = tmp_path / "hw.json"
        HOSTILE[originals](state_dir / STATE_FILE_NAME)
        HOSTILE[hardware](hw)
        g = GovernorProcess(tmp_path, sim_config(tmp_path, state_dir, hw), "hostile")
        governors.append(g)
        wait_for(lambda: "gpu_governor_ready 1.0" in g.metrics(), 30, "ready despite the hostile files")
        assert g.terminate() == 0
        events = {e["event"] for e in g.events()}
        assert {"state_unreadable", "backend_state_unreadable"} <= events
        assert os.path.lexists(state_dir / CORRUPT) and os.path.lexists(tmp_path / "hw.json.corrupt")


# ----------------------------------------------------------------------------- symlinks and directories


class TestPlantedSymlinks:
    def test_old_hw_temp_name_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """A symlink planted at the old predictable temp name (.hw.json.tmp-PID) leaves its target untouched."""
        victim = tmp_path / "victim"
        victim.write_text("root-owned content")
        hw = tmp_path / "hw.json"
        (tmp_path / f".hw.json.tmp-{os.getpid()}").symlink_to(victim)
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("idle"), VirtualClock(), state_file=hw)
        backend.set_power_limit(SIM_UUID, 180.0)
        assert victim.read_text() == "root-owned content"
        assert not hw.is_symlink() and hw_limit(hw) == 180.0

    def test_symlink_at_hw_json_is_not_followed(self, tmp_path: Path) -> None:
        """hw.json itself a symlink: refused on read, set aside, and the next save writes a new file, not the target."""
        victim = tmp_path / "victim"
        victim.write_text("root-owned content")
        hw = tmp_path / "hw.json"
        hw.symlink_to(victim)
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("idle"), VirtualClock(), state_file=hw)
        assert backend.state_warning is not None and "symbolic link" in backend.state_warning
        backend.set_power_limit(SIM_UUID, 180.0)
        assert victim.read_text() == "root-owned content"
        assert not hw.is_symlink() and hw_limit(hw) == 180.0

    def test_process_table_temp_symlink_is_not_followed(self, tmp_path: Path) -> None:
        """Symlinks planted at the process table's old temp name and at its name leave their target untouched."""
        runtime = tmp_path / "run"
        runtime.mkdir(mode=0o755)
        victim = tmp_path / "victim"
        victim.write_text("root-owned content")
        (runtime / f".processes.json.{os.getpid()}").symlink_to(victim)
        (runtime / "processes.json").symlink_to(victim)
        clock = VirtualClock()
        config = Config(state_dir=str(tmp_path / "state"), runtime_dir=str(runtime))
        daemon = Daemon(config, ScriptedBackend(clock, lambda t, i: 50.0), clock, waiter=StopAt(clock, 3))
        assert daemon.run() == 0
        table = runtime / "processes.json"
        assert victim.read_text() == "root-owned content"
        assert not table.is_symlink()
        assert stat.S_IMODE(table.stat().st_mode) == 0o600
        assert json.loads(table.read_text())["processes"] == []


class TestStateDirectories:
    @pytest.mark.parametrize(
        ("key", "mode", "owner"),
        [("state_dir", 0o777, 0), ("state_dir", 0o755, 65534), ("runtime_dir", 0o775, 0)],
    )
    def test_untrusted_dir_is_refused_at_start_as_root(self, tmp_path: Path, key: str, mode: int, owner: int) -> None:
        """As root, an others-writable or foreign-owned state or runtime dir: exit 3, one line naming it and the fix."""
        need_root("ownership checks")
        directory = tmp_path / key
        directory.mkdir()
        directory.chmod(mode)
        os.chown(directory, owner, owner)
        other = "state_dir" if key == "runtime_dir" else "runtime_dir"
        (tmp_path / other).mkdir(mode=0o755)
        config = tmp_path / "g.toml"
        hw = tmp_path / "hw.json"
        config.write_text(f'{key} = "{directory}"\n{other} = "{tmp_path / other}"\n[simulation]\nstate_file = "{hw}"\n')
        result = subprocess.run(
            [sys.executable, "-m", "governor", "run", "--simulate", "--config", str(config), "--listen", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
        assert result.returncode == 3, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert str(directory) in lines[0] and key in lines[0] and "chmod 755" in lines[0]

    def test_check_names_every_problem(self, tmp_path: Path) -> None:
        """check_state_dirs (as root, euid 0) reports a world-writable state dir with its mode."""
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o777)
        config = Config(state_dir=str(state), runtime_dir="")
        with pytest.raises(ConfigError) as caught:
            check_state_dirs(config, euid=0)
        assert "mode 777" in str(caught.value)
        check_state_dirs(config, euid=1000)  # not root: nothing to refuse

    @pytest.mark.skipif(
        os.geteuid() != 0, reason="the directories must be root's for the parent rule to be what is judged"
    )
    def test_a_parent_others_may_write_is_refused(self, tmp_path: Path) -> None:
        """As root, a state dir below a parent others may write (no sticky bit) is refused, naming the parent."""
        shared = tmp_path / "shared"
        state = shared / "state"
        state.mkdir(parents=True)
        state.chmod(0o755)
        shared.chmod(0o777)
        config = Config(state_dir=str(state), runtime_dir="")
        with pytest.raises(ConfigError) as caught:
            check_state_dirs(config, euid=0)
        assert f"its parent {shared} is writable by group or others" in str(caught.value)
        shared.chmod(0o1777)  # sticky, like /tmp: only root may rename root's state dir in it
        check_state_dirs(config, euid=0)
        shared.chmod(0o755)
        check_state_dirs(config, euid=0)

    @pytest.mark.skipif(
        os.geteuid() != 0, reason="the directories must be root's for the parent rule to be what is judged"
    )
    def test_a_link_into_a_directory_others_may_write_is_refused(self, tmp_path: Path) -> None:
        """As root, a state dir reached through a symlink is judged where it is: a writable parent there is refused."""
        elsewhere = tmp_path / "elsewhere"
        target = elsewhere / "state"
        target.mkdir(parents=True)
        elsewhere.chmod(0o775)
        link = tmp_path / "state"
        link.symlink_to(target)
        with pytest.raises(ConfigError) as caught:
            check_state_dirs(Config(state_dir=str(link), runtime_dir=""), euid=0)
        assert f"its parent {elsewhere} is writable by group or others" in str(caught.value)

    def test_simulation_in_memory_neither_uses_nor_checks_state_dir(self, tmp_path: Path) -> None:
        """A simulation without a hardware-state file keeps originals in memory: state_dir unchecked, unwritten."""
        state = tmp_path / "state"
        state.mkdir()
        state.chmod(0o777)
        sim = SimulationConfig(scenario="hot")
        config = Config(state_dir=str(state), runtime_dir="", backend="simulated", simulation=sim)
        check_state_dirs(config, euid=0)
        clock = VirtualClock()
        backend = SimulatedBackend(load_profile("rtx4070"), load_scenario("hot"), clock)
        daemon = Daemon(config, backend, clock, waiter=StopAt(clock, 200), notifier=Notifier())
        assert daemon.governor.originals.path is None
        assert daemon.run() == 0
        assert os.listdir(state) == []
