"""The workstation story through the governor: stop a unit for a game, resume it, survive a restart,
dry run, a missing systemd, Restart= warnings, and what the log, metrics and status say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from governor.actuator import Actuator
from governor.backends.simulated import SimulatedBackend, build_simulated_backend
from governor.clock import VirtualClock
from governor.config import Config, SimulationConfig, parse_config
from governor.core import Governor, TickReport
from governor.metrics import build_registry
from governor.model import Outcome, ProcessIdentity
from governor.observers import DecisionLog, Telemetry
from governor.policy import VramPolicy
from governor.processes import ProcessFacts, classified, own_system_unit, protection
from governor.state import OriginalLimits
from governor.status import ProcessTable as StatusTable
from governor.status import parse_status, render_status, status_json
from governor.units import MemoryUnit, MemoryUnits
from tests.builders import GiB, process_facts

PRIMARY_PID, SECONDARY_PID, GAME_PID, LOOPER_PID = 4101, 4102, 4103, 4104
UNITS_OF = {
    PRIMARY_PID: ("/system.slice/primary-llm.service", "primary-llm.service", ("system.slice",)),
    SECONDARY_PID: ("/system.slice/secondary-sd.service", "secondary-sd.service", ("system.slice",)),
    GAME_PID: ("/user.slice/user-1000.slice/session-2.scope", "session-2.scope", ("user.slice", "user-1000.slice")),
    LOOPER_PID: ("/system.slice/looper.service", "looper.service", ("system.slice",)),
}


class UnitInspector:
    """An inspector that knows each test pid's cgroup and classifies it with the real matcher."""

    def mark_listing(self) -> None:
        """Nothing to mark."""

    def facts(self, pid: int, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        """The pid's identity (cgroup, unit, slices) classified by ``policy``."""
        cgroup, unit, slices = UNITS_OF[pid]
        identity = ProcessIdentity(pid, 1000 + pid, reported_name, None, None, 0, "root", cgroup, unit, slices, False)
        return classified(identity, policy, own_pid=1)

    def forget_except(self, live: Any) -> None:
        """Nothing cached."""

    def clear(self) -> None:
        """Nothing cached."""


def config(tmp_path: Path, *, dry_run: bool = False, looper: bool = False) -> Config:
    classes: list[dict[str, Any]] = [
        {"name": "primary", "budget": "6GiB", "priority": 100, "action": "terminate", "grace_s": 60.0,
         "match": {"unit": "primary-llm.service"}},
        {"name": "secondary", "budget": "3GiB", "priority": 50, "action": "stop-unit", "resume": True,
         "resume_after_s": 20.0, "match": {"unit": "secondary-sd.service"}},
        {"name": "interactive", "budget": "3GiB", "priority": 200, "protected": True, "match": {"slice": "user.slice"}},
    ]  # fmt: skip
    if looper:
        classes.append(
            {"name": "looper", "budget": "1GiB", "action": "terminate", "grace_s": 0.0, "kill_after_s": 30.0,
             "match": {"unit": "looper.service"}}
        )  # fmt: skip
    return parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "runtime_dir": "",
            "dry_run": dry_run,
            "vram": {"reserve": "2GiB", "cooldown_s": 5.0},
            "class": classes,
        },
        "test.toml",
    )


