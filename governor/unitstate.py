"""Units the governor stopped: the state it keeps about them, between ticks and on disk.

:class:`UnitKeeper` holds the resume rule's state (:mod:`governor.rules.units`), asks it
each tick which units to start again, records what the actuator did with the stops and
starts, checks the ``Restart=`` of units whose processes are signalled (a kill systemd will
undo), and saves the list of stopped units so that a restarted governor resumes them.

``stopped-units.json`` in the state directory, saved whenever the list changes and read at
start as every state file is (:class:`governor.statefile.StateFile`)::

    {"version": 1,
     "units": {"comfyui.service": {"class": "secondary", "reason": "memory_pressure",
                                   "gpus": ["GPU-..."], "stopped_at_s": 1700000000.0,
                                   "resume_after_s": 60.0}}}

An entry of a unit stopped on a GPU in MIG mode also has ``"mig_instances": ["MIG-..."]``, the
MIG instances its processes ran in (the resume rule judges the room there); without it (an older
file) the unit resumes when any instance has room.

Every entry read is checked: a unit name systemd could have (a ``.service`` or ``.scope``
of at most 255 safe characters, not on the deny list), a class name, a known reason, GPU
UUIDs, a finite Unix time and a delay of 0-86400 s (and MIG UUIDs). A bad entry is dropped; a file with
any problem is kept aside as ``stopped-units.json.corrupt`` and ``load_warning`` says
why. A unit loaded here starts its clear time afresh (monotonic times do not survive a
restart).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from governor.model import (
    Action,
    ActionResult,
    Decision,
    Outcome,
    ProcessFacts,
    Snapshot,
    StoppedUnitStatus,
    UnitWarning,
)
from governor.policy import ProcessAction, VramPolicy, denied_unit
from governor.rules.gaps import DEFAULT_MAX_GAP_S
from governor.rules.units import (
    OVER_BUDGET,
    PRESSURE,
    StoppedUnit,
    UnitsState,
    evaluate_units,
    record_start,
    record_stop,
    resumable,
    resume_at_s,
)
from governor.rules.vram import pressed_processes
from governor.safefile import short_repr
from governor.statefile import GPU_UUID, StateFile
from governor.units import UnitManager, undone_by_restart

FILE_NAME = "stopped-units.json"
VERSION = 1
MAX_UNITS = 256
MAX_KNOWN_UNITS = 1024
"""Units whose Restart= is remembered (checked, or waiting for systemd's answer), and units whose
last resume is remembered for the backoff; the oldest go first."""
FLAP_WINDOW_MAX_S = 86400.0
"""The longest ``flap_window_s`` a class may have (s): a resume older than this doubles no delay."""
UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,247}\.(service|scope)")


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and not low <= value <= high:
        return None
    number = float(value)
    return number if math.isfinite(number) and low <= number <= high else None


def parse_entry(unit: Any, raw: Any) -> StoppedUnit | str:
    """One entry of the file, or what is wrong with it."""
    if not isinstance(unit, str) or not UNIT_NAME.fullmatch(unit) or denied_unit(unit) is not None:
        return f"{short_repr(unit)}: expected the name of a system unit the governor may stop"
    if not isinstance(raw, dict):
        return f"{unit}: expected an object, got {short_repr(raw)}"
    klass, reason, gpus = raw.get("class"), raw.get("reason"), raw.get("gpus")
    stopped = _number(raw.get("stopped_at_s"), 0.0, 1e11)
    delay = _number(raw.get("resume_after_s"), 0.0, 86400.0)
    if not isinstance(klass, str) or not 0 < len(klass) <= 256:
        return f"{unit}: class: expected a class name, got {short_repr(klass)}"
    if reason not in (PRESSURE, OVER_BUDGET):
        return f"{unit}: reason: expected {PRESSURE!r} or {OVER_BUDGET!r}, got {short_repr(reason)}"
    if (
        not isinstance(gpus, list)
        or not 0 < len(gpus) <= 64
        or not all(isinstance(g, str) and GPU_UUID.fullmatch(g) for g in gpus)
    ):
        return f"{unit}: gpus: expected a list of GPU UUIDs, got {short_repr(gpus)}"
    if stopped is None or delay is None:
        return f"{unit}: expected stopped_at_s (Unix time) and resume_after_s (0-86400 s)"
    instances = raw.get("mig_instances", [])
    if (
        not isinstance(instances, list)
        or len(instances) > 64
        or not all(isinstance(i, str) and GPU_UUID.fullmatch(i) for i in instances)
    ):
        return f"{unit}: mig_instances: expected a list of MIG UUIDs, got {short_repr(instances)}"
    return StoppedUnit(unit, klass, str(reason), tuple(gpus), stopped, delay, mig_instances=tuple(instances))


def _parse(data: Any) -> tuple[dict[str, StoppedUnit], list[str]]:
    """The valid entries of a version 1 document and every problem found in it."""
    units = data.get("units") if isinstance(data, dict) else None
    if not isinstance(units, dict) or data.get("version") != VERSION or len(units) > MAX_UNITS:
        return {}, [f"expected version {VERSION} with an object 'units' of at most {MAX_UNITS}"]
    out: dict[str, StoppedUnit] = {}
    problems = []
    for unit, entry in units.items():
        parsed = parse_entry(unit, entry)
        if isinstance(parsed, str):
            problems.append(parsed)
        else:
            out[parsed.unit] = parsed
    return out, problems


class StoppedUnitsStore(StateFile):
    """The stopped units on disk (``state_dir`` None: nothing is kept, a simulation's choice)."""

    def __init__(self, state_dir: Path | str | None) -> None:
        super().__init__(state_dir, FILE_NAME, "the stopped units")
        self._on_disk = False  # a file exists (or was written): an empty list must be written too

    def load(self) -> dict[str, StoppedUnit]:
        """The units saved by an earlier run (valid entries only)."""
        loaded = self._load(_parse)
        if loaded is None:
            return {}
        self._on_disk = True
        return loaded.entries

    def save(self, stopped: Mapping[str, StoppedUnit]) -> None:
        """Write the list when it changed; a failure sets ``last_error`` (retried with the next change)."""
        if not stopped and not self._on_disk:
            return  # nothing stopped, nothing on disk: a governor that never stops a unit writes no file
        document = {
            "version": VERSION,
            "units": {
                u: {
                    "class": s.klass,
                    "reason": s.reason,
                    "gpus": list(s.gpus),
                    "stopped_at_s": s.stopped_wall_s,
                    "resume_after_s": s.delay_s,
                    **({"mig_instances": list(s.mig_instances)} if s.mig_instances else {}),
                }
                for u, s in sorted(stopped.items())
            },
        }
        if self._write(document, unless_written=True):
            self._on_disk = True


def _recent_resumes(state: UnitsState, t_s: float) -> UnitsState:
    """``state`` with only the resumes that can still double a delay: younger than
    FLAP_WINDOW_MAX_S at ``t_s`` (snapshot time, s), and the newest MAX_KNOWN_UNITS of those."""
    resumed = state.resumed
    if len(resumed) <= MAX_KNOWN_UNITS and all(t_s - r.at_s < FLAP_WINDOW_MAX_S for r in resumed.values()):
        return state
    recent = sorted((r.at_s, u) for u, r in resumed.items() if t_s - r.at_s < FLAP_WINDOW_MAX_S)
    return replace(state, resumed={u: resumed[u] for _, u in recent[-MAX_KNOWN_UNITS:]})


def _keep_newest(known: dict[str, Any]) -> None:
    """Drop the oldest entries of ``known`` beyond MAX_KNOWN_UNITS (a unit dropped is checked again)."""
    while len(known) > MAX_KNOWN_UNITS:
        del known[next(iter(known))]


SIGNALS_OF = {ProcessAction.TERMINATE: ("SIGTERM", "SIGKILL"), ProcessAction.KILL: ("SIGKILL",)}
"""The signals a class's action may send (terminate escalates to SIGKILL)."""
_NONE_STOPPED: frozenset[str] = frozenset()


class UnitKeeper:
    """The stopped units (saved in ``store``) and the ``Restart=`` checks, on ``manager``."""

    def __init__(self, store: StoppedUnitsStore, manager: UnitManager) -> None:
        self.store = store
        self.manager = manager
        self.state = UnitsState(stopped=store.load())
        self.asked = bool(self.state.stopped)  # systemd was (or will be) asked something
        self._checked: dict[str, str | None] = {}  # unit -> Restart= once known
        self._to_check: dict[str, str] = {}  # unit -> class, Restart= not known yet
        self._tick: tuple[Snapshot, VramPolicy, Mapping[int, ProcessFacts]] | None = None  # the last decide()

    @property
    def stopped(self) -> frozenset[str]:
        """The units stopped and not resumed."""
        stopped = self.state.stopped
        return frozenset(stopped) if stopped else _NONE_STOPPED

    def decide(
        self,
        snapshot: Snapshot,
        policy: VramPolicy,
        facts: Mapping[int, ProcessFacts],
        max_gap_s: float = DEFAULT_MAX_GAP_S,
    ) -> list[Decision]:
        """The resume rule's decisions for this tick (its state moves on); ``max_gap_s`` as
        :func:`~governor.rules.units.evaluate_units`."""
        self._tick = (snapshot, policy, facts)
        self.state, decisions = evaluate_units(snapshot, self.state, policy, facts, max_gap_s)
        return decisions

    def save_ahead(self, decision: Decision) -> str | None:
        """Save the list with the unit of a stop about to be sent (this tick's :meth:`decide`);
        None when it is on disk, else why not: a unit stopped but not saved would never be
        resumed after a restart, so the actuator stops nothing then (retried next decision)."""
        if self._tick is None or decision.unit is None:
            return None
        snapshot, policy, facts = self._tick
        applied = ActionResult(decision, Outcome.APPLIED)
        ahead = self._stopped_by([applied], snapshot, snapshot.wall_time_s, policy, facts)
        self.store.save(ahead.stopped)
        return self.store.last_error

    def record(
        self,
        results: list[ActionResult],
        snapshot: Snapshot,
        wall_s: float,
        policy: VramPolicy,
        facts: Mapping[int, ProcessFacts],
    ) -> tuple[UnitWarning, ...]:
        """Take in what the actuator did; save the list when it changed; return new Restart= warnings."""
        self.state = self._stopped_by(results, snapshot, wall_s, policy, facts)
        for result in results:
            d = result.decision
            if d.unit is None:
                continue
            if d.action is Action.STOP_UNIT:
                self.asked = True
            elif d.action is Action.START_UNIT:
                self.asked = True
                self.state = _recent_resumes(
                    record_start(self.state, d.unit, snapshot.t_s, result.outcome is Outcome.APPLIED), snapshot.t_s
                )
            elif d.action in (Action.SIGNAL_TERM, Action.SIGNAL_KILL) and d.unit not in self._checked:
                self._to_check[d.unit] = d.process_class or ""
                _keep_newest(self._to_check)
        self.store.save(self.state.stopped)
        return self._restart_warnings(policy)

    def _stopped_by(
        self,
        results: list[ActionResult],
        snapshot: Snapshot,
        wall_s: float,
        policy: VramPolicy,
        facts: Mapping[int, ProcessFacts],
    ) -> UnitsState:
        """The state with the units of the applied stops among ``results`` added."""
        state = self.state
        if not results:
            return state
        readings = {r.uuid: r for r in snapshot.gpus}
        for result in results:
            d = result.decision
            if d.unit is not None and d.action is Action.STOP_UNIT and result.outcome is Outcome.APPLIED:
                reading = readings.get(d.gpu_uuid)
                klass = policy.class_named(d.process_class or "")
                pids = tuple(f.pid for f in facts.values() if f.unit == d.unit)
                pressure = False
                instances: tuple[str, ...] = ()
                if reading is not None:
                    why_all, why_pid = pressed_processes(reading, policy)
                    pressure = why_all is not None or any(p in why_pid for p in pids)
                    instances = tuple(
                        i.uuid for i in reading.mig_instances or () if any(p.pid in pids for p in i.processes)
                    )
                state = record_stop(state, d, klass, snapshot.t_s, wall_s, pressure, pids, instances)
        return state

    def _restart_warnings(self, policy: VramPolicy) -> tuple[UnitWarning, ...]:
        """Units whose Restart= is now known and undoes the kill of their class's action."""
        if not self._to_check:
            return ()
        warnings = []
        for unit, klass_name in list(self._to_check.items()):
            self.asked = True
            props = self.manager.properties(unit)
            if props is None:
                continue  # asked in the background; looked at again next tick
            del self._to_check[unit]
            self._checked[unit] = props.restart
            _keep_newest(self._checked)
            signals = SIGNALS_OF.get(policy.class_named(klass_name).enforced_action, ())
            if undone_by_restart(props.restart, signals):
                warnings.append(UnitWarning(unit, klass_name, props.restart or "?"))
        return tuple(warnings)

    def statuses(self, snapshot: Snapshot | None, policy: VramPolicy) -> tuple[StoppedUnitStatus, ...]:
        """Every stopped unit as published, with when it resumes (Unix time) if the condition stays clear."""
        if not self.state.stopped:
            return ()
        out = []
        for unit, entry in sorted(self.state.stopped.items()):
            klass = policy.class_named(entry.klass)
            at = None if snapshot is None else resume_at_s(entry, klass, snapshot.t_s)
            out.append(
                StoppedUnitStatus(
                    unit=unit,
                    klass=entry.klass,
                    reason=entry.reason,
                    stopped_wall_s=entry.stopped_wall_s,
                    resume_after_s=entry.delay_s,
                    resume=resumable(klass, entry),
                    resume_wall_s=None
                    if at is None or snapshot is None
                    else snapshot.wall_time_s + (at - snapshot.t_s),
                )
            )
        return tuple(out)
