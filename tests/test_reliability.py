"""The fault matrix (RELIABILITY.md): the governor keeps working, keeps the originals, signals no one wrongly."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from governor.backends import Backend, BackendUnavailable
from governor.backends.deferred import DeferredBackend
from governor.backends.simulated import build_simulated_backend
from governor.clock import RealClock, VirtualClock
from governor.config import Config, ConfigError, SimulationConfig, load_config
from governor.daemon import Daemon, PipeWaiter
from governor.model import GpuHealth, Snapshot
from tests.builders import StopAt, build_daemon
from tests.scripted import ScriptedBackend
from tests.support import NotifyListener, free_port, lateness, metric, p99_between, scrape, wait_for

REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, "-m", "governor", "run"]


@pytest.fixture(autouse=True)
def _no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)


def tick_for(daemon: Daemon, seconds: int) -> None:
    """Advance the daemon's virtual clock one second at a time, ticking each second."""
    clock = daemon.clock
    assert isinstance(clock, VirtualClock)
    for _ in range(seconds):
        clock.advance(1.0)
        daemon.tick()


def sim_daemon(tmp_path: Path, scenario: str, gpus: int, stop_s: float, **config: Any) -> tuple[Daemon, Any]:
    clock = VirtualClock()
    sim = SimulationConfig(profile="rtx4070", scenario=scenario, gpu_count=gpus)
    backend = build_simulated_backend(sim, clock)
    cfg = Config(state_dir=str(tmp_path / "state"), runtime_dir="", backend="simulated", simulation=sim, **config)
    return build_daemon(cfg, backend, clock, waiter=StopAt(clock, stop_s)), backend


