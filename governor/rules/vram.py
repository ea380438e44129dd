"""Per-process VRAM budgets (pure): report, then escalate, never storm.

For every process on every GPU with a class budget:

* over budget for the first time: one ``over_budget`` decision (report);
* still over after the class's ``grace_s``: the class's action. ``terminate`` sends
  SIGTERM, then SIGKILL once ``kill_after_s`` has passed and the process is still
  there and still over; ``kill`` sends SIGKILL; ``observe`` only reports;
* under memory pressure (free VRAM below the reserve, or used above
  ``pressure_used_ratio``) an over-budget process is acted on without waiting for
  its grace, lowest priority first (then the largest overrun);
* a GPU in MIG mode whose MIG instances were read (``GpuReading.mig_instances``) is judged
  per instance: the reserve and the ratio apply to each instance's own memory, and a process
  is a pressure candidate only when an instance it runs in is under pressure (the parent's
  aggregate is not judged). Its budgets stay per process and per GPU: the backend sums a
  process's bytes over the instances of the GPU it runs in;
* at most one new victim per memory pool per ``cooldown_s``: VRAM is freed with a lag, and
  the next tick's fresh reading is the re-check before choosing another, so only as
  many processes are stopped as needed. A memory pool (:func:`memory_pools`) is the whole GPU,
  or on a GPU whose MIG instances were read each GPU instance (its compute instances share its
  memory; a MIG device whose GPU instance is unknown is a pool of its own), so pressure in one
  instance neither holds back nor hurries the victim of another. A victim taken for pressure
  before its grace counts against the pools under pressure it runs in; one past its grace,
  against any pool it runs in; either cools every pool it runs in (a process no instance lists:
  the GPU's own pool). Escalating a victim already chosen (SIGTERM -> SIGKILL) is not held back
  by the cooldown;
* protected processes (PID 1, kernel threads, the governor, display servers, protected
  classes) and processes whose identity (start time) is unknown are reported, never
  signalled;
* a class whose action signals but which matches only on keys a process chooses itself
  (name, cmdline) acts as ``observe`` (:attr:`ProcessClass.enforced_action`);
* a process that started after the GPU listing (a reused PID) is neither charged nor
  signalled that tick, and one whose class match timed out is not signalled that tick;
* ``stop-unit`` classes: the process's systemd *system* unit is stopped (a ``stop_unit``
  decision, carried out through D-Bus by the actuator), never its PIDs signalled. Under
  memory pressure a stop-unit process is a candidate even within its budget: the unit
  makes room, lowest priority first, one per cooldown. A unit the governor already stopped
  (``stopped_units``) or stopped on this GPU within the cooldown is not stopped again.
  Processes of user sessions (under ``user.slice``) and processes without a unit are
  reported, never stopped; resuming is :mod:`governor.rules.units`' job;
* a process that goes back within its budget, drops off the GPU's listing, or whose usage
  NVML cannot say (None) for a while keeps its escalation for its class's ``max(grace_s,
  kill_after_s)`` after it was last seen over budget: over budget again within that time,
  it is neither reported again nor given a new grace, and a SIGKILL due since its SIGTERM
  is sent at once (hovering at the budget edge, or dipping under it for a tick after the
  SIGTERM, does not restart the escalation). Within budget that long, it starts afresh.
  At most :data:`REMEMBERED_OFFENDERS_MAX` such offenders are kept per GPU (the ones
  seen over budget longest ago are forgotten first), so the state cannot grow without bound;
* several GPUs: a budget is per GPU, but signals are per process. A process the rule of
  another GPU already sent SIGTERM (or SIGKILL) counts as signalled here too
  (``signalled``, built by :func:`signalled_processes`): no second SIGTERM, and its SIGKILL
  comes ``kill_after_s`` after the first SIGTERM, once. Such a signal also starts the
  cooldown of the pools it runs in on this GPU (the process frees its memory here too);
* dry run: signals a dry run only "would send" are recorded as such (:attr:`Offender.dry_run`);
  once the run is live (a reload), they count as never sent: the first real signal is a
  SIGTERM (a ``kill`` class: a SIGKILL), and a SIGKILL follows ``kill_after_s`` after it;
* ties under pressure (same priority, same overrun) go to the newest process (latest start
  time, then highest pid), whatever the order of the listing;
* a SIGKILL that does not end the process (one in uninterruptible sleep in the driver, a zombie
  whose memory another holder keeps, a PID the signal cannot reach): the same process (pid and
  start time) still listed and over budget ``kill_after_s`` (at least :data:`KILL_RECHECK_MIN_S`)
  after its first real SIGKILL is reported (``vram_kill_ineffective``) and sent SIGKILL again,
  then again at most once per that time, :data:`KILL_RETRIES_MAX` times in all; still so that
  long after the last, it is reported once more (``vram_kill_given_up``) and left alone. A dry
  run's would-be SIGKILL never counts as a real one: it starts no such report, and once the run
  is live the SIGKILL is sent for real (at once, when due). In a dry run a real SIGKILL that did
  not work is still reported, its retries "would" only. Processes on several GPUs get one report
  and one SIGKILL per retry, not one per GPU;
* kill-restart loops (signalling classes): a system unit whose processes were signalled
  ``restart_loop_count`` times within ``restart_loop_window_s`` and that is over budget again
  is reported once (``unit_restart_loop``) and its processes are signalled no more, until
  none of them has been over budget for that window.

A budget is per process and per GPU (see :mod:`governor.policy`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from governor.model import Decision, GpuReading, MigInstanceReading, ProcessFacts, ProcessReading
from governor.policy import (
    SIGNAL_ACTIONS,
    Action,
    ProcessAction,
    ProcessClass,
    Rule,
    VramPolicy,
    format_seconds,
    format_size,
    session_unit,
)

OffenderKey = tuple[str, int, int | None]
"""(GPU UUID, pid, start time): one process on one GPU."""
ProcessKey = tuple[int, int]
"""(pid, start time): one process, whatever the GPU."""
REMEMBERED_OFFENDERS_MAX = 1024
"""Offenders not over budget in this tick (within budget, off the listing) kept per GPU, at most."""
KILL_RETRIES_MAX = 3
"""SIGKILLs sent again, at most, to a process still listed and over budget ``kill_after_s`` after its
last one; then the governor gives up on it (one ``vram_kill_given_up``)."""
KILL_RECHECK_MIN_S = 5.0
"""The least time (s) between a SIGKILL and the finding that it did not work, and between two retries,
whatever ``kill_after_s`` (0 is allowed): tearing down a large GPU context can take seconds."""
KILL_FOLLOW_UPS = frozenset({Rule.VRAM_KILL_INEFFECTIVE, Rule.VRAM_KILL_GIVEN_UP})
"""The rules about a process that outlived its SIGKILL (the actuator reads its /proc state for them)."""


@dataclass(frozen=True, slots=True)
class Offender:
    """A process over its budget on one GPU, and how far its escalation went.

    ``last_over_s``: the last tick it was seen over budget (None: ``over_since_s``);
    ``forget_after_s``: how long after that it is remembered while not over budget (s);
    ``dry_run``: the signals recorded were only "would send" (a dry run);
    ``killed_s``: when the first SIGKILL decided outside a dry run was (``kill_sent_s`` may be a
    would-be one); ``kill_checked_s``: when it was last found still there and over budget after
    it (``vram_kill_ineffective``); ``kill_retries``: the SIGKILLs sent again since (a dry run's
    "would" included); ``kill_given_up``: no more are sent (``vram_kill_given_up`` logged). Times
    in seconds on the snapshot clock.
    """

    over_since_s: float
    term_sent_s: float | None = None
    kill_sent_s: float | None = None
    last_over_s: float | None = None
    forget_after_s: float = 0.0
    dry_run: bool = False
    killed_s: float | None = None
    kill_checked_s: float | None = None
    kill_retries: int = 0
    kill_given_up: bool = False

    def remembered_at(self, t_s: float) -> bool:
        """True while a process not over budget at ``t_s`` keeps this escalation."""
        last = self.over_since_s if self.last_over_s is None else self.last_over_s
        return t_s - last < self.forget_after_s


def signalled_processes(
    states: Iterable[VramState], known: Mapping[ProcessKey, Offender] | None = None
) -> dict[ProcessKey, Offender]:
    """(pid, start time) -> the earliest SIGTERM and SIGKILL any GPU's rule sent that process
    (only processes sent one), from ``states`` added to ``known``; the ``signalled`` argument of
    :func:`evaluate_vram`."""
    out: dict[ProcessKey, Offender] = dict(known) if known else {}
    for state in states:
        for (_, pid, start), offender in state.offenders.items():
            if start is None or (offender.term_sent_s is None and offender.kill_sent_s is None):
                continue
            seen = out.get((pid, start))
            out[(pid, start)] = offender if seen is None else _adopted(seen, offender)
    return out


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _signalled(offender: Offender) -> bool:
    return offender.term_sent_s is not None or offender.kill_sent_s is not None


def _adopted(offender: Offender, other: Offender) -> Offender:
    """``offender`` with the signals ``other`` (the same process, another GPU) records, earliest first,
    and the SIGKILL retries either made (the latest, the most)."""
    term = _earliest(offender.term_sent_s, other.term_sent_s)
    kill = _earliest(offender.kill_sent_s, other.kill_sent_s)
    killed = _earliest(offender.killed_s, other.killed_s)
    checked = _latest(offender.kill_checked_s, other.kill_checked_s)
    retries = max(offender.kill_retries, other.kill_retries)
    given_up = offender.kill_given_up or other.kill_given_up
    if (term, kill, killed, checked, retries, given_up) == (
        offender.term_sent_s,
        offender.kill_sent_s,
        offender.killed_s,
        offender.kill_checked_s,
        offender.kill_retries,
        offender.kill_given_up,
    ):
        return offender
    dry = offender.dry_run
    if (term, kill) != (offender.term_sent_s, offender.kill_sent_s):
        dry = other.dry_run and (offender.dry_run or not _signalled(offender))
    return replace(
        offender,
        term_sent_s=term,
        kill_sent_s=kill,
        dry_run=dry,
        killed_s=killed,
        kill_checked_s=checked,
        kill_retries=retries,
        kill_given_up=given_up,
    )


def _sent(
    offender: Offender, dry: bool, *, term_sent_s: float | None = None, kill_sent_s: float | None = None
) -> Offender:
    """``offender`` with a signal recorded (``term_sent_s`` or ``kill_sent_s``); ``dry``: only "would send"."""
    dry_run = dry and (offender.dry_run or not _signalled(offender))
    if kill_sent_s is None:
        return replace(offender, term_sent_s=term_sent_s, dry_run=dry_run)
    # A real SIGKILL is also ``killed_s``; a dry run's would-be one never counts as one.
    killed_s = kill_sent_s if not dry and offender.killed_s is None else offender.killed_s
    return replace(offender, kill_sent_s=kill_sent_s, killed_s=killed_s, dry_run=dry_run)


@dataclass(frozen=True, slots=True)
class VramState:
    """What the VRAM rule remembers between ticks."""

    offenders: Mapping[OffenderKey, Offender] = field(default_factory=dict)
    last_victim_s: Mapping[str, float] = field(default_factory=dict)  # per memory pool (memory_pools)
    unit_signals_s: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # unit -> first signals, in window
    loops_s: Mapping[str, float] = field(default_factory=dict)  # unit in a kill-restart loop -> last seen over budget
    unit_stops_s: Mapping[str, float] = field(default_factory=dict)  # unit -> last stop decided on this GPU


@dataclass(frozen=True, slots=True)
class _Candidate:
    key: OffenderKey
    process: ProcessReading
    used_bytes: int
    facts: ProcessFacts
    klass: ProcessClass


def memory_full(used_bytes: int | None, total_bytes: int | None, policy: VramPolicy) -> bool:
    """True when free memory (bytes) is below the reserve or the used ratio is above the threshold;
    never when either is unknown or more is used than there is (a broken answer)."""
    if used_bytes is None or not total_bytes or used_bytes > total_bytes:
        return False
    return total_bytes - used_bytes < policy.reserve_bytes or used_bytes / total_bytes > policy.pressure_used_ratio


def under_pressure(reading: GpuReading, policy: VramPolicy) -> bool:
    """True when the GPU's memory is full (:func:`memory_full`); for a GPU whose MIG instances were
    read, when any instance's is (:func:`mig_pressure`: the parent's aggregate is not judged)."""
    instances = reading.mig_instances
    if instances is not None:
        return any(memory_full(i.memory_used_bytes, i.memory_total_bytes, policy) for i in instances)
    return memory_full(reading.memory_used_bytes, reading.memory_total_bytes, policy)


def mig_pressure(reading: GpuReading, policy: VramPolicy) -> tuple[MigInstanceReading, ...]:
    """The MIG instances of ``reading`` under memory pressure (none for a GPU whose instances were not read)."""
    return tuple(
        i for i in reading.mig_instances or () if memory_full(i.memory_used_bytes, i.memory_total_bytes, policy)
    )


def pressed_processes(reading: GpuReading, policy: VramPolicy) -> tuple[str | None, dict[int, str]]:
    """Which processes are under memory pressure, and why (text): ``(why, {})`` when the whole GPU is
    (every process is); ``(None, pid -> why)`` for the processes in a MIG instance under pressure;
    ``(None, {})`` when none is."""
    if reading.mig_instances is None:
        return (_free_text(reading) if under_pressure(reading, policy) else None), {}
    pressed: dict[int, str] = {}
    for instance in mig_pressure(reading, policy):
        used, total = instance.memory_used_bytes, instance.memory_total_bytes
        assert used is not None and total is not None  # memory_full holds only on known values
        why = f"memory pressure on MIG instance {instance.uuid} ({format_size(max(0, total - used))} free)"
        for process in instance.processes:
            pressed.setdefault(process.pid, why)
    return None, pressed


def _pool(reading: GpuReading, instance: MigInstanceReading) -> str:
    """The memory pool of a MIG device: its GPU instance (whose compute instances share its memory),
    or the device itself when that is unknown; named under the GPU's UUID."""
    if instance.gpu_instance_id is None:
        return f"{reading.uuid}/{instance.uuid}"
    return f"{reading.uuid}/gi{instance.gpu_instance_id}"


