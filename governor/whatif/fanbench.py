"""Fan assist against the power ladder alone, on the simulator, through the real daemon loop.

:func:`run_fan_policy` runs one config on simulated GPUs (a virtual clock, no sleeping)
and returns a :class:`FanOutcome` per run: seconds the die spent above a threshold, the
work done (full-speed seconds, governor.sim.workload), the mean and peak fan speed the
GPU reported (percent), the peak die temperature and the power-limit changes. The
benchmark ``bench/fan_assist.py`` and the acceptance test of ``config/examples/rtx4070-fan.toml``
both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from governor.backends.simulated import SimulatedBackend
from governor.clock import VirtualClock
from governor.config import Config
from governor.core import TICK, TickReport
from governor.sim.profiles import GpuProfile
from governor.sim.scenario import Scenario
from governor.waiting import STOP, VirtualWaiter
from governor.whatif.common import run_service


@dataclass(frozen=True, slots=True)
class FanOutcome:
    """One config through one simulated run of GPU 0: seconds with the die above
    ``threshold_c`` (C), work (full-speed seconds), mean and peak fan speed reported
    (percent; None without fans), peak die temperature (C), enforced-limit changes, and the
    decisions counted by rule."""

    label: str
    duration_s: float
    threshold_c: float
    seconds_above: float
    work_s: float
    mean_fan_percent: float | None
    peak_fan_percent: float | None
    peak_c: float
    limit_changes: int
    lowest_limit_w: float | None
    decisions: tuple[tuple[str, int], ...]


class _Recorder(VirtualWaiter):
    """Waiter and only observer: integrates GPU 0's readings tick by tick until ``stop_s``."""

    def __init__(self, clock: VirtualClock, backend: SimulatedBackend, stop_s: float, threshold_c: float) -> None:
        super().__init__(clock)
        self.clock, self.backend, self.stop_s, self.threshold_c = clock, backend, stop_s, threshold_c
        self.above_s = self.fan_sum = self.fan_s = 0.0
        self.fan_peak: float | None = None
        self.peak_c = float("-inf")
        self.limits: list[float] = []
        self.counts: dict[str, int] = {}
        self.work_s: float | None = None

    def wait(self, deadline_s: float) -> list[str]:
        if self._events or deadline_s < self.stop_s:
            return super().wait(deadline_s)
        self.clock.advance_to(self.stop_s)
        self.work_s = self.backend.stats(0).work_s
        return [STOP]

    def observe(self, report: TickReport) -> None:
        if self.work_s is not None:
            return
        for result in report.results:
            rule = str(result.decision.rule)
            self.counts[rule] = self.counts.get(rule, 0) + 1
        if report.kind != TICK or report.snapshot is None or not report.snapshot.gpus:
            return
        reading = report.snapshot.gpus[0]
        dt = max(0.0, min(report.config.poll_interval_s, self.stop_s - report.snapshot.t_s))
        die = self.backend.die_temperature_c(0)
        self.peak_c = max(self.peak_c, die)
        if die > self.threshold_c:
            self.above_s += dt
        fans = reading.telemetry.fan_speed_ratios if reading.telemetry is not None else None
        if fans:
            percent = 100.0 * max(r for _, r in fans)
            self.fan_sum += percent * dt
            self.fan_s += dt
            self.fan_peak = percent if self.fan_peak is None else max(self.fan_peak, percent)
        if reading.power_limit_w is not None and (not self.limits or self.limits[-1] != reading.power_limit_w):
            self.limits.append(reading.power_limit_w)


def run_fan_policy(
    profile: GpuProfile,
    scenario: Scenario,
    config: Config,
    label: str,
    duration_s: float,
    *,
    threshold_c: float = 75.0,
    seed: int = 0,
) -> FanOutcome:
    """Run ``config`` on one simulated GPU of ``profile`` through ``scenario`` for ``duration_s``
    simulated seconds (its backend, state, metrics and dry run replaced: it acts on the
    simulated GPU only)."""
    clock = VirtualClock(start_s=0.0)
    backend = SimulatedBackend(profile, scenario, clock, seed=seed)
    recorder = _Recorder(clock, backend, duration_s, threshold_c)
    run_service(
        config,
        backend,
        clock,
        recorder,
        recorder,
        "gpu-governor-fanbench-",
        profile=profile.name,
        scenario=scenario.name,
    )
    work_s = recorder.work_s if recorder.work_s is not None else backend.stats(0).work_s
    return FanOutcome(
        label=label,
        duration_s=duration_s,
        threshold_c=threshold_c,
        seconds_above=recorder.above_s,
        work_s=work_s,
        mean_fan_percent=recorder.fan_sum / recorder.fan_s if recorder.fan_s else None,
        peak_fan_percent=recorder.fan_peak,
        peak_c=recorder.peak_c,
        limit_changes=max(0, len(recorder.limits) - 1),
        lowest_limit_w=min(recorder.limits) if recorder.limits else None,
        decisions=tuple(sorted(recorder.counts.items())),
    )


def render_table(outcomes: Sequence[tuple[str, FanOutcome]]) -> str:
    """A Markdown table of (scenario, outcome) rows."""
    lines = [
        "| scenario | policy | s > 75 C | peak C | work (full-speed s) | mean fan % | peak fan % | lowest limit W |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scenario, o in outcomes:
        mean = "-" if o.mean_fan_percent is None else f"{o.mean_fan_percent:.1f}"
        peak = "-" if o.peak_fan_percent is None else f"{o.peak_fan_percent:.0f}"
        low = "-" if o.lowest_limit_w is None else f"{o.lowest_limit_w:g}"
        lines.append(
            f"| {scenario} | {o.label} | {o.seconds_above:.0f} | {o.peak_c:.2f} | {o.work_s:.0f} | {mean} | {peak} "
            f"| {low} |"
        )
    return "\n".join(lines)
