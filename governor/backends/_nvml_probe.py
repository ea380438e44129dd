"""NVML capability probing: which version of each call this driver and these bindings have.

Versioned NVML calls (temperature V, memory info v2, process info v3/v2/v1, clock
event/throttle reasons) are offered newest first; the first that answers is kept for the
life of the backend (:class:`Versioned`). A call older nvidia-ml-py lacks (violation
status, remapped rows, performance state, fan count/speed v2, field values) is a
one-candidate :class:`Versioned`: without it the read answers UNSUPPORTED. :func:`build_reads`
binds every read once, so a tick does no attribute lookups on the module.
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
CLOCK_MEM: Final = 2
PERF_POLICY_POWER: Final = 0
PERF_POLICY_SYNC_BOOST: Final = 2
MEMORY_ERROR_CORRECTED: Final = 0
MEMORY_ERROR_UNCORRECTED: Final = 1
VOLATILE_ECC: Final = 0
AGGREGATE_ECC: Final = 1
FI_DEV_MEMORY_TEMP: Final = 82
VALUE_FIELDS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
"""The member of nvmlValue_t each NVML_VALUE_TYPE_* (0..6) is read from."""

VIOLATION_REASONS: Final = (("sw_power_cap", PERF_POLICY_POWER), ("sync_boost", PERF_POLICY_SYNC_BOOST))
"""Clock event reasons NVML keeps a cumulative counter for (nvmlDeviceGetViolationStatus,
nanoseconds): nvml.h defines NVML_FI_DEV_CLOCKS_EVENT_REASON_SW_POWER_CAP and _SYNC_BOOST
as the POWER and SYNC_BOOST perf policies. The other reasons are integrated per tick."""

ECC_COUNTERS: Final = tuple(
    (f"ecc_{kind}_{scope}", kind, scope, kind_code, scope_code)
    for kind, kind_code in (("corrected", MEMORY_ERROR_CORRECTED), ("uncorrected", MEMORY_ERROR_UNCORRECTED))
    for scope, scope_code in (("volatile", VOLATILE_ECC), ("aggregate", AGGREGATE_ECC))
)
"""(field, type label, scope label, NVML error type, NVML counter type) of each ECC count."""


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

    @property
    def exhausted(self) -> bool:
        """No version is left to try: every call answers UNSUPPORTED."""
        return self.chosen is None and not self._candidates

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

    ``per_tick`` are the (field, read) pairs of every tick, in the order of
    :data:`PER_TICK_FIELDS`; ``requested`` and ``energy`` run on slower cadences, and so
    do the ``slow`` telemetry reads (:data:`SLOW_FIELDS`: NVML's violation counters in
    ns, ECC counts, remapped rows, memory temperature in C, memory clock in MHz,
    performance state). ``fan_count`` is read once per GPU; ``fan_speed(handle, fan)``
    answers in percent. ``mig_mode`` (NVML's [current, pending] MIG modes) is a slow read too;
    ``mig_memory`` and ``mig_compute`` read one MIG device (memory info, compute processes),
    versioned apart from the parent's reads: a version is chosen on a MIG device handle.
    """

    per_tick: tuple[tuple[str, Read], ...]
    memory: Read
    requested: Read
    energy: Read
    slow: tuple[tuple[str, Read], ...] = ()
    fan_count: Read = lambda h: 0
    fan_speed: Callable[[Any, int], Any] = lambda h, fan: None
    mig_mode: Read = _absent
    mig_memory: Read = _absent
    mig_compute: Read = _absent

    def fan_speeds(self, count: int) -> Read:
        """A read of the speed of fans 0 .. ``count`` - 1 of one GPU (percent each)."""
        speed, fans = self.fan_speed, range(count)
        return lambda h: [speed(h, fan) for fan in fans]

    def settled(self) -> tuple[tuple[str, Read], ...] | None:
        """``per_tick`` with each versioned read replaced by the version it chose (one
        call frame less per read), or None while a version is still open."""
        bound = []
        for field, read in self.per_tick:
            chosen = read.chosen if isinstance(read, Versioned) else read
            if chosen is None:
                if isinstance(read, Versioned) and read.exhausted:
                    chosen = read  # no version at all: it answers UNSUPPORTED and rests
                else:
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

