"""Observers of the governor's reports: the decision log, telemetry, the process table, sd_notify.

Each observer reads a :class:`governor.core.TickReport` and nothing else of the governor:
the log tells people what happened (nothing parses it back), :class:`Telemetry` keeps the
counters and builds the :class:`governor.model.PublishedState` the metrics render, the
process table is what ``gpu-governor status`` and admins read, and the status line is
what ``systemctl status`` shows. The what-if recorders (governor.whatif) observe the same
reports.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from governor import __version__
from governor.core import TICK, Governor, TickReport, status_line
from governor.escaping import escape
from governor.fanstate import FanControl
from governor.model import (
    TICK_BUCKETS_S,
    Action,
    ActionResult,
    Decision,
    DecisionRecord,
    GpuHealth,
    GpuStatus,
    Outcome,
    PublishedState,
    StoppedUnitStatus,
    ThermalZone,
)
from governor.notify import Notifier
from governor.processes import state_meaning
from governor.rules.vram import KILL_FOLLOW_UPS
from governor.safefile import write_atomic
from governor.state import OriginalLimits

EVENT_NAMES = {
    "thermal_zone": "thermal_zone_changed",
    "power_step_down": "power_limit_stepped",
    "power_step_up": "power_limit_stepped",
    "power_critical": "power_limit_stepped",
    "power_target_down": "power_limit_targeted",
    "power_target_up": "power_limit_targeted",
    "node_budget": "power_limit_budgeted",
    "power_hold": "power_limit_held",
    "power_drift_reapply": "power_limit_drift_reapplied",
    "power_drift_external_lower": "power_limit_external_lower",
    "restore_on_stop": "power_limit_restored",
    "restore_after_crash": "power_limit_restored",
    "fan_curve": "fan_speed_set",
    "fan_assist": "fan_speed_set",
    "fan_release": "fan_released",
    "fan_not_following": "fan_not_following",
}
"""Log event names of GPU-level decisions (process decisions have their own, see DecisionLog; a fan
hand-back on restore is ``fan_control_restored``)."""
PROCESS_ACTION_NAMES = {
    Action.NONE: "over_budget",
    Action.SIGNAL_TERM: "sigterm",
    Action.SIGNAL_KILL: "sigkill",
}
_WARNING_RULES = frozenset({"power_critical", "power_hold", "power_drift_external_lower"})
UNIT_ACTIONS = (Action.STOP_UNIT, Action.START_UNIT)
UNIT_RULES = ("unit_resume", "unit_restart_loop")
_NOT_ACTIONS = frozenset({*UNIT_RULES, "vram_kill_given_up"})
"""Process decisions that are no process action (process_actions_total): units', and giving up on one."""


def is_unit_decision(d: Decision) -> bool:
    """True for a decision about a systemd unit (stop, start, forgotten, kill-restart loop)."""
    return d.action in UNIT_ACTIONS or d.rule in UNIT_RULES


def default_logger() -> Any:
    """The structlog logger (imported here, not at the top: a what-if run passes a silent
    logger of its own and never loads structlog)."""
    from governor import logsetup

    return logsetup.get_logger()


def apply_logging(log_format: str, level: str) -> None:
    """Apply a reloaded config's log format and level (see governor.logsetup.reconfigure)."""
    from governor import logsetup

    logsetup.reconfigure(log_format, level)


