"""Units the governor stopped, and when to start them again (pure).

A ``stop-unit`` class's unit is stopped by the VRAM rule (:mod:`governor.rules.vram`);
once the actuator reports the stop done, :func:`record_stop` puts the unit here. Each tick
:func:`evaluate_units` decides for every stopped unit:

* its class (by name, after any reload) must still be ``stop-unit`` with ``resume = true``;
  otherwise the unit stays stopped (the admin starts it);
* a unit whose processes are on a GPU again was started by someone else: it is forgotten;
* the condition is *clear* on every GPU it held memory on when no GPU is under memory
  pressure and starting it again would not break the reserve by its class's budget:
  ``free - budget >= reserve`` and ``(used + budget) / total <= pressure_used_ratio``.
  On a GPU in MIG mode whose instances were read, that is judged per MIG instance: in every
  instance the unit's processes ran in when it was stopped (``mig_instances``) that is still
  there, else (none recorded, or all gone: a layout changed since, or a restart of the governor
  that lost none) in at least one instance, since where it will run is not known;
* once clear for the unit's resume delay without a break, a ``start_unit`` decision. A gap in
  the ticks longer than :func:`~governor.rules.gaps.max_gap_s` (a frozen or stalled
  daemon), or a clock that went backwards, is a break: the clear run starts again at the tick
  after it (time nobody read is no evidence of room).
  A failed start is tried again after the delay (at least ``RETRY_MIN_S``).

Backoff, as the power ladder's anti-flap: a unit stopped again within its class's
``flap_window_s`` of its last resume waits twice its previous delay (up to
``resume_after_max_s``); otherwise ``resume_after_s``.

Time comes from the snapshot (``t_s``); ``stopped_wall_s`` is for people (and survives a
restart of the governor, where monotonic times do not: a unit loaded from the state file
starts its clear time afresh).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from governor.model import Decision, GpuHealth, MigInstanceReading, ProcessFacts, Snapshot
from governor.policy import Action, ProcessAction, ProcessClass, Rule, VramPolicy, format_seconds, format_size
from governor.rules.gaps import DEFAULT_MAX_GAP_S, after_gap

RETRY_MIN_S = 10.0
"""A failed start is tried again after the unit's delay, and never sooner than this (s)."""
PRESSURE = "memory_pressure"
OVER_BUDGET = "over_budget"


@dataclass(frozen=True, slots=True)
class StoppedUnit:
    """A unit the governor stopped: its class, why (``memory_pressure`` or ``over_budget``),
    the GPUs (UUIDs) it held memory on, when it was stopped (Unix time, s), its resume delay (s),
    since when (snapshot time, s) the condition has been clear, and the earliest retry after a
    failed start (snapshot time, s); ``pids`` its processes when stopped: they may stay listed
    while they exit, and do not make the unit "running again"; ``mig_instances`` the UUIDs of the
    MIG instances its processes ran in (GPUs in MIG mode only)."""

    unit: str
    klass: str
    reason: str
    gpus: tuple[str, ...]
    stopped_wall_s: float
    delay_s: float
    clear_since_s: float | None = None
    retry_at_s: float | None = None
    pids: tuple[int, ...] = ()  # its processes when it was stopped (still listed while they exit)
    mig_instances: tuple[str, ...] = ()  # the MIG instances (UUIDs) its processes ran in


@dataclass(frozen=True, slots=True)
class Resumed:
    """When a unit was last started again (snapshot time, s) and the delay it had waited (s)."""

    at_s: float
    delay_s: float


@dataclass(frozen=True, slots=True)
class UnitsState:
    """Every unit the governor stopped and has not resumed, and the last resume of each unit."""

    stopped: Mapping[str, StoppedUnit] = field(default_factory=dict)
    resumed: Mapping[str, Resumed] = field(default_factory=dict)
    last_t_s: float | None = None  # the snapshot time of the last tick that judged a stopped unit


def resume_delay_s(klass: ProcessClass, previous: Resumed | None, t_s: float) -> float:
    """The resume delay of a unit stopped at ``t_s`` (s): doubled when stopped again within the
    class's flap window after its last resume, up to ``resume_after_max_s``."""
    base = klass.resume_after_s
    if previous is None or klass.flap_window_s <= 0 or t_s - previous.at_s >= klass.flap_window_s:
        return base
    return min(max(previous.delay_s * 2.0, base), max(klass.resume_after_max_s, base))


