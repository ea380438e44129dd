"""A fake ``pynvml`` for tests: the API surface NvmlBackend uses, configurable per GPU.

``FakeNvml([FakeGpu(...), ...])`` behaves like the ``pynvml`` module: the same
function names, the same ``NVML_ERROR_*`` values, ``NVMLError(value)`` returning the
matching subclass with ``.value``. Every call is counted in ``calls`` under the name
of the C symbol it would reach (``nvmlDeviceGetMemoryInfo_v2``,
``nvmlDeviceGetComputeRunningProcesses_v3`` ...), so tests can prove what was called
how often.

Knobs:
- ``FakeGpu.errors``: C symbol -> NVML error code raised by that call on that GPU
  (``nvmlDeviceGetHandleByIndex_v2`` too: getting the GPU's handle fails).
- GPUs appearing later: append to ``fake.gpus`` (nvmlDeviceGetCount answers its length).
- ``FakeGpu.lost``: every call on the GPU (and reacquiring its handle) raises GPU_IS_LOST.
- ``FakeNvml(absent_symbols=...)``: symbols the "driver" lacks (FUNCTION_NOT_FOUND).
- ``FakeNvml(missing=...)``: Python functions this "nvidia-ml-py" lacks (AttributeError).
- ``FakeNvml(init_error=code)``: nvmlInit fails; ``fake.fatal = code``: every later call fails.
- ``fake.xid(gpu_index, code)``: an XID error event arrives (queued only for a GPU
  registered on an event set, as NVML does); ``nvmlEventSetWait_v2`` returns the queued
  events one by one, then raises Timeout.
- Telemetry: ``FakeGpu.memory_temperature_c = None`` makes that field answer NotSupported
  (in the field value's own ``nvmlReturn``, as NVML does); ``fans = None`` makes
  nvmlDeviceGetNumFans answer NotSupported (a data-center GPU); ``violation_ns`` lists the
  perf policies NVML keeps a counter for (any other answers NotSupported).
- Fan control: ``nvmlDeviceSetFanSpeed_v2`` switches a fan to manual (policy 1) and, with
  ``FakeGpu.fans_follow`` (default), makes it report the set speed; without, the fan keeps
  reporting its old speed (a blocked fan, or a driver that accepts and ignores the write).
  ``nvmlDeviceSetDefaultFanSpeed_v2`` and ``nvmlDeviceSetFanControlPolicy(..., 0)`` hand it
  back (its speed returns to the card's own, ``auto_fans``). Every write is listed in
  ``FakeGpu.fan_writes``. ``fan_range = None``: nvmlDeviceGetMinMaxFanSpeed answers
  NotSupported. Refusals through ``errors`` (NO_PERMISSION, NOT_SUPPORTED) or
  ``absent_symbols`` (an old driver: FUNCTION_NOT_FOUND).
- MIG: ``FakeGpu.mig_mode`` is the current MIG mode nvmlDeviceGetMigMode answers (0 disabled,
  1 enabled; None: NotSupported, a GPU without MIG), ``mig_pending`` the pending one (None: the
  current). ``FakeGpu.mig_devices`` are its MIG devices by MIG device index (``None``: an empty
  slot, which nvmlDeviceGetMigDeviceHandleByIndex answers NOT_FOUND), up to
  ``max_mig_devices`` (what nvmlDeviceGetMaxMigDeviceCount answers in MIG mode; 0 otherwise).
  A :class:`FakeMig` answers the per-device calls on its handle (UUID, memory info, compute
  processes, GPU instance id, each counted in ``calls`` and in ``mig_calls``) with its own memory
  and processes, and raises what its ``errors`` name. A handle whose slot is emptied (an instance destroyed)
  answers ``FakeNvml.stale_mig_error`` (INVALID_ARGUMENT by default); a slot filled again
  answers for the new instance (NVML reuses handles). In MIG mode the parent's compute list
  also lists every instance's processes with ``usedGpuMemory`` None (NVML's aggregate, whose
  per-process memory is not available there).
Values are NVML's units: milliwatts, millijoules, bytes, degrees C, MHz, percent, ns.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_THRESHOLD_SHUTDOWN = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
nvmlMemory_v2 = 0x02000028
NVML_PERF_POLICY_POWER = 0
NVML_PERF_POLICY_THERMAL = 1
NVML_PERF_POLICY_SYNC_BOOST = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_FI_DEV_MEMORY_TEMP = 82
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_PSTATE_UNKNOWN = 32
NVML_FAN_POLICY_TEMPERATURE_CONTINOUS_SW = 0
NVML_FAN_POLICY_MANUAL = 1
nvmlEventTypeXidCriticalError = 0x8
NVML_DEVICE_MIG_DISABLE = 0x0
NVML_DEVICE_MIG_ENABLE = 0x1

_STRINGS = {
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml's: ``NVMLError(value)`` returns the subclass for ``value``."""

    _valClassMapping: dict[int, type[NVMLError]] = {}  # noqa: RUF012 - mirrors pynvml
    value: int

    def __new__(cls, value: int) -> NVMLError:
        target = NVMLError._valClassMapping.get(value, cls) if cls is NVMLError else cls
        obj = Exception.__new__(target)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLLibraryMismatchError(Exception):
    """pynvml's error for an unversioned wrapper whose newest symbol the driver lacks."""