SLOW_FIELDS: Final = (
    *(f"violation_{reason}" for reason, _ in VIOLATION_REASONS),
    *(field for field, *_ in ECC_COUNTERS),
    "remapped_rows",
    "memory_temperature",
    "memory_clock",
    "pstate",
)

TELEMETRY_FIELDS: Final = frozenset({"memory_clock", "pstate", "fan_count", "fan_speed", "mig_mode", *SLOW_FIELDS})
"""Reads that only feed the telemetry (and the MIG mode, which a GPU without MIG never has): one that
answers NotSupported is never asked again for that GPU."""


def field_number(value: Any) -> float:
    """The number in an nvmlFieldValue_t; raises its NVML error when ``nvmlReturn`` is one."""
    kind = int(value.valueType)
    member = VALUE_FIELDS[kind] if 0 <= kind < len(VALUE_FIELDS) else "uiVal"
    return float(getattr(value.value, member))


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

    def processes(kind: str, prefix: str = "") -> Versioned:
        base = f"nvmlDeviceGet{kind}RunningProcesses"
        names = (f"{base}_v3", f"{base}_v2", base)
        return Versioned(f"{prefix}{kind.lower()}_processes", [(n, getattr(nvml, n)) for n in names if has(n)], caller)

    get_clock = nvml.nvmlDeviceGetClockInfo
    read_memory = Versioned("memory", memory, caller)

    def optional(name: str, bind: Callable[[Callable[..., Any]], Read] | None = None) -> Versioned:
        """A read through ``name``, which this nvidia-ml-py may lack (then it answers
        UNSUPPORTED); ``bind`` turns the function into a read of one handle."""
        fn = getattr(nvml, name, None)
        if not callable(fn):
            return Versioned(name, [], caller)
        return Versioned(name, [(name, fn if bind is None else bind(fn))], caller)

    def violation(policy: int) -> Callable[[Callable[..., Any]], Read]:
        return lambda get: lambda h: get(h, policy).violationTime

    def ecc(kind: int, scope: int) -> Callable[[Callable[..., Any]], Read]:
        return lambda get: lambda h: get(h, kind, scope)

    error = nvml.NVMLError

    def memory_temperature(get: Callable[..., Any]) -> Read:
        def read(h: Any) -> float:
            value = get(h, [FI_DEV_MEMORY_TEMP])[0]
            if int(value.nvmlReturn) != 0:
                raise error(int(value.nvmlReturn))
            return field_number(value)

        return read

    slow: tuple[Read, ...] = (
        *(optional("nvmlDeviceGetViolationStatus", violation(policy)) for _, policy in VIOLATION_REASONS),
        *(optional("nvmlDeviceGetTotalEccErrors", ecc(k, c)) for *_, k, c in ECC_COUNTERS),
        optional("nvmlDeviceGetRemappedRows"),
        optional("nvmlDeviceGetFieldValues", memory_temperature),
        lambda h: get_clock(h, CLOCK_MEM),
        optional("nvmlDeviceGetPerformanceState"),
    )
    fan_speed = getattr(nvml, "nvmlDeviceGetFanSpeed_v2", None)
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
        slow=tuple(zip(SLOW_FIELDS, slow, strict=True)),
        fan_count=optional("nvmlDeviceGetNumFans") if callable(fan_speed) else optional("nvmlDeviceGetFanSpeed_v2"),
        fan_speed=fan_speed if callable(fan_speed) else _absent,
        mig_mode=optional("nvmlDeviceGetMigMode"),
        mig_memory=Versioned("mig_memory", memory, caller),
        mig_compute=processes("Compute", "mig_"),
    )
