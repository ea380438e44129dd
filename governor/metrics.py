"""Prometheus metrics, built at scrape time from the last published state.

The collector never calls the hardware: it renders the immutable
:class:`~governor.model.PublishedState` the daemon published after its last tick,
so a scrape costs no NVML call and series of things that are gone (a lost GPU's
readings, a process that exited) simply disappear. Readings that are missing are
left out, never exported as 0.

:class:`Exposition` renders that state once and serves the bytes: every scrape of
the same published state (one per tick) gets the same cached text, so a scrape
costs a dictionary look-up rather than building every metric family again.
"""

from __future__ import annotations

import contextlib
import gzip
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from governor.logsetup import escape
from governor.model import (
    CLOCK_EVENT_REASONS,
    TICK_BUCKETS_S,
    ZONES_BY_SEVERITY,
    DecisionRecord,
    GpuHealth,
    GpuTelemetry,
    PublishedState,
)

PREFIX = "gpu_governor"
GPU_LABELS = ["gpu", "uuid"]

__all__ = ["CLOCK_EVENT_REASONS", "Exposition", "GovernorCollector", "build_registry"]


class GovernorCollector(Collector):
    """Renders the latest published state as metric families."""

    def __init__(self, source: Callable[[], PublishedState | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family for the current state (none before the first tick)."""
        state = self._source()
        if state is None:
            return
        yield from _governor_metrics(state)
        yield from _gpu_metrics(state)
        yield from _fan_metrics(state)
        yield from _vram_metrics(state)
        yield from _unit_metrics(state)
        yield from _model_metrics(state)
        yield from _mig_metrics(state)


def _gauge(name: str, doc: str, labels: list[str] | None = None, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=GPU_LABELS if labels is None else labels, unit=unit)


def _governor_metrics(state: PublishedState) -> Iterator[Metric]:
    info = InfoMetricFamily(f"{PREFIX}_build", "Version and backend of the running governor.")
    info.add_metric([], {"version": state.version, "backend": state.backend, "dry_run": str(state.dry_run).lower()})
    yield info

    daemon = InfoMetricFamily(
        f"{PREFIX}_daemon",
        "Which daemon answers: its pid, an id random per start, and the directory of its process table.",
    )
    daemon.add_metric(
        [],
        {
            "pid": "" if state.pid is None else str(state.pid),
            "instance_id": state.instance_id,
            "runtime_dir": state.runtime_dir,
        },
    )
    yield daemon

    if state.runtime_dir:
        table_ok = _gauge(
            "process_table_ok",
            "1 while the daemon can write its process table (runtime_dir/processes.json), else 0.",
            [],
        )
        table_ok.add_metric([], 0.0 if state.process_table_error else 1.0)
        yield table_ok
        if state.process_table_written_s is not None:
            written = _gauge(
                "process_table_written_timestamp_seconds",
                "The time stamped into the last process table written (written_at_s): a file with another is stale.",
                [],
            )
            written.add_metric([], state.process_table_written_s)
            yield written

    config = InfoMetricFamily(f"{PREFIX}_config", "The configuration file in force.")
    config.add_metric([], {"source": state.config_source})
    yield config

    ok = _gauge("config_last_reload_successful", "1 if the last config load or reload succeeded, else 0.", [])
    ok.add_metric([], 1.0 if state.config_reload_ok else 0.0)
    yield ok

    loaded = _gauge("config_loaded_timestamp_seconds", "Unix time the config in force was loaded.", [])
    loaded.add_metric([], state.config_loaded_wall_s)
    yield loaded

    reloads = CounterMetricFamily(f"{PREFIX}_config_reloads", "Config reloads by result.", labels=["result"])
    for result, count in state.config_reloads:
        reloads.add_metric([result], count)
    yield reloads

    interval = _gauge("poll_interval_seconds", "Seconds between two polls (from the config in force).", [])
    interval.add_metric([], state.poll_interval_s)
    yield interval

    started = _gauge("start_timestamp_seconds", "Unix time the governor started.", [])
    started.add_metric([], state.started_wall_s)
    yield started

    ready = _gauge("ready", "1 once the governor governs (backend open, first snapshot taken).", [])
    ready.add_metric([], 1.0 if state.ready else 0.0)
    yield ready

    if state.last_poll_wall_s is not None:
        poll = _gauge("last_poll_timestamp_seconds", "Unix time of the last hardware poll.", [])
        poll.add_metric([], state.last_poll_wall_s)
        yield poll

    ticks = HistogramMetricFamily(f"{PREFIX}_tick_duration_seconds", "Time one tick took: read, rules, act, publish.")
    buckets = [(_le(bound), count) for bound, count in zip(TICK_BUCKETS_S, state.tick_bucket_counts)]
    buckets.append(("+Inf", state.tick_count))
    ticks.add_metric([], buckets, sum_value=state.tick_duration_sum_s)
    yield ticks

    late = HistogramMetricFamily(
        f"{PREFIX}_tick_lateness_seconds", "How late each tick started against its drift-free schedule."
    )
    late_buckets = [(_le(bound), count) for bound, count in zip(TICK_BUCKETS_S, state.lateness_bucket_counts)]
    late_buckets.append(("+Inf", state.lateness_count))
    late.add_metric([], late_buckets, sum_value=state.lateness_sum_s)
    yield late

    failures = CounterMetricFamily(f"{PREFIX}_tick_failures", "Ticks that raised an unexpected error (logged).")
    failures.add_metric([], state.tick_failures)
    yield failures

    writes = CounterMetricFamily(
        f"{PREFIX}_state_write_errors", "Failed writes of the saved original limits (governing goes on)."
    )
    writes.add_metric([], state.state_write_errors)
    yield writes


def _le(bound: float) -> str:
    return repr(bound)


def _gpu_metrics(state: PublishedState) -> Iterator[Metric]:
    readings = {} if state.snapshot is None else {r.uuid: r for r in state.snapshot.gpus}
    families: dict[str, Any] = {
        "info": InfoMetricFamily(f"{PREFIX}_gpu", "Static facts of each GPU.", labels=GPU_LABELS),
        "temp": _gauge("gpu_temperature_celsius", "GPU temperature."),
        "power": _gauge("gpu_power_watts", "Power draw."),
        "limit": _gauge("gpu_power_limit_watts", "Power limit the driver enforces."),
        "requested": _gauge("gpu_power_limit_requested_watts", "Power limit requested (slower cadence)."),
        "target": _gauge("gpu_power_limit_target_watts", "Power limit the governor wants (absent while hands-off)."),
        "min": _gauge("gpu_power_limit_min_watts", "Lowest power limit the GPU allows."),
        "max": _gauge("gpu_power_limit_max_watts", "Highest power limit the GPU allows."),
        "default": _gauge("gpu_power_limit_default_watts", "The GPU's default power limit."),
        "rung": _gauge("gpu_power_ladder_rung", "Index of the current ladder rung (0 = top; absent while hands-off)."),
        "mem_used": _gauge("gpu_memory_used_bytes", "VRAM in use."),
        "mem_total": _gauge("gpu_memory_total_bytes", "VRAM in total."),
        "util": _gauge("gpu_utilization_ratio", "GPU busy ratio, 0-1."),
        "mig": _gauge(
            "gpu_mig_mode", "1 while the GPU is in MIG mode, 0 while not (absent: unknown, or a GPU without MIG)."
        ),
        "energy": CounterMetricFamily(
            f"{PREFIX}_gpu_energy_joules", "Energy used since driver load.", labels=GPU_LABELS
        ),
        "floor": _gauge("gpu_power_ladder_floor_watts", "Lowest rung of the GPU's ladder (clamped to its range)."),
        "reasons": _gauge(
            "gpu_clock_event_reason_active",
            "1 while NVML reports this clock event reason.",
            [*GPU_LABELS, "reason"],
        ),
        "zone": StateSetMetricFamily(f"{PREFIX}_gpu_thermal_zone", "Thermal zone of each GPU.", labels=GPU_LABELS),
        "threshold": _gauge(
            "gpu_thermal_zone_threshold_celsius", "Lower bound of each thermal zone.", [*GPU_LABELS, "zone"]
        ),
        "health": StateSetMetricFamily(
            f"{PREFIX}_gpu_health", "ok, degraded (readings missing) or lost.", labels=GPU_LABELS
        ),
        "monitor_only": _gauge("gpu_monitor_only", "1 when the governor cannot set this GPU's limit and only watches."),
        "original_saved": _gauge(
            "gpu_original_limit_saved",
            "1 when the GPU's original limit is saved on disk; 0 while its limit is left unchanged because "
            "saving the original failed; absent while the governor has changed nothing.",
        ),
        "last_decision": _gauge("gpu_last_decision_timestamp_seconds", "Unix time of the last decision for a GPU."),
        "last_decision_info": InfoMetricFamily(
            f"{PREFIX}_gpu_last_decision", "The last decision for a GPU: its rule and change.", labels=GPU_LABELS
        ),
        "last_power": _gauge(
            "gpu_last_power_decision_timestamp_seconds", "Unix time of the last power-limit decision for a GPU."
        ),
        "last_power_info": InfoMetricFamily(
            f"{PREFIX}_gpu_last_power_decision",
            "The last power-limit decision for a GPU: rule, limits in watts, reason, outcome.",
            labels=GPU_LABELS,
        ),
        "last_vram": _gauge(
            "gpu_last_vram_decision_timestamp_seconds", "Unix time of the last process VRAM decision on a GPU."
        ),
        "last_vram_info": InfoMetricFamily(
            f"{PREFIX}_gpu_last_vram_decision",
            "The last process VRAM decision on a GPU: rule, action, process, sizes in bytes, reason, outcome.",
            labels=GPU_LABELS,
        ),
    }
    for status in state.gpus:
        info = status.info
        labels = [str(info.index), info.uuid]
        families["info"].add_metric(
            labels,
            {"name": info.name, "pci_bus_id": info.pci_bus_id or "", "driver": info.driver_version or ""},
        )
        for key, value in (
            ("min", info.power_limit_min_w),
            ("max", info.power_limit_max_w),
            ("default", info.power_limit_default_w),
            ("mem_total", info.memory_total_bytes),
            ("target", status.target_w),
            ("rung", status.rung),
            ("last_decision", status.last_decision_wall_s),
        ):
            if value is not None:
                families[key].add_metric(labels, float(value))
        if status.ladder_w:
            families["floor"].add_metric(labels, status.ladder_w[-1])
        families["monitor_only"].add_metric(labels, 1.0 if status.monitor_only else 0.0)
        if status.original_limit_saved is not None:
            families["original_saved"].add_metric(labels, 1.0 if status.original_limit_saved else 0.0)
        if status.last_decision is not None:
            d = status.last_decision
            families["last_decision_info"].add_metric(
                labels, {"rule": d.rule, "from": _label(str(d.from_value)), "to": _label(str(d.to_value))}
            )
        if status.last_power is not None:
            families["last_power"].add_metric(labels, status.last_power.wall_s)
            families["last_power_info"].add_metric(labels, _power_decision_labels(status.last_power))
        if status.last_vram is not None:
            families["last_vram"].add_metric(labels, status.last_vram.wall_s)
            families["last_vram_info"].add_metric(labels, _vram_decision_labels(status.last_vram))
        families["zone"].add_metric(labels, {z.value: status.zone is z for z in ZONES_BY_SEVERITY})
        for zone, lower_c in status.zone_thresholds_c:
            families["threshold"].add_metric([*labels, zone.value], lower_c)
        reading = readings.get(info.uuid)
        health = GpuHealth.LOST if reading is None else reading.health
        families["health"].add_metric(labels, {h.value: health is h for h in GpuHealth})
        if reading is None:
            continue
        for key, value in (
            ("temp", reading.temperature_c),
            ("power", reading.power_w),
            ("limit", reading.power_limit_w),
            ("requested", reading.power_limit_requested_w),
            ("mem_used", reading.memory_used_bytes),
            ("util", reading.utilization_gpu_ratio),
            ("energy", reading.energy_j),
        ):
            if value is not None:
                families[key].add_metric(labels, float(value))
        if reading.memory_total_bytes is not None and info.memory_total_bytes is None:
            families["mem_total"].add_metric(labels, float(reading.memory_total_bytes))
        if reading.mig_enabled is not None:
            families["mig"].add_metric(labels, 1.0 if reading.mig_enabled else 0.0)
        if reading.clock_event_reasons is not None:
            for bit, name in CLOCK_EVENT_REASONS:
                families["reasons"].add_metric([*labels, name], 1.0 if reading.clock_event_reasons & bit else 0.0)
    yield from families.values()

    decisions = CounterMetricFamily(
        f"{PREFIX}_decisions", "Decisions taken, by GPU, rule and action.", labels=[*GPU_LABELS, "rule", "action"]
    )
    for (gpu, uuid, rule, action), count in state.decision_counts:
        decisions.add_metric([str(gpu), uuid, rule, action], count)
    yield decisions

    actions = CounterMetricFamily(
        f"{PREFIX}_actions",
        "What the actuator did, by GPU, action and outcome.",
        labels=[*GPU_LABELS, "action", "outcome"],
    )
    for (gpu, uuid, action, outcome), count in state.action_counts:
        actions.add_metric([str(gpu), uuid, action, outcome], count)
    yield actions

    errors = CounterMetricFamily(f"{PREFIX}_gpu_read_errors", "Failed or partial reads of a GPU.", labels=GPU_LABELS)
    for (gpu, uuid), count in state.read_errors:
        errors.add_metric([str(gpu), uuid], count)
    yield errors

    yield from _telemetry_metrics(state)


FAN_MODES = ("auto", "curve", "assist")


def _fan_metrics(state: PublishedState) -> Iterator[Metric]:
    """The fan mode per GPU, the speed the governor set per fan (absent while the card's own
    control runs it) and whether the fans are monitor-only; the measured speed is telemetry."""
    mode = StateSetMetricFamily(f"{PREFIX}_gpu_fan_mode", "Fan mode configured for each GPU.", labels=GPU_LABELS)
    target = _gauge(
        "gpu_fan_target_ratio",
        "Fan speed the governor set, 0-1, per fan (absent while the card's automatic control runs it).",
        [*GPU_LABELS, "fan"],
    )
    monitor = _gauge(
        "gpu_fan_monitor_only",
        "1 when the governor cannot drive this GPU's fans (none NVML can set, a refused set, a fan that did "
        "not follow); 0 when it can. Absent in fan mode auto on a GPU without fans.",
    )
    for status in state.gpus:
        fan = status.fan
        labels = [str(status.info.index), status.info.uuid]
        mode.add_metric(labels, {m: fan.mode == m for m in FAN_MODES})
        for index, percent in fan.targets_percent:
            target.add_metric([*labels, str(index)], percent / 100.0)
        if fan.monitor_only is not None or status.info.fan_count:
            monitor.add_metric(labels, 1.0 if fan.monitor_only else 0.0)
    yield from (mode, target, monitor)


def _telemetry_metrics(state: PublishedState) -> Iterator[Metric]:
    """The GPUs' own health and clock telemetry (:class:`GpuTelemetry`); each value NVML cannot give is absent."""
    sm = _gauge("gpu_sm_clock_hertz", "SM clock.")
    mem = _gauge("gpu_memory_clock_hertz", "Memory clock.")
    pstate = _gauge("gpu_pstate", "Performance state: 0 (P0, fastest) to 15.")
    mem_temp = _gauge("gpu_memory_temperature_celsius", "Memory (HBM) temperature (slow read).")
    fans = _gauge(
        "gpu_fan_speed_ratio", "Fan speed the driver reports, 0-1, per fan (slow read).", [*GPU_LABELS, "fan"]
    )
    events = CounterMetricFamily(
        f"{PREFIX}_gpu_clock_event_seconds",
        "Seconds each clock event (throttle) reason was active: NVML's own counter where it keeps one "
        "(sw_power_cap, sync_boost; since driver load), else integrated from the reasons read each tick.",
        labels=[*GPU_LABELS, "reason"],
    )
    xids = CounterMetricFamily(
        f"{PREFIX}_gpu_xid_errors",
        "XID errors the driver reported, by code, since the governor started watching.",
        labels=[*GPU_LABELS, "xid"],
    )
    ecc = CounterMetricFamily(
        f"{PREFIX}_gpu_ecc_errors",
        "ECC errors by type (corrected, uncorrected) and scope (volatile: since driver load; aggregate: lifetime).",
        labels=[*GPU_LABELS, "type", "scope"],
    )
    remapped = _gauge(
        "gpu_remapped_rows", "Memory rows remapped, by the kind of error that caused it.", [*GPU_LABELS, "type"]
    )
    pending = _gauge("gpu_row_remap_pending", "1 while a row remapping waits for the next GPU reset.")
    failed = _gauge("gpu_row_remap_failed", "1 when a row remapping failed (the GPU needs service).")
    readings = () if state.snapshot is None else state.snapshot.gpus
    for r in readings:
        labels = [str(r.index), r.uuid]
        if r.sm_clock_mhz is not None:
            sm.add_metric(labels, r.sm_clock_mhz * 1e6)
        for reason, seconds in r.clock_event_s or ():
            events.add_metric([*labels, reason], seconds)
        t: GpuTelemetry | None = r.telemetry
        if t is None:
            continue
        if t.memory_clock_mhz is not None:
            mem.add_metric(labels, t.memory_clock_mhz * 1e6)
        if t.pstate is not None:
            pstate.add_metric(labels, float(t.pstate))
        if t.memory_temperature_c is not None:
            mem_temp.add_metric(labels, t.memory_temperature_c)
        for fan, ratio in t.fan_speed_ratios or ():
            fans.add_metric([*labels, str(fan)], ratio)
        for xid, count in t.xid_errors or ():
            xids.add_metric([*labels, str(xid)], count)
        for kind, scope, count in t.ecc_errors or ():
            ecc.add_metric([*labels, kind, scope], count)
        for kind, rows in (
            ("correctable", t.remapped_rows_correctable),
            ("uncorrectable", t.remapped_rows_uncorrectable),
        ):
            if rows is not None:
                remapped.add_metric([*labels, kind], float(rows))
        for family, flag in ((pending, t.row_remap_pending), (failed, t.row_remap_failed)):
            if flag is not None:
                family.add_metric(labels, 1.0 if flag else 0.0)
    yield from (sm, mem, pstate, mem_temp, fans, events, xids, ecc, remapped, pending, failed)


def _model_metrics(state: PublishedState) -> Iterator[Metric]:
    """Target mode's online thermal model per GPU (absent in ladder mode and before a reading)."""
    error = _gauge(
        "gpu_model_prediction_error_celsius",
        "Target mode: the online thermal model's 60-seconds-ahead prediction error (predicted minus measured, "
        "the latest block of 5 s).",
    )
    rmse = _gauge(
        "gpu_model_prediction_rmse_celsius",
        "Target mode: root mean square of the recent 60-seconds-ahead prediction errors (about 15 minutes).",
    )
    resistance = _gauge(
        "gpu_model_thermal_resistance_celsius_per_watt", "Target mode: the model's die-to-room rise per watt."
    )
    ambient = _gauge("gpu_model_ambient_celsius", "Target mode: the room (inlet) temperature the model infers.")
    fitted = _gauge(
        "gpu_model_fitted", "Target mode: 1 once the model is fitted to this GPU's readings, 0 on its prior."
    )
    for status in state.gpus:
        model = status.model
        if model is None:
            continue
        labels = [str(status.info.index), status.info.uuid]
        if model.prediction_error_c is not None:
            error.add_metric(labels, model.prediction_error_c)
        if model.prediction_rmse_c is not None:
            rmse.add_metric(labels, model.prediction_rmse_c)
        resistance.add_metric(labels, model.r_total_c_per_w)
        ambient.add_metric(labels, model.ambient_c)
        fitted.add_metric(labels, 1.0 if model.fitted else 0.0)
    yield from (error, rmse, resistance, ambient, fitted)


LABEL_MAX_CHARS = 64
"""Process names in labels are escaped and cut to this length (they are chosen by the process)."""


MIG_LABELS = [*GPU_LABELS, "mig_uuid"]


def _mig_metrics(state: PublishedState) -> Iterator[Metric]:
    """Each MIG instance's memory and memory pressure, for GPUs in MIG mode read per instance (absent
    otherwise, and a value NVML did not give is absent, never 0)."""
    used = _gauge("mig_instance_memory_used_bytes", "VRAM in use in a MIG instance.", MIG_LABELS)
    total = _gauge("mig_instance_memory_total_bytes", "VRAM of a MIG instance in total.", MIG_LABELS)
    pressure = _gauge(
        "mig_instance_memory_pressure",
        "1 when a MIG instance's free VRAM is below the reserve or its use above the threshold.",
        MIG_LABELS,
    )
    pressed = {g.info.uuid: g.mig_pressure for g in state.gpus}
    for reading in () if state.snapshot is None else state.snapshot.gpus:
        for instance in reading.mig_instances or ():
            labels = [str(reading.index), reading.uuid, instance.uuid]
            if instance.memory_used_bytes is not None:
                used.add_metric(labels, float(instance.memory_used_bytes))
            if instance.memory_total_bytes is not None:
                total.add_metric(labels, float(instance.memory_total_bytes))
            if instance.memory_used_bytes is not None and instance.memory_total_bytes:
                pressure.add_metric(labels, 1.0 if instance.uuid in pressed.get(reading.uuid, ()) else 0.0)
    yield from (used, total, pressure)


def _label(text: str) -> str:
    return escape(text)[:LABEL_MAX_CHARS]


REASON_MAX_CHARS = 256
"""Decision reasons in labels are escaped and cut to this length (a VRAM reason names the process)."""


def _number(value: float | str | None) -> str:
    """A number as a label value, exact (``200``, ``3221225472``, ``179.5``), or "" when missing (never 0)."""
    if not isinstance(value, (int, float)):
        return ""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _power_decision_labels(record: DecisionRecord) -> dict[str, str]:
    d = record.decision
    return {
        "rule": d.rule,
        "from_watts": _number(d.from_value),
        "to_watts": _number(d.to_value),
        "reason": escape(d.reason)[:REASON_MAX_CHARS],
        "outcome": record.outcome,
    }


def _vram_decision_labels(record: DecisionRecord) -> dict[str, str]:
    d = record.decision
    return {
        "rule": d.rule,
        "action": d.action.value,
        "pid": "" if d.pid is None else str(d.pid),
        "class": d.process_class or "",
        "used_bytes": _number(d.reading),
        "budget_bytes": _number(d.threshold),
        "reason": escape(d.reason)[:REASON_MAX_CHARS],
        "outcome": record.outcome,
    }


def _vram_metrics(state: PublishedState) -> Iterator[Metric]:
    used = _gauge(
        "class_vram_used_bytes",
        "VRAM used by the processes of a class on a GPU (absent while NVML does not report one's use).",
        [*GPU_LABELS, "class"],
    )
    count = _gauge("class_processes", "Processes of a class on a GPU.", [*GPU_LABELS, "class"])
    over = _gauge(
        "class_over_budget_processes",
        "Processes of a class over their budget on a GPU.",
        [*GPU_LABELS, "class"],
    )
    unclassified = _gauge(
        "unclassified_processes", "Processes on a GPU that matched no class (absent while its processes are unread)."
    )
    reserve = _gauge("gpu_vram_reserve_bytes", "Free VRAM the governor keeps in reserve on a GPU.")
    pressure = _gauge(
        "gpu_memory_pressure",
        "1 when free VRAM is below the reserve or use above the threshold (in MIG mode: in any MIG instance).",
    )
    per_process = _gauge(
        "process_vram_used_bytes",
        "VRAM of one process (only when [vram] per_process_metrics = true).",
        [*GPU_LABELS, "pid", "name", "class", "unit"],
    )
    listed = set() if state.snapshot is None else {r.uuid for r in state.snapshot.gpus if r.processes is not None}
    for status in state.gpus:
        labels = [str(status.info.index), status.info.uuid]
        for usage in status.classes:
            if not usage.unreported:  # a process whose use NVML did not report is not summed as 0
                used.add_metric([*labels, usage.name], float(usage.used_bytes))
            count.add_metric([*labels, usage.name], float(usage.processes))
            over.add_metric([*labels, usage.name], float(usage.over_budget))
        if status.info.uuid in listed:  # a GPU lost, or whose processes NVML could not list, counts none: absent
            unclassified.add_metric(labels, float(status.unclassified_processes))
        reserve.add_metric(labels, float(state.reserve_bytes))
        if status.memory_pressure is not None:
            pressure.add_metric(labels, 1.0 if status.memory_pressure else 0.0)
        for row in status.processes:
            if row.used_bytes is not None:
                per_process.add_metric(
                    [*labels, str(row.pid), _label(row.name), row.klass, _label(row.unit)],
                    float(row.used_bytes),
                )
    yield from (used, count, over, unclassified, reserve, pressure)
    if state.per_process_metrics:
        yield per_process

    budget = _gauge("class_vram_budget_bytes", "VRAM budget of a class, per process and per GPU.", ["class"])
    for name, size in state.class_budgets:
        budget.add_metric([name], float(size))
    yield budget

    actions = CounterMetricFamily(
        f"{PREFIX}_process_actions",
        "Process reports and signals by class, action (over_budget, sigterm, sigkill) and outcome.",
        labels=["class", "action", "outcome"],
    )
    for (klass, action, outcome), n in state.process_action_counts:
        actions.add_metric([klass, action, outcome], n)
    yield actions


def _unit_metrics(state: PublishedState) -> Iterator[Metric]:
    """Units the governor stopped (and when each resumes), unit actions, kill-restart loops, systemd."""
    labels = ["unit", "class", "reason"]
    stopped = _gauge(
        "unit_stopped_timestamp_seconds",
        "When the governor stopped a unit it has not started again (Unix time); reason: memory_pressure, over_budget.",
        labels,
    )
    resume = _gauge(
        "unit_resume_timestamp_seconds",
        "When a stopped unit will be started again if the reserve stays clear (Unix time); absent while it is not.",
        labels,
    )
    delay = _gauge(
        "unit_resume_delay_seconds",
        "How long the reserve must stay clear before a stopped unit is started again (backed off when it flaps); "
        "absent when its class does not resume it.",
        labels,
    )
    for unit in state.stopped_units:
        values = [_label(unit.unit), unit.klass, unit.reason]
        stopped.add_metric(values, unit.stopped_wall_s)
        if unit.resume:
            delay.add_metric(values, unit.resume_after_s)
        if unit.resume_wall_s is not None:
            resume.add_metric(values, unit.resume_wall_s)
    yield from (stopped, resume, delay)

    loops = _gauge(
        "unit_restart_loop",
        "1 for a unit in a kill-restart loop: killed, started again by systemd (Restart=), over budget again; "
        "its processes are signalled no more.",
        ["unit"],
    )
    for unit_name in state.restart_loops:
        loops.add_metric([_label(unit_name)], 1.0)
    yield loops

    actions = CounterMetricFamily(
        f"{PREFIX}_unit_actions",
        "Units stopped and started through systemd, by class, action (stop_unit, start_unit) and outcome.",
        labels=["class", "action", "outcome"],
    )
    for (klass, action, outcome), n in state.unit_action_counts:
        actions.add_metric([klass, action, outcome], n)
    yield actions

    if state.systemd_reachable is not None:
        reachable = _gauge(
            "systemd_reachable", "1 when systemd answered on the system bus the last time it was asked, else 0.", []
        )
        reachable.add_metric([], 1.0 if state.systemd_reachable else 0.0)
        yield reachable


class GovernorRegistry(CollectorRegistry):
    """The registry :func:`build_registry` returns: it remembers its ``source``, so a
    :class:`~governor.httpserver.MetricsServer` given it serves an :class:`Exposition` of that
    source (rendered once per state) rather than rendering the registry on every scrape."""

    def __init__(self, source: Callable[[], PublishedState | None]) -> None:
        super().__init__(auto_describe=False)
        self.source = source


def build_registry(source: Callable[[], PublishedState | None]) -> GovernorRegistry:
    """A registry holding the governor's collector and the process collector (RSS, CPU, fds)."""
    from prometheus_client import ProcessCollector

    registry = GovernorRegistry(source)
    registry.register(GovernorCollector(source))
    ProcessCollector(registry=registry)
    return registry


_TEXT_ENCODER, TEXT_CONTENT_TYPE = choose_encoder("")
"""What a scrape without an Accept header gets: the Prometheus text format and its content type."""


class _Pinned(Collector):
    """The governor's collector over one state pinned by :class:`Exposition` while it renders."""

    def __init__(self) -> None:
        self.state: PublishedState | None = None
        self._collector = GovernorCollector(lambda: self.state)

    def collect(self) -> Iterator[Metric]:
        """The pinned state's metric families."""
        return self._collector.collect()


class Exposition:
    """The exposition of the latest published state, rendered once per state and served as bytes.

    The cache is keyed by the identity of the state ``source`` returns (the daemon
    publishes a new immutable object each tick): the first scrape after a new state
    renders it, under a lock so concurrent scrapes render once, and every later scrape
    of that state gets the same bytes. A rendering holds the process metrics (RSS, CPU
    seconds, open fds) as they were at that moment, so they are at most one poll
    interval old. Each format (text, OpenMetrics) and each encoding (plain, gzip) is
    rendered at most once per state, when first asked for.

    ``render`` may also be called eagerly (e.g. once per tick) to warm the cache.
    """

    def __init__(self, source: Callable[[], PublishedState | None]) -> None:
        self.source = source
        self._pinned = _Pinned()
        self.registry = CollectorRegistry(auto_describe=False)
        """The registry a rendering encodes: the pinned state's families and the process collector."""
        self.registry.register(self._pinned)
        from prometheus_client import ProcessCollector

        ProcessCollector(registry=self.registry)
        self._lock = threading.RLock()  # re-entered to compress the plain rendering
        self._key: PublishedState | None = None
        self._have_key = False
        self._bytes: dict[tuple[str, bool], bytes] = {}
        self.renders = 0
        """Renderings so far (one per published state and format asked for): for tests and benchmarks."""

    def render(
        self,
        encoder: Callable[[CollectorRegistry], bytes] = _TEXT_ENCODER,
        content_type: str = TEXT_CONTENT_TYPE,
        compress: bool = False,
    ) -> bytes:
        """The current state's exposition as bytes: ``encoder`` (default: the text format a
        plain scrape gets; ``content_type`` names it in the cache) over the governor's and the
        process collector's families, gzip-compressed when ``compress``; cached per state."""
        state = self.source()
        key = (content_type, compress)
        with self._lock:
            if not self._have_key or state is not self._key:
                self._key, self._have_key = state, True
                self._bytes = {}
            cached = self._bytes.get(key)
            if cached is not None:
                return cached
            if compress:
                body = gzip.compress(self.render(encoder, content_type, compress=False))
            else:
                self._pinned.state = state
                try:
                    body = encoder(self.registry)
                finally:
                    self._pinned.state = None
                self.renders += 1
            self._bytes[key] = body
            return body

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Pin the current state into :attr:`registry` for an uncached rendering (held under the lock)."""
        with self._lock:
            self._pinned.state = self.source()
            try:
                yield
            finally:
                self._pinned.state = None

    def bytes(self) -> bytes:
        """The current state's exposition in the Prometheus text format (cached per state)."""
        return self.render()