class NotifyStatus:
    """Pings systemd's watchdog and updates STATUS= after every tick (once ``live``)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.live = False

    def observe(self, report: TickReport) -> None:
        """Ping the watchdog; send the status line when systemd listens."""
        if not self.live or report.kind != TICK:
            return
        self.notifier.watchdog()
        if self.notifier.enabled:
            self.notifier.status(status_line(report))


class DecisionLog:
    """Logs what each report says happened: decisions, GPUs lost or back, memory pressure,
    GPUs found or gone, and the state of the saved originals (one event per change)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._health: dict[str, GpuHealth] = {}
        self._pressure: dict[str, bool] = {}
        self._mig_pressure: dict[str, frozenset[str]] = {}  # GPU UUID -> its MIG instances under pressure (logged)
        self._indexes: dict[str, int] = {}
        self._hands_off: set[str] = set()
        self._monitor_only: set[str] = set()
        self._fans_monitor_only: dict[str, str] = {}  # GPU UUID -> why its fans are left alone (logged once)
        self._state_error: str | None = None
        self._xids: dict[str, dict[int, int]] = {}  # XID counts by code already logged, per GPU UUID
        self._systemd_error: str | None = None
        self._ticked = False

    def starting(self, governor: Governor) -> None:
        """The start-up events: the governor, each GPU with its ladder, unreadable state."""
        log, config = self.log, governor.config
        log.info(
            "governor_starting",
            version=__version__,
            backend=governor.backend.name,
            gpus=len(governor.gpus),
            config=config.source,
            dry_run=config.dry_run,
        )
        for gpu in governor.gpus:
            log.info(
                "gpu_found",
                gpu=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                power_limit_range_w=f"{gpu.power_limit_min_w}-{gpu.power_limit_max_w}",
                ladder_w=list(governor.plans[gpu.uuid].ladder_w),
            )
            plan = governor.plans[gpu.uuid]
            if plan.policy.power.enabled and len(set(plan.ladder_w)) == 1:
                log.warning(
                    "power_ladder_inert",
                    gpu=gpu.index,
                    uuid=gpu.uuid,
                    limit_w=plan.ladder_w[0],
                    power_limit_range_w=f"{gpu.power_limit_min_w}-{gpu.power_limit_max_w}",
                    effect="the power limit cannot be lowered on this GPU: every step of the power rule is "
                    "clamped to this one limit (the card's allowed range); the thermal zones, the fans and "
                    "the VRAM budgets still apply",
                )
        log_unreadable_state(log, governor.originals, governor.actuator.fans.store)
        store = governor.units.store
        if store.load_warning:
            log.warning("stopped_units_unreadable", detail=store.load_warning)
        for unit in governor.units.statuses(None, config.vram):
            log.info(
                "unit_stopped_earlier",
                unit=unit.unit,
                **{"class": unit.klass},
                stopped_at_s=unit.stopped_wall_s,
                effect="started again once there is room"
                if unit.resume
                else "left stopped (its class does not resume)",
            )
        backend_warning = governor.backend.state_warning
        if backend_warning:
            log.warning("backend_state_unreadable", detail=str(backend_warning))
        if governor.waiting_reason:
            log.warning("waiting_for_driver", reason=governor.waiting_reason, effect="retrying; metrics are served")

    def listening(self, server: Any) -> None:
        """The metrics endpoint's address and security; a warning when it is exposed."""
        summary = getattr(server, "security_summary", None)
        self.log.info("metrics_listening", url=getattr(server, "url", None), security=summary() if summary else None)
        warnings = getattr(server, "security_warnings", None)
        if warnings is not None and warnings():
            self.log.warning(
                "metrics_exposed",
                url=server.url,
                tls=getattr(server, "tls", None) is not None,
                basic_auth=bool(getattr(server, "basic_auth", None)),
                warnings=list(warnings()),
            )

    def observe(self, report: TickReport) -> None:
        """Log one report."""
        log = self.log
        changes = report.changes
        if changes is not None:
            for gpu in changes.appeared:
                log.info("gpu_found", gpu=gpu.index, uuid=gpu.uuid, name=gpu.name)
            for gone in changes.gone:
                log.warning("gpu_gone", uuid=gone)
            for issue in changes.contradictions:
                log.error("config_contradiction", detail=issue, effect="a refused ladder is not applied")
        for pid, error in report.inspect_errors:
            log.warning("process_inspect_failed", pid=pid, error=error)
        for note in report.snapshot.notes if report.snapshot is not None else ():
            log.warning("backend_input_ignored", detail=note)
        if report.kind == TICK:
            for g in report.gpus:
                self._indexes[g.info.uuid] = g.info.index
            self._transitions(report)
            self._fan_transitions(report)
            log_xid_errors(self.log, self._xids, report)
            log_mig_pressure(self.log, self._mig_pressure, report)
        for result in report.results:
            self._decision(report, result)
        self._state_store(report)
        self._units(report)

    def _units(self, report: TickReport) -> None:
        """Restart= warnings, systemd reachable or not (one event per change), units left stopped on stop."""
        for w in report.unit_warnings:
            self.log.warning(
                "kill_will_be_undone",
                unit=w.unit,
                **{"class": w.klass},
                restart=w.restart,
                effect=f"systemd starts {w.unit} again after the kill (Restart={w.restart}): a kill-restart loop; "
                'use action = "stop-unit" for this class',
            )
        error = report.systemd_error if report.systemd_asked else None
        if error != self._systemd_error:
            if error is not None:
                self.log.warning("systemd_unreachable", error=error, effect="units are neither stopped nor started")
            else:
                self.log.info("systemd_reachable")
            self._systemd_error = error
        if report.kind == TICK:
            self._ticked = True
        elif self._ticked and report.stopped_units:
            log_units_left_stopped(self.log, report.stopped_units)

    def _transitions(self, report: TickReport) -> None:
        """One event when a GPU is lost (error) or back (warning), and when memory pressure begins or ends (warning)."""
        assert report.snapshot is not None
        vram = report.config.vram
        pressures = {g.info.uuid: g.memory_pressure for g in report.gpus}
        for r in report.snapshot.gpus:
            health, was = r.health, self._health.get(r.uuid, GpuHealth.OK)
            self._health[r.uuid] = health
            if health is not was:
                if health is GpuHealth.LOST:
                    self.log.error("gpu_lost", gpu=r.index, uuid=r.uuid, reason="the GPU stopped answering")
                elif was is GpuHealth.LOST:
                    self.log.warning("gpu_recovered", gpu=r.index, uuid=r.uuid, health=health.value)
            if (
                health is GpuHealth.LOST
                or r.memory_used_bytes is None
                or not vram.enabled
                or r.mig_instances is not None
            ):
                continue  # no reading: pressure is neither begun nor ended (MIG instances: log_mig_pressure)
            pressure = bool(pressures.get(r.uuid))
            if pressure != self._pressure.get(r.uuid, False):
                self._pressure[r.uuid] = pressure
                fields = {"gpu": r.index, "uuid": r.uuid, "used_bytes": r.memory_used_bytes}
                fields["total_bytes"] = r.memory_total_bytes
                self.log.warning("memory_pressure_began" if pressure else "memory_pressure_ended", **fields)

    def _fan_transitions(self, report: TickReport) -> None:
        """One event when a GPU's fans turn monitor-only (a data-center board answers NotSupported:
        info, never an error; a refusal or a fan that does not follow: warning), one when that ends."""
        for g in report.gpus:
            uuid, why = g.info.uuid, g.fan.monitor_only
            if why == self._fans_monitor_only.get(uuid):
                continue
            if why is None:
                self._fans_monitor_only.pop(uuid, None)
                self.log.info("gpu_fans_controllable", gpu=g.info.index, uuid=uuid, mode=g.fan.mode)
                continue
            self._fans_monitor_only[uuid] = why
            level = self.log.info if g.info.fan_count is None or g.info.fan_count == 0 else self.log.warning
            level("gpu_fans_monitor_only", gpu=g.info.index, uuid=uuid, mode=g.fan.mode, reason=why)

    def _state_store(self, report: TickReport) -> None:
        error = report.state_error
        if error and error != self._state_error:
            self.log.error(
                "state_write_failed",
                detail=error,
                effect="a GPU whose original limit is not saved is left unchanged until it is; retried each tick",
            )
        self._state_error = error
        for warning in report.state_warnings:
            self.log.warning("state_entry_rejected", detail=warning)
        if not report.hands_off and not self._hands_off:
            return  # no GPU left alone, now or before: nothing began or ended
        hands_off = set(report.hands_off)
        for gpu_uuid in sorted(hands_off - self._hands_off):
            self.log.error(
                "original_limit_unsaved",
                gpu=self._indexes.get(gpu_uuid),
                uuid=gpu_uuid,
                reason=report.hands_off[gpu_uuid],
                effect="power limit left unchanged until the original is saved",
            )
        for gpu_uuid in sorted(self._hands_off - hands_off):
            self.log.info("original_limit_saved", gpu=self._indexes.get(gpu_uuid), uuid=gpu_uuid)
        self._hands_off = hands_off

    def _decision(self, report: TickReport, result: ActionResult) -> None:
        d = result.decision
        if is_unit_decision(d):
            log_unit_decision(self.log, result)
            return
        if d.pid is not None:
            self._process_decision(report, result)
            return
        if d.fan is not None:
            log_fan_decision(self.log, result)
            return
        fields: dict[str, Any] = {
            "gpu": d.gpu_index,
            "uuid": d.gpu_uuid,
            "rule": d.rule,
            "action": d.action.value,
            "reason": d.reason,
        }
        if result.outcome is not Outcome.SKIPPED:
            fields["outcome"] = result.outcome.value
        if d.reading is not None:
            fields["temperature_c"] = d.reading
        if d.threshold is not None:
            fields["threshold_c"] = d.threshold
        if d.rule == "thermal_zone":
            fields["from_zone"], fields["to_zone"] = d.from_value, d.to_value
        else:
            fields["from_w"], fields["to_w"] = d.from_value, d.to_value
        if result.detail:
            fields["detail"] = result.detail
        event = EVENT_NAMES.get(d.rule, d.rule)
        if result.outcome is Outcome.DRY_RUN:
            self.log.info("power_limit_would_set", **fields)
        elif result.outcome is Outcome.FAILED:
            self.log.error("power_limit_set_failed", **fields)
            if d.gpu_uuid in report.monitor_only and d.gpu_uuid not in self._monitor_only:
                self._monitor_only.add(d.gpu_uuid)
                self.log.error("gpu_monitor_only", gpu=d.gpu_index, uuid=d.gpu_uuid, reason=result.detail)
        elif result.outcome is Outcome.REFUSED:
            self.log.debug(event, **fields)
        elif (
            (d.rule == "thermal_zone" and ThermalZone(str(d.to_value)).severity >= ThermalZone.THROTTLE.severity)
            or d.rule in _WARNING_RULES
            or (d.rule == "thermal_zone" and d.to_value == ThermalZone.UNKNOWN.value)
        ):
            self.log.warning(event, **fields)
        else:
            self.log.info(event, **fields)

    def _process_decision(self, report: TickReport, result: ActionResult) -> None:
        d = result.decision
        facts = report.facts.get(d.pid) if d.pid is not None else None
        fields: dict[str, Any] = {
            "gpu": d.gpu_index,
            "uuid": d.gpu_uuid,
            "rule": d.rule,
            "action": d.action.value,
            "pid": d.pid,
            "process": d.from_value,
            "class": d.process_class,
            "used_bytes": None if d.reading is None else int(d.reading),
            "budget_bytes": None if d.threshold is None else int(d.threshold),
            "reason": d.reason,
        }
        if facts is not None:
            fields["matched"] = facts.why
            if facts.unit:
                fields["unit"] = facts.unit
            if facts.protected:
                fields["protected"] = facts.protected
        if d.rule in KILL_FOLLOW_UPS:
            log_kill_follow_up(self.log, result, fields)
            return
        if d.action is Action.NONE:
            self.log.warning("process_over_budget", **fields)
            return
        fields["signal"] = PROCESS_ACTION_NAMES[d.action].upper()
        fields["outcome"] = result.outcome.value
        if result.detail:
            fields["detail"] = result.detail
        if result.outcome is Outcome.DRY_RUN:
            self.log.warning("process_would_signal", **fields)
        elif result.outcome is Outcome.FAILED:
            self.log.error("process_signal_failed", **fields)
        elif result.outcome is Outcome.APPLIED:
            self.log.warning("process_signalled", **fields)
        else:
            self.log.info("process_left_alone", **fields)


