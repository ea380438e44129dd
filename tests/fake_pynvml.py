"""A fake ``pynvml`` for tests: the API surface NvmlBackend uses, configurable per GPU.

``FakeNvml([FakeGpu(...), ...])`` behaves like the ``pynvml`` module: the same
function names, the same ``NVML_ERROR_*`` values, ``NVMLError(value)`` returning the
matching subclass with ``.value``. Every call is counted in ``calls`` under the name
of the C symbol it would reach (``nvmlDeviceGetMemoryInfo_v2``,
``nvmlDeviceGetComputeRunningProcesses_v3`` ...), so tests can prove what was called
how often.

Knobs:
- ``FakeGpu.errors``: C symbol -> NVML error code raised by that call on that GPU.
- ``FakeGpu.lost``: every call on the GPU (and reacquiring its handle) raises GPU_IS_LOST.
- ``FakeNvml(absent_symbols=...)``: symbols the "driver" lacks (FUNCTION_NOT_FOUND).
- ``FakeNvml(missing=...)``: Python functions this "nvidia-ml-py" lacks (AttributeError).
- ``FakeNvml(init_error=code)``: nvmlInit fails; ``fake.fatal = code``: every later call fails.
Values are NVML's units: milliwatts, millijoules, bytes, degrees C, MHz, percent.
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
nvmlMemory_v2 = 0x02000028

_STRINGS = {
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
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
    energy_mj: int = 1_000_000
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # C symbol -> NVML error code
    lost: bool = False


@dataclass(frozen=True)
class FakeHandle:
    """An opaque device handle."""

    index: int


class FakeNvml:
    """A stand-in for the pynvml module (see the module docstring)."""

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

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("nvml") and name in object.__getattribute__(self, "missing"):
            raise AttributeError(name)
        return object.__getattribute__(self, name)

    # ------------------------------------------------------------------ plumbing

    def _enter(self, symbol: str, handle: FakeHandle | None = None) -> FakeGpu | None:
        self.calls[symbol] += 1
        if symbol in self.absent_symbols:
            raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
        if self.fatal is not None:
            raise NVMLError(self.fatal)
        if handle is None:
            return None
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
        assert clock_type == NVML_CLOCK_SM
        return self._gpu("nvmlDeviceGetClockInfo", handle).sm_clock_mhz

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetComputeRunningProcesses_v3", handle).compute)

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetComputeRunningProcesses_v2", handle).compute)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetComputeRunningProcesses", handle).compute)

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetGraphicsRunningProcesses_v3", handle).graphics)

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetGraphicsRunningProcesses_v2", handle).graphics)

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: FakeHandle) -> list[SimpleNamespace]:
        return self._procs(self._gpu("nvmlDeviceGetGraphicsRunningProcesses", handle).graphics)

    # ------------------------------------------------------------------ setter

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit_mw: int) -> None:
        gpu = self._gpu("nvmlDeviceSetPowerManagementLimit", handle)
        if not gpu.limit_min_mw <= limit_mw <= gpu.limit_max_mw:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu.requested_limit_mw = gpu.enforced_limit_mw = limit_mw


# The module-level names pynvml exposes (constants, error classes) are attributes of the fake too.
for _name, _value in list(globals().items()):
    if _name.startswith(("NVML_", "NVMLError", "nvmlMemory_")) or _name == "NVMLLibraryMismatchError":
        setattr(FakeNvml, _name, _value)
del _name, _value
