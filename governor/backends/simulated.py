"""The simulated backend: GPUs played by governor.sim, behind the Backend Protocol.

Time comes from a :class:`governor.clock.Clock`: simulated time is
``(clock.monotonic() - start) * time_scale`` seconds, so a daemon on the real clock can
run faster than real time and a test on a :class:`~governor.clock.VirtualClock` runs
without sleeping. :meth:`SimulatedBackend.read` advances the physics to that time;
``Snapshot.t_s`` is simulated seconds since the backend opened.

Like NVML, :meth:`SimulatedBackend.set_power_limit` clamps nothing: a limit outside the
profile's range raises SetLimitFailed (NVML's INVALID_ARGUMENT). Limits are taken in
whole milliwatts, as NVML does. Fans (:meth:`~SimulatedBackend.set_fan_speed`,
:meth:`~SimulatedBackend.set_fan_auto`) can be set only on a profile with a ``[fan]``
table (otherwise NotSupported: SetLimitRefused), to a whole percent within its range;
all fans of a simulated GPU share one speed.

Hardware state: given ``state_file``, the power limits (by GPU UUID) live in that JSON
file, rewritten atomically on every change (:func:`governor.safefile.write_atomic`: an
exclusive temporary file, never a predictable name a symlink could be planted at) and
read at start (:func:`governor.safefile.read_json`: at most 1 MiB, a regular file, no
symlink, FIFO or device), so a restarted daemon meets the limits its predecessor left,
as on a real GPU. The same file keeps the fans set by hand (``manual_fans_percent``, by
GPU UUID; a GPU not listed is under the card's automatic control), so a kill -9 leaves
them as a real card would: in manual control until someone hands them back. A missing
file means default limits. A file that cannot be used (a symlink, FIFO or device, too
large, not JSON, nested too deeply, a limit out of range) also means default limits for
the GPUs it cannot vouch for, and ``state_warning`` says why, for the daemon to log; a file unusable as a whole is
renamed to ``<name>.corrupt``. The next change rewrites the file whole.

Real processes: given ``processes_file`` (``[simulation] processes_file``), the GPUs also
report real processes (by PID or by cgroup, such as a systemd unit's) with the VRAM the file
says, while they exist (:mod:`governor.backends._sim_processes`).

Test and what-if hooks: :meth:`~SimulatedBackend.attach_process`,
:meth:`~SimulatedBackend.set_process_memory`, :meth:`~SimulatedBackend.detach_process`,
:meth:`~SimulatedBackend.inject_fault`, :meth:`~SimulatedBackend.external_set_power_limit`,
:meth:`~SimulatedBackend.stats`. All methods are safe to call from several threads.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from governor.backends import BackendError, GpuLostError, SetLimitFailed, SetLimitRefused
from governor.backends._sim_processes import RealProcessesFile
from governor.clock import Clock
from governor.config import ConfigIssue, SimulationConfig
from governor.model import GpuHealth, GpuInfo, GpuReading, GpuTelemetry, ProcessReading, Snapshot
from governor.safefile import UnusableFile, read_json, set_aside, short_repr, write_atomic
from governor.sim._schema import SimDataError
from governor.sim.gpu import SimProcess, SimStats, SimulatedGpu, slow_telemetry
from governor.sim.profiles import GpuProfile, load_profile
from governor.sim.scenario import FAULTS, PhaseTimeline, Scenario, load_scenario

SYNTHETIC_PID_BASE = 4_194_304
"""First PID given to scenario processes: Linux's PID_MAX_LIMIT (2**22), so no real
process can ever have it, and signalling it fails harmlessly with ESRCH."""

STATE_FORMAT = "gpu-governor-simulated-hardware"
DEFAULT_SUBSTEP_S = 0.5


def _gpu_info(p: GpuProfile, index: int) -> GpuInfo:
    """The static facts of simulated GPU ``index`` of profile ``p`` (its UUID is made from both)."""
    return GpuInfo(
        index=index,
        uuid=f"GPU-sim-{p.name}-{index}",
        name=p.gpu_name,
        pci_bus_id=f"00000000:{0x10 + index:02X}:00.0",
        power_limit_min_w=p.power_limit_min_w,
        power_limit_max_w=p.power_limit_max_w,
        power_limit_default_w=p.power_limit_default_w,
        temperature_slowdown_c=p.temperature_slowdown_c,
        temperature_shutdown_c=p.temperature_shutdown_c,
        memory_total_bytes=p.memory_total_bytes,
        driver_version="simulated",
        fan_count=p.telemetry.fans or None,  # no fans: NotSupported, as on a data-center board
        fan_speed_min_percent=None if p.fan is None else p.fan.min_percent,
        fan_speed_max_percent=None if p.fan is None else p.fan.max_percent,
    )


class SimulatedBackend:
    """Simulated GPUs of one profile running one scenario; see the module docstring."""

    name = "simulated"
    waiting_reason: str | None = None  # never waits: there is no driver to load

    def __init__(
        self,
        profile: GpuProfile,
        scenario: Scenario,
        clock: Clock,
        *,
        gpu_count: int = 1,
        seed: int = 0,
        ambient_c: float | None = None,
        state_file: str | Path | None = None,
        time_scale: float = 1.0,
        substep_s: float = DEFAULT_SUBSTEP_S,
        processes_file: str | Path | None = None,
    ) -> None:
        if gpu_count < 1:
            raise ValueError(f"gpu_count: expected 1 or more, got {gpu_count}")
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale: expected a number > 0, got {time_scale}")
        if not 0.01 <= substep_s <= 5.0:
            raise ValueError(f"substep_s: expected seconds between 0.01 and 5, got {substep_s}")
        highest = scenario.highest_gpu_index()
        if highest >= gpu_count:
            raise SimDataError(
                [
                    ConfigIssue(
                        scenario.source,
                        "gpu",
                        f"GPU indexes below simulation.gpu_count ({gpu_count}); this scenario needs "
                        f"gpu_count = {highest + 1} or more",
                        str(highest),
                    )
                ]
            )
        self.profile = profile
        self.scenario = scenario
        self._clock = clock
        self._time_scale = time_scale
        self._start_s = clock.monotonic()
        self._advanced_at = math.nan  # the clock's reading the physics was last advanced to, and its simulated time
        self._advanced_t = 0.0
        self._lock = threading.RLock()
        self._closed = False
        self._infos = tuple(_gpu_info(self.profile, i) for i in range(gpu_count))
        self._by_uuid = {info.uuid: i for i, info in enumerate(self._infos)}
        self._state = HardwareStateFile(Path(state_file), profile, self._by_uuid) if state_file else None
        self._real = RealProcessesFile(Path(processes_file)) if processes_file else None
        limits = self._state.load() if self._state is not None else {}
        fans = self._state.fans if self._state is not None else {}
        self.state_warning: str | None = self._state.warning if self._state is not None else None
        timeline = PhaseTimeline(scenario)
        self._gpus = [
            SimulatedGpu(
                i,
                profile,
                scenario,
                timeline,
                substep_s=substep_s,
                seed=seed,
                ambient_c=ambient_c,
                limit_w=limits.get(self._infos[i].uuid, profile.power_limit_default_w),
            )
            for i in range(gpu_count)
        ]
        for gpu in self._gpus:
            if profile.fan is not None and self._infos[gpu.index].uuid in fans:
                gpu.set_fan(fans[self._infos[gpu.index].uuid])
        self._pids: dict[int, SimulatedGpu] = {}
        next_pid = SYNTHETIC_PID_BASE
        for spec in scenario.processes:
            for gpu in self._gpus:
                if spec.gpu is not None and spec.gpu != gpu.index:
                    continue
                proc = SimProcess(
                    next_pid,
                    spec.name,
                    spec.start_s,
                    spec.end_s,
                    spec.memory_bytes,
                    spec.growth_bytes_per_s,
                    spec.max_memory_bytes,
                )
                gpu.add_process(proc)
                self._pids[next_pid] = gpu
                next_pid += 1

    # ------------------------------------------------------------------ facts

    def gpus(self) -> tuple[GpuInfo, ...]:
        """Static facts of every simulated GPU, in index order."""
        return self._infos

    def sim_time_s(self) -> float:
        """Simulated seconds since the backend opened (by the clock, not the physics)."""
        return max(0.0, (self._clock.monotonic() - self._start_s) * self._time_scale)

    # ------------------------------------------------------------------ reading

    def _advance(self) -> float:
        """Run the physics up to the clock's simulated time (s), returned; at once if the clock has not moved."""
        now = self._clock.monotonic()
        if now == self._advanced_at:
            return self._advanced_t
        t = max(0.0, (now - self._start_s) * self._time_scale)
        for gpu in self._gpus:
            target = math.floor(t / gpu.step_s + 1e-9)
            if target > gpu.step:
                gpu.advance_to(target)
        self._advanced_at, self._advanced_t = now, t
        return t

    def read(self) -> Snapshot:
        """Advance the physics to now and read every GPU (a faulty GPU yields a reading with
        its health set, never an exception)."""
        with self._lock:
            if self._closed:
                raise BackendError("simulated backend is closed")
            t = self._advance()
            real = self._real.processes(len(self._gpus)) if self._real is not None else {}
            gpus = tuple([self._reading(g, t, real.get(g.index, ())) for g in self._gpus])
            notes = self._real.new_warnings() if self._real is not None else ()
            return Snapshot(t_s=t, wall_time_s=self._clock.wall(), gpus=gpus, notes=notes)

    def _reading(self, gpu: SimulatedGpu, t_s: float, real: Sequence[ProcessReading] = ()) -> GpuReading:
        info = self._infos[gpu.index]
        if gpu.fault == "lost":
            return GpuReading(
                index=gpu.index,
                uuid=info.uuid,
                health=GpuHealth.LOST,
                error=gpu.fault_error,
                telemetry=GpuTelemetry(xid_errors=gpu.xid_errors),
            )
        processes, used = gpu.processes_at(t_s)
        if real:  # real processes of [simulation] processes_file
            processes = (*processes, *real)
            used += sum(p.used_memory_bytes or 0 for p in real)
        total = self.profile.memory_total_bytes
        degraded = gpu.fault == "temperature_unsupported"
        return GpuReading(
            index=gpu.index,
            uuid=info.uuid,
            temperature_c=None if degraded else float(round(gpu.thermal.die_c)),
            power_w=round(gpu.power_w, 3),
            power_limit_w=gpu.limit_w,
            memory_used_bytes=min(total, self.profile.memory_reserved_bytes + used),
            memory_total_bytes=total,
            utilization_gpu_ratio=gpu.utilization_ratio,
            clock_event_reasons=gpu.reasons,
            sm_clock_mhz=float(gpu.sm_clock_mhz),
            clock_event_s=tuple(gpu.event_s.items()),
            power_limit_requested_w=gpu.limit_w,
            energy_j=gpu.energy_j,
            processes=processes,
            health=GpuHealth.DEGRADED if degraded else GpuHealth.OK,
            error=gpu.fault_error if degraded else None,
            telemetry=slow_telemetry(gpu),
        )

    # ------------------------------------------------------------------ acting

    def set_power_limit(self, uuid: str, limit_w: float) -> None:
        """Set a GPU's power limit in watts, as NVML would: no clamping.

        Raises SetLimitRefused (unknown UUID, injected refusal), GpuLostError (lost GPU),
        SetLimitFailed (outside the profile's range, or the state file cannot be written).
        """
        with self._lock:
            index = self._by_uuid.get(uuid)
            if index is None:
                raise SetLimitRefused(f"no simulated GPU has UUID {uuid}")
            gpu = self._gpus[index]
            self._advance()  # the old limit governs the time already past
            if gpu.fault == "lost":
                raise GpuLostError(f"GPU {index} ({uuid}) is lost")
            if gpu.fault == "set_limit_refused":
                raise SetLimitRefused(f"GPU {index}: setting the power limit is not permitted (simulated fault)")
            p = self.profile
            if not math.isfinite(limit_w):
                raise SetLimitFailed(f"GPU {index}: invalid argument: power limit {limit_w!r} W")
            limit_mw = round(limit_w * 1000.0)
            if not round(p.power_limit_min_w * 1000) <= limit_mw <= round(p.power_limit_max_w * 1000):
                raise SetLimitFailed(
                    f"GPU {index}: invalid argument: power limit {limit_w:g} W outside "
                    f"{p.power_limit_min_w:g}-{p.power_limit_max_w:g} W"
                )
            new_w = limit_mw / 1000.0
            if new_w == gpu.limit_w:
                return
            if self._state is not None:
                limits, fans = _hardware(self)
                self._state.save({**limits, uuid: new_w}, fans)
            gpu.limit_w = new_w

    def set_fan_speed(self, uuid: str, fan: int, percent: int) -> None:
        """Set the GPU's fans to ``percent`` (manual control), checked as NVML would (see _fan_gpu)."""
        with self._lock:
            gpu = _fan_gpu(self, uuid, fan, percent)
            if gpu.fans is not None and gpu.fans.set_percent != float(percent):
                if self._state is not None:
                    limits, fans = _hardware(self)
                    self._state.save(limits, {**fans, uuid: float(percent)})
                gpu.set_fan(float(percent))

    def set_fan_auto(self, uuid: str, fan: int) -> None:
        """Hand the GPU's fans back to the card's automatic control."""
        with self._lock:
            gpu = _fan_gpu(self, uuid, fan, None)
            if gpu.fans is not None and gpu.fans.manual:
                if self._state is not None:
                    limits, fans = _hardware(self)
                    self._state.save(limits, {u: p for u, p in fans.items() if u != uuid})
                gpu.set_fan(None)

    def external_set_power_limit(self, gpu_index: int, limit_w: float) -> None:
        """Another agent (a BMC, nvidia-smi) sets the enforced limit: no checks, not saved."""
        with self._lock:
            self._advance()
            self._gpus[gpu_index].limit_w = float(limit_w)

    def close(self) -> None:
        """Stop serving reads. Idempotent."""
        with self._lock:
            self._closed = True

    # ------------------------------------------------------------------ hooks

    def attach_process(self, gpu_index: int, pid: int, used_memory_bytes: int, name: str | None = None) -> None:
        """Report the process ``pid`` (a real one) on GPU ``gpu_index`` holding ``used_memory_bytes``,
        from now until :meth:`detach_process`. Attaching a PID again moves or resizes it."""
        if used_memory_bytes < 0:
            raise ValueError(f"used_memory_bytes: expected 0 or more, got {used_memory_bytes}")
        with self._lock:
            gpu = self._gpus[gpu_index]
            t = self._advance()
            if pid in self._pids:
                self._remove(pid)
            gpu.add_process(SimProcess(pid, name, t, None, used_memory_bytes, real=True))
            self._pids[pid] = gpu

    def set_process_memory(self, pid: int, used_memory_bytes: int) -> None:
        """Make process ``pid`` (attached or from the scenario) hold ``used_memory_bytes`` from
        now on; a growing scenario process stops growing. KeyError for an unknown PID."""
        if used_memory_bytes < 0:
            raise ValueError(f"used_memory_bytes: expected 0 or more, got {used_memory_bytes}")
        with self._lock:
            gpu = self._pids[pid]
            for proc in gpu.processes:
                if proc.pid == pid:
                    proc.memory_bytes = used_memory_bytes
                    proc.growth_bytes_per_s = 0.0
                    proc.reading = None
            gpu.invalidate_processes()

    def detach_process(self, pid: int) -> None:
        """Stop reporting process ``pid`` (attached, or a scenario process: it ends now, as if
        it had exited or been killed). KeyError for an unknown PID."""
        with self._lock:
            self._advance()
            if pid not in self._pids:
                raise KeyError(pid)
            self._remove(pid)

    def _remove(self, pid: int) -> None:
        gpu = self._pids.pop(pid)
        gpu.processes = [p for p in gpu.processes if p.pid != pid]
        gpu.invalidate_processes()

    def inject_fault(self, gpu_index: int, fault: str | None) -> None:
        """From now on GPU ``gpu_index`` has ``fault``: ``"lost"`` (reads LOST, setting a limit
        raises GpuLostError), ``"temperature_unsupported"`` (no temperature, DEGRADED),
        ``"set_limit_refused"`` (setting a limit raises SetLimitRefused); None clears it."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault: expected one of {', '.join(FAULTS)} or None, got {fault!r}")
        with self._lock:
            gpu = self._gpus[gpu_index]
            self._advance()
            gpu.set_fault(fault)

    def stats(self, gpu_index: int) -> SimStats:
        """Energy (J), work (full-speed seconds), elapsed and busy seconds of one GPU so far."""
        with self._lock:
            self._advance()
            return self._gpus[gpu_index].stats()

    def limit_w(self, gpu_index: int) -> float:
        """The power limit in force on one GPU, watts (what NVML would enforce)."""
        with self._lock:
            return self._gpus[gpu_index].limit_w

    def die_temperature_c(self, gpu_index: int) -> float:
        """The die temperature in C to full precision (readings round it to whole degrees, as NVML)."""
        with self._lock:
            self._advance()
            return self._gpus[gpu_index].thermal.die_c


class HardwareStateFile:
    """The simulated cards' enforced power limits, kept in a JSON file (``[simulation]
    state_file``) so that a kill -9 and a restart find them as a real card would.

    Read bounded and typed (governor.safefile); a file unusable as a whole is set aside as
    ``.corrupt``, a bad entry (not a number, out of the card's range) is dropped; either way
    ``warning`` says what happened. Entries of GPUs this run does not have are kept.
    """

    def __init__(self, path: Path, profile: GpuProfile, uuids: Iterable[str]) -> None:
        self.path = path
        self.profile = profile
        self.uuids = frozenset(uuids)
        self.warning: str | None = None
        self._extra: dict[str, float] = {}  # entries of GPUs this run does not have
        self.fans: dict[str, float] = {}  # the fans set by hand, percent by GPU UUID (read by load)

    def load(self) -> dict[str, float]:
        """The saved limit in watts per GPU UUID of this run (valid entries only)."""
        path = self.path
        try:
            data: Any = read_json(path)[0]
        except FileNotFoundError:
            return {}
        except UnusableFile as exc:
            self._unusable(exc.why)
            return {}
        limits = data.get("power_limits_w") if isinstance(data, dict) else None
        if not isinstance(limits, dict) or data.get("format") != STATE_FORMAT:
            self._unusable(f"expected an object with format {STATE_FORMAT!r} and power_limits_w")
            return {}
        p = self.profile
        out: dict[str, float] = {}
        problems = []
        for uuid, value in limits.items():
            # Compared, not converted: a 300-digit integer would overflow float(); NaN and inf fail it.
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6
            if uuid not in self.uuids:
                if ok:
                    self._extra[str(uuid)] = float(value)
                continue
            if not ok or not p.power_limit_min_w <= value <= p.power_limit_max_w:
                problems.append(
                    f"{uuid}: {short_repr(value)} W is not a limit in {p.power_limit_min_w:g}-{p.power_limit_max_w:g} W"
                )
                continue
            out[uuid] = float(value)
        fans = data.get("manual_fans_percent", {})
        if isinstance(fans, dict):
            self.fans = {
                u: float(v)
                for u, v in fans.items()
                if u in self.uuids and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100
            }
        if problems:
            self.warning = f"{path}: " + "; ".join(problems) + "; those GPUs start from the default power limit"
        return out

    def save(self, limits_w: Mapping[str, float], fans_percent: Mapping[str, float] | None = None) -> None:
        """Write every GPU's limit in watts and the fans set by hand (percent), atomically;
        SetLimitFailed when it cannot be saved."""
        document: dict[str, Any] = {"format": STATE_FORMAT, "version": 1, "power_limits_w": {**self._extra, **limits_w}}
        if fans_percent:
            document["manual_fans_percent"] = dict(fans_percent)
        body = json.dumps(document, indent=2, sort_keys=True) + "\n"
        try:
            write_atomic(self.path, body.encode("utf-8"), mode=0o644)
        except OSError as exc:
            raise SetLimitFailed(f"cannot save simulated hardware state to {self.path}: {exc}") from None

    def _unusable(self, why: str) -> None:
        """The whole state file cannot be used: rename it aside and say so."""
        moved = set_aside(self.path)
        where = f"kept as {moved}" if moved else "could not be set aside"
        self.warning = f"{self.path}: {why}; starting from default power limits ({where})"


def _hardware(backend: SimulatedBackend) -> tuple[dict[str, float], dict[str, float]]:
    """What the state file keeps: every GPU's power limit (W) and the fans set by hand (percent), by UUID."""
    uuid = {g.index: backend._infos[g.index].uuid for g in backend._gpus}
    limits = {uuid[g.index]: g.limit_w for g in backend._gpus}
    fans = {uuid[g.index]: g.fans.set_percent for g in backend._gpus if g.fans is not None and g.fans.manual}
    return limits, {u: p for u, p in fans.items() if p is not None}


def _fan_gpu(backend: SimulatedBackend, uuid: str, fan: int, percent: int | None) -> SimulatedGpu:
    """The GPU whose fan ``fan`` is to be set (to ``percent``; None: back to auto), after NVML's
    checks: unknown GPU, no [fan] model or the ``fan_control_refused`` fault raise SetLimitRefused,
    a lost GPU GpuLostError, no such fan or a speed outside the model's range SetLimitFailed."""
    index = backend._by_uuid.get(uuid)
    if index is None:
        raise SetLimitRefused(f"no simulated GPU has UUID {uuid}")
    gpu = backend._gpus[index]
    backend._advance()  # the old speed governs the time already past
    model = backend.profile.fan
    if gpu.fault == "lost":
        raise GpuLostError(f"GPU {index} ({uuid}) is lost")
    if model is None:
        raise SetLimitRefused(f"GPU {index}: setting fan {fan}: Not Supported (the profile has no [fan] model)")
    if gpu.fault == "fan_control_refused":
        raise SetLimitRefused(f"GPU {index}: setting fan {fan}: Insufficient Permissions (simulated fault)")
    if not 0 <= fan < backend.profile.telemetry.fans:
        raise SetLimitFailed(f"GPU {index}: invalid argument: no fan {fan}")
    if percent is not None and not model.min_percent <= percent <= model.max_percent:
        span = f"{model.min_percent:g}-{model.max_percent:g} %"
        raise SetLimitFailed(f"GPU {index}: invalid argument: fan speed {percent!r} % outside {span}")
    return gpu


def build_simulated_backend(sim: SimulationConfig, clock: Clock) -> SimulatedBackend:
    """A SimulatedBackend from the ``[simulation]`` config: profile and scenario by name or
    path, ``gpu_count`` GPUs of that profile. Raises SimDataError (a ConfigError) naming the
    file and key when a profile or scenario cannot be used."""
    return SimulatedBackend(
        load_profile(sim.profile),
        load_scenario(sim.scenario),
        clock,
        gpu_count=sim.gpu_count,
        seed=sim.seed,
        ambient_c=sim.ambient_c,
        state_file=sim.state_file or None,
        time_scale=sim.time_scale,
        processes_file=sim.processes_file or None,
    )
