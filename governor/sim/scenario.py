"""Workload scenarios: what each simulated GPU is asked to do, over time.

A scenario is a TOML file (shipped ones in ``governor/data/scenarios``, loaded by
name; any other by path), documented in docs/simulation.md. It has:

- phases, in order, each with a duration and a load (power demand, workload kind,
  utilization, optionally ambient temperature), with optional per-GPU overrides.
  After the last phase the sequence starts again (``repeat = true``, the default) or
  the last phase holds forever (``repeat = false``);
- processes with VRAM over time (start, end, size, growth rate for a leak); their
  times are absolute seconds of simulated time and never repeat;
- events: faults injected into one GPU at a time (``lost``...), or cleared; or an XID
  error (``xid = 79``) reported by one GPU.

Everything is deterministic: the only randomness, power noise, is seeded by the backend.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path

from governor.schema import MAX_BYTES, Table
from governor.sim._schema import issues_in, read_toml
from governor.sim.profiles import GpuProfile, resolve
from governor.sim.workload import PERF_EXPONENTS, WORKLOAD_KINDS

GIB = 1024**3
MAX_GPU_INDEX = 63
"""The highest GPU index a scenario may name: a simulation has at most 64 GPUs."""
MIN_PHASE_S = 0.001
"""The shortest phase (seconds): a vanishing one overflows the phase timeline's arithmetic."""
MAX_GROWTH_GIB_PER_S = 1e3
"""The fastest leak a process may have (GiB per second)."""
FAULTS: tuple[str, ...] = ("lost", "temperature_unsupported", "set_limit_refused", "fan_control_refused", "fan_stuck")
"""Faults the simulator can inject; ``None`` (``"none"`` in a scenario file) clears one.
``fan_control_refused``: setting a fan answers no permission; ``fan_stuck``: the fans keep
their present speed whatever is set."""


@dataclass(frozen=True, slots=True)
class Load:
    """What a workload asks of one GPU during a phase.

    Exactly one of ``demand_w`` (watts) or ``demand_fraction`` (of the profile's default
    power limit) is set; 0 means no work (the GPU idles). ``perf_exponent`` is the
    throughput law's exponent (see governor.sim.workload); ``utilization_ratio`` what NVML
    would report while working (0..1).
    """

    demand_w: float | None
    demand_fraction: float | None
    kind: str
    perf_exponent: float
    utilization_ratio: float

    def demand_for(self, profile: GpuProfile) -> float:
        """The demand in watts on a GPU of ``profile``."""
        if self.demand_w is not None:
            return self.demand_w
        return (self.demand_fraction or 0.0) * profile.power_limit_default_w


@dataclass(frozen=True, slots=True)
class Phase:
    """One stretch of a scenario: ``duration_s`` seconds of ``load`` on every GPU, except
    those in ``gpu_loads`` (GPU index, load); ``ambient_c`` None keeps the scenario's."""

    name: str
    duration_s: float
    load: Load
    ambient_c: float | None = None
    gpu_loads: tuple[tuple[int, Load], ...] = ()

    def load_for(self, gpu_index: int) -> Load:
        """The load on GPU ``gpu_index`` in this phase."""
        for index, load in self.gpu_loads:
            if index == gpu_index:
                return load
        return self.load


@dataclass(frozen=True, slots=True)
class ScenarioProcess:
    """A process holding VRAM from ``start_s`` until ``end_s`` (None: forever), seconds of
    simulated time. It holds ``memory_bytes`` at start and grows by ``growth_bytes_per_s``
    (a leak) up to ``max_memory_bytes`` (None: no cap of its own). ``gpu`` None puts one
    copy on every GPU."""

    name: str
    gpu: int | None
    start_s: float
    end_s: float | None
    memory_bytes: int
    growth_bytes_per_s: float = 0.0
    max_memory_bytes: int | None = None

    def memory_at(self, t_s: float) -> int:
        """Bytes held at simulated time ``t_s`` (assumes the process is running then)."""
        if self.growth_bytes_per_s == 0.0:
            return self.memory_bytes
        size = self.memory_bytes + int(self.growth_bytes_per_s * max(0.0, t_s - self.start_s))
        return size if self.max_memory_bytes is None else min(size, self.max_memory_bytes)


@dataclass(frozen=True, slots=True)
class ScenarioEvent:
    """At ``at_s`` seconds, GPU ``gpu`` gets ``fault`` (one of FAULTS; None clears), or,
    when ``xid`` is set, reports one XID error of that code (its fault is unchanged)."""

    at_s: float
    gpu: int
    fault: str | None
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    """A whole scenario; ``ambient_c`` None means the profile's ambient.

    ``power_noise_w`` is the standard deviation of power noise in watts.
    ``initial_power_fraction`` (of the default limit) is what the GPUs drew, long enough
    to settle, before the start; None means idle power (a GPU that has been idle).
    """

    name: str
    description: str
    phases: tuple[Phase, ...]
    processes: tuple[ScenarioProcess, ...] = ()
    events: tuple[ScenarioEvent, ...] = ()
    ambient_c: float | None = None
    repeat: bool = True
    power_noise_w: float = 1.0
    initial_power_fraction: float | None = None
    source: str = "<built-in>"

    def __post_init__(self) -> None:
        if not self.phases:
            raise ValueError("a scenario needs at least one phase")

    @property
    def cycle_s(self) -> float:
        """Length of one pass through the phases, seconds."""
        return sum(p.duration_s for p in self.phases)

    def highest_gpu_index(self) -> int:
        """The highest GPU index any phase override, process or event names (-1: none)."""
        indexes = [i for phase in self.phases for i, _ in phase.gpu_loads]
        indexes += [p.gpu for p in self.processes if p.gpu is not None]
        indexes += [e.gpu for e in self.events]
        return max(indexes, default=-1)


