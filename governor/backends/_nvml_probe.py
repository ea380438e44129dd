"""NVML capability probing: which version of each call this driver and these bindings have.

Versioned NVML calls (temperature V, memory info v2, process info v3/v2/v1, clock
event/throttle reasons) are offered newest first; the first that answers is kept for the
life of the backend (:class:`Versioned`). :func:`build_reads` binds every per-tick read
once, so a tick does no attribute lookups on the module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from governor.backends._nvml_errors import Kind, NvmlCaller, NvmlFailure

log = structlog.get_logger("governor.nvml")

Read = Callable[[Any], Any]
"""One NVML read of one GPU: handle -> raw value."""

# NVML enum values (stable across versions).
TEMPERATURE_GPU: Final = 0
THRESHOLD_SHUTDOWN: Final = 0
THRESHOLD_SLOWDOWN: Final = 1
CLOCK_SM: Final = 1


def text(value: Any) -> str:
    """NVML strings come as bytes in some nvidia-ml-py versions and as str in others."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _absent(*args: Any, **kwargs: Any) -> Any:
    """Stands in for a function this nvidia-ml-py lacks; the version probe skips it."""
    raise AttributeError("not in this nvidia-ml-py")


class Versioned:
    """One NVML read offered in several versions, newest first.

    The first version that answers is kept for the life of the backend; a version that
    is absent from the Python module, from the driver (FunctionNotFound), or rejects the
    struct version (a MISSING_CALL failure) is skipped once and never tried again. Any
    other error (NotSupported, GPU lost) passes through and leaves the choice open. With
    no version left it raises an UNSUPPORTED NvmlFailure.
    """

    __slots__ = ("_caller", "_candidates", "chosen", "name")

    def __init__(self, name: str, candidates: Sequence[tuple[str, Read]], caller: NvmlCaller) -> None:
        self.name = name
        self._candidates = list(candidates)
        self._caller = caller
        self.chosen: Read | None = None

    def __call__(self, handle: Any) -> Any:
        chosen = self.chosen
        if chosen is not None:
            return chosen(handle)
        return self._probe(handle)

    def _probe(self, handle: Any) -> Any:
        caller = self._caller
        while self._candidates:
            label, read = self._candidates[0]
            try:
                value = read(handle)
            except caller.probe_errors as exc:
                if caller.kind(exc) is not Kind.MISSING_CALL:
                    raise
                self._candidates.pop(0)
                log.info("nvml_version_fallback", read=self.name, skipped=label, reason=str(exc))
                continue
            self.chosen = read
            self._candidates = [(label, read)]
            return value
        raise NvmlFailure(Kind.UNSUPPORTED, f"no version of {self.name} in this driver")


@dataclass(frozen=True, slots=True)
class Reads:
    """Every NVML read the backend makes, bound once.

    ``per_tick`` are the nine (field, read) pairs of every tick, in the order of
    :data:`PER_TICK_FIELDS`; ``requested`` and ``energy`` run on slower cadences.
    """

    per_tick: tuple[tuple[str, Read], ...]
    memory: Read
    requested: Read
    energy: Read

    def settled(self) -> tuple[tuple[str, Read], ...] | None:
        """``per_tick`` with each versioned read replaced by the version it chose (one
        call frame less per read), or None while a version is still open."""
        bound = []
        for field, read in self.per_tick:
            chosen = read.chosen if isinstance(read, Versioned) else read
            if chosen is None:
                return None
            bound.append((field, chosen))
        return tuple(bound)


PER_TICK_FIELDS: Final = (
    "temperature",
    "power",
    "power_limit_enforced",
    "memory",
    "utilization",
    "clock_event_reasons",
    "sm_clock",
    "compute_processes",
    "graphics_processes",
)


def build_reads(nvml: Any, caller: NvmlCaller) -> Reads:
    """Bind every read of ``nvml`` (the pynvml module or a stand-in), versioned ones as Versioned."""

    def has(name: str) -> bool:
        return callable(getattr(nvml, name, None))

    temperature: list[tuple[str, Read]] = []
    if has("nvmlDeviceGetTemperatureV"):
        get_v = nvml.nvmlDeviceGetTemperatureV
        temperature.append(("nvmlDeviceGetTemperatureV", lambda h: get_v(h, TEMPERATURE_GPU)))
    get_t = getattr(nvml, "nvmlDeviceGetTemperature", _absent)
    temperature.append(("nvmlDeviceGetTemperature", lambda h: get_t(h, TEMPERATURE_GPU)))

    get_mem = getattr(nvml, "nvmlDeviceGetMemoryInfo", _absent)
    memory: list[tuple[str, Read]] = []
    mem_v2 = getattr(nvml, "nvmlMemory_v2", None)
    if mem_v2 is not None:
        memory.append(("nvmlDeviceGetMemoryInfo_v2", lambda h: get_mem(h, version=mem_v2)))
    memory.append(("nvmlDeviceGetMemoryInfo", get_mem))

    reasons = [
        (name, getattr(nvml, name))
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
        if has(name)
    ]

    def processes(kind: str) -> Versioned:
        base = f"nvmlDeviceGet{kind}RunningProcesses"
        names = (f"{base}_v3", f"{base}_v2", base)
        return Versioned(f"{kind.lower()}_processes", [(n, getattr(nvml, n)) for n in names if has(n)], caller)

    get_clock = nvml.nvmlDeviceGetClockInfo
    read_memory = Versioned("memory", memory, caller)
    per_tick: tuple[Read, ...] = (
        Versioned("temperature", temperature, caller),
        nvml.nvmlDeviceGetPowerUsage,
        nvml.nvmlDeviceGetEnforcedPowerLimit,
        read_memory,
        nvml.nvmlDeviceGetUtilizationRates,
        Versioned("clock_event_reasons", reasons, caller),
        lambda h: get_clock(h, CLOCK_SM),
        processes("Compute"),
        processes("Graphics"),
    )
    return Reads(
        per_tick=tuple(zip(PER_TICK_FIELDS, per_tick, strict=True)),
        memory=read_memory,
        requested=nvml.nvmlDeviceGetPowerManagementLimit,
        energy=nvml.nvmlDeviceGetTotalEnergyConsumption,
    )