def log_unreadable_state(log: Any, originals: OriginalLimits, fans: FanControl) -> None:
    """Warn of a saved-originals or fan-takeover file that could not be used (set aside as .corrupt)."""
    if fans.load_warning:
        log.warning("fan_state_unreadable", detail=fans.load_warning)
    if originals.load_warning:
        log.warning(
            "state_unreadable",
            detail=originals.load_warning,
            moved_to=None if originals.set_aside_to is None else str(originals.set_aside_to),
            effect="a GPU without a usable saved original whose limit is below its default "
            "gets its default limit back; delete the .corrupt file once inspected",
        )


def log_units_left_stopped(
    log: Any, units: Sequence[StoppedUnitStatus], *, first: str = "", level: str = "warning"
) -> None:
    """``units_left_stopped``: the units the governor stopped and did not start again, and who will
    (the next start of the governor, when their class resumes them, or the admin); ``first`` opens
    the effect (``gpu-governor restore`` says it starts none); ``level``: the log method."""
    resumed = [u.unit for u in units if u.resume]
    kept = [u.unit for u in units if not u.resume]
    if not kept:
        effect = "the next start of the governor resumes them when there is room"
    elif not resumed:
        effect = "their class does not resume them"
    else:
        effect = (
            f"the next start of the governor resumes {', '.join(resumed)} when there is room; "
            f"{', '.join(kept)}: its class does not resume it"
        )
    getattr(log, level)(
        "units_left_stopped", units=[u.unit for u in units], effect=f"{first}{effect} (or: systemctl start UNIT)"
    )