class Workstation:
    """A simulated RTX 4070 with the seed's services on it, a governor and its observers."""

    def __init__(self, tmp_path: Path, *, dry_run: bool = False, looper: bool = False) -> None:
        self.clock = VirtualClock()
        self.backend: SimulatedBackend = build_simulated_backend(
            SimulationConfig(profile="rtx4070", scenario="idle"), self.clock
        )
        self.units = MemoryUnits(
            {
                "primary-llm.service": MemoryUnit(restart="always", pids={PRIMARY_PID}),
                "secondary-sd.service": MemoryUnit(pids={SECONDARY_PID}),
                "looper.service": MemoryUnit(restart="always", pids={LOOPER_PID}),
            }
        )
        self.units.on_change = self._unit_changed
        self.tmp_path = tmp_path
        self.signals: list[int] = []
        self.config = config(tmp_path, dry_run=dry_run, looper=looper)
        self.governor = self._governor()
        self.log = DecisionLog(_Silent())
        self.telemetry = Telemetry(self.clock.wall(), "0" * 32, pid=1)
        self.backend.attach_process(0, PRIMARY_PID, 6 * GiB, "llama")
        self.backend.attach_process(0, SECONDARY_PID, 3 * GiB, "comfy")
        self.report: TickReport | None = None

    def _governor(self) -> Governor:
        originals = OriginalLimits(None)
        actuator = Actuator(self.backend, originals, self.backend.gpus(), signaller=self._signal, units=self.units)
        return Governor(self.config, self.backend, originals, inspector=UnitInspector(), actuator=actuator)

    def _signal(self, pid: int, start_time: int, signum: int) -> str | None:
        self.signals.append(pid)
        return None

    def _unit_changed(self, unit: str, active: bool) -> None:
        """A stopped unit's processes leave the GPU; a started one comes back."""
        pid = {"secondary-sd.service": SECONDARY_PID, "primary-llm.service": PRIMARY_PID}.get(unit)
        if pid is None:
            return
        if active:
            self.backend.attach_process(0, pid, 3 * GiB, "comfy")
        else:
            self.backend.detach_process(pid)

    def restart_governor(self) -> None:
        """A new governor process on the same state directory (the old one crashed)."""
        self.governor = self._governor()

    def tick(self, seconds: float = 1.0) -> TickReport:
        self.clock.advance(seconds)
        report = self.governor.step(self.governor.read(), self.clock.wall())
        self.log.observe(report)
        self.telemetry.observe(report)
        self.report = report
        return report

    def run(self, seconds: int) -> list[TickReport]:
        return [self.tick() for _ in range(seconds)]

    def metrics(self) -> str:
        return generate_latest(build_registry(lambda: self.telemetry.published)).decode()


class _Silent:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def unit_results(reports: list[TickReport]) -> list[tuple[str, str | None, Outcome]]:
    return [
        (r.decision.action.value, r.decision.unit, r.outcome)
        for report in reports
        for r in report.results
        if r.decision.action.value in ("stop_unit", "start_unit")
    ]