class TestDriver:
    def test_driver_absent_at_boot_then_loaded(self, tmp_path: Path) -> None:
        """With no driver the daemon waits (not ready, STATUS says so), then governs once the GPUs appear."""
        clock = VirtualClock()
        attempts: list[float] = []
        inner = ScriptedBackend(clock, lambda t, i: 80.0)

        def factory() -> Backend:
            attempts.append(clock.monotonic())
            if clock.monotonic() < 100:
                raise BackendUnavailable("no NVIDIA driver found; try --simulate (NVML: Driver Not Loaded)")
            return inner

        backend = DeferredBackend(factory, clock, name="nvml")
        daemon = build_daemon(Config(state_dir=str(tmp_path)), backend, clock, waiter=StopAt(clock, 200))
        daemon.start()
        assert daemon.published is not None and not daemon.published.ready
        assert daemon.status_line().startswith("waiting for the NVIDIA driver (no NVIDIA driver found")
        with capture_logs() as logs:
            assert daemon.run() == 0
        assert attempts[:5] == [0.0, 1.0, 3.0, 7.0, 15.0]  # backoff 1, 2, 4, 8 s ...
        assert max(b - a for a, b in itertools.pairwise(attempts)) <= 60
        assert any(e["event"] == "gpu_found" for e in logs)
        assert inner.sets and inner.sets[0] == ("GPU-test-0", 180.0)  # governed once present
        assert daemon.published.ready

    def test_run_without_driver_waits_instead_of_exiting(self, tmp_path: Path) -> None:
        """`run --wait-for-driver` on a machine without NVIDIA keeps serving metrics (ready 0) until SIGTERM."""
        pytest.importorskip("pynvml")
        import pynvml

        try:
            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
            pytest.skip("an NVIDIA driver is present here")
        except pynvml.NVMLError:
            pass
        port = free_port()
        config = tmp_path / "g.toml"
        config.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = ""\n')
        proc = subprocess.Popen(
            [
                *RUN,
                "--wait-for-driver",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--log-format",
                "json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        try:
            wait_for(lambda: "gpu_governor_ready 0.0" in scrape(port), 15, "metrics while waiting")
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert '"event": "waiting_for_driver"' in out


class TestGpuFaults:
    def test_lost_gpu_mid_run_others_keep_being_governed(self, tmp_path: Path) -> None:
        """GPU 1 lost at t=30 s: it shows lost; GPU 0 is still stepped down; nothing crashes."""
        daemon, backend = sim_daemon(tmp_path, "hot", 2, 300)
        daemon.start()
        with capture_logs() as logs:
            tick_for(daemon, 30)
            backend.inject_fault(1, "lost")
            tick_for(daemon, 270)
        snap = daemon.snapshot
        assert snap is not None
        assert snap.gpus[1].health is GpuHealth.LOST and snap.gpus[0].health is GpuHealth.OK
        assert snap.gpus[0].power_limit_w == 180.0
        assert daemon.published is not None and dict(daemon.published.read_errors)[(1, "GPU-sim-rtx4070-1")] >= 270
        zone = [e for e in logs if e["event"] == "thermal_zone_changed" and e["gpu"] == 1]
        assert zone[-1]["to_zone"] == "unknown"

    def test_temperature_turns_not_supported_holds_that_gpu_only(self, tmp_path: Path) -> None:
        """A GPU whose temperature becomes unreadable holds its limit (degraded); the other steps on."""
        daemon, backend = sim_daemon(tmp_path, "hot", 2, 300)
        daemon.start()
        backend.inject_fault(1, "temperature_unsupported")
        tick_for(daemon, 120)
        snap = daemon.snapshot
        assert snap is not None
        assert snap.gpus[1].health is GpuHealth.DEGRADED and snap.gpus[1].power_limit_w == 200.0
        assert snap.gpus[0].power_limit_w == 180.0

    def test_set_limit_refused_on_one_gpu_others_governed(self, tmp_path: Path) -> None:
        """A refused limit makes that GPU monitor-only; the other GPU is still stepped down."""
        daemon, backend = sim_daemon(tmp_path, "hot", 2, 300)
        daemon.start()
        backend.inject_fault(0, "set_limit_refused")
        tick_for(daemon, 120)
        assert daemon.published is not None
        statuses = {s.info.index: s for s in daemon.published.gpus}
        assert statuses[0].monitor_only and not statuses[1].monitor_only
        assert daemon.snapshot is not None and daemon.snapshot.gpus[1].power_limit_w == 180.0

    def test_hanging_nvml_call_starves_the_watchdog(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A read that hangs stops the WATCHDOG=1 pings (systemd then kills and restarts us); they resume after."""
        path = tmp_path / "notify.sock"
        listener = NotifyListener(path)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        clock = RealClock()
        release = threading.Event()
        hanging = threading.Event()

        class Hanging(ScriptedBackend):
            def read(self) -> Snapshot:
                if hanging.is_set():
                    release.wait(30)
                return super().read()

        backend = Hanging(clock, lambda t, i: 50.0)
        config = Config(state_dir=str(tmp_path / "s"), runtime_dir="", poll_interval_s=0.05)
        daemon = build_daemon(config, backend, clock, waiter=PipeWaiter(clock))
        thread = threading.Thread(target=daemon.run)
        thread.start()
        try:
            listener.until(lambda m: m == "WATCHDOG=1")
            hanging.set()
            time.sleep(0.2)
            listener.sock.settimeout(0.5)
            listener.messages.clear()
            with pytest.raises(TimeoutError):  # 10 intervals of silence: no ping while the read hangs
                listener.until(lambda m: m == "WATCHDOG=1")
            hanging.clear()
            release.set()
            listener.sock.settimeout(10)
            listener.until(lambda m: m == "WATCHDOG=1")
        finally:
            hanging.clear()
            release.set()
            daemon.request_stop()
            thread.join(10)
            listener.sock.close()
        assert not thread.is_alive()


def _symlink_to_dev_zero(p: Path) -> None:
    p.unlink()
    p.symlink_to("/dev/zero")


def _world_writable(p: Path) -> None:
    p.write_text("[thermal]\nwarning_c = 60.0\n")
    p.chmod(0o666)


def _foreign_owned(p: Path) -> None:
    p.write_text("[thermal]\nwarning_c = 60.0\n")
    os.chown(p, 65534, 65534)


BAD_CONFIGS: dict[str, Callable[[Path], object]] = {
    "empty": lambda p: p.write_text(""),
    "binary": lambda p: p.write_bytes(b"\x00\x01\x02binary\xff"),
    "ten_megabytes": lambda p: p.write_text("# " + "x" * (10 * 1024 * 1024)),
    "symlink_to_dev_zero": _symlink_to_dev_zero,
    "wrong_encoding": lambda p: p.write_bytes("[thermal]\nwarning_c = 70.0 # \u00e9\n".encode("latin-1")),
    "duplicate_keys": lambda p: p.write_text("[thermal]\nwarning_c = 70.0\nwarning_c = 71.0\n"),
    "world_writable": _world_writable,
    "foreign_owned": _foreign_owned,
    "deleted": lambda p: p.unlink(),
}


class TestConfigFaults:
    @pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
    def test_bad_config_on_reload_keeps_the_running_one(self, tmp_path: Path, case: str) -> None:
        """Each broken or untrusted config on reload is refused with a clear error; the running config stays."""
        if case in ("world_writable", "foreign_owned") and os.geteuid() != 0:
            pytest.skip("trust checks apply when running as root")
        path = tmp_path / "governor.toml"
        path.write_text("[thermal]\nwarning_c = 65.0\n")
        path.chmod(0o644)
        config = load_config(path)
        clock = VirtualClock()
        daemon = build_daemon(config, ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=path)
        daemon.start()
        BAD_CONFIGS[case](path)
        with capture_logs() as logs:
            assert daemon.reload() is False
        failed = [e for e in logs if e["event"] == "config_reload_failed"]
        assert len(failed) == 1 and failed[0]["log_level"] == "error"
        assert all(str(path) in err for err in failed[0]["errors"])
        assert daemon.config.thermal.warning_c == 65.0
        assert daemon.published is not None
        clock.advance(1.0)
        daemon.tick()  # still governing
        assert daemon.published.tick_count >= 1

    def test_overrides_that_combine_into_a_contradiction_are_refused(self, tmp_path: Path) -> None:
        """Two [[gpu]] overrides, each fine alone, that contradict on one GPU: refused at start and on reload."""
        path = tmp_path / "governor.toml"
        path.write_text(
            "[[gpu]]\nindex = 0\npower = { step_down_at_c = 60.0, step_up_at_c = 50.0 }\n"
            '[[gpu]]\nname = "*"\npower = { step_up_at_c = 62.0 }\n'
        )
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 50.0)
        daemon = build_daemon(load_config(path), backend, clock, config_path=path)
        with pytest.raises(ConfigError, match=r"GPU 0 \(Test GPU\) combined: power.step_up_at_c"):
            daemon.start()
        path.write_text("[thermal]\nwarning_c = 65.0\n")
        daemon = build_daemon(load_config(path), backend, clock, config_path=path)
        daemon.start()
        path.write_text(
            "[[gpu]]\nindex = 0\npower = { step_down_at_c = 60.0, step_up_at_c = 50.0 }\n"
            '[[gpu]]\nname = "*"\npower = { step_up_at_c = 62.0 }\n'
        )
        assert daemon.reload() is False
        assert daemon.config.thermal.warning_c == 65.0

    def test_config_replaced_during_reloads_is_read_whole(self, tmp_path: Path) -> None:
        """A file atomically replaced again and again while reloading is always read whole: old or new, never mixed."""
        path = tmp_path / "governor.toml"
        bodies = [f"[thermal]\nwarning_c = {w}.0\nhot_c = {w + 10}.0\n" for w in (60, 70)]
        path.write_text(bodies[0])
        clock = VirtualClock()
        daemon = build_daemon(load_config(path), ScriptedBackend(clock, lambda t, i: 50.0), clock, config_path=path)
        daemon.start()
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                tmp = tmp_path / f".new{i % 2}"
                tmp.write_text(bodies[i % 2])
                os.replace(tmp, path)
                i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        seen = set()
        try:
            for _ in range(300):
                assert daemon.reload() is True
                seen.add((daemon.config.thermal.warning_c, daemon.config.thermal.hot_c))
        finally:
            stop.set()
            thread.join(10)
        assert seen <= {(60.0, 70.0), (70.0, 80.0)}


class TestResources:
    def test_unwritable_state_dir_changes_nothing(self, tmp_path: Path) -> None:
        """With the state directory unusable no limit is changed (the original cannot be saved); logged, counted."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where the state directory should be")
        clock = VirtualClock()
        backend = ScriptedBackend(clock, lambda t, i: 80.0)
        config = Config(state_dir=str(blocker / "state"), runtime_dir="")
        daemon = build_daemon(config, backend, clock, waiter=StopAt(clock, 100))
        with capture_logs() as logs:
            assert daemon.run() == 0
        assert backend.sets == []
        events = [e["event"] for e in logs]
        assert events.count("state_write_failed") == 1
        assert events.count("original_limit_unsaved") == 1
        assert daemon.published is not None and daemon.published.state_write_errors >= 1
        assert daemon.published.gpus[0].original_limit_saved is False

    def test_sighup_storm_is_coalesced(self, tmp_path: Path, running: Callable[..., Any]) -> None:
        """100 SIGHUPs in a burst lead to far fewer reloads than signals; the daemon keeps ticking."""
        proc, port, _ = running(tmp_path)
        for _ in range(100):
            proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        body = scrape(port)
        reloads = sum(
            float(line.split()[-1])
            for line in body.splitlines()
            if line.startswith("gpu_governor_config_reloads_total")
        )
        ticks_before = metric(body, "gpu_governor_tick_duration_seconds_count")
        time.sleep(0.5)
        assert metric(scrape(port), "gpu_governor_tick_duration_seconds_count") > ticks_before
        print(f"RELIABILITY sighup_storm: 100 signals -> {reloads:g} reloads")
        assert 1 <= reloads < 100
        assert proc.poll() is None

    def test_concurrent_scrapes_do_not_delay_ticks(self, tmp_path: Path, running: Callable[..., Any]) -> None:
        """While 100 concurrent scrapers are served, the loop keeps ticking: ticks go on through the storm and no
        tick slips by a second (10 intervals; a generous bound, the lateness p99 itself is printed)."""
        proc, port, interval = running(tmp_path)
        time.sleep(3)
        quiet = lateness(scrape(port))
        stop = threading.Event()
        served = [0]

        def scraper() -> None:
            while not stop.is_set():
                try:
                    scrape(port)
                    served[0] += 1
                except OSError:
                    pass

        threads = [threading.Thread(target=scraper) for _ in range(100)]
        for t in threads:
            t.start()
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join(15)
        loaded = lateness(scrape(port))
        p99_quiet = p99_between(quiet, quiet)
        p99_load = p99_between(quiet, loaded)
        print(
            f"RELIABILITY scrape_load: {served[0]} scrapes in 5 s by 100 clients; "
            f"tick lateness p99 quiet <= {p99_quiet * 1000:g} ms, under load <= {p99_load * 1000:g} ms"
        )
        ticks = loaded[float("inf")] - quiet[float("inf")]
        assert served[0] >= 100
        assert ticks >= 5, ticks  # about 50 at 0.1 s in the 5 s of load: the scrapes never stopped the loop
        assert p99_load <= 10 * interval  # a generous bound on a loaded 2-core CI machine
        assert proc.poll() is None


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def running() -> Iterator[Callable[..., tuple[subprocess.Popen[str], int, float]]]:
    procs: list[subprocess.Popen[str]] = []

    def start(tmp_path: Path, interval: float = 0.1) -> tuple[subprocess.Popen[str], int, float]:
        port = free_port()
        config = tmp_path / "g.toml"
        config.write_text(f'state_dir = "{tmp_path / "state"}"\nruntime_dir = ""\npoll_interval_s = {interval}\n')
        proc = subprocess.Popen(
            [*RUN, "--simulate", "--config", str(config), "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
        )
        procs.append(proc)
        wait_for(lambda: "gpu_governor_ready 1.0" in scrape(port), 15, "daemon ready")
        return proc, port, interval

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
