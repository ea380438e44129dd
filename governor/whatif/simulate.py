"""Closed loop: the real daemon governing a simulated GPU on a virtual clock.

Each policy (a config) runs the whole :class:`governor.service.Service` loop - read,
rules, actuator, publish - against a :class:`governor.backends.simulated.SimulatedBackend`
on a :class:`governor.clock.VirtualClock`: nothing sleeps, so a simulated day takes
seconds. A recorder observes every report the governor's step returns (the decisions
with their outcomes, each GPU's reading, target and per-class VRAM use) and, as the
loop's waiter, lets the clock jump to the next tick. Nothing is logged: the service
runs with a silent logger and no observer but the recorder.

Every comparison also runs the same profile, scenario and seed with no governor
(``power.enabled = false``, VRAM enforcement off): throughput is reported against it.

Measured per GPU, once per tick of the policy's ``poll_interval_s``:

- peak die temperature (C, unrounded: the model's state, not NVML's whole degrees);
- seconds above each threshold (the die strictly above it for the tick's interval);
- limit changes: the enforced power limit differing from the previous tick's, per
  hour of the run, and the most in any 3600 s window (the busiest hour);
- work (seconds of full-speed work, see governor.sim.workload) and energy (J), from
  the simulator's integrals over the whole run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from governor.backends.simulated import SimulatedBackend
from governor.clock import VirtualClock
from governor.config import Config
from governor.core import TICK, TickReport
from governor.model import GpuHealth, ThermalZone
from governor.rules.thermal import thresholds
from governor.sim.gpu import SimStats
from governor.sim.profiles import GpuProfile
from governor.sim.scenario import Scenario
from governor.waiting import STOP, VirtualWaiter
from governor.whatif.common import format_duration, run_service, without_governor
from governor.whatif.progress import Progress
from governor.whatif.series import GpuSeries

REPORTED_THRESHOLDS_C = (75.0, 80.0, 85.0)
"""Thresholds always reported, besides the configs' zone thresholds."""
HOUR_S = 3600.0


@dataclass(frozen=True, slots=True)
class SimSetup:
    """What is simulated: ``gpu_count`` GPUs of ``profile`` running ``scenario`` for
    ``duration_s`` simulated seconds, power noise seeded by ``seed``, in the scenario's
    room unless ``ambient_c`` (C) is given."""

    profile: GpuProfile
    scenario: Scenario
    duration_s: float
    seed: int = 0
    gpu_count: int = 1
    ambient_c: float | None = None


@dataclass(frozen=True, slots=True)
class GpuOutcome:
    """One GPU through one run: peak die temperature (C), seconds above each threshold
    ((C, s) pairs), enforced-limit changes (total and in the busiest 3600 s window), work
    (full-speed seconds), energy (J), and when it was lost (s; None if never)."""

    gpu_index: int
    peak_c: float
    seconds_above: tuple[tuple[float, float], ...]
    limit_changes: int
    busiest_hour_changes: int
    work_s: float
    energy_j: float
    lost_at_s: float | None


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """One policy through the whole setup: per-GPU outcomes, decisions counted by rule,
    and the series for plotting."""

    label: str
    duration_s: float
    poll_interval_s: float
    gpus: tuple[GpuOutcome, ...]
    decision_counts: tuple[tuple[str, int], ...]
    series: tuple[GpuSeries, ...]
    limit_sum_max_w: float | None = None  # highest sum of all GPUs' limits after any write or tick (W)


@dataclass(frozen=True, slots=True)
class Comparison:
    """Several policies on the same setup, and the no-governor baseline."""

    setup: SimSetup
    thresholds_c: tuple[float, ...]
    baseline: RunOutcome
    runs: tuple[RunOutcome, ...]