class TestGamingReserve:
    def test_game_stops_the_secondary_unit_and_its_exit_resumes_it(self, tmp_path: Path) -> None:
        """Game under the reserve: secondary-sd stopped through systemd; game gone and clear 20 s: started again."""
        box = Workstation(tmp_path)
        assert unit_results(box.run(5)) == []
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        with capture_logs() as logs:
            box.log.log = structlog.get_logger()
            reports = box.run(3)
        assert unit_results(reports) == [("stop_unit", "secondary-sd.service", Outcome.APPLIED)]
        assert box.units.calls == [("stop", "secondary-sd.service")]
        assert not box.units.units["secondary-sd.service"].active and box.units.units["primary-llm.service"].active
        stopped = [e for e in logs if e["event"] == "unit_stopped"]
        assert stopped and stopped[0]["unit"] == "secondary-sd.service" and stopped[0]["class"] == "secondary"
        assert "memory pressure" in stopped[0]["reason"]
        report = box.report
        assert report is not None and [u.unit for u in report.stopped_units] == ["secondary-sd.service"]
        assert report.stopped_units[0].resume_wall_s is None  # the game still holds the reserve
        saved = json.loads((tmp_path / "state" / "stopped-units.json").read_text())
        assert list(saved["units"]) == ["secondary-sd.service"]

        box.run(30)  # the game keeps playing: never resumed, the primary never touched
        assert box.units.calls == [("stop", "secondary-sd.service")] and box.signals == []
        box.backend.detach_process(GAME_PID)
        box.tick()
        resume_at = box.report.stopped_units[0].resume_wall_s if box.report else None
        assert resume_at is not None and abs(resume_at - (box.clock.wall() + 20.0)) <= 1.0
        reports = box.run(25)
        assert unit_results(reports) == [("start_unit", "secondary-sd.service", Outcome.APPLIED)]
        assert box.units.units["secondary-sd.service"].active
        assert box.units.calls == [("stop", "secondary-sd.service"), ("start", "secondary-sd.service")]
        assert json.loads((tmp_path / "state" / "stopped-units.json").read_text())["units"] == {}
        assert box.units.calls.count(("stop", "primary-llm.service")) == 0 and box.signals == []

    def test_units_stopped_before_a_crash_are_resumed_by_the_next_governor(self, tmp_path: Path) -> None:
        """The governor dies while the unit is stopped; the next one loads the list and starts it when clear."""
        box = Workstation(tmp_path)
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        box.run(3)
        assert not box.units.units["secondary-sd.service"].active
        box.restart_governor()
        box.backend.detach_process(GAME_PID)
        reports = box.run(25)
        assert unit_results(reports) == [("start_unit", "secondary-sd.service", Outcome.APPLIED)]
        assert box.units.units["secondary-sd.service"].active

    def test_a_reload_keeps_the_stopped_units_and_a_clean_stop_reports_them(self, tmp_path: Path) -> None:
        """Reloaded: still stopped and resumed later; stopping the governor logs units_left_stopped."""
        box = Workstation(tmp_path)
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        box.run(3)
        box.governor = box.governor.rebuilt(box.config)
        assert box.governor.units.stopped == {"secondary-sd.service"}
        with capture_logs() as logs:
            box.log.log = structlog.get_logger()
            box.log.observe(box.governor.restore(None, box.clock.monotonic(), "restore_on_stop", box.clock.wall()))
        left = [e for e in logs if e["event"] == "units_left_stopped"]
        assert len(left) == 1 and left[0]["units"] == ["secondary-sd.service"]
        box.backend.detach_process(GAME_PID)
        assert unit_results(box.run(25)) == [("start_unit", "secondary-sd.service", Outcome.APPLIED)]

    def test_dry_run_stops_nothing_and_says_would_stop_unit(self, tmp_path: Path) -> None:
        """Global dry run: no StopUnit; the result and the log say "would stop unit"."""
        box = Workstation(tmp_path, dry_run=True)
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        with capture_logs() as logs:
            box.log.log = structlog.get_logger()
            reports = box.run(20)
        results = unit_results(reports)
        assert results and all(r == ("stop_unit", "secondary-sd.service", Outcome.DRY_RUN) for r in results)
        assert box.units.calls == [] and box.units.units["secondary-sd.service"].active
        would = [e for e in logs if e["event"] == "unit_would_stop"]
        assert would and would[0]["detail"] == "would stop unit secondary-sd.service"
        assert not (tmp_path / "state" / "stopped-units.json").exists()

    def test_missing_systemd_is_reported_once_and_retried(self, tmp_path: Path) -> None:
        """No bus: the stop fails, one systemd_unreachable warning, no crash; once back, the stop is retried."""
        box = Workstation(tmp_path)
        box.units.unavailable = "cannot connect to the system bus: FileNotFoundError"
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        with capture_logs() as logs:
            box.log.log = structlog.get_logger()
            reports = box.run(12)
            assert "gpu_governor_systemd_reachable 0.0" in box.metrics()
            box.units.unavailable = None
            reports += box.run(6)
        outcomes = [o for _, _, o in unit_results(reports)]
        assert outcomes[:2] == [Outcome.FAILED, Outcome.FAILED] and outcomes[-1] is Outcome.APPLIED
        events = [e["event"] for e in logs]
        assert events.count("systemd_unreachable") == 1 and events.count("systemd_reachable") == 1
        assert events.count("unit_stop_failed") == len(outcomes) - 1
        assert "gpu_governor_systemd_reachable 1.0" in box.metrics()

    def test_metrics_and_status_list_the_stopped_unit_and_its_resume(self, tmp_path: Path) -> None:
        """The exposition has the stopped unit and when it resumes; status text and --json show them."""
        box = Workstation(tmp_path)
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        box.run(3)
        page = box.metrics()
        assert (
            'gpu_governor_unit_stopped_timestamp_seconds{class="secondary",reason="memory_pressure",unit="secondary-sd.service"}'
            in page
        )
        assert "gpu_governor_unit_resume_timestamp_seconds{" not in page
        assert 'gpu_governor_unit_actions_total{action="stop_unit",class="secondary",outcome="applied"} 1.0' in page
        status = parse_status(page)
        text = render_status(status, now_s=box.clock.wall())
        assert "unit secondary-sd.service (class secondary) stopped" in text
        assert "resumes once the reserve and its budget have been free for 20 s" in text
        box.backend.detach_process(GAME_PID)
        box.run(5)
        status = parse_status(box.metrics())
        document = status_json(status, StatusTable(None, "none"), "http://x", box.clock.wall())
        (unit,) = document["stopped_units"]
        assert unit["unit"] == "secondary-sd.service" and unit["resume"] is True and unit["resume_after_s"] == 20.0
        assert unit["resume_in_s"] is not None and 14.0 <= unit["resume_in_s"] <= 16.0
        assert document["restart_loops"] == [] and document["systemd_reachable"] is True
        assert "resumes in 1" in render_status(status, now_s=box.clock.wall())