def log_unit_decision(log: Any, result: ActionResult) -> None:
    """One unit decision: stopped, started, would stop or start (dry run), failed, forgotten, a loop."""
    d = result.decision
    fields: dict[str, Any] = {"unit": d.unit, "class": d.process_class, "rule": d.rule, "reason": d.reason}
    if d.gpu_index >= 0:
        fields["gpu"] = d.gpu_index
    if d.pid is not None:
        fields["pid"] = d.pid
        fields["process"] = d.process_name
    if d.rule == "unit_restart_loop":
        log.error("unit_restart_loop", **fields, effect="its processes are signalled no more")
        return
    if d.action is Action.NONE:
        log.info("unit_forgotten", **fields)
        return
    stop = d.action is Action.STOP_UNIT
    fields["outcome"] = result.outcome.value
    if result.detail:
        fields["detail"] = result.detail
    if result.outcome is Outcome.DRY_RUN:
        log.warning("unit_would_stop" if stop else "unit_would_start", **fields)
    elif result.outcome is Outcome.FAILED:
        log.error("unit_stop_failed" if stop else "unit_start_failed", **fields)
    elif result.outcome is Outcome.APPLIED:
        log.warning("unit_stopped" if stop else "unit_started", **fields)
    else:
        log.info("unit_left_alone", **fields)


