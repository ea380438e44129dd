"""The actuator: the only code that changes anything on the machine.

It is idempotent (no write when the value already holds), honours dry-run (logs
"would set" through its results instead of writing), and returns an :class:`ActionResult`
for every decision so the daemon can log and count it.

The original limit is never lost: a GPU's limit is changed only once its original is
durably saved (:meth:`OriginalLimits.remember`); when that save fails the change is not
made (REFUSED, "original limit not saved"), the GPU is listed in ``hands_off`` and the
save is retried with the next change wanted. A saved original outside the GPU's range is
rejected. The original of a GPU with none usable is its enforced limit, except when the
GPU is *suspect* (its entry was unusable, or a bad state file was set aside) and its
enforced limit equals the limit the governor last set on it or is below the card's
default: then the card's default limit is taken, since the governor itself may have
lowered it. Restore clamps the original to the GPU's current range.

No limit is set above the GPU's saved original (clamped to its range when saved): a step back up
ends at the limit the card had before the governor came, whatever the rules' ladder says. A dry
run saves no original but caps its "would set" at the one a live run would have saved at its
first change (:meth:`Actuator.original_from` of the enforced limit then).

A GPU whose limit cannot be set (no permission, not supported) becomes monitor-only:
marked once, never retried every tick.

Units: ``stop_unit`` and ``start_unit`` decisions go to systemd through a
:class:`governor.units.UnitManager` (StopUnit/StartUnit), never as signals to a unit's
PIDs. Right before a stop, systemd is asked which unit the process belongs to now
(GetUnitByPID): a process that moved or vanished is left alone, and so is one whose unit
systemd did not name (no answer, an error): no stop on the word of /proc alone. A unit on
the deny list is refused here too, and a stop whose unit ``before_stop`` could not save
first (the stopped-units list, :class:`governor.unitstate.UnitKeeper`) is not sent. A
call systemd did not answer in time is counted as done (the job may have been queued;
starting a running unit again later is harmless).
Fan decisions go to its fan half, :class:`governor.fanactuator.FanActuator` (``fans``),
whose takeovers are saved beside the originals (``fan-control.json``) and undone by
:meth:`Actuator.restore` together with the limits.

Only :class:`~governor.errors.GpuError` (one GPU, one change) is caught and counted as a
failed action. :class:`~governor.errors.BackendFatal` passes through every path, setting
and restoring alike: governing must stop, not go on with a broken backend. A restore
stops at the first fatal error; the originals not yet restored stay saved for the next
start.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from governor.backends import Backend, GpuError, SetLimitRefused
from governor.fanactuator import FanActuator
from governor.fanstate import FanControl
from governor.model import Action, ActionResult, Decision, GpuInfo, GpuReading, Outcome, Rule, Snapshot, plausible_w
from governor.policy import denied_unit
from governor.processes import read_process_state, read_start_time
from governor.rules.power import DRIFT_TOLERANCE_W, clamp_w
from governor.rules.vram import KILL_FOLLOW_UPS
from governor.state import OriginalLimits
from governor.units import MemoryUnits, UnitManager

SIGNALS = {Action.SIGNAL_TERM: signal.SIGTERM, Action.SIGNAL_KILL: signal.SIGKILL}
FAN_ACTIONS = frozenset({Action.SET_FAN_SPEED, Action.SET_FAN_AUTO})
GONE_ERRORS = ("NoUnitForPID", "UnixProcessIdUnknown")
"""systemd's answers to GetUnitByPID for a process that exited (no unit, or a PID it could not pin)."""