class TestKillRestartLoop:
    def test_restart_always_unit_is_warned_then_detected_as_a_loop(self, tmp_path: Path) -> None:
        """terminate on a Restart=always unit: a kill_will_be_undone warning, then after 3 signals a loop, no more."""
        box = Workstation(tmp_path, looper=True)
        events: list[dict[str, Any]] = []
        pid = LOOPER_PID
        with capture_logs() as logs:
            box.log.log = structlog.get_logger()
            for restart in range(5):
                UNITS_OF.setdefault(pid, UNITS_OF[LOOPER_PID])  # a restarted looper: same unit, new pid
                box.backend.attach_process(0, pid, 2 * GiB, "looper")
                box.run(6)
                if pid in box.signals:  # systemd restarts it at once with a new pid
                    box.backend.detach_process(pid)
                    pid += 100 * (restart + 1)
            events = [dict(e) for e in logs]
        assert len(box.signals) == 3
        names = [e["event"] for e in events]
        assert names.count("kill_will_be_undone") == 1
        warning = next(e for e in events if e["event"] == "kill_will_be_undone")
        assert warning["unit"] == "looper.service" and warning["restart"] == "always"
        loop = [e for e in events if e["event"] == "unit_restart_loop"]
        assert len(loop) == 1 and loop[0]["unit"] == "looper.service" and loop[0]["log_level"] == "error"
        assert 'gpu_governor_unit_restart_loop{unit="looper.service"} 1.0' in box.metrics()
        assert parse_status(box.metrics()).restart_loops == ["looper.service"]


class TestProtection:
    def test_deny_listed_and_own_units_are_protected_sessions_are_not(self) -> None:
        """sshd.service and the governor's own unit are never touched; a session scope's process may be signalled."""
        policy = VramPolicy()
        sshd = process_facts(10, "unclassified", unit="sshd.service", slices=("system.slice",))
        assert protection(sshd, policy, own_pid=1) == "unit sshd.service is on the built-in deny list (sshd.service)"
        mine = process_facts(11, "unclassified", unit="my-governor.service", slices=("system.slice",))
        assert protection(mine, policy, own_pid=1) is None
        assert protection(mine, policy, own_pid=1, own_unit="my-governor.service") is not None
        game = process_facts(12, "unclassified", unit="session-2.scope", slices=("user.slice", "user-1000.slice"))
        assert protection(game, policy, own_pid=1) is None

    def test_own_system_unit_from_cgroup(self, tmp_path: Path) -> None:
        """The governor's own unit comes from /proc/self/cgroup; a session or no unit gives None."""
        for text, expected in (
            ("0::/system.slice/gpu-governor.service\n", "gpu-governor.service"),
            ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
            ("0::/\n", None),
        ):
            (tmp_path / "self").mkdir(exist_ok=True)
            (tmp_path / "self" / "cgroup").write_text(text)
            assert own_system_unit(tmp_path) == expected