def memory_pools(reading: GpuReading) -> dict[int, tuple[str, ...]]:
    """pid -> the memory pools it runs in on this GPU, each named by a key of
    :attr:`VramState.last_victim_s`: the GPU's UUID when its MIG instances were not read (and for a
    process no instance lists), else ``UUID/giN`` per GPU instance (``UUID/MIG-...`` per MIG device
    whose GPU instance is unknown). The cooldown and the one-victim-a-tick guard hold per pool."""
    pools: dict[int, tuple[str, ...]] = {}
    for instance in reading.mig_instances or ():
        pool = _pool(reading, instance)
        for process in instance.processes:
            known = pools.get(process.pid, ())
            if pool not in known:
                pools[process.pid] = (*known, pool)
    return pools


def _pressed_pools(reading: GpuReading, policy: VramPolicy) -> frozenset[str]:
    """The memory pools of ``reading`` under memory pressure (:func:`memory_pools`)."""
    if reading.mig_instances is None:
        return frozenset({reading.uuid}) if under_pressure(reading, policy) else frozenset()
    return frozenset(_pool(reading, i) for i in mig_pressure(reading, policy))


def _kept_pools(
    last_victim_s: Mapping[str, float], reading: GpuReading, cooldown_s: float, t_s: float
) -> dict[str, float]:
    """``last_victim_s`` less this GPU's MIG pools that are gone (or not read now) and cooled down: a
    layout that changes cannot grow the state without bound."""
    prefix = f"{reading.uuid}/"
    now = {_pool(reading, i) for i in reading.mig_instances or ()}
    return {
        pool: last
        for pool, last in last_victim_s.items()
        if not pool.startswith(prefix) or pool in now or t_s - last < cooldown_s
    }