SPAN_MARGIN_S = 1e-6
"""How far before a phase's end (seconds) :meth:`PhaseTimeline.span_at` vouches for its answer."""


class PhaseTimeline:
    """Which phase runs at a given simulated time, and when the next one starts."""

    def __init__(self, scenario: Scenario) -> None:
        self._ends: list[float] = []
        total = 0.0
        for phase in scenario.phases:
            total += phase.duration_s
            self._ends.append(total)
        self._cycle_s = total
        self._repeat = scenario.repeat
        self._last = len(scenario.phases) - 1

    def phase_at(self, t_s: float) -> tuple[int, float]:
        """(index of the phase running at ``t_s``, simulated time its run ends; inf: never)."""
        index, end_s, _ = self.span_at(t_s)
        return index, end_s

    def span_at(self, t_s: float) -> tuple[int, float, float]:
        """:meth:`phase_at` and, third, a time up to which any later ``t_s`` gets the same answer
        (seconds; it stays clear of the phase's end by a margin far above float rounding, and is
        ``t_s`` itself where it cannot vouch for one), so a caller may keep the answer until then."""
        if t_s < 0:
            t_s = 0.0
        if not self._repeat and t_s >= self._cycle_s:
            return self._last, math.inf, math.inf
        cycles = math.floor(t_s / self._cycle_s) if self._repeat else 0
        base = cycles * self._cycle_s
        offset = t_s - base
        index = bisect.bisect_right(self._ends, offset)
        if index > self._last:  # float rounding at the very end of a cycle
            return 0, base + self._cycle_s + self._ends[0], t_s
        if not self._repeat and index == self._last:
            return index, math.inf, math.inf
        end_s = base + self._ends[index]
        return index, end_s, end_s - SPAN_MARGIN_S


def _load(table: Table, parent: Load | None) -> Load | None:
    has_w, has_fraction = table.has("demand_w"), table.has("demand_fraction")
    if has_w and has_fraction:
        table.issues.add(table.key("demand_w"), "one of demand_w or demand_fraction", "both")
        return None
    demand_w = demand_fraction = None
    if has_w:
        demand_w = table.number("demand_w", "watts the workload would draw uncapped", lo=0.0, hi=5000.0)
        if demand_w is None:
            return None
    elif has_fraction:
        demand_fraction = table.number("demand_fraction", "a fraction of the default power limit", lo=0.0, hi=5.0)
        if demand_fraction is None:
            return None
    elif parent is None:
        table.issues.add(table.key("demand_w"), "demand_w (watts) or demand_fraction (of the default limit)", "nothing")
        return None
    else:
        demand_w, demand_fraction = parent.demand_w, parent.demand_fraction
    default_kind = parent.kind if parent is not None else "compute"
    kind = table.string("kind", "a workload kind", default=default_kind, choices=WORKLOAD_KINDS)
    if kind is None:
        return None
    default_exponent = PERF_EXPONENTS[kind]
    if parent is not None and not table.has("kind"):
        default_exponent = parent.perf_exponent
    exponent = table.number("perf_exponent", "an exponent", lo=0.0, hi=3.0, default=default_exponent)
    utilization = table.number(
        "utilization",
        "a utilization ratio",
        lo=0.0,
        hi=1.0,
        default=parent.utilization_ratio if parent else 1.0,
    )
    if exponent is None or utilization is None:
        return None
    return Load(demand_w, demand_fraction, kind, exponent, utilization)


def _bytes(table: Table, name: str, *, required: bool) -> int | None:
    """A size given as ``<name>_bytes`` or ``<name>_gib``."""
    b_key, gib_key = f"{name}_bytes", f"{name}_gib"
    has_b, has_gib = table.has(b_key), table.has(gib_key)
    if has_b and has_gib:
        table.issues.add(table.key(b_key), f"one of {b_key} or {gib_key}", "both")
        return None
    if has_b:
        return table.integer(b_key, "bytes", lo=0, hi=MAX_BYTES)
    if has_gib:
        gib = table.number(gib_key, "GiB", lo=0.0, hi=1e6)
        return None if gib is None else int(gib * GIB)
    if required:
        table.issues.add(table.key(b_key), f"{b_key} (bytes) or {gib_key} (GiB)", "nothing")
    return None