def record_stop(
    state: UnitsState,
    decision: Decision,
    klass: ProcessClass,
    t_s: float,
    wall_s: float,
    pressure: bool,
    pids: tuple[int, ...] = (),
    mig_instances: tuple[str, ...] = (),
) -> UnitsState:
    """``state`` with the unit of an applied ``stop_unit`` decision added (or its GPU added);
    ``pids`` are the unit's processes seen now, ``mig_instances`` the MIG instances they run in."""
    unit = decision.unit
    if unit is None:
        return state
    stopped = dict(state.stopped)
    known = stopped.get(unit)
    if known is not None:
        if decision.gpu_uuid not in known.gpus:
            known = replace(known, gpus=(*known.gpus, decision.gpu_uuid))
        instances = (*known.mig_instances, *(i for i in mig_instances if i not in known.mig_instances))
        stopped[unit] = replace(known, pids=tuple(sorted({*known.pids, *pids})), mig_instances=instances)
        return replace(state, stopped=stopped)
    stopped[unit] = StoppedUnit(
        unit=unit,
        klass=klass.name,
        reason=PRESSURE if pressure else OVER_BUDGET,
        gpus=(decision.gpu_uuid,),
        stopped_wall_s=wall_s,
        delay_s=resume_delay_s(klass, state.resumed.get(unit), t_s),
        pids=tuple(sorted(pids)),
        mig_instances=tuple(dict.fromkeys(mig_instances)),
    )
    return replace(state, stopped=stopped)


def record_start(state: UnitsState, unit: str, t_s: float, started: bool) -> UnitsState:
    """``state`` after a ``start_unit`` decision: forgotten when ``started``, else retried later."""
    known = state.stopped.get(unit)
    if known is None:
        return state
    stopped = dict(state.stopped)
    if not started:
        stopped[unit] = replace(known, retry_at_s=t_s + max(known.delay_s, RETRY_MIN_S))
        return replace(state, stopped=stopped)
    del stopped[unit]
    return UnitsState(stopped=stopped, resumed={**state.resumed, unit: Resumed(t_s, known.delay_s)})


def forget(state: UnitsState, unit: str) -> UnitsState:
    """``state`` without ``unit`` (started by someone else)."""
    return replace(state, stopped={u: s for u, s in state.stopped.items() if u != unit})


def room(entry: StoppedUnit, klass: ProcessClass, snapshot: Snapshot, policy: VramPolicy) -> tuple[bool, str]:
    """Whether the unit's budget fits above the reserve on every GPU it used, and why (text)."""
    readings = {r.uuid: r for r in snapshot.gpus}
    budget = klass.budget_bytes or 0
    parts = []
    for uuid in entry.gpus:
        reading = readings.get(uuid)
        if reading is None or reading.health is GpuHealth.LOST:
            return False, f"GPU {uuid} is not readable"
        if reading.mig_instances is not None:
            clear, why = _instance_room(entry, reading.index, reading.mig_instances, budget, policy)
        else:
            clear, why = _fits(
                f"GPU {reading.index}", reading.memory_used_bytes, reading.memory_total_bytes, budget, policy
            )
        if not clear:
            return False, why
        parts.append(why)
    return True, "; ".join(parts)


def _fits(where: str, used: int | None, total: int | None, budget: int, policy: VramPolicy) -> tuple[bool, str]:
    """Whether ``budget`` more bytes fit above the reserve at ``where`` (a GPU or a MIG instance), and why."""
    if used is None or not total:
        return False, f"{where} reports no memory use"
    free = total - used
    need = policy.reserve_bytes + budget
    if free < need:
        return False, (
            f"{where} has {format_size(max(0, free))} free < reserve "
            f"{format_size(policy.reserve_bytes)} + budget {format_size(budget)}"
        )
    if (used + budget) / total > policy.pressure_used_ratio:
        return False, (
            f"{where} would be {(used + budget) / total:.0%} used "
            f"> {policy.pressure_used_ratio:.0%} with the budget {format_size(budget)}"
        )
    return True, (
        f"{where} has {format_size(free)} free >= reserve {format_size(policy.reserve_bytes)} "
        f"+ budget {format_size(budget)}"
    )