def _victim_order(item: tuple[_Candidate, Offender]) -> tuple[int, int, int, int]:
    """Lowest priority first, then the largest overrun; ties: the newest process, whatever the listing order."""
    c = item[0]
    return (c.klass.priority, -(c.used_bytes - (c.klass.budget_bytes or 0)), -(c.facts.start_time or 0), -c.process.pid)


def _decision(
    reading: GpuReading,
    c: _Candidate,
    t_s: float,
    rule: Rule,
    action: Action,
    reason: str,
    *,
    dry_run: bool,
    unit: str | None = None,
    kill_sent_s: float | None = None,
) -> Decision:
    return Decision(
        t_s=t_s,
        gpu_index=reading.index,
        gpu_uuid=reading.uuid,
        rule=rule,
        action=action,
        reason=reason,
        reading=float(c.used_bytes),
        threshold=None if c.klass.budget_bytes is None else float(c.klass.budget_bytes),
        process_name=c.facts.name,
        pid=c.process.pid,
        process_start_time=c.facts.start_time,
        process_class=c.klass.name,
        dry_run=dry_run,
        unit=unit,
        kill_sent_s=kill_sent_s,
    )


def _describe(c: _Candidate) -> str:
    budget = c.klass.budget_bytes or 0
    sign = ">" if c.used_bytes > budget else "<="
    return (
        f"process {c.process.pid} ({c.facts.name or '?'}) uses {format_size(c.used_bytes)} "
        f"{sign} budget {format_size(budget)} of class {c.klass.name}"
    )


