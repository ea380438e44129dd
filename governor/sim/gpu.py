"""One simulated GPU: power draw, temperature, throughput and VRAM, stepped in fixed time.

Time is counted in whole sub-steps of ``substep_s`` seconds of simulated time; step
``k`` covers ``[k*substep_s, (k+1)*substep_s)`` with the phase, limit and fault in force
at its start. Because the grid is fixed, a run gives the same physics (and, for one
seed, the same noise) however often it is read.

Per step::

    base_w  = max(idle_w, min(demand_w, limit_w))       (idle_w when there is no work)
    power_w = base_w + gauss(0, noise_w)                (seeded; never below 0, never above
                                                         the enforced limit: the card's power
                                                         controller holds it there)

and when the die is at or above the slowdown temperature the GPU throttles itself:
``base_w`` drops to the power that would hold the die at the slowdown temperature
(clock event reason 0x20). Reaching the shutdown temperature turns the GPU ``lost``
(as a real board drops off the bus). A lost GPU draws nothing and does no work.

Accumulators: ``energy_j`` (integral of power), ``work_s`` (integral of the throughput
ratio: seconds of full-speed work, see governor.sim.workload), ``active_s`` (seconds
with work to do), ``event_s`` (seconds each clock event reason bit was active, step by
step: the idle and power-cap bits for the whole run of a phase, the thermal bit for the
steps spent at or above the slowdown temperature).

Telemetry (the profile's :class:`~governor.sim.profiles.SimTelemetry`): busy, the SM
clock falls below its maximum as the power available to the work falls below the
demand, as ``f = f_idle + (f_max - f_idle) * ((P - P_idle) / (demand - P_idle)) ** (1/3)``
(dynamic power grows about as the cube of the clock, voltage following frequency);
idle it is the idle clock. The memory clock and performance state are the profile's
busy (P0) or idle values. XID errors come from scenario events (``xid``); an XID 48
(double-bit ECC error) also counts an uncorrected ECC error on a board with ECC.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from governor.model import CLOCK_EVENT_REASONS, GpuTelemetry, ProcessReading
from governor.sim.fans import FanDrive
from governor.sim.profiles import GpuProfile
from governor.sim.scenario import PhaseTimeline, Scenario, ScenarioEvent
from governor.sim.thermal import ThermalState
from governor.sim.workload import throughput_ratio

REASON_IDLE = 0x1
REASON_SW_POWER_CAP = 0x4
REASON_SW_THERMAL_SLOWDOWN = 0x20
XID_DOUBLE_BIT_ECC = 48
_Clocks = tuple[float, float, int]  # SM clock (MHz), memory clock (MHz), performance state
REASON_NAMES = tuple(name for _, name in CLOCK_EVENT_REASONS)


@dataclass(frozen=True, slots=True)
class SimStats:
    """Totals of one GPU since the simulation started.

    ``energy_j`` joules drawn; ``work_s`` seconds of full-speed work done (throughput
    ratio integrated over time); ``elapsed_s`` simulated seconds; ``active_s`` seconds
    with work to do. ``work_s / active_s`` is the mean speed while busy.
    """

    energy_j: float
    work_s: float
    elapsed_s: float
    active_s: float


@dataclass(frozen=True, slots=True)
class _Segment:
    """What a run of steps of one phase keeps constant (SimulatedGpu._segment_for): the
    ambient (C), demand and base powers (W, ``_hot``: at or above the slowdown temperature),
    the most the noisy power may reach (W: the enforced limit, or idle power under a limit set
    below it), throughput ratios, utilization, clock event reasons and (SM MHz, memory MHz, pstate)."""

    ambient_c: float
    demand_w: float
    active: bool
    base_w: float
    ceiling_w: float
    base_hot_w: float
    throughput: float
    throughput_hot: float
    utilization_ratio: float
    reasons: int
    clocks: _Clocks
    clocks_hot: _Clocks


class SimProcess:
    """A process the simulator reports on a GPU: a scenario's (synthetic PID) or an
    attached real one. Times in simulated seconds, sizes in bytes."""

    __slots__ = (
        "end_s",
        "growth_bytes_per_s",
        "max_memory_bytes",
        "memory_bytes",
        "name",
        "origin_s",
        "pid",
        "reading",
        "real",
        "start_s",
    )

    def __init__(
        self,
        pid: int,
        name: str | None,
        start_s: float,
        end_s: float | None,
        memory_bytes: int,
        growth_bytes_per_s: float = 0.0,
        max_memory_bytes: int | None = None,
        *,
        real: bool = False,
    ) -> None:
        self.pid = pid
        self.name = name
        self.start_s = start_s
        self.end_s = end_s
        self.memory_bytes = memory_bytes
        self.growth_bytes_per_s = growth_bytes_per_s
        self.max_memory_bytes = max_memory_bytes
        self.origin_s = start_s  # growth counts from here
        self.real = real
        self.reading: ProcessReading | None = None

    def memory_at(self, t_s: float) -> int:
        """Bytes held at ``t_s``."""
        if self.growth_bytes_per_s == 0.0:
            return self.memory_bytes
        size = self.memory_bytes + int(self.growth_bytes_per_s * max(0.0, t_s - self.origin_s))
        return size if self.max_memory_bytes is None else min(size, self.max_memory_bytes)


def _steps_until(t_s: float, step_s: float) -> int:
    """The first step index whose start is at or after ``t_s``."""
    if t_s == math.inf:
        return 1 << 62
    return max(0, math.ceil(t_s / step_s - 1e-9))


class SimulatedGpu:
    """The physics and bookkeeping of one GPU; see the module docstring.

    Not thread-safe on its own: the backend serialises access.
    """

    def __init__(
        self,
        index: int,
        profile: GpuProfile,
        scenario: Scenario,
        timeline: PhaseTimeline,
        *,
        substep_s: float,
        seed: int,
        ambient_c: float | None,
        limit_w: float,
    ) -> None:
        self.index = index
        self.profile = profile
        self.step_s = substep_s
        self._timeline = timeline
        base_ambient = scenario.ambient_c if scenario.ambient_c is not None else profile.ambient_c
        self._demand_w: list[float] = []
        self._exponent: list[float] = []
        self._utilization: list[float] = []
        self._ambient_c: list[float] = []
        for phase in scenario.phases:
            load = phase.load_for(index)
            self._demand_w.append(load.demand_for(profile))
            self._exponent.append(load.perf_exponent)
            self._utilization.append(load.utilization_ratio)
            if ambient_c is not None:
                self._ambient_c.append(ambient_c)
            else:
                self._ambient_c.append(phase.ambient_c if phase.ambient_c is not None else base_ambient)
        self._noise_w = scenario.power_noise_w
        self._rng = random.Random(seed * 1_000_003 + index)  # noqa: S311 - simulation noise, not secrets
        self._events: list[ScenarioEvent] = [e for e in scenario.events if e.gpu == index]
        self._next_event = 0
        self._next_event_at_s = math.inf  # when the next event is due (s), and its step
        self._next_event_step = _steps_until(math.inf, substep_s)
        self._span: tuple[float, float, int, int] = (math.inf, -math.inf, 0, 0)  # see _phase_span
        self._segment_key: tuple[int, float, float] | None = None  # see _segment
        self._segment: _Segment | None = None
        self.limit_w = limit_w
        initial_w = profile.idle_power_w
        if scenario.initial_power_fraction is not None:
            initial_w = max(initial_w, scenario.initial_power_fraction * profile.power_limit_default_w)
        self.thermal = ThermalState.at_steady_state(profile.thermal, substep_s, initial_w, self._ambient_c[0])
        self.step = 0
        self.energy_j = 0.0
        self.work_s = 0.0
        self.active_s = 0.0
        self.power_w = initial_w  # what it drew before the start, as its first reading says
        self.reasons = REASON_IDLE
        self.utilization_ratio = 0.0
        tel = profile.telemetry
        self.sm_clock_mhz = tel.sm_clock_idle_mhz
        self.memory_clock_mhz = tel.memory_clock_idle_mhz
        self.pstate = tel.idle_pstate
        self.event_s = dict.fromkeys(REASON_NAMES, 0.0)  # seconds each clock event reason was active
        self.xid_errors: tuple[tuple[int, int], ...] = ()  # XID errors by code, from scenario events
        self.ecc_uncorrected = 0
        self.telemetry_cache: tuple[object, GpuTelemetry] | None = None  # (what it was built from, record)
        self.fault: str | None = None
        self.fault_error: str | None = None
        fan = profile.fan
        self.fans = None if fan is None else FanDrive(fan, profile.thermal, substep_s, self.thermal.die_c)
        self.processes: list[SimProcess] = []
        self._proc_cache: tuple[ProcessReading, ...] = ()
        self._proc_used_bytes = 0
        self._proc_valid_until_s = -math.inf
        self._proc_growing = False
        self._event_due()

    # ------------------------------------------------------------------ physics

    @property
    def t_s(self) -> float:
        """Simulated time the physics has reached, seconds."""
        return self.step * self.step_s

    def set_fault(self, fault: str | None, error: str | None = None) -> None:
        """Put the GPU in ``fault`` (None clears it); ``error`` is the reason a reading shows."""
        self.fault = fault
        self.fault_error = error if fault is not None else None
        if fault is not None and error is None:
            self.fault_error = {
                "lost": "GPU is lost (simulated fault)",
                "temperature_unsupported": "temperature: not supported (simulated fault)",
                "set_limit_refused": None,
            }.get(fault)

    def advance_to(self, target_step: int) -> None:
        """Run the physics up to the start of step ``target_step``; scenario events due by
        then are in force afterwards."""
        h = self.step_s
        if self._next_event_at_s <= self.step * h + 1e-9:
            self._apply_events()
        while self.step < target_step:
            phase, phase_end = _phase_span(self)
            end = min(target_step, phase_end, self._next_event_step)
            fans = self.fans
            if fans is None:
                self._run_steps(phase, max(end, self.step + 1) - self.step)
            elif fans.set_percent is None:  # the card's own control (_run, inlined)
                self._run_steps(phase, max(end, self.step + 1) - self.step)
                fans.follow_auto(self.thermal.die_c, self.fault == "fan_stuck")
            else:
                self._run(phase, max(end, self.step + 1) - self.step)
            if self._next_event_at_s <= self.step * h + 1e-9:
                self._apply_events()

    def _event_due(self) -> None:
        """Note when the next scenario event is due (never: inf)."""
        events = self._events
        at_s = events[self._next_event].at_s if self._next_event < len(events) else math.inf
        self._next_event_at_s = at_s
        self._next_event_step = _steps_until(at_s, self.step_s)

    def _apply_events(self) -> None:
        t = self.step * self.step_s
        events = self._events
        while self._next_event < len(events) and events[self._next_event].at_s <= t + 1e-9:
            event = events[self._next_event]
            if event.xid is not None:
                counts = dict(self.xid_errors)
                counts[event.xid] = counts.get(event.xid, 0) + 1
                self.xid_errors = tuple(sorted(counts.items()))
                if event.xid == XID_DOUBLE_BIT_ECC and self.profile.telemetry.ecc:
                    self.ecc_uncorrected += 1
            else:
                self.set_fault(event.fault)
            self._next_event += 1
        self._event_due()

    def set_fan(self, percent: float | None) -> None:
        """Run the fans at ``percent`` of their maximum from now on (None: the card's own control)."""
        if self.fans is not None:
            self.fans.set(percent, self.thermal)

    def _run(self, phase: int, n: int) -> None:
        """``n`` steps of ``phase``; with the fans set by hand, one step at a time (their speed,
        and with it the heatsink resistance, moves toward the set speed: governor.sim.fans)."""
        fans = self.fans
        if fans is None or not fans.manual:
            self._run_steps(phase, n)
            if fans is not None:
                fans.follow_auto(self.thermal.die_c, self.fault == "fan_stuck")
            return
        for _ in range(n):
            fans.step(self.thermal, self.fault == "fan_stuck")
            self._run_steps(phase, 1)

    def _run_steps(self, phase: int, n: int) -> None:
        """``n`` steps of ``phase`` with everything but the die temperature constant."""
        p = self.profile
        h = self.step_s
        th = self.thermal
        if self.fault == "lost":
            ambient = self._ambient_c[phase]
            for _ in range(n):
                th.step(0.0, ambient)
            self.step += n
            self.power_w = 0.0
            self.utilization_ratio = 0.0
            self.reasons = 0
            self.sm_clock_mhz, self.memory_clock_mhz, self.pstate = _clocks(p, False, 0.0, 0.0)
            return
        seg = _segment_for(self, phase)
        ambient = seg.ambient_c
        base, base_hot = seg.base_w, seg.base_hot_w
        thr, thr_hot = seg.throughput, seg.throughput_hot
        ceiling = seg.ceiling_w
        slowdown = p.temperature_slowdown_c
        shutdown = p.temperature_shutdown_c
        sigma = self._noise_w
        gauss = self._rng.gauss
        # The thermal step, inlined: this loop is the simulator's hot path.
        e11, e12, e21, e22 = th.e11, th.e12, th.e21, th.e22
        r_total, r_sink = th.r_total_c_per_w, th.r_sink_c_per_w
        die, sink = th.die_c, th.sink_c
        energy, work = self.energy_j, self.work_s
        hot = False
        hot_steps = 0
        power = base
        done = 0
        while done < n:
            done += 1
            hot = die >= slowdown
            hot_steps += hot
            power = base_hot if hot else base
            if sigma > 0.0:
                power = min(max(power + gauss(0.0, sigma), 0.0), ceiling)
            inf_die = power * r_total
            inf_sink = power * r_sink
            d_die = die - ambient - inf_die
            d_sink = sink - ambient - inf_sink
            die = ambient + inf_die + e11 * d_die + e12 * d_sink
            sink = ambient + inf_sink + e21 * d_die + e22 * d_sink
            energy += power * h
            work += (thr_hot if hot else thr) * h
            if die >= shutdown:
                break
        th.die_c, th.sink_c = die, sink
        self.energy_j, self.work_s = energy, work
        active = seg.active
        if active:
            self.active_s += done * h
        self.step += done
        self.power_w = power
        self.utilization_ratio = seg.utilization_ratio
        reasons = seg.reasons
        event_s = self.event_s
        if reasons & REASON_IDLE:
            event_s["gpu_idle"] += done * h
        if reasons & REASON_SW_POWER_CAP:
            event_s["sw_power_cap"] += done * h
        if hot_steps:
            event_s["sw_thermal_slowdown"] += hot_steps * h
        if hot:
            reasons |= REASON_SW_THERMAL_SLOWDOWN
            self.sm_clock_mhz, self.memory_clock_mhz, self.pstate = seg.clocks_hot
        else:
            self.sm_clock_mhz, self.memory_clock_mhz, self.pstate = seg.clocks
        self.reasons = reasons
        if die >= shutdown:
            self.set_fault("lost", f"thermal shutdown at {die:.1f} C (simulated)")
            if done < n:
                self._run_steps(phase, n - done)

    def memory_temperature_c(self) -> float:
        """The memory (HBM) temperature in C: between the heatsink and the die, where the
        stacks sit on the package (halfway: an assumption, not a fit)."""
        th = self.thermal
        return th.sink_c + 0.5 * (th.die_c - th.sink_c)

    def fan_speed_ratio(self) -> float:
        """Fan speed 0-1: with a fan model (the profile's ``[fan]``), the fans' present speed;
        without, from the die temperature: 30 % up to 40 C, rising linearly to 100 % at the
        slowdown temperature (a typical default fan curve)."""
        p = self.profile
        if self.fans is not None:
            return self.fans.percent / 100.0
        span = max(p.temperature_slowdown_c - 40.0, 1.0)
        return min(1.0, max(0.3, 0.3 + 0.7 * (self.thermal.die_c - 40.0) / span))

    def stats(self) -> SimStats:
        """Totals since the start."""
        return SimStats(self.energy_j, self.work_s, self.t_s, self.active_s)

    # ---------------------------------------------------------------- processes

    def add_process(self, process: SimProcess) -> None:
        """Report ``process`` on this GPU from its start time on."""
        self.processes.append(process)
        self.invalidate_processes()

    def invalidate_processes(self) -> None:
        """Rebuild the process list at the next read (a process was added, changed or removed)."""
        self._proc_valid_until_s = -math.inf

    def processes_at(self, t_s: float) -> tuple[tuple[ProcessReading, ...], int]:
        """(the processes running at ``t_s``, the bytes they hold together).

        Rebuilt only when a process starts, ends, grows or was changed; otherwise the
        previous tuple is returned as is, so many idle processes cost nothing per read.
        """
        if t_s < self._proc_valid_until_s and not self._proc_growing:
            return self._proc_cache, self._proc_used_bytes
        readings: list[ProcessReading] = []
        keep: list[SimProcess] = []
        used = 0
        valid_until = math.inf
        growing = False
        for proc in self.processes:
            if proc.end_s is not None and proc.end_s <= t_s:
                continue  # ended for good: time only moves forward
            keep.append(proc)
            if proc.start_s > t_s:
                valid_until = min(valid_until, proc.start_s)
                continue
            if proc.end_s is not None:
                valid_until = min(valid_until, proc.end_s)
            size = proc.memory_at(t_s)
            if proc.growth_bytes_per_s > 0.0 and (proc.max_memory_bytes is None or size < proc.max_memory_bytes):
                growing = True
            reading = proc.reading
            if reading is None or reading.used_memory_bytes != size:
                reading = proc.reading = ProcessReading(pid=proc.pid, used_memory_bytes=size, name=proc.name)
            readings.append(reading)
            used += size
        self.processes = keep
        self._proc_cache = tuple(readings)
        self._proc_used_bytes = used
        self._proc_valid_until_s = valid_until
        self._proc_growing = growing
        return self._proc_cache, used


def _phase_span(gpu: SimulatedGpu) -> tuple[int, int]:
    """(the phase running at ``gpu``'s present step, the first step of the next phase): the
    timeline's answer, kept while it vouches for it (PhaseTimeline.span_at)."""
    t = gpu.step * gpu.step_s
    since_s, until_s, phase, end = gpu._span
    if since_s <= t <= until_s:
        return phase, end
    phase, end_s, until_s = gpu._timeline.span_at(t)
    end = _steps_until(end_s, gpu.step_s)
    gpu._span = (t, until_s, phase, end)
    return phase, end


def _segment_for(gpu: SimulatedGpu, phase: int) -> _Segment:
    """What stays constant while ``phase`` runs under the present limit and heatsink:
    kept on ``gpu`` until one of the three changes."""
    key = (phase, gpu.limit_w, gpu.thermal.r_total_c_per_w)
    if key == gpu._segment_key and gpu._segment is not None:
        return gpu._segment
    p = gpu.profile
    ambient = gpu._ambient_c[phase]
    demand = gpu._demand_w[phase]
    exponent = gpu._exponent[phase]
    limit = gpu.limit_w
    idle = p.idle_power_w
    active = demand > 0.0
    base = max(idle, min(demand, limit)) if active else idle
    hold = max(idle, (p.temperature_slowdown_c - ambient) / gpu.thermal.r_total_c_per_w)
    base_hot = min(base, hold)
    reasons = 0 if active else REASON_IDLE
    if active and demand > limit:
        reasons |= REASON_SW_POWER_CAP
    segment = _Segment(
        ambient_c=ambient,
        demand_w=demand,
        active=active,
        base_w=base,
        ceiling_w=max(limit, idle),
        base_hot_w=base_hot,
        throughput=throughput_ratio(base, demand, exponent),
        throughput_hot=throughput_ratio(base_hot, demand, exponent),
        utilization_ratio=gpu._utilization[phase] if active else 0.0,
        reasons=reasons,
        clocks=_clocks(p, active, base, demand),
        clocks_hot=_clocks(p, active, base_hot, demand),
    )
    gpu._segment_key, gpu._segment = key, segment
    return segment


def _clocks(profile: GpuProfile, active: bool, base_w: float, demand_w: float) -> _Clocks:
    """(SM clock, memory clock (MHz), performance state) of a GPU of ``profile`` while ``base_w`` of ``demand_w``
    watts is available (see the module docstring)."""
    tel, idle_w = profile.telemetry, profile.idle_power_w
    if not active:
        return tel.sm_clock_idle_mhz, tel.memory_clock_idle_mhz, tel.idle_pstate
    share = 1.0 if base_w >= demand_w else max(0.0, base_w - idle_w) / max(demand_w - idle_w, 1e-9)
    span = tel.sm_clock_max_mhz - tel.sm_clock_idle_mhz
    return round(tel.sm_clock_idle_mhz + span * share ** (1.0 / 3.0)), tel.memory_clock_mhz, 0


def slow_telemetry(gpu: SimulatedGpu) -> GpuTelemetry:
    """What the simulated GPU reports beside power, temperature and clocks (see the module
    docstring), built again only when it changed (it is shared between ticks otherwise)."""
    tel = gpu.profile.telemetry
    memory_c = float(round(gpu.memory_temperature_c())) if tel.memory_temperature else None
    fan = None
    if tel.fans:
        fans = gpu.fans  # gpu.fan_speed_ratio(), inlined: this runs every tick
        fan = round(fans.percent / 100.0 if fans is not None else gpu.fan_speed_ratio(), 2)
    key = (memory_c, fan, gpu.xid_errors, gpu.ecc_uncorrected, gpu.memory_clock_mhz, gpu.pstate)
    cached = gpu.telemetry_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    ecc = None
    if tel.ecc:
        unc = gpu.ecc_uncorrected
        ecc = (
            ("corrected", "volatile", 0),
            ("corrected", "aggregate", 0),
            ("uncorrected", "volatile", unc),
            ("uncorrected", "aggregate", unc),
        )
    record = GpuTelemetry(
        memory_clock_mhz=float(gpu.memory_clock_mhz),
        pstate=gpu.pstate,
        memory_temperature_c=memory_c,
        fan_speed_ratios=None if fan is None else tuple((i, fan) for i in range(tel.fans)),
        xid_errors=gpu.xid_errors,
        ecc_errors=ecc,
        remapped_rows_correctable=0 if tel.ecc else None,
        remapped_rows_uncorrectable=0 if tel.ecc else None,
        row_remap_pending=False if tel.ecc else None,
        row_remap_failed=False if tel.ecc else None,
    )
    gpu.telemetry_cache = (key, record)
    return record
