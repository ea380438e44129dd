"""Open loop: what would the governor have decided on a recorded trace?

Every snapshot of the trace goes through the pure rules (:func:`governor.rules.engine.evaluate`)
with plans built from the trace's device facts and the config, exactly as the daemon
would run them, except:

- nothing is applied: the recorded GPU did not follow the decisions, so every reading
  after the first would-be change is what happened *without* it (drift checks are off,
  as in dry-run);
- processes are classified by the name the trace recorded (``/proc/PID/comm`` when
  ``gpu-governor record`` wrote it) through the config's classes; a replay cannot read
  ``/proc`` of a recorded process, so its start time is unknown and the VRAM rule reports
  it but never picks it to be signalled. Classes that match on anything but ``name``
  (exe, cmdline, user, unit, slice, cgroup) cannot match here;
- the readings came at the trace's interval, not the config's ``poll_interval_s``: the gap in the
  readings that starts the ladder's and the fans' runs over (:mod:`governor.rules.gaps`) is
  reckoned from the trace's typical interval.

Times are the trace's ``t`` (seconds since the recording started).
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from governor.classes import MATCH_KEYS, format_size
from governor.config import Config, ConfigError, check_resolved
from governor.core import class_usage
from governor.model import Action, Decision, GpuHealth, ThermalZone
from governor.policy import Rung
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, evaluate
from governor.rules.power import target_w
from governor.rules.thermal import thresholds
from governor.trace import Trace
from governor.whatif.common import NOT_A_PID, NameInspector
from governor.whatif.series import GpuSeries, describe_change


@dataclass(frozen=True, slots=True)
class BudgetViolation:
    """A recorded process over its class budget on one GPU: the most it used (bytes) and for
    how long (seconds) it was over."""

    gpu_index: int
    pid: int
    name: str | None
    klass: str
    budget_bytes: int
    peak_bytes: int
    over_s: float
    first_t_s: float


@dataclass(frozen=True, slots=True)
class GpuReplay:
    """One GPU's summary: seconds in each zone, would-be limit changes, budget violations
    and would-be actions ((action, rule) -> count)."""

    gpu_index: int
    name: str
    duration_s: float
    zone_s: tuple[tuple[ThermalZone, float], ...]
    limit_changes: int
    violations: tuple[BudgetViolation, ...]
    actions: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Everything a replay decided and measured."""

    source: str
    config_source: str
    ticks: int
    decisions: tuple[Decision, ...]
    gpus: tuple[GpuReplay, ...]
    series: tuple[GpuSeries, ...]
    notes: tuple[str, ...]


def _rungs(rungs: Sequence[Rung]) -> str:
    """A configured ladder as text: ``[900, 800]`` (watts) or ``['100%', '90%']``."""
    return "[" + ", ".join(repr(r) if isinstance(r, str) else f"{r:g}" for r in rungs) + "]"


def _notes(config: Config, trace: Trace, plans: dict[str, GpuPlan]) -> list[str]:
    notes = ["open loop: the recorded GPU did not follow these decisions"]
    for plan in sorted(plans.values(), key=lambda p: p.info.index):
        power, info = plan.policy.power, plan.info
        if not power.enabled or power.target_mode or len(plan.ladder_w) != 1 or len(set(power.ladder_w)) < 2:
            continue
        notes.append(
            f"gpu{info.index} ({info.name}): power.ladder_w {_rungs(power.ladder_w)} resolves to one rung, "
            f"{plan.ladder_w[0]:g} W, within the card's {info.power_limit_min_w:g}-{info.power_limit_max_w:g} W: "
            "the power rule has no rung to step down to"
        )
    for klass in config.vram.classes:
        keys = [k for k in MATCH_KEYS if k != "name" and getattr(klass.match, k) is not None]
        if keys:
            notes.append(
                f"class {klass.name} matches on {', '.join(keys)}: a trace holds only process names, "
                "so it matches nothing here"
            )
    if any(s.reading.processes is None for samples in trace.samples.values() for s in samples):
        notes.append("some samples have no process list: VRAM budgets were not checked for them")
    return notes