def system_unit(facts: ProcessFacts) -> str | None:
    """The process's systemd system unit, or None (no unit, or a unit of a user session)."""
    if facts.unit is None or session_unit(facts.slices):
        return None
    return facts.unit


def _why_not_stoppable(facts: ProcessFacts) -> str | None:
    """Why a stop-unit class cannot stop this process's unit (None: it can)."""
    if facts.unit is None:
        return "it has no systemd unit to stop"
    if session_unit(facts.slices):
        return f"its unit {facts.unit} belongs to a user session: observed, never stopped"
    return None


def _free_text(reading: GpuReading) -> str:
    used, total = reading.memory_used_bytes, reading.memory_total_bytes
    if used is None or not total:
        return "memory pressure on the GPU"
    return f"memory pressure on the GPU ({format_size(max(0, total - used))} free)"


def evaluate_vram(
    reading: GpuReading,
    facts: Mapping[int, ProcessFacts],
    policy: VramPolicy,
    state: VramState,
    t_s: float,
    stopped_units: frozenset[str] = frozenset(),
    signalled: Mapping[ProcessKey, Offender] | None = None,
) -> tuple[VramState, list[Decision]]:
    """One GPU's budgets for one tick; ``facts`` maps pid -> ProcessFacts (with class);
    ``stopped_units`` are the units the governor stopped and has not resumed yet;
    ``signalled`` (:func:`signalled_processes` of every GPU's state) the processes any GPU's
    rule already sent a signal."""
    if not policy.enabled or reading.processes is None:
        return state, []
    remembered = state.offenders or state.loops_s or state.unit_signals_s or state.unit_stops_s
    if not reading.processes and not remembered:
        return state, []  # nothing listed and nothing remembered: the tick below would rebuild this very state
    uuid = reading.uuid
    decisions: list[Decision] = []
    offenders = {k: v for k, v in state.offenders.items() if k[0] != uuid}
    why_all, why_pid = pressed_processes(reading, policy)
    loops = {u: s for u, s in state.loops_s.items()}
    signals = {u: s for u, s in state.unit_signals_s.items()}
    unit_stops = {u: s for u, s in state.unit_stops_s.items() if t_s - s < policy.cooldown_s}
    current: list[tuple[_Candidate, Offender]] = []
    yielders: list[_Candidate] = []  # stop-unit processes within budget: candidates under pressure
    for process in reading.processes:
        used = process.used_memory_bytes
        pf = facts.get(process.pid)
        if used is None or pf is None or pf.newer_than_listing:
            continue
        klass = policy.class_named(pf.klass)
        if klass.budget_bytes is None:
            continue
        candidate = _Candidate((uuid, process.pid, pf.start_time), process, used, pf, klass)
        if used <= klass.budget_bytes:
            if (why_all is not None or process.pid in why_pid) and klass.enforced_action is ProcessAction.STOP_UNIT:
                yielders.append(candidate)
            continue
        unit = system_unit(pf)
        looping = unit is not None and klass.enforced_action in SIGNAL_ACTIONS and unit in loops
        if looping and unit is not None:
            loops[unit] = t_s
        known = state.offenders.get(candidate.key)
        if known is None:
            known = Offender(over_since_s=t_s)
            note = f"; protected ({pf.protected}): never signalled" if pf.protected else ""
            if klass.enforced_action != klass.action:
                note += f"; class {klass.name} matches only on name/cmdline: observed, never signalled"
            elif klass.enforced_action is ProcessAction.STOP_UNIT and _why_not_stoppable(pf):
                note += f"; not stopped: {_why_not_stoppable(pf)}"
            elif looping:
                note += f"; unit {unit} is in a kill-restart loop: not signalled"
            decisions.append(
                _decision(
                    reading,
                    candidate,
                    t_s,
                    Rule.VRAM_OVER_BUDGET,
                    Action.NONE,
                    f"{_describe(candidate)}{note}",
                    dry_run=False,
                    unit=pf.unit,
                )
            )
            loop = _restart_loop(candidate, unit, signals, loops, t_s) if not looping and not pf.protected else None
            if loop is not None:
                decisions.append(
                    _decision(
                        reading, candidate, t_s, Rule.UNIT_RESTART_LOOP, Action.NONE, loop, dry_run=False, unit=unit
                    )
                )
        current.append((candidate, known))
    if not current and not yielders and not remembered:
        return state, []  # no process over its budget, none to make room, nothing remembered: this very state

    pools = memory_pools(reading)
    last_victim_s = _kept_pools(state.last_victim_s, reading, policy.cooldown_s, t_s)
    new_victims: list[tuple[_Candidate, Offender]] = []
    for candidate, known in current:
        klass = candidate.klass
        dry = policy.dry_run or klass.dry_run
        offender = replace(known, last_over_s=t_s, forget_after_s=max(klass.grace_s, klass.kill_after_s))
        if known.dry_run and not dry and _signalled(known):
            # Live now (a reload ended the dry run): a would-be signal was never sent.
            offender = replace(offender, term_sent_s=None, kill_sent_s=None, dry_run=False)
        start = candidate.facts.start_time
        other = None if not signalled or start is None else signalled.get((candidate.process.pid, start))
        if other is not None and not (other.dry_run and not dry):  # would-be signals count in a dry run only
            adopted = _adopted(offender, other)
            if (adopted.term_sent_s, adopted.kill_sent_s) != (offender.term_sent_s, offender.kill_sent_s):
                # Signalled for another GPU: that signal counts here, and cools the pools it runs in here.
                sent_s = max(x for x in (other.term_sent_s, other.kill_sent_s) if x is not None)
                for pool in pools.get(candidate.process.pid, (uuid,)):
                    last_victim_s[pool] = max(sent_s, last_victim_s.get(pool, sent_s))
            offender = adopted
        if not dry and offender.kill_sent_s is not None and offender.killed_s is None:
            # Live now, and the SIGKILL recorded was only a dry run's "would send" (after a real
            # SIGTERM): it counts as never sent, so the SIGKILL due since the SIGTERM goes out now.
            offender = replace(offender, kill_sent_s=None)
        # Escalate only while the class still asks for it: a reload may have made it
        # protected or observe-only since the SIGTERM.
        escalate = candidate.facts.protected is None and klass.enforced_action in SIGNAL_ACTIONS and not klass.protected
        if offender.term_sent_s is not None and offender.kill_sent_s is None:
            if escalate and t_s - offender.term_sent_s >= klass.kill_after_s:
                reason = (
                    f"{_describe(candidate)}: still running and over budget "
                    f"{format_seconds(t_s - offender.term_sent_s)} after SIGTERM "
                    f"(kill_after {format_seconds(klass.kill_after_s)})"
                )
                decisions.append(
                    _decision(reading, candidate, t_s, Rule.VRAM_ESCALATE, Action.SIGNAL_KILL, reason, dry_run=dry)
                )
                offender = _sent(offender, dry, kill_sent_s=t_s)
        elif offender.killed_s is not None:
            if escalate and not offender.kill_given_up and not candidate.facts.unresolved:
                follow_up, offender = _kill_follow_up(reading, candidate, offender, t_s, dry)
                if follow_up is not None:
                    decisions.append(follow_up)
        elif (
            offender.term_sent_s is None
            and offender.kill_sent_s is None
            and _may_act(candidate, stopped_units, unit_stops, loops)
            and (
                why_all is not None or candidate.process.pid in why_pid or t_s - offender.over_since_s >= klass.grace_s
            )
        ):
            new_victims.append((candidate, offender))
        offenders[candidate.key] = offender
    _keep_remembered(offenders, state.offenders, uuid, {c.key for c, _ in current}, t_s)
    for candidate in yielders:
        if _may_act(candidate, stopped_units, unit_stops, loops):
            new_victims.append((candidate, Offender(over_since_s=t_s)))

    pressed = _pressed_pools(reading, policy)
    taken: set[str] = set()  # pools given a victim in this tick (a cooldown of 0 s still allows one a tick)
    for candidate, offender in sorted(new_victims, key=_victim_order):
        klass = candidate.klass
        runs_in = pools.get(candidate.process.pid, (uuid,))
        due = candidate.used_bytes > (klass.budget_bytes or 0) and t_s - offender.over_since_s >= klass.grace_s
        free = [
            pool
            for pool in (runs_in if due else [p for p in runs_in if p in pressed])
            if pool not in taken and t_s - last_victim_s.get(pool, -math.inf) >= policy.cooldown_s
        ]
        unit = system_unit(candidate.facts)
        if not free or (klass.enforced_action is ProcessAction.STOP_UNIT and unit in unit_stops):
            continue
        why = why_all if why_all is not None else why_pid.get(candidate.process.pid)
        decision, sent = _enforce(reading, candidate, offender, policy, t_s, why, unit)
        decisions.append(decision)
        if decision.action is Action.STOP_UNIT and unit is not None:
            unit_stops[unit] = t_s
        else:
            offenders[candidate.key] = sent
            if unit is not None:
                window = klass.restart_loop_window_s
                signals[unit] = (*(s for s in signals.get(unit, ()) if t_s - s <= window), t_s)
        for pool in runs_in:
            last_victim_s[pool] = t_s
            taken.add(pool)
    return (
        VramState(
            offenders=offenders,
            last_victim_s=last_victim_s,
            unit_signals_s=_pruned_signals(signals, policy, t_s) if signals else signals,
            loops_s=_pruned_loops(loops, policy, t_s) if loops else loops,
            unit_stops_s=unit_stops,
        ),
        decisions,
    )


