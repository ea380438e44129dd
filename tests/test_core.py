"""The governor's step and its report, the observers that read it, and reload as a rebuild."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from governor import logsetup
from governor.backends.simulated import build_simulated_backend
from governor.classes import ProcessClass, ProcessMatch, VramPolicy
from governor.clock import VirtualClock
from governor.config import Config, PowerPolicy, SimulationConfig, load_config
from governor.core import RESTORE, TICK, Governor, TickReport, open_originals, status_line
from governor.model import Action, Outcome, ThermalZone
from governor.notify import Notifier
from governor.observers import DecisionLog, NotifyStatus, ProcessTable, Telemetry
from governor.policy import ProcessAction
from governor.service import Service
from governor.sim.profiles import load_profile
from governor.sim.scenario import load_scenario
from governor.waiting import VirtualWaiter
from governor.whatif.simulate import SimSetup, run_policy
from tests.scripted import ScriptedBackend

GiB = 2**30
LLM = ProcessClass("llm", ProcessMatch(name="llm-server"), 8 * GiB, action=ProcessAction.OBSERVE)


def hot(t: float, _: int) -> float:
    """80 C from t = 0: hot enough for the ladder to step down."""
    return 80.0


def governor_on(tmp_path: Path, **config: object) -> tuple[Governor, ScriptedBackend, VirtualClock]:
    """A governor on one scripted GPU at 80 C, its originals under ``tmp_path``."""
    clock = VirtualClock()
    backend = ScriptedBackend(clock, hot)
    cfg = Config(state_dir=str(tmp_path / "state"), runtime_dir="", **config)  # type: ignore[arg-type]
    return Governor(cfg, backend, open_originals(cfg)), backend, clock


def sim_governor(tmp_path: Path, per_process_metrics: bool = True) -> tuple[Governor, VirtualClock]:
    """A governor on a simulated RTX 4070 running llm-server (9 GiB), classed llm with an 8 GiB budget."""
    clock = VirtualClock()
    backend = build_simulated_backend(SimulationConfig(profile="rtx4070", scenario="sustained-inference"), clock)
    vram = VramPolicy(classes=(LLM,), per_process_metrics=per_process_metrics)
    cfg = Config(state_dir=str(tmp_path / "state"), runtime_dir=str(tmp_path / "run"), vram=vram)
    return Governor(cfg, backend, open_originals(cfg)), clock


class TestReport:
    def test_report_holds_decisions_results_and_gpu_status(self, tmp_path: Path) -> None:
        """A hot GPU's report names the zone change and the applied step down, with the ladder position after it."""
        governor, backend, clock = governor_on(tmp_path, power=PowerPolicy(step_down_at_c=75.0, debounce_samples=1))
        reports = []
        for t in range(4):
            clock.advance_to(float(t))
            reports.append(governor.step(governor.read(), clock.wall()))
        rules = [r.decision.rule for report in reports for r in report.results]
        assert "thermal_zone" in rules and "power_step_down" in rules
        stepped = next(r for report in reports for r in report.results if r.decision.rule == "power_step_down")
        assert stepped.outcome is Outcome.APPLIED and stepped.decision.action is Action.SET_POWER_LIMIT
        last = reports[-1]
        assert last.kind == TICK and last.snapshot is not None
        (gpu,) = last.gpus
        assert gpu.zone is not ThermalZone.UNKNOWN
        assert gpu.rung is not None and gpu.rung >= 1
        assert gpu.target_w == backend.limits_w["GPU-test-0"]
        assert gpu.original_limit_saved is True

    def test_report_sums_class_usage_once_with_process_rows(self, tmp_path: Path) -> None:
        """Per-class VRAM use, the over-budget count and the process rows come in the report."""
        governor, clock = sim_governor(tmp_path)
        clock.advance_to(5.0)
        report = governor.step(governor.read(), clock.wall())
        (gpu,) = report.gpus
        (usage,) = gpu.classes
        assert (usage.name, usage.used_bytes, usage.processes, usage.over_budget) == ("llm", 9 * GiB, 1, 1)
        assert gpu.unclassified_processes == 0
        (row,) = gpu.processes
        assert (row.name, row.klass, row.used_bytes) == ("llm-server", "llm", 9 * GiB)
        assert report.facts[row.pid].klass == "llm"

    def test_restore_report_has_no_tick(self, tmp_path: Path) -> None:
        """Restoring on stop reports the restored limit as a RESTORE report without GPU statuses."""
        governor, backend, clock = governor_on(tmp_path, power=PowerPolicy(step_down_at_c=75.0, debounce_samples=1))
        for t in range(4):
            clock.advance_to(float(t))
            governor.step(governor.read(), clock.wall())
        assert backend.limits_w["GPU-test-0"] < 200.0
        report = governor.restore(backend.read(), clock.monotonic(), "restore_on_stop", clock.wall())
        assert report.kind == RESTORE and report.gpus == ()
        assert [r.decision.rule for r in report.results] == ["restore_on_stop"]
        assert backend.limits_w["GPU-test-0"] == 200.0