def _instance_room(
    entry: StoppedUnit, index: int, instances: tuple[MigInstanceReading, ...], budget: int, policy: VramPolicy
) -> tuple[bool, str]:
    """Whether the unit's budget fits in the MIG instances of GPU ``index``: in each instance it ran in that
    is still there, else (none of them known) in at least one."""
    judged = [
        (i, *_fits(f"GPU {index} MIG instance {i.uuid}", i.memory_used_bytes, i.memory_total_bytes, budget, policy))
        for i in instances
    ]
    known = [j for j in judged if j[0].uuid in entry.mig_instances]
    if known:
        refused = [why for _, fits, why in known if not fits]
        return (False, refused[0]) if refused else (True, "; ".join(why for *_, why in known))
    fitting = [why for _, fits, why in judged if fits]
    if fitting:
        return True, fitting[0]
    if not judged:
        return False, f"GPU {index} is in MIG mode without MIG instances"
    return False, f"GPU {index}: no MIG instance has room ({'; '.join(why for *_, why in judged)})"


def resumable(klass: ProcessClass, entry: StoppedUnit) -> bool:
    """True when the unit's class (by name, now) still asks for it to be resumed."""
    return klass.name == entry.klass and klass.action is ProcessAction.STOP_UNIT and klass.resume


def evaluate_units(
    snapshot: Snapshot,
    state: UnitsState,
    policy: VramPolicy,
    facts: Mapping[int, ProcessFacts],
    max_gap_s: float = DEFAULT_MAX_GAP_S,
) -> tuple[UnitsState, list[Decision]]:
    """Decide which stopped units to start again this tick (see the module docstring). ``max_gap_s``:
    the longest time (s) between two ticks of one clear run (:func:`~governor.rules.gaps.max_gap_s`)."""
    if not state.stopped:
        return state, []  # nothing stopped: nothing to resume (the common tick, kept cheap)
    t_s = snapshot.t_s
    gap = after_gap(state.last_t_s, t_s, max_gap_s) or (state.last_t_s is not None and t_s < state.last_t_s)
    indexes = {r.uuid: r.index for r in snapshot.gpus}
    stopped = dict(state.stopped)
    decisions: list[Decision] = []
    for unit, entry in state.stopped.items():
        uuid = entry.gpus[0] if entry.gpus else ""
        base = Decision(
            t_s=t_s,
            gpu_index=indexes.get(uuid, -1),
            gpu_uuid=uuid,
            rule=Rule.UNIT_RESUME,
            action=Action.NONE,
            reason="",
            process_class=entry.klass,
            unit=unit,
        )
        if any(f.unit == unit and f.pid not in entry.pids for f in facts.values()):
            del stopped[unit]
            decisions.append(
                replace(base, reason=f"unit {unit} runs on a GPU again (started by someone else): no longer resumed")
            )
            continue
        klass = policy.class_named(entry.klass)
        if not resumable(klass, entry):
            stopped[unit] = replace(entry, clear_since_s=None)
            continue
        clear, why = room(entry, klass, snapshot, policy)
        if not clear:
            stopped[unit] = replace(entry, clear_since_s=None)
            continue
        since = t_s if entry.clear_since_s is None or gap else entry.clear_since_s
        stopped[unit] = replace(entry, clear_since_s=since)
        if t_s - since < entry.delay_s or (entry.retry_at_s is not None and t_s < entry.retry_at_s):
            continue
        reason = (
            f"clear for {format_seconds(t_s - since)} (resume_after {format_seconds(entry.delay_s)}): {why}: "
            f"start unit {unit}"
        )
        decisions.append(
            replace(base, action=Action.START_UNIT, reason=reason, threshold=float(klass.budget_bytes or 0))
        )
    return replace(state, stopped=stopped, last_t_s=t_s), decisions


def resume_at_s(entry: StoppedUnit, klass: ProcessClass, t_s: float) -> float | None:
    """When (snapshot time, s) the unit will be started if the condition stays clear; None
    while it is not clear or the class does not resume it."""
    if not resumable(klass, entry) or entry.clear_since_s is None:
        return None
    at = entry.clear_since_s + entry.delay_s
    if entry.retry_at_s is not None:
        at = max(at, entry.retry_at_s)
    return max(at, t_s)