def _enforce(
    reading: GpuReading,
    c: _Candidate,
    offender: Offender,
    policy: VramPolicy,
    t_s: float,
    pressure: str | None,
    unit: str | None,
) -> tuple[Decision, Offender]:
    """The class's action on a new victim (``pressure``: why its memory is short, None when it is not),
    and the offender with the signal recorded."""
    klass = c.klass
    dry = policy.dry_run or klass.dry_run
    over_s = t_s - offender.over_since_s
    why = (
        f"{pressure}, lowest priority {klass.priority} first"
        if pressure is not None and over_s < klass.grace_s
        else f"over budget for {format_seconds(over_s)} (grace {format_seconds(klass.grace_s)})"
    )
    if klass.enforced_action is ProcessAction.STOP_UNIT and unit is not None:
        reason = f"{_describe(c)}: {why}: stop unit {unit}"
        return _decision(reading, c, t_s, Rule.VRAM_ENFORCE, Action.STOP_UNIT, reason, dry_run=dry, unit=unit), offender
    if klass.enforced_action is ProcessAction.KILL:
        action, offender = Action.SIGNAL_KILL, _sent(offender, dry, kill_sent_s=t_s)
    else:
        action, offender = Action.SIGNAL_TERM, _sent(offender, dry, term_sent_s=t_s)
    decision = _decision(reading, c, t_s, Rule.VRAM_ENFORCE, action, f"{_describe(c)}: {why}", dry_run=dry, unit=unit)
    return decision, offender


