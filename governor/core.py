"""The governor's core: one step from a snapshot to a report of what it decided and did.

:meth:`Governor.step` reads nothing and logs nothing. It takes a snapshot the service
read, classifies the processes it lists, runs the pure rules, has the actuator apply
their decisions and returns a :class:`TickReport`: the decisions with their outcomes,
each GPU's status and per-class VRAM use (computed here, once) and the process rows.
Observers (governor.observers: the decision log, telemetry, the process table, the
sd_notify status line; governor.whatif: the recorders) each read that report; none of
them reaches into the governor.

The governor owns the plans, the rule states, the actuator (and through it the saved
original limits) and the process inspector. A reload builds a new governor from the new
config with :meth:`Governor.rebuilt`, which carries the rule states, the actuator and
its originals over: nothing a GPU was promised is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from governor.actuator import Actuator
from governor.backends import Backend
from governor.carryover import Reclamp, carry_over
from governor.classes import VramPolicy
from governor.clock import Clock
from governor.config import Config, ConfigError, ConfigIssue, check_resolved, deep_cap_problem
from governor.model import (
    ActionResult,
    ClassUsage,
    FanStatus,
    GpuHealth,
    GpuInfo,
    GpuReading,
    Outcome,
    ProcessReading,
    ProcessRow,
    Snapshot,
    StoppedUnitStatus,
    ThermalModelStatus,
    ThermalZone,
    UnitWarning,
    constructor,
    fast_init,
)
from governor.policy import FanMode
from governor.processes import ProcessFacts, ProcessInspector
from governor.rules.budget import BudgetState, apply_budget
from governor.rules.engine import NEW_STATE, GpuPlan, GpuRuleState, evaluate, rearm_drift, wanted_w
from governor.rules.gaps import max_gap_s
from governor.rules.vram import mig_pressure, under_pressure
from governor.safefile import check_private_dir
from governor.state import OriginalLimits
from governor.units import UnitManager
from governor.unitstate import StoppedUnitsStore, UnitKeeper

TICK = "tick"
"""A report of one tick: a snapshot went through the rules."""
RESTORE = "restore"
"""A report of restored limits (after a crash at start, or on stop): no rules ran."""

_FANS_UNSET = {mode: FanStatus(mode=mode.value) for mode in FanMode}
"""Per fan mode, the status of fans the governor may drive but has set no speed on (the card's
own control runs them): every tick of a GPU in ``auto`` mode, built once."""


@fast_init
@dataclass(frozen=True, slots=True)
class GpuTick:
    """One GPU as a tick left it: its reading (None when the snapshot has none), zone and
    ladder position, the limit the ladder wants (W), why it is monitor-only, per-class VRAM
    use, how many of its processes no class matched, whether its memory is under pressure
    (in MIG mode: any of its instances', ``mig_pressure`` naming them by UUID), its process rows
    (when per-process metrics are on) and whether its original limit is saved (False: left alone
    until it is; None: nothing to save yet)."""

    info: GpuInfo
    reading: GpuReading | None
    zone: ThermalZone
    zone_thresholds_c: tuple[tuple[ThermalZone, float], ...]
    ladder_w: tuple[float, ...]
    rung: int | None
    target_w: float | None
    monitor_only: str | None
    classes: tuple[ClassUsage, ...]
    unclassified_processes: int
    memory_pressure: bool | None
    processes: tuple[ProcessRow, ...]
    original_limit_saved: bool | None
    model: ThermalModelStatus | None = None
    fan: FanStatus = field(default_factory=FanStatus)
    mig_pressure: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GpuChanges:
    """GPUs that appeared or went away since the last tick, and the config contradictions
    (one line each) the new set of GPUs revealed."""

    appeared: tuple[GpuInfo, ...] = ()
    gone: tuple[str, ...] = ()
    contradictions: tuple[str, ...] = ()


@fast_init
@dataclass(frozen=True, slots=True)
class TickReport:
    """Everything one step decided and did; what every observer reads.

    ``kind`` is :data:`TICK` or :data:`RESTORE` (then ``snapshot`` may be None and ``gpus``
    is empty). ``wall_s`` is the wall-clock time of the step (s). ``results`` holds every
    decision with its outcome, in order; ``facts`` the classified processes by PID.
    ``hands_off`` and ``monitor_only`` map a GPU UUID to why it is left alone;
    ``state_error`` is the last failure to save the originals and ``state_warnings`` the
    saved entries rejected since the last report. ``stopped_units`` are the units the governor
    stopped and has not resumed, ``restart_loops`` the units in a kill-restart loop,
    ``unit_warnings`` units found this tick whose Restart= undoes a kill, ``systemd_error``
    why systemd cannot be reached (meaningful once ``systemd_asked``).
    """

    kind: str
    config: Config
    snapshot: Snapshot | None
    wall_s: float
    results: tuple[ActionResult, ...]
    gpus: tuple[GpuTick, ...] = ()
    facts: Mapping[int, ProcessFacts] = field(default_factory=dict)
    changes: GpuChanges | None = None
    inspect_errors: tuple[tuple[int, str], ...] = ()
    hands_off: Mapping[str, str] = field(default_factory=dict)
    monitor_only: Mapping[str, str] = field(default_factory=dict)
    state_error: str | None = None
    state_warnings: tuple[str, ...] = ()
    state_write_errors: int = 0
    backend: str = ""
    waiting_reason: str | None = None
    stopped_units: tuple[StoppedUnitStatus, ...] = ()
    restart_loops: tuple[str, ...] = ()
    unit_warnings: tuple[UnitWarning, ...] = ()
    systemd_error: str | None = None
    systemd_asked: bool = False


_new_gpu_tick = constructor(GpuTick)  # built every tick: keywords without a dict (governor.model.constructor)


class Inspector(Protocol):
    """What the governor asks of a process inspector (governor.processes.ProcessInspector)."""

    def mark_listing(self) -> None:
        """Note that the process list is about to be read."""
        ...

    def facts(self, pid: int, reported_name: str | None, policy: VramPolicy) -> ProcessFacts:
        """The facts and class of one process."""
        ...

    def forget_except(self, live: Iterable[int]) -> None:
        """Drop what is cached about processes not in ``live``."""
        ...

    def clear(self) -> None:
        """Drop everything cached (the classes changed)."""
        ...


def memory_only_originals(config: Config) -> bool:
    """True for a simulated run whose hardware lives in memory (no ``[simulation] state_file``).

    Its GPUs start from their defaults in every run, so their originals need not
    survive one, and a simulation never writes into a real governor's state_dir.
    """
    return config.backend == "simulated" and not config.simulation.state_file


def check_state_dirs(config: Config, euid: int | None = None) -> None:
    """When running as root, refuse a state_dir or runtime_dir that others own or may write.

    The governor writes files there as root and trusts what it reads back; a directory
    a user can write lets that user plant links or forge the saved originals.
    Raises ConfigError (exit 3 at start) with one line per directory naming the fix.
    """
    dirs = [("runtime_dir", config.runtime_dir)]
    if not memory_only_originals(config):
        dirs.insert(0, ("state_dir", config.state_dir))
    issues = []
    for key, directory in dirs:
        if not directory:
            continue
        problem = check_private_dir(Path(directory), euid)
        if problem is not None:
            issues.append(
                ConfigIssue(
                    config.source,
                    key,
                    "a directory owned by root and writable only by root, since the governor writes its "
                    f"state there as root (fix: chown root:root {directory} && chmod 755 {directory})",
                    problem,
                )
            )
    if issues:
        raise ConfigError(issues)


def open_stopped_units(config: Config) -> StoppedUnitsStore:
    """The saved list of stopped units of ``config``'s state_dir (none kept for an in-memory simulation)."""
    return StoppedUnitsStore(None if memory_only_originals(config) else config.state_dir)


def open_originals(config: Config) -> OriginalLimits:
    """The saved original limits of ``config``'s state_dir (in memory only for a simulation
    whose hardware lives in memory), after refusing directories others may write."""
    check_state_dirs(config)
    return OriginalLimits(None if memory_only_originals(config) else config.state_dir)


RESTART_ONLY = ("backend", "wait_for_driver", "state_dir", "runtime_dir", "metrics", "simulation")
"""Config keys a reload cannot change: the open backend (and whether it waited for the driver), the
directories checked and pinned at start (the originals' home, the process table's; systemd's
StateDirectory= and RuntimeDirectory=), the bound listener and the simulation it opened."""


def pinned_changes(old: Config, new: Config) -> tuple[Config, list[tuple[str, object, object]]]:
    """``new`` with every restart-only key (RESTART_ONLY) as in ``old``, and what it asked to change
    there: (dotted key, running value, requested value); a password hash is shown as "(hidden)"."""
    changes: list[tuple[str, object, object]] = []
    for key in RESTART_ONLY:
        running, requested = getattr(old, key), getattr(new, key)
        if running == requested:
            continue
        if is_dataclass(running):
            names = [f.name for f in fields(running) if getattr(running, f.name) != getattr(requested, f.name)]
            pairs = [(f"{key}.{n}", getattr(running, n), getattr(requested, n)) for n in names]
        else:
            pairs = [(key, running, requested)]
        changes += [(k, "(hidden)", "(hidden)") if "password" in k else (k, a, b) for k, a, b in pairs]
        new = replace(new, **{key: running})
    return new, changes


def as_config_error(exc: Exception, path: Path | None) -> ConfigError:
    """``exc`` (raised while loading ``path``) as a ConfigError: itself, or one issue naming its type."""
    if isinstance(exc, ConfigError):
        return exc
    why = f"{type(exc).__name__}: {exc}"[:160]
    return ConfigError([ConfigIssue(str(path), "", "a config the governor can read", why)])


def class_usage(
    processes: Iterable[ProcessReading], facts: Mapping[int, ProcessFacts], vram: VramPolicy, rows: bool
) -> tuple[tuple[ClassUsage, ...], int, tuple[ProcessRow, ...]]:
    """Per-class VRAM use (bytes, process count, count over budget, count whose use NVML did not
    report), the number of processes no class matched, and (when ``rows``) one row per process:
    the one place they are summed."""
    default = vram.default_class.name
    usage: dict[str, list[int]] = {}
    out: list[ProcessRow] = []
    unclassified = 0
    for process in processes:
        found = facts.get(process.pid)
        klass = found.klass if found is not None else default
        budget = vram.class_named(klass).budget_bytes
        used = process.used_memory_bytes
        entry = usage.get(klass)
        if entry is None:
            entry = usage[klass] = [0, 0, 0, 0]
        entry[0] += used or 0
        entry[1] += 1
        if budget is not None and used is not None and used > budget:
            entry[2] += 1
        if used is None:
            entry[3] += 1
        if klass == default:
            unclassified += 1
        if rows:
            out.append(
                ProcessRow(
                    pid=process.pid,
                    name=(found.name if found else process.name) or "",
                    klass=klass,
                    unit=(found.unit if found else None) or "",
                    used_bytes=used,
                    why=found.why if found else "",
                )
            )
    classes = tuple(ClassUsage(name, u, n, o, x) for name, (u, n, o, x) in sorted(usage.items()))
    return classes, unclassified, tuple(out)


def inspect_processes(
    snapshot: Snapshot, inspector: Inspector, vram: VramPolicy
) -> tuple[dict[int, ProcessFacts], tuple[tuple[int, str], ...]]:
    """Facts for every process any GPU reports (pid -> facts) and the errors (pid, why); one
    unreadable process never stops the tick."""
    facts: dict[int, ProcessFacts] = {}
    errors: list[tuple[int, str]] = []
    for reading in snapshot.gpus:
        for process in reading.processes or ():
            if process.pid in facts:
                continue
            try:
                facts[process.pid] = inspector.facts(process.pid, process.name, vram)
            except Exception as exc:  # a hostile /proc entry must not stop the loop
                errors.append((process.pid, str(exc)))
    inspector.forget_except(facts)
    return facts, tuple(errors)


def build_plans(config: Config, gpus: Iterable[GpuInfo]) -> dict[str, GpuPlan]:
    """Each GPU's plan. A GPU the ladder would deep-cap by surprise (one that appeared after
    start, where nothing can be refused any more) gets no ladder: never a silent cut."""
    plans = {}
    for gpu in gpus:
        policy = config.policy_for(gpu)
        if deep_cap_problem(policy.power, gpu) is not None:
            policy = replace(policy, power=replace(policy.power, enabled=False))
        plans[gpu.uuid] = GpuPlan.build(gpu, policy, config.reading_interval_s)
    return plans


class Governor:
    """Plans, rule states, the actuator and the process inspector; one :meth:`step` per tick."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        originals: OriginalLimits,
        *,
        inspector: Inspector | None = None,
        actuator: Actuator | None = None,
        states: Mapping[str, GpuRuleState] | None = None,
        gpus: tuple[GpuInfo, ...] | None = None,
        units: UnitManager | None = None,
        keeper: UnitKeeper | None = None,
    ) -> None:
        self.config = config
        # The rules' VRAM policy: off, as configured, or (global dry run) with its dry run on,
        # made once per governor (one per config) rather than on every tick.
        vram = config.vram if config.vram.enabled else None
        if vram is not None and config.dry_run and not vram.dry_run:
            vram = replace(vram, dry_run=True)
        self._rules_vram = vram
        self._max_gap_s = max_gap_s(config.reading_interval_s)  # the units' rule's gap limit, once per config
        self.backend = backend
        self.originals = originals
        self.gpus: tuple[GpuInfo, ...] = tuple(backend.gpus()) if gpus is None else gpus
        if actuator is None:
            actuator = Actuator(backend, originals, self.gpus, dry_run=config.dry_run, units=units)
        actuator.dry_run = config.dry_run
        self.actuator = actuator
        self.units = keeper if keeper is not None else UnitKeeper(open_stopped_units(config), actuator.units)
        actuator.before_stop = self.units.save_ahead  # no stop that a restart could not resume
        self.inspector: Inspector = inspector if inspector is not None else ProcessInspector()
        self.plans = build_plans(config, self.gpus)
        self.states: dict[str, GpuRuleState] = dict(states or {})
        self.budget = BudgetState()  # the node budget's shares (governor.rules.budget)
        self.facts: dict[int, ProcessFacts] = {}
        self.live = False  # True once started: a GPU that appears later gets its crash leftovers restored
        self.reclamps: dict[str, Reclamp] = {}  # GPU UUID -> the limit a reload moves it to (apply_reclamps)
        self._state_error: str | None = None

    def rebuilt(self, config: Config) -> Governor:
        """A new governor for ``config`` that carries this one's rule states, actuator (with the
        saved originals, hands-off and monitor-only GPUs) and inspector (emptied: the classes
        may have changed) over. Raises ConfigError, changing nothing, when ``config`` asks what
        these GPUs cannot do."""
        issues = check_resolved(config, self.gpus)
        if issues:
            raise ConfigError(issues)
        self.inspector.clear()
        new = Governor(
            config,
            self.backend,
            self.originals,
            inspector=self.inspector,
            actuator=self.actuator,
            states=self.states,
            gpus=self.gpus,
            keeper=self.units,
        )
        new.live, new.budget = self.live, self.budget
        lifted: tuple[dict[str, float], dict[str, float]] = ({}, {})
        if config.node.power_budget_w is None and self.config.node.power_budget_w is not None:
            new.budget, lifted = BudgetState(), (dict(self.budget.set_w), dict(self.budget.own_w))
        caps_w = self.actuator.caps_w()
        new.states, new.reclamps = carry_over(self.states, self.plans, new.plans, caps_w, lifted)
        return new

    def apply_reclamps(self, snapshot: Snapshot, wall_s: float) -> TickReport:
        """Set the limits a reload moved GPUs to (:attr:`reclamps`, governor.carryover), on ``snapshot``;
        a GPU without a reading now is left to the rules' drift check."""
        readings = {r.uuid: r for r in snapshot.gpus if r.health is not GpuHealth.LOST}
        moves = [c.decision(readings[uuid], snapshot.t_s) for uuid, c in self.reclamps.items() if uuid in readings]
        self.reclamps = {}
        return self._report(RESTORE, snapshot, wall_s, tuple(self.actuator.apply(moves, snapshot)), ())

    def contradictions(self) -> list[ConfigIssue]:
        """What the config asks that these GPUs cannot do (empty when nothing)."""
        return check_resolved(self.config, self.gpus)

    @property
    def waiting_reason(self) -> str | None:
        """Why the backend has no GPUs yet (the driver is not loaded), or None."""
        reason = self.backend.waiting_reason
        return str(reason) if reason else None

    def read(self) -> Snapshot:
        """Read every GPU; processes started after this are not charged (a reused PID)."""
        self.inspector.mark_listing()
        return self.backend.read()

    def restore(self, snapshot: Snapshot | None, t_s: float, reason: str, wall_s: float) -> TickReport:
        """Put every changed limit back (``reason``: restore_after_crash or restore_on_stop)."""
        results = self.actuator.restore(snapshot, t_s, reason)
        return self._report(RESTORE, snapshot, wall_s, tuple(results), ())

    def step(self, snapshot: Snapshot, wall_s: float | None = None) -> TickReport:
        """One tick on ``snapshot``: classify, decide, act, report. ``wall_s`` is the wall-clock
        time of the step (Unix seconds; the snapshot's own when None)."""
        if wall_s is None:
            wall_s = snapshot.wall_time_s
        changes, restored = self._follow_gpus(snapshot)
        facts, inspect_errors = inspect_processes(snapshot, self.inspector, self.config.vram)
        self.facts = facts
        config = self.config
        vram = self._rules_vram
        previous = self.states
        units = self.units
        self.states, decisions = evaluate(
            snapshot,
            self.plans,
            previous,
            dry_run=config.dry_run,
            vram=vram,
            facts=facts,
            stopped_units=units.stopped,
            fans_blocked=self.actuator.fans.monitor_only,
            caps_w=self.actuator.caps_w(),
        )
        decisions.extend(units.decide(snapshot, config.vram, facts, self._max_gap_s))
        if config.node.power_budget_w is not None:
            actuator = self.actuator
            self.budget, decisions = apply_budget(
                snapshot,
                self.plans,
                self.states,
                decisions,
                config.node,
                self.budget,
                unmovable={*actuator.monitor_only, *actuator.hands_off},
                dry_run=config.dry_run,
            )
        results = self.actuator.apply(decisions, snapshot)
        self._undo_unsaved_changes(previous, results)
        warnings = units.record(results, snapshot, wall_s, config.vram, facts)
        looping = [state.vram.loops_s for state in self.states.values() if state.vram.loops_s]
        loops = sorted({u for units_s in looping for u in units_s}) if looping else ()
        return self._report(
            TICK,
            snapshot,
            wall_s,
            (*restored, *results),
            self._gpu_ticks(snapshot),
            changes,
            inspect_errors,
            restart_loops=tuple(loops),
            unit_warnings=warnings,
        )

    def _report(
        self,
        kind: str,
        snapshot: Snapshot | None,
        wall_s: float,
        results: tuple[ActionResult, ...],
        gpus: tuple[GpuTick, ...],
        changes: GpuChanges | None = None,
        inspect_errors: tuple[tuple[int, str], ...] = (),
        restart_loops: tuple[str, ...] = (),
        unit_warnings: tuple[UnitWarning, ...] = (),
    ) -> TickReport:
        originals, fans, store = self.originals, self.actuator.fans.store, self.units.store
        for kept in (originals, fans, store):
            kept.keep()  # a saved file deleted or replaced under the governor is written again
        warnings: tuple[str, ...] = ()
        if originals.warnings or fans.warnings or store.warnings:  # usually none to drain
            warnings = (*originals.drain_warnings(), *fans.drain_warnings(), *store.drain_warnings())
        return TickReport(
            kind=kind,
            config=self.config,
            snapshot=snapshot,
            wall_s=wall_s,
            results=results,
            gpus=gpus,
            facts=self.facts,
            changes=changes,
            inspect_errors=inspect_errors,
            hands_off=dict(self.actuator.hands_off) if self.actuator.hands_off else {},
            monitor_only=dict(self.actuator.monitor_only) if self.actuator.monitor_only else {},
            state_error=originals.last_error or store.last_error or fans.last_error,
            state_warnings=warnings,
            state_write_errors=originals.write_errors + store.write_errors + fans.write_errors,
            backend=self.backend.name,
            waiting_reason=self.waiting_reason,
            stopped_units=self.units.statuses(snapshot, self.config.vram),
            systemd_error=self.actuator.units.error,
            systemd_asked=self.units.asked,
            restart_loops=restart_loops,
            unit_warnings=unit_warnings,
        )

    def _gpu_ticks(self, snapshot: Snapshot) -> tuple[GpuTick, ...]:
        readings = {r.uuid: r for r in snapshot.gpus}
        vram = self.config.vram
        rows = vram.per_process_metrics
        plans, states, facts = self.plans, self.states, self.facts
        monitor_only, fans_off = self.actuator.monitor_only, self.actuator.fans.monitor_only
        ticks = []
        for gpu in self.gpus:
            uuid = gpu.uuid
            plan = plans[uuid]
            state = states.get(uuid, NEW_STATE)
            reading = readings.get(uuid)
            if reading is not None and reading.processes:
                classes, unclassified, processes = class_usage(reading.processes, facts, vram, rows)
            else:
                classes, unclassified, processes = (), 0, ()
            ticks.append(
                _new_gpu_tick(
                    info=gpu,
                    reading=reading,
                    zone=state.zone,
                    zone_thresholds_c=plan.zone_thresholds_c,
                    ladder_w=plan.ladder_w,
                    rung=state.ladder.rung,
                    target_w=self._target_w(uuid, state, plan),
                    monitor_only=monitor_only.get(uuid),
                    classes=classes,
                    unclassified_processes=unclassified,
                    memory_pressure=None if reading is None else under_pressure(reading, vram),
                    processes=processes,
                    original_limit_saved=self._original_limit_saved(uuid),
                    model=_model_status(state) if plan.policy.power.target_mode else None,
                    fan=fan_status(plan, state, fans_off),
                    mig_pressure=_mig_pressure(reading, vram),
                )
            )
        return tuple(ticks)

    def _target_w(self, uuid: str, state: GpuRuleState, plan: GpuPlan) -> float | None:
        """The limit (W) the governor wants in force: its rule's, held to the node budget's share."""
        wanted = wanted_w(state, plan)
        if self.config.node.power_budget_w is None:
            return wanted
        share = self.budget.set_for(uuid)
        return wanted if share is None else share

    def _original_limit_saved(self, uuid: str) -> bool | None:
        """False while a GPU is left alone because its original could not be saved, True once saved, else None."""
        if uuid in self.actuator.hands_off:
            return False
        originals = self.originals
        return True if originals.get(uuid) is not None and originals.is_durable(uuid) else None

    def _follow_gpus(self, snapshot: Snapshot) -> tuple[GpuChanges | None, tuple[ActionResult, ...]]:
        """Pick up GPUs that appeared (a driver that loaded late) or went away."""
        gpus = tuple(self.backend.gpus())
        if gpus == self.gpus:
            return None, ()
        old = {g.uuid for g in self.gpus}
        new = {g.uuid for g in gpus}
        self.gpus = gpus
        changes = GpuChanges(
            appeared=tuple(g for g in gpus if g.uuid not in old),
            gone=tuple(sorted(old - new)),
            contradictions=tuple(str(issue) for issue in self.contradictions()),
        )
        self.plans = build_plans(self.config, gpus)
        for uuid in self.actuator.set_gpus(gpus) & self.states.keys():
            self.states[uuid] = rearm_drift(self.states[uuid])  # its wanted limit, refused so far, is applied
        appeared = new - old
        if appeared and self.live:
            return changes, tuple(self.actuator.restore(snapshot, snapshot.t_s, "restore_after_crash", only=appeared))
        return changes, ()

    def _undo_unsaved_changes(self, previous: Mapping[str, GpuRuleState], results: list[ActionResult]) -> None:
        """A limit or fan change refused because the GPU's original (its fan takeover) is not saved did
        not happen: the ladder (the fan state) goes back to where it was, so the rules decide the
        change again next tick (the retry)."""
        hands_off, fans_off = self.actuator.hands_off, self.actuator.fans.hands_off
        if not hands_off and not fans_off:
            return
        for result in results:
            uuid = result.decision.gpu_uuid
            if result.outcome is not Outcome.REFUSED or uuid not in self.states:
                continue
            before = previous.get(uuid, NEW_STATE)
            now = self.states[uuid]
            if result.decision.fan is not None and uuid in fans_off:
                self.states[uuid] = replace(now, fan=before.fan)
            elif result.decision.fan is None and uuid in hands_off:
                target = replace(
                    now.target,
                    limit_w=before.target.limit_w,
                    last_change_s=before.target.last_change_s,
                    changes_s=before.target.changes_s,
                )
                self.states[uuid] = replace(now, ladder=before.ladder, target=target)