class TestObservers:
    def test_decision_log_logs_a_report(self, tmp_path: Path) -> None:
        """The decision log turns a report's results into today's events and fields."""
        governor, _, clock = governor_on(tmp_path)
        report = governor.step(governor.read(), clock.wall())
        with capture_logs() as logs:
            DecisionLog(structlog.get_logger()).observe(report)
        (event,) = [e for e in logs if e["event"] == "thermal_zone_changed"]
        assert (event["from_zone"], event["to_zone"], event["gpu"]) == ("unknown", "hot", 0)

    def test_telemetry_publishes_a_report(self, tmp_path: Path) -> None:
        """Telemetry builds the published state from a report: statuses, counts and readiness."""
        governor, clock = sim_governor(tmp_path)
        clock.advance_to(5.0)
        report = governor.step(governor.read(), clock.wall())
        telemetry = Telemetry(0.0, "abc", pid=42)
        telemetry.observe(report)
        published = telemetry.published
        assert published is not None and not published.ready
        assert published.gpus[0].classes == report.gpus[0].classes
        assert published.gpus[0].last_decision == report.results[-1].decision
        assert (published.instance_id, published.pid) == ("abc", 42)
        assert sum(n for _, n in published.decision_counts) == len(report.results)
        telemetry.set_ready()
        assert telemetry.published is not None and telemetry.published.ready

    def test_telemetry_builds_the_state_once_per_tick_when_asked(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Ticks only count; the published state is built when asked, once per tick, with the latest counts."""
        builds: list[TickReport] = []
        build = Telemetry._publish

        def counted(self: Telemetry, report: TickReport) -> None:
            builds.append(report)
            build(self, report)

        monkeypatch.setattr(Telemetry, "_publish", counted)
        governor, clock = sim_governor(tmp_path)
        telemetry = Telemetry(0.0, "abc", pid=42)
        assert telemetry.published is None
        reports = []
        for t in range(1, 6):
            clock.advance_to(float(t))
            reports.append(governor.step(governor.read(), clock.wall()))
            telemetry.observe(reports[-1])
        assert builds == []  # five ticks, nobody asked: nothing built
        first = telemetry.published
        assert first is not None and first is telemetry.published  # asked twice, built once
        assert builds == [reports[-1]]
        assert first.snapshot is reports[-1].snapshot
        assert sum(n for _, n in first.decision_counts) == sum(len(r.results) for r in reports)
        clock.advance_to(6.0)
        telemetry.observe(governor.step(governor.read(), clock.wall()))
        assert telemetry.published is not first

    def test_telemetry_builds_safely_while_ticks_count(self, tmp_path: Path) -> None:
        """A scrape thread building the state while the service thread counts ticks never fails."""
        governor, clock = sim_governor(tmp_path)
        telemetry = Telemetry(0.0, "abc", pid=42)
        errors: list[BaseException] = []
        done = threading.Event()

        def scrape() -> None:
            while not done.is_set():
                try:
                    state = telemetry.published
                    if state is not None:
                        dict(state.decision_counts)
                except BaseException as exc:
                    errors.append(exc)
                    return

        reader = threading.Thread(target=scrape)
        reader.start()
        try:
            for t in range(1, 400):
                clock.advance_to(float(t))
                telemetry.observe(governor.step(governor.read(), clock.wall()))
                telemetry.late(0.001)
                telemetry.reloaded(True, float(t))
        finally:
            done.set()
            reader.join(timeout=30)
        assert errors == []
        state = telemetry.published
        assert state is not None and state.config_reloads == (("success", 399),)

    def test_process_table_writes_a_report(self, tmp_path: Path) -> None:
        """The process table writes the report's processes with their class and the daemon's identity."""
        governor, clock = sim_governor(tmp_path)
        clock.advance_to(5.0)
        report = governor.step(governor.read(), clock.wall())
        ProcessTable(structlog.get_logger(), "inst", pid=7).observe(report)
        table = json.loads((tmp_path / "run" / "processes.json").read_text())
        assert table["daemon"] == {"pid": 7, "instance": "inst"}
        assert table["written_at_s"] == report.wall_s
        (row,) = table["processes"]
        assert (row["name"], row["class"], row["budget_bytes"]) == ("llm-server", "llm", 8 * GiB)

    def test_notify_status_sends_the_status_line(self, tmp_path: Path) -> None:
        """Once live, the sd_notify observer pings the watchdog and sends the report's status line."""
        governor, _, clock = governor_on(tmp_path)
        report = governor.step(governor.read(), clock.wall())
        sent: list[str] = []

        class Recording(Notifier):
            def _send(self, message: str) -> None:
                sent.append(message)

        notifier = Recording()
        notifier.enabled = True
        observer = NotifyStatus(notifier)
        observer.observe(report)
        assert sent == []  # not live yet: start sends READY itself
        observer.live = True
        observer.observe(report)
        assert f"STATUS={status_line(report)}" in sent
        assert status_line(report) == "governing 1 GPU(s): gpu0 80C hot 200W"


def write(path: Path, text: str) -> Path:
    """``text`` as the config file at ``path``, private (the loader checks trust)."""
    path.write_text(text)
    path.chmod(0o600)
    return path


def private(tmp_path: Path) -> Callable[[Path], Config]:
    """A config loader keeping state under ``tmp_path`` and writing no process table."""
    return lambda p: replace(load_config(p, enforce_trust=False), state_dir=str(tmp_path / "s"), runtime_dir="")


class TestReload:
    def test_reload_builds_a_new_governor_carrying_states_and_originals(self, tmp_path: Path) -> None:
        """A reload swaps in a new governor for the new config; the ladder position and saved originals carry over."""
        clock = VirtualClock()
        backend = ScriptedBackend(clock, hot)
        path = write(tmp_path / "governor.toml", "[power]\nstep_down_at_c = 75.0\ndebounce_samples = 1\n")
        config = replace(load_config(path, enforce_trust=False), state_dir=str(tmp_path / "s"), runtime_dir="")
        service = Service(config, backend, clock, config_path=path, waiter=VirtualWaiter(clock), notifier=Notifier())
        service.reload_settle_s = 0.0
        service._load = lambda p: replace(
            load_config(p, enforce_trust=False), state_dir=str(tmp_path / "s"), runtime_dir=""
        )
        service.start()
        for t in range(1, 4):
            clock.advance_to(float(t))
            service.tick()
        old = service.governor
        states, original = dict(old.states), old.originals.get("GPU-test-0")
        assert original == 200.0 and states["GPU-test-0"].ladder.rung
        write(path, "[power]\nstep_down_at_c = 76.0\ndebounce_samples = 1\n")
        assert service.reload() is True
        new = service.governor
        assert new is not old and new.config.power.step_down_at_c == 76.0
        assert new.states == states
        assert new.originals is old.originals and new.originals.get("GPU-test-0") == original
        service.stop()
        assert backend.limits_w["GPU-test-0"] == 200.0  # the carried original was restored

    def test_refused_reload_changes_nothing(self, tmp_path: Path) -> None:
        """A reload the GPUs cannot follow (a surprise deep cap) keeps the old governor and leaves its actuator live."""
        clock = VirtualClock()
        backend = build_simulated_backend(SimulationConfig(profile="h100-80gb", scenario="idle"), clock)
        path = write(tmp_path / "governor.toml", "[power]\nstep_down_at_c = 75.0\n")
        config = replace(load_config(path, enforce_trust=False), state_dir=str(tmp_path / "s"), runtime_dir="")
        service = Service(config, backend, clock, config_path=path, waiter=VirtualWaiter(clock), load=private(tmp_path))
        service.reload_settle_s = 0.0
        service.start()
        old = service.governor
        write(path, "dry_run = true\n[power]\nladder_w = [200.0, 180.0]\n")
        assert service.reload() is False
        assert service.governor is old and not old.config.dry_run and not old.actuator.dry_run
        service.stop()

    def test_log_level_applies_on_reload(self, tmp_path: Path) -> None:
        """A reloaded [logging] level is applied: debug events appear after the reload, not before."""
        stream = io.StringIO()
        previous = structlog.get_config()
        logsetup.configure("json", "info", stream)
        try:
            clock = VirtualClock()
            path = write(tmp_path / "governor.toml", '[logging]\nlevel = "info"\n')
            config = replace(load_config(path, enforce_trust=False), state_dir=str(tmp_path / "s"), runtime_dir="")
            service = Service(config, ScriptedBackend(clock, hot), clock, config_path=path, waiter=VirtualWaiter(clock))
            service.reload_settle_s = 0.0
            service._load = lambda p: replace(
                load_config(p, enforce_trust=False), state_dir=str(tmp_path / "s"), runtime_dir=""
            )
            structlog.get_logger().debug("before_reload")
            write(path, '[logging]\nlevel = "debug"\n')
            assert service.reload() is True
            structlog.get_logger().debug("after_reload")
            text = stream.getvalue()
            assert "before_reload" not in text and "after_reload" in text
        finally:
            structlog.configure(**previous)


def test_whatif_does_not_import_structlog() -> None:
    """Importing every what-if module (simulate, replay, the commands) loads no structlog."""
    code = (
        "import sys, governor.whatif.simulate, governor.whatif.replay, governor.whatif.commands;"
        "print('structlog' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_report_is_frozen() -> None:
    """A report cannot be changed by an observer (every observer sees the same facts)."""
    report = TickReport(kind=TICK, config=Config(), snapshot=None, wall_s=0.0, results=())
    try:
        report.wall_s = 1.0  # type: ignore[misc]
    except AttributeError:
        return
    raise AssertionError("TickReport is not frozen")


def test_simulation_writes_no_process_table(tmp_path: Path) -> None:
    """A what-if run never writes the process table of the runtime_dir its config names (the real governor's)."""
    setup = SimSetup(load_profile("rtx4070"), load_scenario("sustained-inference"), 30.0)
    run = run_policy(setup, Config(runtime_dir=str(tmp_path / "run")), "defaults", (80.0,))
    assert run.gpus[0].work_s > 0
    assert not (tmp_path / "run").exists()


class _Pings(Notifier):
    """A notifier that counts watchdog pings instead of sending them."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    def watchdog(self) -> None:
        self.pings += 1


class _Raises:
    """An observer with a bug: it raises on every report."""

    def observe(self, report: TickReport) -> None:
        raise RuntimeError(f"broken on {report.kind}")


def test_an_observer_that_raises_starves_none_of_the_others(tmp_path: Path) -> None:
    """An observer raising on every report is logged and counted as a tick failure, and the observers after
    it still run: the metrics follow every tick and systemd's watchdog is pinged on every tick."""
    clock = VirtualClock()
    config = Config(state_dir=str(tmp_path / "s"), runtime_dir="")
    notifier = _Pings()
    service = Service(config, ScriptedBackend(clock, hot), clock, waiter=VirtualWaiter(clock), notifier=notifier)
    service.observers = (_Raises(), *service.observers)
    with capture_logs() as logs:
        service.start()
        seen_t_s = []
        for _ in range(3):
            clock.advance(1.0)
            service.tick()
            assert service.published is not None and service.published.snapshot is not None
            seen_t_s.append(service.published.snapshot.t_s)
    service.stop()
    assert notifier.pings == 3
    assert seen_t_s == sorted(set(seen_t_s))  # the metrics' state followed each of the 3 ticks
    failed = [e for e in logs if e["event"] == "observer_failed"]
    assert len(failed) >= 4 and {e["observer"] for e in failed} == {"_Raises"}
    assert service.telemetry.tick_failures >= 4