def replay_trace(trace: Trace, config: Config) -> ReplayResult:
    """Feed every snapshot of ``trace`` through the rules under ``config``; see the module docstring.

    Raises ConfigError when the daemon would refuse ``config`` on the trace's cards (a ladder
    that would deep-cap one, contradicting overrides: :func:`governor.config.check_resolved`).
    """
    infos = {d.info.uuid: d.info for d in trace.devices.values() if d.info.index in trace.samples}
    issues = check_resolved(config, list(infos.values()))
    if issues:  # what the daemon refuses to start with on these cards (simulate refuses it too)
        raise ConfigError(issues)
    snapshots = list(trace.snapshots())
    intervals = [b.t_s - a.t_s for a, b in itertools.pairwise(snapshots)]
    typical_s = statistics.median(intervals) if intervals else _interval(trace)
    # The trace's own interval is the poll the rules see: a recording every 10 s has no gap every tick.
    plans = {uuid: GpuPlan.build(info, config.policy_for(info), typical_s) for uuid, info in infos.items()}
    by_index = {info.index: info for info in infos.values()}
    series = {
        i: GpuSeries(label=f"gpu{i}", gpu_index=i, zones=thresholds(plans[info.uuid].policy.thermal))
        for i, info in sorted(by_index.items())
    }
    vram = config.vram if config.vram.enabled else None
    classifier = NameInspector(NOT_A_PID)
    states: dict[str, GpuRuleState] = {}
    decisions: list[Decision] = []
    zone_s: dict[int, dict[ThermalZone, float]] = {i: dict.fromkeys(ThermalZone, 0.0) for i in by_index}
    over: dict[tuple[int, int, str | None], list[float]] = {}  # -> [peak bytes, seconds over, first t]
    over_class: dict[tuple[int, int, str | None], tuple[str, int]] = {}
    for k, snapshot in enumerate(snapshots):
        dt = intervals[k] if k < len(intervals) else typical_s
        facts = {
            p.pid: classifier.facts(p.pid, p.name, config.vram)
            for reading in snapshot.gpus
            for p in reading.processes or ()
            if p.pid > 0
        }
        states, decided = evaluate(
            snapshot, plans, states, dry_run=True, vram=vram, facts=facts if vram is not None else None
        )
        decisions.extend(decided)
        for reading in snapshot.gpus:
            plan = plans[reading.uuid]
            state = states.get(reading.uuid, NEW_STATE)
            zone_s[reading.index][state.zone] += dt
            s = series[reading.index]
            processes = reading.processes or ()
            classes, _, _ = class_usage(processes, facts, config.vram, rows=False)
            used = {c.name: c.used_bytes for c in classes}
            for p in processes if vram is not None else ():
                pf = facts.get(p.pid)
                klass = pf.klass if pf is not None else config.vram.default_class.name
                size = p.used_memory_bytes or 0
                budget = config.vram.class_named(klass).budget_bytes
                if budget is not None and size > budget:
                    key = (reading.index, p.pid, p.name)
                    entry = over.setdefault(key, [0.0, 0.0, snapshot.t_s])
                    entry[0] = max(entry[0], float(size))
                    entry[1] += dt
                    over_class[key] = (klass, budget)
            lost = reading.health is GpuHealth.LOST
            s.add(
                snapshot.t_s,
                None if lost else reading.temperature_c,
                reading.power_w,
                reading.power_limit_w,
                target_w(state.ladder, plan.ladder_w),
                used,
            )
        for d in decided:
            series[d.gpu_index].mark(d)
    gpus = []
    for i, info in sorted(by_index.items()):
        mine = [d for d in decisions if d.gpu_index == i]
        actions = Counter(f"{d.action.value} ({d.rule})" for d in mine if d.action is not Action.NONE)
        violations = tuple(
            BudgetViolation(
                gpu_index=i,
                pid=pid,
                name=name,
                klass=over_class[(gi, pid, name)][0],
                budget_bytes=over_class[(gi, pid, name)][1],
                peak_bytes=int(entry[0]),
                over_s=entry[1],
                first_t_s=entry[2],
            )
            for (gi, pid, name), entry in sorted(over.items(), key=lambda item: item[1][2])
            if gi == i
        )
        gpus.append(
            GpuReplay(
                gpu_index=i,
                name=info.name,
                duration_s=sum(zone_s[i].values()),
                zone_s=tuple((z, zone_s[i][z]) for z in ThermalZone if zone_s[i][z] > 0),
                limit_changes=sum(1 for d in mine if d.action is Action.SET_POWER_LIMIT),
                violations=violations,
                actions=tuple(sorted(actions.items())),
            )
        )
    return ReplayResult(
        source=trace.source,
        config_source=config.source,
        ticks=len(snapshots),
        decisions=tuple(decisions),
        gpus=tuple(gpus),
        series=tuple(series[i] for i in sorted(series)),
        notes=tuple(_notes(config, trace, plans)),
    )


