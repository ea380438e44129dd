"""Per-process VRAM budgets (pure): report, then escalate, never storm.

For every process on every GPU with a class budget:

* over budget for the first time: one ``over_budget`` decision (report);
* still over after the class's ``grace_s``: the class's action. ``terminate`` sends
  SIGTERM, then SIGKILL once ``kill_after_s`` has passed and the process is still
  there and still over; ``kill`` sends SIGKILL; ``observe`` only reports;
* under memory pressure (free VRAM below the reserve, or used above
  ``pressure_used_ratio``) an over-budget process is acted on without waiting for
  its grace, lowest priority first (then the largest overrun);
* at most one new victim per GPU per ``cooldown_s``: VRAM is freed with a lag, and
  the next tick's fresh reading is the re-check before choosing another, so only as
  many processes are stopped as needed. Escalating a victim already chosen
  (SIGTERM -> SIGKILL) is not held back by the cooldown;
* protected processes (PID 1, kernel threads, the governor, display servers, protected
  classes) and processes whose identity (start time) is unknown are reported, never
  signalled;
* a class whose action signals but which matches only on keys a process chooses itself
  (name, cmdline) acts as ``observe`` (:attr:`ProcessClass.enforced_action`);
* a process that started after the GPU listing (a reused PID) is neither charged nor
  signalled that tick, and one whose class match timed out is not signalled that tick.

A budget is per process and per GPU (see :mod:`governor.policy`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from governor.model import Decision, GpuReading, ProcessFacts, ProcessReading
from governor.policy import Action, ProcessAction, ProcessClass, Rule, VramPolicy, format_seconds, format_size

OffenderKey = tuple[str, int, int | None]
"""(GPU UUID, pid, start time): one process on one GPU."""


@dataclass(frozen=True, slots=True)
class Offender:
    """A process over its budget on one GPU, and how far its escalation went."""

    over_since_s: float
    term_sent_s: float | None = None
    kill_sent_s: float | None = None


@dataclass(frozen=True, slots=True)
class VramState:
    """What the VRAM rule remembers between ticks."""

    offenders: Mapping[OffenderKey, Offender] = field(default_factory=dict)
    last_victim_s: Mapping[str, float] = field(default_factory=dict)  # per GPU UUID


@dataclass(frozen=True, slots=True)
class _Candidate:
    key: OffenderKey
    process: ProcessReading
    used_bytes: int
    facts: ProcessFacts
    klass: ProcessClass


def under_pressure(reading: GpuReading, policy: VramPolicy) -> bool:
    """True when free VRAM is below the reserve or the used ratio is above the threshold."""
    used, total = reading.memory_used_bytes, reading.memory_total_bytes
    if used is None or not total:
        return False
    return total - used < policy.reserve_bytes or used / total > policy.pressure_used_ratio


def _decision(
    reading: GpuReading,
    c: _Candidate,
    t_s: float,
    rule: Rule,
    action: Action,
    reason: str,
    *,
    dry_run: bool,
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
    )


def _describe(c: _Candidate) -> str:
    budget = c.klass.budget_bytes or 0
    return (
        f"process {c.process.pid} ({c.facts.name or '?'}) uses {format_size(c.used_bytes)} "
        f"> budget {format_size(budget)} of class {c.klass.name}"
    )


def evaluate_vram(
    reading: GpuReading,
    facts: Mapping[int, ProcessFacts],
    policy: VramPolicy,
    state: VramState,
    t_s: float,
) -> tuple[VramState, list[Decision]]:
    """One GPU's budgets for one tick; ``facts`` maps pid -> ProcessFacts (with class)."""
    if not policy.enabled or reading.processes is None:
        return state, []
    uuid = reading.uuid
    decisions: list[Decision] = []
    offenders = {k: v for k, v in state.offenders.items() if k[0] != uuid}
    current: list[tuple[_Candidate, Offender]] = []
    for process in reading.processes:
        used = process.used_memory_bytes
        pf = facts.get(process.pid)
        if used is None or pf is None or pf.newer_than_listing:
            continue
        klass = policy.class_named(pf.klass)
        if klass.budget_bytes is None or used <= klass.budget_bytes:
            continue
        candidate = _Candidate((uuid, process.pid, pf.start_time), process, used, pf, klass)
        known = state.offenders.get(candidate.key)
        if known is None:
            known = Offender(over_since_s=t_s)
            note = f"; protected ({pf.protected}): never signalled" if pf.protected else ""
            if klass.enforced_action != klass.action:
                note += f"; class {klass.name} matches only on name/cmdline: observed, never signalled"
            decisions.append(
                _decision(
                    reading,
                    candidate,
                    t_s,
                    Rule.VRAM_OVER_BUDGET,
                    Action.NONE,
                    f"{_describe(candidate)}{note}",
                    dry_run=False,
                )
            )
        current.append((candidate, known))

    pressure = under_pressure(reading, policy)
    last_victim = state.last_victim_s.get(uuid)
    cooling = last_victim is not None and t_s - last_victim < policy.cooldown_s
    new_victims: list[tuple[_Candidate, Offender]] = []
    for candidate, known in current:
        offender = known
        klass = candidate.klass
        dry = policy.dry_run or klass.dry_run
        if offender.term_sent_s is not None and offender.kill_sent_s is None:
            # Escalate only while the class still asks for it: a reload may have made it
            # protected or observe-only since the SIGTERM.
            escalate = (
                candidate.facts.protected is None
                and klass.enforced_action is not ProcessAction.OBSERVE
                and not klass.protected
            )
            if escalate and t_s - offender.term_sent_s >= klass.kill_after_s:
                reason = (
                    f"{_describe(candidate)}: still running and over budget "
                    f"{format_seconds(t_s - offender.term_sent_s)} after SIGTERM "
                    f"(kill_after {format_seconds(klass.kill_after_s)})"
                )
                decisions.append(
                    _decision(reading, candidate, t_s, Rule.VRAM_ESCALATE, Action.SIGNAL_KILL, reason, dry_run=dry)
                )
                offender = replace(offender, kill_sent_s=t_s)
        elif (
            offender.term_sent_s is None
            and offender.kill_sent_s is None
            and klass.enforced_action is not ProcessAction.OBSERVE
            and candidate.facts.protected is None
            and candidate.facts.start_time is not None
            and not candidate.facts.unresolved
            and (pressure or t_s - offender.over_since_s >= klass.grace_s)
        ):
            new_victims.append((candidate, offender))
        offenders[candidate.key] = offender

    last_victim_s = dict(state.last_victim_s)
    if new_victims and not cooling:
        new_victims.sort(
            key=lambda item: (
                item[0].klass.priority,
                -(item[0].used_bytes - (item[0].klass.budget_bytes or 0)),
            )
        )
        candidate, offender = new_victims[0]
        klass = candidate.klass
        dry = policy.dry_run or klass.dry_run
        over_s = t_s - offender.over_since_s
        why = (
            f"memory pressure on the GPU (lowest priority {klass.priority} first)"
            if pressure and over_s < klass.grace_s
            else f"over budget for {format_seconds(over_s)} (grace {format_seconds(klass.grace_s)})"
        )
        if klass.enforced_action is ProcessAction.KILL:
            action, offender = Action.SIGNAL_KILL, replace(offender, kill_sent_s=t_s)
        else:
            action, offender = Action.SIGNAL_TERM, replace(offender, term_sent_s=t_s)
        decisions.append(
            _decision(reading, candidate, t_s, Rule.VRAM_ENFORCE, action, f"{_describe(candidate)}: {why}", dry_run=dry)
        )
        offenders[candidate.key] = offender
        last_victim_s[uuid] = t_s
    return VramState(offenders=offenders, last_victim_s=last_victim_s), decisions
