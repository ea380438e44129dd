"""The fan half of the actuator: sets fan speeds and hands fans back to the card's control.

:class:`governor.actuator.Actuator` hands it every fan decision; like the power half it
is idempotent (no write when the speed already holds), honours the global dry run
("would set fan 0 to 70 %") and returns an :class:`ActionResult` for every decision.

Durability, as for the original power limits: no fan of a GPU is set before the
takeover is durably saved (:class:`governor.fanstate.FanControl`); when that save fails
the set is REFUSED, the GPU is listed in ``hands_off`` and the save is retried with the
next change wanted. :meth:`FanActuator.restore` hands every fan of every saved GPU back to
the card's automatic control (on stop, and at start after a crash).

A GPU whose fans cannot be set (NVML answers no permission or not supported) becomes
monitor-only for fans, marked once and never retried; any fan already set on it is handed
back at once. :class:`~governor.errors.BackendFatal` passes through every path.
"""

from __future__ import annotations

from collections.abc import Iterable

from governor.backends import Backend, GpuError, SetLimitRefused
from governor.fanstate import FanControl
from governor.model import Action, ActionResult, Decision, GpuInfo, Outcome, Rule, Snapshot


def clamp_percent(percent: float, gpu: GpuInfo | None) -> int:
    """A fan speed in whole percent within the card's range (NVML refuses anything outside)."""
    low = 0.0 if gpu is None or gpu.fan_speed_min_percent is None else gpu.fan_speed_min_percent
    high = 100.0 if gpu is None or gpu.fan_speed_max_percent is None else gpu.fan_speed_max_percent
    return round(max(low, min(percent, high)))