def _make_error_classes() -> None:
    for name, value in list(globals().items()):
        if not name.startswith("NVML_ERROR_"):
            continue
        class_name = "NVMLError_" + string.capwords(name.replace("NVML_ERROR_", ""), "_").replace("_", "")

        def new(cls: type[NVMLError], *args: Any, _value: int = value) -> NVMLError:
            obj = Exception.__new__(cls)
            obj.value = _value
            return obj

        cls = type(class_name, (NVMLError,), {"__new__": new, "__init__": lambda self, *a: None})
        globals()[class_name] = cls
        NVMLError._valClassMapping[value] = cls


_make_error_classes()


@dataclass
class FakeGpu:
    """One fake GPU, in NVML's units (mW, mJ, bytes, C, MHz, percent)."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    pci_bus_id: bytes = b"00000000:19:00.0"
    temperature_c: int = 40
    power_mw: int = 85_097
    enforced_limit_mw: int = 700_000
    requested_limit_mw: int = 700_000
    limit_min_mw: int = 200_000
    limit_max_mw: int = 700_000
    limit_default_mw: int = 700_000
    slowdown_c: int = 89
    shutdown_c: int = 95
    memory_total: int = 85_520_809_984
    memory_used: int = 503_316_480
    memory_reserved: int = 0  # v1 "used" includes it
    utilization_pct: int = 0
    clock_event_reasons: int = 1
    sm_clock_mhz: int = 345
    memory_clock_mhz: int = 2619
    pstate: int = 0
    memory_temperature_c: int | None = 36  # None: NotSupported
    fans: list[int] | None = field(default_factory=list)  # percent per fan; None: NotSupported
    fan_range: tuple[int, int] | None = (30, 100)  # nvmlDeviceGetMinMaxFanSpeed; None: NotSupported
    fans_follow: bool = True  # False: a set speed is accepted but never reported
    fan_policies: dict[int, int] = field(default_factory=dict)  # fan -> policy (absent: automatic)
    fan_writes: list[tuple[str, int, int | None]] = field(default_factory=list)  # (call, fan, percent)
    auto_fans: list[int] | None = None  # the speeds under automatic control (the initial ``fans``)
    violation_ns: dict[int, int] = field(default_factory=lambda: {NVML_PERF_POLICY_POWER: 0, 2: 0})
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)  # (error type, counter type) -> count
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    energy_mj: int = 1_000_000
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # C symbol -> NVML error code
    lost: bool = False
    mig_mode: int | None = NVML_DEVICE_MIG_DISABLE  # current MIG mode; None: NotSupported
    mig_pending: int | None = None  # pending MIG mode; None: the current one
    mig_devices: list[FakeMig | None] = field(default_factory=list)  # by MIG device index; None: empty slot
    max_mig_devices: int = 7  # nvmlDeviceGetMaxMigDeviceCount in MIG mode


@dataclass
class FakeMig(FakeGpu):
    """One MIG device (a compute instance): its UUID, its own memory and compute processes, and
    ``errors`` (C symbol -> NVML error code) raised by calls on its handle."""

    uuid: str = "MIG-00000000-0000-0000-0000-000000000000"
    memory_total: int = 20_937_965_568  # a 2g.20gb instance of an H100
    memory_used: int = 0
    gpu_instance_id: int | None = None  # nvmlDeviceGetGpuInstanceId; None: NotSupported


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle."""

    index: int


@dataclass(frozen=True)
class FakeMigHandle(FakeHandle):
    """An opaque MIG device handle: MIG device ``slot`` of GPU ``index``."""

    slot: int


class FakeEventSet:
    """An NVML event set: which GPUs are registered, the events queued, whether it was freed."""

    def __init__(self) -> None:
        self.registered: set[int] = set()
        self.queue: list[SimpleNamespace] = []
        self.freed = False


