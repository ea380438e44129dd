"""The actuator: the only code that changes anything on the machine.

It is idempotent (no write when the value already holds), honours dry-run (logs
"would set" through its results instead of writing), remembers each GPU's original
power limit before its first change, and returns an :class:`ActionResult` for every
decision so the daemon can log and count it.

A GPU whose limit cannot be set (no permission, not supported) becomes monitor-only:
marked once, never retried every tick.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from governor.backends import Backend, BackendError, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.model import Action, ActionResult, Decision, GpuInfo, GpuReading, Outcome, Snapshot
from governor.rules.power import DRIFT_TOLERANCE_W, clamp_w
from governor.state import OriginalLimits


class Actuator:
    """Applies power-limit decisions through a backend."""

    def __init__(
        self, backend: Backend, originals: OriginalLimits, gpus: Iterable[GpuInfo], *, dry_run: bool = False
    ) -> None:
        self._backend = backend
        self.originals = originals
        self.dry_run = dry_run
        self._gpus: dict[str, GpuInfo] = {g.uuid: g for g in gpus}
        self.monitor_only: dict[str, str] = {}
        self._would_be_w: dict[str, float] = {}  # dry-run: the limit we would have set

    def apply(self, decisions: Iterable[Decision], snapshot: Snapshot) -> list[ActionResult]:
        """Carry out every decision; informational ones come back SKIPPED."""
        readings = {r.uuid: r for r in snapshot.gpus}
        results = []
        for decision in decisions:
            if decision.action is Action.SET_POWER_LIMIT and isinstance(decision.to_value, (int, float)):
                results.append(self._set(decision, float(decision.to_value), readings.get(decision.gpu_uuid)))
            else:
                results.append(ActionResult(decision, Outcome.SKIPPED))
        return results

    def _set(self, decision: Decision, limit_w: float, reading: GpuReading | None) -> ActionResult:
        uuid = decision.gpu_uuid
        if uuid in self.monitor_only:
            return ActionResult(decision, Outcome.REFUSED, f"monitor-only: {self.monitor_only[uuid]}")
        limit_w = clamp_w(limit_w, self._gpus.get(uuid))
        enforced = None if reading is None else reading.power_limit_w
        if self.dry_run:
            # Compare with what would be in force had the earlier would-be changes happened.
            enforced = self._would_be_w.get(uuid, enforced)
        if enforced is not None and abs(enforced - limit_w) <= DRIFT_TOLERANCE_W / 2:
            return ActionResult(decision, Outcome.UNCHANGED, f"{limit_w:g} W already in force")
        if self.dry_run:
            self._would_be_w[uuid] = limit_w
            return ActionResult(decision, Outcome.DRY_RUN, f"would set {limit_w:g} W")
        if enforced is not None:
            self.originals.remember(uuid, enforced)
        return self._write(decision, uuid, limit_w)

    def _write(self, decision: Decision, uuid: str, limit_w: float) -> ActionResult:
        try:
            self._backend.set_power_limit(uuid, limit_w)
        except SetLimitRefused as exc:
            self.monitor_only[uuid] = str(exc)
            return ActionResult(decision, Outcome.FAILED, f"set refused, GPU now monitor-only: {exc}")
        except (SetLimitFailed, GpuLostError, BackendError) as exc:
            return ActionResult(decision, Outcome.FAILED, str(exc))
        return ActionResult(decision, Outcome.APPLIED, f"set {limit_w:g} W")

    def restore(self, snapshot: Snapshot | None, t_s: float, rule: str) -> list[ActionResult]:
        """Put every saved original limit back (clean stop, or leftovers of a crash at start)."""
        readings: Mapping[str, GpuReading] = {} if snapshot is None else {r.uuid: r for r in snapshot.gpus}
        results = []
        for uuid, original_w in self.originals.items():
            reading = readings.get(uuid)
            info = self._gpus.get(uuid)
            decision = Decision(
                t_s=t_s,
                gpu_index=-1 if info is None else info.index,
                gpu_uuid=uuid,
                rule=rule,
                action=Action.SET_POWER_LIMIT,
                reason=f"restoring the original limit {original_w:g} W",
                from_value=None if reading is None else reading.power_limit_w,
                to_value=original_w,
            )
            if info is None:
                results.append(ActionResult(decision, Outcome.SKIPPED, "GPU not present; entry kept"))
                continue
            enforced = None if reading is None else reading.power_limit_w
            if enforced is not None and abs(enforced - original_w) <= DRIFT_TOLERANCE_W / 2:
                result = ActionResult(decision, Outcome.UNCHANGED, f"{original_w:g} W already in force")
            elif self.dry_run:
                result = ActionResult(decision, Outcome.DRY_RUN, f"would set {original_w:g} W")
            else:
                result = self._write(decision, uuid, original_w)
            if result.outcome in (Outcome.APPLIED, Outcome.UNCHANGED):
                self.originals.forget(uuid)
            results.append(result)
        return results