def log_kill_follow_up(log: Any, result: ActionResult, fields: dict[str, Any]) -> None:
    """A process still listed and over budget after a SIGKILL (error): sent SIGKILL again
    (``vram_kill_ineffective``), or given up on (``vram_kill_given_up``); ``fields``: the process
    decision's fields, with its /proc state and how long since its first SIGKILL."""
    d = result.decision
    state = result.process_state
    fields["since_kill_s"] = None if d.kill_sent_s is None else round(d.t_s - d.kill_sent_s, 3)
    fields["proc_state"] = state
    fields["state_means"] = state_meaning(state)
    fields["outcome"] = result.outcome.value
    if result.detail:
        fields["detail"] = result.detail
    if d.rule == "vram_kill_given_up":
        fields["effect"] = "no more SIGKILL is sent; its memory comes back only when the kernel lets it go"
        log.error("vram_kill_given_up", **fields)
        return
    fields["signal"] = "SIGKILL"
    effects = {
        Outcome.APPLIED: "SIGKILL sent again",
        Outcome.DRY_RUN: "SIGKILL would be sent again (dry run)",
        Outcome.FAILED: f"sending SIGKILL again failed: {result.detail}",
    }
    fields["effect"] = effects.get(result.outcome, f"SIGKILL not sent again: {result.detail}")
    log.error("vram_kill_ineffective", **fields)


def log_fan_decision(log: Any, result: ActionResult) -> None:
    """One fan decision: set, would set (dry run), handed back, restored, failed."""
    d = result.decision
    fields: dict[str, Any] = {
        "gpu": d.gpu_index,
        "uuid": d.gpu_uuid,
        "rule": d.rule,
        "action": d.action.value,
        "fan": d.fan,
        "from_percent": d.from_percent,
        "to": "automatic control" if d.to_percent is None else f"{d.to_percent:g} %",
        "reason": d.reason,
        "outcome": result.outcome.value,
    }
    if d.reading is not None:
        fields["temperature_c"] = d.reading
    if result.detail:
        fields["detail"] = result.detail
    outcome = result.outcome
    if outcome is Outcome.DRY_RUN:
        log.info("fan_would_set", **fields)
    elif outcome is Outcome.FAILED:
        log.error("fan_set_failed", **fields)
    elif outcome is not Outcome.APPLIED:
        log.debug("fan_left_alone", **fields)
    elif d.rule in ("restore_on_stop", "restore_after_crash"):
        log.info("fan_control_restored", **fields)
    elif d.rule == "fan_not_following":
        log.warning("fan_not_following", **fields)
    else:
        log.info(EVENT_NAMES.get(d.rule, "fan_speed_set"), **fields)


def log_mig_pressure(log: Any, seen_by_gpu: dict[str, frozenset[str]], report: TickReport) -> None:
    """One warning when memory pressure begins or ends in a MIG instance (GPUs read per instance only;
    ``seen_by_gpu``: the instances already logged as under pressure, per GPU UUID, kept here)."""
    assert report.snapshot is not None
    if not report.config.vram.enabled:
        return
    pressed = {g.info.uuid: g.mig_pressure for g in report.gpus}
    for r in report.snapshot.gpus:
        if not r.mig_instances:
            continue  # not read per instance this tick: pressure is neither begun nor ended
        now, before = frozenset(pressed.get(r.uuid, ())), seen_by_gpu.get(r.uuid, frozenset())
        if now == before:
            continue
        seen_by_gpu[r.uuid] = now
        for i in r.mig_instances:
            if (i.uuid in now) != (i.uuid in before):
                log.warning(
                    "mig_memory_pressure_began" if i.uuid in now else "mig_memory_pressure_ended",
                    gpu=r.index,
                    uuid=r.uuid,
                    instance=i.uuid,
                    used_bytes=i.memory_used_bytes,
                    total_bytes=i.memory_total_bytes,
                )