def send_signal(pid: int, start_time: int, signum: int, proc: Path = Path("/proc")) -> str | None:
    """Signal the process (pid, start_time) and no other; returns why not, or None when sent.

    Through a pidfd: the pidfd is opened first, then the start time is checked; from
    then on the pidfd refers to that very process, so a PID reused in between can
    never be hit. Without pidfd support (old kernels), the start time is re-checked
    right before kill(), which leaves only a window of microseconds.

    Raises PermissionError when the process may not be signalled.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    pidfd_send = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is not None and pidfd_send is not None:
        try:
            fd = pidfd_open(pid)
        except ProcessLookupError:
            return "vanished"
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP):  # no pidfd here: fall back
                raise
        else:
            try:
                if read_start_time(pid, proc) != start_time:
                    return "pid reused by another process: left alone"
                pidfd_send(fd, signum)
            except ProcessLookupError:
                return "vanished"
            finally:
                os.close(fd)
            return None
    if read_start_time(pid, proc) != start_time:
        return "vanished or pid reused: left alone"
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return "vanished"
    return None


def _state_before(read: Callable[[int, int], str | None], decision: Decision) -> str | None:
    """The /proc state letter (``read``: pid, start time -> letter) of the process a KILL_FOLLOW_UPS
    decision is about, read before the actuator acts on it; None for any other decision."""
    if decision.rule not in KILL_FOLLOW_UPS or decision.pid is None or decision.process_start_time is None:
        return None
    return read(decision.pid, decision.process_start_time)


NO_RANGE = "the card reports no power-limit range (NVML gives none, or none a GPU can have)"
"""Why a GPU whose limit cannot be clamped to its range is monitor-only."""


class Actuator:
    """Applies power-limit decisions through a backend."""

    def __init__(
        self,
        backend: Backend,
        originals: OriginalLimits,
        gpus: Iterable[GpuInfo],
        *,
        dry_run: bool = False,
        signaller: Callable[[int, int, int], str | None] = send_signal,
        units: UnitManager | None = None,
        fans: FanControl | None = None,
    ) -> None:
        self._backend = backend
        self._signaller = signaller
        self.process_state: Callable[[int, int], str | None] = read_process_state  # (pid, start) -> D, Z ...
        self.units: UnitManager = MemoryUnits() if units is None else units
        self.originals = originals
        self.dry_run = dry_run
        self._gpus: dict[str, GpuInfo] = {g.uuid: g for g in gpus}
        self.monitor_only: dict[str, str] = {}
        self.hands_off: dict[str, str] = {}  # GPU UUID -> why its original could not be saved
        self._would_be_w: dict[str, float] = {}  # dry-run: the limit we would have set
        self._would_be_original_w: dict[str, float] = {}  # dry-run: the original a live run would have saved
        self._in_range_w: dict[str, float] = {}  # originals found in their GPU's range once: never rejected later
        self._caps: tuple[int, dict[str, GpuInfo], dict[str, float]] | None = None  # caps_w of (originals, GPUs)
        self.before_stop: Callable[[Decision], str | None] | None = None  # saves the stop first; why not
        if fans is None:  # the fan takeovers saved beside the originals (a caller may have opened them already)
            fans = FanControl(None if originals.path is None else originals.path.parent)
        self.fans = FanActuator(backend, fans, self._gpus.values())
        self._note_ranges()

    def set_gpus(self, gpus: Iterable[GpuInfo]) -> frozenset[str]:
        """The GPUs present now (they can appear late, when the driver loads after start, and a card
        can report its range late). A GPU whose power-limit range is unknown is monitor-only
        (:meth:`_note_ranges`); returns the UUIDs governed again because they have one now."""
        self._gpus = {g.uuid: g for g in gpus}
        regained = self._note_ranges()
        self.fans.set_gpus(self._gpus.values())
        return regained

    def _note_ranges(self) -> frozenset[str]:
        """Mark the GPUs without a power-limit range monitor-only; unmark (and return) those that have one now."""
        regained = set()
        for uuid, info in self._gpus.items():
            if info.power_limit_min_w is None or info.power_limit_max_w is None:
                self.monitor_only.setdefault(uuid, NO_RANGE)
            elif self.monitor_only.get(uuid) == NO_RANGE:
                del self.monitor_only[uuid]
                regained.add(uuid)
        return frozenset(regained)

    def apply(self, decisions: Iterable[Decision], snapshot: Snapshot) -> list[ActionResult]:
        """Carry out every decision; informational ones come back SKIPPED."""
        readings: dict[str, GpuReading] | None = None  # built at the first limit to set (most ticks set none)
        results = []
        for decision in decisions:
            state = _state_before(self.process_state, decision)  # first: the state a process outlived SIGKILL in
            if decision.action is Action.SET_POWER_LIMIT and isinstance(decision.to_value, (int, float)):
                if readings is None:
                    readings = {r.uuid: r for r in snapshot.gpus}
                results.append(self._set(decision, float(decision.to_value), readings.get(decision.gpu_uuid)))
            elif decision.action in SIGNALS:
                results.append(replace(self._signal(decision), process_state=state))
            elif decision.action in (Action.STOP_UNIT, Action.START_UNIT):
                results.append(self._unit(decision))
            elif decision.action in FAN_ACTIONS:
                results.append(self.fans.apply(decision, self.dry_run))
            else:
                results.append(ActionResult(decision, Outcome.SKIPPED, process_state=state))
        return results

    def _set(self, decision: Decision, limit_w: float, reading: GpuReading | None) -> ActionResult:
        uuid = decision.gpu_uuid
        if uuid in self.monitor_only:
            return ActionResult(decision, Outcome.REFUSED, f"monitor-only: {self.monitor_only[uuid]}")
        info = self._gpus.get(uuid)
        limit_w = clamp_w(limit_w, info)
        enforced = None if reading is None else reading.power_limit_w
        original_w = self._saved_original(uuid)
        if original_w is None and self.dry_run:  # the original a live run would have saved at its first change
            original_w = self._would_be_original_w.get(uuid)
            if original_w is None and enforced is not None:
                original_w = clamp_w(self.original_from(uuid, enforced)[0], info)
        if original_w is not None and limit_w > original_w:
            limit_w = clamp_w(original_w, info)  # back up as far as the card's own limit, never past it
        if self.dry_run:
            # Compare with what would be in force had the earlier would-be changes happened.
            enforced = self._would_be_w.get(uuid, enforced)
        if enforced is not None and abs(enforced - limit_w) <= DRIFT_TOLERANCE_W / 2:
            return ActionResult(decision, Outcome.UNCHANGED, f"{limit_w:g} W already in force")
        if self.dry_run:
            self._would_be_w[uuid] = limit_w
            if original_w is not None:
                self._would_be_original_w.setdefault(uuid, original_w)
            return ActionResult(decision, Outcome.DRY_RUN, f"would set {limit_w:g} W")
        first_change = not self.originals.is_durable(uuid)  # no change of ours to undo yet
        why_not = self._save_original(uuid, enforced, limit_w)
        if why_not is not None:
            return ActionResult(decision, Outcome.REFUSED, why_not)
        result = self._write(decision, uuid, limit_w)
        if first_change and uuid in self.monitor_only:
            self.originals.forget(uuid)  # refused: nothing was changed, so nothing to restore
        return result

    def caps_w(self) -> Mapping[str, float]:
        """UUID -> the highest limit (W) :meth:`apply` writes on that GPU: its saved original, clamped
        to its range. The power rules' drift check compares with it, so the governor's own cap at
        the original reads as no limit set outside the governor. Built again only when the saved
        originals (their ``version``) or the GPUs changed; the same mapping otherwise (not to be changed)."""
        version, gpus, cached = self.originals.version, self._gpus, self._caps
        if cached is None or cached[0] != version or cached[1] is not gpus:
            caps = {uuid: clamp_w(watts, gpus.get(uuid)) for uuid, watts in self.originals.items()}
            self._caps = cached = (version, gpus, caps)
        return cached[2]

    def _saved_original(self, uuid: str) -> float | None:
        """The saved original of a GPU in watts, or None; one outside the GPU's range is rejected.

        Only the first time it is used: an original that was in the range then (one this run saved, or
        one checked earlier) stays valid when the card's range narrows later (a range changed at runtime
        is no corrupt file); it is clamped wherever it is written."""
        original_w = self.originals.get(uuid)
        info = self._gpus.get(uuid)
        if original_w is None or info is None or self._in_range_w.get(uuid) == original_w:
            return original_w
        low, high = info.power_limit_min_w, info.power_limit_max_w
        slack = DRIFT_TOLERANCE_W / 2
        if (low is not None and original_w < low - slack) or (high is not None and original_w > high + slack):
            span = f"{'?' if low is None else f'{low:g}'}-{'?' if high is None else f'{high:g}'} W"
            self.originals.reject(uuid, f"{original_w:g} W is outside the GPU's range {span}; not used")
            return None
        self._in_range_w[uuid] = original_w
        return original_w

    def original_from(self, uuid: str, enforced_w: float) -> tuple[float, str]:
        """The original limit to record for a GPU with no usable saved one, in watts, and why.

        Its enforced limit, unless the GPU is suspect (see the module docstring) and that
        limit equals the governor's last one or is below the card's default: then the default.
        """
        info = self._gpus.get(uuid)
        default_w = None if info is None else info.power_limit_default_w
        if default_w is None or not self.originals.suspect(uuid):
            return enforced_w, "the enforced limit"
        slack = DRIFT_TOLERANCE_W / 2
        last_w = self.originals.last_set(uuid)
        if last_w is not None and abs(enforced_w - last_w) <= slack:
            return clamp_w(default_w, info), f"the default limit ({enforced_w:g} W is the limit the governor last set)"
        if enforced_w < default_w - slack:
            return clamp_w(default_w, info), (
                f"the default limit ({enforced_w:g} W is below it and the saved originals were unusable)"
            )
        return enforced_w, "the enforced limit"

    def _save_original(self, uuid: str, enforced_w: float | None, limit_w: float) -> str | None:
        """Make sure the GPU's original is on disk before ``limit_w`` is written; why not, or None."""
        original_w = self._saved_original(uuid)
        if original_w is None:
            if enforced_w is None:
                self.hands_off[uuid] = "the enforced limit cannot be read"
                return "original limit unknown (the enforced limit cannot be read): not changed"
            original_w, _ = self.original_from(uuid, enforced_w)
            original_w = clamp_w(original_w, self._gpus.get(uuid))  # what a restore can write back
        if self.originals.remember(uuid, original_w, last_set_w=limit_w):
            self.hands_off.pop(uuid, None)
            saved = self.originals.get(uuid)
            if saved is not None and saved == original_w:
                self._in_range_w[uuid] = saved  # clamped to the range it had now
            return None
        why = self.originals.last_error or "not saved"
        self.hands_off[uuid] = why
        return f"original limit {original_w:g} W not saved ({why}): not changed, retried next tick"

    def _signal(self, decision: Decision) -> ActionResult:
        name = SIGNALS[decision.action].name
        if decision.pid is None or decision.process_start_time is None:
            return ActionResult(decision, Outcome.REFUSED, "process identity unknown: never signalled")
        if decision.dry_run or self.dry_run:  # the global dry run covers every action
            return ActionResult(decision, Outcome.DRY_RUN, f"would send {name}")
        try:
            why_not = self._signaller(decision.pid, decision.process_start_time, SIGNALS[decision.action])
        except PermissionError as exc:
            return ActionResult(decision, Outcome.FAILED, f"{name} not permitted: {exc.strerror or exc}")
        except OSError as exc:
            return ActionResult(decision, Outcome.FAILED, f"{name} failed: {exc.strerror or exc}")
        if why_not is not None:
            return ActionResult(decision, Outcome.SKIPPED, why_not)
        return ActionResult(decision, Outcome.APPLIED, f"sent {name}")

    def _unit(self, decision: Decision) -> ActionResult:
        unit = decision.unit
        verb = "stop" if decision.action is Action.STOP_UNIT else "start"
        if unit is None:
            return ActionResult(decision, Outcome.REFUSED, "no unit named: nothing done")
        entry = denied_unit(unit)
        if entry is not None:
            return ActionResult(decision, Outcome.REFUSED, f"unit {unit} is on the deny list ({entry}): never touched")
        if decision.dry_run or self.dry_run:  # the global dry run covers units too
            return ActionResult(decision, Outcome.DRY_RUN, f"would {verb} unit {unit}")
        if decision.action is Action.STOP_UNIT and decision.pid is not None:
            owner = self.units.unit_of_pid(decision.pid)
            if not owner.ok:  # no stop unless systemd itself names the unit: the cgroup text is the process's
                if any(gone in (owner.error or "") for gone in GONE_ERRORS):
                    return ActionResult(decision, Outcome.SKIPPED, "vanished")
                return ActionResult(
                    decision,
                    Outcome.FAILED,
                    f"the unit of process {decision.pid} could not be confirmed ({owner.error}): {unit} not stopped",
                )
            if owner.value != unit:
                return ActionResult(
                    decision,
                    Outcome.REFUSED,
                    f"process {decision.pid} belongs to {owner.value} now, not {unit}: left alone",
                )
        if verb == "stop" and self.before_stop is not None and (unsaved := self.before_stop(decision)) is not None:
            return ActionResult(decision, Outcome.REFUSED, f"not stopped: {unsaved} (it could not be resumed)")
        call = self.units.stop_unit(unit) if verb == "stop" else self.units.start_unit(unit)
        if call.ok:
            return ActionResult(decision, Outcome.APPLIED, f"{verb} job queued for unit {unit} ({call.value})")
        if call.timed_out:
            return ActionResult(decision, Outcome.APPLIED, f"{call.error}; counted as queued")
        return ActionResult(decision, Outcome.FAILED, call.error or f"{verb} of unit {unit} failed")

    def _write(self, decision: Decision, uuid: str, limit_w: float) -> ActionResult:
        if not plausible_w(limit_w):  # the one place a limit is written: nothing absurd gets through
            return ActionResult(decision, Outcome.REFUSED, f"{limit_w!r} W is not a power limit any GPU has: not set")
        try:
            self._backend.set_power_limit(uuid, limit_w)
        except SetLimitRefused as exc:
            self.monitor_only[uuid] = str(exc)
            return ActionResult(decision, Outcome.FAILED, f"set refused, GPU now monitor-only: {exc}")
        except GpuError as exc:  # never BackendFatal: that one ends the daemon (see governor.errors)
            return ActionResult(decision, Outcome.FAILED, str(exc))
        return ActionResult(decision, Outcome.APPLIED, f"set {limit_w:g} W")

    def restore(
        self, snapshot: Snapshot | None, t_s: float, rule: str, only: set[str] | None = None
    ) -> list[ActionResult]:
        """Put every saved original limit back and every fan the governor took back under the
        card's control (clean stop, or leftovers of a crash at start).

        ``only`` limits it to those GPU UUIDs (GPUs that just appeared).
        """
        readings: Mapping[str, GpuReading] = {} if snapshot is None else {r.uuid: r for r in snapshot.gpus}
        if not self.dry_run:
            self._recover_suspects(readings, only)
        results = []
        for uuid, saved_w in self.originals.items():
            if only is not None and uuid not in only:
                continue
            reading, info = readings.get(uuid), self._gpus.get(uuid)
            original_w = clamp_w(saved_w, info)
            decision = _restore_decision(t_s, uuid, info, rule, saved_w, original_w, reading)
            if info is None:
                results.append(ActionResult(decision, Outcome.SKIPPED, "GPU not present; entry kept"))
                continue
            if uuid in self.monitor_only and self.monitor_only[uuid] != NO_RANGE:
                # (a card that stopped reporting its range still gets back the limit it had itself)
                if not self.dry_run:  # a dry run clears no record
                    self.originals.forget(uuid)
                results.append(ActionResult(decision, Outcome.REFUSED, f"monitor-only: {self.monitor_only[uuid]}"))
                continue
            enforced = None if reading is None else reading.power_limit_w
            if enforced is not None and abs(enforced - original_w) <= DRIFT_TOLERANCE_W / 2:
                result = ActionResult(decision, Outcome.UNCHANGED, f"{original_w:g} W already in force")
            elif self.dry_run:
                result = ActionResult(decision, Outcome.DRY_RUN, f"would set {original_w:g} W")
            else:
                result = self._write(decision, uuid, original_w)
            if result.outcome in (Outcome.APPLIED, Outcome.UNCHANGED) and not self.dry_run:
                self.originals.forget(uuid)
            results.append(result)
        results.extend(self.fans.restore(snapshot, t_s, rule, only, self.dry_run))
        return results

    def _recover_suspects(self, readings: Mapping[str, GpuReading], only: set[str] | None) -> None:
        """Give suspect GPUs whose limit the governor may have lowered their default as the original.

        Range-checks every saved original first (a bad one turns its GPU suspect).
        """
        for uuid in list(self._gpus):
            if only is not None and uuid not in only:
                continue
            reading = readings.get(uuid)
            if self._saved_original(uuid) is not None or reading is None or reading.power_limit_w is None:
                continue
            if uuid in self.monitor_only or not self.originals.suspect(uuid):
                continue
            original_w, _ = self.original_from(uuid, reading.power_limit_w)
            if original_w != reading.power_limit_w:
                self.originals.remember(uuid, original_w)


def _restore_decision(
    t_s: float,
    uuid: str,
    info: GpuInfo | None,
    rule: str,
    saved_w: float,
    original_w: float,
    reading: GpuReading | None,
) -> Decision:
    """The decision to put ``uuid``'s original limit back: ``saved_w`` as saved, ``original_w`` clamped (W)."""
    return Decision(
        t_s=t_s,
        gpu_index=-1 if info is None else info.index,
        gpu_uuid=uuid,
        rule=Rule(rule),
        action=Action.SET_POWER_LIMIT,
        reason=f"restoring the original limit {original_w:g} W"
        + ("" if original_w == saved_w else f" (saved {saved_w:g} W, clamped to the GPU's range)"),
        from_w=None if reading is None else reading.power_limit_w,
        to_w=original_w,
    )