class FakeNvml:
    """A stand-in for the pynvml module (see the module docstring)."""

    def __new__(cls, *args: Any, missing: Iterable[str] = (), **kwargs: Any) -> FakeNvml:
        # Only a fake with missing functions pays for a __getattribute__ on every attribute
        # (it would otherwise add microseconds to each stub call and skew timings).
        return object.__new__(_FakeNvmlLacking if missing and cls is FakeNvml else cls)

    def __init__(
        self,
        gpus: Iterable[FakeGpu],
        *,
        init_error: int | None = None,
        absent_symbols: Iterable[str] = (),
        missing: Iterable[str] = (),
        driver: str = "580.159.04",
    ) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.absent_symbols = set(absent_symbols)
        self.missing = set(missing)
        self.driver = driver
        self.fatal: int | None = None
        self.calls: Counter[str] = Counter()
        self.initialised = False
        self.shutdowns = 0
        self.event_sets: list[FakeEventSet] = []
        self.wait_error: int | None = None  # nvmlEventSetWait_v2 raises this (None: events or Timeout)
        self.mig_calls: Counter[str] = Counter()  # calls made on MIG device handles, by C symbol
        self.stale_mig_error = NVML_ERROR_INVALID_ARGUMENT  # a handle whose instance is gone answers this

    def xid(self, gpu_index: int, code: int) -> None:
        """An XID error ``code`` on GPU ``gpu_index``: queued on every live set it is registered on."""
        for event_set in self.event_sets:
            if gpu_index in event_set.registered and not event_set.freed:
                event_set.queue.append(
                    SimpleNamespace(
                        device=FakeHandle(gpu_index),
                        eventType=nvmlEventTypeXidCriticalError,
                        eventData=code,
                        gpuInstanceId=0xFFFFFFFF,
                        computeInstanceId=0xFFFFFFFF,
                    )
                )

    # ------------------------------------------------------------------ plumbing

    def _enter(self, symbol: str, handle: FakeHandle | None = None) -> FakeGpu | None:
        self.calls[symbol] += 1
        if symbol in self.absent_symbols:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if self.fatal is not None:
            raise NVMLError(self.fatal)
        if handle is None:
            return None
        if isinstance(handle, FakeMigHandle):
            return self._mig_device(symbol, handle)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if symbol in gpu.errors:
            raise NVMLError(gpu.errors[symbol])
        return gpu

    def _gpu(self, symbol: str, handle: FakeHandle) -> FakeGpu:
        gpu = self._enter(symbol, handle)
        assert gpu is not None
        return gpu

    def _mig_device(self, symbol: str, handle: FakeMigHandle) -> FakeMig:
        """The MIG device a handle reaches now (raising what NVML would)."""
        self.mig_calls[symbol] += 1
        parent = self.gpus[handle.index]
        if parent.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        slots = parent.mig_devices
        mig = slots[handle.slot] if parent.mig_mode == NVML_DEVICE_MIG_ENABLE and handle.slot < len(slots) else None
        if mig is None:
            raise NVMLError(self.stale_mig_error)
        if symbol in mig.errors:
            raise NVMLError(mig.errors[symbol])
        return mig

    def _compute(self, gpu: FakeGpu) -> list[tuple[int, int | None]]:
        """The compute list a device answers: in MIG mode the parent's also lists each instance's processes
        with their memory not available."""
        if gpu.mig_mode != NVML_DEVICE_MIG_ENABLE or isinstance(gpu, FakeMig):
            return gpu.compute
        return [*gpu.compute, *((pid, None) for mig in gpu.mig_devices if mig for pid, _ in mig.compute)]

    @staticmethod
    def _procs(entries: list[tuple[int, int | None]]) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=used, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)
            for pid, used in entries
        ]

    # ------------------------------------------------------------------ library

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        self.shutdowns += 1
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex_v2")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        if "nvmlDeviceGetHandleByIndex_v2" in gpu.errors:  # a GPU still initialising, a timeout
            raise NVMLError(gpu.errors["nvmlDeviceGetHandleByIndex_v2"])
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByUUID")
        for index, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                if gpu.lost:
                    raise NVMLError(NVML_ERROR_GPU_IS_LOST)
                return FakeHandle(index)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    # ------------------------------------------------------------------ static

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return self._gpu("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu("nvmlDeviceGetPciInfo_v3", handle).pci_bus_id)

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu("nvmlDeviceGetPowerManagementLimitConstraints", handle)
        return [gpu.limit_min_mw, gpu.limit_max_mw]

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerManagementDefaultLimit", handle).limit_default_mw

    def nvmlDeviceGetTemperatureThreshold(self, handle: FakeHandle, threshold: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTemperatureThreshold", handle)
        return gpu.slowdown_c if threshold == NVML_TEMPERATURE_THRESHOLD_SLOWDOWN else gpu.shutdown_c

    # ------------------------------------------------------------------ live

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return self._gpu("nvmlDeviceGetTemperatureV", handle).temperature_c

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        assert sensor == NVML_TEMPERATURE_GPU
        return self._gpu("nvmlDeviceGetTemperature", handle).temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetEnforcedPowerLimit", handle).enforced_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPowerManagementLimit", handle).requested_limit_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> SimpleNamespace:
        if version:
            gpu = self._gpu("nvmlDeviceGetMemoryInfo_v2", handle)
            if version != nvmlMemory_v2:
                raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
            free = gpu.memory_total - gpu.memory_used - gpu.memory_reserved
            return SimpleNamespace(
                version=version,
                total=gpu.memory_total,
                reserved=gpu.memory_reserved,
                free=free,
                used=gpu.memory_used,
            )
        gpu = self._gpu("nvmlDeviceGetMemoryInfo", handle)
        used = gpu.memory_used + gpu.memory_reserved
        return SimpleNamespace(total=gpu.memory_total, free=gpu.memory_total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._gpu("nvmlDeviceGetUtilizationRates", handle).utilization_pct, memory=0)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clock_event_reasons

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetClockInfo", handle)
        if clock_type == NVML_CLOCK_SM:
            return gpu.sm_clock_mhz
        assert clock_type == NVML_CLOCK_MEM
        if "nvmlDeviceGetClockInfo(MEM)" in gpu.errors:
            raise NVMLError(gpu.errors["nvmlDeviceGetClockInfo(MEM)"])
        return gpu.memory_clock_mhz

    def nvmlDeviceGetPerformanceState(self, handle: FakeHandle) -> int:
        return self._gpu("nvmlDeviceGetPerformanceState", handle).pstate

    def nvmlDeviceGetViolationStatus(self, handle: FakeHandle, policy: int) -> SimpleNamespace:
        gpu = self._gpu("nvmlDeviceGetViolationStatus", handle)
        if policy not in gpu.violation_ns:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(referenceTime=0, violationTime=gpu.violation_ns[policy])

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        gpu = self._gpu("nvmlDeviceGetTotalEccErrors", handle)
        return gpu.ecc.get((error_type, counter_type), 0)

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        return self._gpu("nvmlDeviceGetRemappedRows", handle).remapped_rows

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[int]) -> list[SimpleNamespace]:
        gpu = self._gpu("nvmlDeviceGetFieldValues", handle)
        values = []
        for field_id in field_ids:
            temp = gpu.memory_temperature_c if field_id == NVML_FI_DEV_MEMORY_TEMP else None
            values.append(
                SimpleNamespace(
                    fieldId=field_id,
                    scopeId=0,
                    timestamp=0,
                    latencyUsec=0,
                    valueType=NVML_VALUE_TYPE_UNSIGNED_INT,
                    nvmlReturn=NVML_SUCCESS if temp is not None else NVML_ERROR_NOT_SUPPORTED,
                    value=SimpleNamespace(uiVal=temp or 0),
                )
            )
        return values

    def nvmlDeviceGetNumFans(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetNumFans", handle)
        if gpu.fans is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return len(gpu.fans)

    def _fan_gpu(self, symbol: str, handle: FakeHandle, fan: int) -> FakeGpu:
        gpu = self._gpu(symbol, handle)
        if gpu.fans is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not 0 <= fan < len(gpu.fans):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if gpu.auto_fans is None:
            gpu.auto_fans = list(gpu.fans)
        return gpu

    def nvmlDeviceGetMinMaxFanSpeed(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu("nvmlDeviceGetMinMaxFanSpeed", handle)
        if gpu.fan_range is None or gpu.fans is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(gpu.fan_range)

    def nvmlDeviceGetFanControlPolicy_v2(self, handle: FakeHandle, fan: int) -> int:
        return self._fan_gpu("nvmlDeviceGetFanControlPolicy_v2", handle, fan).fan_policies.get(fan, 0)

    def nvmlDeviceSetFanSpeed_v2(self, handle: FakeHandle, fan: int, speed: int) -> None:
        gpu = self._fan_gpu("nvmlDeviceSetFanSpeed_v2", handle, fan)
        assert gpu.fans is not None
        low, high = gpu.fan_range or (0, 100)
        if not low <= speed <= high:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu.fan_writes.append(("speed", fan, speed))
        gpu.fan_policies[fan] = NVML_FAN_POLICY_MANUAL
        if gpu.fans_follow:
            gpu.fans[fan] = speed

    def nvmlDeviceSetDefaultFanSpeed_v2(self, handle: FakeHandle, fan: int) -> None:
        gpu = self._fan_gpu("nvmlDeviceSetDefaultFanSpeed_v2", handle, fan)
        gpu.fan_writes.append(("default", fan, None))
        self._auto(gpu, fan)

    def nvmlDeviceSetFanControlPolicy(self, handle: FakeHandle, fan: int, policy: int) -> None:
        gpu = self._fan_gpu("nvmlDeviceSetFanControlPolicy", handle, fan)
        gpu.fan_writes.append(("policy", fan, policy))
        if policy == NVML_FAN_POLICY_TEMPERATURE_CONTINOUS_SW:
            self._auto(gpu, fan)
        else:
            gpu.fan_policies[fan] = policy

    @staticmethod
    def _auto(gpu: FakeGpu, fan: int) -> None:
        gpu.fan_policies.pop(fan, None)
        assert gpu.fans is not None and gpu.auto_fans is not None
        gpu.fans[fan] = gpu.auto_fans[fan]

    def nvmlDeviceGetFanSpeed_v2(self, handle: FakeHandle, fan: int) -> int:
        gpu = self._gpu("nvmlDeviceGetFanSpeed_v2", handle)
        if gpu.fans is None or not 0 <= fan < len(gpu.fans):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED if gpu.fans is None else NVML_ERROR_INVALID_ARGUMENT)
        return gpu.fans[fan]

    # ------------------------------------------------------------------ events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        self._gpu("nvmlDeviceRegisterEvents", handle)
        assert event_types == nvmlEventTypeXidCriticalError and not event_set.freed
        event_set.registered.add(handle.index)

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> SimpleNamespace:
        self._enter("nvmlEventSetWait_v2")
        assert timeout_ms == 0 and not event_set.freed
        if self.wait_error is not None:
            raise NVMLError(self.wait_error)
        if not event_set.queue:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        return event_set.queue.pop(0)

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        assert not event_set.freed, "event set freed twice"
        event_set.freed = True

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._compute(self._gpu("nvmlDeviceGetComputeRunningProcesses_v3", handle)))

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._compute(self._gpu("nvmlDeviceGetComputeRunningProcesses_v2", handle)))

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._compute(self._gpu("nvmlDeviceGetComputeRunningProcesses", handle)))

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetGraphicsRunningProcesses_v3", handle).graphics)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetGraphicsRunningProcesses_v2", handle).graphics)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetGraphicsRunningProcesses", handle).graphics)

    # ------------------------------------------------------------------ MIG

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._gpu("nvmlDeviceGetMigMode", handle)
        if gpu.mig_mode is None or isinstance(handle, FakeMigHandle):
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [gpu.mig_mode, gpu.mig_mode if gpu.mig_pending is None else gpu.mig_pending]

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetGpuInstanceId", handle)
        if not isinstance(gpu, FakeMig):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)  # not a MIG device handle
        if gpu.gpu_instance_id is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.gpu_instance_id

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        gpu = self._gpu("nvmlDeviceGetMaxMigDeviceCount", handle)
        if gpu.mig_mode is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_mig_devices if gpu.mig_mode == NVML_DEVICE_MIG_ENABLE else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeMigHandle:
        gpu = self._gpu("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if gpu.mig_mode != NVML_DEVICE_MIG_ENABLE:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED if gpu.mig_mode is None else NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < gpu.max_mig_devices:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(gpu.mig_devices) or gpu.mig_devices[index] is None:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return FakeMigHandle(handle.index, index)

    # ------------------------------------------------------------------ setter

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit_mw: int) -> None:
        gpu = self._gpu("nvmlDeviceSetPowerManagementLimit", handle)
        if not gpu.limit_min_mw <= limit_mw <= gpu.limit_max_mw:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu.requested_limit_mw = gpu.enforced_limit_mw = limit_mw


class _FakeNvmlLacking(FakeNvml):
    """A FakeNvml whose bindings lack the functions in ``missing`` (AttributeError)."""

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)


# The module-level names pynvml exposes (constants, error classes) are attributes of the fake too.
for _name, _value in list(globals().items()):
    if _name.startswith(("NVML_", "NVMLError", "nvmlMemory_", "nvmlEventType")) or _name == "NVMLLibraryMismatchError":
        setattr(FakeNvml, _name, _value)
del _name, _value