def _kill_follow_up(
    reading: GpuReading, c: _Candidate, offender: Offender, t_s: float, dry: bool
) -> tuple[Decision | None, Offender]:
    """A process still listed and over budget after a real SIGKILL: once ``kill_after_s`` (at least
    :data:`KILL_RECHECK_MIN_S`) has passed since that SIGKILL (or since it was last found so), a
    ``vram_kill_ineffective`` SIGKILL sent again, or after :data:`KILL_RETRIES_MAX` of them one
    ``vram_kill_given_up`` report. None before that (at most one decision per that time)."""
    killed_s = offender.killed_s
    assert killed_s is not None
    klass = c.klass
    last_s = killed_s if offender.kill_checked_s is None else max(killed_s, offender.kill_checked_s)
    if t_s - last_s < max(klass.kill_after_s, KILL_RECHECK_MIN_S):
        return None, offender
    still = f"{_describe(c)}: still listed and over budget {format_seconds(t_s - killed_s)} after the first SIGKILL"
    if offender.kill_retries >= KILL_RETRIES_MAX:
        reason = f"{still} and {offender.kill_retries} more: no more SIGKILL is sent"
        decision = _decision(
            reading, c, t_s, Rule.VRAM_KILL_GIVEN_UP, Action.NONE, reason, dry_run=dry, kill_sent_s=killed_s
        )
        return decision, replace(offender, kill_checked_s=t_s, kill_given_up=True)
    retry = offender.kill_retries + 1
    reason = f"{still} (kill_after {format_seconds(klass.kill_after_s)}): SIGKILL again ({retry} of {KILL_RETRIES_MAX})"
    decision = _decision(
        reading, c, t_s, Rule.VRAM_KILL_INEFFECTIVE, Action.SIGNAL_KILL, reason, dry_run=dry, kill_sent_s=killed_s
    )
    return decision, replace(offender, kill_checked_s=t_s, kill_retries=retry)