def _rate(table: Table) -> float:
    has_b, has_gib = table.has("growth_bytes_per_s"), table.has("growth_gib_per_s")
    if has_b and has_gib:
        table.issues.add(table.key("growth_bytes_per_s"), "one of growth_bytes_per_s or growth_gib_per_s", "both")
        return 0.0
    if has_b:
        return table.number("growth_bytes_per_s", "bytes per second", lo=0.0, hi=MAX_GROWTH_GIB_PER_S * GIB) or 0.0
    if has_gib:
        return (table.number("growth_gib_per_s", "GiB per second", lo=0.0, hi=MAX_GROWTH_GIB_PER_S) or 0.0) * GIB
    return 0.0


def parse_scenario(data: dict[str, object], source: str) -> Scenario:
    """Validate a parsed scenario document; SimDataError lists every problem."""
    issues = issues_in(source)
    top = Table(dict(data), "", issues)
    name = top.string("name", "a scenario name")
    description = top.string("description", "a sentence saying what the scenario shows", default="")
    ambient = top.number("ambient_c", "a room temperature in C", lo=-20.0, hi=60.0, required=False)
    repeat = top.boolean("repeat", "whether the phases start over after the last one", default=True)
    noise = top.number("power_noise_w", "a standard deviation in watts", lo=0.0, hi=100.0, default=1.0)
    initial = top.number(
        "initial_power_fraction", "a fraction of the default power limit", lo=0.0, hi=2.0, required=False
    )
    phases: list[Phase] = []
    phase_tables = top.tables("phase")
    if not phase_tables:
        issues.add("phase", "at least one [[phase]] table", "none")
    for pt in phase_tables:
        p_name = pt.string("name", "a phase name", default=f"phase-{len(phases)}")
        duration = pt.number("duration_s", "seconds", lo=MIN_PHASE_S, hi=1e9)
        p_ambient = pt.number("ambient_c", "a room temperature in C", lo=-20.0, hi=60.0, required=False)
        load = _load(pt, None)
        gpu_loads: list[tuple[int, Load]] = []
        for gt in pt.tables("gpu"):
            index = gt.integer("index", "a GPU index", hi=MAX_GPU_INDEX)
            override = _load(gt, load) if load is not None else None
            gt.finish()
            if index is not None and override is not None:
                if any(i == index for i, _ in gpu_loads):
                    issues.add(gt.key("index"), "each GPU index once per phase", str(index))
                gpu_loads.append((index, override))
        pt.finish()
        if p_name is not None and duration is not None and load is not None:
            phases.append(Phase(p_name, duration, load, p_ambient, tuple(gpu_loads)))
    processes: list[ScenarioProcess] = []
    for pr in top.tables("process"):
        pr_name = pr.string("name", "a process name")
        gpu = pr.integer("gpu", "a GPU index (leave out for every GPU)", hi=MAX_GPU_INDEX, required=False)
        start = pr.number("start_s", "seconds of simulated time", lo=0.0, default=0.0)
        end = pr.number("end_s", "seconds of simulated time", lo=0.0, required=False)
        memory = _bytes(pr, "memory", required=True)
        cap = _bytes(pr, "max_memory", required=False)
        growth = _rate(pr)
        pr.finish()
        if start is not None and end is not None and end <= start:
            issues.add(pr.key("end_s"), f"a time after start_s {start:g}", f"{end:g}")
            continue
        if pr_name is not None and start is not None and memory is not None:
            processes.append(ScenarioProcess(pr_name, gpu, start, end, memory, growth, cap))
    events: list[ScenarioEvent] = []
    for ev in top.tables("event"):
        at = ev.number("at_s", "seconds of simulated time", lo=0.0)
        gpu = ev.integer("gpu", "a GPU index", hi=MAX_GPU_INDEX)
        xid = ev.integer("xid", "an XID error code (1-999)", lo=1, required=False)
        if xid is not None and xid > 999:
            issues.add(ev.key("xid"), "an XID error code (1-999)", str(xid))
            xid = None
        if xid is not None and ev.has("fault"):
            issues.add(ev.key("fault"), "one of fault or xid per event", "both")
        if xid is not None:
            ev.finish()
            if at is not None and gpu is not None:
                events.append(ScenarioEvent(at, gpu, None, xid))
            continue
        fault = ev.string("fault", "a fault (or xid = CODE: an XID error)", choices=(*FAULTS, "none"))
        ev.finish()
        if at is not None and gpu is not None and fault is not None:
            events.append(ScenarioEvent(at, gpu, None if fault == "none" else fault))
    top.finish()
    issues.raise_if_any()
    assert name is not None and description is not None and noise is not None
    return Scenario(
        name=name,
        description=description,
        phases=tuple(phases),
        processes=tuple(processes),
        events=tuple(sorted(events, key=lambda e: e.at_s)),
        ambient_c=ambient,
        repeat=repeat,
        power_noise_w=noise,
        initial_power_fraction=initial,
        source=source,
    )


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name (``sustained-inference``) or any scenario TOML by path."""
    path: Path = resolve(name_or_path, "scenarios", "simulation.scenario")
    return parse_scenario(read_toml(path), str(path))