class _Answers(MemoryUnits):
    """MemoryUnits whose owner lookup and stop answer as told."""

    def __init__(self, owner: Any, stop: Any) -> None:
        super().__init__()
        self.owner, self.stop = owner, stop

    def unit_of_pid(self, pid: int) -> Any:
        return self.owner

    def stop_unit(self, unit: str) -> Any:
        self.calls.append(("stop", unit))
        return self.stop


class TestActuatorUnits:
    def decision(self, unit: str = "secondary-sd.service", pid: int | None = 7) -> Any:
        from governor.model import Action, Decision, Rule

        return Decision(0.0, 0, "GPU-0", Rule.VRAM_ENFORCE, Action.STOP_UNIT, "r", pid=pid, unit=unit)

    def apply(self, units: MemoryUnits, decision: Any) -> Any:
        from governor.model import Snapshot
        from tests.helpers import RecordingBackend

        actuator = Actuator(RecordingBackend(), OriginalLimits(None), (), units=units)
        return actuator.apply([decision], Snapshot(0.0, 0.0, ()))[0]

    def test_re_checks_the_owner_right_before_stopping(self) -> None:
        """A process that moved to another unit is left alone; one that vanished is skipped; no stop is sent."""
        from governor.units import UnitCall

        moved = _Answers(UnitCall(True, value="other.service"), UnitCall(True, value="/job/1"))
        result = self.apply(moved, self.decision())
        assert result.outcome is Outcome.REFUSED and "other.service" in result.detail and moved.calls == []
        gone = _Answers(UnitCall(False, error="org.freedesktop.systemd1.NoUnitForPID: PID 7"), UnitCall(True))
        assert self.apply(gone, self.decision()).outcome is Outcome.SKIPPED and gone.calls == []

    def test_no_stop_without_systemd_naming_the_unit(self) -> None:
        """An owner lookup that fails (PID gone before systemd pinned it, timeout, bus error) sends no stop."""
        from governor.units import UnitCall

        for owner, outcome in (
            (UnitCall(False, error="org.freedesktop.DBus.Error.UnixProcessIdUnknown: Failed to pin PID 7"), "skipped"),
            (UnitCall(False, error="GetUnitByPID 7: no answer from systemd within 2 s", timed_out=True), "failed"),
            (UnitCall(False, error="system bus: ValueError: not enough values to unpack"), "failed"),
        ):
            units = _Answers(owner, UnitCall(True, value="/job/1"))
            result = self.apply(units, self.decision())
            assert (result.outcome.value, units.calls) == (outcome, []), result.detail

    def test_a_timed_out_stop_counts_as_queued_and_denied_units_are_refused(self) -> None:
        """No answer in time: counted as applied (resuming later is harmless); a deny-listed unit: never sent."""
        from governor.units import UnitCall

        slow = _Answers(
            UnitCall(True, value="secondary-sd.service"), UnitCall(False, error="no answer", timed_out=True)
        )
        result = self.apply(slow, self.decision())
        assert result.outcome is Outcome.APPLIED and "counted as queued" in result.detail
        denied = _Answers(UnitCall(True, value="sshd.service"), UnitCall(True))
        refused = self.apply(denied, self.decision("sshd.service"))
        assert refused.outcome is Outcome.REFUSED and denied.calls == []