class FanActuator:
    """Applies fan decisions through a backend (see the module docstring)."""

    def __init__(self, backend: Backend, store: FanControl, gpus: Iterable[GpuInfo]) -> None:
        self._backend = backend
        self.store = store
        self._gpus: dict[str, GpuInfo] = {g.uuid: g for g in gpus}
        self.monitor_only: dict[str, str] = {}  # GPU UUID -> why its fans cannot be set
        self.hands_off: dict[str, str] = {}  # GPU UUID -> why its takeover could not be saved
        self._set: dict[tuple[str, int], int] = {}  # (GPU UUID, fan) -> percent set by the governor
        self._would: dict[tuple[str, int], int] = {}  # dry run: the speed it would have set

    def set_gpus(self, gpus: Iterable[GpuInfo]) -> None:
        """The GPUs present now."""
        self._gpus = {g.uuid: g for g in gpus}

    def apply(self, decision: Decision, dry_run: bool) -> ActionResult:
        """Carry out one fan decision (SET_FAN_SPEED or SET_FAN_AUTO)."""
        uuid, fan = decision.gpu_uuid, decision.fan
        if fan is None:
            return ActionResult(decision, Outcome.SKIPPED, "no fan named")
        if uuid in self.monitor_only:
            return ActionResult(decision, Outcome.REFUSED, f"fans monitor-only: {self.monitor_only[uuid]}")
        if decision.action is Action.SET_FAN_AUTO:
            return self._auto(decision, uuid, fan, dry_run)
        info = self._gpus.get(uuid)
        if info is None or decision.to_percent is None:
            return ActionResult(decision, Outcome.SKIPPED, "GPU not present")
        percent = clamp_percent(decision.to_percent, info)
        key = (uuid, fan)
        if dry_run:
            if self._would.get(key) == percent:
                return ActionResult(decision, Outcome.UNCHANGED, f"fan {fan} would already be at {percent} %")
            self._would[key] = percent
            return ActionResult(decision, Outcome.DRY_RUN, f"would set fan {fan} to {percent} %")
        if self._set.get(key) == percent:
            return ActionResult(decision, Outcome.UNCHANGED, f"fan {fan} already at {percent} %")
        if not self.store.remember(uuid, max(info.fan_count or 0, fan + 1)):
            why = self.store.last_error or "not saved"
            self.hands_off[uuid] = why
            return ActionResult(decision, Outcome.REFUSED, f"fan takeover not saved ({why}): not changed, retried")
        self.hands_off.pop(uuid, None)
        try:
            self._backend.set_fan_speed(uuid, fan, percent)
        except SetLimitRefused as exc:
            self._give_up(uuid, str(exc))
            return ActionResult(decision, Outcome.FAILED, f"fan set refused, fans now monitor-only: {exc}")
        except GpuError as exc:
            return ActionResult(decision, Outcome.FAILED, str(exc))
        self._set[key] = percent
        return ActionResult(decision, Outcome.APPLIED, f"set fan {fan} to {percent} %")

    def _auto(self, decision: Decision, uuid: str, fan: int, dry_run: bool) -> ActionResult:
        key = (uuid, fan)
        if dry_run:
            if self._would.pop(key, None) is None and key not in self._set:
                return ActionResult(decision, Outcome.UNCHANGED, f"fan {fan} already under the card's control")
            return ActionResult(decision, Outcome.DRY_RUN, f"would hand fan {fan} back to the card's automatic control")
        if key not in self._set and uuid not in dict(self.store.items()):
            return ActionResult(decision, Outcome.UNCHANGED, f"fan {fan} already under the card's control")
        try:
            self._backend.set_fan_auto(uuid, fan)
        except SetLimitRefused as exc:
            self._give_up(uuid, str(exc))
            return ActionResult(decision, Outcome.FAILED, f"hand-back refused, fans now monitor-only: {exc}")
        except GpuError as exc:
            return ActionResult(decision, Outcome.FAILED, str(exc))
        self._set.pop(key, None)
        if not any(u == uuid for u, _ in self._set):
            self.store.forget(uuid)
        return ActionResult(decision, Outcome.APPLIED, f"fan {fan} back under the card's automatic control")

    def _give_up(self, uuid: str, why: str) -> None:
        """The card refused a fan change: monitor-only for fans; any fan already set goes back (best effort)."""
        self.monitor_only[uuid] = why
        for u, fan in [k for k in self._set if k[0] == uuid]:
            try:
                self._backend.set_fan_auto(u, fan)
            except GpuError:
                continue
            del self._set[(u, fan)]
        if not any(u == uuid for u, _ in self._set):
            self.store.forget(uuid)

    def restore(self, snapshot: Snapshot | None, t_s: float, rule: str, only: set[str] | None, dry_run: bool
                ) -> list[ActionResult]:  # fmt: skip
        """Hand every fan of every saved GPU back to the card (clean stop, or leftovers of a crash).

        After a bad state file (``store.suspect``) every GPU with fans is handed back.
        ``only`` limits it to those GPU UUIDs (GPUs that just appeared). Only the fans a GPU
        has are handed back: an entry for more is cut to them (``store.cap``, with a warning).
        """
        del snapshot  # the hand-back does not depend on the present speeds
        todo = dict(self.store.items())
        if self.store.suspect:
            for uuid, gpu in self._gpus.items():
                if gpu.fan_count:
                    todo.setdefault(uuid, gpu.fan_count)
        results = []
        for uuid, saved in sorted(todo.items()):
            if only is not None and uuid not in only:
                continue
            info = self._gpus.get(uuid)
            count = saved if info is None or info.fan_count is None else min(saved, info.fan_count)
            if count < saved and not dry_run:  # fans the card does not have: their hand-back fails at every start
                self.store.cap(uuid, count)
            ok = True
            for fan in range(count):
                decision = Decision(
                    t_s=t_s,
                    gpu_index=-1 if info is None else info.index,
                    gpu_uuid=uuid,
                    rule=Rule(rule),
                    action=Action.SET_FAN_AUTO,
                    reason="restoring the card's automatic fan control",
                    fan=fan,
                )
                result = self._restore_one(decision, uuid, fan, info, dry_run)
                ok = ok and result.outcome is Outcome.APPLIED
                results.append(result)
                if info is None:
                    break
            if ok and not dry_run:
                self.store.forget(uuid)
        if not dry_run and only is None:
            self.store.suspect = False  # every GPU present was handed back
        return results

    def _restore_one(self, decision: Decision, uuid: str, fan: int, info: GpuInfo | None, dry_run: bool
                     ) -> ActionResult:  # fmt: skip
        if info is None:
            return ActionResult(decision, Outcome.SKIPPED, "GPU not present; entry kept")
        if dry_run:
            return ActionResult(decision, Outcome.DRY_RUN, f"would hand fan {fan} back to the card's automatic control")
        try:
            self._backend.set_fan_auto(uuid, fan)
        except GpuError as exc:  # refused or failed: the entry stays for the next start
            return ActionResult(decision, Outcome.FAILED, str(exc))
        self._set.pop((uuid, fan), None)
        return ActionResult(decision, Outcome.APPLIED, f"fan {fan} back under the card's automatic control")