def fan_status(plan: GpuPlan, state: GpuRuleState, fans_off: Mapping[str, str]) -> FanStatus:
    """The fan mode, the speeds the governor set, and why it cannot drive the fans (None when it can);
    ``fans_off``: GPU UUID -> why the actuator cannot drive that GPU's fans."""
    mode = plan.policy.fan.mode
    why = fans_off.get(plan.info.uuid) or state.fan.handed_back
    if why is None and mode is not FanMode.AUTO:
        why = plan.fan.no_fans
    targets = () if why else state.fan.targets
    if why is None and not targets:
        return _FANS_UNSET[mode]
    return FanStatus(mode=mode.value, targets_percent=targets, monitor_only=why)


def _model_status(state: GpuRuleState) -> ThermalModelStatus | None:
    """The target-mode model of a GPU for metrics and status: None before its first reading."""
    fit = state.target.fit
    model = fit.params
    if model is None:
        return None
    return ThermalModelStatus(
        fitted=fit.fitted is not None,
        r_total_c_per_w=model.r_total_c_per_w,
        ambient_c=model.ambient_c,
        tau_s=model.tau_s,
        prediction_error_c=fit.error_c,
        prediction_rmse_c=fit.error_rms_c,
    )


def restore_now(governor: Governor, reason: str, clock: Clock, *, force: bool = False) -> TickReport:
    """Put back every limit and fan ``governor`` changed (``reason``: restore_on_stop), on a fresh snapshot
    when one can be read, else without readings (every saved original is written, dated by ``clock``).
    ``force`` writes even in a dry run: a reload that turns the dry run on leaves nothing the enforcing
    run set in force (a dry-run stop only says what it would restore)."""
    try:
        snapshot: Snapshot | None = governor.read()
    except Exception:  # a fatal backend fails the writes below, which raise it
        snapshot = None
    actuator = governor.actuator
    dry_run, actuator.dry_run = actuator.dry_run, actuator.dry_run and not force
    try:
        t_s = clock.monotonic() if snapshot is None else snapshot.t_s
        return governor.restore(snapshot, t_s, reason, clock.wall())
    finally:
        actuator.dry_run = dry_run