class TestUnsavedStops:
    def test_no_stop_while_the_stopped_units_cannot_be_saved(self, tmp_path: Path) -> None:
        """state_dir unwritable (read-only, full): no unit is stopped (it would never be resumed after a
        restart); once the list can be saved the stop goes ahead and survives a restart."""
        (tmp_path / "state").write_text("a file where the directory should be")
        box = Workstation(tmp_path)
        box.backend.attach_process(0, GAME_PID, 3 * GiB // 2, "game")
        refused = unit_results(box.run(3))
        assert refused and {(u, o) for _, u, o in refused} == {("secondary-sd.service", Outcome.REFUSED)}
        assert box.units.calls == [] and box.units.units["secondary-sd.service"].active
        assert box.report is not None and box.report.stopped_units == ()
        (tmp_path / "state").unlink()
        box.run(10)
        assert box.units.calls == [("stop", "secondary-sd.service")]
        box.restart_governor()
        box.backend.detach_process(GAME_PID)
        assert unit_results(box.run(30)) == [("start_unit", "secondary-sd.service", Outcome.APPLIED)]


class TestBookkeeping:
    def test_restart_checks_of_a_flood_of_units_stay_bounded(self) -> None:
        """Signals in 5000 distinct units (half unknown to systemd) leave bounded Restart= bookkeeping."""
        from governor.model import Action, ActionResult, Decision, Rule, Snapshot
        from governor.unitstate import MAX_KNOWN_UNITS, StoppedUnitsStore, UnitKeeper

        manager = MemoryUnits({f"job-{i}.service": MemoryUnit() for i in range(0, 5000, 2)})
        keeper = UnitKeeper(StoppedUnitsStore(None), manager)
        snapshot = Snapshot(0.0, 0.0, ())
        for batch in range(50):
            results = [
                ActionResult(
                    Decision(
                        0.0, 0, "GPU-0", Rule.VRAM_ENFORCE, Action.SIGNAL_TERM, "r", pid=i + 2, unit=f"job-{i}.service"
                    ),
                    Outcome.APPLIED,
                )
                for i in range(batch * 100, batch * 100 + 100)
            ]
            keeper.record(results, snapshot, 0.0, VramPolicy(), {})
        assert len(keeper._checked) <= MAX_KNOWN_UNITS and len(keeper._to_check) <= MAX_KNOWN_UNITS

    def test_resumes_of_a_flood_of_units_stay_bounded(self) -> None:
        """3000 distinct units stopped and resumed: at most MAX_KNOWN_UNITS resumes are remembered, the newest."""
        from governor.model import Snapshot
        from governor.unitstate import MAX_KNOWN_UNITS, StoppedUnitsStore, UnitKeeper

        keeper = UnitKeeper(StoppedUnitsStore(None), MemoryUnits())
        for i in range(3000):
            t_s = float(i)
            keeper.record(self.stop_and_start(f"job-{i}.service", t_s), Snapshot(t_s, t_s, ()), t_s, VramPolicy(), {})
        assert keeper.stopped == frozenset()
        assert len(keeper.state.resumed) == MAX_KNOWN_UNITS
        assert set(keeper.state.resumed) == {f"job-{i}.service" for i in range(3000 - MAX_KNOWN_UNITS, 3000)}

    def test_a_resume_no_flap_window_can_reach_is_forgotten(self) -> None:
        """A resume older than the longest flap window a class may have is dropped at the next resume;
        one within it stays as it was."""
        from governor.model import Snapshot
        from governor.unitstate import FLAP_WINDOW_MAX_S, StoppedUnitsStore, UnitKeeper

        keeper = UnitKeeper(StoppedUnitsStore(None), MemoryUnits())
        policy = VramPolicy()
        for unit, t_s in (
            ("old.service", 0.0),
            ("recent.service", FLAP_WINDOW_MAX_S),
            ("now.service", 2 * FLAP_WINDOW_MAX_S - 1),
        ):
            keeper.record(self.stop_and_start(unit, t_s), Snapshot(t_s, t_s, ()), t_s, policy, {})
        assert sorted(keeper.state.resumed) == ["now.service", "recent.service"]

    @staticmethod
    def stop_and_start(unit: str, t_s: float) -> list[Any]:
        """An applied stop of ``unit`` then an applied start of it, at ``t_s``."""
        from governor.model import Action, ActionResult, Decision, Rule

        return [
            ActionResult(
                Decision(t_s, 0, "GPU-0", Rule.VRAM_ENFORCE, Action.STOP_UNIT, "r", unit=unit), Outcome.APPLIED
            ),
            ActionResult(
                Decision(t_s, 0, "GPU-0", Rule.UNIT_RESUME, Action.START_UNIT, "r", unit=unit), Outcome.APPLIED
            ),
        ]