def log_xid_errors(log: Any, seen_by_gpu: dict[str, dict[int, int]], report: TickReport) -> None:
    """One ``gpu_xid_error`` warning per XID code whose count grew since the last tick
    (``count``: how many arrived since; the backend counts them from its start);
    ``seen_by_gpu`` holds the counts already logged, per GPU UUID, and is updated."""
    assert report.snapshot is not None
    for r in report.snapshot.gpus:
        telemetry = r.telemetry
        if telemetry is None or not telemetry.xid_errors:
            continue
        seen = seen_by_gpu.setdefault(r.uuid, {})
        for xid, total in telemetry.xid_errors:
            new = total - seen.get(xid, 0)
            if new > 0:
                log.warning(
                    "gpu_xid_error",
                    gpu=r.index,
                    uuid=r.uuid,
                    xid=xid,
                    count=new,
                    total=total,
                    effect="the driver reported a GPU error (XID); see NVIDIA's XID catalogue for this code",
                )
            seen[xid] = total


class ProcessTable:
    """Writes every GPU process with its class and why to runtime_dir/processes.json (0600).

    Rewritten only when the table changed (a write per tick would cost a file per tick for
    nothing). Readers tell a current file from a stale one by the metrics: ``written_s`` (the
    time stamped into the last file written) and ``error`` are published by the telemetry
    (``gpu_governor_process_table_written_timestamp_seconds``, ``..._ok``), so ``status``
    shows a file only when it is the one the answering daemon wrote last. A directory that
    cannot be written (not root, no RuntimeDirectory) disables it with one debug event.
    """

    def __init__(self, log: Any, instance_id: str, pid: int | None = None) -> None:
        self.log = log
        self.instance_id = instance_id
        self.pid = os.getpid() if pid is None else pid
        self.disabled = False
        self._key: list[tuple[Any, ...]] | None = None  # None: never written yet
        self.written_s: float | None = None  # the wall time stamped into the last file written
        self.error: str | None = None  # why the table can no longer be written

    def observe(self, report: TickReport) -> None:
        """Write the table of a tick's report when it changed."""
        config = report.config
        snapshot = report.snapshot
        if not config.runtime_dir or self.disabled or report.kind != TICK or snapshot is None:
            return
        facts = report.facts
        entries = [(r.index, p, facts.get(p.pid)) for r in snapshot.gpus for p in r.processes or ()]
        vram = config.vram
        default = vram.default_class.name
        key = [(gpu, p.pid, f.klass if f else default, (p.used_memory_bytes or 0) >> 20) for gpu, p, f in entries]
        now_s = report.wall_s
        if key == self._key:
            return
        self._key = key
        rows = [
            {
                "gpu": gpu,
                "pid": process.pid,
                "name": escape((f.name if f else process.name) or "?"),
                "class": f.klass if f else default,
                "why": escape(f.why) if f else "",
                "unit": escape(f.unit or "") if f else "",
                "user": f.user if f else None,
                "used_bytes": process.used_memory_bytes,
                "budget_bytes": vram.class_named(f.klass if f else default).budget_bytes,
                "protected": f.protected if f else None,
            }
            for gpu, process, f in entries
        ]
        path = Path(config.runtime_dir) / "processes.json"
        body = json.dumps(
            {
                "daemon": {"pid": self.pid, "instance": self.instance_id},
                "written_at_s": now_s,
                "wall_time_s": snapshot.wall_time_s,
                "processes": rows,
            }
        )
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            # An exclusive temporary file (mkstemp, 0600), renamed: a planted symlink is never followed.
            write_atomic(path, body.encode("utf-8"), durable=False)  # /run is tmpfs: nothing to fsync
            self.written_s = now_s
        except OSError as exc:
            self.disabled = True
            self.error = f"cannot write {path}: {exc.strerror or exc}"
            self.log.debug("process_table_disabled", path=str(path), error=exc.strerror or str(exc))


def _histogram(counts: list[int], value_s: float) -> None:
    """Count ``value_s`` in its own bucket (the last one past every bound); see :func:`_cumulative`."""
    counts[bisect.bisect_left(TICK_BUCKETS_S, value_s)] += 1


def _cumulative(counts: list[int]) -> tuple[int, ...]:
    """Per-bucket counts as the cumulative counts per bound of TICK_BUCKETS_S (Prometheus' le)."""
    return tuple(itertools.accumulate(counts))[: len(TICK_BUCKETS_S)]