def busiest_window(times_s: Sequence[float], window_s: float = HOUR_S) -> int:
    """The most of ``times_s`` (sorted) that fall in any half-open window of ``window_s`` seconds."""
    best = 0
    start = 0
    for end, t in enumerate(times_s):
        while t - times_s[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


class _Recorder(VirtualWaiter):
    """The service's waiter and only observer: records each report, then jumps the clock to the next
    tick (a VirtualWaiter that stops the run at ``stop_s``)."""

    def __init__(
        self,
        clock: VirtualClock,
        backend: _WatchedBackend,
        stop_s: float,
        thresholds_c: Sequence[float],
        series: list[GpuSeries],
        progress: Progress | None,
    ) -> None:
        super().__init__(clock)
        self.clock = clock
        self.backend = backend
        self.stop_s = stop_s
        self.thresholds_c = tuple(thresholds_c)
        self.series = series
        self.progress = progress
        self.stopped = False
        self.final: list[SimStats] = []
        self.counts: Counter[str] = Counter()
        n = len(series)
        self.peak_c = [float("-inf")] * n
        self.above_s = [[0.0] * len(self.thresholds_c) for _ in range(n)]
        self.changes: list[list[float]] = [[] for _ in range(n)]
        self.lost_at_s: list[float | None] = [None] * n
        self._limit: list[float | None] = [None] * n
        self.limit_sum_max_w: float | None = None

    def wait(self, deadline_s: float) -> list[str]:
        """Stop at the end of the run, else advance to ``deadline_s`` (queued events first)."""
        if self._events or deadline_s < self.stop_s:
            events = super().wait(deadline_s)
            if not events and self.progress is not None:
                self.progress.update(deadline_s)
            return events
        self.clock.advance_to(self.stop_s)
        self.final = [self.backend.stats(i) for i in range(len(self.series))]
        self.stopped = True
        self.backend.watching = False
        if self.progress is not None:
            self.progress.update(self.stop_s)
        return [STOP]

    def observe(self, report: TickReport) -> None:
        """Count and mark the report's decisions (none after the run ended); record a tick."""
        if self.stopped:
            return
        n = len(self.series)
        for result in report.results:
            decision = result.decision
            self.counts[decision.rule] += 1
            if 0 <= decision.gpu_index < n:
                self.series[decision.gpu_index].mark(decision)
        if report.kind == TICK and report.snapshot is not None:
            self._record(report, report.snapshot.t_s)

    def _record(self, report: TickReport, t: float) -> None:
        dt = max(0.0, min(report.config.poll_interval_s, self.stop_s - t))
        backend = self.backend
        total = backend.limit_sum_w()  # after this tick's writes
        if self.limit_sum_max_w is None or total > self.limit_sum_max_w:
            self.limit_sum_max_w = total
        thresholds_c = self.thresholds_c
        for gpu in report.gpus:
            reading = gpu.reading
            if reading is None:
                continue
            i = reading.index
            die = backend.die_temperature_c(i)
            self.peak_c[i] = max(self.peak_c[i], die)
            above = self.above_s[i]
            for k, threshold in enumerate(thresholds_c):
                if die > threshold:
                    above[k] += dt
            lost = reading.health is GpuHealth.LOST
            if lost and self.lost_at_s[i] is None:
                self.lost_at_s[i] = t
            limit = reading.power_limit_w
            if limit is not None:
                previous = self._limit[i]
                if previous is not None and limit != previous:
                    self.changes[i].append(t)
                self._limit[i] = limit
            vram = {c.name: c.used_bytes for c in gpu.classes}
            self.series[i].add(t, None if lost else die, reading.power_w, limit, gpu.target_w, vram)


def _zone_thresholds(config: Config, backend: SimulatedBackend) -> list[tuple[tuple[ThermalZone, float], ...]]:
    return [thresholds(config.policy_for(info).thermal) for info in backend.gpus()]


class _WatchedBackend(SimulatedBackend):
    """The simulated backend, noting the highest sum of all GPUs' limits right after a write
    that raised one (a lowering cannot push the sum up; a start over budget is the cards'
    own) until the run ends (the restore on stop puts the originals back)."""

    limit_sum_max_w: float | None = None
    watching = True

    def limit_sum_w(self) -> float:
        """The sum of every GPU's enforced power limit, watts (in index order, as the limits add up)."""
        with self._lock:
            return sum([g.limit_w for g in self._gpus])

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Set one limit, then note the sum of every GPU's limit when it was a raise."""
        index = next(i for i, g in enumerate(self.gpus()) if g.uuid == uuid)
        before = self.limit_w(index)
        super().set_power_limit(uuid, limit_w)
        if not self.watching or self.limit_w(index) <= before:
            return
        total = sum(self.limit_w(i) for i in range(len(self.gpus())))
        if self.limit_sum_max_w is None or total > self.limit_sum_max_w:
            self.limit_sum_max_w = total


def _backend(setup: SimSetup, clock: VirtualClock) -> _WatchedBackend:
    return _WatchedBackend(
        setup.profile,
        setup.scenario,
        clock,
        gpu_count=setup.gpu_count,
        seed=setup.seed,
        ambient_c=setup.ambient_c,
    )


def run_policy(
    setup: SimSetup,
    config: Config,
    label: str,
    thresholds_c: Sequence[float],
    progress: Progress | None = None,
) -> RunOutcome:
    """Run ``config``'s policy through the daemon loop for the whole setup.

    The config's own backend, ``[simulation]``, ``state_dir``, metrics and ``dry_run``
    are replaced: the run acts on the simulated GPUs only, keeps its saved limits in a
    temporary directory and serves nothing.
    """
    clock = VirtualClock(start_s=0.0)
    backend = _backend(setup, clock)
    series = [
        GpuSeries(label=label if setup.gpu_count == 1 else f"{label} gpu{i}", gpu_index=i, zones=zones)
        for i, zones in enumerate(_zone_thresholds(config, backend))
    ]
    recorder = _Recorder(clock, backend, setup.duration_s, thresholds_c, series, progress)
    if progress is not None:
        progress.start(f"simulating {label}", setup.duration_s)
    run_service(
        config,
        backend,
        clock,
        recorder,
        recorder,
        "gpu-governor-whatif-",
        profile=setup.profile.name,
        scenario=setup.scenario.name,
        gpu_count=setup.gpu_count,
        seed=setup.seed,
        ambient_c=setup.ambient_c,
        time_scale=1.0,
    )
    if progress is not None:
        progress.finish()
    final = recorder.final or [backend.stats(i) for i in range(setup.gpu_count)]
    gpus = tuple(
        GpuOutcome(
            gpu_index=i,
            peak_c=recorder.peak_c[i],
            seconds_above=tuple(zip(recorder.thresholds_c, recorder.above_s[i])),
            limit_changes=len(recorder.changes[i]),
            busiest_hour_changes=busiest_window(recorder.changes[i]),
            work_s=final[i].work_s,
            energy_j=final[i].energy_j,
            lost_at_s=recorder.lost_at_s[i],
        )
        for i in range(setup.gpu_count)
    )
    return RunOutcome(
        label=label,
        duration_s=setup.duration_s,
        poll_interval_s=config.poll_interval_s,
        gpus=gpus,
        decision_counts=tuple(sorted(recorder.counts.items())),
        series=tuple(series),
        limit_sum_max_w=_highest(recorder.limit_sum_max_w, backend.limit_sum_max_w),
    )


def _highest(*values: float | None) -> float | None:
    """The highest of ``values`` that are not None (None when all are)."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def report_thresholds(setup: SimSetup, configs: Sequence[Config]) -> tuple[float, ...]:
    """75, 80 and 85 C and every zone threshold any of ``configs`` sets for these GPUs, ascending."""
    backend = _backend(setup, VirtualClock())
    found = set(REPORTED_THRESHOLDS_C)
    for config in configs:
        for zones in _zone_thresholds(config, backend):
            found.update(c for _, c in zones)
    return tuple(sorted(found))


def compare(
    setup: SimSetup, configs: Sequence[Config], labels: Sequence[str], progress: Progress | None = None
) -> Comparison:
    """Run the no-governor baseline (from the first config) and every config on ``setup``."""
    if not configs or len(configs) != len(labels):
        raise ValueError("compare: expected one label per config, and at least one config")
    limits = report_thresholds(setup, configs)
    baseline = run_policy(setup, without_governor(configs[0]), "no governor", limits, progress)
    runs = tuple(run_policy(setup, c, label, limits, progress) for c, label in zip(configs, labels))
    return Comparison(setup=setup, thresholds_c=limits, baseline=baseline, runs=runs)


def _table(rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Rows as aligned text; the first ``left`` columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.ljust(w) if k < left else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def render_comparison(c: Comparison) -> str:
    """The comparison as text: a header naming the setup, one row per policy and GPU, then
    each policy's decisions by rule and any lost GPU."""
    s = c.setup
    ambient = s.ambient_c if s.ambient_c is not None else s.scenario.ambient_c
    room = f"{ambient:g} C room" if ambient is not None else f"{s.profile.ambient_c:g} C room (the profile's)"
    lines = [
        f"simulated: {s.gpu_count} x {s.profile.gpu_name} (profile {s.profile.name}), "
        f"scenario {s.scenario.name}, {format_duration(s.duration_s)}, seed {s.seed}, {room}"
    ]
    if s.scenario.description:
        lines.append(f"  {s.scenario.description}")
    lines.append("")
    multi = s.gpu_count > 1
    header = ["policy", *(["gpu"] if multi else []), "peak C"]
    header += [f">{t:g} C s" for t in c.thresholds_c]
    header += ["changes/h", "busiest h", "throughput", "energy kWh"]
    rows = [header]
    hours = s.duration_s / HOUR_S
    for run in (c.baseline, *c.runs):
        for g, base in zip(run.gpus, c.baseline.gpus):
            row = [run.label, *([str(g.gpu_index)] if multi else []), f"{g.peak_c:.1f}"]
            row += [f"{seconds:.0f}" for _, seconds in g.seconds_above]
            retained = f"{100.0 * g.work_s / base.work_s:.1f} %" if base.work_s > 0 else "n/a"
            row += [f"{g.limit_changes / hours:.2f}", str(g.busiest_hour_changes), retained]
            row.append(f"{g.energy_j / 3.6e6:.3f}")
            rows.append(row)
    lines += _table(rows, 2 if multi else 1)
    lines.append("")
    lines.append(
        "peak: die temperature; >X C s: seconds above X C; changes/h: enforced power-limit changes per hour; "
        "busiest h: most changes in any 3600 s; throughput: work done vs no governor."
    )
    for run in (c.baseline, *c.runs):
        decided = ", ".join(f"{rule} {n}" for rule, n in run.decision_counts) or "none"
        lines.append(f"{run.label}: decisions: {decided}")
        for g in run.gpus:
            if g.lost_at_s is not None:
                lines.append(f"{run.label}: gpu{g.gpu_index} lost at t={g.lost_at_s:g} s")
    return "\n".join(lines) + "\n"


def _ratio(work_s: float, base_s: float) -> float | None:
    return None if base_s <= 0 else round(work_s / base_s, 6)


def _gpu_document(g: GpuOutcome, base: GpuOutcome, hours: float) -> dict[str, Any]:
    return {
        "gpu": g.gpu_index,
        "peak_c": round(g.peak_c, 3),
        "seconds_above_c": {f"{c:g}": round(s, 3) for c, s in g.seconds_above},
        "changes_per_hour": round(g.limit_changes / hours, 4),
        "limit_changes": g.limit_changes,
        "busiest_hour_changes": g.busiest_hour_changes,
        "throughput_ratio": _ratio(g.work_s, base.work_s),
        "energy_kwh": round(g.energy_j / 3.6e6, 6),
        "lost_at_s": g.lost_at_s,
    }


def policy_document(run: RunOutcome, baseline: RunOutcome) -> dict[str, Any]:
    """One policy of a comparison as plain data (docs/whatif.md): over all GPUs, the highest
    peak, seconds above each threshold and changes (per GPU: the worst GPU), the total work
    against the baseline's and the total energy; and each GPU on its own."""
    hours = run.duration_s / HOUR_S
    thresholds = [c for c, _ in run.gpus[0].seconds_above] if run.gpus else []
    return {
        "name": run.label,
        "peak_c": round(max(g.peak_c for g in run.gpus), 3),
        "seconds_above_c": {f"{c:g}": round(max(dict(g.seconds_above)[c] for g in run.gpus), 3) for c in thresholds},
        "changes_per_hour": round(max(g.limit_changes for g in run.gpus) / hours, 4),
        "busiest_hour_changes": max(g.busiest_hour_changes for g in run.gpus),
        "throughput_ratio": _ratio(sum(g.work_s for g in run.gpus), sum(g.work_s for g in baseline.gpus)),
        "energy_kwh": round(sum(g.energy_j for g in run.gpus) / 3.6e6, 6),
        "limit_sum_max_w": run.limit_sum_max_w,
        "decisions": dict(run.decision_counts),
        "gpus": [_gpu_document(g, b, hours) for g, b in zip(run.gpus, baseline.gpus)],
    }


def comparison_document(c: Comparison) -> dict[str, Any]:
    """The comparison as one JSON-ready document: the setup, then a ``policies`` list whose
    first entry is the no-governor baseline (see docs/whatif.md for every field)."""
    s = c.setup
    return {
        "profile": s.profile.name,
        "gpu_name": s.profile.gpu_name,
        "scenario": s.scenario.name,
        "duration_s": s.duration_s,
        "seed": s.seed,
        "gpu_count": s.gpu_count,
        "ambient_c": s.ambient_c,
        "thresholds_c": list(c.thresholds_c),
        "policies": [policy_document(run, c.baseline) for run in (c.baseline, *c.runs)],
    }