def _keep_remembered(
    offenders: dict[OffenderKey, Offender],
    before: Mapping[OffenderKey, Offender],
    uuid: str,
    now_over: set[OffenderKey],
    t_s: float,
) -> None:
    """Add to ``offenders`` this GPU's earlier offenders not over budget now that are still
    remembered (:meth:`Offender.remembered_at`), at most :data:`REMEMBERED_OFFENDERS_MAX`,
    the ones seen over budget last first."""
    kept = [(k, o) for k, o in before.items() if k[0] == uuid and k not in now_over and o.remembered_at(t_s)]
    if len(kept) > REMEMBERED_OFFENDERS_MAX:
        kept.sort(key=lambda item: item[1].over_since_s if item[1].last_over_s is None else item[1].last_over_s)
        kept = kept[-REMEMBERED_OFFENDERS_MAX:]
    offenders.update(kept)


def _may_act(
    c: _Candidate, stopped_units: frozenset[str], unit_stops: Mapping[str, float], loops: Mapping[str, float]
) -> bool:
    """True when the class's action may be taken on this candidate now."""
    facts = c.facts
    action = c.klass.enforced_action
    if action is ProcessAction.OBSERVE or facts.protected is not None:
        return False
    if facts.start_time is None or facts.unresolved:
        return False
    unit = system_unit(facts)
    if action is ProcessAction.STOP_UNIT:
        return unit is not None and unit not in stopped_units and unit not in unit_stops
    return unit is None or unit not in loops