class Telemetry:
    """Counts what the reports say and publishes the :class:`PublishedState` the metrics render.

    The service tells it when a tick began (:meth:`tick_began`, so the tick's duration
    covers the read, the step and the observers before it), how late it started, reloads
    and failed ticks.
    """

    def __init__(
        self, started_wall_s: float, instance_id: str, pid: int | None = None, table: ProcessTable | None = None
    ) -> None:
        self.started_wall_s = started_wall_s
        self.table = table  # the process-table writer whose last write the metrics report
        self.instance_id = instance_id
        self.pid = os.getpid() if pid is None else pid
        self._published: PublishedState | None = None
        self._stale = False  # the last tick's report is not yet built into _published
        self._lock = threading.Lock()  # the service thread counts, a scrape thread builds
        self.ready = False
        self.config_ok = True
        self.config_loaded_wall_s = started_wall_s
        self.reloads: Counter[str] = Counter()
        self.tick_failures = 0
        self._began: float | None = None
        self._decision_counts: Counter[tuple[int, str, str, str]] = Counter()
        self._action_counts: Counter[tuple[int, str, str, str]] = Counter()
        self._process_actions: Counter[tuple[str, str, str]] = Counter()
        self._unit_actions: Counter[tuple[str, str, str]] = Counter()
        self._read_errors: Counter[tuple[int, str]] = Counter()
        self._last_decision: dict[str, tuple[Decision, float]] = {}
        self._last_power: dict[str, DecisionRecord] = {}  # by GPU UUID
        self._last_vram: dict[str, DecisionRecord] = {}  # by GPU UUID
        self._tick_count = 0
        self._tick_sum_s = 0.0
        self._tick_last_s: float | None = None
        self._tick_buckets = [0] * (len(TICK_BUCKETS_S) + 1)  # per bucket, the last past every bound
        self._late_buckets = [0] * (len(TICK_BUCKETS_S) + 1)
        self._late_sum_s = 0.0
        self._late_count = 0
        self._frozen_cache: dict[int, tuple[tuple[int, int], tuple[tuple[Any, int], ...]]] = {}
        self._last: TickReport | None = None

    def tick_began(self) -> None:
        """A timed tick begins now (its duration ends when this observer sees its report)."""
        self._began = time.perf_counter()

    def late(self, late_s: float) -> None:
        """How late a tick started against its schedule (seconds), for the lateness histogram."""
        late_s = max(0.0, late_s)
        with self._lock:
            self._late_count += 1
            self._late_sum_s += late_s
            _histogram(self._late_buckets, late_s)

    def reloaded(self, ok: bool, wall_s: float | None) -> None:
        """Count a reload; a successful one (at ``wall_s``, wall clock) is the config's new load time."""
        with self._lock:
            self.config_ok = ok
            self.reloads["success" if ok else "failure"] += 1
            if ok and wall_s is not None:
                self.config_loaded_wall_s = wall_s

    def failed(self) -> int:
        """Count a tick that raised; returns the count so far."""
        with self._lock:
            self.tick_failures += 1
            return self.tick_failures

    def set_ready(self) -> None:
        """The service is up: publish again, now ready."""
        self.ready = True
        self.republish()

    def republish(self) -> None:
        """Publish the last tick's report again (after a reload or a change of readiness)."""
        with self._lock:
            self._stale = self._last is not None

    @property
    def published(self) -> PublishedState | None:
        """The state the metrics render: built from the last tick's report and the counts when
        first asked for after a tick (a scrape every 15 s builds it once, not 15 ticks), then
        the same object until the next tick, so the exposition's cache holds."""
        with self._lock:
            if self._stale and self._last is not None:
                self._stale = False
                self._publish(self._last)
            return self._published

    def observe(self, report: TickReport) -> None:
        """Count the report's decisions; publish a tick's report."""
        with self._lock:
            self._observe(report)

    def _observe(self, report: TickReport) -> None:
        self._count(report)
        if report.kind != TICK or report.snapshot is None:
            return
        if self._began is not None:
            duration_s = time.perf_counter() - self._began
            self._began = None
            self._tick_count += 1
            self._tick_sum_s += duration_s
            self._tick_last_s = duration_s
            _histogram(self._tick_buckets, duration_s)
        for reading in report.snapshot.gpus:
            if reading.health is not GpuHealth.OK:
                self._read_errors[(reading.index, reading.uuid)] += 1
        self._last = report
        self._stale = True

    def _count(self, report: TickReport) -> None:
        wall = report.wall_s
        for result in report.results:
            decision = result.decision
            action = decision.action
            self._decision_counts[(decision.gpu_index, decision.gpu_uuid, decision.rule, action.value)] += 1
            outcome = result.outcome.value if action is not Action.NONE else "reported"
            if action in UNIT_ACTIONS:
                self._unit_actions[(decision.process_class or "", action.value, outcome)] += 1
            elif decision.process_class is not None and decision.pid is not None and decision.rule not in _NOT_ACTIONS:
                action_name = PROCESS_ACTION_NAMES.get(action, action.value)
                self._process_actions[(decision.process_class, action_name, outcome)] += 1
            if action is not Action.NONE:
                self._action_counts[(decision.gpu_index, decision.gpu_uuid, action.value, result.outcome.value)] += 1
            self._last_decision[decision.gpu_uuid] = (decision, wall)
            record = DecisionRecord(decision, wall, outcome)
            if decision.pid is not None or action is Action.START_UNIT:
                self._last_vram[decision.gpu_uuid] = record
            elif action is Action.SET_POWER_LIMIT or decision.rule.startswith("power"):
                self._last_power[decision.gpu_uuid] = record

    def _frozen(self, counter: Counter[Any]) -> tuple[tuple[Any, int], ...]:
        """An immutable, sorted copy of a counter, rebuilt only when the counter changed."""
        key = id(counter)
        total = counter.total()
        cached = self._frozen_cache.get(key)
        if cached is None or cached[0] != (len(counter), total):
            cached = ((len(counter), total), tuple(sorted(counter.items())))
            self._frozen_cache[key] = cached
        return cached[1]

    def _publish(self, report: TickReport) -> None:
        snapshot = report.snapshot
        config = report.config
        statuses = []
        for g in report.gpus:
            uuid = g.info.uuid
            last = self._last_decision.get(uuid)
            statuses.append(
                GpuStatus(
                    info=g.info,
                    zone=g.zone,
                    zone_thresholds_c=g.zone_thresholds_c,
                    ladder_w=g.ladder_w,
                    rung=g.rung,
                    target_w=g.target_w,
                    monitor_only=g.monitor_only,
                    last_decision=None if last is None else last[0],
                    last_decision_wall_s=None if last is None else last[1],
                    classes=g.classes,
                    unclassified_processes=g.unclassified_processes,
                    memory_pressure=g.memory_pressure,
                    processes=g.processes,
                    original_limit_saved=g.original_limit_saved,
                    last_power=self._last_power.get(uuid),
                    last_vram=self._last_vram.get(uuid),
                    model=g.model,
                    fan=g.fan,
                    mig_pressure=g.mig_pressure,
                )
            )
        vram = config.vram
        self._published = PublishedState(
            version=__version__,
            backend=report.backend,
            started_wall_s=self.started_wall_s,
            config_source=config.source,
            config_loaded_wall_s=self.config_loaded_wall_s,
            config_reload_ok=self.config_ok,
            config_reloads=tuple(sorted(self.reloads.items())),
            dry_run=config.dry_run,
            snapshot=snapshot,
            gpus=tuple(statuses),
            decision_counts=self._frozen(self._decision_counts),
            action_counts=self._frozen(self._action_counts),
            read_errors=self._frozen(self._read_errors),
            tick_count=self._tick_count,
            tick_duration_s=self._tick_last_s,
            tick_bucket_counts=_cumulative(self._tick_buckets),
            lateness_bucket_counts=_cumulative(self._late_buckets),
            lateness_sum_s=self._late_sum_s,
            lateness_count=self._late_count,
            tick_failures=self.tick_failures,
            tick_duration_sum_s=self._tick_sum_s,
            last_poll_wall_s=None if snapshot is None else snapshot.wall_time_s,
            state_write_errors=report.state_write_errors,
            ready=self.ready and not report.waiting_reason,
            poll_interval_s=config.poll_interval_s,
            class_budgets=tuple(
                (c.name, c.budget_bytes) for c in (*vram.classes, vram.default_class) if c.budget_bytes is not None
            ),
            reserve_bytes=vram.reserve_bytes,
            process_action_counts=self._frozen(self._process_actions),
            per_process_metrics=vram.per_process_metrics,
            pid=self.pid,
            instance_id=self.instance_id,
            runtime_dir=config.runtime_dir,
            process_table_written_s=None if self.table is None else self.table.written_s,
            process_table_error=None if self.table is None else self.table.error,
            stopped_units=report.stopped_units,
            restart_loops=report.restart_loops,
            unit_action_counts=self._frozen(self._unit_actions),
            systemd_reachable=None if not report.systemd_asked else report.systemd_error is None,
        )