def reclamp_now(governor: Governor, clock: Clock) -> TickReport | None:
    """Set the limits a reload moved GPUs to on a fresh snapshot (None when it moved none)."""
    if not governor.reclamps:
        return None
    return governor.apply_reclamps(governor.read(), clock.wall())


def read_error_indexes(snapshot: Snapshot) -> list[int]:
    """The indexes of GPUs whose reading in ``snapshot`` is not healthy."""
    return [r.index for r in snapshot.gpus if r.health is not GpuHealth.OK]


class Observer(Protocol):
    """Anything that reads the governor's reports."""

    def observe(self, report: TickReport) -> None:
        """Take in one report."""
        ...


def observe_all(observers: Sequence[Observer], report: TickReport, log: Any, failed: Callable[[], int]) -> None:
    """Hand ``report`` to every observer in turn. One that raises is logged (``observer_failed``)
    and counted by ``failed`` (the tick-failure counter), and the ones after it still see the
    report: a bug in the decision log on one odd process name must not leave the metrics
    stale or starve systemd's watchdog, which the last observer pings."""
    for observer in observers:
        try:
            observer.observe(report)
        except Exception as exc:
            log.exception("observer_failed", observer=type(observer).__name__, error=str(exc), failures=failed())


def status_line(report: TickReport | None, waiting_reason: str | None = None) -> str:
    """A one-line summary of the last report for systemd's STATUS= and humans."""
    waiting = report.waiting_reason if report is not None else waiting_reason
    if waiting:
        return f"waiting for the NVIDIA driver ({waiting}); retrying"
    if report is None or report.snapshot is None:
        return "starting"
    zones = {g.info.uuid: g.zone for g in report.gpus}
    parts = []
    for reading in report.snapshot.gpus:
        if reading.health is GpuHealth.LOST:
            parts.append(f"gpu{reading.index} lost")
            continue
        temp = "?" if reading.temperature_c is None else f"{reading.temperature_c:.0f}C"
        limit = "?" if reading.power_limit_w is None else f"{reading.power_limit_w:.0f}W"
        parts.append(f"gpu{reading.index} {temp} {zones.get(reading.uuid, ThermalZone.UNKNOWN).value} {limit}")
    prefix = "dry-run; " if report.config.dry_run else ""
    return f"{prefix}governing {len(report.snapshot.gpus)} GPU(s): " + ", ".join(parts)


def _mig_pressure(reading: GpuReading | None, vram: VramPolicy) -> tuple[str, ...]:
    """The UUIDs of the reading's MIG instances under memory pressure (none for a GPU not read per instance)."""
    if reading is None or not reading.mig_instances:
        return ()
    return tuple(i.uuid for i in mig_pressure(reading, vram))