def _restart_loop(
    c: _Candidate, unit: str | None, signals: Mapping[str, tuple[float, ...]], loops: dict[str, float], t_s: float
) -> str | None:
    """A new process over budget in ``unit``: the report when that makes a kill-restart loop, else None.
    Marks the unit in ``loops``."""
    klass = c.klass
    if unit is None or klass.enforced_action not in SIGNAL_ACTIONS:
        return None
    window = klass.restart_loop_window_s
    recent = [s for s in signals.get(unit, ()) if t_s - s <= window]
    if len(recent) < klass.restart_loop_count:
        return None
    loops[unit] = t_s
    return (
        f"unit {unit} came back over budget after {len(recent)} signals within {format_seconds(window)} "
        f"(process {c.process.pid} ({c.facts.name or '?'}) uses {format_size(c.used_bytes)}, class {klass.name}): "
        "systemd restarts what is killed (Restart=), a kill-restart loop; its processes are signalled no more "
        '(use action = "stop-unit" for this class)'
    )


def _loop_window_s(policy: VramPolicy) -> float:
    """The longest loop window of any class (s): how long loop bookkeeping is kept."""
    return max(c.restart_loop_window_s for c in (*policy.classes, policy.default_class))


def _pruned_signals(
    signals: Mapping[str, tuple[float, ...]], policy: VramPolicy, t_s: float
) -> dict[str, tuple[float, ...]]:
    window = _loop_window_s(policy)
    kept = {u: tuple(s for s in times if t_s - s <= window) for u, times in signals.items()}
    return {u: times for u, times in kept.items() if times}


def _pruned_loops(loops: Mapping[str, float], policy: VramPolicy, t_s: float) -> dict[str, float]:
    window = _loop_window_s(policy)
    return {u: last for u, last in loops.items() if t_s - last <= window}