def _interval(trace: Trace) -> float:
    """The recording interval in seconds from the device records (1 s when none says)."""
    for device in trace.devices.values():
        if device.interval_s:
            return device.interval_s
    return 1.0


def timeline_line(d: Decision) -> str:
    """One decision as a timeline line: time, GPU, rule, the change, then the rule's reason."""
    verb = "would " if d.action is not Action.NONE else ""
    change = describe_change(d)
    if d.action is Action.SET_POWER_LIMIT:
        change = f"set {change}"
    elif d.action in (Action.SIGNAL_TERM, Action.SIGNAL_KILL):
        change = f"{d.action.value} pid {d.pid}"
    return f"t={d.t_s:9.1f} s  gpu{d.gpu_index}  {d.rule:<22} {verb + change:<30}  {d.reason}"


def render_replay(result: ReplayResult) -> str:
    """The decision timeline, then one summary per GPU."""
    lines = [f"replay: {result.source}, {result.ticks} ticks, config {result.config_source}"]
    lines += [f"  note: {note}" for note in result.notes]
    lines += ["", f"decisions ({len(result.decisions)}):"]
    lines += [f"  {timeline_line(d)}" for d in result.decisions] or ["  none"]
    for g in result.gpus:
        lines += ["", f"gpu{g.gpu_index} ({g.name}), {g.duration_s:g} s:"]
        zones = ", ".join(
            f"{zone.value} {seconds:g} s ({100.0 * seconds / g.duration_s:.1f} %)"
            for zone, seconds in g.zone_s
            if g.duration_s > 0
        )
        lines.append(f"  time in zone: {zones or 'none'}")
        per_hour = g.limit_changes * 3600.0 / g.duration_s if g.duration_s > 0 else 0.0
        lines.append(f"  would-be limit changes: {g.limit_changes} ({per_hour:.2f} per hour)")
        if g.violations:
            lines.append(f"  budget violations: {len(g.violations)}")
            for v in g.violations:
                lines.append(
                    f"    pid {v.pid} ({v.name or '?'}), class {v.klass}: up to {format_size(v.peak_bytes)} "
                    f"> budget {format_size(v.budget_bytes)}, over for {v.over_s:g} s from t={v.first_t_s:g} s"
                )
        else:
            lines.append("  budget violations: none")
        actions = ", ".join(f"{name} x{n}" for name, n in g.actions)
        lines.append(f"  would-be actions: {actions or 'none'}")
    return "\n".join(lines) + "\n"


def replay_titles(result: ReplayResult) -> Sequence[str]:
    """A plot title for each GPU's series."""
    return [f"replay of {result.source} (gpu{g.gpu_index}, {g.name}) under {result.config_source}" for g in result.gpus]
